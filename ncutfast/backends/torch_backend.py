"""The torch backend: runs on any device torch runs on (CPU here, CUDA on a GPU machine).

Affinity in the requested precision, the dense float64 graph W and its degrees, then per problem either a
dense ``eigh`` of the deflated M = D^-1/2 W D^-1/2 (small N) or the batched Lanczos of ``backends.lanczos``
(the rest). The eigen-solve is float64 whatever the similarity precision. The whole padded batch is processed
at once, in chunks that bound memory; ragged batches are never solved one problem at a time. (The compiled
and Triton backends keep only the bitmask B of W = eps 11^T + (1 - eps) B; torch has no bit-matrix product,
and a float32 copy of B would not make the float64 mat-vec cheaper.)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..exact import exact_mask
from .contract import (
    Outputs,
    SolveParams,
    Spectrum,
    check_batch,
    check_painted,
    matmul_precision,
    normalized_features,
    paint,
    solvable,
)
from .lanczos import lanczos_fiedler

__all__ = ["solve", "graph", "DENSE_MAX", "MEMORY_BUDGET"]

#: Problems with at most this many tokens are solved by a dense eigh (cheaper than Lanczos there).
DENSE_MAX = 96
#: Bytes of N x N work arrays one chunk of the batch may hold (similarity, mask, float64 W).
MEMORY_BUDGET = 1 << 30


def graph(
    f: torch.Tensor, lengths: torch.Tensor, *, tau: float, eps: float, binary: bool, precision: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dense float64 W ``(B, N, N)`` (zero on padding), degrees d ``(B, N)`` (1 on padding) and, for a
    binary graph in precision "exact", the recheck fraction ``(B,)`` (``ncutfast.exact.exact_mask``)."""
    n = f.shape[1]
    frac = None
    if binary and precision == "exact":
        edges, frac = exact_mask(f, lengths, tau)
    else:
        with matmul_precision(f.device, precision):
            s = torch.bmm(f, f.transpose(1, 2))
        edges = s > tau if binary else None
    ln = lengths.to(f.device)
    valid = torch.arange(n, device=f.device)[None, :] < ln[:, None]
    ragged = bool((lengths < n).any())
    pair = valid[:, :, None] & valid[:, None, :] if ragged else None
    # fill + masked_fill writes exact 1 / eps values and is ~2x faster than torch.where on a CPU.
    if binary:
        w = torch.full(edges.shape, eps, dtype=torch.float64, device=f.device).masked_fill_(edges, 1.0)
    else:
        w = s.to(torch.float64).masked_fill_(s < tau, eps)
    del edges
    if ragged:
        w = w.masked_fill_(~pair, 0.0)
    d = w.sum(-1)
    if not binary and bool(((d <= 0) & valid).any()):  # tau = 0 and an all-zero row: no D^-1/2
        b = int(((d <= 0) & valid).any(-1).nonzero()[0, 0])
        raise ValueError(f"feats: problem {b} has a degree <= 0 in the non-binary graph (an all-zero feature row "
                         "with tau = 0?)")
    d = torch.where(valid, d, torch.ones((), dtype=torch.float64, device=f.device))
    return w, d, frac


