"""``ncutfast label`` / ``merge`` under hostile or careless use: nothing lost, nothing overwritten, no traceback.

Each test pins one defect found by trying the command as a new user and as an attacker (output protection,
leaked workers, temporary files, corrupted shards, merging, memory, devices, bad inputs, 16-bit images,
symbolic links, messages). Runs are in-process where possible and on tiny images (ViT-S/16 at 32 px).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ncutfast.label import machine, pipeline
from ncutfast.label.cli import LABEL_MODULES, main
from ncutfast.label.demo import make_demo_images
from ncutfast.label.geometry import prepare
from ncutfast.label.records import atomic_write_json, info_from_manifest, parts_dir_for, read_batches
from ncutfast.label.weights import WeightsError, load_vit

TINY = ["--arch", "vit_small_patch16", "--fixed-size", "32", "--workers", "0", "--no-progress"]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    make_demo_images(folder, n=5, size=(40, 28), seed=7)
    return folder


def _label(images: Path, out: Path, weights: Path, *extra: str) -> int:
    return main(["label", str(images), "--out", str(out), "--weights", str(weights), *TINY, *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> tuple[Path, list[int]]:
    """One finished run (batches of 2) over 5 images, a broken JPEG, a dangling and two looping symlinks.

    Returns the folder (``imgs/``, ``labels.json``, ``labels.json.parts/``) and the progress bar's steps.
    """
    import tqdm

    folder = tmp_path_factory.mktemp("finished")
    images = folder / "imgs"
    make_demo_images(images, n=5, size=(40, 28), seed=7)
    (images / "class_0" / "broken.jpg").write_bytes(b"not a jpeg")
    os.symlink(images / "nowhere.jpg", images / "dangling.jpg")
    os.symlink(images / "loop_b.png", images / "loop_a.png")
    os.symlink(images / "loop_a.png", images / "loop_b.png")
    steps: list[int] = []

    class Bar(tqdm.tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            steps.append(int(n or 0))
            return super().update(n)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tqdm, "tqdm", Bar)
        assert _label(images, folder / "labels.json", weights, "--batch-size", "2") == 0
    return folder, steps


def _copy(finished: tuple[Path, list[int]], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the finished run: (images folder, labels.json)."""
    shutil.copytree(finished[0], tmp_path / "run", symlinks=True)
    return tmp_path / "run" / "imgs", tmp_path / "run" / "labels.json"


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ncutfast ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "\x1b" not in err
    return lines[0]


# -- 1. --out protection ---------------------------------------------------------------------------------------

def test_existing_out_is_refused_unless_ours_or_overwrite(tmp_path: Path, finished, weights: Path,
                                                         capsys) -> None:
    images, labels = _copy(finished, tmp_path)
    victim = tmp_path / "model.pth"
    victim.write_bytes(b"86 MB of weights")
    assert _label(images, victim, weights, "--batch-size", "2") == 2
    assert "already exists" in _err_line(capsys) and victim.read_bytes() == b"86 MB of weights"
    assert not parts_dir_for(victim).exists()
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert _label(images, folder, weights, "--batch-size", "2") == 2
    assert "is a folder" in _err_line(capsys) and not parts_dir_for(folder).exists()  # before any work
    assert _label(images, victim, weights, "--batch-size", "2", "--overwrite") == 0
    assert victim.read_bytes() == labels.read_bytes()
    other = tmp_path / "other.json"
    other.write_text("{}")
    assert main(["merge", str(parts_dir_for(victim)), "--out", str(other)]) == 2
    assert "already exists" in _err_line(capsys) and other.read_text() == "{}"
    assert main(["merge", str(parts_dir_for(victim)), "--out", str(other), "--overwrite"]) == 0
    assert other.read_bytes() == labels.read_bytes()
    assert main(["merge", str(parts_dir_for(labels)), "--out", str(labels)]) == 0  # its own .parts: allowed


# -- 2. post-processing workers die with a killed parent -------------------------------------------------------

