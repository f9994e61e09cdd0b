"""The Lanczos convergence test on the device: top two Ritz pairs of many small tridiagonal matrices.

After k steps each problem has a k x k symmetric tridiagonal T (``alpha`` on the diagonal, ``beta`` coupling
slot j to j + 1, dead slots parked at -8 and uncoupled, exactly as ``ncutfast._lanczos._ritz`` builds it).
The test (``_lanczos.convergence_test``) needs only theta1 >= theta2, the two largest eigenvalues, and the
last live components of their unit eigenvectors, so one program per problem computes just those, with no
eigensolver call and no host round trip (a batched dense ``eigh`` of T was the alternative: cuSOLVER loops
over the batch once k > 32):

- eigenvalues by multisection: the Sturm count (inertia of the LDL^T factorization of T - sigma I, the
  method of LAPACK's dstebz) at S shifts per eigenvalue per round narrows each bracket S + 1 times; ROUNDS
  rounds from the Gershgorin bracket reach rounding level;
- last components by the three-term recurrence run upwards from the last live slot (x_last = 1): the
  direction in which the eigenvector of an extremal, converging Ritz value grows, so the recurrence is
  stable, and 1 / ||x|| is the wanted component. It stops at a zero coupling (a breakdown splits T into
  blocks): then the estimate is that of the last block, exact if theta lives there and an overestimate
  (a later stop, never an early one) otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._lanczos import _PARK
from ._utils import block_sizes

__all__ = ["ritz_top2"]

# Smallest pivot magnitude of the Sturm count (LAPACK's pivmin: about the safe minimum).
PIVMIN = 1e-290


@triton.jit
def _sturm_count(tri, k, sig, PIVMIN: tl.constexpr):
    """Number of eigenvalues of T below each shift of ``sig``: the negative pivots of T - sigma I = LDL^T,
    d_j = (a_j - sigma) - c_j^2 / d_{j-1}, a pivot smaller than PIVMIN replaced by -PIVMIN. ``tri`` points
    at T's diagonal a (k entries) followed by its couplings c (c_j between j - 1 and j, c_0 = 0)."""
    d = tl.full(sig.shape, 1.0, tl.float64)
    count = tl.zeros(sig.shape, dtype=tl.int32)
    for j in range(0, k):
        c = tl.load(tri + k + j)
        d = (tl.load(tri + j) - sig) - c * c / d
        d = tl.where(tl.abs(d) < PIVMIN, -PIVMIN, d)
        count += (d < 0).to(tl.int32)
    return count


