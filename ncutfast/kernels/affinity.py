"""Fused cosine affinity -> threshold -> bitmask + degree counts, batched over ragged images.

For each image b with n = lengths[b] tokens the graph of TokenCut is W = eps 11^T + (1 - eps) B with
B_ij = [f_i . f_j > tau] (strict) and f the L2-normalized rows of the features. These kernels build B as
a bitmask and its row popcounts without ever writing an N x N float matrix:

1. ``_normalize_kernel`` writes the normalized rows once (fp32; fp64 for "float64"; fp16 for "fast", so the
   tiles of step 2 are loaded at half the bytes and feed tensor cores directly).
2. ``_affinity_kernel`` computes one square tile of the similarity per program with ``tl.dot``,
   thresholds it, packs it into 32-bit words and adds its per-row popcounts into the degree counts.
   Similarity is symmetric, so only tiles on or above the diagonal are computed; each is also written
   transposed. This halves the FLOPs and makes the bitmask exactly symmetric (the mat-vec of the Lanczos
   solver relies on a symmetric operator), which an independent computation of both triangles does not
   guarantee under floating-point rounding.

Precisions "exact" and "float32" (certified, the default launch setting) instead screen the tiles with
``_affinity_exact_kernel`` (fp16 tensor cores, a proven error bound, ``ncutfast.exact``), which sets the
bits it can decide and lists the pairs within the bound of tau; ``_recheck_kernel`` then decides those in
float64 ("exact") or as float32 dots in one fixed order ("float32").

Bitmask layout (shared with csrc/): int32 ``(B, N_max, W)`` with ``W = 2 * ceil(N_max / 64)``; column j of
row i is bit ``j % 32`` (LSB first) of word ``j // 32``; bits of columns >= lengths[b] and rows >=
lengths[b] are 0. Viewed as int64 (little-endian) it is the C++ helper's uint64 layout ``(B, N_max,
ceil(N_max / 64))``, column j = bit ``j % 64`` of word ``j // 64`` (tests/test_triton_affinity.py checks).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from ..exact import dot_bound, float32_screen_bound, recheck, tensor_core_bound
from ._utils import block_sizes, popc32, words_per_row

__all__ = ["normalize_fwd", "exact_normalize_fwd", "affinity_fwd", "affinity_exact_fwd"]

# precision -> (dtype of the normalized rows, tl.dot input_precision).
# "float32" uses IEEE fp32 products (no tf32) so threshold decisions match float64 except within fp32
# rounding of tau; "fast" uses fp16 inputs with fp32 accumulation on tensor cores (input_precision only
# applies to fp32 operands, so "tf32" there is a no-op).
_PRECISIONS = {
    "float64": (torch.float64, "ieee"),
    "float32": (torch.float32, "ieee"),
    "fast": (torch.float16, "tf32"),
}


@triton.jit
def _pow2(k, WIDE: tl.constexpr):
    """2.0 ** k in WIDE (fp32 or fp64) for integers k in its normal exponent range, built from its bits."""
    if WIDE == tl.float64:
        p = ((k.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)
    else:
        p = ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return p


@triton.jit
def _normalize_kernel(
    x_ptr, out_ptr, half_ptr, len_ptr,
    N_max, C,
    stride_xb, stride_xn, stride_xc,
    BR: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr, HALF: tl.constexpr,
):
    """One program normalizes BR rows of one image: out = x / max(||x||_2, 1e-12), computed in fp32
    (fp64 when the output is fp64) and stored in out's dtype. Rows at or beyond lengths[b] are padding
    that may hold anything, so they are read as zeros (masked loads) and stored as zeros.

    Huge finite rows must not overflow when squared (fp32 beyond ~1e19) or converted (fp64 input beyond
    fp32's range): each row is scaled by the power of two 2^-e that brings its largest |x| into [0.5, 1),
    in WIDE (fp64 for fp64 input, else ACC), which is exact, so rows of normal numbers give the unscaled
    formula's bits (as torch's ``normalized_features`` and the reference do). The clamp compares the
    unscaled norm ||x 2^-e|| 2^e with 1e-12, and a row below it becomes x / 1e-12. With HALF, the rows are
    also stored rounded to fp16 at ``half_ptr`` (the certified float32 path's screen input)."""
    b = tl.program_id(1)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    n = tl.load(len_ptr + b).to(tl.int32)
    row_ok = rows < n  # padding rows and rows past N_max (last block)
    x_row = x_ptr + b.to(tl.int64) * stride_xb + rows[:, None].to(tl.int64) * stride_xn
    amax = tl.zeros((BR,), dtype=WIDE)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        x = tl.load(x_row + cols[None, :] * stride_xc, mask=row_ok[:, None] & (cols[None, :] < C), other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(WIDE)), axis=1))
    # e = frexp(amax)'s exponent from the biased exponent field, clamped so that 2^e and 2^-e are normal
    # in WIDE and 1e-12 2^-e is finite in fp32 (rows below 2^-126 are scaled less; they fall under the
    # clamp anyway).
    if WIDE == tl.float64:
        e = ((amax.to(tl.int64, bitcast=True) >> 52) & 0x7FF).to(tl.int32) - 1022
        e = tl.minimum(tl.maximum(e, -125), 1021)
    else:
        e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
        e = tl.minimum(tl.maximum(e, -125), 125)
    scale = _pow2(-e, WIDE)
    sq = tl.zeros((BR,), dtype=ACC)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        x = tl.load(x_row + cols[None, :] * stride_xc, mask=row_ok[:, None] & (cols[None, :] < C), other=0.0)
        g = (x.to(WIDE) * scale[:, None]).to(ACC)
        sq += tl.sum(g * g, axis=1)
    # IEEE sqrt and division as in the NumPy reference: in fp32, tl.sqrt and "/" are approximate on the GPU
    # and the _rn forms (fp32 only) are exact-rounded; fp64 sqrt and "/" are IEEE already.
    if ACC == tl.float64:
        norm = tl.sqrt(sq)
    else:
        norm = tl.sqrt_rn(sq)
    clamp = tl.full((BR,), 1e-12, ACC)
    tiny = norm.to(WIDE) * _pow2(e, WIDE) < clamp.to(WIDE)  # the unscaled norm (inf if it overflows)
    # Tiny rows: (x 2^-e) / (1e-12 2^-e) = x / 1e-12, the same power of two scaling both operands.
    div = tl.where(tiny, (clamp.to(WIDE) * scale).to(ACC), norm)
    out_off = (b * N_max + rows[:, None].to(tl.int64)) * C
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        col_ok = cols[None, :] < C  # last feature chunk
        x = tl.load(x_row + cols[None, :] * stride_xc, mask=row_ok[:, None] & col_ok, other=0.0)
        g = (x.to(WIDE) * scale[:, None]).to(ACC)
        if ACC == tl.float64:
            y = g / div[:, None]
        else:
            y = tl.div_rn(g, div[:, None])
        tl.store(out_ptr + out_off + cols[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < N_max) & col_ok)
        if HALF:
            tl.store(half_ptr + out_off + cols[None, :], y.to(tl.float16), mask=(rows[:, None] < N_max) & col_ok)