def _children(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited (only waits to be reaped)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_post_workers_die_when_the_parent_is_killed(tmp_path: Path, weights: Path) -> None:
    root = tmp_path / "data"
    make_demo_images(root, n=24, size=(40, 28), seed=3)
    out = tmp_path / "o.json"
    cmd = [sys.executable, "-m", "ncutfast.label.cli", "label", str(root), "--out", str(out),
           "--weights", str(weights), *TINY, "--batch-size", "1", "--post-workers", "2"]
    shard = parts_dir_for(out) / "rank-00000.jsonl"
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        # A record is written once the pool has post-processed a batch: the workers are up and running.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not (shard.exists() and shard.stat().st_size):
            time.sleep(0.05)
        kids = _children(proc.pid)  # the pool's workers and multiprocessing's resource tracker
        assert proc.poll() is None and len(kids) >= 2, "the pool did not start before the run ended"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(k) for k in kids):
        time.sleep(0.1)
    left = [k for k in kids if _alive(k)]
    for k in left:
        os.kill(k, signal.SIGKILL)
    assert not left, f"{len(left)} helper processes outlived the killed run"


# -- 3. a failed final write ------------------------------------------------------------------------------------

def test_failed_final_write_leaves_no_temporary_file(tmp_path: Path, finished, weights: Path, capsys,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    images, out = _copy(finished, tmp_path)
    before = out.read_bytes()
    real_replace = os.replace

    def disk_full(src, dst, *args, **kwargs):
        if Path(dst) == out:
            raise OSError(28, "No space left on device", str(src))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", disk_full)
    for _ in range(2):  # every retry cleans up after itself
        assert _label(images, out, weights, "--batch-size", "2") == 2
        assert "No space left on device" in _err_line(capsys)
    assert sorted(p.name for p in out.parent.iterdir()) == ["imgs", "labels.json", "labels.json.parts"]
    assert out.read_bytes() == before
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "x.json", {"not json": object()})
    assert not list(tmp_path.glob("x.json*"))


# -- 4. corrupted shard records ---------------------------------------------------------------------------------

def test_corrupted_shard_lines_are_skipped_and_later_records_kept(tmp_path: Path, finished, weights: Path,
                                                                  caplog, capsys) -> None:
    images, out = _copy(finished, tmp_path)
    want = out.read_bytes()
    shard = parts_dir_for(out) / "rank-00000.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    assert len(lines) == 5
    manifest = json.loads((parts_dir_for(out) / "manifest.json").read_text())
    bad = [b'{"batch": 0}\n', b"[1, 2, 3]\n", b"\x00\xff garbage\n", b'{"batch": 99, "images": [], "errors": []}\n']
    shard.write_bytes(bad[0] + lines[1] + bad[1] + bad[2] + b"".join(lines[3:]) + bad[3])
    done, problems = read_batches(parts_dir_for(out), manifest)
    assert sorted(done) == [1, 3, 4]  # the valid records after the damage are kept
    assert [p.split(":")[0] for p in problems] == [f"rank-00000.jsonl line {n}" for n in (1, 3, 4, 7)]
    assert main(["merge", str(parts_dir_for(out)), "--out", str(tmp_path / "m.json")]) == 2
    err = _err_line(capsys)
    assert "2 of 5 batches are not finished" in err and "line 4: not JSON" in err
    assert "line 1: 'images' and 'errors' must be lists" in err
    caplog.set_level(logging.INFO, logger="ncutfast.label")
    assert _label(images, out, weights, "--batch-size", "2") == 0
    assert "resuming: 5 images already labelled" in caplog.text and "line 3: a JSON list" in caplog.text
    assert "3 images labelled (1 skipped" in caplog.text  # only the two damaged batches were recomputed
    assert out.read_bytes() == want  # byte-identical to the undamaged run


# -- 5. merging COCO files --------------------------------------------------------------------------------------

def test_merge_json_refuses_mixed_settings_and_dedupes(tmp_path: Path, finished, caplog, capsys) -> None:
    _, mc = _copy(finished, tmp_path)
    single = json.loads(mc.read_text())
    manifest = json.loads((parts_dir_for(mc) / "manifest.json").read_text())
    assert single["info"] == {**info_from_manifest(manifest), "skipped_images": 4}
    tc = tmp_path / "tc.json"
    tc_info = info_from_manifest({**manifest, "mode": "tokencut", "taus": [0.2]})
    assert tc_info["mode"] == "tokencut" and not {"n_masks", "fixed_size", "sign_rule", "crf"} & set(tc_info)
    tc.write_text(json.dumps({**single, "info": tc_info}))
    assert main(["merge", str(mc), str(tc), "--out", str(tmp_path / "x.json")]) == 2
    assert "different settings" in (err := _err_line(capsys)) and "mode" in err and "taus" in err
    both = tmp_path / "both.json"
    assert main(["merge", str(mc), str(mc), "--out", str(both)]) == 0
    merged = json.loads(both.read_text())
    assert "5 images of" in caplog.text and "kept the first copy" in caplog.text
    assert [i["file_name"] for i in merged["images"]] == [i["file_name"] for i in single["images"]]
    assert len(merged["annotations"]) == len(single["annotations"])
    assert merged["info"]["skipped_images"] == 8
    broken = tmp_path / "broken.json"
    for payload, message in [
        ([], "top level is a JSON list"),
        ({**single, "images": single["images"] + single["images"][:1]}, "appears twice"),
        ({**single, "annotations": single["annotations"] + [{"image_id": 999}]}, "1 annotations refer to no image"),
    ]:
        broken.write_text(json.dumps(payload))
        assert main(["merge", str(mc), str(broken), "--out", str(tmp_path / "y.json")]) == 2
        assert message in (err := _err_line(capsys)) and "broken.json" in err
    assert not (tmp_path / "y.json").exists()


