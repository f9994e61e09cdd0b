"""Post-processing: token masks -> pixel masks at the original resolution -> COCO annotations; overlays.

MaskCut (``shared/spec/tokencut.md`` section 4): each token mask is upsampled with nearest-neighbour to the
ViT input size, earlier pixel masks are subtracted (the masks become disjoint), optionally refined by
DenseCRF (``--crf``: dropped when IoU(before, after) < 0.5), scaled to 0/255, resized with PIL bicubic to
the original (W, H) and re-binarized at 127.5. TokenCut (``tokencut`` geometry): the seed component is
upsampled and cropped to the original size (the box therefore equals TokenCut's clipped box). Saliency:
nearest-neighbour resize of the token mask to the original size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

from .cut import ImageCut, relative_gap
from .geometry import upsample_tokens

__all__ = ["PostConfig", "crf_available", "pixel_masks", "annotations_for", "overlay"]


@dataclass(frozen=True)
class PostConfig:
    """Settings of the post-processing stage (mode, patch size, DenseCRF on/off)."""

    mode: str
    patch: int
    crf: bool = False


def crf_available() -> bool:
    """True when a DenseCRF implementation (``pydensecrf``, e.g. from the ``pydensecrf2`` package) imports."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def densecrf(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """MaskCut's DenseCRF refinement (spec section 4 post-processing, steps 1-2).

    Args:
        rgb: ``(H, W, 3)`` uint8, the image the ViT saw.
        mask: ``(H, W)`` bool.
    Returns a bool ``(H, W)`` mask: 10 mean-field iterations on unary ``-log softmax([1 - m, m])``, Gaussian
    (sxy 3, compat 7) and bilateral (sxy 50, srgb 5, compat 10) pairwise terms, MAP label, holes filled.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax
    from scipy import ndimage

    h, w = mask.shape
    m = mask.astype(np.float32)
    logits = np.stack([1.0 - m, m])
    prob = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob)))
    crf.addPairwiseGaussian(sxy=3, compat=7)
    crf.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.array(rgb, dtype=np.uint8, order="C"), compat=10)
    q = np.array(crf.inference(10)).reshape(2, h, w)
    return ndimage.binary_fill_holes(q.argmax(axis=0) >= 0.5)


def pixel_masks(cut: ImageCut, size: tuple[int, int], cfg: PostConfig,
                rgb: np.ndarray | None = None) -> list[np.ndarray]:
    """Token masks of one image -> bool ``(H, W)`` masks at the original ``size`` = (H, W), one per cut step.

    ``rgb`` (``(Hr, Wr, 3)`` uint8, the resized image) is needed only with ``cfg.crf``.
    """
    height, width = size
    out = []
    if cfg.mode == "maskcut":
        taken: np.ndarray | None = None
        for m in cut.masks:
            pm = upsample_tokens(m, cfg.patch)
            if taken is None:
                taken = np.zeros_like(pm)
            pm = pm & ~taken  # spec §4 step 6: subtract every earlier pixel mask
            taken |= pm
            if cfg.crf and pm.any():
                assert rgb is not None
                refined = densecrf(rgb, pm)
                union = (refined | pm).sum()
                pm = refined if union and (refined & pm).sum() / union >= 0.5 else np.zeros_like(pm)
            img = Image.fromarray(pm.astype(np.uint8) * 255).resize((width, height), Image.BICUBIC)
            out.append(np.asarray(img) > 127.5)
    elif cfg.mode == "tokencut":
        out = [upsample_tokens(m, cfg.patch)[:height, :width] for m in cut.masks]
    else:
        out = [np.asarray(Image.fromarray(m.astype(np.uint8)).resize((width, height), Image.NEAREST)) > 0
               for m in cut.masks]
    return out


def annotations_for(cut: ImageCut, size: tuple[int, int], cfg: PostConfig,
                    rgb: np.ndarray | None = None) -> list[dict]:
    """COCO annotations (without ids) of one image: RLE, bbox ``[x, y, w, h]``, area, confidence.

    Empty masks (area < 1) are skipped, as in CutLER. Each annotation carries ``ncut`` (lambda2),
    ``eigengap`` (lambda3 - lambda2), ``score`` (1 - lambda2 / lambda3), ``tau`` and ``mask_index`` (the
    MaskCut step). ``width``/``height`` are the original image's.
    """
    height, width = size
    anns = []
    for t, pm in enumerate(pixel_masks(cut, size, cfg, rgb)):
        rle = mask_util.encode(np.asfortranarray(pm.astype(np.uint8)))
        area = int(mask_util.area(rle))
        if area < 1:
            continue
        lam2, lam3 = float(cut.lambda2[t]), float(cut.lambda3[t])
        anns.append({
            "category_id": 1,
            "iscrowd": 0,
            "area": area,
            "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
            "width": width,
            "height": height,
            "score": relative_gap(lam2, lam3),
            "ncut": lam2 if np.isfinite(lam2) else None,
            "eigengap": lam3 - lam2 if np.isfinite(lam3 - lam2) else None,
            "tau": cut.tau,
            "mask_index": t,
        })
    return anns


_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                     [70, 240, 240]], dtype=np.float32)


def _heat(v: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A blue-white-red heat-map of a (h, w) eigenvector, resized (nearest) to ``size`` = (W, H)."""
    v = np.asarray(v, dtype=np.float64)
    span = float(np.abs(v).max()) or 1.0
    t = (v / span + 1.0) / 2.0  # [0, 1], 0.5 = zero
    rgb = np.stack([np.clip(2 * t, 0, 1), 1 - np.abs(2 * t - 1), np.clip(2 - 2 * t, 0, 1)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8)).resize(size, Image.NEAREST)


def overlay(image: Image.Image, anns: list[dict], eigenvector: np.ndarray | None = None) -> Image.Image:
    """PNG-ready overlay: the image with each mask tinted and its box drawn, plus the eigenvector heat-map
    (the first cut's, when known) to the right."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    for i, ann in enumerate(anns):
        m = mask_util.decode({"size": ann["segmentation"]["size"],
                              "counts": ann["segmentation"]["counts"].encode("ascii")}).astype(bool)
        base[m] = 0.5 * base[m] + 0.5 * _PALETTE[i % len(_PALETTE)]
    out = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for i, ann in enumerate(anns):
        x, y, w, h = ann["bbox"]
        colour = tuple(int(c) for c in _PALETTE[i % len(_PALETTE)])
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=2)
    if eigenvector is None:
        return out
    canvas = Image.new("RGB", (2 * out.width, out.height))
    canvas.paste(out, (0, 0))
    canvas.paste(_heat(eigenvector, out.size), (out.width, 0))
    return canvas
