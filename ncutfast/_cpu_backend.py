"""The CPU backend: the compiled extension's OpenMP kernels (``ncutfast._C``, sources in ``csrc/``).

Binary graphs (the default) never hold an N x N float matrix. Per image, the similarity's upper part is
formed a block of ``ROW_BLOCK`` rows at a time by torch's BLAS (``K[r0:r1] @ K[r0:].T`` on the raw
features, float64 for "float64" and IEEE float32 otherwise: a CPU has no tensor cores, so "fast" equals
"float32"), and the extension right away thresholds each block into a packed bitmask (N^2 / 8 bytes, exactly
symmetric) with the cosine test ``dot_ij * inv_j > tau / inv_i`` (``inv`` the clamped inverse row norms), so
no normalized copy of the features exists either. Then the deflated Lanczos solver of
``csrc/ncut/lanczos.h`` runs with one OpenMP thread per problem. At N = 3600, C = 768 on 2 cores that is
about 49 ms of products, 0.8 ms of packing and 2.5 ms of solve, and 1.6 MB of bits, one 2.8 MB block, then
the solver's 2.5 MB of vectors and tables beyond the features (``benchmarks/bench_ext.py`` measures both).
Features whose row norms are extreme (outside [2^-40, 2^40], where float32 dot products could over- or
underflow) are normalized first, as are non-binary graphs, which are solved from the full similarity matrix.
Precision "exact" (``ncutfast.exact``): the extension computes the reference's float64 row norms bit for bit,
the blocks are the same float32 products as above, and the packing decides each entry from its scaled block
value unless it lies within the proven bound of tau, where it recomputes the float64 dot product of the
reference's normalized rows (``csrc/ncut/exact.h``); the recheck counts come back per image.
Results are deterministic (and do not depend on the thread count unless a team solves a problem).
"""

from __future__ import annotations

import math

import torch

from . import _ext, exact, reference
from ._dispatch import PRECISIONS, Spectrum, converged_flags
from ._torch_backend import normalized_features
from ._validate import FLOAT_DTYPE_NAMES, check_eps, check_positive_int, check_tau, dtype_name

__all__ = ["solve", "exact_graph_bits", "check_args", "batch_slices", "KRYLOV_DIM", "CHECK_EVERY", "MEMORY_BUDGET",
           "ROW_BLOCK", "GRAPH_BUDGET", "NORM_RANGE"]

#: Basis vectors per Lanczos cycle (the cycle restarts from its Ritz vector when it ends unconverged).
KRYLOV_DIM = 48
#: Lanczos steps between convergence checks (a check is a tiny tridiagonal solve, no synchronization).
CHECK_EVERY = 2
#: Bytes of similarity blocks one chunk of the batch may hold.
MEMORY_BUDGET = 1 << 28
#: Rows of the similarity formed per matrix product (a multiple of 64). Binary graphs only need the upper
#: part (rows [r0, r0 + ROW_BLOCK) against columns [r0, N)); 192 rows keep a block of a 3600-token image at
#: 2.8 MB and the products as fast as bigger blocks (measured: 49-50 ms for 128-384 rows, 52 ms for 512,
#: 100 ms for the full product, N = 3600, C = 768, 2 cores).
ROW_BLOCK = 192
#: Bytes of packed graphs (N^2 / 8 per problem) one solver call may hold; it always takes at least one
#: problem per thread.
GRAPH_BUDGET = 1 << 29
#: Row norms outside this range are normalized before the product (a copy of the features); inside it the
#: raw float32 dot products can neither overflow nor lose precision to underflow.
NORM_RANGE = (2.0**-40, 2.0**40)


