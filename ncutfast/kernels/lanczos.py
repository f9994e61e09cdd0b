"""The Lanczos operator of the ncut problem, applied straight from the bitmask.

With W = eps 11^T + (1 - eps) B (B the 0/1 bitmask, self-loops included), d = W 1 and s = d^-1/2, the
symmetric operator whose 2nd largest eigenvector gives the cut is

    M v = s * (eps * (s . v) 1 + (1 - eps) * B (s * v))

(see ../shared/spec/numerics.md). Two implementations, chosen by the ``int8`` launch setting of "matvec":

- ``_bitmask_matvec_kernel`` (default): one launch; the D^-1/2 scaling on both sides and the rank-one eps
  term are fused into the pass over the bits, which are expanded in registers and accumulated in fp64.
- ``_digits_kernel`` + ``_bitmask_matvec_i8_kernel``: tensor cores. u = s * v is written in fixed point,
  ``u = scale * sum_d digit_d 128^d`` with 8 balanced base-128 digits in int8 (56 bits, scale = max|u| /
  2^54), so ``B u`` is an exact int8 x int8 -> int32 ``tl.dot`` of the 0/1 bits with the digits (|sum| <=
  64 n < 2^31) followed by an fp64 recombination; the only error is u's truncation to 2^-54 max|u|. This
  moves the multiply-adds off the ALUs (a candidate for the GPU; the benchmark measures both).

Either way a Lanczos step reads N^2 / 8 bytes of mask per image instead of an N x N float matrix.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from ..backends.contract import BREAKDOWN, PARK
from ._utils import block_sizes, words_per_row
from .ritz import PIVMIN, _converged_on_device, ritz_top2

__all__ = ["bitmask_matvec_fwd", "degrees_from_counts", "BitmaskOperator", "FusedSteps"]


@triton.jit
def _matvec_rows(
    mask_ptr, s_ptr, eps, b, n, N_max, W, rows, v_base, stride_vn, stride_vk, K, n_cols,
    BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr,
):
    """Rows ``rows`` (BM,) of M v for image b (n tokens), all K vectors of the block at ``v_base`` at once:
    a (BM, KP) fp64 tensor, zero on rows >= n. ``n_cols`` is n, or 0 to skip the work (rows past n).

    It walks the columns in steps of BN: loads u = s * v for those columns (BN, KP), expands the
    (BM, BN / 32) mask words to bits and adds the selected u into a (BM, BN, KP) fp64 accumulator; the
    column sums of u (for the eps term) build up the same way. Both are reduced over BN once, after the
    loop, so the loop body has no cross-thread reduction."""
    kk = tl.arange(0, KP)
    k_ok = kk[None, :] < K  # KP is K rounded up to a power of two
    sh = tl.arange(0, 32)
    wi = tl.arange(0, BN // 32)
    row_ok = rows < n  # padding rows (and rows past N_max in the last block) are not graph nodes
    mrow = mask_ptr + (b * N_max + rows[:, None]).to(tl.int64) * W
    acc = tl.zeros((BM, BN, KP), dtype=tl.float64)
    tot = tl.zeros((BN, KP), dtype=tl.float64)
    for c0 in range(0, n_cols, BN):
        cols = c0 + tl.arange(0, BN)
        col_ok = cols < n  # last column step; v may hold anything beyond n
        s_c = tl.load(s_ptr + b * N_max + cols, mask=col_ok, other=0.0)
        u = tl.load(v_base + cols[:, None] * stride_vn + kk[None, :] * stride_vk,
                    mask=col_ok[:, None] & k_ok, other=0.0).to(tl.float64) * s_c[:, None]
        tot += u
        # words past W do not exist (the last step may overhang the row); their columns are >= n anyway
        words = tl.load(mrow + c0 // 32 + wi[None, :], mask=row_ok[:, None] & (c0 // 32 + wi[None, :] < W),
                        other=0)
        bits = tl.reshape((words[:, :, None] >> sh[None, None, :]) & 1, (BM, BN))
        acc += tl.where(bits[:, :, None] != 0, u[None, :, :], 0.0)
    bu = tl.sum(acc, axis=1)
    s_r = tl.load(s_ptr + b * N_max + rows, mask=row_ok, other=0.0)
    return s_r[:, None] * (eps * tl.sum(tot, axis=0)[None, :] + (1.0 - eps) * bu)


@triton.jit
def _bitmask_matvec_kernel(
    mask_ptr, s_ptr, len_ptr, eps_ptr, idx_ptr, v_ptr, y_ptr,
    N_max, W, K,
    stride_vb, stride_vn, stride_vk,
    stride_yb, stride_yn, stride_yk,
    BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr,
):
    """One program computes BM rows of y = M v for one image, all K vectors at once: row p = program_id(1)
    of v and y belongs to image b = idx[p] of the mask, so a subset of the batch (Lanczos restarts) runs
    without gathering its masks. Row blocks entirely past n skip the column loop and store zeros."""
    pid = tl.program_id(0)
    p = tl.program_id(1)
    b = tl.load(idx_ptr + p)
    n = tl.load(len_ptr + b).to(tl.int32)
    rows = pid * BM + tl.arange(0, BM)
    kk = tl.arange(0, KP)
    eps = tl.load(eps_ptr)  # fp64 from memory: a Python float argument would be rounded to fp32
    y = _matvec_rows(mask_ptr, s_ptr, eps, b, n, N_max, W, rows, v_ptr + p * stride_vb, stride_vn, stride_vk,
                     K, tl.where(pid * BM < n, n, 0), BM, BN, KP)
    tl.store(y_ptr + p * stride_yb + rows[:, None] * stride_yn + kk[None, :] * stride_yk, y,
             mask=(rows[:, None] < N_max) & (kk[None, :] < K))


@triton.jit
def _vector_block(v_ptr, p, stride_vb, step_ptr, stride_vr, done_ptr, stalled_ptr, STEPPED: tl.constexpr):
    """Base pointer of vector block p and whether to compute with it. STEPPED (fused Lanczos steps): the
    block is row step[p] + 1 of problem p's basis (row stride stride_vr), and done or stalled problems are
    skipped; otherwise it is row p of v."""
    base = v_ptr + p.to(tl.int64) * stride_vb
    if STEPPED:
        base += (tl.load(step_ptr + p) + 1) * stride_vr
        active = (tl.load(done_ptr + p) == 0) & (tl.load(stalled_ptr + p) == 0)
    else:
        active = p >= 0
    return base, active


@triton.jit
def _digits_kernel(
    s_ptr, len_ptr, idx_ptr, v_ptr, dig_ptr, scale_ptr, tot_ptr, step_ptr, done_ptr, stalled_ptr,
    N_max, K,
    stride_vb, stride_vn, stride_vk, stride_vr,
    BR: tl.constexpr, KP: tl.constexpr, STEPPED: tl.constexpr,
):
    """One program per vector block p = program_id(0) (image b = idx[p]) writes u = s * v in fixed point:
    ``dig[p, j, 8 k + d]`` (int8) with ``u_jk ~= scale[p, k] * sum_d dig * 128^d``, and ``tot[p, k] =
    sum_j u_jk`` (fp64) for the eps term. Pass 1 finds max |u| per vector, pass 2 writes the digits.
    Rows >= n (padding) and vectors >= K (power-of-two padding) get zero digits: the mat-vec reads them.
    STEPPED: see ``_vector_block`` (a skipped problem's digits are not written; the mat-vec skips it too)."""
    p = tl.program_id(0)
    b = tl.load(idx_ptr + p)
    n = tl.load(len_ptr + b).to(tl.int32)
    v_base, active = _vector_block(v_ptr, p, stride_vb, step_ptr, stride_vr, done_ptr, stalled_ptr, STEPPED)
    n_rows = tl.where(active, N_max, 0)
    kk = tl.arange(0, KP)
    k_ok = kk[None, :] < K
    amax = tl.zeros((KP,), dtype=tl.float64)
    tot = tl.zeros((KP,), dtype=tl.float64)
    for r0 in range(0, n_rows, BR):
        rows = r0 + tl.arange(0, BR)
        ok = rows < n
        s_r = tl.load(s_ptr + b * N_max + rows, mask=ok, other=0.0)
        u = tl.load(v_base + rows[:, None] * stride_vn + kk[None, :] * stride_vk,
                    mask=ok[:, None] & k_ok, other=0.0).to(tl.float64) * s_r[:, None]
        amax = tl.maximum(amax, tl.max(tl.abs(u), axis=0))
        tot += tl.sum(u, axis=0)
    # 2^54 / max|u|: |U| <= 2^54 fits the 8 balanced digits (range about +-2^55)
    inv = tl.where(amax > 0, 18014398509481984.0 / tl.where(amax > 0, amax, 1.0), 0.0)
    tl.store(scale_ptr + p * KP + kk, amax / 18014398509481984.0)
    tl.store(tot_ptr + p * KP + kk, tot)
    d_idx = tl.arange(0, 8)
    for r0 in range(0, n_rows, BR):
        rows = r0 + tl.arange(0, BR)
        ok = rows < n
        s_r = tl.load(s_ptr + b * N_max + rows, mask=ok, other=0.0)
        u = tl.load(v_base + rows[:, None] * stride_vn + kk[None, :] * stride_vk,
                    mask=ok[:, None] & k_ok, other=0.0).to(tl.float64) * s_r[:, None]
        big = (u * inv[None, :]).to(tl.int64)  # truncation: error < 1 unit = 2^-54 max|u|
        digits = tl.zeros((BR, KP, 8), dtype=tl.int64)
        for d in tl.static_range(8):
            dig = ((big + 64) & 127) - 64  # balanced digit in [-64, 63]
            digits = tl.where(d_idx[None, None, :] == d, dig[:, :, None], digits)
            big = (big - dig) >> 7  # exact: big - dig is a multiple of 128
        cols = kk[:, None] * 8 + d_idx[None, :]
        tl.store(dig_ptr + (p * N_max + rows[:, None, None]).to(tl.int64) * (KP * 8) + cols[None, :, :],
                 digits.to(tl.int8), mask=(rows < N_max)[:, None, None])


@triton.jit
def _bitmask_matvec_i8_kernel(
    mask_ptr, s_ptr, len_ptr, eps_ptr, idx_ptr, dig_ptr, scale_ptr, tot_ptr, y_ptr, step_ptr, done_ptr,
    stalled_ptr, N_max, W, K,
    stride_yb, stride_yn, stride_yk,
    BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr, STEPPED: tl.constexpr,
):
    """One program computes BM rows of y = M v for vector block p = program_id(1) (image b = idx[p]).

    Per BN columns: bits (BM, BN) int8 from the mask words, digits (BN, 8 KP) int8, one exact int8 dot
    into an int32 accumulator. At the end the digit columns are recombined in fp64 (sum_d acc 128^d,
    times scale) and the eps term and the row scaling are applied. Row blocks past n skip the loop, and so
    do problems that STEPPED (``_vector_block``) skips."""
    pid = tl.program_id(0)
    p = tl.program_id(1)
    b = tl.load(idx_ptr + p)
    n = tl.load(len_ptr + b).to(tl.int32)
    rows = pid * BM + tl.arange(0, BM)
    row_ok = rows < n  # padding rows (and rows past N_max in the last block) are not graph nodes
    sh = tl.arange(0, 32)
    wi = tl.arange(0, BN // 32)
    dc = tl.arange(0, KP * 8)
    mrow = mask_ptr + (b * N_max + rows[:, None]).to(tl.int64) * W
    acc = tl.zeros((BM, KP * 8), dtype=tl.int32)
    _, active = _vector_block(dig_ptr, p, 0, step_ptr, 0, done_ptr, stalled_ptr, STEPPED)
    n_cols = tl.where(active & (pid * BM < n), n, 0)
    for c0 in range(0, n_cols, BN):
        cols = c0 + tl.arange(0, BN)
        # words past W do not exist (the last step may overhang the row); their columns are >= n anyway
        words = tl.load(mrow + c0 // 32 + wi[None, :], mask=row_ok[:, None] & (c0 // 32 + wi[None, :] < W),
                        other=0)
        bits = tl.reshape((words[:, :, None] >> sh[None, None, :]) & 1, (BM, BN)).to(tl.int8)
        # digit rows past N_max are outside the buffer (rows in [n, N_max) hold zeros)
        dig = tl.load(dig_ptr + (p * N_max + cols[:, None]).to(tl.int64) * (KP * 8) + dc[None, :],
                      mask=(cols < N_max)[:, None], other=0)
        acc = tl.dot(bits, dig, acc, out_dtype=tl.int32)
    kk = tl.arange(0, KP)
    weight = (tl.full((KP * 8,), 1, tl.int64) << (7 * (dc % 8))).to(tl.float64)  # 128^d, exact
    bu = tl.sum(tl.reshape(acc.to(tl.float64) * weight[None, :], (BM, KP, 8)), axis=2)
    scale = tl.load(scale_ptr + p * KP + kk)
    tot = tl.load(tot_ptr + p * KP + kk)
    s_r = tl.load(s_ptr + b * N_max + rows, mask=row_ok, other=0.0)
    eps = tl.load(eps_ptr)  # fp64 from memory: a Python float argument would be rounded to fp32
    y = s_r[:, None] * (eps * tot[None, :] + (1.0 - eps) * (bu * scale[None, :]))
    tl.store(y_ptr + p * stride_yb + rows[:, None] * stride_yn + kk[None, :] * stride_yk, y,
             mask=(rows[:, None] < N_max) & (kk[None, :] < K))


@triton.jit
def _cgs_sweep(bp, wp, n, h, rows_ok, stride_br, KB: tl.constexpr, BN: tl.constexpr):
    """One sweep of a Gram-Schmidt pass: w -= V^T h over the n columns, BN at a time (V = basis rows
    ``rows_ok`` at ``bp``, w at ``wp``). Returns V w and ||w||^2 of the updated w, accumulated on the tiles
    already loaded (the kernel is memory bound: the extra multiply-adds are free). Ends with a barrier so
    that the next sweep sees every store."""
    kr = tl.arange(0, KB)
    h_next = tl.zeros((KB,), dtype=tl.float64)
    part = tl.zeros((BN,), dtype=tl.float64)
    for c0 in range(0, n, BN):
        cols = c0 + tl.arange(0, BN)
        ok = cols < n
        v = tl.load(bp + kr[:, None] * stride_br + cols[None, :], mask=rows_ok & ok[None, :], other=0.0)
        w = tl.load(wp + cols, mask=ok, other=0.0) - tl.sum(v * h[:, None], axis=0)
        tl.store(wp + cols, w, mask=ok)
        h_next += tl.sum(v * w[None, :], axis=1)
        part += w * w
    tl.debug_barrier()
    return h_next, tl.sum(part, axis=0)


@triton.jit
def _lanczos_step_body(
    p, n, basis_ptr, w_ptr, alpha_ptr, beta_ptr, live_ptr, klen_ptr, cap_ptr, done_ptr, stalled_ptr, step_ptr,
    N_max, M, stride_bb, stride_br,
    BREAKDOWN: tl.constexpr, KB: tl.constexpr, BN: tl.constexpr,
):
    """Lanczos step j = step[p] of problem p after w = M q (q = basis row j + 1), as ``backends.lanczos._torch_step``:
    w is projected off basis rows 0..j + 1 by classical Gram-Schmidt twice, alpha = q.w, beta = ||w||; a
    breakdown (beta <= BREAKDOWN) stalls the problem, a full deflated space (klen = cap) finishes it;
    otherwise w / beta becomes basis row j + 2. A done or stalled problem leaves slot j dead.

    Three sweeps over the basis (the step's dominant memory traffic) instead of the four of two separate
    passes: (1) h = V w, whose entry j + 1 is alpha; (2) w -= V^T h, and in the same sweep, on the same
    tiles, h2 = V w of the updated chunk; (3) w -= V^T h2 and ||w||^2. Then w / beta is written (w only).
    Each sweep walks the n columns BN at a time with the (KB, BN) basis tile; w lives in global memory
    between sweeps (a barrier orders one sweep's stores before the next one's loads)."""
    j = tl.load(step_ptr + p)
    act = (tl.load(done_ptr + p) == 0) & (tl.load(stalled_ptr + p) == 0)
    if act:
        bp = basis_ptr + p.to(tl.int64) * stride_bb
        wp = w_ptr + p.to(tl.int64) * N_max
        kr = tl.arange(0, KB)
        rows_ok = kr[:, None] < j + 2  # basis rows 0 (y0) .. j + 1 (q); the rest are not loaded
        h = tl.zeros((KB,), dtype=tl.float64)
        for c0 in range(0, n, BN):
            cols = c0 + tl.arange(0, BN)
            ok = cols < n
            v = tl.load(bp + kr[:, None] * stride_br + cols[None, :], mask=rows_ok & ok[None, :], other=0.0)
            h += tl.sum(v * tl.load(wp + cols, mask=ok, other=0.0)[None, :], axis=1)
        a = tl.sum(tl.where(kr == j + 1, h, 0.0), axis=0)
        h2, _ = _cgs_sweep(bp, wp, n, h, rows_ok, stride_br, KB, BN)
        _, ww = _cgs_sweep(bp, wp, n, h2, rows_ok, stride_br, KB, BN)
        bj = tl.sqrt(ww)
        klen = tl.load(klen_ptr + p) + 1
        fresh = bj > BREAKDOWN
        full = klen >= tl.load(cap_ptr + p)
        tl.store(klen_ptr + p, klen)
        tl.store(done_ptr + p, full.to(tl.int8))
        tl.store(stalled_ptr + p, (bj <= BREAKDOWN).to(tl.int8))
        tl.store(alpha_ptr + p * M + j, a)
        tl.store(beta_ptr + p * M + j, tl.where(fresh, bj, 0.0))
        tl.store(live_ptr + p * M + j, tl.full((), 1, tl.int8))
        inv = tl.where(fresh & (full == 0), 1.0 / tl.maximum(bj, 1e-300), 0.0)
        for c0 in range(0, n, BN):
            cols = c0 + tl.arange(0, BN)
            ok = cols < n
            tl.store(bp + (j + 2) * stride_br + cols, tl.load(wp + cols, mask=ok, other=0.0) * inv, mask=ok)
    tl.store(step_ptr + p, j + 1)


@triton.jit
def _lanczos_matvec_kernel(
    mask_ptr, s_ptr, len_ptr, eps_ptr, idx_ptr, basis_ptr, w_ptr, done_ptr, stalled_ptr, step_ptr,
    N_max, W, stride_bb, stride_br,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """w = M q for Lanczos step j = step[p] of problem p = program_id(1) (image idx[p]; q = basis row
    j + 1), BM rows per program; done or stalled problems skip the column loop (their w is not read)."""
    pid = tl.program_id(0)
    p = tl.program_id(1)
    b = tl.load(idx_ptr + p)
    n = tl.load(len_ptr + b).to(tl.int32)
    j = tl.load(step_ptr + p)
    act = (tl.load(done_ptr + p) == 0) & (tl.load(stalled_ptr + p) == 0)
    rows = pid * BM + tl.arange(0, BM)
    eps = tl.load(eps_ptr)
    q = basis_ptr + p.to(tl.int64) * stride_bb + (j + 1) * stride_br
    y = _matvec_rows(mask_ptr, s_ptr, eps, b, n, N_max, W, rows, q, 1, 0, 1, tl.where(act & (pid * BM < n), n, 0),
                     BM, BN, 1)
    tl.store(w_ptr + p.to(tl.int64) * N_max + rows[:, None], y, mask=rows[:, None] < N_max)


@triton.jit
def _lanczos_step_kernel(
    len_ptr, idx_ptr, basis_ptr, w_ptr, alpha_ptr, beta_ptr, live_ptr, klen_ptr, cap_ptr, done_ptr, stalled_ptr,
    step_ptr, N_max, M, stride_bb, stride_br,
    BREAKDOWN: tl.constexpr, KB: tl.constexpr, BN: tl.constexpr,
):
    """The rest of the step after ``_lanczos_matvec_kernel``: one program per problem (see the body)."""
    p = tl.program_id(0)
    n = tl.load(len_ptr + tl.load(idx_ptr + p)).to(tl.int32)
    _lanczos_step_body(p, n, basis_ptr, w_ptr, alpha_ptr, beta_ptr, live_ptr, klen_ptr, cap_ptr, done_ptr,
                       stalled_ptr, step_ptr, N_max, M, stride_bb, stride_br, BREAKDOWN, KB, BN)


@triton.jit
def _lanczos_persistent_kernel(
    mask_ptr, s_ptr, len_ptr, eps_ptr, idx_ptr, basis_ptr, w_ptr, alpha_ptr, beta_ptr, live_ptr, klen_ptr,
    cap_ptr, done_ptr, stalled_ptr, step_ptr, tri_ptr, tol_ptr, N_max, W, M, stride_bb, stride_br, n_steps,
    BREAKDOWN: tl.constexpr, KB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr,
    CHECK: tl.constexpr, KR: tl.constexpr, S: tl.constexpr, ROUNDS: tl.constexpr, PARK: tl.constexpr,
    PIVMIN: tl.constexpr,
):
    """``n_steps`` whole Lanczos steps of problem p = program_id(0) in one program: the mat-vec BM rows at
    a time into w, a barrier, the step body, a barrier; no other launch or host round trip in between.
    With CHECK > 0 the program also runs the driver's convergence test after every CHECK-th step
    (``kernels.ritz``; KR, S, ROUNDS: its launch settings) and freezes itself once converged, so a whole
    Lanczos cycle is one launch. A problem that breaks down stops until the host's next check."""
    p = tl.program_id(0)
    b = tl.load(idx_ptr + p)
    n = tl.load(len_ptr + b).to(tl.int32)
    eps = tl.load(eps_ptr)
    for _ in range(0, n_steps):
        j = tl.load(step_ptr + p)
        act = (tl.load(done_ptr + p) == 0) & (tl.load(stalled_ptr + p) == 0)
        if act:
            q = basis_ptr + p.to(tl.int64) * stride_bb + (j + 1) * stride_br
            for r0 in range(0, n, BM):
                rows = r0 + tl.arange(0, BM)
                y = _matvec_rows(mask_ptr, s_ptr, eps, b, n, N_max, W, rows, q, 1, 0, 1, n, BM, BN, 1)
                tl.store(w_ptr + p.to(tl.int64) * N_max + rows[:, None], y, mask=rows[:, None] < N_max)
            tl.debug_barrier()
        _lanczos_step_body(p, n, basis_ptr, w_ptr, alpha_ptr, beta_ptr, live_ptr, klen_ptr, cap_ptr, done_ptr,
                           stalled_ptr, step_ptr, N_max, M, stride_bb, stride_br, BREAKDOWN, KB, BS)
        tl.debug_barrier()
        if CHECK > 0:
            k = j + 1
            iterating = (tl.load(done_ptr + p) == 0) & (tl.load(stalled_ptr + p) == 0)
            if act & iterating & (k % CHECK == 0):
                conv = _converged_on_device(alpha_ptr, beta_ptr, live_ptr, klen_ptr,
                                            tri_ptr + p.to(tl.int64) * (6 * KR), tol_ptr, p, M, k, KR, S, ROUNDS,
                                            PARK, PIVMIN)
                tl.store(done_ptr + p, conv.to(tl.int8))
            tl.debug_barrier()


def degrees_from_counts(counts: torch.Tensor, lengths: torch.Tensor, eps: float) -> torch.Tensor:
    """Degrees ``d_i = eps * n + (1 - eps) * counts_i`` (float64 ``(B, N_max)``, 0 on padding rows).

    ``counts`` is the int32 ``(B, N_max)`` row popcount from ``affinity_fwd``; popcounts are exact
    integers, so d matches the reference's ``W.sum(1)`` up to float64 rounding of the sum.
    """
    n = lengths.to(device=counts.device, dtype=torch.float64)[:, None]
    valid = torch.arange(counts.shape[1], device=counts.device)[None, :] < n
    d = eps * n + (1.0 - eps) * counts.to(torch.float64)
    return torch.where(valid, d, torch.zeros((), dtype=torch.float64, device=counts.device))


def _launch(mask: torch.Tensor, lens: torch.Tensor, s: torch.Tensor, eps_t: torch.Tensor, idx: torch.Tensor,
            v: torch.Tensor) -> torch.Tensor:
    """Launch the mat-vec on checked device tensors (int32 lens/idx, fp64 s/eps_t); no host sync, no copy
    to the device, so a solve built on it can be captured in a CUDA graph."""
    _, N_max, W = mask.shape
    nb = idx.shape[0]
    v3 = v if v.dim() == 3 else v.unsqueeze(-1)
    K = v3.shape[2]
    y3 = torch.empty((nb, N_max, K), dtype=torch.float64, device=v.device)
    if K and nb and block_sizes("matvec")["int8"]:
        cfg = block_sizes("matvec_int8")
        KP = max(2, triton.next_power_of_2(K))  # 8 KP >= 16 digit columns: the smallest tl.dot width
        dig = torch.empty((nb, N_max, 8 * KP), dtype=torch.int8, device=v.device)
        scale = torch.empty((nb, KP), dtype=torch.float64, device=v.device)
        tot = torch.empty((nb, KP), dtype=torch.float64, device=v.device)
        _digits_kernel[(nb,)](
            s, lens, idx, v3, dig, scale, tot, idx, idx, idx, N_max, K, v3.stride(0), v3.stride(1), v3.stride(2),
            0, BR=cfg["BR"], KP=KP, STEPPED=False, num_warps=4,
        )
        _bitmask_matvec_i8_kernel[(triton.cdiv(N_max, cfg["BM"]), nb)](
            mask, s, lens, eps_t, idx, dig, scale, tot, y3, idx, idx, idx, N_max, W, K,
            y3.stride(0), y3.stride(1), y3.stride(2),
            BM=cfg["BM"], BN=cfg["BN"], KP=KP, STEPPED=False, num_warps=cfg["num_warps"],
        )
    elif K and nb:
        cfg = block_sizes("matvec")
        KP = triton.next_power_of_2(K)
        BN = max(32, cfg["BN"] // KP)  # keep the (BM, BN, KP) product at the register budget of K = 1
        grid = (triton.cdiv(N_max, cfg["BM"]), nb)
        _bitmask_matvec_kernel[grid](
            mask, s, lens, eps_t, idx, v3, y3, N_max, W, K,
            v3.stride(0), v3.stride(1), v3.stride(2), y3.stride(0), y3.stride(1), y3.stride(2),
            BM=cfg["BM"], BN=BN, KP=KP, num_warps=cfg["num_warps"],
        )
    return y3 if v.dim() == 3 else y3.squeeze(-1)


def bitmask_matvec_fwd(
    mask: torch.Tensor, lengths: torch.Tensor, s: torch.Tensor, v: torch.Tensor, eps: float,
    idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply ``M = D^-1/2 W D^-1/2`` of each image to one or a few vectors.

    Args:
        mask: int32 ``(B, N_max, W)`` bitmask from ``affinity_fwd`` (layout in kernels/affinity.py).
        lengths: ``(B,)`` integer, tokens per image.
        s: float64 ``(B, N_max)``, ``d^-1/2`` (entries beyond lengths[b] are ignored).
        v: float64 ``(b, N_max)`` or ``(b, N_max, K)`` (any strides); entries beyond the image's length
            are ignored.
        eps: weight of the non-edges.
        idx: optional integer ``(b,)``: row p of v belongs to image idx[p]; default all B images in order.

    Returns:
        float64 contiguous tensor shaped like ``v``: ``M v``, zero beyond the image's length.
    """
    if mask.dim() != 3 or mask.dtype != torch.int32:
        raise ValueError(f"mask: expected an int32 (B, N_max, W) tensor, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    B, N_max, W = mask.shape
    if W != words_per_row(N_max):
        raise ValueError(f"mask: expected {words_per_row(N_max)} words per row for N_max={N_max}, got {W}")
    if s.shape != (B, N_max) or s.dtype != torch.float64:
        raise ValueError(f"s: expected a float64 ({B}, {N_max}) tensor, got {s.dtype} {tuple(s.shape)}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths: expected shape ({B},), got {tuple(lengths.shape)}")
    dev = mask.device
    idx = torch.arange(B, device=dev) if idx is None else idx
    nb = idx.shape[0]
    if v.dtype != torch.float64 or v.dim() not in (2, 3) or tuple(v.shape[:2]) != (nb, N_max):
        raise ValueError(f"v: expected float64 ({nb}, {N_max}) or ({nb}, {N_max}, K), got {v.dtype} "
                         f"{tuple(v.shape)}")
    eps_t = torch.tensor([float(eps)], dtype=torch.float64, device=dev)
    return _launch(mask, lengths.to(device=dev, dtype=torch.int32), s.contiguous(), eps_t,
                   idx.to(device=dev, dtype=torch.int32), v)


class BitmaskOperator:
    """``M = D^-1/2 W D^-1/2`` of a padded batch, held as bitmask + degrees; ``op(v, idx)`` is the operator
    interface of ``ncutfast.backends.lanczos``. A call launches one kernel (two with the int8 variant) and never
    synchronizes with the host.

    Attributes:
        mask: int32 ``(B, N_max, W)``; eps: float;
        degrees: float64 ``(B, N_max)`` (0 beyond lengths[b]); s: float64 ``(B, N_max)``, ``d^-1/2``
        (0 beyond lengths[b]).
    """

    def __init__(self, mask: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor, eps: float) -> None:
        dev = mask.device
        self.mask = mask
        self.eps = float(eps)
        self.degrees = degrees_from_counts(counts, lengths, self.eps)
        pos = self.degrees > 0
        self.s = torch.where(pos, self.degrees.clamp_min(1e-300).rsqrt(), torch.zeros_like(self.degrees))
        self._lens = lengths.to(device=dev, dtype=torch.int32)
        self._eps = torch.tensor([self.eps], dtype=torch.float64, device=dev)
        self._all = torch.arange(mask.shape[0], device=dev, dtype=torch.int32)

    def __call__(self, v: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``M v`` for float64 ``v`` of shape ``(b, N_max)`` or ``(b, N_max, K)``, row p of v belonging to
        image ``idx[p]`` (default: all B images in order)."""
        idx32 = self._all if idx is None else idx.to(dtype=torch.int32)
        return _launch(self.mask, self._lens, self.s, self._eps, idx32, v)


class FusedSteps:
    """Lanczos steps in Triton launches: the ``steps`` hook of ``ncutfast.backends.lanczos.lanczos_fiedler``.

    ``mode`` (launch setting "lanczos" ``solve``):
    - "steps": two launches per step, ``_lanczos_matvec_kernel`` (many programs per problem) and
      ``_lanczos_step_kernel`` (reorthogonalization + bookkeeping, one program per problem);
    - "graph": the same launches, captured once per cycle as a CUDA graph of ``check_every`` steps and
      replayed between convergence checks (CUDA only; the first chunk runs eagerly, compiling the kernels);
    - "persistent": one launch per chunk of steps, ``_lanczos_persistent_kernel`` (one program per problem);
      given ``tol`` and ``check_every`` it tests convergence itself, so a whole cycle is one launch.
    The step counter lives on the device (one int32 per problem), so every launch of a chunk is identical.
    The Ritz pairs (convergence checks, end of a cycle) come from ``kernels.ritz`` (one launch) instead of
    a batched ``eigh``.
    """

    MODES = ("steps", "graph", "persistent")

    def __init__(self, op: BitmaskOperator, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode: expected one of {self.MODES}, got {mode!r}")
        if mode == "graph" and op.mask.device.type != "cuda":
            mode = "steps"  # CUDA graphs need CUDA; the interpreter runs the same launches eagerly
        self.op, self.mode = op, mode
        self.self_checking = mode == "persistent"
        self._st = None
        self._graph = None

    def begin(self, state, tol: float | None = None, check_every: int = 0) -> None:
        """Start a cycle on ``state`` (an ``ncutfast.backends.lanczos.CycleState``): scratch and step counter. With
        ``tol`` and ``check_every``, mode "persistent" tests convergence itself every ``check_every`` steps
        (``self_checking``: the driver then runs the whole cycle as one chunk)."""
        b, _, n = state.basis.shape
        if n != self.op.mask.shape[1] or not state.basis.is_contiguous():
            raise ValueError(f"state.basis: expected a contiguous (b, m + 2, {self.op.mask.shape[1]}) tensor, "
                             f"got {tuple(state.basis.shape)}")
        dev = state.basis.device
        self._st = state
        self._w = torch.empty(b, n, dtype=torch.float64, device=dev)
        self._step = torch.zeros(b, dtype=torch.int32, device=dev)
        self._idx = state.idx.to(dtype=torch.int32)
        self._flags = (state.live.view(torch.int8), state.done.view(torch.int8), state.stalled.view(torch.int8))
        self._graph, self._graph_len, self._warm, self._dig = None, 0, False, None
        self._check = check_every if self.self_checking and tol is not None else 0
        self._tol = torch.tensor([0.5 * tol, tol**0.5] if tol is not None else [0.0, 0.0], dtype=torch.float64,
                                 device=dev)
        self._tri = torch.empty(b, 6 * max(2, triton.next_power_of_2(state.alpha.shape[1])), dtype=torch.float64,
                                device=dev)  # scratch of kernels.ritz

    def run(self, j0: int, j1: int) -> None:
        """Steps j0, ..., j1 - 1 of the cycle (the device counter is at j0), no host synchronization."""
        count = j1 - j0
        if count <= 0:
            return
        if self.mode == "persistent":
            self._persistent(count)
        elif self.mode == "graph" and self._warm:
            if (self._graph is None or self._graph_len != count) and not self._capture(count):
                self.run(j0, j1)  # now mode "steps"
                return
            self._graph.replay()
        else:
            for _ in range(count):
                self._one_step()
            self._warm = True

    def _capture(self, count: int) -> bool:
        """Capture ``count`` steps as a CUDA graph (nothing runs). If capture fails (a driver or a Triton
        version that cannot capture these launches), warn once and fall back to mode "steps": the state is
        untouched, since captured launches do not execute."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for _ in range(count):
                    self._one_step()
        except RuntimeError as err:
            warnings.warn(f"ncutfast: CUDA graph capture of the Lanczos steps failed ({err}); launching them one "
                          "by one instead (launch setting lanczos.solve='steps' avoids the attempt)",
                          RuntimeWarning, stacklevel=3)
            self.mode, self._graph = "steps", None
            return False
        self._graph, self._graph_len = graph, count
        return True

    def ritz(self, k: int, vectors: bool = False):
        """Top two Ritz pairs after k steps from ``kernels.ritz.ritz_top2`` (one launch, no eigensolver)."""
        st = self._st
        return ritz_top2(st.alpha, st.beta, self._flags[0], k, vectors=vectors)

    def _one_step(self) -> None:
        self.launch_matvec()
        self.launch_step()

    def launch_matvec(self) -> None:
        """First launch(es) of a step: w = M q for every problem (the benchmark also times it alone). With
        launch setting matvec ``int8`` the tensor-core variant (two launches) computes it."""
        st, op = self._st, self.op
        b, _, n = st.basis.shape
        _, done, stalled = self._flags
        if block_sizes("matvec")["int8"]:
            cfg = block_sizes("matvec_int8")
            dig, scale, tot = self._digits()
            _digits_kernel[(b,)](
                op.s, op._lens, self._idx, st.basis, dig, scale, tot, self._step, done, stalled, n, 1,
                st.basis.stride(0), 1, 0, st.basis.stride(1), BR=cfg["BR"], KP=2, STEPPED=True, num_warps=4,
            )
            _bitmask_matvec_i8_kernel[(triton.cdiv(n, cfg["BM"]), b)](
                op.mask, op.s, op._lens, op._eps, self._idx, dig, scale, tot, self._w, self._step, done, stalled,
                n, op.mask.shape[2], 1, n, 1, 1, BM=cfg["BM"], BN=cfg["BN"], KP=2, STEPPED=True,
                num_warps=cfg["num_warps"],
            )
            return
        cfg = block_sizes("lanczos")
        _lanczos_matvec_kernel[(triton.cdiv(n, cfg["BM"]), b)](
            op.mask, op.s, op._lens, op._eps, self._idx, st.basis, self._w, done, stalled, self._step,
            n, op.mask.shape[2], st.basis.stride(0), st.basis.stride(1),
            BM=cfg["BM"], BN=cfg["BN"], num_warps=cfg["num_warps"],
        )

    def _digits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fixed-point buffers of the int8 mat-vec (K = 1, so 2 x 8 digit columns), made once per cycle so
        that a captured graph keeps them."""
        if self._dig is None:
            b, _, n = self._st.basis.shape
            dev = self._st.basis.device
            self._dig = (torch.empty(b, n, 16, dtype=torch.int8, device=dev),
                         torch.empty(b, 2, dtype=torch.float64, device=dev),
                         torch.empty(b, 2, dtype=torch.float64, device=dev))
        return self._dig

    def launch_step(self) -> None:
        """Second launch of a step: reorthogonalization and bookkeeping, one program per problem."""
        st, op = self._st, self.op
        b, rows, n = st.basis.shape
        live, done, stalled = self._flags
        cfg = block_sizes("lanczos")
        _lanczos_step_kernel[(b,)](
            op._lens, self._idx, st.basis, self._w, st.alpha, st.beta, live, st.klen, st.cap, done, stalled,
            self._step, n, st.alpha.shape[1], st.basis.stride(0), st.basis.stride(1),
            BREAKDOWN=BREAKDOWN, KB=triton.next_power_of_2(rows), BN=cfg["BS"], num_warps=cfg["num_warps"],
        )

    def rewind(self, j: int) -> None:
        """Put every problem back at step j, iterating (benchmarks repeat one step with it)."""
        self._step.fill_(j)
        self._st.klen.fill_(j)
        self._st.done.zero_()
        self._st.stalled.zero_()

    def _persistent(self, count: int) -> None:
        st, op = self._st, self.op
        b, rows, n = st.basis.shape
        live, done, stalled = self._flags
        cfg, rz = block_sizes("lanczos"), block_sizes("ritz")
        _lanczos_persistent_kernel[(b,)](
            op.mask, op.s, op._lens, op._eps, self._idx, st.basis, self._w, st.alpha, st.beta, live, st.klen,
            st.cap, done, stalled, self._step, self._tri, self._tol, n, op.mask.shape[2], st.alpha.shape[1],
            st.basis.stride(0), st.basis.stride(1), count,
            BREAKDOWN=BREAKDOWN, KB=triton.next_power_of_2(rows), BM=cfg["BM"], BN=cfg["BN"], BS=cfg["BS"],
            CHECK=self._check, KR=self._tri.shape[1] // 6, S=rz["S"], ROUNDS=rz["ROUNDS"], PARK=PARK,
            PIVMIN=PIVMIN, num_warps=cfg["num_warps"],
        )