@triton.jit
def _sq(x_row, row_ok, stride_xc, q, BR: tl.constexpr, NQ: tl.constexpr):
    """Squares in fp64 of the features q .. q + NQ - 1 of BR rows: (BR, NQ)."""
    x = tl.load(x_row + (q + tl.arange(0, NQ))[None, :] * stride_xc, mask=row_ok[:, None], other=0.0)
    x = x.to(tl.float64)
    return x * x


@triton.jit
def _pairwise_sq(x_row, row_ok, stride_xc, START: tl.constexpr, N: tl.constexpr, BR: tl.constexpr):
    """Sum of the squares of features START .. START + N - 1 of BR rows in NumPy's pairwise order
    (``exact._pairwise_sum``: blocks of at most 128 summed by 8 partial sums, halves combined), unrolled at
    compile time for this N."""
    if N < 8:
        res = tl.zeros((BR,), dtype=tl.float64)
        for i in tl.static_range(N):
            res = res + tl.reshape(_sq(x_row, row_ok, stride_xc, START + i, BR, 1), (BR,))
    elif N <= 128:
        r = _sq(x_row, row_ok, stride_xc, START, BR, 8)
        for i in tl.static_range(8, N - N % 8, 8):
            r = r + _sq(x_row, row_ok, stride_xc, START + i, BR, 8)
        a, b = tl.split(tl.reshape(r, (BR, 4, 2)))  # (r0, r2, r4, r6), (r1, r3, r5, r7)
        a, b = tl.split(tl.reshape(a + b, (BR, 2, 2)))  # (r0 + r1, r4 + r5), (r2 + r3, r6 + r7)
        a, b = tl.split(a + b)
        res = a + b
        for i in tl.static_range(N - N % 8, N):
            res = res + tl.reshape(_sq(x_row, row_ok, stride_xc, START + i, BR, 1), (BR,))
    else:
        H: tl.constexpr = N // 2 - (N // 2) % 8
        res = (_pairwise_sq(x_row, row_ok, stride_xc, START, H, BR)
               + _pairwise_sq(x_row, row_ok, stride_xc, START + H, N - H, BR))
    return res


