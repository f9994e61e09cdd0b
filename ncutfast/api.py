"""Public API: TokenCut's ncut, TokenCut object discovery and MaskCut, batched, on any backend.

The names and meanings follow ``ncutfast.reference`` (the specification, shared/spec/tokencut.md). Inputs are
torch tensors (any device), NumPy arrays or CuPy arrays; outputs come back in the input's framework and on
its device. A batch is ``(B, N, C)``, a ragged batch a list of ``(N_i, C)`` arrays or a padded
``(B, N_max, C)`` array plus ``lengths``.

Deterministic ties (documented deviation from the originals, whose rounding decides them):

- Seed: tokens with identical rows of W have exactly equal eigenvector entries in exact arithmetic, so
  argmax|x| is often a tie that rounding decides (in the reference too). ncutfast takes the **lowest index
  among the entries within a relative** ``TIE_RTOL`` **of the maximum**; in exact arithmetic that is NumPy's
  first-index rule.
- Mean: some graphs put whole groups of tokens exactly at the unweighted mean (e.g. a group the cut does not
  involve, with x = 0 = mean); rounding then scatters them across TokenCut's ``x > mean``. ncutfast orients
  x so that the seed's entry is positive and keeps tokens within ``TIE_RTOL * max|x|`` of the mean outside
  the partition, which is ``x > mean`` in exact arithmetic for that sign.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import backends, reference
from ._arrays import Batch, as_batch, to_framework
from ._validate import check_choice, check_grid, check_image_size, check_patch, check_positive_int
from .backends import SolveParams

__all__ = ["TIE_RTOL", "PRECISIONS", "NcutResult", "TokenCutResult", "MaskCutResult", "ncut", "tokencut",
           "maskcut"]

#: Relative tie tolerance (times max|x|): for the seed (ties with max|x|) and for the mean (ties with it).
TIE_RTOL = 1e-6
PRECISIONS = backends.PRECISIONS
Array = Any  # torch.Tensor | numpy.ndarray | cupy.ndarray


@dataclass
class _Cut:
    """Internal: a solved and oriented padded batch, torch tensors on the input device."""

    lambda2: torch.Tensor
    lambda3: torch.Tensor
    x: torch.Tensor  # (B, N_max) float64, oriented by the TokenCut seed rule
    raw_x: torch.Tensor  # (B, N_max) float64, the solver's sign
    partition: torch.Tensor  # (B, N_max) bool, False on padding
    seed: torch.Tensor  # (B,) int64
    residual: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor
    backend: str


def _solve(feats: torch.Tensor, lengths: torch.Tensor, params: SolveParams, backend: str) -> _Cut:
    name, fn = backends.resolve_backend(backend, feats.device)
    sp = fn(feats, lengths, params)
    dev = sp.x.device
    n = lengths.to(dev)
    valid = torch.arange(sp.x.shape[1], device=dev)[None, :] < n[:, None]
    x = sp.x
    ax = x.abs()
    amax = ax.max(-1).values
    cand = (ax >= amax[:, None] * (1.0 - TIE_RTOL)) & valid
    seed = cand.to(torch.int8).argmax(-1)  # spec §2 step 7, lowest index among the tied maxima
    # Orient x so that the seed's entry is positive; the partition is then TokenCut's for that sign, and
    # tokens tied with the mean (|x - mean| <= TIE_RTOL max|x|: exact in theory, decided by rounding
    # otherwise) stay outside it, as x > mean says in exact arithmetic.
    sign = torch.where(x.gather(1, seed[:, None]) < 0, -1.0, 1.0).to(x.dtype)
    xs = x * sign
    mean = xs.sum(-1) / n  # spec §2 step 6: unweighted mean over the image's tokens
    part = (xs > (mean + TIE_RTOL * amax)[:, None]) & valid
    flip = ~part.gather(1, seed[:, None])[:, 0]  # only when all entries tie (e.g. N = 1): complement
    part = torch.where(flip[:, None], ~part & valid, part)
    xo = torch.where(flip[:, None], -xs, xs)
    return _Cut(sp.lambda2, sp.lambda3, xo, x, part, seed, sp.residual, sp.converged, sp.iterations, name)


@dataclass
class NcutResult:
    """Normalized cut of each image (spec §2 steps 1-7), in the input's framework and device.

    Shapes for B images (single-image input drops the batch axis; list input gives lists of per-image
    arrays instead of padded ones):

    Attributes:
        lambda2: float64 ``(B,)``, 2nd smallest generalized eigenvalue of (D - W, D) (NaN for N = 1).
        lambda3: float64 ``(B,)``, 3rd smallest (NaN for N < 3); the eigengap shows whether the cut is
            well defined.
        eigenvector: float64 ``(B, N_max)``, x with ``x^T D x = 1``, oriented so that the seed's entry is
            positive (on the > mean side); 0 on padding.
        partition: bool ``(B, N_max)``, the foreground side; False on padding.
        seed: int64 ``(B,)``, argmax |x| with the documented tie-break.
        residual: float64 ``(B,)``, ``||M y - (1 - lambda2) y||`` with y = D^1/2 x.
        converged: bool ``(B,)``, residual <= tol * min(1, lambda3 - lambda2).
        iterations: int64 ``(B,)``, Lanczos steps (0 for dense solves).
        backend: the backend that solved it.
    """

    lambda2: Array
    lambda3: Array
    eigenvector: Array
    partition: Array
    seed: Array
    residual: Array
    converged: Array
    iterations: Array
    backend: str


def _out(t: torch.Tensor, batch: Batch, per_token: bool) -> Any:
    """Shape one batched tensor like the input: squeeze single, split lists, keep padded batches."""
    if batch.layout == "single":
        return to_framework(t[0, : int(batch.lengths[0])] if per_token else t[0], batch.framework, batch.device)
    if batch.layout == "list":
        if per_token:
            return [to_framework(t[i, : int(n)], batch.framework, batch.device)
                    for i, n in enumerate(batch.lengths.tolist())]
        return [to_framework(t[i], batch.framework, batch.device) for i in range(t.shape[0])]
    return to_framework(t, batch.framework, batch.device)


def _ncut_result(cut: _Cut, batch: Batch) -> NcutResult:
    return NcutResult(
        lambda2=_out(cut.lambda2, batch, False),
        lambda3=_out(cut.lambda3, batch, False),
        eigenvector=_out(cut.x, batch, True),
        partition=_out(cut.partition, batch, True),
        seed=_out(cut.seed, batch, False),
        residual=_out(cut.residual, batch, False),
        converged=_out(cut.converged, batch, False),
        iterations=_out(cut.iterations, batch, False),
        backend=cut.backend,
    )


def ncut(
    features: Array | list[Array],
    *,
    tau: float = reference.TOKENCUT_TAU,
    eps: float = reference.EPS,
    lengths: Any = None,
    binary: bool = True,
    precision: str = "float32",
    backend: str = "auto",
    tol: float = 1e-8,
    max_iter: int = 300,
) -> NcutResult:
    """TokenCut's normalized cut (Wang et al., CVPR 2022; spec §2 steps 1-7) of one image or a batch.

    Graph: tokens are nodes, W_ij = 1 where cos(f_i, f_j) > tau (strict) else eps, self-loops kept; the cut
    is the 2nd smallest generalized eigenvector of (D - W) x = lambda D x, split at its unweighted mean.

    Args:
        features: ``(N, C)``, ``(B, N, C)``, a list of ``(N_i, C)`` or a padded ``(B, N_max, C)`` with
            ``lengths``; float16/bfloat16/float32/float64; torch, NumPy or CuPy.
        tau: similarity threshold in (-1, 1).
        eps: weight of non-edges, > 0.
        lengths: per-image token counts of a padded batch.
        binary: False gives TokenCut's ``--no-binary-graph`` ablation (similarities kept as weights).
        precision: similarity precision: "float64", "float32" (IEEE fp32, no tf32) or "fast" (tensor
            cores where the device has them; threshold decisions within rounding of tau may flip).
        backend: "auto", "torch", "cpu", "cuda" or "triton" (``NCUTFAST_BACKEND`` overrides "auto").
        tol: convergence tolerance: residual <= tol * min(1, lambda3 - lambda2).
        max_iter: Lanczos steps per problem, all restarts included.

    Returns:
        NcutResult (see its docstring for shapes). Deterministic for a given backend and input.
    """
    params = SolveParams(tau, eps, binary, precision, tol, max_iter)
    batch = as_batch(features, lengths)
    return _ncut_result(_solve(batch.feats, batch.lengths, params, backend), batch)


def _per_image(value: Any, batch: Batch, name: str, check) -> list:
    """Broadcast one grid / image size to every image, or check a per-image list of them."""
    b = batch.lengths.shape[0]
    is_list = isinstance(value, (list, tuple)) and len(value) and isinstance(value[0], (list, tuple))
    if is_list:
        if len(value) != b:
            raise ValueError(f"{name}: has {len(value)} entries but the batch holds {b} images")
        return [check(v, i) for i, v in enumerate(value)]
    return [check(value, i) for i in range(b)]


def _grids(grid: Any, batch: Batch) -> list[tuple[int, int]]:
    lens = batch.lengths.tolist()
    return _per_image(grid, batch, "grid", lambda g, i: check_grid(g, lens[i], "grid"))


@dataclass
class TokenCutResult:
    """TokenCut object discovery (spec §2), in the input's framework and device.

    Attributes:
        masks: bool ``(B, h, w)`` (a list of ``(h_i, w_i)`` for list input or differing grids; ``(h, w)`` for
            one image): the seed's 4-connected component of the partition.
        boxes: int64 ``(B, 4)``, (x1, y1, x2, y2) in pixels, multiples of the patch, clipped to image_size.
        seeds: int64 ``(B,)``, the seed token (row-major index).
        ncut: the underlying NcutResult.
    """

    masks: Array | list[Array]
    boxes: Array
    seeds: Array
    ncut: NcutResult


def _stack_or_list(items: list[np.ndarray], batch: Batch) -> Any:
    if batch.layout == "single":
        return to_framework(torch.from_numpy(items[0]), batch.framework, batch.device)
    if batch.layout == "list" or len({a.shape for a in items}) != 1:
        return [to_framework(torch.from_numpy(a), batch.framework, batch.device) for a in items]
    return to_framework(torch.from_numpy(np.stack(items)), batch.framework, batch.device)


def tokencut(
    features: Array | list[Array],
    grid: tuple[int, int] | list[tuple[int, int]],
    *,
    patch: int,
    image_size: tuple[int, int] | list[tuple[int, int]] | None = None,
    tau: float = reference.TOKENCUT_TAU,
    eps: float = reference.EPS,
    binary: bool = True,
    lengths: Any = None,
    precision: str = "float32",
    backend: str = "auto",
    tol: float = 1e-8,
    max_iter: int = 300,
) -> TokenCutResult:
    """TokenCut object discovery (spec §2 steps 1-9): ncut, the seed's 4-connected component, its box.

    Args:
        features: as for ``ncut``; tokens row-major over the grid, CLS excluded.
        grid: (h, w) for every image, or one (h_i, w_i) per image; h * w must equal the image's N.
        patch: patch size in pixels.
        image_size: original (H, W) (or one per image) to clip boxes to; default (h * patch, w * patch).
        Other arguments as for ``ncut``.
    """
    params = SolveParams(tau, eps, binary, precision, tol, max_iter)
    patch = check_patch(patch)
    batch = as_batch(features, lengths)
    grids = _grids(grid, batch)
    if image_size is None:
        sizes = [(h * patch, w * patch) for h, w in grids]
    else:
        sizes = _per_image(image_size, batch, "image_size", lambda s, i: check_image_size(s))
    cut = _solve(batch.feats, batch.lengths, params, backend)
    part = cut.partition.cpu().numpy()
    seeds = cut.seed.cpu().numpy()
    masks, boxes = [], []
    for i, (g, size) in enumerate(zip(grids, sizes, strict=True)):
        n = g[0] * g[1]
        _, mask = reference.seed_component(part[i, :n], int(seeds[i]), g)  # spec §2 step 8
        masks.append(mask)
        boxes.append(reference.box_from_mask(mask, (patch, patch), size))  # spec §2 step 9
    box_t = torch.tensor(boxes, dtype=torch.int64)
    return TokenCutResult(
        masks=_stack_or_list(masks, batch),
        boxes=to_framework(box_t[0] if batch.layout == "single" else box_t, batch.framework, batch.device),
        seeds=_out(cut.seed, batch, False),
        ncut=_ncut_result(cut, batch),
    )


@dataclass
class MaskCutResult:
    """MaskCut at token level (spec §4 steps 1-5), in the input's framework and device.

    Attributes:
        masks: bool ``(B, n_masks, h, w)`` (a list of ``(n_masks, h_i, w_i)`` for list input or differing
            grids; ``(n_masks, h, w)`` for one image). A rejected step (<= 1% of tokens, or IoU > 0.5 with
            the previous step's mask) is all False.
        seeds: int64 ``(B, n_masks)``.
        lambda2, lambda3: float64 ``(B, n_masks)``, each step's eigenvalues (Ncut value and gap).
        eigenvectors: float64 ``(B, n_masks, N_max)`` (lists of ``(n_masks, N_i)`` for list input), the
            vector each step's rule saw (canonical orientation, or the solver's sign for "cutler").
    """

    masks: Array | list[Array]
    seeds: Array
    lambda2: Array
    lambda3: Array
    eigenvectors: Array | list[Array]


def _tie_argmax(v: np.ndarray) -> int:
    """Lowest index among entries within TIE_RTOL * max|v| of max(v) (see the module docstring)."""
    scale = float(np.abs(v).max())
    return int(np.flatnonzero(v >= v.max() - TIE_RTOL * scale)[0])


def maskcut(
    features: Array | list[Array],
    grid: tuple[int, int] | list[tuple[int, int]],
    *,
    n_masks: int = 3,
    tau: float = reference.MASKCUT_TAU,
    eps: float = reference.EPS,
    sign_rule: str = "canonical",
    lengths: Any = None,
    precision: str = "float32",
    backend: str = "auto",
    tol: float = 1e-8,
    max_iter: int = 300,
) -> MaskCutResult:
    """CutLER's MaskCut (Wang et al., CVPR 2023; spec §4) at token level, all images of a batch together.

    Each of the ``n_masks`` steps zeroes the keys of the tokens already cut, solves the ncut of every image
    in one batched solve, chooses the foreground side with the corner rule, keeps the seed's 4-connected
    component and rejects tiny (<= 1%) or overlapping (IoU > 0.5 with the previous step) masks.

    Args:
        features: as for ``ncut``; tokens row-major over the grid, CLS excluded.
        grid: (h, w) for every image or one per image.
        n_masks: number of steps (CutLER's N).
        sign_rule: "canonical" (default): orient x so that its largest-|x| entry is positive, then apply the
            corner rule. The result is then independent of the solver's arbitrary sign: the foreground is
            the seed's side unless that side holds >= 3 of the 4 corners. "cutler": CutLER's rule on the
            solver's sign, as the original does with scipy's (sign-dependent, CutLER #71).
        Other arguments as for ``ncut``.
    """
    params = SolveParams(tau, eps, True, precision, tol, max_iter)
    n_masks = check_positive_int(n_masks, "n_masks")
    check_choice(sign_rule, "sign_rule", reference.SIGN_RULES)
    batch = as_batch(features, lengths)
    grids = _grids(grid, batch)
    b, n_max = batch.feats.shape[0], batch.feats.shape[1]
    lens = batch.lengths.tolist()
    painting = torch.zeros(b, n_max, dtype=torch.bool, device=batch.feats.device)
    prev = np.zeros((b, n_max), dtype=bool)
    k = batch.feats
    masks = np.zeros((b, n_masks, n_max), dtype=bool)
    seeds = np.zeros((b, n_masks), dtype=np.int64)
    lam2 = np.zeros((b, n_masks))
    lam3 = np.zeros((b, n_masks))
    vecs = np.zeros((b, n_masks, n_max))
    for t in range(n_masks):
        if t >= 1:
            # spec §4 step 1: paint the previous masks and zero the painted keys (accumulating).
            painting |= torch.from_numpy(prev).to(painting.device)
            k = k * (~painting)[:, :, None].to(k.dtype)
        cut = _solve(k, batch.lengths, params, backend)
        raw = cut.raw_x.cpu().numpy()
        lam2[:, t] = cut.lambda2.cpu().numpy()
        lam3[:, t] = cut.lambda3.cpu().numpy()
        for i, (g, n) in enumerate(zip(grids, lens, strict=True)):
            part, seed, used = reference.maskcut_decision(raw[i, :n], g, sign_rule=sign_rule, argmax=_tie_argmax,
                                                          mean_rtol=TIE_RTOL)  # spec §4 steps 2-3
            _, mask = reference.seed_component(part, seed, g)  # spec §4 step 4
            mask = mask.reshape(-1)
            if t >= 1 and (reference.token_iou(prev[i, :n], mask) > 0.5 or mask.sum() / n <= 0.01):
                mask = np.zeros(n, dtype=bool)  # spec §4 step 5
            prev[i, :n] = mask
            masks[i, t, :n] = mask
            seeds[i, t] = seed
            vecs[i, t, :n] = used
    mask_list = [masks[i, :, : g[0] * g[1]].reshape(n_masks, *g) for i, g in enumerate(grids)]
    vec_list = [vecs[i, :, :n] for i, n in enumerate(lens)]
    return MaskCutResult(
        masks=_stack_or_list(mask_list, batch),
        seeds=_out(torch.from_numpy(seeds), batch, False),
        lambda2=_out(torch.from_numpy(lam2), batch, False),
        lambda3=_out(torch.from_numpy(lam3), batch, False),
        eigenvectors=(_stack_or_list(vec_list, batch) if batch.layout in ("single", "list")
                      else _out(torch.from_numpy(vecs), batch, False)),
    )
