"""Batched, deflated Lanczos for the Fiedler vector of many normalized-cut problems at once.

With M = D^-1/2 W D^-1/2 the generalized problem (D - W) x = lambda D x becomes M y = (1 - lambda) y with
y = D^1/2 x. M's largest eigenvalue is 1 with eigenvector y0 = sqrt(d) / ||sqrt(d)||, known in closed form;
keeping every Krylov vector orthogonal to y0 ("deflation") makes the wanted y the *largest* remaining
eigenvector, which Lanczos finds fastest (shared/spec/numerics.md).

The driver is operator-agnostic: backends pass ``op(v, idx)`` applying M to a ``(b, N)`` float64 block of
vectors for the problems ``idx`` (an int64 index tensor into the batch). Everything stays on the device;
the host synchronizes once per ``check_every`` steps to test convergence. Problems of different sizes share
the batch through zero padding: M, y0 and all Krylov vectors are zero beyond ``lengths[b]``.

Algorithm per cycle (all problems in lock-step): Lanczos with full reorthogonalization (classical
Gram-Schmidt applied twice against the basis and y0). A breakdown (an invariant subspace was found) is
continued with a fresh vector orthogonal to everything so far (so degenerate eigenvalues are found too);
when no fresh direction is left, that problem's space is exhausted and its Ritz values are exact. Every
``check_every`` steps the small tridiagonal matrices are solved with a batched ``eigh`` and the residual
estimate |beta_k s_k| of the top Ritz pair is tested against ``tol`` times the Ritz gap theta1 - theta2
(residual / gap bounds the eigenvector's angle error, and the ncut spectra have tiny absolute gaps), and
the second pair's against sqrt(tol) times that gap; converged problems then stop iterating (the batch is
compacted once half of it has). Problems that have not converged when the Krylov space is full are
restarted from their current Ritz vector, until ``max_iter`` steps are spent.

A backend may replace the op-by-op step between two checks with fused kernels (``Steps``: the Triton
backend's ``kernels.operator.FusedSteps``), which also supply the Ritz pairs of the checks and of the end of
a cycle without an eigensolver (``kernels.ritz``; torch's batched ``eigh`` on CUDA loops over the batch
once T is larger than 32 x 32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .contract import BREAKDOWN, KRYLOV_DIM, PARK

__all__ = ["CycleState", "LanczosResult", "Steps", "convergence_test", "init_state", "lanczos_fiedler", "start_vectors"]

#: ``op(v, idx) -> M v`` for a ``(b, N)`` float64 block v of the problems ``idx`` (int64 ``(b,)``).
Operator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]



@dataclass
class LanczosResult:
    """Per problem: top two Ritz values of the deflated M, the unit Ritz vector, steps taken."""

    theta1: torch.Tensor  # (B,) float64
    theta2: torch.Tensor  # (B,) float64, NaN where the deflated space has < 2 dimensions
    y: torch.Tensor  # (B, N) float64, unit norm, orthogonal to y0
    iterations: torch.Tensor  # (B,) int64


def start_vectors(lengths: torch.Tensor, n_max: int, salt: int, device: torch.device) -> torch.Tensor:
    """Deterministic pseudo-random start vectors ``(B, n_max)`` float64, zero beyond each length.

    Entry j depends only on (j, salt), not on the batch or its padding, so a problem gets the same start
    vector alone or in any batch. An integer hash keeps it bit-identical on every device.
    """
    j = torch.arange(n_max, device=device, dtype=torch.int64)
    h = (j * 2654435761 + (salt + 1) * 40503) % 4294967296
    h = h ^ (h >> 16)
    h = (h * 0x45D9F3B) % 4294967296
    h = h ^ (h >> 16)
    v = h.to(torch.float64) / 4294967296.0 - 0.5
    valid = j[None, :] < lengths.to(device)[:, None]
    return torch.where(valid, v[None, :], torch.zeros((), dtype=torch.float64, device=device))


def _project_out(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove from w (b, N) its components along the orthonormal rows of basis (b, k, N): classical
    Gram-Schmidt applied twice ("twice is enough"), as two batched mat-vecs per pass."""
    for _ in range(2):
        h = torch.bmm(basis, w[:, :, None])
        w = w - torch.bmm(h.transpose(1, 2), basis)[:, 0]
    return w


