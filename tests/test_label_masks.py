"""``ncutfast label --mode saliency --masks-dir DIR [--refine bilateral]`` end to end (random-init ViT-S/16)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from ncutfast import reference
from ncutfast.label.cli import main
from ncutfast.label.demo import make_demo_images

SMALL = ["--arch", "vit_small_patch16", "--workers", "0", "--no-progress", "--mode", "saliency"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    make_demo_images(folder, n=5, size=(75, 53), seed=5)  # odd sizes: not multiples of the patch
    return folder


def _label(images: Path, out: Path, weights: Path, *extra: str) -> int:
    return main(["label", str(images), "--out", str(out), "--weights", str(weights), *SMALL, *extra])


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*.png"))}


def test_masks_and_bilateral_pngs_match_json_and_reference(tmp_path: Path, images: Path, weights: Path) -> None:
    out, masks, vis = tmp_path / "labels.json", tmp_path / "masks", tmp_path / "vis"
    cmd = ["--masks-dir", str(masks), "--refine", "bilateral", "--batch-size", "3", "--visualize", str(vis),
           "--visualize-count", "2"]
    assert _label(images, out, weights, *cmd) == 0
    with open(out, encoding="utf-8") as fh:
        coco = json.load(fh)
    assert len(coco["images"]) == 5
    for img in coco["images"]:
        stem = Path(img["file_name"]).with_suffix(".png")
        tokencut = _png(masks / "tokencut" / stem)
        soft = _png(masks / "bilateral" / stem)
        assert tokencut.shape == soft.shape == (img["height"], img["width"])  # the original resolution
        assert set(np.unique(tokencut).tolist()) <= {0, 255}
        (ann,) = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        json_mask = mask_util.decode({"size": ann["segmentation"]["size"],
                                      "counts": ann["segmentation"]["counts"].encode("ascii")})
        np.testing.assert_array_equal(tokencut, json_mask * 255)
        with Image.open(images / img["file_name"]) as im:
            rgb = np.array(im.convert("RGB"))
        ref = reference.bilateral_solve(rgb, tokencut > 0)
        expected = np.rint(np.clip(ref, 0.0, 1.0) * 255.0)
        assert np.abs(soft.astype(np.float64) - expected).max() <= 1.0  # rounding ties of a 1e-6 difference
        assert (np.abs(soft.astype(np.float64) - expected) > 0).mean() < 1e-3
    assert len(list(vis.glob("*.png"))) == 2
    # Rerunning the finished command changes nothing: no batch is redone, no file rewritten.
    before = _snapshot(masks)
    assert _label(images, out, weights, *cmd) == 0
    assert _snapshot(masks) == before


def test_interrupted_batch_is_redone_and_rewrites_only_its_files(tmp_path: Path, images: Path,
                                                                 weights: Path, capsys) -> None:
    out, masks = tmp_path / "labels.json", tmp_path / "masks"
    cmd = ["--masks-dir", str(masks), "--batch-size", "2"]
    assert _label(images, out, weights, *cmd) == 0
    before = _snapshot(masks)
    # As if killed after the last batch's PNGs but before its record: drop the record and the output.
    shard = tmp_path / "labels.json.parts" / "rank-00000.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(b"".join(lines[:-1]))
    out.unlink()
    assert _label(images, out, weights, *cmd) == 0
    after = _snapshot(masks)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    rewritten = {k for k in after if after[k][1] != before[k][1]}
    assert len(rewritten) == 1 and not list(masks.rglob(".*.tmp*"))  # the last batch holds one image
    # The folder now belongs to this command: another one is refused.
    assert _label(images, tmp_path / "other.json", weights, "--masks-dir", str(masks), "--tau", "0.3") == 2
    assert "was written by a different label command" in capsys.readouterr().err


def test_masks_dir_user_errors(tmp_path: Path, images: Path, weights: Path, capsys) -> None:
    masks = tmp_path / "masks"
    foreign = masks / "tokencut" / "class_0" / "img_0000.png"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"the user's own file")
    assert _label(images, tmp_path / "a.json", weights, "--masks-dir", str(masks)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "img_0000.png already exists and was not written by this command" in err
    assert foreign.read_bytes() == b"the user's own file"
    assert _label(images, tmp_path / "b.json", weights, "--refine", "bilateral") == 2
    assert "--refine bilateral writes DIR/bilateral/: give --masks-dir DIR" in capsys.readouterr().err
    assert main(["label", str(images), "--out", str(tmp_path / "c.json"), "--weights", str(weights),
                 "--no-progress", "--workers", "0", "--mode", "tokencut", "--masks-dir", str(masks)]) == 2
    assert "--masks-dir applies to --mode saliency only" in capsys.readouterr().err
