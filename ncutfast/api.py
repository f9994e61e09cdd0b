"""Public API: TokenCut's ncut, TokenCut object discovery and MaskCut, batched, on any backend.

The names and meanings follow ``ncutfast.reference`` (the specification, shared/spec/tokencut.md). Inputs are
torch tensors (any device), NumPy arrays or CuPy arrays; outputs come back in the input's framework and on
its device. A batch is ``(B, N, C)``, a ragged batch a list of ``(N_i, C)`` arrays or a padded
``(B, N_max, C)`` array plus ``lengths``. Features that require grad are read detached: the cut (a threshold
and an eigen-solve) is not differentiable, and no output carries a gradient back to them.

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

import torch

from . import backends, decide, reference
from ._arrays import Batch, as_batch, to_framework
from ._validate import check_choice, check_grid, check_image_size, check_patch, check_positive_int
from .backends import SolveParams

__all__ = ["TIE_RTOL", "PRECISIONS", "NcutResult", "TokenCutResult", "MaskCutResult", "ncut", "tokencut",
           "maskcut"]

#: Relative tie tolerance (times max|x|) of the seed and mean rules (``ncutfast.decide``).
TIE_RTOL = decide.TIE_RTOL
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
    recheck_fraction: torch.Tensor  # (B,) float64, NaN unless precision == "exact" on a binary graph


def _recheck(sp: backends.Spectrum) -> torch.Tensor:
    """The spectrum's recheck fraction, NaN where the precision rechecks nothing."""
    return sp.recheck_fraction if sp.recheck_fraction is not None else torch.full_like(sp.lambda2, float("nan"))


def _spectrum(feats: torch.Tensor, lengths: torch.Tensor, params: SolveParams, backend: str,
              painted: torch.Tensor | None = None) -> tuple[str, backends.Spectrum]:
    name, fn = backends.resolve_backend(backend, feats.device)
    return name, fn(feats, lengths, params, painted=painted)


def _solve(feats: torch.Tensor, lengths: torch.Tensor, params: SolveParams, backend: str) -> _Cut:
    name, sp = _spectrum(feats, lengths, params, backend)
    cut = decide.tokencut_cut(sp.x, lengths.to(sp.x.device))
    return _Cut(sp.lambda2, sp.lambda3, cut.x, sp.x, cut.partition, cut.seed, sp.residual, sp.converged,
                sp.iterations, name, _recheck(sp))


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
        recheck_fraction: float64 ``(B,)``, precision "exact" only (NaN otherwise): the fraction of the graph's
            entries (pairs i <= j) that the screening product left to the float64 recheck (``ncutfast.exact``).
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
    recheck_fraction: Array


def _out(t: torch.Tensor, batch: Batch, per_token: bool) -> Any:
    """Shape one batched tensor like the input, converted once: squeeze single, split lists (views), keep
    padded batches. ``per_token``: the last axis holds tokens (cut at each image's length)."""
    a = to_framework(t, batch.framework, batch.device)
    if batch.layout == "single":
        return a[0, ..., : int(batch.lengths[0])] if per_token else a[0]
    if batch.layout == "list":
        if per_token:
            return [a[i, ..., :n] for i, n in enumerate(batch.lengths.tolist())]
        return [a[i] for i in range(a.shape[0])]
    return a


