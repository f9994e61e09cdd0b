"""The decisions after the eigen-solve, batched in torch on the solve's device.

TokenCut (spec §2 steps 6-9): orientation, partition and seed (``tokencut_cut``), the seed's 4-connected
component (``seed_component``) and its box (``boxes``). MaskCut (spec §4 steps 3-5): one step's side and
seed under the corner rule (``maskcut_side``), the <= 1% / IoU > 0.5 filters (``maskcut_filter``), and the
steps chained into disjoint masks (``maskcut``). ``ncutfast.reference`` holds the same rules one image at a
time in NumPy and SciPy (the specification these functions are tested against); ``ncutfast.api`` calls them.

Everything works on padded batches: ``x`` / masks ``(B, N_max)`` with the tokens of image b row-major over
its grid ``grids[b] = (h_b, w_b)`` in its first ``lengths[b] = h_b * w_b`` entries (ragged grids share a
canvas of the largest sides). No function copies data between devices or loops over images; on a GPU the
connected components read one convergence flag every few rounds (``components_torch``).

Tie rules (``TIE_RTOL``, documented in ``ncutfast.api``): the seed is the lowest index among the entries
within ``TIE_RTOL * max|x|`` of the maximum, and tokens within ``TIE_RTOL * max|x|`` of the mean stay
outside TokenCut's ``x > mean`` side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from scipy import ndimage

__all__ = ["TIE_RTOL", "MaskCutSide", "MaskCutSteps", "TokenCutCut", "boxes", "components", "components_torch",
           "label_numbers", "maskcut", "maskcut_filter", "maskcut_side", "same_component",
           "seed_component", "tie_argmax", "token_components", "tokencut_cut"]

#: Relative tie tolerance (times max|x|): for the seed (ties with max|x|) and for the mean (ties with it).
TIE_RTOL = 1e-6


def _valid(lengths: torch.Tensor, n_max: int) -> torch.Tensor:
    """bool ``(B, n_max)``: the entries that are tokens (not padding)."""
    return torch.arange(n_max, device=lengths.device)[None, :] < lengths[:, None]


def _ragged(grids: torch.Tensor, n_max: int) -> bool:
    """Whether a batch on CPU ``grids`` ``(B, 2)`` holds padding (an image with fewer than n_max tokens)."""
    return bool((grids[:, 0] * grids[:, 1] != n_max).any())


def _first(cand: torch.Tensor) -> torch.Tensor:
    """int64 ``(B,)``: the first True of each row of bool ``(B, N)`` (0 for a row without one)."""
    return cand.max(-1).indices  # torch.max returns the first index of the maximum


def tie_argmax(v: torch.Tensor, valid: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """int64 ``(B,)``: per row, the lowest valid index with ``v >= max(v) - TIE_RTOL * scale``.

    ``v``: float64 ``(B, N)``; ``valid``: bool ``(B, N)``, or None when every entry is valid; ``scale``:
    float64 ``(B,)`` (max|x| of the row).
    """
    vm = v if valid is None else torch.where(valid, v, torch.finfo(v.dtype).min)
    top = vm.amax(-1)
    return _first(vm >= (top - TIE_RTOL * scale)[:, None])  # a padding entry (min) is never a candidate


@dataclass
class TokenCutCut:
    """TokenCut's cut of a batch (spec §2 steps 6-7), on the eigenvectors' device.

    Attributes:
        x: float64 ``(B, N_max)``, oriented so that the seed's entry is positive (0 on padding).
        partition: bool ``(B, N_max)``, the foreground side (False on padding).
        seed: int64 ``(B,)``.
    """

    x: torch.Tensor
    partition: torch.Tensor
    seed: torch.Tensor


def tokencut_cut(x: torch.Tensor, lengths: torch.Tensor) -> TokenCutCut:
    """TokenCut's seed, orientation and partition of each eigenvector (spec §2 steps 6-7, tie rules above).

    Args:
        x: float64 ``(B, N_max)``, any sign, 0 on padding.
        lengths: int64 ``(B,)`` token counts, on ``x``'s device.
    """
    valid = _valid(lengths, x.shape[1])
    ax = x.abs()
    amax = ax.max(-1).values
    seed = tie_argmax(ax, valid, amax)  # spec §2 step 7, lowest index among the tied maxima
    # Orient x so that the seed's entry is positive; the partition is then TokenCut's for that sign, and
    # tokens tied with the mean (|x - mean| <= TIE_RTOL max|x|: exact in theory, decided by rounding
    # otherwise) stay outside it, as x > mean says in exact arithmetic.
    sign = torch.where(x.gather(1, seed[:, None]) < 0, -1.0, 1.0).to(x.dtype)
    xs = x * sign
    mean = xs.sum(-1) / lengths  # spec §2 step 6: unweighted mean over the image's tokens
    part = (xs > (mean + TIE_RTOL * amax)[:, None]) & valid
    flip = ~part.gather(1, seed[:, None])[:, 0]  # only when all entries tie (e.g. N = 1): complement
    part = torch.where(flip[:, None], ~part & valid, part)
    return TokenCutCut(torch.where(flip[:, None], -xs, xs), part, seed)


def _canvas_index(grids: torch.Tensor, n_max: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """Where token j of image b sits on a shared ``(H, W)`` canvas (the largest grid sides): int64
    ``(B, n_max)`` flat canvas positions on ``device``, ``H * W`` (a spare slot) for padding."""
    h_max, w_max = (int(v) for v in grids.max(0).values)
    g = grids.to(device)
    j = torch.arange(n_max, device=device)[None, :]
    w = g[:, 1:2]
    pos = (j // w) * w_max + j % w
    return torch.where(j < g[:, 0:1] * w, pos, h_max * w_max), h_max, w_max


def components(fg: torch.Tensor) -> torch.Tensor:
    """4-connected components of each ``(H, W)`` grid of ``fg``, as ``scipy.ndimage.label`` finds them.

    CPU tensors go to ``scipy.ndimage.label`` itself, once for the whole batch (a 3-D structure with no
    connection between images; it is the fastest there); other devices to ``components_torch``.

    Args:
        fg: bool ``(B, H, W)``.

    Returns:
        int64 ``(B, H, W)``: for a foreground cell, the flat index ``r * W + c`` of the first cell (row-major)
        of its component; -1 for background.
    """
    if fg.device.type != "cpu":
        return components_torch(fg)
    b, h, w = fg.shape
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    labels, count = ndimage.label(fg.numpy(), structure=structure)
    flat = labels.reshape(-1)
    # scipy numbers components in row-major order of their first cell: write each label's first cell.
    first = np.full(count + 1, -1, dtype=np.int64)
    order = np.arange(flat.size - 1, -1, -1)
    first[flat[order]] = order  # the last write of a repeated index wins: the first cell
    base = (np.arange(b, dtype=np.int64) * (h * w))[:, None, None]
    out = np.where(labels > 0, first[labels] - base, -1)
    return torch.from_numpy(out)


def components_torch(fg: torch.Tensor) -> torch.Tensor:
    """``components`` in torch on any device (used for non-CPU tensors; tested on the CPU against SciPy).

    Label propagation with pointer jumping: every cell points to a cell of its component with no larger
    flat index, at first itself (background cells keep pointing at themselves). Each round finds, for every
    foreground cell, the smallest pointer among it and its foreground 4-neighbours and lowers the pointer of
    the cell it points to ("hooks" that tree) to it (a scatter-min), then jumps pointers twice (p := p[p]).
    Pointers only decrease and stay inside their component, so no cycle forms; a round that changes nothing
    leaves every pair of 4-neighbours with one root, the smallest flat index of their component.

    Args:
        fg: bool ``(B, H, W)``.

    Returns:
        int64 ``(B, H, W)``: for a foreground cell, the flat index ``r * W + c`` of the first cell (row-major)
        of its component; -1 for background.
    """
    b, h, w = fg.shape
    hw = h * w
    dtype = torch.int32 if b * hw < 2**31 - 1 else torch.int64  # int32 gathers are about twice as fast
    big = torch.iinfo(dtype).max  # "no neighbour"
    p = torch.arange(b * hw, dtype=dtype, device=fg.device)
    check_every = 1 if fg.device.type == "cpu" else 4  # a convergence check reads one flag from the device
    rounds = 0
    while True:
        old = p
        lab = torch.where(fg, p.view(b, h, w), big)
        m = lab.clone()
        m[:, 1:] = torch.minimum(m[:, 1:], lab[:, :-1])
        m[:, :-1] = torch.minimum(m[:, :-1], lab[:, 1:])
        m[:, :, 1:] = torch.minimum(m[:, :, 1:], lab[:, :, :-1])
        m[:, :, :-1] = torch.minimum(m[:, :, :-1], lab[:, :, 1:])
        p = p.scatter_reduce(0, p.long(), torch.where(fg, m, big).view(-1), reduce="amin")
        for _ in range(2):
            p = p.index_select(0, p)
        rounds += 1
        if rounds % check_every == 0 and torch.equal(p, old):
            break
    base = torch.arange(b, device=fg.device)[:, None, None] * hw
    return torch.where(fg, p.view(b, h, w).to(torch.int64) - base, -1)


def token_components(mask: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """4-connected components of each image's token mask on its grid (``components`` on a shared canvas).

    Args:
        mask: bool ``(B, N_max)``, False on padding.
        grids: int64 CPU ``(B, 2)``, (h, w) per image, ``h * w`` its token count.

    Returns:
        int64 ``(B, N_max)`` on ``mask``'s device: the token index of the first token (row-major) of the
        token's component; -1 for tokens outside the mask, -2 for padding.
    """
    bsz, n_max = mask.shape
    h, w = (int(v) for v in grids[0])
    if n_max == h * w and bool((grids == grids[0]).all()):  # one grid for the whole batch: no canvas
        return components(mask.view(bsz, h, w)).view(bsz, n_max)
    pos, h, w = _canvas_index(grids, n_max, mask.device)
    canvas = torch.zeros(bsz, h * w + 1, dtype=torch.bool, device=mask.device)
    canvas.scatter_(1, pos, mask)
    lab = components(canvas[:, :-1].view(bsz, h, w)).view(bsz, -1)
    lab = torch.cat([lab, lab.new_full((bsz, 1), -2)], 1).gather(1, pos)
    gw = grids[:, 1:2].to(mask.device)
    return torch.where(lab >= 0, lab // w * gw + lab % w, lab)  # canvas index -> the image's token index


def label_numbers(labels: torch.Tensor) -> torch.Tensor:
    """``token_components``' labels numbered as ``scipy.ndimage.label`` numbers them: 1, 2, ... in the
    row-major order of each component's first token, 0 outside the mask and on padding.

    ``labels``: int64 ``(B, N_max)``. Returns int32 ``(B, N_max)``.
    """
    j = torch.arange(labels.shape[1], device=labels.device)
    rank = (labels == j).cumsum(-1)
    return torch.where(labels >= 0, rank.gather(1, labels.clamp_min(0)), 0).to(torch.int32)


def seed_component(mask: torch.Tensor, seed: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """The seed's 4-connected component of each image's token mask (spec §2 step 8 / §4 step 4).

    As ``reference.seed_component`` (``scipy.ndimage.label``'s background label 0): a seed outside the mask
    selects every token outside it.

    Args:
        mask: bool ``(B, N_max)``, False on padding.
        seed: int64 ``(B,)``, on ``mask``'s device.
        grids: int64 CPU ``(B, 2)``, (h, w) per image, ``h * w`` its token count.

    Returns:
        bool ``(B, N_max)``, False on padding.
    """
    return same_component(token_components(mask, grids), seed)


def same_component(labels: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """bool ``(B, N_max)``: the tokens labelled as ``seed`` (``token_components``' labels; a seed outside the
    mask selects every token outside it, padding never)."""
    own = labels.gather(1, seed[:, None])
    return labels == torch.where(own == -2, -3, own)  # a seed in padding: -3, no token's label


def boxes(mask: torch.Tensor, grids: torch.Tensor, patch: tuple[int, int], image_sizes: torch.Tensor) -> torch.Tensor:
    """Pixel boxes of token masks (spec §2 step 9, ``reference.box_from_mask``).

    Args:
        mask: bool ``(B, N_max)``, non-empty per image, row-major over ``grids``.
        grids: int64 CPU ``(B, 2)`` (h, w).
        patch: (rows, cols) of a patch in pixels.
        image_sizes: int64 CPU ``(B, 2)`` (H, W) to clip to.

    Returns:
        int64 ``(B, 4)`` on ``mask``'s device: (x1, y1, x2, y2), the token box's min and max + 1 times the
        patch size, x2 <= W, y2 <= H.
    """
    image_sizes = image_sizes.to(mask.device)
    j = torch.arange(mask.shape[1], device=mask.device)[None, :]
    w = grids[:, 1:2].to(mask.device)
    rows, cols = j // w, j % w
    hi, lo = torch.iinfo(torch.int64).max, -1
    r0 = torch.where(mask, rows, hi).amin(-1)
    c0 = torch.where(mask, cols, hi).amin(-1)
    r1 = torch.where(mask, rows, lo).amax(-1) + 1
    c1 = torch.where(mask, cols, lo).amax(-1) + 1
    pr, pc = patch
    x2 = torch.minimum(pc * c1, image_sizes[:, 1])
    y2 = torch.minimum(pr * r1, image_sizes[:, 0])
    return torch.stack([pc * c0, pr * r0, x2, y2], dim=-1)


@dataclass
class MaskCutSide:
    """One MaskCut step's decision (spec §4 step 3) for a batch.

    Attributes:
        partition: bool ``(B, N_max)``, the foreground side (False on padding).
        seed: int64 ``(B,)``.
        x: float64 ``(B, N_max)``, the vector the rule saw (canonical orientation, or as given for
            "cutler"), before any reversal.
    """

    partition: torch.Tensor
    seed: torch.Tensor
    x: torch.Tensor


def maskcut_side(x: torch.Tensor, lengths: torch.Tensor, grids: torch.Tensor, sign_rule: str) -> MaskCutSide:
    """MaskCut's foreground side and seed (spec §4 step 3; ``reference.maskcut_decision`` with the tie
    rules above): P = {x > mean}; reverse when P holds >= 3 of the 4 corner tokens, else when the
    largest-|x| token is outside P; the seed is the signed argmax of x on the chosen side.

    Args:
        x: float64 ``(B, N_max)``, the solver's eigenvectors (0 on padding).
        lengths: int64 ``(B,)`` on ``x``'s device; grids: int64 CPU ``(B, 2)`` (h, w), h * w = lengths.
        sign_rule: "canonical" (orient x so that its largest-|x| entry is positive first) or "cutler".
    """
    valid = _valid(lengths, x.shape[1]) if _ragged(grids, x.shape[1]) else None  # None: no padding
    ax = x.abs()
    scale = ax.amax(-1)
    # The largest |x|: its maximum is scale, and padding (x = 0) never precedes a valid candidate.
    s = _first(ax >= (scale - TIE_RTOL * scale)[:, None])
    del ax
    if sign_rule == "canonical":
        x = x * torch.where(x.gather(1, s[:, None]) < 0, -1.0, 1.0).to(x.dtype)
    mean = x.sum(-1) / lengths.to(x.dtype)
    part = x > (mean + TIE_RTOL * scale)[:, None]
    if valid is not None:
        part &= valid
    h, w = grids[:, 0], grids[:, 1]
    corners = torch.stack([torch.zeros_like(w), w - 1, (h - 1) * w, h * w - 1], dim=-1).to(x.device)
    nc = part.gather(1, corners).sum(-1)
    reverse = (nc >= 3) | ~part.gather(1, s[:, None])[:, 0]
    # The seed: the signed argmax on the chosen side, i.e. of -x where reversed (negation is exact).
    seed = tie_argmax(x * torch.where(reverse, -1.0, 1.0).to(x.dtype)[:, None], valid, scale)
    part ^= reverse[:, None]
    if valid is not None:
        part &= valid
    return MaskCutSide(part, seed, x)


def maskcut_filter(mask: torch.Tensor, prev: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Spec §4 step 5 for steps t >= 1: all-False where the mask holds <= 1% of the tokens or its IoU with
    the previous step's mask exceeds 0.5 (``reference.token_iou``: no overlap when both are empty).

    ``mask``, ``prev``: bool ``(B, N_max)``; ``lengths``: int64 ``(B,)``. Returns bool ``(B, N_max)``.
    """
    size = mask.sum(-1)
    inter = (mask & prev).sum(-1)
    union = size + prev.sum(-1) - inter
    overlap = (union > 0) & (inter.to(torch.float64) / union.clamp_min(1).to(torch.float64) > 0.5)
    tiny = size.to(torch.float64) / lengths.to(torch.float64) <= 0.01
    return mask.masked_fill((overlap | tiny)[:, None], False)