@triton.jit
def _ritz_core(alpha_ptr, beta_ptr, live_ptr, tri, base, k,
               KP: tl.constexpr, S: tl.constexpr, ROUNDS: tl.constexpr, PARK: tl.constexpr, PIVMIN: tl.constexpr):
    """(theta1, theta2, |s1_last|, |s2_last|) of the first k slots of the problem at ``base`` (see the module).

    T is first written to the scratch ``tri`` (2 KP fp64) as diagonal (dead slots parked) and couplings (0
    unless both slots are live), so the sequential loops load two numbers per slot. The shift vector holds
    S shifts for theta1 (index k - 1 in ascending order) and S for theta2 (index k - 2); each round keeps,
    per target t, the bracket [largest shift with count <= t, smallest shift with count > t]."""
    jj = tl.arange(0, KP)
    in_k = jj < k
    lv = tl.load(live_ptr + base + jj, mask=in_k, other=0) != 0
    diag = tl.where(lv, tl.load(alpha_ptr + base + jj, mask=in_k, other=0.0), PARK)
    prev = tl.load(live_ptr + base + jj - 1, mask=in_k & (jj > 0), other=0) != 0
    nxt = tl.load(live_ptr + base + jj + 1, mask=jj + 1 < k, other=0) != 0
    c_prev = tl.where(lv & prev, tl.load(beta_ptr + base + jj - 1, mask=in_k & (jj > 0), other=0.0), 0.0)
    c_next = tl.where(lv & nxt, tl.load(beta_ptr + base + jj, mask=jj + 1 < k, other=0.0), 0.0)
    tl.store(tri + jj, diag, mask=in_k)
    tl.store(tri + k + jj, c_prev, mask=in_k)
    tl.debug_barrier()
    radius = tl.abs(c_prev) + tl.abs(c_next)
    lo = tl.min(tl.where(in_k, diag - radius, float("inf")), axis=0)
    hi = tl.max(tl.where(in_k, diag + radius, -float("inf")), axis=0)
    pad = 1e-12 * (1.0 + hi - lo)  # Gershgorin discs are closed: open the bracket a little
    lo1 = lo - pad
    hi1 = hi + pad
    lo2 = lo1
    hi2 = hi1
    ii = tl.arange(0, 2 * S)
    first = ii < S
    frac = ((ii % S) + 1).to(tl.float64) / (S + 1)
    t = tl.where(first, k - 1, k - 2)
    for _ in range(0, ROUNDS):
        sig = tl.where(first, lo1 + (hi1 - lo1) * frac, lo2 + (hi2 - lo2) * frac)
        below = _sturm_count(tri, k, sig, PIVMIN) <= t
        lo1 = tl.maximum(lo1, tl.max(tl.where(first & below, sig, -float("inf")), axis=0))
        hi1 = tl.minimum(hi1, tl.min(tl.where(first & ~below, sig, float("inf")), axis=0))
        lo2 = tl.maximum(lo2, tl.max(tl.where(~first & below, sig, -float("inf")), axis=0))
        hi2 = tl.minimum(hi2, tl.min(tl.where(~first & ~below, sig, float("inf")), axis=0))
    theta1 = 0.5 * (lo1 + hi1)
    theta2 = 0.5 * (lo2 + hi2)
    # Upward recurrence from the last live slot: x_last = 1, x_{j-1} = ((theta - a_j) x_j - c_{j+1} x_{j+1})
    # / c_j, until a zero coupling. Both Ritz values at once; a growing x is rescaled, and a rescaled x means
    # |s_last| < 1e-100 (reported as 0).
    last = tl.max(tl.where(lv, jj, -1), axis=0)
    x1 = tl.full((), 1.0, tl.float64)
    x2 = x1
    y1 = tl.zeros((), tl.float64)  # x_{j+1}
    y2 = y1
    n1 = x1
    n2 = x1
    tiny1 = tl.zeros((), tl.int32)
    tiny2 = tiny1
    c_up = tl.zeros((), tl.float64)  # coupling between j and j + 1
    go = last > 0
    for i in range(0, tl.maximum(last, 0)):
        j = last - i
        c = tl.load(tri + k + j)
        a = tl.load(tri + j)
        go = go & (c != 0)
        cs = tl.where(c != 0, c, 1.0)
        z1 = ((theta1 - a) * x1 - c_up * y1) / cs
        z2 = ((theta2 - a) * x2 - c_up * y2) / cs
        y1 = tl.where(go, x1, y1)
        y2 = tl.where(go, x2, y2)
        x1 = tl.where(go, z1, x1)
        x2 = tl.where(go, z2, x2)
        n1 = tl.where(go, n1 + z1 * z1, n1)
        n2 = tl.where(go, n2 + z2 * z2, n2)
        big1 = go & (n1 > 1e200)
        big2 = go & (n2 > 1e200)
        tiny1 += big1.to(tl.int32)
        tiny2 += big2.to(tl.int32)
        x1 = tl.where(big1, x1 * 1e-100, x1)
        y1 = tl.where(big1, y1 * 1e-100, y1)
        n1 = tl.where(big1, n1 * 1e-200, n1)
        x2 = tl.where(big2, x2 * 1e-100, x2)
        y2 = tl.where(big2, y2 * 1e-100, y2)
        n2 = tl.where(big2, n2 * 1e-200, n2)
        c_up = c
    return theta1, theta2, tl.where(tiny1 > 0, 0.0, 1.0 / tl.sqrt(n1)), tl.where(tiny2 > 0, 0.0, 1.0 / tl.sqrt(n2))


