"""CorLoc: the fraction of images whose predicted box hits a ground-truth box at IoU >= 0.5.

Semantics of TokenCut's ``main_tokencut.py`` (``shared/spec/tokencut.md`` section 2, step 10):
- GT boxes. VOC (``Annotations/<id>.xml``, every object, difficult and truncated included): ``(xmin - 1,
  ymin - 1, xmax, ymax)``. COCO (an instances JSON): ``(x, y, x + w, y + h)``, each rounded to the nearest
  integer (Python's ``round``, ties to even), ``iscrowd`` boxes dropped.
- The predicted box of an image is its highest-``score`` annotation (the first one on ties, or when no
  annotation has a score), as ``(x, y, x + w, y + h)`` of its ``bbox``; with ``any_box`` every annotation
  counts. An image without a prediction is a miss.
- IoU: :func:`box_iou`, computed as TokenCut does (torch, widths without +1, 1e-7 added to the heights and
  to the union, integer boxes promoted to float32), hit when IoU >= 0.5.
- An image without any GT box is reported and left out of the count. (TokenCut itself cannot run on one.)
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._common import (
    EvalError,
    PathLike,
    annotations_by_image,
    keyed_images,
    load_labels,
    read_coco_gt,
    select_images,
)

__all__ = ["CorLocRow", "CorLocResult", "box_iou", "load_gt_boxes", "corloc"]

#: IoU at or above which a predicted box counts as a correct localization.
HIT_IOU = 0.5


def box_iou(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of one box with each of ``boxes``, exactly as TokenCut computes it (same operations, same dtypes).

    Args:
        box: ``(4,)`` ``(x1, y1, x2, y2)``; int64 for integer boxes (as TokenCut's predictions are).
            ``(n, 4)`` pairs row i with row i of ``boxes``; for int64 boxes every element is then the same as
            in the one-box call (torch promotes int64 0-dim and n-dim tensors alike).
        boxes: ``(n, 4)`` int64 ``(x1, y1, x2, y2)``.
    Returns ``(n,)``: ``inter / (w1 * (h1 + 1e-7) + w2 * (h2 + 1e-7) - inter + 1e-7)`` with widths and heights
    ``x2 - x1`` and ``y2 - y1``. Integer inputs give float32 (torch's promotion of int64 + Python float),
    which decides the boundary: with heights of 2 pixels or more the 1e-7 terms vanish in float32 rounding,
    so boxes whose real IoU is exactly 0.5 get 0.5 and count as hits (in float64 they would not).
    """
    eps = 1e-7
    b1_x1, b1_y1, b1_x2, b1_y2 = box[..., 0], box[..., 1], box[..., 2], box[..., 3]
    b2_x1, b2_y1, b2_x2, b2_y2 = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
    inter = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(0) * (
        torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)).clamp(0)
    w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1 + eps
    w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1 + eps
    union = w1 * h1 + w2 * h2 - inter + eps
    return inter / union


@dataclass(frozen=True)
class GTImage:
    """One GT image: its file name and its ``(n, 4)`` int64 boxes ``(x1, y1, x2, y2)``."""

    file_name: str
    boxes: np.ndarray


def _voc_int(text: str | None, xml: Path, tag: str) -> int:
    try:
        return int(float(text or ""))
    except ValueError:
        raise EvalError(f"VOC annotation {xml}: <{tag}> is {text!r}, not a number") from None


