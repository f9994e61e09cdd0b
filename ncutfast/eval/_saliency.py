"""Saliency metrics: maxF (beta^2 = 0.3), IoU and accuracy, as TokenCut's ``unsupervised_saliency_detection``.

Semantics (``shared/spec/tokencut.md`` section 3):
- Predictions are in [0, 1] (8-bit PNGs are divided by 255); GT masks count every non-zero pixel as
  foreground (TokenCut's ``> 0.5`` on 0..255 values).
- IoU and accuracy: the prediction thresholded at ``> 0.5``, averaged over images. IoU of an empty
  prediction with an empty GT is 1 (TokenCut divides 0 by 0 there and its mean becomes NaN).
- maxF: per image and per threshold k/255, k = 0..254, the prediction ``> k/255`` gives precision (1 when the
  prediction is empty) and recall (1 when the GT is empty); F = 1.3 P R / (0.3 P + R), 0 when P = R = 0;
  F is averaged over images per threshold and the maximum over thresholds is reported.
All 255 thresholds come from one histogram per image (256 bins of the prediction's level, split by GT
class) and reverse cumulative sums, not from 255 passes over the pixels. An 8-bit prediction v is above
threshold k exactly when v > k (no float rounding at ties); a float prediction p is compared with k/255.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._common import EvalError, PathLike

__all__ = ["SaliencyRow", "SaliencyResult", "saliency_scores", "saliency", "BETA_SQ", "THRESHOLDS"]

log = logging.getLogger("ncutfast.eval")

#: beta^2 of the F-measure.
BETA_SQ = 0.3
#: Number of thresholds k/255, k = 0..254.
THRESHOLDS = 255
_LEVEL_EDGES = np.arange(THRESHOLDS, dtype=np.float64) / 255.0


@dataclass(frozen=True)
class SaliencyRow:
    """One image: IoU and accuracy at 0.5, F at the dataset's best threshold, its own best F, resized or not."""

    file_name: str
    iou: float
    acc: float
    f_at_best: float
    max_f: float
    resized: bool


@dataclass
class SaliencyResult:
    """Dataset means (fractions in [0, 1]); ``f_curve`` is the mean F per threshold, ``best_threshold`` its
    argmax k (threshold k/255); ``max_f == f_curve[best_threshold] == mean of rows' f_at_best``."""

    max_f: float
    iou: float
    acc: float
    best_threshold: int
    f_curve: np.ndarray
    rows: list[SaliencyRow] = field(default_factory=list)

    def summary(self) -> str:
        """The CLI's last line, e.g. ``maxF: 80.30 IoU: 71.20 Acc: 91.80`` (percent)."""
        return f"maxF: {100 * self.max_f:.2f} IoU: {100 * self.iou:.2f} Acc: {100 * self.acc:.2f}"

    CSV_HEADER = ("file_name", "iou", "acc", "f_at_best_threshold", "max_f", "resized")

    def csv_rows(self) -> list[tuple]:
        """Rows under :attr:`CSV_HEADER`."""
        return [(r.file_name, f"{r.iou:.6f}", f"{r.acc:.6f}", f"{r.f_at_best:.6f}", f"{r.max_f:.6f}",
                 int(r.resized)) for r in self.rows]


def _levels(pred: np.ndarray) -> np.ndarray:
    """Per pixel, the number of thresholds k/255 (k = 0..254) strictly below it: the pixel is positive at
    threshold k exactly when its level is > k."""
    if pred.dtype == np.uint8:
        return pred.astype(np.intp)
    return np.searchsorted(_LEVEL_EDGES, pred, side="left")