def _ritz(alpha: torch.Tensor, beta: torch.Tensor, live: torch.Tensor, k: int):
    """Eigen-decompose the (b, k, k) tridiagonal matrices of slots [0, k); dead slots are parked.

    ``beta[:, j]`` couples slot j to slot j + 1; it is 0 after a breakdown, which splits T into blocks.
    """
    b = alpha.shape[0]
    idx = torch.arange(k, device=alpha.device)
    lv = live[:, :k]
    diag = torch.where(lv, alpha[:, :k], torch.full_like(alpha[:, :k], PARK))
    off = torch.where(lv[:, 1:] & lv[:, :-1], beta[:, : k - 1], torch.zeros_like(beta[:, : k - 1]))
    t = torch.zeros(b, k, k, dtype=torch.float64, device=alpha.device)
    t[:, idx, idx] = diag
    t[:, idx[1:], idx[:-1]] = off
    t[:, idx[:-1], idx[1:]] = off
    return torch.linalg.eigh(t)


def convergence_test(theta: torch.Tensor, s_last: torch.Tensor, beta: torch.Tensor, live: torch.Tensor, k: int,
                     tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The convergence test of a problem after k steps, from its top two Ritz pairs: ``(conv, klen)``.

    theta: (b, 2) the largest two eigenvalues theta1 >= theta2 of T (k x k, dead slots parked; theta2 is
    ignored when k < 2); s_last: (b, 2) |last live component| of their unit eigenvectors. The top pair must
    have residual |beta_last s_last| <= tol * min(1, theta1 - theta2) / 2 (its vector is the answer); the
    second pair, which only supplies lambda3, residual <= sqrt(tol) * min(1, theta1 - theta2) (its Ritz
    value's error, about residual^2 / gap, is then below tol * gap). ``last`` is each problem's last live
    slot; with fewer than two live slots the gap counts as 1.
    """
    lv = live[:, :k]
    klen = lv.sum(1)
    slots = torch.arange(k, device=beta.device)
    last = torch.where(lv, slots, torch.full_like(slots, -1)).max(1).values.clamp_min(0)
    b_last = beta.gather(1, last[:, None])[:, 0].abs()
    gap = (theta[:, 0] - theta[:, 1]).clamp(max=1.0) if k >= 2 else torch.ones_like(theta[:, 0])
    gap = torch.where(klen >= 2, gap, torch.ones_like(gap))
    conv = b_last * s_last[:, 0] <= 0.5 * tol * gap
    if k >= 2:
        conv = conv & ((b_last * s_last[:, 1] <= tol**0.5 * gap) | (klen < 2))
    return conv, klen


def _eigh_top2(alpha: torch.Tensor, beta: torch.Tensor, live: torch.Tensor, k: int):
    """From a batched eigh of T (``_ritz``): theta (b, 2), theta1 >= theta2; s_last (b, 2), |last live
    component| of their eigenvectors; s1 (b, k), the eigenvector of theta1."""
    evals, evecs = _ritz(alpha, beta, live, k)
    slots = torch.arange(k, device=alpha.device)
    last = torch.where(live[:, :k], slots, torch.full_like(slots, -1)).max(1).values.clamp_min(0)
    top = evecs[:, :, -2:].flip(-1) if k >= 2 else evecs[:, :, -1:].expand(-1, -1, 2)
    s_last = top.gather(1, last[:, None, None].expand(-1, 1, 2))[:, 0].abs()
    theta = evals[:, -2:].flip(-1) if k >= 2 else evals[:, -1:].expand(-1, 2)
    return theta, s_last, evecs[:, :, -1]


def _converged(alpha, beta, live, k, tol):
    """``_eigh_top2`` and ``convergence_test``: (theta, s1, conv, klen)."""
    theta, s_last, s1 = _eigh_top2(alpha, beta, live, k)
    conv, klen = convergence_test(theta, s_last, beta, live, k, tol)
    return theta, s1, conv, klen


def lanczos_fiedler(
    op: Operator,
    y0: torch.Tensor,
    lengths: torch.Tensor,
    *,
    tol: float,
    max_iter: int,
    krylov_dim: int = KRYLOV_DIM,
    check_every: int | None = None,
    steps: Steps | None = None,
) -> LanczosResult:
    """Largest eigenpair of M restricted to the complement of y0, for a padded batch.

    Args:
        op: ``op(v, idx) -> M v`` for v ``(b, N)`` float64 and idx ``(b,)`` int64 problem indices.
        y0: ``(B, N)`` float64 unit top eigenvectors of M (zero beyond ``lengths``).
        lengths: ``(B,)`` int64 problem sizes (each >= 2; size-1 problems have no deflated space).
        tol: stop a problem when its residual estimate |beta_k s_k| <= tol * min(1, theta1 - theta2) / 2,
            i.e. when the Ritz vector's angle error is about tol, and the second Ritz pair (lambda3) has
            residual <= sqrt(tol) * min(1, theta1 - theta2).
        max_iter: total Lanczos steps per problem over all restart cycles.
        krylov_dim: basis size of one cycle (memory: B * (krylov_dim + 2) * N float64).
        check_every: steps between convergence checks, each one host synchronization (default: 2 on a CPU,
            where a check costs nothing, 6 on a GPU).
        steps: fused steps of the backend (see ``Steps``); default: op by op (``_torch_step``).
    """
    device = y0.device
    if check_every is None:
        check_every = 2 if device.type == "cpu" else 6
    bsz, n_max = y0.shape
    lengths_dev = lengths.to(device)
    theta1 = torch.full((bsz,), float("nan"), dtype=torch.float64, device=device)
    theta2 = torch.full_like(theta1, float("nan"))
    y_out = torch.zeros_like(y0)
    iters = torch.zeros(bsz, dtype=torch.int64, device=device)

    todo = torch.arange(bsz, device=device)
    v0 = start_vectors(lengths, n_max, 0, device)
    spent = 0
    cycle = 0
    while todo.numel() and spent < max_iter:
        m = min(krylov_dim, max_iter - spent, n_max)
        th1, th2, y, taken, conv = _cycle(op, y0[todo], lengths_dev[todo], v0[todo], todo, m, tol, check_every,
                                          salt=cycle, steps=steps)
        theta1[todo], theta2[todo], y_out[todo] = th1, th2, y
        iters[todo] += taken
        spent += int(taken.max())
        todo, v0 = todo[~conv], y_out.clone()
        cycle += 1
    return LanczosResult(theta1, theta2, y_out, iters)


@dataclass
class CycleState:
    """Device state of one Lanczos cycle of b problems and at most m steps, updated in place (so that a
    CUDA graph captured over a few steps stays valid for the whole cycle).

    basis: (b, m + 2, N) float64; row 0 is y0, row j + 1 the j-th Lanczos vector. alpha, beta: (b, m)
    float64, ``beta[:, j]`` couples slot j to j + 1 (0 after a breakdown). live: (b, m) bool, slots that
    took part. klen: (b,) int64 live slots so far; cap: (b,) int64 = n - 1, the deflated dimension.
    done: (b,) bool, the problem stopped iterating (converged or space exhausted); stalled: (b,) bool, it
    broke down since the last check. idx: (b,) int64 problem indices into the operator's batch.
    """

    basis: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    live: torch.Tensor
    klen: torch.Tensor
    cap: torch.Tensor
    done: torch.Tensor
    stalled: torch.Tensor
    idx: torch.Tensor


class Steps(Protocol):
    """Fused Lanczos steps (a backend's alternative to the op-by-op step of ``_cycle``).

    ``begin(state, tol, check_every)`` starts a cycle; ``run(j0, j1)`` performs steps j0, ..., j1 - 1 of it
    on the device, without host synchronization, with exactly the semantics of ``_torch_step`` for every
    problem (a problem that is done or stalled leaves its slots dead); ``ritz(k)`` supplies the Ritz data of
    the checks and of the end of the cycle. A ``self_checking`` implementation also freezes converged
    problems itself every ``check_every`` steps (as the checks would, except that it cannot continue after a
    breakdown), and the driver then runs a first cycle as one chunk (``begin`` without ``tol``: no checks
    of its own).
    """

    self_checking: bool

    def begin(self, state: CycleState, tol: float | None, check_every: int) -> None: ...

    def run(self, j0: int, j1: int) -> None: ...

    def ritz(self, k: int, vectors: bool = False) -> tuple[torch.Tensor, ...]:
        """The top two Ritz pairs of T after k steps, without an eigensolver: theta (b, 2), theta1 >= theta2;
        s_last (b, 2), |last live component| of their unit eigenvectors (``convergence_test``'s inputs);
        with ``vectors`` also (b, k) the unit eigenvector of theta1."""
        ...


def _torch_step(op: Operator, st: CycleState, j: int, run: slice | torch.Tensor, sub: torch.Tensor) -> None:
    """Lanczos step j for the problems ``run`` (the others are done): w = M q, alpha = q.w, w projected
    off y0 and the basis (CGS2), beta = ||w||; a breakdown stalls the problem, a full space finishes it."""
    act = ~st.done & ~st.stalled  # frozen problems are done, so this is False outside ``run``
    q = st.basis[run, j + 1]
    w = op(q, sub)
    a = (q * w).sum(-1)
    w = _project_out(w, st.basis[run, : j + 2])
    bj = w.norm(dim=-1)
    act_r = act[run]
    broke_r = act_r & (bj <= BREAKDOWN)
    st.live[:, j] = act
    st.alpha[run, j] = torch.where(act_r, a, torch.zeros_like(a))
    st.beta[run, j] = torch.where(act_r & ~broke_r, bj, torch.zeros_like(bj))
    broke = torch.zeros_like(act)
    broke[run] = broke_r
    st.klen += act.to(torch.int64)
    st.done |= act & (st.klen >= st.cap)
    st.stalled |= broke
    grow = (act & ~broke & ~st.done)[run]
    st.basis[run, j + 2] = torch.where(grow[:, None], w / bj.clamp_min(1e-300)[:, None], torch.zeros_like(w))


def init_state(y0: torch.Tensor, lengths: torch.Tensor, v0: torch.Tensor, idx: torch.Tensor, m: int) -> CycleState:
    """State before step 0 of a cycle: basis rows y0 and v0 projected off y0, normalized; nothing live."""
    b, n = y0.shape
    device = y0.device
    f64 = dict(dtype=torch.float64, device=device)
    basis = torch.zeros(b, m + 2, n, **f64)
    basis[:, 0] = y0
    q = _project_out(v0, basis[:, :1])
    basis[:, 1] = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    flag = dict(dtype=torch.bool, device=device)
    st = CycleState(basis=basis, alpha=torch.zeros(b, m, **f64), beta=torch.zeros(b, m, **f64),
                    live=torch.zeros(b, m, **flag), klen=torch.zeros(b, dtype=torch.int64, device=device),
                    # the deflated space has n - 1 dimensions: once that many slots are live, it is spanned
                    cap=(lengths - 1).to(device), done=torch.zeros(b, **flag), stalled=torch.zeros(b, **flag),
                    idx=idx)
    st.done |= st.klen >= st.cap
    return st


def _cycle(op, y0, lengths, v0, idx, m, tol, check_every, salt, steps=None):
    """One Lanczos cycle of at most m steps for the problems idx; returns Ritz data and convergence.

    ``basis`` row 0 holds y0, so one projection removes y0 and the Lanczos vectors (rows 1..j+1) together.
    A problem whose new vector vanishes (breakdown: an invariant subspace) stalls until the next check,
    where it continues from a fresh direction orthogonal to everything (so eigenvalues of multiplicity > 1
    are found too) or, if none is left, is done: its Ritz values are then exact. The steps between two
    checks run op by op (``_torch_step``) or, given ``steps``, fused by the backend.
    """
    b, n = y0.shape
    device = y0.device
    st = init_state(y0, lengths, v0, idx, m)
    basis = st.basis
    revived = torch.zeros(b, dtype=torch.bool, device=device)
    exhausted = torch.zeros(b, dtype=torch.bool, device=device)  # no fresh direction was left
    chunk = check_every
    if steps is not None:
        # Only a first cycle checks itself: a restart exists because a problem did not converge, often after
        # a breakdown, which only the host's checks can continue (with a fresh direction).
        self_check = steps.self_checking and salt == 0
        steps.begin(st, tol if self_check else None, check_every)
        chunk = m if self_check else check_every
    # Problems still iterating (op-by-op steps only): all (a slice, no copies) until checks have frozen
    # half of them; then an index tensor, kept as one object until the next compaction so that ``op`` can
    # cache its gathers. Fused steps skip frozen problems inside their kernels instead.
    run: slice | torch.Tensor = slice(None)
    sub = idx
    k = 0
    while k < m:
        j0, k = k, min(m, k + chunk)
        if steps is None:
            for j in range(j0, k):
                _torch_step(op, st, j, run, sub)
            conv = _converged(st.alpha, st.beta, st.live, k, tol)[2]
        else:
            steps.run(j0, k)
            conv = convergence_test(*steps.ritz(k), st.beta, st.live, k, tol)[0]
        # A first breakdown is not trusted (the top eigenvalue may be repeated); after one fresh
        # continuation the Ritz values of all blocks together decide. Converged problems freeze.
        st.done |= conv & (~st.stalled | revived)
        all_done, any_stalled = torch.stack([st.done.all(), st.stalled.any()]).tolist()  # one sync
        if all_done:
            break
        if k < m and any_stalled:
            fresh = _project_out(start_vectors(lengths, n, salt * 1000 + k, device), basis[:, : k + 1])
            fn = fresh.norm(dim=-1)
            revive = st.stalled & (fn > 1e-8)
            exhausted |= st.stalled & ~revive
            st.done |= exhausted
            basis[:, k + 1] = torch.where(revive[:, None], fresh / fn.clamp_min(1e-300)[:, None], basis[:, k + 1])
            revived |= revive
            st.stalled.zero_()
        # Compact once at most half of the iterating problems are left: a gather of their operator
        # data costs about two mat-vecs, so frozen problems ride along until then.
        if steps is None:
            running = torch.nonzero(~st.done).flatten()
            if 2 * running.numel() <= (b if isinstance(run, slice) else run.numel()):
                run, sub = running, idx[running]
    # Slots past the last live one (a self-checking cycle runs to m) only pad T: drop them.
    k = max(1, int((st.live[:, :k].any(0) * torch.arange(1, k + 1, device=device)).max()))
    # The final test does not take ``done`` on trust: problems frozen by a check pass it again (their T has
    # not changed since).
    theta, s1, conv, klen = _final_ritz(st, k, tol, steps)
    conv = (conv & (~st.stalled | revived)) | exhausted | (klen >= st.cap)
    y = torch.bmm(s1[:, None, :], basis[:, 1 : k + 1])[:, 0]
    y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    th2 = torch.where(klen >= 2, theta[:, 1], torch.full_like(theta[:, 1], float("nan")))
    return theta[:, 0], th2, y, klen, conv


def _final_ritz(st: CycleState, k: int, tol: float, steps: Steps | None):
    """(theta (b, 2), top eigenvector s1 (b, k), conv, klen) at the end of a cycle: from ``steps.ritz`` when
    given (rows whose vector came out non-finite or zero fall back to eigh), else from eigh."""
    if steps is None:
        return _converged(st.alpha, st.beta, st.live, k, tol)
    theta, s_last, s1 = steps.ritz(k, vectors=True)
    bad = ~torch.isfinite(s1).all(1) | (s1.abs().sum(1) == 0)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()
        theta[rows], s_last[rows], s1[rows] = _eigh_top2(st.alpha[rows], st.beta[rows], st.live[rows], k)
    conv, klen = convergence_test(theta, s_last, st.beta, st.live, k, tol)
    return theta, s1, conv, klen