@triton.jit
def _exact_normalize_kernel(
    x_ptr, f_ptr, h_ptr, len_ptr,
    N_max,
    stride_xb, stride_xn, stride_xc,
    C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):
    """Precision "exact": ``exact.normalized_rows`` bit for bit in one pass over the features: the float64
    squares summed in NumPy's pairwise order (``_pairwise_sq``), IEEE sqrt, the clamp max(norm, 1e-12) and
    the IEEE float64 division; writes those rows (``f``, for the recheck) and their fp16 copy (``h``,
    rounded through fp32 as torch rounds, for the screen). Rows at or beyond lengths[b] are zeros."""
    b = tl.program_id(1)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    n = tl.load(len_ptr + b).to(tl.int32)
    row_ok = rows < n
    x_row = x_ptr + b.to(tl.int64) * stride_xb + rows[:, None].to(tl.int64) * stride_xn
    # the clamp as an fp64 constant (a bare 1e-12 would be rounded to fp32 first)
    norm = tl.maximum(tl.sqrt(_pairwise_sq(x_row, row_ok, stride_xc, 0, C, BR)), tl.full((BR,), 1e-12, tl.float64))
    out = (b * N_max + rows[:, None].to(tl.int64)) * C
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        col_ok = cols[None, :] < C
        x = tl.load(x_row + cols[None, :] * stride_xc, mask=row_ok[:, None] & col_ok, other=0.0)
        f = x.to(tl.float64) / norm[:, None]
        keep = (rows[:, None] < N_max) & col_ok
        tl.store(f_ptr + out + cols[None, :], f, mask=keep)
        tl.store(h_ptr + out + cols[None, :], f.to(tl.float32).to(tl.float16), mask=keep)


