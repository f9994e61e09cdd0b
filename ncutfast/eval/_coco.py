"""Class-agnostic COCO AP / AP50 / AR100 of pseudo-labels, boxes and masks, with pycocotools' COCOeval.

Every GT category counts as one class (CutLER's class-agnostic evaluation); every predicted annotation is a
detection of that class with its ``score`` (1.0 when it has none; COCOeval sorts ties stably). Images are
matched by file name (:mod:`ncutfast.eval._common`); GT images without any prediction count with no
detections. ``iscrowd`` GT is handled by COCOeval (matches to it are neither hits nor false positives).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ._common import (
    EvalError,
    PathLike,
    annotations_by_image,
    keyed_images,
    load_labels,
    read_coco_gt,
    select_images,
)

__all__ = ["CocoRow", "CocoResult", "coco"]

IOU_TYPES = ("bbox", "segm")


@dataclass(frozen=True)
class CocoRow:
    """One GT image: non-crowd GT objects, predictions, and per IoU type the GT objects matched at IoU 0.5
    (``tp50``) and summed over COCO's ten IoU thresholds 0.5:0.95 (``tp``), within the top 100 detections."""

    file_name: str
    gt: int
    pred: int
    tp50: dict[str, int]
    tp: dict[str, int]


@dataclass
class CocoResult:
    """``stats[iou_type]`` = ``{"AP", "AP50", "AR100"}`` in percent for ``"bbox"`` and ``"segm"``.

    AR100 follows from the rows: ``100 * sum(tp) / (10 * sum(gt))``.
    """

    stats: dict[str, dict[str, float]]
    rows: list[CocoRow] = field(default_factory=list)

    def summary(self) -> str:
        """The CLI's two last lines, ``bbox AP: .. AP50: .. AR100: ..`` then ``segm ...``."""
        return "\n".join(f"{t} AP: {s['AP']:.2f} AP50: {s['AP50']:.2f} AR100: {s['AR100']:.2f}"
                         for t, s in self.stats.items())

    CSV_HEADER = ("file_name", "gt", "pred", "bbox_tp50", "bbox_tp", "segm_tp50", "segm_tp")

    def csv_rows(self) -> list[tuple]:
        """Rows under :attr:`CSV_HEADER`."""
        return [(r.file_name, r.gt, r.pred, r.tp50["bbox"], r.tp["bbox"], r.tp50["segm"], r.tp["segm"])
                for r in self.rows]


def _index(dataset: dict):
    from pycocotools.coco import COCO

    c = COCO()
    c.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        c.createIndex()
    return c


def _detections(data: Mapping, preds: dict, gt_images: dict, eval_keys: list[str], source: str) -> list[dict]:
    """Predicted annotations of the evaluated images, re-keyed to GT image ids, as COCOeval results."""
    from pycocotools import mask as mask_util

    anns = annotations_by_image(data)
    dets = []
    for key in eval_keys:
        img = preds.get(key)
        if img is None:
            continue
        g = gt_images[key]
        for ann in anns.get(img["id"], []):
            seg, bbox = ann.get("segmentation"), ann.get("bbox")
            if not (isinstance(seg, Mapping) and "counts" in seg and "size" in seg):
                raise EvalError(f"predictions {source}: annotation {ann.get('id')} of {img['file_name']} has no "
                                "RLE segmentation")
            if not (isinstance(bbox, list) and len(bbox) == 4):
                raise EvalError(f"predictions {source}: annotation {ann.get('id')} of {img['file_name']} has no "
                                "[x, y, w, h] bbox")
            if "height" in g and "width" in g and list(seg["size"]) != [g["height"], g["width"]]:
                raise EvalError(f"predictions {source}: mask of {img['file_name']} is {seg['size'][1]}x"
                                f"{seg['size'][0]}, the GT image {g['file_name']} is {g['width']}x{g['height']}")
            dets.append({"image_id": g["id"], "category_id": 1, "score": float(ann.get("score", 1.0)),
                         "bbox": [float(v) for v in bbox], "segmentation": seg,
                         "mask_area": float(mask_util.area(seg))})
    return dets


