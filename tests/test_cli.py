"""The README's main job: ``ncutfast demo`` (planted maps vs the reference, then labeling end to end)."""

from __future__ import annotations

import json
from pathlib import Path

from ncutfast.cli import main


def test_demo_runs_end_to_end(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--images", "3", "--grid", "9", "11", "--channels", "24", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "agreement with the reference" in text and "speed-up" in text
    coco = json.loads((tmp_path / "labels.json").read_text())
    assert len(coco["images"]) == 8 and all(a["image_id"] for a in coco["annotations"])
    # A rerun resumes: nothing is labelled twice and the file keeps its content.
    assert main(["demo", "--images", "3", "--grid", "9", "11", "--channels", "24", "--out", str(tmp_path)]) == 0
    assert "(0 labelled now, 8 in an earlier run)" in capsys.readouterr().out
    assert json.loads((tmp_path / "labels.json").read_text()) == coco
