"""The specification: TokenCut's ncut and CutLER's MaskCut in plain float64 NumPy/SciPy.

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
from scipy import ndimage

from ._validate import (
    check_choice,
    check_eps,
    check_feature_matrix,
    check_grid,
    check_image_size,
    check_patch,
    check_positive_int,
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

    Zero rows (MaskCut's painted tokens) stay zero.
    """
    f = np.asarray(feats, dtype=dtype)
    norms = np.sqrt((f * f).sum(axis=1, keepdims=True))
    return f / np.maximum(norms, dtype(NORM_EPS))


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
            ablation: W keeps the similarity and entries **below** tau become eps.
        similarity_dtype: dtype of the normalization and the similarity product. TokenCut itself computes
            it in float32 (torch) and then converts to float64; the reference default is float64.
    """
    tau = check_tau(tau)
    eps = check_eps(eps)
    f = normalize_rows(_as_features(feats), similarity_dtype)
    s = f @ f.T  # §2 step 2: cosine affinity
    if binary:
        # §2 step 3: 1 where s > tau (strict), eps elsewhere; the diagonal is 1 unless the row is zero.
        return np.where(s > tau, 1.0, eps).astype(np.float64)
    w = s.astype(np.float64)
    w[s < tau] = eps  # the ablation's rule: entries below tau (not <=) become eps
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