def _dense(m: torch.Tensor, y0: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Top two eigenpairs of M restricted to the complement of y0, by a dense batched eigh."""
    n = m.shape[1]
    # Shift y0's eigenvalue 1 down to -2 and park padding at -4: both fall below M's spectrum [-1, 1].
    a = m - 3.0 * y0[:, :, None] * y0[:, None, :]
    pad = torch.arange(n, device=m.device)[None, :] >= lengths.to(m.device)[:, None]
    a = a + torch.diag_embed(pad.to(torch.float64) * -4.0)
    evals, evecs = torch.linalg.eigh(a)
    nan = torch.full_like(evals[:, -1], float("nan"))
    lengths_dev = lengths.to(m.device)
    theta2 = torch.where(lengths_dev >= 3, evals[:, -2], nan) if n >= 2 else nan
    return evals[:, -1], theta2, evecs[:, :, -1]


def _chunks(lengths: torch.Tensor, n: int, dtype_bytes: int) -> Iterator[slice]:
    per = max(1, MEMORY_BUDGET // max(1, n * n * (dtype_bytes + 9)))
    for start in range(0, lengths.shape[0], per):
        yield slice(start, min(start + per, lengths.shape[0]))


def _solve_group(feats: torch.Tensor, lengths: torch.Tensor, p: SolveParams, dense: bool) -> dict[str, torch.Tensor]:
    """Solve one padded group (all dense or all Lanczos), chunked over the batch to bound memory."""
    n = feats.shape[1]
    device = feats.device
    out = {k: [] for k in ("theta1", "theta2", "y", "dm12", "iters", "resid", "frac")}
    for sl in _chunks(lengths, n, 8 if p.precision in ("float64", "exact") else 4):
        ln = lengths[sl]
        f = normalized_features(feats[sl], ln, p.precision)
        w, d, frac = graph(f, ln, tau=p.tau, eps=p.eps, binary=p.binary, precision=p.precision)
        del f
        valid = torch.arange(n, device=device)[None, :] < ln.to(device)[:, None]
        sd = torch.where(valid, d.sqrt(), torch.zeros((), dtype=torch.float64, device=device))
        y0 = sd / sd.norm(dim=-1, keepdim=True)
        dm12 = torch.where(valid, 1.0 / d.sqrt(), torch.zeros((), dtype=torch.float64, device=device))

        gathered: dict[str, torch.Tensor] = {}

        def op(v: torch.Tensor, idx: torch.Tensor, w=w, dm12=dm12, gathered=gathered) -> torch.Tensor:
            # M v = D^-1/2 W D^-1/2 v for the problems idx: all of them, or the ones still iterating
            # (the driver passes the same idx object until it changes, so one gather serves many steps).
            if idx.numel() == w.shape[0]:
                ww, s = w, dm12
            else:
                if gathered.get("idx") is not idx:
                    gathered.update(idx=idx, w=w[idx], s=dm12[idx])
                ww, s = gathered["w"], gathered["s"]
            return s * torch.bmm(ww, (s * v)[:, :, None])[:, :, 0]

        all_idx = torch.arange(ln.shape[0], device=device)
        if dense:
            m = dm12[:, :, None] * w * dm12[:, None, :]
            th1, th2, y = _dense(m, y0, ln)
            iters = torch.zeros(ln.shape[0], dtype=torch.int64, device=device)
        else:
            res = lanczos_fiedler(op, y0, ln, tol=p.tol, max_iter=p.max_iter)
            th1, th2, y, iters = res.theta1, res.theta2, res.y, res.iterations
        # True residual of the returned pair (one extra mat-vec): ||M y - theta1 y||.
        resid = (op(y, all_idx) - th1[:, None] * y).norm(dim=-1)
        if frac is None:
            frac = torch.full_like(th1, float("nan"))
        for key, val in zip(out, (th1, th2, y, dm12, iters, resid, frac), strict=True):
            out[key].append(val)
        del w
    return {k: torch.cat(v) for k, v in out.items()}


def solve(feats: torch.Tensor, lengths: torch.Tensor, params: SolveParams, *,
          painted: torch.Tensor | None = None) -> Spectrum:
    """The backend contract (``backends.contract``) on any torch device (painted rows: a zeroed copy)."""
    lengths = check_batch(feats, lengths)
    feats = paint(feats, check_painted(painted, feats))
    out = Outputs.allocate(feats.shape[0], feats.shape[1], feats.device)
    if params.binary and params.precision == "exact":
        out.recheck = torch.zeros(feats.shape[0], dtype=torch.float64, device=feats.device)
    groups = ((True, (lengths >= 2) & (lengths <= DENSE_MAX)), (False, lengths > DENSE_MAX))
    for dense, select in groups:
        part = solvable(feats, lengths, select)
        if part is None:
            continue
        di, ln, group = part
        g = _solve_group(group, ln, params, dense)
        out.lambda2[di] = 1.0 - g["theta1"]
        out.lambda3[di] = 1.0 - g["theta2"]
        out.x[di, : group.shape[1]] = g["dm12"] * g["y"]
        out.residual[di] = g["resid"]
        out.iterations[di] = g["iters"]
        if out.recheck is not None:
            out.recheck[di] = g["frac"]
    return out.spectrum(feats.shape[1], params.tol)
