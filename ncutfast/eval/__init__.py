"""Scoring labels with the papers' metrics: ``corloc`` (TokenCut object discovery), ``saliency`` (maxF, IoU,
accuracy) and ``coco`` (class-agnostic COCO AP of MaskCut pseudo-labels); ``ncutfast eval`` runs them.

Nothing here imports the solver or the labeling pipeline; images are matched by file name as described in
:mod:`ncutfast.eval._common`.
"""

from __future__ import annotations

from ._coco import CocoResult, CocoRow, coco
from ._common import EvalError, image_key
from ._corloc import CorLocResult, CorLocRow, box_iou, corloc, load_gt_boxes
from ._saliency import SaliencyResult, SaliencyRow, saliency, saliency_scores

__all__ = [
    "EvalError",
    "image_key",
    "corloc",
    "box_iou",
    "load_gt_boxes",
    "CorLocResult",
    "CorLocRow",
    "saliency",
    "saliency_scores",
    "SaliencyResult",
    "SaliencyRow",
    "coco",
    "CocoResult",
    "CocoRow",
]