# -- 6. memory ---------------------------------------------------------------------------------------------------

def test_fixed_size_is_bounded_and_batch_memory_checked_first(tmp_path: Path, images: Path, weights: Path,
                                                              capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "labels.json"
    assert main(["label", str(images), "--out", str(out), "--weights", str(weights), "--arch",
                 "vit_small_patch16", "--fixed-size", "100000", "--no-progress"]) == 2
    assert "--fixed-size must lie in [1, 4096]" in _err_line(capsys)
    monkeypatch.setattr(machine, "available_bytes", lambda device: 2**30)
    assert main(["label", str(images), "--out", str(out), "--weights", str(weights), "--arch",
                 "vit_small_patch16", "--fixed-size", "4096", "--no-progress"]) == 2
    assert "needs about" in (err := _err_line(capsys)) and "1 GiB is available" in err
    assert not parts_dir_for(out).exists()  # refused before any work
    monkeypatch.setattr(machine, "available_bytes", lambda device: 100_000)
    assert _label(images, out, weights, "--mode", "tokencut") == 2
    assert "batch 0 (largest image: class_" in _err_line(capsys)
    grids, pixels = [(3, 5), (1, 1), (2, 2)], [15 * 256, 256, 4 * 256]
    n = np.array([15, 1, 4])
    assert machine.batch_bytes(grids, pixels, 384, "float64") == int(np.sum(15 * np.array(pixels)
                                                                            + 32 * n * 384 + 16 * n * n))


# -- 7. devices and backends are checked up front ----------------------------------------------------------------

def test_device_and_backend_are_validated_up_front(tmp_path: Path, images: Path, weights: Path, capsys) -> None:
    out = tmp_path / "labels.json"
    if not torch.cuda.is_available():
        assert _label(images, out, weights, "--device", "cuda") == 2
        assert "--device cuda: no CUDA device visible" in _err_line(capsys)
        assert _label(images, out, weights, "--device", "cuda:0") == 2
        assert "no CUDA device visible" in _err_line(capsys)
    assert _label(images, out, weights, "--device", "gpu0") == 2
    assert "--device 'gpu0' is not a device" in _err_line(capsys)
    assert _label(images, out, weights, "--backend", "bogus") == 2
    assert "--backend 'bogus'" in (err := _err_line(capsys)) and "unknown backend" in err
    assert not parts_dir_for(out).exists()


# -- 8. bad weights, manifests and inputs -----------------------------------------------------------------------

class _Touch:
    """A pickle that would create a file if it were loaded as code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bad_weights_and_manifests_give_clear_messages(tmp_path: Path, finished, weights: Path, capsys) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("hello world\n")
    with pytest.raises(WeightsError, match=r"notes\.pth: not a PyTorch checkpoint \(KeyError: 101\)"):
        load_vit("vit_small_patch16", text)
    state = torch.load(weights, weights_only=True)
    state["blocks.3.mlp.fc1.weight"][0, 0] = float("nan")
    nan = tmp_path / "nan.pth"
    torch.save(state, nan)
    with pytest.raises(WeightsError, match=r"nan\.pth holds NaN or infinite values \(in blocks\.3\.mlp\.fc1\.weight\)"):
        load_vit("vit_small_patch16", nan)
    images, out = _copy(finished, tmp_path)
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"pos_embed": _Touch(tmp_path / "pwned")}, protocol=2))
    assert _label(images, tmp_path / "e.json", evil) == 2
    assert "refusing to load" in (err := _err_line(capsys)) and "Unsupported global" in err  # no ANSI codes
    assert not (tmp_path / "pwned").exists()
    manifest = parts_dir_for(out) / "manifest.json"
    good = json.loads(manifest.read_text())
    for payload, message in [([good], "not a label manifest (its top level is a JSON list"),
                             ({**good, "batch_size": 0}, "batch_size must be an integer >= 1, got 0")]:
        manifest.write_text(json.dumps(payload))
        assert main(["merge", str(parts_dir_for(out)), "--out", str(tmp_path / "m.json")]) == 2
        assert message in _err_line(capsys)
        assert _label(images, out, weights, "--batch-size", "2") == 2
        assert message in _err_line(capsys)


# -- 9. 16-bit images and symbolic links ------------------------------------------------------------------------

def test_sixteen_bit_png_is_scaled_not_saturated(tmp_path: Path, rng: np.random.Generator) -> None:
    wide = rng.integers(0, 65536, size=(23, 37), dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")
        rgb = prepare(img, "tokencut", 16).rgb.numpy()
    want = np.rint(wide / 257.0).astype(np.uint8)
    assert rgb.shape == (23, 37, 3)
    np.testing.assert_array_equal(rgb, np.repeat(want[:, :, None], 3, axis=2))


def test_dangling_and_looping_symlinks_are_counted_as_skipped(finished) -> None:
    folder = finished[0]
    data = json.loads((folder / "labels.json").read_text())
    assert data["info"]["skipped_images"] == 4 and len(data["images"]) == 5
    records = [json.loads(line) for line in (folder / "labels.json.parts" / "rank-00000.jsonl").open()]
    errors = {e["file_name"]: e["error"] for rec in records for e in rec["errors"]}
    assert errors.keys() == {"class_0/broken.jpg", "dangling.jpg", "loop_a.png", "loop_b.png"}
    assert errors["dangling.jpg"].startswith("FileNotFoundError")
    assert "Too many levels of symbolic links" in errors["loop_a.png"]


# -- 16. a missing labeling dependency ----------------------------------------------------------------------------

def test_missing_label_dependency_names_the_package(tmp_path: Path, images: Path, weights: Path, capsys,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from ncutfast.cli import main as ncutfast_main

    monkeypatch.setitem(sys.modules, "PIL", None)  # as after `pip install --no-deps`
    monkeypatch.delitem(sys.modules, "ncutfast.label.pipeline")
    assert ncutfast_main(["label", str(images), "--out", str(tmp_path / "o.json"), "--weights", str(weights)]) == 2
    assert _err_line(capsys) == (
        "ncutfast label: error: the labeling dependency 'pillow' is not installed (no module 'PIL'); install "
        "them with: pip install pillow pycocotools tqdm safetensors")


def test_labeling_dependencies_are_required() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ \[;]", dep)[0].lower() for dep in project["dependencies"]}
    assert set(LABEL_MODULES.values()) <= names


# -- 17. small things -------------------------------------------------------------------------------------------

def test_resumed_run_reports_the_files_totals_and_bar_counts_images(tmp_path: Path, finished, weights: Path,
                                                                    caplog) -> None:
    # batches of 2 over [broken, img], [img, img], [img, img], [dangling, loop], [loop]: images one by one
    assert [n for n in finished[1] if n] == [1, 1, 1, 1, 1, 1, 2, 1]
    images, out = _copy(finished, tmp_path)
    n_ann = len(json.loads(out.read_text())["annotations"])
    caplog.set_level(logging.INFO, logger="ncutfast.label")
    assert _label(images, out, weights, "--batch-size", "2") == 0
    assert f"{out} (5 images, {n_ann} annotations)" in caplog.text and "0 new annotations" in caplog.text


def test_overlays_are_named_after_the_image_without_collisions(tmp_path: Path) -> None:
    files = ["a/photo.jpg", "a/photo.png", "b/cat.jpeg", "dog.png", "noext"]
    assert pipeline.overlay_names(files, 4) == {0: "a__photo.jpg.png", 1: "a__photo.png.png",
                                                2: "b__cat.png", 3: "dog.png"}
    assert pipeline.overlay_names(files, 9)[4] == "noext.png"


def test_pycocotools_numpy2_warning_is_filtered() -> None:
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(np.eye(5, dtype=np.uint8)))
    with warnings.catch_warnings(record=True) as caught:
        mask_util.decode(rle)
    assert not [w for w in caught if "copy keyword" in str(w.message)]
