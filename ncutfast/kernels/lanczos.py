"""Fused Lanczos steps in Triton: the kernels behind ``kernels.operator.FusedSteps``.

- ``_lanczos_matvec_kernel``: w = M q of each problem's current step (many programs per problem, the
  mat-vec rows of ``kernels.matvec``), reading the step counter from the device;
- ``_lanczos_step_kernel``: the rest of the step, classical Gram-Schmidt applied twice against the basis
  and y0, alpha / beta and the breakdown and stall bookkeeping (one program per problem);
- ``_lanczos_persistent_kernel``: one program per problem running a whole chunk of steps (both parts),
  optionally with its own convergence test (``kernels.ritz``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .matvec import _matvec_rows
from .ritz import _converged_on_device

__all__: list[str] = []


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