def _evaluate(gt_coco, dets: list[dict], img_ids: list, iou_type: str):
    from pycocotools.cocoeval import COCOeval

    results = []
    for i, d in enumerate(dets):
        r = {"id": i + 1, "image_id": d["image_id"], "category_id": 1, "score": d["score"], "iscrowd": 0}
        if iou_type == "bbox":
            r.update(bbox=d["bbox"], area=d["bbox"][2] * d["bbox"][3])
        else:
            r.update(segmentation=d["segmentation"], area=d["mask_area"])
        results.append(r)
    dt_coco = _index({"images": gt_coco.dataset["images"], "categories": gt_coco.dataset["categories"],
                      "annotations": results})
    ev = COCOeval(gt_coco, dt_coco, iou_type)
    ev.params.imgIds = img_ids
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _per_image(ev) -> dict:
    """``{image_id: (n_gt, tp at IoU 0.5, tp summed over the IoU thresholds)}`` for area 'all', 100 dets."""
    out = {}
    ids = ev.params.imgIds  # COCOeval sorts them; evalImgs start with category 0, area range 'all'
    for img_id, e in zip(ids, ev.evalImgs[:len(ids)], strict=True):
        if e is None:
            out[img_id] = (0, 0, 0)
            continue
        keep = ~np.asarray(e["gtIgnore"], dtype=bool)
        matched = (np.asarray(e["gtMatches"]) > 0)[:, keep] if keep.size else np.zeros((10, 0), dtype=bool)
        out[img_id] = (int(keep.sum()), int(matched[0].sum()), int(matched.sum()))
    return out


def coco(pred: PathLike | Mapping, gt: PathLike, *, image_list: PathLike | Sequence[str] | None = None
         ) -> CocoResult:
    """Class-agnostic box and mask AP, AP50 and AR100 of a label JSON against a COCO instances JSON.

    Args:
        pred: a label JSON (``ncutfast label`` output: RLE ``segmentation``, ``bbox``, ``score``) or its content.
        gt: a COCO instances JSON (any categories; all count as one).
        image_list: evaluate only these images (file with one name per line, or a sequence of names).
    Raises:
        EvalError: missing or malformed files, an empty or duplicated prediction set, predictions for images
            the GT does not have, masks of another size than their GT image, or no GT object to score.
    """
    data, preds, source = load_labels(pred)
    gt_data = read_coco_gt(gt)
    gt_images = keyed_images(gt_data, gt, "COCO ground truth")
    eval_keys = select_images(gt_images, preds, gt, source, image_list)
    for ann in gt_data["annotations"]:
        if not (isinstance(ann, Mapping) and all(k in ann for k in ("image_id", "bbox", "area", "segmentation"))):
            raise EvalError(f"COCO ground truth {gt}: an annotation lacks 'image_id', 'bbox', 'area' or "
                            "'segmentation' (an instances JSON has all four)")
    agnostic = {"images": gt_data["images"], "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
                "annotations": [{**a, "category_id": 1, "iscrowd": a.get("iscrowd", 0)}
                                for a in gt_data["annotations"]]}
    gt_coco = _index(agnostic)
    img_ids = [gt_images[k]["id"] for k in eval_keys]
    if not any(not a["iscrowd"] for i in img_ids for a in gt_coco.imgToAnns.get(i, [])):
        raise EvalError(f"COCO ground truth {gt}: no non-crowd object in the {len(img_ids)} evaluated image(s)")
    dets = _detections(data, preds, gt_images, eval_keys, source)
    stats, per = {}, {}
    for t in IOU_TYPES:
        ev = _evaluate(gt_coco, dets, img_ids, t)
        stats[t] = {"AP": 100 * float(ev.stats[0]), "AP50": 100 * float(ev.stats[1]), "AR100": 100 * float(ev.stats[8])}
        per[t] = _per_image(ev)
    n_pred: dict = {}
    for d in dets:
        n_pred[d["image_id"]] = n_pred.get(d["image_id"], 0) + 1
    rows = [CocoRow(gt_images[k]["file_name"], per["bbox"][i][0], n_pred.get(i, 0),
                    {t: per[t][i][1] for t in IOU_TYPES}, {t: per[t][i][2] for t in IOU_TYPES})
            for k, i in zip(eval_keys, img_ids, strict=True)]
    return CocoResult(stats, rows)
