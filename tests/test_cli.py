"""The README's main job: ``ncutfast demo`` (planted maps vs the reference, then labeling end to end)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ncutfast
from ncutfast.cli import main


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"ncutfast {ncutfast.__version__}"


def test_demo_runs_end_to_end(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--images", "3", "--grid", "9", "11", "--channels", "24", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "agreement with the reference" in text and "speed-up" in text
    lines = text.splitlines()
    top = lines.index(next(line for line in lines if line.startswith("planted ")))
    rows = [line.split() for line in lines[top + 1: top + 10]]  # the 9 x 11 planted layout beside the mask
    assert all(len(r) == 2 and len(r[0]) == len(r[1]) == 11 for r in rows)
    assert all(set(a) <= set(".123") and set(b) <= set(".#") for a, b in rows)
    assert any(set(a) & set("123") for a, _ in rows)
    coco = json.loads((tmp_path / "labels.json").read_text())
    assert len(coco["images"]) == 8 and all(a["image_id"] for a in coco["annotations"])
    # A rerun resumes: nothing is labelled twice and the file keeps its content.
    assert main(["demo", "--images", "3", "--grid", "9", "11", "--channels", "24", "--out", str(tmp_path)]) == 0
    assert "(0 labelled now, 8 in an earlier run)" in capsys.readouterr().out
    assert json.loads((tmp_path / "labels.json").read_text()) == coco