@triton.jit
def _tile_dot(f_ptr, b, rows, cols, N_max, C, BT: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """S = F[rows] F[cols]^T of image b over C in BK chunks (BT x BT, accumulated in ACC)."""
    k = tl.arange(0, BK)
    base = f_ptr + b.to(tl.int64) * N_max * C
    a_ptrs = base + rows[:, None].to(tl.int64) * C + k[None, :]
    b_ptrs = base + cols[:, None].to(tl.int64) * C + k[None, :]
    acc = tl.zeros((BT, BT), dtype=ACC)
    for c0 in range(0, C, BK):
        # rows/cols past N_max (last tile) and features past C (last chunk) are outside the buffer
        k_ok = (c0 + k[None, :]) < C
        a = tl.load(a_ptrs, mask=(rows[:, None] < N_max) & k_ok, other=0.0)
        bt = tl.load(b_ptrs, mask=(cols[:, None] < N_max) & k_ok, other=0.0)
        acc = tl.dot(a, tl.trans(bt), acc, input_precision=DOT_PRECISION, out_dtype=ACC)
        a_ptrs += BK
        b_ptrs += BK
    return acc


@triton.jit
def _pack_words(bit, BT: tl.constexpr):
    """int32 ``(BT, BT // 32)``: the bits of a BT x BT boolean tile, column j = bit j % 32 of word j // 32."""
    sh = tl.arange(0, 32)
    return tl.sum(tl.reshape(bit.to(tl.int32), (BT, BT // 32, 32)) << sh[None, None, :], axis=2)


@triton.jit
def _store_tile(bit, b, bi, bj, rows, cols, n, mask_ptr, count_ptr, N_max, W, BT: tl.constexpr):
    """Pack one BT x BT tile of bits (already mirrored on the diagonal) into words at (rows of bi, words of
    bj) and, off the diagonal, the transposed bits at (rows of bj, words of bi); add the popcounts of the
    written rows to the degree counts (integer atomics, so the result does not depend on their order)."""
    w_idx = tl.arange(0, BT // 32)
    words = _pack_words(bit, BT)
    mrow = mask_ptr + b.to(tl.int64) * N_max * W
    # word columns past W only ever hold zero bits (columns >= n); rows >= n are all-zero too and the
    # buffer starts zeroed, so neither is written
    tl.store(mrow + rows[:, None].to(tl.int64) * W + bj * (BT // 32) + w_idx[None, :], words,
             mask=(rows[:, None] < n) & (bj * (BT // 32) + w_idx[None, :] < W))
    cnt = tl.sum(popc32(words), axis=1).to(tl.int32)
    tl.atomic_add(count_ptr + b * N_max + rows, cnt, mask=rows < n)
    if bi != bj:
        words_t = _pack_words(tl.trans(bit), BT)
        tl.store(mrow + cols[:, None].to(tl.int64) * W + bi * (BT // 32) + w_idx[None, :], words_t,
                 mask=(cols[:, None] < n) & (bi * (BT // 32) + w_idx[None, :] < W))
        cnt_t = tl.sum(popc32(words_t), axis=1).to(tl.int32)
        tl.atomic_add(count_ptr + b * N_max + cols, cnt_t, mask=cols < n)


@triton.jit
def _affinity_kernel(
    f_ptr, pairs_ptr, len_ptr, tau_ptr, mask_ptr, count_ptr,
    N_max, C, W,
    BT: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program owns the tile pair (bi, bj), bi <= bj, of image b = program_id(1).

    It computes S = F[bi] F[bj]^T over C in BK chunks, thresholds S > tau, packs the BT x BT bits into
    words at (rows of bi, words of bj) and, off the diagonal, the transposed bits at (rows of bj, words of
    bi); the popcounts of the written rows are atomically added to the degree counts (integer atomics, so
    the result does not depend on their order). Tiles entirely past n return at once: ragged images share
    the launch and cost only the programs they need."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    bi = tl.load(pairs_ptr + 2 * pid)
    bj = tl.load(pairs_ptr + 2 * pid + 1)
    n = tl.load(len_ptr + b).to(tl.int32)
    if bj * BT < n:
        r = tl.arange(0, BT)
        rows = bi * BT + r
        cols = bj * BT + r
        acc = _tile_dot(f_ptr, b, rows, cols, N_max, C, BT, BK, ACC, DOT_PRECISION)
        # tau is read as fp64 and the comparison is done in fp64: the similarity as computed is compared
        # with the exact tau (a Python float argument would be rounded to fp32 first).
        tau = tl.load(tau_ptr)
        # Padding tokens (index >= n) are not graph nodes: their bits must be 0 whatever the similarity
        # (with tau < 0 the zero rows of padding would otherwise pass the threshold).
        bit = (acc.to(tl.float64) > tau) & (rows[:, None] < n) & (cols[None, :] < n)
        if bi == bj:
            # One dot does not guarantee S_ij == S_ji bitwise: mirror the upper triangle.
            bit = tl.where(r[:, None] <= r[None, :], bit, tl.trans(bit))
        _store_tile(bit, b, bi, bj, rows, cols, n, mask_ptr, count_ptr, N_max, W, BT)


@triton.jit
def _affinity_exact_kernel(
    f_ptr, pairs_ptr, len_ptr, thr_ptr, mask_ptr, count_ptr, cand_ptr,
    N_max, C, W,
    BT: tl.constexpr, BK: tl.constexpr,
):
    """Precisions "exact" and "float32": ``_affinity_kernel`` on fp16 rows (tensor cores, fp32 accumulation)
    whose similarity is only a screen. thr = fp32 (lo, hi) with lo <= tau - bound and hi >= tau + bound
    (rounded outward on the host, so the fp32 tile is compared without converting it to fp64): entries with
    S > hi are edges, S < lo are not, and the others (pairs i <= j) are the candidates, left 0 in the mask
    and set in ``cand`` (a second bitmask of the mask's layout, zeroed by the caller: only its nonzero words
    are written) for ``_recheck_kernel``."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    bi = tl.load(pairs_ptr + 2 * pid)
    bj = tl.load(pairs_ptr + 2 * pid + 1)
    n = tl.load(len_ptr + b).to(tl.int32)
    if bj * BT < n:
        r = tl.arange(0, BT)
        rows = bi * BT + r
        cols = bj * BT + r
        acc = _tile_dot(f_ptr, b, rows, cols, N_max, C, BT, BK, tl.float32, "tf32")
        lo = tl.load(thr_ptr)
        hi = tl.load(thr_ptr + 1)
        valid = (rows[:, None] < n) & (cols[None, :] < n)
        bit = (acc > hi) & valid
        # the upper triangle decides (i <= j); the diagonal tile mirrors it
        unsure = (acc <= hi) & (acc >= lo) & valid & (rows[:, None] <= cols[None, :])
        if bi == bj:
            bit = tl.where(r[:, None] <= r[None, :], bit, tl.trans(bit))
        _store_tile(bit, b, bi, bj, rows, cols, n, mask_ptr, count_ptr, N_max, W, BT)
        words = _pack_words(unsure, BT)
        w_idx = bj * (BT // 32) + tl.arange(0, BT // 32)
        tl.store(cand_ptr + (b * N_max + rows[:, None]).to(tl.int64) * W + w_idx[None, :], words,
                 mask=(words != 0) & (rows[:, None] < n) & (w_idx[None, :] < W))


@triton.jit
def _columns4(x):
    """The four columns of a (BLOCK, 4) tensor, in order."""
    even, odd = tl.split(tl.reshape(x, (x.shape[0], 2, 2)))  # columns (0, 2) and (1, 3)
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


@triton.jit
def _recheck_kernel(
    rows_ptr, cand_ptr, thr_ptr, mask_ptr, count_ptr, undecided_ptr,
    N_max, C, W, total,
    BLOCK: tl.constexpr, BC: tl.constexpr, EXACT: tl.constexpr,
):
    """Decide BLOCK of the screen's candidates (linear indices (b * N_max + i) * N_max + j, i <= j, slots
    below ``total``) from the rows (``(B, N_max, C)``) and set their bits (i, j) and (j, i) and counts with
    integer atomics (the screen left those bits 0, so or-ing and adding commute).

    EXACT (precision "exact", float64 rows): a float64 dot in any order, blocked by BC; |dot - tau| >
    thr[1] (``exact.dot_bound``) decides, the others are flagged in ``undecided`` (int8) for Dot2 on the
    host. Otherwise (precision "float32", float32 rows): the float32 dot in one fixed order, products
    rounded to float32 and added sequentially over the features (the launch disables FMA contraction),
    compared with tau in float64 as ``_affinity_kernel`` compares."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < total
    # slots past the list (last program) recompute the last candidate, so no row load needs a mask
    lin = tl.load(cand_ptr + tl.minimum(idx, total - 1))
    nn = N_max.to(tl.int64) * N_max
    img = lin // nn
    rest = lin - img * nn
    i = rest // N_max
    j = rest - i * N_max
    row_i = img * N_max + i
    row_j = img * N_max + j
    a_ptr = rows_ptr + row_i * C
    b_ptr = rows_ptr + row_j * C
    tau = tl.load(thr_ptr)
    if EXACT:
        k = tl.arange(0, BC)
        acc = tl.zeros((BLOCK, BC), dtype=tl.float64)
        for c0 in range(0, C, BC):
            m = (c0 + k[None, :]) < C
            x = tl.load(a_ptr[:, None] + c0 + k[None, :], mask=m, other=0.0)
            y = tl.load(b_ptr[:, None] + c0 + k[None, :], mask=m, other=0.0)
            acc += x * y
        d = tl.sum(acc, axis=1) - tau
        bound = tl.load(thr_ptr + 1)
        edge = ok & (d > bound)
        tl.store(undecided_ptr + idx, (tl.abs(d) <= bound).to(tl.int8), mask=ok)
    else:
        # four features per load (one 16-byte access per row), split into columns and added in order
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        r4 = tl.arange(0, 4)
        c4 = C - C % 4
        for q in range(0, c4, 4):
            x0, x1, x2, x3 = _columns4(tl.load(a_ptr[:, None] + q + r4[None, :]))
            y0, y1, y2, y3 = _columns4(tl.load(b_ptr[:, None] + q + r4[None, :]))
            acc = acc + x0 * y0
            acc = acc + x1 * y1
            acc = acc + x2 * y2
            acc = acc + x3 * y3
        for q in range(c4, C):
            acc = acc + tl.load(a_ptr + q) * tl.load(b_ptr + q)
        edge = ok & (acc.to(tl.float64) > tau)
    one = tl.full((BLOCK,), 1, tl.int32)
    tl.atomic_or(mask_ptr + row_i * W + j // 32, one << (j % 32).to(tl.int32), mask=edge)
    tl.atomic_add(count_ptr + row_i, one, mask=edge)
    off = edge & (i != j)
    tl.atomic_or(mask_ptr + row_j * W + i // 32, one << (i % 32).to(tl.int32), mask=off)
    tl.atomic_add(count_ptr + row_j, one, mask=off)


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Accumulation dtype of the kernels for rows stored as ``dtype``: fp64 for fp64, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=64)
def _tile_pairs(n_tiles: int, device: torch.device) -> torch.Tensor:
    """int32 ``(P, 2)`` list of the tile pairs (bi, bj) with bi <= bj, P = T (T + 1) / 2; row-major over bi
    so consecutive programs share the row tile bi (L2 reuse)."""
    ii, jj = torch.triu_indices(n_tiles, n_tiles)
    return torch.stack([ii, jj], dim=1).to(device=device, dtype=torch.int32).contiguous()


def _check_batch(feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Validate ``feats (B, N_max, C)`` and ``lengths (B,)``; return lengths as int32 on feats' device."""
    if feats.dim() != 3:
        raise ValueError(f"feats: expected a (B, N_max, C) tensor, got shape {tuple(feats.shape)}")
    if not feats.is_floating_point():
        raise TypeError(f"feats: expected a floating-point tensor, got {feats.dtype}")
    B, N_max, _ = feats.shape
    if lengths.shape != (B,):
        raise ValueError(f"lengths: expected shape ({B},), got {tuple(lengths.shape)}")
    if B and (int(lengths.min()) < 1 or int(lengths.max()) > N_max):
        raise ValueError(f"lengths: expected values in [1, {N_max}]")
    return lengths.to(device=feats.device, dtype=torch.int32).contiguous()


def normalize_fwd(feats: torch.Tensor, lengths: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """L2-normalize the rows of a padded batch.

    Args:
        feats: ``(B, N_max, C)`` floating point (any strides); rows >= lengths[b] are ignored.
        lengths: ``(B,)`` integer, ``1 <= lengths[b] <= N_max``.
        out_dtype: torch.float16, float32 or float64.

    Returns:
        ``(B, N_max, C)`` contiguous ``out_dtype``: ``x / max(||x||_2, 1e-12)`` per row, computed in fp32
        (fp64 for fp64 output); padding rows are zero.
    """
    lens = _check_batch(feats, lengths)
    if out_dtype not in (torch.float16, torch.float32, torch.float64):
        raise TypeError(f"out_dtype: expected float16, float32 or float64, got {out_dtype}")
    return _normalize(feats, lens, out_dtype, half=False)[0]


def _normalize(feats: torch.Tensor, lens: torch.Tensor, out_dtype: torch.dtype, half: bool,
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``normalize_fwd`` on checked arguments; with ``half``, also the rows rounded to fp16 (same launch)."""
    B, N_max, C = feats.shape
    out = torch.empty((B, N_max, C), dtype=out_dtype, device=feats.device)
    h = torch.empty((B, N_max, C), dtype=torch.float16, device=feats.device) if half else None
    cfg = block_sizes("normalize")
    grid = (triton.cdiv(N_max, cfg["BR"]), B)
    acc = _acc_dtype(out_dtype)
    _normalize_kernel[grid](
        feats, out, out if h is None else h, lens, N_max, C, feats.stride(0), feats.stride(1), feats.stride(2),
        BR=cfg["BR"], BC=cfg["BC"], ACC=acc, WIDE=tl.float64 if feats.dtype == torch.float64 else acc, HALF=half,
        num_warps=cfg["num_warps"],
    )
    return out, h


def exact_normalize_fwd(feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision "exact"'s rows: ``exact.normalized_rows`` bit for bit, and their fp16 copy, in one kernel.

    Args:
        feats: ``(B, N_max, C)`` floating point (any strides), finite within the lengths.
        lengths: ``(B,)`` integer, ``1 <= lengths[b] <= N_max``.

    Returns:
        ``(f, h)``: float64 and float16 ``(B, N_max, C)``, contiguous; padding rows are zero.
    """
    lens = _check_batch(feats, lengths)
    B, N_max, C = feats.shape
    f = torch.empty((B, N_max, C), dtype=torch.float64, device=feats.device)
    h = torch.empty((B, N_max, C), dtype=torch.float16, device=feats.device)
    cfg = block_sizes("normalize_exact")
    _exact_normalize_kernel[(triton.cdiv(N_max, cfg["BR"]), B)](
        feats, f, h, lens, N_max, feats.stride(0), feats.stride(1), feats.stride(2),
        C=C, BR=cfg["BR"], BC=cfg["BC"], num_warps=cfg["num_warps"],
    )
    return f, h


def affinity_fwd(
    feats: torch.Tensor, lengths: torch.Tensor, *, tau: float, precision: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bitmask of the thresholded cosine affinity and its row popcounts, for a padded batch.

    Args:
        feats: ``(B, N_max, C)`` floating point, rows >= lengths[b] are padding (ignored).
        lengths: ``(B,)`` integer, ``1 <= lengths[b] <= N_max``.
        tau: threshold; bit (i, j) is set iff cos(f_i, f_j) > tau (strict), i, j < lengths[b].
        precision: "float32" (the fp32 dot of the fp32-normalized rows, no tf32; by default certified: an
            fp16 tensor-core screen with the bound ``exact.float32_screen_bound`` decides the entries far
            from tau and the others are recomputed as fp32 dots in one fixed order, sequential over the
            features without FMA, so the graph is [that dot > tau] on any device; launch setting
            affinity.certified = 0 computes every entry with one IEEE fp32 ``tl.dot`` instead), "fast"
            (fp16 inputs, fp32 accumulation on tensor cores) or "float64" (fp64 dot; for checks, slow on
            most GPUs).

    Returns:
        ``mask``: int32 ``(B, N_max, W)``, ``W = 2 * ceil(N_max / 64)``, layout in the module docstring;
        exactly symmetric. ``counts``: int32 ``(B, N_max)``, popcount of each row of ``mask`` (the
        number of j with B_ij = 1, self-loop included; 0 on padding rows). The degrees of the graph are
        ``eps * n + (1 - eps) * counts``.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision: expected one of {sorted(_PRECISIONS)}, got {precision!r}")
    lens = _check_batch(feats, lengths)
    dtype, dot_precision = _PRECISIONS[precision]
    cfg = block_sizes("affinity_fast" if precision == "fast" else "affinity")
    if precision == "float32" and cfg["certified"] and not cfg["tf32x3"]:
        g, h = _normalize(feats, lens, torch.float32, half=True)
        mask, counts, cand = _screen(h, lens, tau, float32_screen_bound(g.shape[2]))
        _recheck(g, cand, tau, 0.0, mask, counts)
        return mask, counts
    if precision == "float32" and cfg["tf32x3"]:
        dot_precision = "tf32x3"  # 3 tf32 tensor-core products: ~2^-22 relative error instead of 2^-24
    f = normalize_fwd(feats, lens, dtype)
    B, N_max, C = f.shape
    W = words_per_row(N_max)
    BT = cfg["BT"]
    if BT % 32:
        raise ValueError(f"affinity block BT must be a multiple of 32, got {BT}")
    mask = torch.zeros((B, N_max, W), dtype=torch.int32, device=f.device)
    counts = torch.zeros((B, N_max), dtype=torch.int32, device=f.device)
    pairs = _tile_pairs(triton.cdiv(N_max, BT), f.device)
    tau_t = torch.tensor([float(tau)], dtype=torch.float64, device=f.device)
    grid = (pairs.shape[0], B)
    _affinity_kernel[grid](
        f, pairs, lens, tau_t, mask, counts, N_max, C, W,
        BT=BT, BK=cfg["BK"], ACC=_acc_dtype(dtype), DOT_PRECISION=dot_precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return mask, counts


def _screen(h: torch.Tensor, lens: torch.Tensor, tau: float, bound: float,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_affinity_exact_kernel`` on fp16 rows ``h`` ``(B, N_max, C)``: (mask, counts) of the entries the screen
    decides (S > tau + bound) and the int64 ``(K,)`` candidates (|S - tau| <= bound, i <= j) as linear indices
    (b * N_max + i) * N_max + j, in increasing order (so in image order)."""
    B, N_max, C = h.shape
    W = words_per_row(N_max)
    cfg = block_sizes("affinity_fast")
    BT = cfg["BT"]
    pairs = _tile_pairs(triton.cdiv(N_max, BT), h.device)
    lo, hi = np.float32(tau - bound), np.float32(tau + bound)  # then rounded outward (the margin absorbs
    lo = np.nextafter(lo, np.float32(-np.inf)) if lo > tau - bound else lo  # fp64's rounding of tau -+ bound)
    hi = np.nextafter(hi, np.float32(np.inf)) if hi < tau + bound else hi
    thr = torch.tensor([float(lo), float(hi)], dtype=torch.float32, device=h.device)
    mask = torch.zeros((B, N_max, W), dtype=torch.int32, device=h.device)
    counts = torch.zeros((B, N_max), dtype=torch.int32, device=h.device)
    cand = torch.zeros_like(mask)
    _affinity_exact_kernel[(pairs.shape[0], B)](
        h, pairs, lens, thr, mask, counts, cand, N_max, C, W,
        BT=BT, BK=cfg["BK"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    word = cand.view(-1).nonzero().squeeze(1)  # the few nonzero words, then their set bits
    k, bit = ((cand.view(-1)[word, None] >> torch.arange(32, device=h.device, dtype=torch.int32)) & 1).nonzero(
        as_tuple=True)
    word = word[k]
    return mask, counts, (word // W) * N_max + (word % W) * 32 + bit


def _recheck(rows: torch.Tensor, cand: torch.Tensor, tau: float, bound: float, mask: torch.Tensor,
             counts: torch.Tensor) -> torch.Tensor:
    """``_recheck_kernel`` on the candidates ``cand`` of ``_screen``: sets the bits and counts of those that are
    edges. ``rows``: float64 ``(B, N_max, C)`` (precision "exact": decided when |dot - tau| > ``bound``) or
    float32 (precision "float32": the fixed-order float32 dot decides; ``bound`` unused). Returns bool
    ``(K,)``: the candidates left undecided (always False for float32 rows)."""
    B, N_max, C = rows.shape
    exact = rows.dtype == torch.float64
    cfg = block_sizes("recheck")
    undecided = torch.zeros(cand.shape[0], dtype=torch.int8, device=rows.device)
    if cand.numel():
        thr = torch.tensor([float(tau), bound], dtype=torch.float64, device=rows.device)
        _recheck_kernel[(triton.cdiv(cand.shape[0], cfg["BLOCK"]),)](
            rows, cand, thr, mask, counts, undecided, N_max, C, words_per_row(N_max), cand.shape[0],
            BLOCK=cfg["BLOCK"], BC=cfg["BC"], EXACT=exact, num_warps=cfg["num_warps"], enable_fp_fusion=False,
        )
    return undecided.bool()


def affinity_exact_fwd(
    feats: torch.Tensor, lengths: torch.Tensor, *, tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``affinity_fwd`` for precision "exact" (``ncutfast.exact``): the float64 reference's graph.

    The rows are normalized in float64 exactly as the reference does (``_exact_normalize_kernel``, equal to
    ``exact.normalized_rows`` bit for bit), rounded to fp16 and screened by ``_affinity_exact_kernel`` (one
    tensor-core product) against ``exact.tensor_core_bound``; the candidates it leaves (|S - tau| <= bound)
    are decided by ``_recheck_kernel``'s float64 dot against ``exact.dot_bound``, and the few it cannot
    decide (ties, in practice) by ``exact.recheck`` (Dot2) on the host side.

    Args:
        feats: ``(B, N_max, C)`` floating point, finite within the lengths; rows >= lengths[b] are padding.
        lengths: ``(B,)`` integer, ``1 <= lengths[b] <= N_max``.
        tau: threshold; bit (i, j) is set iff f_i . f_j > tau exactly (strict).

    Returns:
        ``(mask, counts, rechecked)``: mask and counts as ``affinity_fwd``; ``rechecked`` int64 ``(B,)``, the
        number of entries (i <= j) of each image decided by the float64 recheck.
    """
    lens = _check_batch(feats, lengths)
    f64, h = exact_normalize_fwd(feats, lens)
    B, N_max, C = feats.shape
    W = words_per_row(N_max)
    mask, counts, cand = _screen(h, lens, tau, tensor_core_bound(C))
    rechecked = torch.bincount(cand // (N_max * N_max), minlength=B)
    lin = cand[_recheck(f64, cand, tau, dot_bound(C), mask, counts)]
    img, rest = lin // (N_max * N_max), lin % (N_max * N_max)
    i, j = rest // N_max, rest % N_max
    edge = recheck(f64[img, i], f64[img, j], tau)
    # Distinct bits of still-zero words: adding them is or-ing them. The mirror (j, i) of an off-diagonal
    # candidate is its own bit.
    img, i, j = img[edge], i[edge], j[edge]
    off = i != j
    rows = torch.cat([(img * N_max + i), (img * N_max + j)[off]])
    colw = torch.cat([j, i[off]])
    one = torch.ones_like(colw, dtype=torch.int32)
    mask.view(-1).index_add_(0, rows * W + colw // 32, one << (colw % 32).to(torch.int32))
    counts.view(-1).index_add_(0, rows, one)
    return mask, counts, rechecked