def batch_slices(start: int, stop: int, per_bytes: int, budget: int, at_least: int = 1) -> list[slice]:
    """Consecutive slices of [start, stop) holding max(at_least, budget // per_bytes) problems each."""
    per = max(at_least, budget // max(1, per_bytes))
    return [slice(i, min(i + per, stop)) for i in range(start, stop, per)]


def _similarity(feats: torch.Tensor, lengths: torch.Tensor, precision: str) -> torch.Tensor:
    """Contiguous cosine similarities ``(b, n, n)``: float64 for "float64", IEEE float32 otherwise."""
    f = normalized_features(feats, lengths, precision)
    return torch.bmm(f, f.transpose(1, 2)).contiguous()


def check_args(feats: object, lengths: object, tau: object, eps: object, binary: object, precision: object,
               tol: object, max_iter: object, *, device_type: str = "cpu", table: object = True,
               team: object = 0) -> None:
    """The backend contract's preconditions (shared with the cuda backend), each failure naming its argument.

    Host-side checks only: the features' finiteness is checked by the caller (here from the row norms).
    """
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"feats: expected a torch.Tensor, got {type(feats).__name__}")
    if feats.device.type != device_type:
        raise ValueError(f"feats: the {device_type} backend needs {device_type.upper()} tensors, "
                         f"got device {feats.device}")
    if feats.ndim != 3 or any(int(d) == 0 for d in feats.shape):
        raise ValueError(f"feats: expected a non-empty (B, N_max, C) tensor, got shape {tuple(feats.shape)}")
    if dtype_name(feats.dtype) not in FLOAT_DTYPE_NAMES:
        raise TypeError(f"feats: unsupported dtype {dtype_name(feats.dtype)}; expected one of {FLOAT_DTYPE_NAMES}")
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths: expected a torch.Tensor, got {type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths: expected an integer tensor, got dtype {dtype_name(lengths.dtype)}")
    if lengths.device.type != "cpu":
        raise ValueError(f"lengths: expected a CPU tensor, got device {lengths.device}")
    if tuple(lengths.shape) != (feats.shape[0],):
        raise ValueError(f"lengths: expected shape ({feats.shape[0]},) for {feats.shape[0]} images, "
                         f"got {tuple(lengths.shape)}")
    bad = (lengths < 1) | (lengths > feats.shape[1])
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"lengths: entry {i} is {int(lengths[i])}, must lie in [1, {feats.shape[1]}]")
    check_tau(tau)
    check_eps(eps)
    for name, flag in (("binary", binary), ("table", table)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol: must be a finite number > 0, got {tol!r}")
    check_positive_int(max_iter, "max_iter")
    check_positive_int(team, "team", minimum=0)


def _inverse_norms(k: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
    """``1 / max(||k_i||, 1e-12)`` ``(B, n)`` in k's dtype (1 on padding), or None where a norm is outside
    ``NORM_RANGE`` (the caller normalizes first). Raises for NaN or infinite features."""
    norms = torch.linalg.vector_norm(k, dim=-1)
    valid = torch.arange(k.shape[1])[None, :] < lengths[:, None]
    vn = norms[valid]
    if not bool(torch.isfinite(vn).all()):
        rows = k[valid][~torch.isfinite(vn)]
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("feats: contains NaN or inf")
        return None  # finite features whose norm overflows
    if bool(((vn > 0) & (vn < NORM_RANGE[0])).any()) or bool((vn > NORM_RANGE[1]).any()):
        return None
    one = torch.ones((), dtype=k.dtype)
    return torch.where(valid, 1.0 / norms.clamp_min(1e-12), one).contiguous()


def exact_graph_bits(feats: torch.Tensor, lengths: torch.Tensor,
                     tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed exact graph (precision "exact", ``ncutfast.exact``) of finite CPU features.

    The screening blocks are float32 products of the float32-rounded features scaled by the reference's
    inverse row norms, like the "float32" path (so no normalized copy exists), unless a nonzero row norm
    lies outside ``NORM_RANGE``; then they are products of the float64-normalized rows rounded to float32.

    Args:
        feats: ``(B, n, C)`` any float dtype, finite within the lengths (the extension checks again);
            n = max(lengths).
        lengths: int64 ``(B,)`` CPU.
        tau: the threshold (strict >).

    Returns:
        ``(bits, rechecked)``: int64 ``(B, n, words_per_row(n))`` holding the uint64 bit rows of
        ``[f_i . f_j > tau]`` (f the float64-normalized rows), and int64 ``(B,)`` counts of the entries
        (i <= j) recomputed in float64.
    """
    C = _ext.C
    bsz, n, c = feats.shape
    lengths = lengths.to(torch.int64).contiguous()
    k = feats.to(torch.float64 if feats.dtype == torch.float64 else torch.float32).contiguous()
    kname = "float64" if k.dtype == torch.float64 else "float32"
    raw = torch.empty(bsz, n, dtype=torch.float64)
    C.exact_row_norms_cpu(k.data_ptr(), kname, bsz, n, c, lengths.data_ptr(), raw.data_ptr())
    norms = raw.clamp_min(reference.NORM_EPS)  # np.maximum(norms, 1e-12): exact, as in the reference
    if bool(((raw > 0) & ((raw < NORM_RANGE[0]) | (raw > NORM_RANGE[1]))).any()):
        g, scale = (k / norms[:, :, None]).to(torch.float32), None  # fl32 of the reference's rows
    else:
        g, scale = k.to(torch.float32), (1.0 / norms).to(torch.float32)
    bounds = dict(bound=exact.screen_bound(c), dot_bound=exact.dot_bound(c), dot2_bound=exact.dot2_bound(c, tau))
    bits = torch.empty(bsz, n, C.words_per_row(n), dtype=torch.int64)
    rechecked = torch.zeros(bsz, dtype=torch.int64)
    block = min(ROW_BLOCK, n)
    slices = batch_slices(0, bsz, block * n * 4, MEMORY_BUDGET)
    buf = torch.empty(max(sl.stop - sl.start for sl in slices) * block * n, dtype=torch.float32)
    for sl in slices:
        b = sl.stop - sl.start
        for r0 in range(0, n, block):
            r1 = min(r0 + block, n)
            s = buf[: b * (r1 - r0) * (n - r0)].view(b, r1 - r0, n - r0)
            torch.bmm(g[sl, r0:r1], g[sl, r0:].transpose(1, 2), out=s)
            C.pack_graph_block_exact_cpu(s.data_ptr(), k[sl].data_ptr(), kname, c, norms[sl].data_ptr(), b, n, r0,
                                         r1 - r0, lengths[sl].data_ptr(), float(tau), **bounds,
                                         bits=bits[sl.start].data_ptr(), rechecked=rechecked[sl].data_ptr(),
                                         scale=0 if scale is None else scale[sl].data_ptr())
    return bits, rechecked

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
    table: bool = True,
    team: int = 0,
) -> Spectrum:
    """Backend contract of ``ncutfast._dispatch``: padded ``(B, N_max, C)`` CPU features -> Spectrum.

    Any strides and float dtypes (float16/bfloat16/float32/float64) are accepted. Bad arguments raise
    ``TypeError``/``ValueError`` naming the argument; NaN or infinite features (within the lengths) raise
    ``ValueError``. ``table=False`` replaces the subset-sum-table mat-vec by the set-bit loop the CUDA kernels
    use, and ``team=k`` solves each problem with k threads that synchronize like a CUDA thread block (0: one
    thread per problem unless a small batch holds huge problems); tests run both to cover the GPU's code
    paths. ``converged`` follows ``_dispatch.converged_flags``.
    """
    check_args(feats, lengths, tau, eps, binary, precision, tol, max_iter, table=table, team=team)
    C = _ext.C
    if C is None:
        raise RuntimeError(f"backend: the compiled extension ncutfast._C is not available ({_ext.IMPORT_ERROR})")
    bsz, n_max = feats.shape[0], feats.shape[1]
    lengths = lengths.to(torch.int64).cpu().contiguous()
    n = int(lengths.max())  # columns beyond every length are padding: drop them
    exact_graph = precision == "exact" and binary
    dtype = torch.float64 if precision == "float64" or (precision == "exact" and not binary) else torch.float32
    rechecked = None
    if exact_graph:  # the input's own values reach the float64 normalization; the blocks are float32
        k, inv = feats[:, :n], None
        valid = torch.arange(n)[None, :] < lengths[:, None]
        if not bool(torch.isfinite(k[valid]).all()):
            raise ValueError("feats: contains NaN or inf")
        rechecked = torch.zeros(bsz, dtype=torch.int64)
    else:
        k = feats[:, :n].to(dtype)  # a view when the dtype already matches
        inv = _inverse_norms(k, lengths)  # also rejects NaN and inf before any product
    lam2, lam3, resid = (torch.empty(bsz, dtype=torch.float64) for _ in range(3))
    x = torch.empty(bsz, n, dtype=torch.float64)
    iters = torch.empty(bsz, dtype=torch.int64)
    sim_dtype = "float64" if dtype == torch.float64 else "float32"
    itemsize = 8 if dtype == torch.float64 else 4

    def outs(sl: slice) -> dict[str, int]:
        return dict(lambda2=lam2[sl].data_ptr(), lambda3=lam3[sl].data_ptr(), x=x[sl].data_ptr(),
                    residual=resid[sl].data_ptr(), iterations=iters[sl].data_ptr())

    common = dict(tol=float(tol), max_iter=int(max_iter), krylov_dim=KRYLOV_DIM, check_every=CHECK_EVERY,
                  team=int(team))
    if not binary:
        for sl in batch_slices(0, bsz, n * n * itemsize, MEMORY_BUDGET):
            s = _similarity(k[sl], lengths[sl], "float64" if dtype == torch.float64 else "float32")
            C.solve_dense_cpu(s.data_ptr(), sim_dtype, s.shape[0], n, lengths[sl].data_ptr(), float(tau),
                              float(eps), **common, **outs(sl))
    else:
        if inv is None and not exact_graph:  # extreme norms: normalize first, then the products are cosines
            k = normalized_features(k, lengths, precision)
        words = C.words_per_row(n)
        block = min(ROW_BLOCK, n)
        # exact: a float32 copy of the features per group when they are not float32
        per_problem = n * words * 8 + (n * k.shape[2] * 4 if exact_graph else 0)
        # Groups of problems share one solver call (at least one problem per thread keeps all busy); their
        # graphs are packed from the upper part of S, a block of rows at a time, through one reused buffer.
        # Words are uint64 held in int64 (only the address reaches the kernels).
        for grp in batch_slices(0, bsz, per_problem, GRAPH_BUDGET, at_least=C.cpu_threads()):
            if exact_graph:
                bits, rechecked[grp] = exact_graph_bits(k[grp], lengths[grp], tau)
            else:
                bits = torch.empty(grp.stop - grp.start, n, words, dtype=torch.int64)
                slices = batch_slices(grp.start, grp.stop, block * n * itemsize, MEMORY_BUDGET)
                buf = torch.empty(max(sl.stop - sl.start for sl in slices) * block * n, dtype=dtype)
                for sl in slices:
                    b = sl.stop - sl.start
                    inv_ptr = 0 if inv is None else inv[sl].data_ptr()
                    for r0 in range(0, n, block):
                        r1 = min(r0 + block, n)
                        s = buf[: b * (r1 - r0) * (n - r0)].view(b, r1 - r0, n - r0)
                        torch.bmm(k[sl, r0:r1], k[sl, r0:].transpose(1, 2), out=s)
                        C.pack_graph_block_cpu(s.data_ptr(), sim_dtype, b, n, r0, r1 - r0, lengths[sl].data_ptr(),
                                               float(tau), bits[sl.start - grp.start].data_ptr(), inv_norms=inv_ptr)
                del buf, s
            C.solve_binary_cpu(bits.data_ptr(), bits.shape[0], n, lengths[grp].data_ptr(), float(eps),
                               table=table, **common, **outs(grp))
    x = torch.nn.functional.pad(x, (0, n_max - n))
    frac = None
    if rechecked is not None:
        ln = lengths.to(torch.float64)
        frac = rechecked.to(torch.float64) / (ln * (ln + 1) / 2)
    return Spectrum(lam2, lam3, x, resid, converged_flags(resid, lam2, lam3, tol), iters, frac)
