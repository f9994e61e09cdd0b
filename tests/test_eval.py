"""``ncutfast eval`` and ``ncutfast.eval``: CorLoc, saliency maxF/IoU/Acc and class-agnostic COCO AP on
datasets generated here in the real layouts (VOC XML tree, COCO instances JSON, ECSSD-style PNG folders)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from ncutfast.cli import main
from ncutfast.eval import EvalError, box_iou, coco, corloc, image_key, saliency, saliency_scores

# ---------------------------------------------------------------------------------------------- helpers


def write_voc(root: Path, boxes: dict[str, list[tuple[int, int, int, int]]], size=(500, 375)) -> Path:
    """A VOC root: ``Annotations/<stem>.xml`` with 1-based inclusive ``bndbox`` values as given."""
    ann = root / "Annotations"
    ann.mkdir(parents=True)
    for stem, objs in boxes.items():
        parts = "".join(
            f"<object><name>cat</name><pose>Left</pose><truncated>0</truncated><difficult>{i % 2}</difficult>"
            f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox>"
            "</object>" for i, b in enumerate(objs))
        (ann / f"{stem}.xml").write_text(
            f"<annotation><folder>VOC2007</folder><filename>{stem}.jpg</filename><size><width>{size[0]}</width>"
            f"<height>{size[1]}</height><depth>3</depth></size><segmented>0</segmented>{parts}</annotation>")
    return root


def rle(mask: np.ndarray) -> dict:
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode("ascii")}


def write_labels(path: Path, images: list[tuple[str, int, int]], anns: dict[str, list[dict]]) -> Path:
    """A label JSON in ``ncutfast label``'s layout; ``anns[file_name]`` holds bbox/score/segmentation dicts."""
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "fg", "supercategory": "fg"}]}
    for i, (name, w, h) in enumerate(images, start=1):
        data["images"].append({"id": i, "file_name": name, "width": w, "height": h})
        for a in anns.get(name, []):
            data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": i, "category_id": 1,
                                        "iscrowd": 0, **a})
    path.write_text(json.dumps(data))
    return path


def write_coco_gt(path: Path, images: list[tuple[str, int, int]], anns: list[tuple[str, dict]]) -> Path:
    """An instances JSON: ids start at 100 (never equal to the prediction file's), three categories."""
    ids = {name: 100 + 7 * i for i, (name, _, _) in enumerate(images)}
    data = {"images": [{"id": ids[n], "file_name": n, "width": w, "height": h} for n, w, h in images],
            "categories": [{"id": c, "name": f"c{c}", "supercategory": "x"} for c in (3, 7, 11)],
            "annotations": [{"id": j + 1, "image_id": ids[n], "category_id": (3, 7, 11)[j % 3], "iscrowd": 0, **a}
                            for j, (n, a) in enumerate(anns)]}
    path.write_text(json.dumps(data))
    return path