def _load_voc(root: Path) -> dict[str, GTImage]:
    if root.is_file():
        raise EvalError(f"VOC ground truth {root} is a file; --gt-format voc expects a VOC root folder "
                        "(with Annotations/*.xml)")
    folder = root / "Annotations" if (root / "Annotations").is_dir() else root
    xmls = sorted(folder.glob("*.xml"))
    if not xmls:
        raise EvalError(f"VOC ground truth {root}: no Annotations/*.xml (give the VOC root, e.g. "
                        "VOCdevkit/VOC2007)")
    out = {}
    for xml in xmls:
        try:
            tree = ET.parse(xml)
        except ET.ParseError as exc:
            raise EvalError(f"VOC annotation {xml}: malformed XML ({exc})") from None
        boxes = []
        for obj in tree.getroot().findall("object"):  # top-level objects, as torchvision's VOC parser
            bnd = obj.find("bndbox")
            if bnd is None:
                raise EvalError(f"VOC annotation {xml}: an <object> without <bndbox>")
            x1, y1, x2, y2 = (_voc_int(bnd.findtext(t), xml, t) for t in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append((x1 - 1, y1 - 1, x2, y2))  # 1-based inclusive pixels -> coordinates
        # VOCDetection reads JPEGImages/<id>.jpg beside Annotations/<id>.xml
        out[xml.stem] = GTImage(f"{xml.stem}.jpg", np.asarray(boxes, dtype=np.int64).reshape(-1, 4))
    return out


def _load_coco(path: Path) -> dict[str, GTImage]:
    data = read_coco_gt(path)
    images = keyed_images(data, path, "COCO ground truth")
    anns = annotations_by_image(data)
    out = {}
    for key, img in images.items():
        boxes = []
        for ann in anns.get(img["id"], []):
            if ann.get("iscrowd", 0) == 1:
                continue
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4):
                raise EvalError(f"COCO ground truth {path}: annotation {ann.get('id')} has no [x, y, w, h] bbox")
            x, y, w, h = bbox
            boxes.append([int(round(v)) for v in (x, y, x + w, y + h)])
        out[key] = GTImage(img["file_name"], np.asarray(boxes, dtype=np.int64).reshape(-1, 4))
    return out


def load_gt_boxes(gt: PathLike, gt_format: str) -> dict[str, GTImage]:
    """GT boxes per image key (see :mod:`ncutfast.eval._common` for keys) as TokenCut builds them.

    Args:
        gt: a VOC root (``Annotations/*.xml``) for ``gt_format="voc"``, an instances JSON for ``"coco"``.
        gt_format: ``"voc"`` or ``"coco"``.
    """
    if gt_format not in ("voc", "coco"):
        raise ValueError(f"gt_format must be 'voc' or 'coco', got {gt_format!r}")
    path = Path(gt)
    if not path.exists():
        raise EvalError(f"ground truth {path}: no such file or folder")
    return _load_voc(path) if gt_format == "voc" else _load_coco(path)


def _pred_box(ann: Mapping, source: str) -> np.ndarray:
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise EvalError(f"predictions {source}: annotation {ann.get('id')} has no [x, y, w, h] bbox")
    x, y, w, h = bbox
    xyxy = [x, y, x + w, y + h]
    if all(float(v).is_integer() for v in xyxy):
        return np.asarray(xyxy, dtype=np.int64)  # TokenCut's predicted boxes are integers
    return np.asarray(xyxy, dtype=np.float64)


@dataclass(frozen=True)
class CorLocRow:
    """One image of the evaluation.

    ``status`` is ``"hit"``, ``"miss"``, ``"no_prediction"`` (counted as a miss) or ``"no_gt"`` (excluded);
    ``iou`` is the best IoU of the scored box(es) with any GT box (NaN without prediction or GT box) and
    ``box`` the predicted ``(x1, y1, x2, y2)`` reaching it (None without prediction).
    """

    file_name: str
    status: str
    iou: float
    box: tuple[float, float, float, float] | None
    gt_boxes: int


@dataclass
class CorLocResult:
    """CorLoc over the evaluated images: ``hits`` of ``total`` (images without GT box excluded)."""

    hits: int
    total: int
    rows: list[CorLocRow] = field(default_factory=list)

    @property
    def corloc(self) -> float:
        """CorLoc in percent."""
        return 100.0 * self.hits / self.total

    @property
    def no_gt(self) -> list[str]:
        """Images without a GT box (reported, not counted)."""
        return [r.file_name for r in self.rows if r.status == "no_gt"]

    @property
    def no_prediction(self) -> list[str]:
        """Images without a prediction (counted as misses)."""
        return [r.file_name for r in self.rows if r.status == "no_prediction"]

    def summary(self) -> str:
        """The CLI's last line, e.g. ``CorLoc: 68.80% (3431/4987)``."""
        return f"CorLoc: {self.corloc:.2f}% ({self.hits}/{self.total})"

    CSV_HEADER = ("file_name", "status", "iou", "x1", "y1", "x2", "y2", "gt_boxes")

    def csv_rows(self) -> list[tuple]:
        """Rows under :attr:`CSV_HEADER` (empty cells where there is no value)."""
        out = []
        for r in self.rows:
            box = ["" if r.box is None else v for v in (r.box or (None,) * 4)]
            out.append((r.file_name, r.status, "" if math.isnan(r.iou) else f"{r.iou:.6f}", *box, r.gt_boxes))
        return out


