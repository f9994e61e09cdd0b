"""The torch backend: runs on any device torch runs on (CPU here, CUDA on a GPU machine).

Affinity in the requested precision, the dense float64 graph W and its degrees, then per problem either a
dense ``eigh`` of the deflated M = D^-1/2 W D^-1/2 (small N) or the batched Lanczos of ``ncutfast._lanczos``
(the rest). The eigen-solve is float64 whatever the similarity precision. The whole padded batch is processed
at once, in chunks that bound memory; ragged batches are never solved one problem at a time. (The compiled
and Triton backends keep only the bitmask B of W = eps 11^T + (1 - eps) B; torch has no bit-matrix product,
and a float32 copy of B would not make the float64 mat-vec cheaper.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ._dispatch import Spectrum, converged_flags
from ._lanczos import lanczos_fiedler
from .exact import exact_mask, normalized_rows

__all__ = ["solve", "normalized_features", "graph", "matmul_precision", "DENSE_MAX", "MEMORY_BUDGET"]

#: Problems with at most this many tokens are solved by a dense eigh (cheaper than Lanczos there).
DENSE_MAX = 96
#: Bytes of N x N work arrays one chunk of the batch may hold (similarity, mask, float64 W).
MEMORY_BUDGET = 1 << 30


@contextlib.contextmanager
def matmul_precision(device: torch.device, precision: str) -> Iterator[None]:
    """fp32 matmuls are IEEE fp32 for "float32" (no tf32) and tf32 for "fast" on CUDA devices."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "fast"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def normalized_features(feats: torch.Tensor, lengths: torch.Tensor, precision: str) -> torch.Tensor:
    """Rows divided by max(||row||, 1e-12), padding rows zeroed; float64 or float32 ``(B, N, C)``.

    Precision "exact" takes ``reference.normalize_rows``'s float64 rows themselves (through the host).
    """
    if precision == "exact":
        return normalized_rows(feats, lengths)
    dtype = torch.float64 if precision == "float64" else torch.float32
    f = feats.to(dtype)
    valid = torch.arange(f.shape[1], device=f.device)[None, :] < lengths.to(f.device)[:, None]
    f = torch.where(valid[:, :, None], f, torch.zeros((), dtype=dtype, device=f.device))
    return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)


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


def _solve_group(feats, lengths, *, tau, eps, binary, precision, tol, max_iter, dense):
    """Solve one padded group (all dense or all Lanczos), chunked over the batch to bound memory."""
    n = feats.shape[1]
    device = feats.device
    out = {k: [] for k in ("theta1", "theta2", "y", "dm12", "iters", "resid", "frac")}
    for sl in _chunks(lengths, n, 8 if precision in ("float64", "exact") else 4):
        ln = lengths[sl]
        f = normalized_features(feats[sl], ln, precision)
        w, d, frac = graph(f, ln, tau=tau, eps=eps, binary=binary, precision=precision)
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
            res = lanczos_fiedler(op, y0, ln, tol=tol, max_iter=max_iter)
            th1, th2, y, iters = res.theta1, res.theta2, res.y, res.iterations
        # True residual of the returned pair (one extra mat-vec): ||M y - theta1 y||.
        resid = (op(y, all_idx) - th1[:, None] * y).norm(dim=-1)
        if frac is None:
            frac = torch.full_like(th1, float("nan"))
        for key, val in zip(out, (th1, th2, y, dm12, iters, resid, frac), strict=True):
            out[key].append(val)
        del w
    return {k: torch.cat(v) for k, v in out.items()}


def solve(
    feats: torch.Tensor,
    lengths: torch.Tensor,
    *,
    tau: float,
    eps: float,
    binary: bool,
    precision: str,
    tol: float,
    max_iter: int,
) -> Spectrum:
    """Backend contract of ``ncutfast._dispatch``: padded ``(B, N_max, C)`` features -> Spectrum."""
    device = feats.device
    bsz, n_max = feats.shape[0], feats.shape[1]
    lengths = lengths.to(torch.int64).cpu()
    lam2 = torch.full((bsz,), float("nan"), dtype=torch.float64, device=device)
    lam3 = torch.full_like(lam2, float("nan"))
    x = torch.zeros(bsz, n_max, dtype=torch.float64, device=device)
    resid = torch.zeros(bsz, dtype=torch.float64, device=device)
    iters = torch.zeros(bsz, dtype=torch.int64, device=device)
    frac = torch.zeros(bsz, dtype=torch.float64, device=device)  # N = 1: the diagonal needs no recheck
    # N = 1 has no second eigenpair: lambda = NaN, x = [0] (reference.fiedler's definition).
    for dense, sel in ((True, (lengths >= 2) & (lengths <= DENSE_MAX)), (False, lengths > DENSE_MAX)):
        idx = torch.nonzero(sel).flatten()
        if not idx.numel():
            continue
        ln = lengths[idx]
        nm = int(ln.max())
        group = feats[:, :nm] if idx.numel() == bsz else feats[idx.to(device), :nm]  # a view when all take part
        g = _solve_group(group, ln, tau=tau, eps=eps, binary=binary,
                         precision=precision, tol=tol, max_iter=max_iter, dense=dense)
        di = idx.to(device)
        lam2[di] = 1.0 - g["theta1"]
        lam3[di] = 1.0 - g["theta2"]
        x[di, :nm] = g["dm12"] * g["y"]
        resid[di] = g["resid"]
        iters[di] = g["iters"]
        frac[di] = g["frac"]
    return Spectrum(lam2, lam3, x, resid, converged_flags(resid, lam2, lam3, tol), iters,
                    frac if binary and precision == "exact" else None)