def box_ann(x1: float, y1: float, x2: float, y2: float, score: float = 0.5) -> dict:
    return {"bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["eval", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------- CorLoc


def test_iou_exactly_half_hits_and_0_4999_misses(tmp_path: Path) -> None:
    # VOC (1, 1, 10, 20) -> (0, 0, 10, 20); pred (0, 0, 10, 10): IoU 100/200 = 0.5 exactly in TokenCut's
    # float32 arithmetic (in float64 the +1e-7 terms would push it just below 0.5).
    # VOC (1, 1, 5000, 4) -> (0, 0, 5000, 4); pred (0, 0, 4999, 2) inside it: IoU 9998/20000 = 0.4999.
    gt = write_voc(tmp_path / "VOC2007", {"000001": [(1, 1, 10, 20)], "000002": [(1, 1, 5000, 4)]})
    pred = write_labels(tmp_path / "labels.json", [("JPEGImages/000001.jpg", 500, 375),
                                                   ("JPEGImages/000002.jpg", 500, 375)],
                        {"JPEGImages/000001.jpg": [box_ann(0, 0, 10, 10)],
                         "JPEGImages/000002.jpg": [box_ann(0, 0, 4999, 2)]})
    res = corloc(pred, gt, "voc")
    assert [(r.file_name, r.status) for r in res.rows] == [("000001.jpg", "hit"), ("000002.jpg", "miss")]
    assert res.rows[0].iou == 0.5
    assert res.rows[1].iou == pytest.approx(0.4999, abs=1e-6)
    assert (res.hits, res.total, res.summary()) == (1, 2, "CorLoc: 50.00% (1/2)")


def test_box_iou_is_tokencut_float32_and_close_to_exact(rng: np.random.Generator) -> None:
    for n in (1, 2, 7, 31):
        xy = rng.integers(0, 300, (n + 1, 2))
        wh = rng.integers(1, 200, (n + 1, 2))
        boxes = torch.from_numpy(np.concatenate([xy, xy + wh], axis=1))
        iou = box_iou(boxes[0], boxes[1:])
        assert iou.dtype == torch.float32 and iou.shape == (n,)
        b = boxes.numpy().astype(np.float64)
        iw = np.clip(np.minimum(b[0, 2], b[1:, 2]) - np.maximum(b[0, 0], b[1:, 0]), 0, None)
        ih = np.clip(np.minimum(b[0, 3], b[1:, 3]) - np.maximum(b[0, 1], b[1:, 1]), 0, None)
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        exact = iw * ih / (area[0] + area[1:] - iw * ih)
        np.testing.assert_allclose(iou.numpy(), exact, rtol=1e-5, atol=1e-7)
        # the batched pairwise form corloc uses gives the one-box call's float32 values bit for bit
        pairwise = box_iou(boxes[:1].expand(n, 4), boxes[1:])
        assert pairwise.dtype == torch.float32 and torch.equal(pairwise, iou)


def test_coco_gt_rounding_crowd_and_no_gt(tmp_path: Path) -> None:
    # bbox [0.5, 1.5, 9, 9] -> (0.5, 1.5, 9.5, 10.5) -> round half to even -> (0, 2, 10, 10)
    gt = write_coco_gt(tmp_path / "instances.json",
                       [("a.jpg", 64, 48), ("b.jpg", 64, 48), ("c.jpg", 64, 48)],
                       [("a.jpg", {"bbox": [0.5, 1.5, 9.0, 9.0], "area": 81.0}),
                        ("b.jpg", {"bbox": [0, 0, 20, 20], "area": 400.0, "iscrowd": 1})])
    pred = write_labels(tmp_path / "labels.json", [("a.jpg", 64, 48), ("b.jpg", 64, 48), ("c.jpg", 64, 48)],
                        {"a.jpg": [box_ann(0, 2, 10, 10)], "b.jpg": [box_ann(0, 0, 20, 20)]})
    res = corloc(pred, gt, "coco")
    assert [(r.file_name, r.status) for r in res.rows] == [("a.jpg", "hit"), ("b.jpg", "no_gt"), ("c.jpg", "no_gt")]
    assert res.rows[0].iou == pytest.approx(1.0, abs=1e-6)
    assert res.no_gt == ["b.jpg", "c.jpg"] and (res.hits, res.total) == (1, 1)
    # the rounded GT (0, 2, 10, 10) against (0, 1, 9, 10): intersection 9 * 8, union 81 + 80 - 72
    shifted = write_labels(tmp_path / "shifted.json", [("a.jpg", 64, 48)], {"a.jpg": [box_ann(0, 1, 9, 10)]})
    assert corloc(shifted, gt, "coco", image_list=["a.jpg"]).rows[0].iou == pytest.approx(72 / 89, abs=1e-6)


def test_highest_score_any_box_and_missing_prediction(tmp_path: Path, capsys) -> None:
    gt = write_voc(tmp_path / "voc", {"x1": [(11, 11, 50, 50), (301, 201, 400, 300)], "x2": [(1, 1, 30, 30)],
                                      "x3": [(5, 5, 9, 9)]})
    hit_low = [box_ann(100, 100, 200, 150, score=0.9), box_ann(300, 200, 400, 300, score=0.2)]
    pred = write_labels(tmp_path / "p.json", [("cls/x1.jpg", 500, 375), ("cls/x2.png", 500, 375)],
                        {"cls/x1.jpg": hit_low, "cls/x2.png": [box_ann(0, 0, 30, 30, score=0.1)]})
    res = corloc(pred, gt, "voc")
    assert [r.status for r in res.rows] == ["miss", "hit", "no_prediction"]
    assert res.rows[0].box == (100, 100, 200, 150) and res.no_prediction == ["x3.jpg"]
    assert res.summary() == "CorLoc: 33.33% (1/3)"
    float_box = write_labels(tmp_path / "f.json", [("x2.jpg", 500, 375)], {"x2.jpg": [box_ann(0, 0, 29.5, 30)]})
    assert corloc(float_box, gt, "voc", image_list=["x2"]).rows[0].iou == pytest.approx(29.5 / 30, abs=1e-6)
    res_any = corloc(pred, gt, "voc", any_box=True)
    assert [r.status for r in res_any.rows] == ["hit", "hit", "no_prediction"]
    assert res_any.rows[0].box == (300, 200, 400, 300)
    # an image list (VOC ImageSets style: stems) restricts the evaluation
    (tmp_path / "trainval.txt").write_text("x2\n\nx3\n")
    assert corloc(pred, gt, "voc", image_list=tmp_path / "trainval.txt").summary() == "CorLoc: 50.00% (1/2)"
    code, out, _ = run_cli(capsys, "corloc", "--pred", str(pred), "--gt", str(gt), "--gt-format", "voc", "--any")
    assert code == 0 and out.strip().splitlines()[-1] == "CorLoc: 66.67% (2/3)"
    code, out, _ = run_cli(capsys, "corloc", "--pred", str(pred), "--gt", str(gt), "--gt-format", "voc",
                           "--image-list", str(tmp_path / "trainval.txt"))
    assert code == 0 and out.strip().splitlines()[-1] == "CorLoc: 50.00% (1/2)"


def test_corloc_cli_per_image_csv(tmp_path: Path, capsys, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ncutfast.eval")
    gt = write_voc(tmp_path / "VOCdevkit" / "VOC2012", {"2008_000001": [(1, 1, 10, 10)], "2008_000002": []})
    pred = write_labels(tmp_path / "labels.json", [("2008_000001.jpg", 500, 375), ("2008_000002.jpg", 500, 375)],
                        {"2008_000001.jpg": [box_ann(0, 0, 10, 10)], "2008_000002.jpg": [box_ann(0, 0, 5, 5)]})
    csv_path = tmp_path / "per_image.csv"
    code, out, err = run_cli(capsys, "corloc", "--pred", str(pred), "--gt", str(gt), "--gt-format", "voc",
                             "--per-image", str(csv_path))
    assert code == 0 and out.strip().splitlines()[-1] == "CorLoc: 100.00% (1/1)"
    assert "1 image(s) without GT box, excluded: 2008_000002.jpg" in caplog.text
    rows = read_csv(csv_path)
    assert [(r["file_name"], r["status"], r["x2"], r["gt_boxes"]) for r in rows] == [
        ("2008_000001.jpg", "hit", "10", "1"), ("2008_000002.jpg", "no_gt", "", "0")]
    # the per-image file is never overwritten
    code, out, err = run_cli(capsys, "corloc", "--pred", str(pred), "--gt", str(gt), "--gt-format", "voc",
                             "--per-image", str(csv_path))
    assert code == 2 and "already exists" in err and len(read_csv(csv_path)) == 2


@pytest.mark.parametrize("case", ["missing_pred", "duplicate", "unknown", "empty", "voc_is_json", "coco_is_dir",
                                  "bad_xml", "bad_json", "list_unknown", "not_coco"])
def test_corloc_user_errors_exit_2_one_line(tmp_path: Path, capsys, case: str) -> None:
    gt_voc = write_voc(tmp_path / "voc", {"a": [(1, 1, 10, 10)]})
    gt_coco = write_coco_gt(tmp_path / "inst.json", [("a.jpg", 64, 48)], [("a.jpg", {"bbox": [0, 0, 9, 9],
                                                                                      "area": 81})])
    good = write_labels(tmp_path / "good.json", [("a.jpg", 64, 48)], {"a.jpg": [box_ann(0, 0, 10, 10)]})
    pred, gt, fmt, extra, needle = good, gt_voc, "voc", [], ""
    if case == "missing_pred":
        pred, needle = tmp_path / "nope.json", "nope.json: no such file"
    elif case == "duplicate":
        pred = write_labels(tmp_path / "dup.json", [("c1/a.jpg", 64, 48), ("c2/a.jpg", 64, 48)], {})
        needle = "duplicate file name 'a'"
    elif case == "unknown":
        pred = write_labels(tmp_path / "unk.json", [("a.jpg", 64, 48), ("zz.jpg", 64, 48)], {})
        needle = "zz.jpg is not in the ground truth"
    elif case == "empty":
        pred = write_labels(tmp_path / "empty.json", [], {})
        needle = "empty prediction set"
    elif case == "voc_is_json":
        gt, needle = gt_coco, "--gt-format voc expects a VOC root folder"
    elif case == "coco_is_dir":
        gt, fmt, needle = gt_voc, "coco", "is a folder; an instances JSON file is expected"
    elif case == "bad_xml":
        (gt_voc / "Annotations" / "b.xml").write_text("<annotation><object>")
        needle = "b.xml: malformed XML"
    elif case == "bad_json":
        (tmp_path / "bad.json").write_text("{not json")
        pred, needle = tmp_path / "bad.json", "bad.json: not valid JSON"
    elif case == "list_unknown":
        (tmp_path / "list.txt").write_text("a\nb\n")
        extra, needle = ["--image-list", str(tmp_path / "list.txt")], "not in the ground truth"
    elif case == "not_coco":
        (tmp_path / "list.json").write_text("[1, 2]")
        pred, needle = tmp_path / "list.json", "not a COCO-style JSON"
    code, out, err = run_cli(capsys, "corloc", "--pred", str(pred), "--gt", str(gt), "--gt-format", fmt, *extra)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("ncutfast eval corloc: error: ")
    assert needle in err and "Traceback" not in err
    with pytest.raises(EvalError, match=needle.replace("'", ".")):  # the API raises what the CLI prints
        corloc(pred, gt, fmt, image_list=extra[1] if extra else None)


def test_image_key() -> None:
    assert {image_key(n) for n in ("JPEGImages/000005.jpg", "000005", "a\\b\\000005.png", "000005.xml")} == {"000005"}
    assert image_key("train2014/COCO_train2014_000000000009.jpg") == "COCO_train2014_000000000009"
    for name in (".hidden", "a.b.c", "dir.d/x", "n01440764_10026.JPEG"):
        assert image_key(name) == PurePosixPath(name).stem
    assert image_key("a.") == "a."


# ---------------------------------------------------------------------------------------------- saliency


def _saliency_oracle(preds: list[np.ndarray], gts: list[np.ndarray]) -> tuple[float, float, float]:
    """TokenCut's definitions, one threshold at a time (slow, obvious)."""
    fs, ious, accs = [], [], []
    for p, g in zip(preds, gts, strict=True):
        p = p / 255.0 if p.dtype == np.uint8 else p.astype(np.float64)
        g = g != 0
        row = []
        for k in range(255):
            b = p > k / 255.0
            tp = np.sum(b & g)
            prec = tp / b.sum() if b.sum() else 1.0
            rec = tp / g.sum() if g.sum() else 1.0
            row.append(1.3 * prec * rec / (0.3 * prec + rec) if prec + rec > 0 else 0.0)
        fs.append(row)
        b = p > 0.5
        union = np.sum(b | g)
        ious.append(np.sum(b & g) / union if union else 1.0)
        accs.append(np.mean(b == g))
    return float(np.max(np.mean(fs, axis=0))), float(np.mean(ious)), float(np.mean(accs))


def test_saliency_hand_computed_cases() -> None:
    full = np.full((3, 5), 255, np.uint8)
    r = saliency_scores([full], [np.ones((3, 5), np.uint8)])  # all-foreground GT, perfect prediction
    assert (r.max_f, r.iou, r.acc) == (1.0, 1.0, 1.0)
    r = saliency_scores([np.zeros((2, 2), np.uint8)], [np.zeros((2, 2), np.uint8)])  # both empty
    assert (r.max_f, r.iou, r.acc) == (1.0, 1.0, 1.0)  # precision 1 (empty prediction), recall 1 (empty GT)
    r = saliency_scores([np.zeros((2, 3), np.uint8)], [np.full((2, 3), 255, np.uint8)])  # empty prediction
    assert (r.max_f, r.iou, r.acc) == (0.0, 0.0, 0.0)
    # graded 1x4 map: F = 1.3*(2/3)/(0.3*(2/3)+1) for k < 100, 1 for 100 <= k < 200, 1.3*0.5/0.8 from 200
    r = saliency_scores([np.array([[0, 100, 200, 255]], np.uint8)], [np.array([[0, 0, 1, 1]], np.uint8)])
    assert r.best_threshold == 100 and r.max_f == 1.0 and (r.iou, r.acc) == (1.0, 1.0)
    np.testing.assert_allclose(r.f_curve[[0, 99, 100, 199, 200, 254]],
                               [1.3 * 2 / 3 / 1.2] * 2 + [1.0] * 2 + [0.8125] * 2, rtol=1e-12)
    # F is averaged over images per threshold, then maximised: 0.5 here, not the mean of per-image maxima (1)
    r = saliency_scores([np.array([[100, 0]], np.uint8), np.array([[200, 0]], np.uint8)],
                        [np.array([[1, 0]], np.uint8), np.array([[0, 0]], np.uint8)], names=["a", "b"])
    assert (r.max_f, r.best_threshold, r.iou, r.acc) == (0.5, 0, 0.0, 0.5)
    assert [(x.file_name, x.f_at_best, x.max_f) for x in r.rows] == [("a", 1.0, 1.0), ("b", 0.0, 1.0)]
    assert r.summary() == "maxF: 50.00 IoU: 0.00 Acc: 50.00"


@pytest.mark.parametrize("kind", ["uint8", "float64", "bool"])
def test_saliency_matches_threshold_by_threshold_definition(rng: np.random.Generator, kind: str) -> None:
    shapes = [(1, 1), (2, 3), (7, 13), (31, 17), (1, 40)]
    gts = [(rng.random(s) < rng.uniform(0.05, 0.9)).astype(np.uint8) * 255 for s in shapes]
    gts[1][:] = 0  # one empty GT
    if kind == "uint8":
        preds = [rng.integers(0, 256, s).astype(np.uint8) for s in shapes]
        preds[0][:] = 128  # exactly at level 128: > 0.5 and > k/255 for k < 128
    elif kind == "float64":
        preds = [rng.random(s) for s in shapes]
        preds[2][0, :4] = [0.5, 1 / 255, 254 / 255, 1.0]  # exactly on thresholds
    else:
        preds = [rng.random(s) < 0.5 for s in shapes]
    r = saliency_scores(preds, gts)
    want = _saliency_oracle([p.astype(np.uint8) * 255 if kind == "bool" else p for p in preds], gts)
    np.testing.assert_allclose((r.max_f, r.iou, r.acc), want, rtol=1e-12, atol=1e-15)
    assert np.mean([x.f_at_best for x in r.rows]) == pytest.approx(r.max_f, abs=1e-12)


def test_saliency_bad_arrays() -> None:
    with pytest.raises(ValueError, match="differs from GT shape"):
        saliency_scores([np.zeros((2, 2), np.uint8)], [np.zeros((2, 3), np.uint8)])
    with pytest.raises(TypeError, match="GT must be bool or integer"):
        saliency_scores([np.zeros((2, 2), np.uint8)], [np.zeros((2, 2))])
    with pytest.raises(TypeError, match="prediction must be uint8"):
        saliency_scores([np.zeros((2, 2), np.int32)], [np.zeros((2, 2), np.uint8)])
    with pytest.raises(ValueError, match="differ in length"):
        saliency_scores([np.zeros((2, 2), np.uint8)], [])


def _ecssd(tmp_path: Path, rng: np.random.Generator, n: int = 5) -> tuple[Path, Path, list, list]:
    """ECSSD-style folders: ``images/*.jpg`` (unused), ``ground_truth_mask/*.png`` 0/255, predictions 0..255."""
    gt_dir, pred_dir = tmp_path / "ECSSD" / "ground_truth_mask", tmp_path / "masks" / "tokencut"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir(parents=True)
    preds, gts = [], []
    for i in range(n):
        h, w = int(rng.integers(5, 40)), int(rng.integers(5, 40))
        g = (rng.random((h, w)) < 0.4).astype(np.uint8) * 255
        p = rng.integers(0, 256, (h, w)).astype(np.uint8)
        Image.fromarray(g).save(gt_dir / f"{i:04d}.png")
        Image.fromarray(p).save(pred_dir / f"{i:04d}.png")
        preds.append(p)
        gts.append(g)
    return pred_dir, gt_dir, preds, gts


def test_saliency_folders_cli_csv_and_resize(tmp_path: Path, rng: np.random.Generator, capsys, caplog) -> None:
    pred_dir, gt_dir, preds, gts = _ecssd(tmp_path, rng)
    # a colour GT PNG (converted to grey, non-zero = foreground) and a prediction at half the GT size
    Image.fromarray(np.repeat(gts[0][:, :, None], 3, axis=2)).save(gt_dir / "0000.png")
    big = np.kron(rng.integers(0, 256, (4, 6)), np.ones((2, 2))).astype(np.uint8)
    Image.fromarray((big > 0).astype(np.uint8)).save(gt_dir / "0001.png")
    Image.fromarray(big[::2, ::2]).save(pred_dir / "0001.png")
    gts[1], preds[1] = (big > 0).astype(np.uint8), big  # nearest-neighbour upsampling of big[::2, ::2]
    want = saliency_scores(preds, gts)
    res = saliency(pred_dir, gt_dir)
    assert res.summary() == want.summary() and res.max_f == pytest.approx(want.max_f, abs=1e-12)
    assert [r.resized for r in res.rows] == [False, True, False, False, False]
    csv_path = tmp_path / "sal.csv"
    code, out, err = run_cli(capsys, "saliency", "--pred", str(pred_dir), "--gt", str(gt_dir),
                             "--per-image", str(csv_path))
    assert code == 0 and out.strip().splitlines()[-1] == want.summary()
    assert "0001.png: prediction is 6x4, GT is 12x8; prediction resized" in caplog.text
    rows = read_csv(csv_path)
    assert [r["file_name"] for r in rows] == [f"{i:04d}.png" for i in range(5)]
    assert np.mean([float(r["f_at_best_threshold"]) for r in rows]) == pytest.approx(res.max_f, abs=1e-5)
    assert np.mean([float(r["iou"]) for r in rows]) == pytest.approx(res.iou, abs=1e-5)


@pytest.mark.parametrize("case", ["missing_pred", "unknown_pred", "no_png", "no_dir", "duplicate", "unreadable"])
def test_saliency_user_errors(tmp_path: Path, rng: np.random.Generator, capsys, case: str) -> None:
    pred_dir, gt_dir, _, _ = _ecssd(tmp_path, rng, n=2)
    if case == "missing_pred":
        (pred_dir / "0001.png").unlink()
        needle = "no 0001.png for ground truth"
    elif case == "unknown_pred":
        Image.fromarray(np.zeros((3, 3), np.uint8)).save(pred_dir / "extra.png")
        needle = "extra.png: no GT mask"
    elif case == "no_png":
        for p in pred_dir.iterdir():
            p.unlink()
        needle = "no PNG files"
    elif case == "no_dir":
        pred_dir, needle = tmp_path / "nowhere", "nowhere: no such folder"
    elif case == "duplicate":
        (pred_dir / "0000.png").rename(pred_dir / "0000.PNG")
        Image.fromarray(np.zeros((3, 3), np.uint8)).save(pred_dir / "0000.png")
        needle = "duplicate file name '0000'"
    else:
        (gt_dir / "0001.png").write_bytes(b"\x89PNG broken")
        needle = "0001.png: cannot read as an image"
    code, out, err = run_cli(capsys, "saliency", "--pred", str(pred_dir), "--gt", str(gt_dir))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("ncutfast eval saliency: error: ") and needle in err


# ---------------------------------------------------------------------------------------------- COCO


def _mask(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _pred_ann(m: np.ndarray, score: float) -> dict:
    r = rle(m)
    bbox = [float(v) for v in mask_util.toBbox(r)]
    return {"segmentation": r, "bbox": bbox, "area": int(m.sum()), "score": score}


def test_coco_hand_computed(tmp_path: Path, capsys) -> None:
    h, w = 37, 53
    objs = [_mask(h, w, 2, 3, 20, 30), _mask(h, w, 30, 5, 50, 17)]
    gt_anns = [("img_a.jpg", {"segmentation": rle(m), "bbox": [float(v) for v in mask_util.toBbox(rle(m))],
                              "area": float(m.sum())}) for m in objs]
    # a polygon object on the second image and a crowd region that a prediction overlaps
    gt_anns.append(("img_b.jpg", {"segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]], "bbox": [4, 4, 20, 20],
                                  "area": 400.0}))
    gt_anns.append(("img_b.jpg", {"segmentation": rle(_mask(h, w, 30, 20, 50, 35)), "bbox": [30, 20, 20, 15],
                                  "area": 300.0, "iscrowd": 1}))
    images = [("img_a.jpg", w, h), ("img_b.jpg", w, h)]
    gt = write_coco_gt(tmp_path / "instances.json", images, gt_anns)
    # every object found, scores in any order, the crowd overlap neither hit nor false positive
    poly = mask_util.decode(mask_util.frPyObjects([[4, 4, 24, 4, 24, 24, 4, 24]], h, w))[:, :, 0].astype(bool)
    perfect = write_labels(tmp_path / "perfect.json", [("c/img_a.jpg", w, h), ("c/img_b.jpg", w, h)],
                           {"c/img_a.jpg": [_pred_ann(objs[0], 0.3), _pred_ann(objs[1], 0.9)],
                            "c/img_b.jpg": [_pred_ann(poly, 0.5), _pred_ann(_mask(h, w, 30, 20, 50, 35), 0.8)]})
    res = coco(perfect, gt)
    for t in ("bbox", "segm"):
        assert res.stats[t] == {"AP": 100.0, "AP50": 100.0, "AR100": 100.0}
    # one of three objects found (the highest score): precision 1 up to recall 1/3, so AP = 34/101 points
    one = write_labels(tmp_path / "one.json", [("img_a.jpg", w, h)], {"img_a.jpg": [_pred_ann(objs[0], 0.7)]})
    res = coco(one, gt)
    for t in ("bbox", "segm"):
        assert res.stats[t]["AP"] == pytest.approx(100 * 34 / 101, abs=1e-9)
        assert res.stats[t]["AR100"] == pytest.approx(100 / 3, abs=1e-9)
    assert res.summary().splitlines() == [f"{t} AP: 33.66 AP50: 33.66 AR100: 33.33" for t in ("bbox", "segm")]
    assert [(r.file_name, r.gt, r.pred, r.tp50["segm"], r.tp["segm"]) for r in res.rows] == [
        ("img_a.jpg", 2, 1, 1, 10), ("img_b.jpg", 1, 0, 0, 0)]
    # restricted to img_a (list line with a folder), one of its two objects is found
    (tmp_path / "list.txt").write_text("val/img_a.jpg\n")
    code, out, _ = run_cli(capsys, "coco", "--pred", str(one), "--gt", str(gt),
                           "--image-list", str(tmp_path / "list.txt"))
    assert code == 0 and out.strip().splitlines()[-1] == "segm AP: 50.50 AP50: 50.50 AR100: 50.00"


def test_coco_user_errors(tmp_path: Path, capsys) -> None:
    h, w = 10, 12
    m = _mask(h, w, 1, 1, 5, 5)
    gt = write_coco_gt(tmp_path / "inst.json", [("a.jpg", w, h)], [("a.jpg", {"segmentation": rle(m),
                                                                              "bbox": [1, 1, 4, 4], "area": 16})])
    wrong_size = write_labels(tmp_path / "p.json", [("a.jpg", w, h)], {"a.jpg": [_pred_ann(_mask(h + 1, w, 0, 0, 3, 3),
                                                                                           1.0)]})
    code, out, err = run_cli(capsys, "coco", "--pred", str(wrong_size), "--gt", str(gt))
    assert code == 2 and out == "" and "mask of a.jpg is 12x11, the GT image a.jpg is 12x10" in err
    boxes_only = write_coco_gt(tmp_path / "boxes.json", [("a.jpg", w, h)], [("a.jpg", {"bbox": [1, 1, 4, 4]})])
    code, out, err = run_cli(capsys, "coco", "--pred", str(wrong_size), "--gt", str(boxes_only))
    assert code == 2 and "lacks 'image_id', 'bbox', 'area' or 'segmentation'" in err
    code, out, err = run_cli(capsys, "coco", "--pred", str(tmp_path), "--gt", str(gt))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no such file" in err


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``ncutfast label`` (random-init ViT-S/16) on generated images (in class subfolders), in TokenCut and
    MaskCut modes and in saliency mode with ``--masks-dir`` and the bilateral refinement."""
    from ncutfast.label.demo import make_demo_images
    from ncutfast.label.vit import build_vit

    root = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    weights = root / "dino_vits16_random.pth"
    torch.save(build_vit("vit_small_patch16").state_dict(), weights)
    images = root / "JPEGImages"
    make_demo_images(images, n=5, size=(97, 71), seed=3)
    out = {"root": root, "images": images}
    out["masks"] = root / "masks"
    for mode in ("tokencut", "maskcut", "saliency"):
        out[mode] = root / f"{mode}.json"
        extra = ["--masks-dir", str(out["masks"]), "--refine", "bilateral"] if mode == "saliency" else []
        assert main(["label", str(images), "--out", str(out[mode]), "--weights", str(weights), "--mode", mode,
                     "--arch", "vit_small_patch16", "--fixed-size", "64", "--workers", "0", "--no-progress",
                     *extra]) == 0
    return out


def test_end_to_end_label_then_corloc(labelled: dict[str, Path], tmp_path: Path, capsys) -> None:
    data = json.loads(labelled["tokencut"].read_text())
    boxes = {}
    for k, img in enumerate(data["images"]):  # GT = the predicted box on even images, a far-off box on odd ones
        x, y, bw, bh = next(a["bbox"] for a in data["annotations"] if a["image_id"] == img["id"])
        box = (int(x) + 1, int(y) + 1, int(x + bw), int(y + bh)) if k % 2 == 0 else (2000, 2000, 2100, 2100)
        boxes[image_key(img["file_name"])] = [box]
    gt = write_voc(tmp_path / "VOC2007", boxes)
    csv_path = tmp_path / "corloc.csv"
    code, out, _ = run_cli(capsys, "corloc", "--pred", str(labelled["tokencut"]), "--gt", str(gt),
                           "--gt-format", "voc", "--per-image", str(csv_path))
    assert code == 0
    rows = read_csv(csv_path)
    hits = sum(r["status"] == "hit" for r in rows)
    assert hits == 3 and len(rows) == 5
    assert out.strip().splitlines()[-1] == f"CorLoc: {100 * hits / 5:.2f}% ({hits}/5)"
    assert all(float(r["iou"]) == pytest.approx(1.0, abs=1e-6) for r in rows if r["status"] == "hit")


def test_end_to_end_label_then_coco(labelled: dict[str, Path], tmp_path: Path, capsys) -> None:
    # GT = the TokenCut masks as instances (file names without folders); predictions = the MaskCut labels
    tok = json.loads(labelled["tokencut"].read_text())
    names = {img["id"]: Path(img["file_name"]).name for img in tok["images"]}
    images = [(names[img["id"]], img["width"], img["height"]) for img in tok["images"]]
    anns = [(names[a["image_id"]], {k: a[k] for k in ("segmentation", "bbox", "area")}) for a in tok["annotations"]]
    gt = write_coco_gt(tmp_path / "instances.json", images, anns)
    code, out, _ = run_cli(capsys, "coco", "--pred", str(labelled["tokencut"]), "--gt", str(gt))
    assert code == 0 and out.strip().splitlines() == [f"{t} AP: 100.00 AP50: 100.00 AR100: 100.00"
                                                      for t in ("bbox", "segm")]
    csv_path = tmp_path / "coco.csv"
    code, out, _ = run_cli(capsys, "coco", "--pred", str(labelled["maskcut"]), "--gt", str(gt),
                           "--per-image", str(csv_path))
    assert code == 0
    lines = out.strip().splitlines()[-2:]
    rows = read_csv(csv_path)
    n_gt = sum(int(r["gt"]) for r in rows)
    assert n_gt == len(anns) and sum(int(r["pred"]) for r in rows) == len(json.loads(
        labelled["maskcut"].read_text())["annotations"])
    for t, line in zip(("bbox", "segm"), lines, strict=True):
        ar100 = float(line.split("AR100: ")[1])
        assert line.startswith(f"{t} AP: ")
        assert ar100 == pytest.approx(100 * sum(int(r[f"{t}_tp"]) for r in rows) / (10 * n_gt), abs=0.006)


def test_end_to_end_label_masks_then_saliency(labelled: dict[str, Path], tmp_path: Path, capsys) -> None:
    # label --masks-dir keeps the class subfolders; GT = the TokenCut masks, copied flat, ECSSD-style
    tok = sorted((labelled["masks"] / "tokencut").rglob("*.png"))
    assert len(tok) == 5 and {p.parent.name for p in tok} == {"class_0", "class_1"}
    gt_dir = tmp_path / "ground_truth_mask"
    gt_dir.mkdir()
    for p in tok:
        (gt_dir / p.name).write_bytes(p.read_bytes())
    code, out, _ = run_cli(capsys, "saliency", "--pred", str(labelled["masks"] / "tokencut"), "--gt", str(gt_dir))
    assert code == 0 and out.strip().splitlines()[-1] == "maxF: 100.00 IoU: 100.00 Acc: 100.00"
    csv_path = tmp_path / "bs.csv"
    code, out, _ = run_cli(capsys, "saliency", "--pred", str(labelled["masks"] / "bilateral"), "--gt", str(gt_dir),
                           "--per-image", str(csv_path))
    assert code == 0
    max_f, iou, acc = (float(v) for v in out.strip().splitlines()[-1].split()[1::2])
    rows = read_csv(csv_path)
    assert len(rows) == 5
    assert max_f == pytest.approx(100 * np.mean([float(r["f_at_best_threshold"]) for r in rows]), abs=0.006)
    assert iou == pytest.approx(100 * np.mean([float(r["iou"]) for r in rows]), abs=0.006)
    assert acc == pytest.approx(100 * np.mean([float(r["acc"]) for r in rows]), abs=0.006)
