"""Ritz pairs of the Lanczos driver on the device: top two of many small tridiagonal matrices.

After k steps each problem has a k x k symmetric tridiagonal T (``alpha`` on the diagonal, ``beta`` coupling
slot j to j + 1, dead slots parked at -8 and uncoupled, exactly as ``ncutfast.backends.lanczos._ritz`` builds it).
The convergence test (``backends.lanczos.convergence_test``) needs only theta1 >= theta2, the two largest
eigenvalues, and the last live components of their unit eigenvectors, and the end of a cycle the eigenvector
of theta1; one program per problem computes just those, with no eigensolver call and no host round trip
(torch's batched ``eigh`` on CUDA loops over the batch once k > 32):

- eigenvalues by multisection: the Sturm count (inertia of the LDL^T factorization of T - sigma I, the
  method of LAPACK's dstebz) at S shifts per eigenvalue per round narrows each bracket S + 1 times; ROUNDS
  rounds from the Gershgorin bracket reach rounding level;
- eigenvectors by twisted factorization (the core step of MRRR, LAPACK's dstemr): top-down and bottom-up
  pivots of T - theta I, the twist r where |gamma_r| is smallest (the eigenvector's peak), and the two
  recurrences from r outwards, each in its stable direction. A zero coupling (a breakdown) stops them, so
  a split T is handled block by block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends.contract import PARK
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
def _pivots(tri, piv, k, theta1, theta2, PIVMIN: tl.constexpr):
    """Pivots of T - theta I for both Ritz values, stored at ``piv`` (4 rows of k: top-down d+ of theta1 and
    theta2, then bottom-up d- of theta1 and theta2): d+_j = (a_j - theta) - c_j^2 / d+_{j-1} (c_j couples
    j - 1 and j), d-_j = (a_j - theta) - c_{j+1}^2 / d-_{j+1}; a pivot below PIVMIN in size becomes -PIVMIN."""
    p1 = tl.full((), 1.0, tl.float64)
    p2 = p1
    for j in range(0, k):
        c = tl.load(tri + k + j)
        a = tl.load(tri + j)
        p1 = (a - theta1) - c * c / p1
        p2 = (a - theta2) - c * c / p2
        p1 = tl.where(tl.abs(p1) < PIVMIN, -PIVMIN, p1)
        p2 = tl.where(tl.abs(p2) < PIVMIN, -PIVMIN, p2)
        tl.store(piv + j, p1)
        tl.store(piv + k + j, p2)
    m1 = tl.full((), 1.0, tl.float64)
    m2 = m1
    for t in range(0, k):
        j = k - 1 - t
        c = tl.load(tri + k + j + 1, mask=j + 1 < k, other=0.0)
        a = tl.load(tri + j)
        m1 = (a - theta1) - c * c / m1
        m2 = (a - theta2) - c * c / m2
        m1 = tl.where(tl.abs(m1) < PIVMIN, -PIVMIN, m1)
        m2 = tl.where(tl.abs(m2) < PIVMIN, -PIVMIN, m2)
        tl.store(piv + 2 * k + j, m1)
        tl.store(piv + 3 * k + j, m2)


@triton.jit
def _twist(tri, piv, k, theta, row: tl.constexpr, KP: tl.constexpr):
    """Twist index r = argmin_j |gamma_j|, gamma_j = d+_j + d-_j - (a_j - theta): where the eigenvector of
    theta is largest (up to a factor sqrt(k)), so both recurrences of ``_ritz_core`` run towards it."""
    jj = tl.arange(0, KP)
    ok = jj < k
    gamma = (tl.load(piv + row * k + jj, mask=ok, other=0.0) + tl.load(piv + (2 + row) * k + jj, mask=ok, other=0.0)
             - (tl.load(tri + jj, mask=ok, other=0.0) - theta))
    g = tl.where(ok, tl.abs(gamma), float("inf"))
    return tl.min(tl.where(g == tl.min(g, axis=0), jj, KP), axis=0)


@triton.jit
def _twist_step(z, nrm2, at_last, ratio, active, is_last):
    """One entry of a twisted-factorization recurrence: z <- -ratio z (coupling over pivot), its square
    added to the norm, and kept if this is the last live slot; nothing where ``active`` is False."""
    z = tl.where(active, -ratio * z, z)
    return z, nrm2 + tl.where(active, z * z, 0.0), tl.where(active & is_last, z, at_last)


@triton.jit
def _ritz_core(alpha_ptr, beta_ptr, live_ptr, tri, vec, base, k,
               KP: tl.constexpr, S: tl.constexpr, ROUNDS: tl.constexpr, PARK: tl.constexpr, PIVMIN: tl.constexpr,
               STORE: tl.constexpr):
    """(theta1, theta2, |s1_last|, |s2_last|) of the first k slots of the problem at ``base`` (see the module).
    With STORE, the unit eigenvector of theta1 is also written to ``vec`` (k fp64, sign arbitrary).

    ``tri`` is scratch of 6 KP fp64: T's diagonal (dead slots parked) and couplings (0 unless both slots are
    live; c_j couples j - 1 and j) so the sequential loops load two numbers per slot, then the pivots. The
    shift vector holds S shifts for theta1 (index k - 1 in ascending order) and S for theta2 (index k - 2);
    each round keeps, per target t, the bracket [largest shift with count <= t, smallest shift with count >
    t]. A non-finite norm (an overflowed recurrence) reports |s_last| = 1: the test then does not pass."""
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
    last = tl.max(tl.where(lv, jj, -1), axis=0)
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
    # Eigenvectors by twisted factorization (the core step of MRRR): z_r = 1 at the twist r, then
    # z_i = -(c_{i+1} / d+_i) z_{i+1} upwards for i < r and z_i = -(c_i / d-_i) z_{i-1} downwards for i > r,
    # each recurrence running towards the vector's peak, where it is stable. A zero coupling stops it: the
    # vector stays in r's block of a split T.
    piv = tri + 2 * KP
    _pivots(tri, piv, k, theta1, theta2, PIVMIN)
    tl.debug_barrier()
    r1 = _twist(tri, piv, k, theta1, 0, KP)
    r2 = _twist(tri, piv, k, theta2, 1, KP)
    if STORE:  # z_r = 1; entries the recurrences do not reach (other blocks, dead slots) stay 0
        tl.store(vec + jj, tl.where(jj == r1, 1.0, 0.0), mask=in_k)
        tl.debug_barrier()  # before the loops' scalar stores, which other threads may issue
    z1 = tl.full((), 1.0, tl.float64)
    z2 = z1
    n1 = z1
    n2 = z1
    at_last1 = tl.where(last == r1, z1, 0.0)  # fp64 like the loop's values (a bare 1.0 would be fp32)
    at_last2 = tl.where(last == r2, z1, 0.0)
    for i_ in range(0, k):  # upwards: i = k - 1, ..., 0, active below the twist
        i = k - 1 - i_
        c = tl.load(tri + k + i + 1, mask=i + 1 < k, other=0.0)
        z1, n1, at_last1 = _twist_step(z1, n1, at_last1, c / tl.load(piv + i), i < r1, i == last)
        z2, n2, at_last2 = _twist_step(z2, n2, at_last2, c / tl.load(piv + k + i), i < r2, i == last)
        if STORE:
            tl.store(vec + i, z1, mask=i < r1)
    z1 = tl.full((), 1.0, tl.float64)
    z2 = z1
    for i in range(0, k):  # downwards, active above the twist
        c = tl.load(tri + k + i)
        z1, n1, at_last1 = _twist_step(z1, n1, at_last1, c / tl.load(piv + 2 * k + i), i > r1, i == last)
        z2, n2, at_last2 = _twist_step(z2, n2, at_last2, c / tl.load(piv + 3 * k + i), i > r2, i == last)
        if STORE:
            tl.store(vec + i, z1, mask=i > r1)
    finite1 = n1 < float("inf")  # False for inf and NaN
    finite2 = n2 < float("inf")
    if STORE:
        tl.debug_barrier()
        x = tl.load(vec + jj, mask=in_k, other=0.0)
        tl.debug_barrier()
        tl.store(vec + jj, x / tl.sqrt(n1), mask=in_k)
    s1 = tl.where(finite1, tl.abs(at_last1) / tl.sqrt(n1), 1.0)
    s2 = tl.where(finite2, tl.abs(at_last2) / tl.sqrt(n2), 1.0)
    return theta1, theta2, s1, s2


@triton.jit
def _ritz_top2_kernel(
    alpha_ptr, beta_ptr, live_ptr, tri_ptr, vec_ptr, out_ptr, M, k,
    KP: tl.constexpr, S: tl.constexpr, ROUNDS: tl.constexpr, PARK: tl.constexpr, PIVMIN: tl.constexpr,
    STORE: tl.constexpr,
):
    """Problem p = program_id(0): out[p] = (theta1, theta2, |s1_last|, |s2_last|) of its first k slots; with
    STORE also vec[p, :k] = the unit eigenvector of theta1 (sign arbitrary)."""
    p = tl.program_id(0)
    theta1, theta2, s1, s2 = _ritz_core(alpha_ptr, beta_ptr, live_ptr, tri_ptr + p.to(tl.int64) * (6 * KP),
                                        vec_ptr + p.to(tl.int64) * KP, p * M, k, KP, S, ROUNDS, PARK, PIVMIN, STORE)
    tl.store(out_ptr + p * 4 + 0, theta1)
    tl.store(out_ptr + p * 4 + 1, theta2)
    tl.store(out_ptr + p * 4 + 2, s1)
    tl.store(out_ptr + p * 4 + 3, s2)


@triton.jit
def _converged_on_device(alpha_ptr, beta_ptr, live_ptr, klen_ptr, tri, tol_ptr, p, M, k,
                         KP: tl.constexpr, S: tl.constexpr, ROUNDS: tl.constexpr, PARK: tl.constexpr,
                         PIVMIN: tl.constexpr):
    """``ncutfast.backends.lanczos.convergence_test`` of problem p after k steps, inside a kernel (the persistent
    Lanczos kernel checks itself with it). tol_ptr holds (tol / 2, sqrt(tol)) in fp64."""
    base = p * M
    theta1, theta2, s1, s2 = _ritz_core(alpha_ptr, beta_ptr, live_ptr, tri, tri, base, k, KP, S, ROUNDS, PARK,
                                        PIVMIN, False)
    jj = tl.arange(0, KP)
    last = tl.max(tl.where(tl.load(live_ptr + base + jj, mask=jj < k, other=0) != 0, jj, 0), axis=0)
    b_last = tl.abs(tl.load(beta_ptr + base + last))
    klen = tl.load(klen_ptr + p)
    gap = tl.where((klen >= 2) & (k >= 2), tl.minimum(theta1 - theta2, 1.0), 1.0)
    ok2 = (b_last * s2 <= tl.load(tol_ptr + 1) * gap) | (klen < 2) | (k < 2)
    return (b_last * s1 <= tl.load(tol_ptr) * gap) & ok2


def ritz_top2(alpha: torch.Tensor, beta: torch.Tensor, live: torch.Tensor, k: int, *, vectors: bool = False):
    """Top two Ritz values and last eigenvector components of the tridiagonal matrices of slots [0, k).

    Args:
        alpha, beta: float64 ``(b, m)`` contiguous, m >= k >= 1 (``ncutfast.backends.lanczos.CycleState``).
        live: bool or int8 ``(b, m)``, the slots that took part.
        k: steps taken. Launch setting "ritz": S shifts per eigenvalue and ROUNDS rounds; the bracket
            shrinks (S + 1) ** ROUNDS times, to rounding level of values in [-1, 1].

    Returns:
        ``theta`` float64 (b, 2): theta1 >= theta2 (theta2 meaningless when k < 2);
        ``s_last`` float64 (b, 2): the inputs of ``ncutfast.backends.lanczos.convergence_test``;
        with ``vectors``, also ``s1`` float64 (b, k): the unit eigenvector of theta1 (sign arbitrary; exact
        only where T is one block: a zero coupling or a dead slot inside the live slots splits it, and then
        it is the last block's vector).
    """
    b, m = alpha.shape
    if not 1 <= k <= m or beta.shape != (b, m) or live.shape != (b, m):
        raise ValueError(f"alpha, beta, live: expected (b, m) tensors with 1 <= k <= m, got k={k}, "
                         f"{tuple(alpha.shape)}, {tuple(beta.shape)}, {tuple(live.shape)}")
    lv = live.view(torch.int8) if live.dtype == torch.bool else live
    out = torch.empty(b, 4, dtype=torch.float64, device=alpha.device)
    kp = max(2, triton.next_power_of_2(k))
    vec = torch.empty(b, kp, dtype=torch.float64, device=alpha.device)
    if b:
        cfg = block_sizes("ritz")
        tri = torch.empty(b, 6 * kp, dtype=torch.float64, device=alpha.device)
        _ritz_top2_kernel[(b,)](
            alpha.contiguous(), beta.contiguous(), lv.contiguous(), tri, vec, out, m, k,
            KP=kp, S=cfg["S"], ROUNDS=cfg["ROUNDS"], PARK=PARK, PIVMIN=PIVMIN, STORE=vectors,
            num_warps=cfg["num_warps"],
        )
    if vectors:
        return out[:, :2], out[:, 2:], vec[:, :k]
    return out[:, :2], out[:, 2:]