def _best_ious(scored: list[tuple[GTImage, list[np.ndarray]]]) -> list[tuple[GTImage, tuple[float, tuple]]]:
    """Per image, the best IoU of its candidate boxes with any GT box, and the first box reaching it.

    Integer candidates (all of ``ncutfast label``'s) are paired with their image's GT boxes and scored in one
    batched :func:`box_iou` call, which gives the same float32 values as TokenCut's one-box calls; other
    candidates take the one-box call, whose dtype promotion the batched form would not reproduce.
    """
    ints = [(g.boxes, b) for g, cands in scored for b in cands if b.dtype == np.int64]
    batched: list[float] = []
    if ints:
        counts = np.array([len(gb) for gb, _ in ints])
        pred = torch.from_numpy(np.repeat(np.stack([b for _, b in ints]), counts, axis=0))
        ious = box_iou(pred, torch.from_numpy(np.concatenate([gb for gb, _ in ints]))).numpy()
        batched = np.maximum.reduceat(ious, np.concatenate([[0], np.cumsum(counts)[:-1]])).tolist()
    batched_it = iter(batched)
    out = []
    for g, cands in scored:
        best_iou, best_box = -math.inf, None
        for b in cands:
            if b.dtype == np.int64:
                iou = next(batched_it)
            else:
                iou = float(box_iou(torch.from_numpy(b), torch.from_numpy(g.boxes)).max())
            if iou > best_iou:
                best_iou, best_box = iou, tuple(b.tolist())
        out.append((g, (best_iou, best_box)))
    return out


def corloc(pred: PathLike | Mapping, gt: PathLike, gt_format: str, *,
           image_list: PathLike | Sequence[str] | None = None, any_box: bool = False) -> CorLocResult:
    """CorLoc of a label JSON against VOC or COCO boxes, with TokenCut's exact rules (see the module doc).

    Args:
        pred: a label JSON path (``ncutfast label`` output; any COCO-style JSON with ``bbox``) or its content.
        gt: VOC root folder (``gt_format="voc"``) or COCO instances JSON (``"coco"``).
        gt_format: ``"voc"`` or ``"coco"``.
        image_list: evaluate only these images (a text file with one name per line, e.g. a VOC
            ``ImageSets/Main/trainval.txt`` or COCO20k's file list, or a sequence of names); predictions of
            other images are ignored.
        any_box: count an image when any of its predicted boxes hits (default: only the highest-score one).
    Raises:
        EvalError: missing or malformed files, an empty or duplicated prediction set, a prediction (or a list
            entry) for an image the GT does not have, or nothing left to evaluate.
    """
    data, preds, source = load_labels(pred)
    gts = load_gt_boxes(gt, gt_format)
    keys = select_images(gts, preds, gt, source, image_list)
    anns = annotations_by_image(data)
    scored: list[tuple[GTImage, list[np.ndarray]]] = []  # evaluated images with their candidate boxes
    rows: list[CorLocRow | None] = []
    for key in keys:
        g = gts[key]
        img = preds.get(key)
        cands = anns.get(img["id"], []) if img is not None else []
        if cands and not any_box:
            scores = [a.get("score", -math.inf) for a in cands]
            cands = [cands[int(np.argmax(scores))]]  # first one on ties
        if len(g.boxes) == 0:
            rows.append(CorLocRow(g.file_name, "no_gt", math.nan, None, 0))
        elif not cands:
            rows.append(CorLocRow(g.file_name, "no_prediction", math.nan, None, len(g.boxes)))
        else:
            rows.append(None)
            scored.append((g, [_pred_box(a, source) for a in cands]))
    found = iter(_best_ious(scored))
    out, hits = [], 0
    for row in rows:
        if row is None:
            g, (iou, box) = next(found)
            hit = iou >= HIT_IOU
            hits += hit
            row = CorLocRow(g.file_name, "hit" if hit else "miss", iou, box, len(g.boxes))
        out.append(row)
    total = sum(r.status != "no_gt" for r in out)
    if total == 0:
        raise EvalError(f"ground truth {gt}: none of the {len(keys)} evaluated image(s) has a GT box")
    return CorLocResult(hits, total, out)
