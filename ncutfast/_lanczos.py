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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["LanczosResult", "lanczos_fiedler", "start_vectors"]

#: ``op(v, idx) -> M v`` for a ``(b, N)`` float64 block v of the problems ``idx`` (int64 ``(b,)``).
Operator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Below this norm a new Lanczos vector is rounding noise (||M|| <= 1, so this is relative too); the
# wanted eigenvalues cluster within ~1e-5 of 1, so genuine betas can be as small as 1e-11.
_BREAKDOWN = 1e-13
# Diagonal entry that parks padded rows of a tridiagonal matrix far below M's spectrum [-1, 1].
_PARK = -8.0


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
    diag = torch.where(lv, alpha[:, :k], torch.full_like(alpha[:, :k], _PARK))
    off = torch.where(lv[:, 1:] & lv[:, :-1], beta[:, : k - 1], torch.zeros_like(beta[:, : k - 1]))
    t = torch.zeros(b, k, k, dtype=torch.float64, device=alpha.device)
    t[:, idx, idx] = diag
    t[:, idx[1:], idx[:-1]] = off
    t[:, idx[:-1], idx[1:]] = off
    return torch.linalg.eigh(t)


def _gap(evals: torch.Tensor, klen: torch.Tensor) -> torch.Tensor:
    """min(1, theta1 - theta2): residual / gap bounds the Ritz vector's angle error."""
    if evals.shape[1] < 2:
        return torch.ones_like(evals[:, -1])
    gap = (evals[:, -1] - evals[:, -2]).clamp(max=1.0)
    return torch.where(klen >= 2, gap, torch.ones_like(gap))


def _converged(alpha, beta, live, k, tol):
    """Ritz decomposition after k steps and the convergence test.

    The top pair must have residual |beta_last s_last| <= tol * min(1, theta1 - theta2) / 2 (its vector is
    the answer); the second pair, which only supplies lambda3, residual <= sqrt(tol) * min(1, theta1 - theta2)
    (its Ritz value's error, about residual^2 / gap, is then below tol * gap). ``last`` is each problem's last
    live slot.
    """
    evals, evecs = _ritz(alpha, beta, live, k)
    lv = live[:, :k]
    klen = lv.sum(1)
    slots = torch.arange(k, device=alpha.device)
    last = torch.where(lv, slots, torch.full_like(slots, -1)).max(1).values.clamp_min(0)
    b_last = beta.gather(1, last[:, None])[:, 0].abs()
    est1 = b_last * evecs[:, :, -1].gather(1, last[:, None])[:, 0].abs()
    gap = _gap(evals, klen)
    conv = est1 <= 0.5 * tol * gap
    if k >= 2:
        est2 = b_last * evecs[:, :, -2].gather(1, last[:, None])[:, 0].abs()
        conv = conv & ((est2 <= tol**0.5 * gap) | (klen < 2))
    return evals, evecs, conv, klen