def _grid_out(t: torch.Tensor, grids: list[tuple[int, int]], batch: Batch) -> Any:
    """Token masks ``(B, ..., N_max)`` as grids, converted once: ``(..., h, w)`` for one image, a list of
    them for list input or differing grids, else ``(B, ..., h, w)``."""
    a = to_framework(t, batch.framework, batch.device)
    if batch.layout == "single":
        h, w = grids[0]
        return a[0, ..., : h * w].reshape(*a.shape[1:-1], h, w)
    if batch.layout == "list" or len(set(grids)) != 1:
        return [a[i, ..., : h * w].reshape(*a.shape[1:-1], h, w) for i, (h, w) in enumerate(grids)]
    h, w = grids[0]
    return a[..., : h * w].reshape(*a.shape[:-1], h, w)


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
        recheck_fraction=_out(cut.recheck_fraction, batch, False),
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
        binary: False gives TokenCut's ``--no-binary-graph`` ablation (similarities kept as weights); it
            needs tau >= 0 (see ``reference.affinity``).
        precision: similarity precision: "float64", "float32" (IEEE fp32, no tf32: TokenCut's arithmetic),
            "fast" (tensor cores where the device has them; threshold decisions within rounding of tau may
            flip) or "exact" (the float64 reference's graph, certified from a low-precision screening
            product with a proven error bound and float64 rechecks near tau: ``ncutfast.exact``).
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
    grid_t = torch.tensor(grids, dtype=torch.int64)
    mask = decide.seed_component(cut.partition, cut.seed, grid_t)  # spec §2 step 8
    box = decide.boxes(mask, grid_t, (patch, patch), torch.tensor(sizes, dtype=torch.int64))  # spec §2 step 9
    return TokenCutResult(
        masks=_grid_out(mask, grids, batch),
        boxes=to_framework(box[0] if batch.layout == "single" else box, batch.framework, batch.device),
        seeds=_out(cut.seed, batch, False),
        ncut=_ncut_result(cut, batch),
    )


@dataclass
class MaskCutResult:
    """MaskCut at token level (spec §4 steps 1-5), in the input's framework and device.

    Attributes:
        masks: bool ``(B, n_masks, h, w)`` (a list of ``(n_masks, h_i, w_i)`` for list input or differing
            grids; ``(n_masks, h, w)`` for one image), **pairwise disjoint**: each step's mask minus the
            masks of the earlier steps (CutLER subtracts its earlier pixel masks the same way). A rejected
            step (<= 1% of tokens, or IoU > 0.5 with the previous step's own mask) is all False, and so is
            a step that found only tokens of earlier masks (the same object again).
        valid: bool ``(B, n_masks)``, the step's mask is non-empty.
        seeds: int64 ``(B, n_masks)``.
        lambda2, lambda3: float64 ``(B, n_masks)``, each step's eigenvalues (Ncut value and gap).
        eigenvectors: float64 ``(B, n_masks, N_max)`` (lists of ``(n_masks, N_i)`` for list input), the
            vector each step's rule saw (canonical orientation, or the solver's sign for "cutler").
        recheck_fraction: float64 ``(B, n_masks)``, each step's ``NcutResult.recheck_fraction``.
    """

    masks: Array | list[Array]
    valid: Array
    seeds: Array
    lambda2: Array
    lambda3: Array
    eigenvectors: Array | list[Array]
    recheck_fraction: Array


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
    component and rejects tiny (<= 1%) or overlapping (IoU > 0.5 with the previous step) masks. The
    returned masks are disjoint: each step's mask minus the earlier steps' masks (``valid`` says which
    steps kept any token), so the same object is never returned twice (``ncutfast.decide.maskcut``). All
    decisions run batched on the features' device.

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
    fractions: list[torch.Tensor] = []

    def step(painted: torch.Tensor | None) -> backends.Spectrum:
        sp = _spectrum(batch.feats, batch.lengths, params, backend, painted)[1]
        fractions.append(_recheck(sp))
        return sp

    res = decide.maskcut(step, batch.lengths.to(batch.feats.device), torch.tensor(grids, dtype=torch.int64),
                         n_masks, sign_rule)
    return MaskCutResult(
        masks=_grid_out(res.masks, grids, batch),
        valid=_out(res.valid, batch, False),
        seeds=_out(res.seeds, batch, False),
        lambda2=_out(res.lambda2, batch, False),
        lambda3=_out(res.lambda3, batch, False),
        eigenvectors=_out(res.x, batch, True),
        recheck_fraction=_out(torch.stack(fractions, dim=1), batch, False),
    )