class _Eigen(Protocol):
    lambda2: torch.Tensor
    lambda3: torch.Tensor
    x: torch.Tensor


@dataclass
class MaskCutSteps:
    """MaskCut's steps for a batch (spec §4), token level, on the features' device.

    Attributes:
        masks: bool ``(B, T, N_max)``, pairwise disjoint along T (each step's mask minus the earlier ones);
            False on padding.
        valid: bool ``(B, T)``, the step's mask is non-empty.
        seeds: int64 ``(B, T)``.
        lambda2, lambda3: float64 ``(B, T)``.
        x: float64 ``(B, T, N_max)``, the vector each step's rule saw (``MaskCutSide.x``).
    """

    masks: torch.Tensor
    valid: torch.Tensor
    seeds: torch.Tensor
    lambda2: torch.Tensor
    lambda3: torch.Tensor
    x: torch.Tensor


def maskcut(solve: Callable[[torch.Tensor | None], _Eigen], lengths: torch.Tensor, grids: torch.Tensor,
            n_masks: int, sign_rule: str) -> MaskCutSteps:
    """CutLER's MaskCut steps at token level (spec §4, ``reference.maskcut``) for a padded batch, then the
    masks made disjoint.

    Each step zeroes the keys of the tokens its predecessors cut (the zeroing accumulates): it solves every
    image in one call of ``solve`` (the painted tokens, bool ``(B, N_max)`` or None for none, -> an object
    with ``lambda2``, ``lambda3`` ``(B,)`` and ``x`` ``(B, N_max)``, as ``backends.Spectrum``; the backends
    solve painted rows as zero rows, ``backends.contract``), chooses the side with the corner rule
    (``maskcut_side``), keeps the seed's component and, from the second step on, rejects tiny or overlapping
    masks (``maskcut_filter``, against the previous step's mask). The steps themselves see CutLER's masks;
    the returned masks are those minus the earlier steps' masks (CutLER subtracts earlier pixel masks, spec §4
    step 6; here at token level), so no token belongs to two masks and a step that found only tokens of
    earlier masks comes back empty and not ``valid``.

    Args:
        lengths: int64 ``(B,)`` on the features' device; grids: int64 CPU ``(B, 2)``; sign_rule: as
            ``maskcut_side``.
    """
    masks, seeds, lam2, lam3, vecs = [], [], [], [], []
    painting = prev = None
    for t in range(n_masks):
        sp = solve(painting)  # spec §4 step 1: the earlier steps' masks painted (None at the first step)
        side = maskcut_side(sp.x, lengths, grids, sign_rule)  # spec §4 steps 2-3
        mask = seed_component(side.partition, side.seed, grids)  # spec §4 step 4
        if prev is not None:
            mask = maskcut_filter(mask, prev, lengths)  # spec §4 step 5
        # spec §4 step 6 at token level: the painting is the union of the earlier steps' masks
        masks.append(mask if painting is None else mask & ~painting)
        if t + 1 < n_masks:
            painting = mask if painting is None else painting | mask
        prev = mask
        seeds.append(side.seed)
        vecs.append(side.x)
        lam2.append(sp.lambda2)
        lam3.append(sp.lambda3)
    out = torch.stack(masks, 1)
    return MaskCutSteps(out, out.any(-1), torch.stack(seeds, 1), torch.stack(lam2, 1), torch.stack(lam3, 1),
                        torch.stack(vecs, 1))
