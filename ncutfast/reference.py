"""The specification: TokenCut's ncut, CutLER's MaskCut and TokenCut's bilateral solver in plain float64
NumPy/SciPy.

Every fast path in ncutfast is tested against this file. It follows ``shared/spec/tokencut.md`` step by
step (section numbers in the comments) and makes no attempt to be fast: it builds the dense N x N graph and
calls ``scipy.linalg.eigh(D - W, D, subset_by_index=[1, 2])`` exactly as both original code bases do.

Where the originals are undefined this file defines the behaviour (and the API follows it):

- N = 1: there is no 2nd eigenpair. ``lambda2 = lambda3 = NaN`` and ``x = [0.0]``; the single token is the
  foreground (TokenCut's flip rule puts the seed back in the partition).
- N = 2: there is no 3rd eigenpair. ``lambda3 = NaN``.
- Degenerate spectra (e.g. all-identical features: W = 11^T, every eigenvalue but the first is 1): the
  eigenvector is any vector of the eigenspace; the reference returns LAPACK's choice, which is deterministic
  for a given input but arbitrary. ``lambda3 - lambda2`` shows the degeneracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg
from scipy import ndimage

from ._validate import (
    check_choice,
    check_eps,
    check_feature_matrix,
    check_grid,
    check_image_size,
    check_patch,
    check_positive_int,
    check_positive_real,
    check_rgb_image,
    check_target,
    check_tau,
)

__all__ = [
    "TOKENCUT_TAU",
    "MASKCUT_TAU",
    "EPS",
    "NORM_EPS",
    "normalize_rows",
    "affinity",
    "degrees",
    "fiedler",
    "orient_tokencut",
    "seed_component",
    "box_from_mask",
    "corner_count",
    "token_iou",
    "NcutResult",
    "ncut",
    "TokenCutResult",
    "tokencut",
    "MaskCutResult",
    "SIGN_RULES",
    "maskcut_decision",
    "maskcut",
    "BS_SIGMA_SPATIAL",
    "BS_SIGMA_LUMA",
    "BS_SIGMA_CHROMA",
    "BS_LAM",
    "BS_CONFIDENCE",
    "BS_A_DIAG_MIN",
    "BS_CG_TOL",
    "BS_CG_MAXITER",
    "BS_BISTOCHASTIC_ITERS",
    "BS_HASH_BASE",
    "BS_DIMS",
    "RGB_TO_YUV",
    "YUV_OFFSET",
    "rgb_to_yuv",
    "bilateral_coords",
    "bilateral_hash",
    "BilateralGrid",
    "bistochastize",
    "bilateral_solve",
    "bilateral_binary",
]

TOKENCUT_TAU = 0.2  # every TokenCut CLI passes 0.2 (spec §2)
MASKCUT_TAU = 0.15  # CutLER's ImageNet setting (spec §4)
EPS = 1e-5  # weight of a non-edge (spec §2)
NORM_EPS = 1e-12  # F.normalize's clamp of the row norm (spec §2 step 1)


def _as_features(feats: np.ndarray, name: str = "feats") -> np.ndarray:
    # Arrays only (as the API): a nested list has no dtype to check.
    check_feature_matrix(feats, name, all_finite=None)
    arr = np.asarray(feats)
    arr64 = arr.astype(np.float64)
    if not np.isfinite(arr64).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return arr


def normalize_rows(feats: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """Spec §2 step 1: f_i = k_i / max(||k_i||_2, 1e-12), computed in ``dtype``.

    Zero rows (MaskCut's painted tokens) stay zero. Finite rows too large to square (float32 beyond about
    1e19, float64 beyond 1e154) or to convert to ``dtype`` follow the same formula: each row is first
    scaled by the power of two 2^-e that brings its largest |entry| into [0.5, 1), which is exact (rows of
    normal numbers give the unscaled formula's bits), and the clamp compares the unscaled norm
    ``2^e ||row 2^-e||`` with 1e-12, so rows below it still become row / 1e-12.
    """
    a = np.asarray(feats)
    f = a.astype(np.result_type(a.dtype, dtype))  # holds the input exactly
    e = np.frexp(np.abs(f).max(axis=1, keepdims=True))[1]
    g = np.ldexp(f, -e).astype(dtype)
    norms = np.sqrt((g * g).sum(axis=1, keepdims=True))
    with np.errstate(over="ignore"):  # an unscaled norm beyond float64 is inf: not tiny
        tiny = (np.ldexp(norms.astype(np.float64), e) < dtype(NORM_EPS))[:, 0]
    out = g / np.where(norms > 0, norms, 1)
    out[tiny] = f[tiny].astype(dtype) / dtype(NORM_EPS)
    return out


def affinity(
    feats: np.ndarray,
    tau: float = TOKENCUT_TAU,
    eps: float = EPS,
    *,
    binary: bool = True,
    similarity_dtype: type = np.float64,
) -> np.ndarray:
    """Spec §2 steps 1-3: the dense graph W, float64 ``(N, N)``.

    Args:
        feats: ``(N, C)`` token features (any float dtype).
        tau: similarity threshold; an edge needs similarity **strictly** greater than tau.
        eps: weight of non-edges.
        binary: True gives W = 1 / eps (TokenCut's default). False is TokenCut's ``--no-binary-graph``
            ablation: W keeps the similarity and entries **below** tau become eps; it needs tau >= 0 (no
            negative weights) and raises ``ValueError`` for a degree of 0 (an all-zero row with tau = 0).
        similarity_dtype: dtype of the normalization and the similarity product. TokenCut itself computes
            it in float32 (torch) and then converts to float64; the reference default is float64.
    """
    tau = check_tau(tau, binary=binary)
    eps = check_eps(eps)
    f = normalize_rows(_as_features(feats), similarity_dtype)
    s = f @ f.T  # §2 step 2: cosine affinity
    if binary:
        # §2 step 3: 1 where s > tau (strict), eps elsewhere; the diagonal is 1 unless the row is zero.
        return np.where(s > tau, 1.0, eps).astype(np.float64)
    w = s.astype(np.float64)
    w[s < tau] = eps  # the ablation's rule: entries below tau (not <=) become eps
    # tau >= 0 keeps every weight >= 0; only a token whose similarities are all exactly 0 (an all-zero row,
    # tau = 0) has degree 0, which leaves D singular.
    isolated = np.flatnonzero(w.sum(axis=1) <= 0)
    if isolated.size:
        raise ValueError(f"feats: token {isolated[0]} has degree 0 in the non-binary graph (an all-zero feature "
                         "row with tau = 0?); the normalized cut needs every degree > 0")
    return w


def degrees(w: np.ndarray) -> np.ndarray:
    """Spec §2 step 4: d_i = sum_j W_ij, self-loop included (float64 ``(N,)``)."""
    return np.asarray(w, dtype=np.float64).sum(axis=1)


def fiedler(w: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Spec §2 step 5: the 2nd and 3rd smallest generalized eigenpairs of (D - W) x = lambda D x.

    Returns ``(lambda2, lambda3, x)`` with ``x`` (float64 ``(N,)``) the eigenvector of lambda2 as
    ``scipy.linalg.eigh`` returns it: ``x^T D x = 1`` and an arbitrary sign. Missing eigenpairs (N < 3)
    are NaN; for N = 1, ``x = [0.0]``.
    """
    w = np.asarray(w, dtype=np.float64)
    n = w.shape[0]
    if n == 1:
        return float("nan"), float("nan"), np.zeros(1)
    d = degrees(w)
    dmat = np.diag(d)
    hi = min(2, n - 1)
    vals, vecs = scipy.linalg.eigh(dmat - w, dmat, subset_by_index=[1, hi])
    lam3 = float(vals[1]) if hi == 2 else float("nan")
    return float(vals[0]), lam3, np.ascontiguousarray(vecs[:, 0])


def orient_tokencut(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Spec §2 steps 6-7: bipartition at the unweighted mean, seed = argmax|x|, flip if the seed is outside.

    Returns ``(partition, x_oriented, seed)``: ``partition`` bool ``(N,)``, ``x_oriented`` the eigenvector
    negated when the partition was complemented, ``seed`` the first index of max |x| (NumPy's argmax).
    """
    x = np.asarray(x, dtype=np.float64)
    avg = x.sum() / x.shape[0]  # §2 step 6: unweighted mean
    partition = x > avg
    seed = int(np.argmax(np.abs(x)))  # §2 step 7: first index wins ties
    if not partition[seed]:
        partition = ~partition  # the complement is {x <= mean}, as in TokenCut
        x = -x
    return partition, x, seed


def seed_component(partition: np.ndarray, seed: int, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Spec §2 step 8: 4-connected components of the partition on the (h, w) grid; keep the seed's one.

    Returns ``(labels, mask)``: ``labels`` int32 ``(h, w)`` from ``scipy.ndimage.label`` (default structure,
    4-connectivity) and ``mask`` bool ``(h, w)``, the tokens sharing the seed's label. As in the original
    ``detect_box``, a seed outside the partition (label 0) selects every token outside it.
    """
    h, w = grid
    labels, _ = ndimage.label(np.asarray(partition, dtype=bool).reshape(h, w))
    cc = labels[np.unravel_index(int(seed), (h, w))]
    return labels.astype(np.int32), labels == cc


def box_from_mask(
    mask: np.ndarray, scales: tuple[int, int], image_size: tuple[int, int] | None = None
) -> tuple[int, int, int, int]:
    """Spec §2 step 9: pixel box (x1, y1, x2, y2) of a token mask, +1 on the max, clipped to the image.

    ``scales`` is (patch rows, patch cols) in pixels, ``image_size`` (H, W); x2 <= W and y2 <= H.
    """
    rows, cols = np.nonzero(mask)
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    c0, c1 = int(cols.min()), int(cols.max()) + 1
    box = [scales[1] * c0, scales[0] * r0, scales[1] * c1, scales[0] * r1]
    if image_size is not None:
        box[2] = min(box[2], image_size[1])
        box[3] = min(box[3], image_size[0])
    return box[0], box[1], box[2], box[3]


def corner_count(partition: np.ndarray, grid: tuple[int, int]) -> int:
    """Spec §4 step 3: how many of the 4 corner tokens lie in the partition (a 1-token grid counts 4x)."""
    p = np.asarray(partition, dtype=bool).reshape(grid)
    return int(p[0, 0]) + int(p[0, -1]) + int(p[-1, 0]) + int(p[-1, -1])


def relative_gap(lambda2: float, lambda3: float) -> float:
    """The relative eigengap ``(lambda3 - lambda2) / lambda3`` clipped to [0, 1]: 1 when the 2nd eigenvector
    is far from the 3rd (a stable cut), 0 for a degenerate spectrum. Where it is undefined (a NaN or
    infinite eigenvalue, e.g. lambda3 for N < 3, or lambda3 <= 0) it is 0 as well: no measured gap counts as
    no gap, so a threshold on it never accepts such a cut and a confidence score stays a number."""
    if not (np.isfinite(lambda2) and np.isfinite(lambda3)) or lambda3 <= 0:
        return 0.0
    return float(min(1.0, max(0.0, (lambda3 - lambda2) / lambda3)))


def token_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two token masks as TokenCut's ``metric.IoU`` computes it (NaN when both are empty)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    union = int((a | b).sum())
    inter = int((a & b).sum())
    return inter / union if union else float("nan")


@dataclass
class NcutResult:
    """TokenCut's cut of one image (spec §2 steps 1-7).

    Attributes:
        lambda2, lambda3: the 2nd and 3rd smallest generalized eigenvalues (NaN where they do not exist).
        eigenvector: float64 ``(N,)``, ``x^T D x = 1``, oriented so the seed lies in the partition.
        partition: bool ``(N,)``, the foreground side.
        seed: index of the token with the largest |x| (first index on ties).
    """

    lambda2: float
    lambda3: float
    eigenvector: np.ndarray
    partition: np.ndarray
    seed: int


def ncut(
    feats: np.ndarray,
    tau: float = TOKENCUT_TAU,
    eps: float = EPS,
    *,
    binary: bool = True,
    similarity_dtype: type = np.float64,
) -> NcutResult:
    """TokenCut's normalized cut of one image, spec §2 steps 1-7. ``feats``: ``(N, C)`` float."""
    w = affinity(feats, tau, eps, binary=binary, similarity_dtype=similarity_dtype)
    lam2, lam3, x = fiedler(w)
    partition, x, seed = orient_tokencut(x)
    return NcutResult(lam2, lam3, x, partition, seed)


@dataclass
class TokenCutResult:
    """TokenCut object discovery on one image (spec §2 steps 1-9).

    Attributes:
        mask: bool ``(h, w)``, the seed's 4-connected component of the partition.
        box: (x1, y1, x2, y2) in pixels, multiples of the patch, clipped to the image size.
        labels: int32 ``(h, w)`` connected-component labels of the partition.
        ncut: the cut itself (eigenpairs, partition, seed).
    """

    mask: np.ndarray
    box: tuple[int, int, int, int]
    labels: np.ndarray
    ncut: NcutResult

    @property
    def seed(self) -> int:
        return self.ncut.seed


def tokencut(
    feats: np.ndarray,
    grid: tuple[int, int],
    *,
    patch: int,
    image_size: tuple[int, int] | None = None,
    tau: float = TOKENCUT_TAU,
    eps: float = EPS,
    binary: bool = True,
    similarity_dtype: type = np.float64,
) -> TokenCutResult:
    """TokenCut object discovery, spec §2: ncut, seed component, box.

    Args:
        feats: ``(N, C)`` token features, row-major over the ``grid`` (CLS excluded).
        grid: (h, w) token rows and columns, h * w == N.
        patch: patch size in pixels.
        image_size: original (H, W) in pixels for clipping the box; default (h * patch, w * patch).
    """
    arr = _as_features(feats)
    h, w = check_grid(grid, arr.shape[0])
    patch = check_patch(patch)
    image_size = (h * patch, w * patch) if image_size is None else check_image_size(image_size)
    cut = ncut(arr, tau, eps, binary=binary, similarity_dtype=similarity_dtype)
    labels, mask = seed_component(cut.partition, cut.seed, (h, w))
    return TokenCutResult(mask, box_from_mask(mask, (patch, patch), image_size), labels, cut)


SIGN_RULES = ("cutler", "canonical")


def maskcut_decision(
    x: np.ndarray,
    grid: tuple[int, int],
    *,
    sign_rule: str = "cutler",
    argmax: Callable[[np.ndarray], int] = np.argmax,
    mean_rtol: float = 0.0,
) -> tuple[np.ndarray, int, np.ndarray]:
    """Spec §4 steps 2-3: MaskCut's foreground side and seed from one eigenvector.

    ``sign_rule="cutler"`` applies CutLER's rule to ``x`` as given, so the result depends on the
    eigenvector's arbitrary sign (CutLER #71); with scipy's x it is bit-exact CutLER.
    ``sign_rule="canonical"`` first orients x so that its largest-|x| entry is positive; the rule then reads
    "the seed's side, unless that side holds >= 3 of the 4 corner tokens, in which case the other side",
    whatever sign the solver returned.
    ``argmax`` picks an index from a vector (NumPy's first-index rule by default) and entries within
    ``mean_rtol * max|x|`` of the mean count as equal to it (0: CutLER's exact ``x > mean``); the API passes
    its documented tie rules.

    Returns ``(partition, seed, x_used)``: the chosen side (bool ``(N,)``), the seed (argmax of the oriented
    vector on that side) and the vector the rule saw (before any reversal).
    """
    check_choice(sign_rule, "sign_rule", SIGN_RULES)
    x = np.asarray(x, dtype=np.float64)
    s = int(argmax(np.abs(x)))
    if sign_rule == "canonical" and x[s] < 0:
        x = -x
    partition = x > x.sum() / x.shape[0] + mean_rtol * np.abs(x).max()
    nc = corner_count(partition, grid)
    reverse = True if nc >= 3 else not partition[s]
    if reverse:
        return ~partition, int(argmax(-x)), x
    return partition, int(argmax(x)), x


def subtract_earlier(masks: np.ndarray) -> np.ndarray:
    """Spec §4 step 6 at token level: each mask minus the union of the earlier ones (so the masks are
    disjoint; CutLER subtracts the earlier pixel masks after upsampling). ``masks``: bool ``(T, ...)``."""
    out = np.asarray(masks, dtype=bool).copy()
    taken = np.zeros(out.shape[1:], dtype=bool)
    for t in range(out.shape[0]):
        taken, out[t] = taken | out[t], out[t] & ~taken
    return out


@dataclass
class MaskCutResult:
    """MaskCut on one image at token level (spec §4 steps 1-5).

    Attributes:
        masks: bool ``(n_masks, h, w)``; a rejected step gives an all-False mask.
        seeds: the seed of each step.
        eigenvectors: float64 ``(n_masks, N)``, the eigenvector each step's rule saw (un-reversed).
        lambda2, lambda3: float64 ``(n_masks,)`` eigenvalues of each step.
    """

    masks: np.ndarray
    seeds: list[int]
    eigenvectors: np.ndarray
    lambda2: np.ndarray
    lambda3: np.ndarray


def maskcut(
    feats: np.ndarray,
    grid: tuple[int, int],
    *,
    n_masks: int = 3,
    tau: float = MASKCUT_TAU,
    eps: float = EPS,
    sign_rule: str = "cutler",
    similarity_dtype: type = np.float64,
) -> MaskCutResult:
    """CutLER's ``maskcut_forward`` at token level, spec §4 (no CRF, no pixel resizing).

    Args:
        feats: ``(N, C)`` token features, row-major over ``grid`` (CutLER passes the transpose, (C, N)).
        grid: (h, w) with h * w == N.
        n_masks: number of cuts (CutLER's ``N``).
        sign_rule: "cutler" (bit-exact CutLER, sign-dependent) or "canonical" (see ``maskcut_decision``).
    """
    arr = _as_features(feats)
    grid = check_grid(grid, arr.shape[0])
    n_masks = check_positive_int(n_masks, "n_masks")
    check_choice(sign_rule, "sign_rule", SIGN_RULES)
    k = arr.astype(np.float64)
    n = k.shape[0]
    painting = np.zeros(n, dtype=bool)
    prev = np.zeros(n, dtype=bool)
    masks, seeds, vecs, lam2s, lam3s = [], [], [], [], []
    for t in range(n_masks):
        if t >= 1:
            # §4 step 1: paint the previous mask and zero the painted keys (the zeroing accumulates).
            painting |= prev
            k = k * (1.0 - painting)[:, None]
        w = affinity(k, tau, eps, binary=True, similarity_dtype=similarity_dtype)  # §4 step 2
        lam2, lam3, x = fiedler(w)
        partition, seed, x_used = maskcut_decision(x, grid, sign_rule=sign_rule)  # §4 step 3
        _, mask = seed_component(partition, seed, grid)  # §4 step 4
        mask = mask.reshape(-1)
        if t >= 1 and (token_iou(prev, mask) > 0.5 or mask.sum() / n <= 0.01):
            mask = np.zeros(n, dtype=bool)  # §4 step 5: overlapping or tiny masks are rejected
        prev = mask
        masks.append(mask.reshape(grid))
        seeds.append(seed)
        vecs.append(x_used)
        lam2s.append(lam2)
        lam3s.append(lam3)
    return MaskCutResult(np.stack(masks), seeds, np.stack(vecs), np.array(lam2s), np.array(lam3s))


# --- Bilateral solver (spec §3): TokenCut's saliency refinement, a port of the Barron-Poole solver ---------

BS_SIGMA_SPATIAL = 16.0  # the README command's values (the original function's defaults are 24 / 4 / 4)
BS_SIGMA_LUMA = 16.0
BS_SIGMA_CHROMA = 8.0
BS_LAM = 256.0  # strength of the smoothness term
BS_CONFIDENCE = 0.999  # per-pixel confidence of the TokenCut mask
BS_A_DIAG_MIN = 1e-5  # clamp of diag(A) in the Jacobi preconditioner
BS_CG_TOL = 1e-5  # relative residual tolerance of the conjugate gradient (SciPy's rtol, atol = 0)
BS_CG_MAXITER = 25
BS_BISTOCHASTIC_ITERS = 10
BS_HASH_BASE = 255  # vertex hash: sum_d coord_d * 255**d (unique while every coordinate is < 255)
BS_DIMS = 5  # grid dimensions: x, y, Y, U, V
#: RGB -> YUV (rows Y, U, V) and the offset added afterwards (JPEG's full-range YCbCr).
RGB_TO_YUV = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
YUV_OFFSET = (0.0, 128.0, 128.0)


def _check_bilateral(image: np.ndarray, target: np.ndarray, confidence: float, sigmas: tuple[float, float, float],
                     lam: float) -> tuple[int, int]:
    size = check_rgb_image(image)
    target_arr = np.asarray(target)
    check_target(target, size, all_finite=bool(np.isfinite(target_arr.astype(np.float64)).all()))
    check_positive_real(confidence, "confidence")
    for value, name in zip(sigmas, ("sigma_spatial", "sigma_luma", "sigma_chroma"), strict=True):
        check_positive_real(value, name)
    check_positive_real(lam, "lam", allow_zero=True)
    return size


def rgb_to_yuv(image: np.ndarray) -> np.ndarray:
    """Spec §3: YUV of a uint8 ``(H, W, 3)`` RGB image, float64 ``(H, W, 3)``.

    Each channel is evaluated left to right in float64, ``(c0 * R + c1 * G) + c2 * B``, then the offset is
    added. TokenCut uses ``np.tensordot``, i.e. a BLAS product whose use of fused multiply-adds depends on
    the BLAS build; on the rare colours where the two roundings fall on different sides of a grid-cell
    boundary the vertex differs (measured: 207 of the 16.7 M colours at sigma 16 / 8 / 8 with OpenBLAS).
    This file fixes the order so that every implementation can match it exactly.
    """
    f = np.asarray(image).astype(np.float64)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([r * c[0] + g * c[1] + b * c[2] + o for c, o in zip(RGB_TO_YUV, YUV_OFFSET, strict=True)],
                    axis=-1)


def bilateral_coords(
    image: np.ndarray,
    sigma_spatial: float = BS_SIGMA_SPATIAL,
    sigma_luma: float = BS_SIGMA_LUMA,
    sigma_chroma: float = BS_SIGMA_CHROMA,
) -> np.ndarray:
    """Spec §3: integer grid coordinates (x, y, Y, U, V) of every pixel, int64 ``(H * W, 5)`` row-major.

    Truncation toward zero (``astype(int)``) of (col / sigma_spatial, row / sigma_spatial, Y / sigma_luma,
    U / sigma_chroma, V / sigma_chroma); every value is >= 0.
    """
    h, w = check_rgb_image(image)
    yuv = rgb_to_yuv(image)
    rows, cols = np.mgrid[:h, :w]
    coords = (cols / sigma_spatial, rows / sigma_spatial, yuv[..., 0] / sigma_luma, yuv[..., 1] / sigma_chroma,
              yuv[..., 2] / sigma_chroma)
    return np.stack([c.astype(np.int64) for c in coords], axis=-1).reshape(-1, BS_DIMS)


def bilateral_hash(coords: np.ndarray) -> np.ndarray:
    """The vertex hash sum_d coord_d * 255**d of int64 ``(..., 5)`` coordinates (int64 ``(...)``)."""
    return np.asarray(coords, dtype=np.int64) @ (BS_HASH_BASE ** np.arange(BS_DIMS, dtype=np.int64))


@dataclass
class BilateralGrid:
    """The bilateral grid of one image (spec §3): splat, [1 2 1] blur and slice as sparse matrices.

    Attributes:
        splat_matrix: ``(V, P)`` CSR, 1 where pixel p falls on vertex v (vertices in ascending hash order).
        blurs: 5 ``(V, V)`` CSR matrices, one per dimension: 1 at (v, u) when u is v's neighbour at offset -1
            or +1 in that dimension (the blur's off-centre taps; only neighbours that exist as vertices).
    """

    splat_matrix: scipy.sparse.csr_matrix
    blurs: list[scipy.sparse.csr_matrix]

    @classmethod
    def from_coords(cls, coords: np.ndarray) -> BilateralGrid:
        """Build the grid from ``bilateral_coords``' int64 ``(P, 5)`` output."""
        hashes = bilateral_hash(coords)
        uniq, inverse = np.unique(hashes, return_inverse=True)
        nv, npix = uniq.shape[0], hashes.shape[0]
        splat = scipy.sparse.csr_matrix((np.ones(npix), (inverse.ravel(), np.arange(npix))), shape=(nv, npix))
        blurs = []
        for d in range(BS_DIMS):
            blur = scipy.sparse.csr_matrix((nv, nv))
            for offset in (-1, 1):
                # A neighbour's hash is the vertex's hash +- 255**d; it counts only if that vertex exists.
                wanted = uniq + offset * BS_HASH_BASE**d
                loc = np.clip(np.searchsorted(uniq, wanted), 0, nv - 1)
                found = np.flatnonzero(uniq[loc] == wanted)
                blur = blur + scipy.sparse.csr_matrix((np.ones(found.shape[0]), (found, loc[found])),
                                                      shape=(nv, nv))
            blurs.append(blur)
        return cls(splat, blurs)

    @property
    def n_vertices(self) -> int:
        return self.splat_matrix.shape[0]

    def splat(self, x: np.ndarray) -> np.ndarray:
        """Pixels ``(P,)`` -> vertices ``(V,)``: the sum over each vertex's pixels."""
        return self.splat_matrix @ x

    def slice(self, y: np.ndarray) -> np.ndarray:
        """Vertices ``(V,)`` -> pixels ``(P,)``: each pixel reads its vertex."""
        return self.splat_matrix.T @ y

    def blur(self, x: np.ndarray | scipy.sparse.spmatrix) -> np.ndarray | scipy.sparse.spmatrix:
        """[1 2 1] in every dimension: 2 * 5 * x + the sum of the existing neighbours (vector or matrix)."""
        out = 2 * BS_DIMS * x
        for blur in self.blurs:
            out = out + blur @ x
        return out


def bistochastize(grid: BilateralGrid, iters: int = BS_BISTOCHASTIC_ITERS) -> tuple[np.ndarray, np.ndarray]:
    """Spec §3: the diagonals ``(n, m)`` (float64 ``(V,)`` each) that make Dn B Dn close to bistochastic.

    m = splat(1); n = 1; ``iters`` times n = sqrt(n * m / blur(n)); finally m = n * blur(n).
    """
    m = grid.splat(np.ones(grid.splat_matrix.shape[1]))
    n = np.ones(grid.n_vertices)
    for _ in range(iters):
        n = np.sqrt(n * m / grid.blur(n))
    return n, n * grid.blur(n)


def bilateral_solve(
    image: np.ndarray,
    target: np.ndarray,
    *,
    confidence: float = BS_CONFIDENCE,
    sigma_spatial: float = BS_SIGMA_SPATIAL,
    sigma_luma: float = BS_SIGMA_LUMA,
    sigma_chroma: float = BS_SIGMA_CHROMA,
    lam: float = BS_LAM,
) -> np.ndarray:
    """TokenCut's bilateral solver on one image, spec §3: the soft refined mask, float64 ``(H, W)``.

    Args:
        image: uint8 ``(H, W, 3)`` RGB, the **original** image file (not the ViT's resized input).
        target: ``(H, W)`` real, the TokenCut mask at the original size (0/1).
        confidence: the weight of every pixel's target (TokenCut: 0.999 everywhere).
        sigma_spatial, sigma_luma, sigma_chroma: grid cell sizes in pixels and YUV units.
        lam: weight of the smoothness term.

    Solves A y = b on the grid's vertices with A = lam * (Dm - Dn B Dn) + diag(splat(c)) and
    b = splat(t * c) by SciPy's conjugate gradient (rtol 1e-5, atol 0, at most 25 iterations, Jacobi
    preconditioner 1 / max(diag(A), 1e-5)) from y0 = splat(t * c) / splat(c), and returns slice(y).
    """
    h, w = _check_bilateral(image, target, confidence, (sigma_spatial, sigma_luma, sigma_chroma), lam)
    grid = BilateralGrid.from_coords(bilateral_coords(image, sigma_spatial, sigma_luma, sigma_chroma))
    n, m = bistochastize(grid)
    dn, dm = scipy.sparse.diags(n, 0), scipy.sparse.diags(m, 0)
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    c = np.full(h * w, float(confidence))
    c_splat = grid.splat(c)
    a = lam * (dm - dn @ grid.blur(dn)) + scipy.sparse.diags(c_splat, 0)
    b = grid.splat(t * c)
    precond = scipy.sparse.diags(1.0 / np.maximum(a.diagonal(), BS_A_DIAG_MIN), 0)
    y0 = grid.splat(t * c) / c_splat
    y, _ = scipy.sparse.linalg.cg(a, b, x0=y0, rtol=BS_CG_TOL, atol=0.0, maxiter=BS_CG_MAXITER, M=precond)
    return grid.slice(y).reshape(h, w)


def bilateral_binary(soft: np.ndarray, tokencut_mask: np.ndarray) -> np.ndarray:
    """Spec §3: TokenCut's binary BS output (for overlays only), bool ``(H, W)``.

    Fill the holes of ``soft > 0.5``; label its 4-connected components; keep the label with the
    second-largest pixel count (label 0, the background, is normally the largest; equal counts keep the
    order of a stable sort); with no component at all, everything is foreground. Then, when its IoU with
    ``tokencut_mask`` (bool ``(H, W)``) is < 0.5, TokenCut negates it for display: here the complement.
    """
    binary = ndimage.binary_fill_holes(np.asarray(soft) > 0.5)
    labels, n_objects = ndimage.label(binary)
    if n_objects == 0:
        binary = np.ones_like(binary)
    else:
        order = np.argsort(np.bincount(labels.ravel(), minlength=n_objects + 1), kind="stable")
        binary = labels == order[-2]
    if token_iou(tokencut_mask, binary) < 0.5:
        binary = ~binary
    return binary
