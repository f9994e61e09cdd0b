"""End to end: ``ncutfast label`` / ``merge`` on generated images with a random-init ViT-S/16 weights file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from ncutfast.label.cli import main
from ncutfast.label.demo import make_demo_images
from ncutfast.label.post import crf_available

SMALL = ["--arch", "vit_small_patch16", "--fixed-size", "64", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    make_demo_images(folder, n=6, size=(72, 56), seed=1)
    return folder


def _label(images: Path, out: Path, weights: Path, *extra: str) -> int:
    return main(["label", str(images), "--out", str(out), "--weights", str(weights), *SMALL, *extra])


def _content(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _check_coco(path: Path, root: Path) -> COCO:
    coco = COCO(str(path))
    assert coco.dataset["categories"] == [{"id": 1, "name": "fg", "supercategory": "fg"}]
    for img in coco.dataset["images"]:
        with Image.open(root / img["file_name"]) as im:
            assert (img["width"], img["height"]) == im.size  # not CutLER's swapped order
        for ann in coco.imgToAnns[img["id"]]:
            m = coco.annToMask(ann)
            assert m.shape == (img["height"], img["width"])
            rows, cols = np.nonzero(m)
            x0, y0 = cols.min(), rows.min()
            assert ann["bbox"] == [x0, y0, cols.max() + 1 - x0, rows.max() + 1 - y0]
            assert ann["area"] == int(m.sum()) > 0
            assert 0.0 <= ann["score"] <= 1.0
    return coco


@pytest.mark.parametrize("mode", ["maskcut", "tokencut", "saliency"])
def test_end_to_end_json_loads_and_matches_masks(tmp_path: Path, images: Path, weights: Path,
                                                 mode: str) -> None:
    out = tmp_path / "labels.json"
    extra = ["--mode", mode, "--batch-size", "4", "--visualize", str(tmp_path / "vis"),
             "--visualize-count", "2"]
    assert _label(images, out, weights, *extra) == 0
    coco = _check_coco(out, images)
    assert len(coco.dataset["images"]) == 6 and coco.dataset["annotations"]
    n_ann = len(coco.dataset["annotations"])
    assert [a["id"] for a in coco.dataset["annotations"]] == list(range(1, n_ann + 1))
    assert len(list((tmp_path / "vis").glob("*.png"))) == 2
    if mode != "maskcut":
        assert {a["image_id"] for a in coco.dataset["annotations"]} == set(range(1, 7))  # one object each


@pytest.mark.parametrize("mode", ["maskcut", "tokencut"])
def test_batched_json_equals_reference_json(tmp_path: Path, weights: Path, mode: str) -> None:
    """Same features (same ViT run), batched cut vs the float64 reference one image at a time.

    Grids of 8x8 tokens and more: on tinier grids random-weight keys give exact ties in |x| that the API
    breaks by its documented rule and the reference by rounding.
    """
    images = tmp_path / "data"
    make_demo_images(images, n=4, size=(144, 112), seed=4)
    fast, ref = tmp_path / "fast.json", tmp_path / "ref.json"
    opts = ["--mode", mode, "--batch-size", "3", "--fixed-size", "128"]
    assert _label(images, fast, weights, *opts, "--workers", "1") == 0
    assert _label(images, ref, weights, *opts, "--backend", "reference") == 0
    a, b = _content(fast), _content(ref)
    assert a["images"] == b["images"]
    key = ("image_id", "bbox", "area", "segmentation", "mask_index")
    assert [[x[k] for k in key] for x in a["annotations"]] == [[x[k] for k in key] for x in b["annotations"]]
    np.testing.assert_allclose([x["ncut"] for x in a["annotations"]], [x["ncut"] for x in b["annotations"]],
                               rtol=1e-4, atol=1e-6)


def test_tau_auto_picks_a_candidate(tmp_path: Path, images: Path, weights: Path) -> None:
    out = tmp_path / "auto.json"
    assert _label(images, out, weights, "--tau", "auto", "--tau-candidates", "0.1,0.3",
                  "--batch-size", "6") == 0
    taus = {a["tau"] for a in _content(out)["annotations"]}
    assert taus and taus <= {0.1, 0.3}
    assert _content(out)["info"]["taus"] == [0.1, 0.3]


def test_corrupt_image_is_skipped(tmp_path: Path, weights: Path, caplog) -> None:
    root = tmp_path / "data"
    make_demo_images(root, n=3, size=(48, 40), seed=2)
    (root / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    out = tmp_path / "labels.json"
    assert _label(root, out, weights) == 0
    data = _content(out)
    assert data["info"]["skipped_images"] == 1
    assert "class_0/broken.jpg" not in {i["file_name"] for i in data["images"]} and len(data["images"]) == 3
    assert "skipped unreadable image class_0/broken.jpg" in caplog.text


def test_list_file_input(tmp_path: Path, images: Path, weights: Path) -> None:
    listing = images / "list.txt"
    names = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    listing.write_text("# two images\n" + "\n".join(names) + "\n\n")
    out = tmp_path / "labels.json"
    try:
        assert _label(listing, out, weights) == 0
    finally:
        listing.unlink()
    assert [i["file_name"] for i in _content(out)["images"]] == names


def test_user_errors_exit_2_with_clear_messages(tmp_path: Path, images: Path, weights: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _label(empty, tmp_path / "a.json", weights) == 2
    assert "no images found" in capsys.readouterr().err
    assert _label(images, tmp_path / "b.json", tmp_path / "missing.pth") == 2
    assert "weights file not found" in capsys.readouterr().err
    err_out = tmp_path / "c.json"
    assert main(["label", str(images), "--out", str(err_out), "--weights", str(weights), "--arch",
                 "vit_base_patch16", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert weights.name in err and "vit_base_patch16" in err and "holds vit_small_patch16" in err
    with pytest.raises(SystemExit) as exc:
        main(["label", str(images), "--out", "d.json", "--weights", str(weights), "--arch", "resnet50"])
    assert exc.value.code == 2 and "invalid choice: 'resnet50'" in capsys.readouterr().err
    assert _label(images, tmp_path / "f.json", weights, "--tau", "1.5") == 2
    assert "tau: must lie in the open interval (-1, 1)" in capsys.readouterr().err
    # a different command on the same --out is refused instead of mixing results
    out = tmp_path / "e.json"
    assert _label(images, out, weights, "--batch-size", "6") == 0
    assert _label(images, out, weights, "--batch-size", "6", "--tau", "0.3") == 2
    assert "differs in: taus" in capsys.readouterr().err


def test_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["label", "--help"])
    text = capsys.readouterr().out
    for opt in ("--out", "--weights", "--arch", "--mode", "--tau", "--tau-candidates", "--n-masks",
                "--fixed-size", "--eps", "--sign-rule", "--batch-size", "--workers", "--post-workers",
                "--device", "--amp", "--precision", "--backend", "--crf", "--visualize", "--visualize-count",
                "--no-progress"):
        assert opt in text
    assert "vit_base_patch8 for maskcut" in text and "0.15 for maskcut" in text


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ncutfast.label.cli", *args]


def test_sigkill_and_resume_equals_uninterrupted(tmp_path: Path, weights: Path) -> None:
    root = tmp_path / "data"
    make_demo_images(root, n=16, size=(64, 48), seed=3)
    common = ["label", str(root), "--weights", str(weights), *SMALL, "--batch-size", "2", "--fixed-size", "128"]
    ref_out, out = tmp_path / "ref.json", tmp_path / "resumed.json"
    shard = tmp_path / "resumed.json.parts" / "rank-00000.jsonl"
    proc = subprocess.Popen(_cli(*common, "--out", str(out)), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if shard.exists() and shard.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed"
    done = shard.read_bytes().count(b"\n")
    assert 1 <= done < 8
    with open(shard, "ab") as fh:  # a torn record, as if killed in the middle of a write
        fh.write(b'{"batch": 7, "images": [{"ind')
    assert subprocess.run(_cli(*common, "--out", str(out)), stderr=subprocess.DEVNULL).returncode == 0
    assert subprocess.run(_cli(*common, "--out", str(ref_out)), stderr=subprocess.DEVNULL).returncode == 0
    assert out.read_bytes() == ref_out.read_bytes()
    assert len(_content(out)["images"]) == 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_merge_equals_one_process(tmp_path: Path, images: Path, weights: Path) -> None:
    common = ["label", str(images), "--weights", str(weights), *SMALL, "--batch-size", "2"]
    scratch = tmp_path / "tmp"  # torchrun's elastic agent leaves its torchelastic_* folder in TMPDIR
    scratch.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(scratch))
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert subprocess.run(_cli(*common, "--out", str(one)), env=env).returncode == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "ncutfast.label.cli", *common, "--out", str(two)]
    assert subprocess.run(cmd, env=env, timeout=300).returncode == 0
    assert sorted(p.name for p in (tmp_path / "two.json.parts").glob("rank-*")) == ["rank-00000.jsonl",
                                                                                    "rank-00001.jsonl"]
    assert two.read_bytes() == one.read_bytes()
    merged = tmp_path / "merged.json"
    assert main(["merge", str(tmp_path / "two.json.parts"), "--out", str(merged)]) == 0
    assert merged.read_bytes() == one.read_bytes()


def test_merge_json_files_renumbers_and_rejects_unfinished(tmp_path: Path, images: Path, weights: Path,
                                                           capsys) -> None:
    names = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.*g"))
    halves = []
    for k, part in enumerate((names[:2], names[2:])):
        listing = tmp_path / f"list{k}.txt"
        listing.write_text("\n".join(str(images / n) for n in part) + "\n")
        halves.append(tmp_path / f"half{k}.json")
        assert _label(listing, halves[-1], weights, "--batch-size", "3") == 0
    out = tmp_path / "a.json"
    assert _label(images, out, weights, "--batch-size", "3") == 0
    both = tmp_path / "both.json"
    assert main(["merge", *map(str, halves), "--out", str(both)]) == 0
    data, first, single = _content(both), _content(halves[0]), _content(out)
    assert [i["id"] for i in data["images"]] == list(range(1, 7))
    assert [i["file_name"] for i in data["images"]] == [str(images / n) for n in names]
    assert len(data["annotations"]) == len(single["annotations"])
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    k = len(first["annotations"])
    assert {a["image_id"] for a in data["annotations"][:k]} <= {1, 2} and k < len(data["annotations"])
    assert {a["image_id"] for a in data["annotations"][k:]} <= {3, 4, 5, 6}
    shard = tmp_path / "a.json.parts" / "rank-00000.jsonl"
    shard.write_bytes(shard.read_bytes().split(b"\n", 1)[1])  # drop the first batch
    assert main(["merge", str(tmp_path / "a.json.parts"), "--out", str(tmp_path / "x.json")]) == 2
    assert "1 of 2 batches are not finished" in capsys.readouterr().err


def test_post_workers_pool_gives_same_json(tmp_path: Path, images: Path, weights: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert _label(images, a, weights, "--batch-size", "2") == 0
    assert _label(images, b, weights, "--batch-size", "2", "--post-workers", "1") == 0
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.skipif(not crf_available(), reason="no DenseCRF package (pip install pydensecrf2)")
def test_crf_runs_and_keeps_masks_valid(tmp_path: Path, images: Path, weights: Path) -> None:
    out = tmp_path / "crf.json"
    assert _label(images, out, weights, "--crf", "--fixed-size", "96") == 0
    _check_coco(out, images)


def test_rle_roundtrip_of_written_masks(tmp_path: Path, images: Path, weights: Path) -> None:
    out = tmp_path / "labels.json"
    assert _label(images, out, weights, "--mode", "tokencut") == 0
    for ann in _content(out)["annotations"]:
        rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
        assert list(mask_util.toBbox(rle)) == ann["bbox"]


def test_precision_exact_labels_like_float64(tmp_path: Path, images: Path, weights: Path) -> None:
    """--precision exact: the float64 graph, so the same masks as --precision float64."""
    exact, f64 = tmp_path / "exact.json", tmp_path / "f64.json"
    assert _label(images, exact, weights, "--precision", "exact") == 0
    assert _label(images, f64, weights, "--precision", "float64") == 0
    a, b = _content(exact), _content(f64)
    assert a["annotations"] == b["annotations"] and a["info"]["precision"] == "exact"