@triton.jit
def _ritz_top2_kernel(
    alpha_ptr, beta_ptr, live_ptr, tri_ptr, out_ptr, M, k,
    KP: tl.constexpr, S: tl.constexpr, ROUNDS: tl.constexpr, PARK: tl.constexpr, PIVMIN: tl.constexpr,
):
    """Problem p = program_id(0): out[p] = (theta1, theta2, |s1_last|, |s2_last|) of its first k slots."""
    p = tl.program_id(0)
    theta1, theta2, s1, s2 = _ritz_core(alpha_ptr, beta_ptr, live_ptr, tri_ptr + p.to(tl.int64) * (2 * KP), p * M,
                                        k, KP, S, ROUNDS, PARK, PIVMIN)
    tl.store(out_ptr + p * 4 + 0, theta1)
    tl.store(out_ptr + p * 4 + 1, theta2)
    tl.store(out_ptr + p * 4 + 2, s1)
    tl.store(out_ptr + p * 4 + 3, s2)


@triton.jit
def _converged_on_device(alpha_ptr, beta_ptr, live_ptr, klen_ptr, tri, tol_ptr, p, M, k,
                         KP: tl.constexpr, S: tl.constexpr, ROUNDS: tl.constexpr, PARK: tl.constexpr,
                         PIVMIN: tl.constexpr):
    """``ncutfast._lanczos.convergence_test`` of problem p after k steps, inside a kernel (the persistent
    Lanczos kernel checks itself with it). tol_ptr holds (tol / 2, sqrt(tol)) in fp64."""
    base = p * M
    theta1, theta2, s1, s2 = _ritz_core(alpha_ptr, beta_ptr, live_ptr, tri, base, k, KP, S, ROUNDS, PARK, PIVMIN)
    jj = tl.arange(0, KP)
    last = tl.max(tl.where(tl.load(live_ptr + base + jj, mask=jj < k, other=0) != 0, jj, 0), axis=0)
    b_last = tl.abs(tl.load(beta_ptr + base + last))
    klen = tl.load(klen_ptr + p)
    gap = tl.where((klen >= 2) & (k >= 2), tl.minimum(theta1 - theta2, 1.0), 1.0)
    ok2 = (b_last * s2 <= tl.load(tol_ptr + 1) * gap) | (klen < 2) | (k < 2)
    return (b_last * s1 <= tl.load(tol_ptr) * gap) & ok2


def ritz_top2(alpha: torch.Tensor, beta: torch.Tensor, live: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top two Ritz values and last eigenvector components of the tridiagonal matrices of slots [0, k).

    Args:
        alpha, beta: float64 ``(b, m)`` contiguous, m >= k >= 1 (``ncutfast._lanczos.CycleState``).
        live: bool or int8 ``(b, m)``, the slots that took part.
        k: steps taken. Launch setting "ritz": S shifts per eigenvalue and ROUNDS rounds; the bracket
            shrinks (S + 1) ** ROUNDS times, to rounding level of values in [-1, 1].

    Returns:
        ``theta`` float64 (b, 2): theta1 >= theta2 (theta2 meaningless when k < 2);
        ``s_last`` float64 (b, 2): the inputs of ``ncutfast._lanczos.convergence_test``.
    """
    b, m = alpha.shape
    if not 1 <= k <= m or beta.shape != (b, m) or live.shape != (b, m):
        raise ValueError(f"alpha, beta, live: expected (b, m) tensors with 1 <= k <= m, got k={k}, "
                         f"{tuple(alpha.shape)}, {tuple(beta.shape)}, {tuple(live.shape)}")
    lv = live.view(torch.int8) if live.dtype == torch.bool else live
    out = torch.empty(b, 4, dtype=torch.float64, device=alpha.device)
    if b:
        cfg = block_sizes("ritz")
        kp = max(2, triton.next_power_of_2(k))
        tri = torch.empty(b, 2 * kp, dtype=torch.float64, device=alpha.device)
        _ritz_top2_kernel[(b,)](
            alpha.contiguous(), beta.contiguous(), lv.contiguous(), tri, out, m, k,
            KP=kp, S=cfg["S"], ROUNDS=cfg["ROUNDS"], PARK=_PARK, PIVMIN=PIVMIN, num_warps=cfg["num_warps"],
        )
    return out[:, :2], out[:, 2:]