def _check_pair(pred: np.ndarray, gt: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.ndim != 2 or gt.ndim != 2:
        raise ValueError(f"{name}: prediction and GT must be 2-D (H, W), got shapes {pred.shape} and {gt.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"{name}: prediction shape {pred.shape} differs from GT shape {gt.shape}")
    if pred.size == 0:
        raise ValueError(f"{name}: empty image of shape {pred.shape}")
    if not (pred.dtype == np.uint8 or pred.dtype == np.bool_ or np.issubdtype(pred.dtype, np.floating)):
        raise TypeError(f"{name}: prediction must be uint8 (0..255), bool or float in [0, 1], got {pred.dtype}")
    if not (gt.dtype == np.bool_ or np.issubdtype(gt.dtype, np.integer)):
        raise TypeError(f"{name}: GT must be bool or integer (non-zero = foreground), got {gt.dtype}")
    if pred.dtype == np.bool_:
        pred = pred.astype(np.uint8) * np.uint8(255)
    return pred, gt != 0


class _Accumulator:
    """Per-image histograms and IoU/accuracy, collected one image at a time (memory: 2 x 256 per image)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.resized: list[bool] = []
        self.hist_fg: list[np.ndarray] = []
        self.hist_all: list[np.ndarray] = []
        self.iou: list[float] = []
        self.acc: list[float] = []

    def add(self, name: str, pred: np.ndarray, gt: np.ndarray, resized: bool = False) -> None:
        pred, fg = _check_pair(pred, gt, name)
        levels = _levels(pred)
        self.hist_all.append(np.bincount(levels.ravel(), minlength=THRESHOLDS + 1))
        self.hist_fg.append(np.bincount(levels[fg], minlength=THRESHOLDS + 1))
        binary = pred > (127 if pred.dtype == np.uint8 else 0.5)  # v / 255 > 0.5  <=>  v > 127
        inter = np.count_nonzero(binary & fg)
        union = np.count_nonzero(binary | fg)
        self.iou.append(inter / union if union else 1.0)
        self.acc.append(np.count_nonzero(binary == fg) / fg.size)
        self.names.append(name)
        self.resized.append(resized)

    def result(self) -> SaliencyResult:
        if not self.names:
            raise EvalError("no images to evaluate")
        hist_fg, hist_all = np.stack(self.hist_fg), np.stack(self.hist_all)
        # positives at threshold k = pixels of level > k: reverse cumulative sums over levels 1..255
        tp = np.cumsum(hist_fg[:, ::-1], axis=1)[:, ::-1][:, 1:].astype(np.float64)
        pos = np.cumsum(hist_all[:, ::-1], axis=1)[:, ::-1][:, 1:].astype(np.float64)
        gt_area = hist_fg.sum(axis=1, keepdims=True).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(pos > 0, tp / pos, 1.0)
            recall = np.where(gt_area > 0, tp / gt_area, 1.0)
            f = (1 + BETA_SQ) * precision * recall / (BETA_SQ * precision + recall)
        f = np.nan_to_num(f, nan=0.0)
        curve = f.mean(axis=0)
        best = int(np.argmax(curve))
        rows = [SaliencyRow(n, i, a, float(f[j, best]), float(f[j].max()), r)
                for j, (n, i, a, r) in enumerate(zip(self.names, self.iou, self.acc, self.resized, strict=True))]
        return SaliencyResult(float(curve[best]), float(np.mean(self.iou)), float(np.mean(self.acc)), best,
                              curve, rows)


def saliency_scores(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                    names: Sequence[str] | None = None) -> SaliencyResult:
    """maxF, IoU and accuracy of saliency maps against GT masks (see the module doc for the exact rules).

    Args:
        preds: per image an ``(H, W)`` map: uint8 (0..255, divided by 255), bool, or float in [0, 1].
        gts: per image an ``(H, W)`` bool or integer mask, non-zero = foreground; same shape as its prediction.
        names: file names for the per-image rows (default ``"0"``, ``"1"``, ...).
    Raises:
        ValueError: different lengths or shapes; TypeError: unsupported dtypes; EvalError: no images.
    """
    if len(preds) != len(gts):
        raise ValueError(f"preds and gts differ in length: {len(preds)} and {len(gts)}")
    if names is not None and len(names) != len(preds):
        raise ValueError(f"names has {len(names)} entries for {len(preds)} images")
    acc = _Accumulator()
    for i, (p, g) in enumerate(zip(preds, gts, strict=True)):
        acc.add(str(i) if names is None else names[i], p, g)
    return acc.result()


def _png_folder(folder: Path, what: str) -> dict[str, Path]:
    """``{stem: path}`` of the PNGs under ``folder``, searched recursively (``label --masks-dir`` keeps the
    images' subfolders), hidden entries skipped; two files with one stem raise :class:`EvalError`."""
    if not folder.is_dir():
        raise EvalError(f"{what} {folder}: no such folder")
    out: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.suffix.lower() != ".png" or not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if p.stem in out:
            raise EvalError(f"{what} {folder}: duplicate file name {p.stem!r} ({out[p.stem].relative_to(folder)} "
                            f"and {rel})")
        out[p.stem] = p
    if not out:
        raise EvalError(f"{what} {folder}: no PNG files")
    return out


def _read_png(path: Path, what: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"))
    except (OSError, UnidentifiedImageError) as exc:
        raise EvalError(f"{what} {path}: cannot read as an image ({exc})") from None


def saliency(pred: PathLike, gt: PathLike) -> SaliencyResult:
    """Saliency metrics of a folder of 8-bit PNG maps against a folder of PNG GT masks, matched by stem.

    Args:
        pred: folder of ``<stem>.png`` predictions, 0..255, searched recursively (e.g. ``ncutfast label
            --masks-dir DIR``'s ``DIR/tokencut`` or ``DIR/bilateral``).
        gt: folder of ``<stem>.png`` GT masks (ECSSD ``ground_truth_mask``, DUTS-TE ``DUTS-TE-Mask``,
            DUT-OMRON ``pixelwiseGT-new-PNG``); colour PNGs are converted to grey as TokenCut does.
    A prediction whose size differs from its GT is resized to the GT with nearest neighbour, logged per image
    (``ncutfast.eval`` logger) and flagged in the rows.
    Raises:
        EvalError: a missing folder, no PNGs, a GT mask without prediction or a prediction without GT mask,
            duplicate stems, an unreadable file.
    """
    from PIL import Image

    preds = _png_folder(Path(pred), "predictions")
    gts = _png_folder(Path(gt), "ground truth")
    missing = [k for k in gts if k not in preds]
    if missing:
        raise EvalError(f"predictions {pred}: no {missing[0]}.png for ground truth {gts[missing[0]]} "
                        f"({len(missing)} GT mask(s) without prediction)")
    unknown = [k for k in preds if k not in gts]
    if unknown:
        raise EvalError(f"predictions {preds[unknown[0]]}: no GT mask {unknown[0]}.png in {gt} "
                        f"({len(unknown)} prediction(s) without GT)")
    acc = _Accumulator()
    for key, gt_path in gts.items():
        g = _read_png(gt_path, "GT mask")
        p = _read_png(preds[key], "prediction")
        resized = p.shape != g.shape
        if resized:
            log.warning("%s: prediction is %dx%d, GT is %dx%d; prediction resized to the GT (nearest neighbour)",
                        preds[key].name, p.shape[1], p.shape[0], g.shape[1], g.shape[0])
            p = np.asarray(Image.fromarray(p).resize((g.shape[1], g.shape[0]), Image.NEAREST))
        acc.add(gt_path.name, p, g, resized)
    return acc.result()