def lanczos_fiedler(
    op: Operator,
    y0: torch.Tensor,
    lengths: torch.Tensor,
    *,
    tol: float,
    max_iter: int,
    krylov_dim: int = 48,
    check_every: int | None = None,
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
        th1, th2, y, steps, conv = _cycle(op, y0[todo], lengths_dev[todo], v0[todo], todo, m, tol, check_every,
                                          salt=cycle)
        theta1[todo], theta2[todo], y_out[todo] = th1, th2, y
        iters[todo] += steps
        spent += int(steps.max())
        todo, v0 = todo[~conv], y_out.clone()
        cycle += 1
    return LanczosResult(theta1, theta2, y_out, iters)


def _cycle(op, y0, lengths, v0, idx, m, tol, check_every, salt):
    """One Lanczos cycle of at most m steps for the problems idx; returns Ritz data and convergence.

    ``basis`` row 0 holds y0, so one projection removes y0 and the Lanczos vectors (rows 1..j+1) together.
    A problem whose new vector vanishes (breakdown: an invariant subspace) stalls until the next check,
    where it continues from a fresh direction orthogonal to everything (so eigenvalues of multiplicity > 1
    are found too) or, if none is left, is done: its Ritz values are then exact.
    """
    b, n = y0.shape
    device = y0.device
    f64 = dict(dtype=torch.float64, device=device)
    basis = torch.zeros(b, m + 2, n, **f64)
    basis[:, 0] = y0
    q = _project_out(v0, basis[:, :1])
    basis[:, 1] = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    alpha = torch.zeros(b, m, **f64)
    beta = torch.zeros(b, m, **f64)
    live = torch.zeros(b, m, dtype=torch.bool, device=device)
    # The deflated space has n - 1 dimensions: once that many slots are live, it is spanned exactly.
    cap = lengths - 1
    klen = torch.zeros(b, dtype=torch.int64, device=device)
    done = klen >= cap
    stalled = torch.zeros(b, dtype=torch.bool, device=device)
    revived = torch.zeros(b, dtype=torch.bool, device=device)
    # Problems still iterating: all (a slice, no copies) until checks have frozen half of them; then an
    # index tensor, kept as one object until the next compaction so that ``op`` can cache its gathers.
    run: slice | torch.Tensor = slice(None)
    sub = idx
    k = 0
    for j in range(m):
        act = ~done & ~stalled  # frozen problems are done, so this is False outside ``run``
        q = basis[run, j + 1]
        w = op(q, sub)
        a = (q * w).sum(-1)
        w = _project_out(w, basis[run, : j + 2])
        bj = w.norm(dim=-1)
        act_r = act[run]
        broke_r = act_r & (bj <= _BREAKDOWN)
        live[:, j] = act
        alpha[run, j] = torch.where(act_r, a, torch.zeros_like(a))
        beta[run, j] = torch.where(act_r & ~broke_r, bj, torch.zeros_like(bj))
        broke = torch.zeros_like(act)
        broke[run] = broke_r
        klen = klen + act.to(torch.int64)
        done = done | (act & (klen >= cap))
        stalled = stalled | broke
        grow = (act & ~broke & ~done)[run]
        basis[run, j + 2] = torch.where(grow[:, None], w / bj.clamp_min(1e-300)[:, None], torch.zeros_like(w))
        k = j + 1
        if k % check_every == 0 or k == m:
            _, _, conv, _ = _converged(alpha, beta, live, k, tol)
            # A first breakdown is not trusted (the top eigenvalue may be repeated); after one fresh
            # continuation the Ritz values of all blocks together decide. Converged problems freeze.
            done = done | (conv & (~stalled | revived))
            if bool(done.all()):
                break
            if k < m and bool(stalled.any()):
                fresh = _project_out(start_vectors(lengths, n, salt * 1000 + k, device), basis[:, : k + 1])
                fn = fresh.norm(dim=-1)
                revive = stalled & (fn > 1e-8)
                done = done | (stalled & ~revive)
                basis[:, k + 1] = torch.where(revive[:, None], fresh / fn.clamp_min(1e-300)[:, None],
                                              basis[:, k + 1])
                revived = revived | revive
                stalled = torch.zeros_like(stalled)
            # Compact once at most half of the iterating problems are left: a gather of their operator
            # data costs about two mat-vecs, so frozen problems ride along until then.
            running = torch.nonzero(~done).flatten()
            if 2 * running.numel() <= (b if isinstance(run, slice) else run.numel()):
                run, sub = running, idx[running]
    evals, evecs, conv, klen = _converged(alpha, beta, live, k, tol)
    conv = (conv & (~stalled | revived)) | done
    y = torch.bmm(evecs[:, :, -1][:, None, :], basis[:, 1 : k + 1])[:, 0]
    y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    nan = torch.full_like(evals[:, -1], float("nan"))
    th2 = torch.where(klen >= 2, evals[:, -2], nan) if k >= 2 else nan
    return evals[:, -1], th2, y, klen, conv
