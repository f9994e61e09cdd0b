"""Shared by tests and benchmarks: planted-object scenes, the tolerance table and agreement measures.

Nothing here is used by the library itself; it ships so that users' and our own tests measure agreement
with the reference the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import reference
from .decide import TIE_RTOL

__all__ = [
    "TOLERANCES",
    "GAP_MIN",
    "Scene",
    "grid_for",
    "planted_scene",
    "d_alignment",
    "tied_tokens",
    "mean_tied_tokens",
    "Agreement",
    "compare_to_reference",
    "flip_rate",
    "synthetic_photo",
]

#: Minimum |<x, x_ref>_D| (unit D-norm vectors) per similarity precision (issue #2's agreement rules).
TOLERANCES = {
    "float64": {"alignment": 1.0 - 1e-6},
    "float32": {"alignment": 1.0 - 1e-4},
    "fast": {"alignment": 1.0 - 1e-2},
    "exact": {"alignment": 1.0 - 1e-6},  # the float64 graph itself
}
#: Partitions are compared only where the relative eigengap (lambda3 - lambda2) / lambda3 is at least this.
GAP_MIN = 1e-3


@dataclass
class Scene:
    """A planted-object token map.

    Attributes:
        features: float32 ``(N, C)``, row-major over ``grid``.
        grid: (h, w) with h * w = N.
        labels: int ``(h, w)``, 0 = background regions' common label, 1.. = planted objects.
    """

    features: np.ndarray
    grid: tuple[int, int]
    labels: np.ndarray


def grid_for(n: int) -> tuple[int, int]:
    """The most square (h, w) with h <= w and h * w = n (primes give (1, n))."""
    h = int(np.sqrt(n))
    while n % h:
        h -= 1
    return h, n // h


def planted_scene(
    rng: np.random.Generator,
    n_tokens: int | None = None,
    channels: int = 64,
    *,
    grid: tuple[int, int] | None = None,
    n_objects: int | None = None,
    noise: float | None = None,
) -> Scene:
    """Random background 'stuff' regions plus 1-3 rectangular objects, each with its own feature direction.

    A token's feature is its region's direction plus a shared bias direction (DINO keys have one) plus
    Gaussian noise, so most within-region similarities exceed tau = 0.2 and most cross-region ones do
    not; noise makes the boundary imperfect, as in real feature maps.
    """
    if grid is None:
        if n_tokens is None:
            raise ValueError("n_tokens: give n_tokens or grid")
        grid = grid_for(n_tokens)
    h, w = grid
    n_objects = int(rng.integers(1, 4)) if n_objects is None else n_objects
    noise = float(rng.uniform(0.45, 1.0)) if noise is None else noise
    labels = np.zeros((h, w), dtype=np.int64)
    # Background: split into two 'stuff' regions along a random row (labels -1, -2 internally).
    cut = int(rng.integers(0, h + 1))
    region = np.full((h, w), 0, dtype=np.int64)
    region[cut:] = 1
    for k in range(n_objects):
        oh = max(1, int(round(h * rng.uniform(0.15, 0.45))))
        ow = max(1, int(round(w * rng.uniform(0.15, 0.45))))
        r0 = int(rng.integers(0, h - oh + 1))
        c0 = int(rng.integers(0, w - ow + 1))
        region[r0 : r0 + oh, c0 : c0 + ow] = 2 + k
        labels[r0 : r0 + oh, c0 : c0 + ow] = 1 + k
    n_regions = 2 + n_objects
    g = rng.standard_normal((channels, max(channels, n_regions + 1)))
    if channels >= n_regions + 1:
        q, _ = np.linalg.qr(g[:, : n_regions + 1])
        dirs = q.T
    else:
        dirs = g[:, : n_regions + 1].T
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bias = dirs[0] * rng.uniform(0.0, 0.4)
    base = dirs[1:][region.reshape(-1)] + bias
    feats = base + noise * rng.standard_normal((h * w, channels)) / np.sqrt(max(channels, 1)) * 1.5
    feats *= rng.uniform(0.5, 3.0, size=(h * w, 1))  # key norms vary; the cut only sees directions
    return Scene(feats.astype(np.float32), (h, w), labels)


def d_alignment(x: np.ndarray, x_ref: np.ndarray, d: np.ndarray) -> float:
    """|<x, x_ref>_D| / (||x||_D ||x_ref||_D): 1 means the same eigenvector up to sign and scale."""
    x = np.asarray(x, dtype=np.float64)
    x_ref = np.asarray(x_ref, dtype=np.float64)
    num = abs(float(np.sum(d * x * x_ref)))
    den = np.sqrt(float(np.sum(d * x * x)) * float(np.sum(d * x_ref * x_ref)))
    return num / den if den > 0 else float("nan")


def tied_tokens(x: np.ndarray, rtol: float = TIE_RTOL) -> np.ndarray:
    """Indices whose |x| is within ``rtol`` (relative) of max |x|: the candidates for argmax|x|."""
    a = np.abs(np.asarray(x, dtype=np.float64))
    return np.flatnonzero(a >= a.max() * (1.0 - rtol))


def mean_tied_tokens(x: np.ndarray, rtol: float = TIE_RTOL) -> np.ndarray:
    """Bool mask of the entries within ``rtol * max|x|`` of the unweighted mean: tied with it in exact
    arithmetic (rounding decides which side of TokenCut's ``x > mean`` they fall on)."""
    x = np.asarray(x, dtype=np.float64)
    return np.abs(x - x.mean()) <= rtol * np.abs(x).max()


@dataclass
class Agreement:
    """How one fast result compares to the reference on one image."""

    well_defined: bool  # relative eigengap >= GAP_MIN
    alignment: float  # |<x, x_ref>_D|, unit D-norms
    same_partition: bool  # off the tokens tied with the reference's mean; either side if max|x| ties across signs
    seed_tied: bool  # our seed is one of the reference's tokens tied for max |x|
    lambda2_error: float  # |lambda2 - lambda2_ref|


def compare_to_reference(
    x: np.ndarray,
    partition: np.ndarray,
    seed: int,
    lambda2: float,
    ref: reference.NcutResult,
    d_ref: np.ndarray,
) -> Agreement:
    """Agreement of one image's (x, partition, seed, lambda2) with the reference's NcutResult."""
    gap = reference.relative_gap(ref.lambda2, ref.lambda3)
    untied = ~mean_tied_tokens(ref.eigenvector)
    part = np.asarray(partition, bool)[untied]
    same = np.array_equal(part, ref.partition[untied])
    tied = ref.eigenvector[tied_tokens(ref.eigenvector)]
    if not same and (tied > 0).any() and (tied < 0).any():
        # max|x| is tied across signs: which side TokenCut keeps is decided by the tie-break.
        same = np.array_equal(~part, ref.partition[untied])
    return Agreement(
        well_defined=gap >= GAP_MIN,
        alignment=d_alignment(x, ref.eigenvector, d_ref) if np.any(ref.eigenvector) else 1.0,
        same_partition=bool(same),
        seed_tied=bool(int(seed) in set(tied_tokens(ref.eigenvector).tolist())),
        lambda2_error=abs(float(lambda2) - ref.lambda2) if np.isfinite(ref.lambda2) else 0.0,
    )


def flip_rate(features: np.ndarray, tau: float = reference.TOKENCUT_TAU, precision: str = "fast",
              device: str = "cpu") -> float:
    """Fraction of graph entries whose side of tau differs between ``precision`` and float64.

    Measures what the "fast" (tensor-core) and "float32" similarity modes cost in threshold decisions, on
    ``device`` with the torch backend's own similarity code. ``features``: ``(N, C)`` float.
    """
    import torch

    from .backends.contract import matmul_precision, normalized_features

    t = torch.from_numpy(np.asarray(features, dtype=np.float32))[None].to(device)
    n = torch.tensor([t.shape[1]])
    f64 = normalized_features(t, n, "float64")
    ref = torch.bmm(f64, f64.transpose(1, 2)) > tau
    f = normalized_features(t, n, precision)
    with matmul_precision(f.device, precision):
        s = torch.bmm(f, f.transpose(1, 2))
    return float((ref != (s > tau)).to(torch.float64).mean())


def synthetic_photo(rng: np.random.Generator, height: int, width: int, *, gray: bool = False,
                    patch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """A photo-like image and a TokenCut-like mask of its object, for the bilateral solver.

    The image: a smooth colour gradient background, an elliptic object of another colour with a textured
    stripe, sensor noise; ``gray`` repeats one channel three times. The mask: the object's patches
    (``patch`` x ``patch`` blocks more than half inside it), the blocky shape a TokenCut mask has at the
    original resolution, plus a stray wrong block; never empty.

    Returns ``(image, mask)``: uint8 ``(height, width, 3)`` and bool ``(height, width)``.
    """
    yy, xx = np.mgrid[:height, :width].astype(np.float64)
    base = rng.uniform(40, 200, size=3)
    slope = rng.uniform(-60, 60, size=(2, 3))
    img = base + slope[0] * yy[..., None] / max(height, 1) + slope[1] * xx[..., None] / max(width, 1)
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    ry, rx = max(rng.uniform(0.15, 0.35) * height, 0.6), max(rng.uniform(0.15, 0.35) * width, 0.6)
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0
    img[inside] = rng.uniform(0, 255, size=3) + 20.0 * np.sin(xx[inside] / 3.0)[:, None]
    img += rng.normal(0.0, 6.0, size=img.shape)
    if gray:
        img = np.repeat(img[..., :1], 3, axis=-1)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    gh, gw = -(-height // patch), -(-width // patch)
    pad = np.zeros((gh * patch, gw * patch))
    pad[:height, :width] = inside
    blocks = pad.reshape(gh, patch, gw, patch).mean(axis=(1, 3)) > 0.5 * min(1.0, height * width / patch**2)
    blocks[rng.integers(gh), rng.integers(gw)] = True
    mask = np.repeat(np.repeat(blocks, patch, axis=0), patch, axis=1)[:height, :width]
    return image, mask
