"""The compiled extension's backends (``ncutfast._C``, sources in ``csrc/``): "cpu" (OpenMP kernels) and
"cuda" (CUDA kernels), the device dispatch in ``solve``.

CPU. Binary graphs (the default) never hold an N x N float matrix. Per image, the similarity's upper part is
formed a block of ``ROW_BLOCK`` rows at a time by torch's BLAS (``K[r0:r1] @ K[r0:].T`` on the raw
features, float64 for "float64" and IEEE float32 otherwise: a CPU has no tensor cores, so "fast" equals
"float32"), and the extension right away thresholds each block into a packed bitmask (N^2 / 8 bytes, exactly
symmetric) with the cosine test ``dot_ij * inv_j > tau / inv_i`` (``inv`` the clamped inverse row norms), so
no normalized copy of the features exists either. Then the deflated Lanczos solver of
``csrc/ncut/lanczos.h`` runs with one OpenMP thread per problem. Beyond the features it holds N^2 / 8 bytes
of bits per problem, one block of similarities, then the solver's vectors and tables
(``benchmarks/bench_ext.py`` measures time and memory, ``benchmarks/RESULTS.md`` has the numbers).
Features whose row norms are extreme (outside [2^-40, 2^40], where float32 dot products could over- or
underflow, or 0 for a nonzero row) are normalized first (``normalized_features``, safe for any finite
magnitude), as are non-binary graphs, which are solved from the full similarity matrix.
Precision "exact" (``ncutfast.exact``): the extension computes the reference's float64 row norms bit for bit,
quantizes the normalized rows to int16 and screens every pair i <= j with the exact integer product (its own
AVX2 kernel, chosen at run time, straight into the packed bits); an entry within the proven bound of tau is
decided by the float64 dot product of the reference's normalized rows (``csrc/ncut/exact.h``); the recheck
counts come back per image.
Results are deterministic (and do not depend on the thread count unless a team solves a problem).

CUDA. Per chunk of the padded batch: torch normalizes the rows and forms the similarity with cuBLAS
(float64, IEEE float32, or tf32 for "fast"); ``pack_graph_cuda`` thresholds it into a packed bitmask (one
warp per row, two ballots per word), and ``solve_binary_cuda`` runs the same solver with one thread block per
problem: the solve of the whole batch is one launch with no host synchronization. Non-binary graphs are
solved from the similarity matrix. Precision "exact" builds the graph with ``exact.exact_mask`` (a float64
cuBLAS product screened by the float64 bound, Dot2 for the rest; one synchronization) and packs it.
Everything is queued on torch's current stream of the features' device; the kernels take raw device
pointers, so the extension needs no CUDA build of torch. Results are deterministic (fixed-order reductions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _ext, exact
from .._validate import check_positive_int
from .contract import (
    KRYLOV_DIM,
    Outputs,
    SolveParams,
    Spectrum,
    batch_slices,
    check_batch,
    check_painted,
    normalized_features,
    paint,
    similarity,
)

__all__ = ["solve", "exact_graph_bits", "DeviceSettings", "SETTINGS", "ROW_BLOCK", "NORM_RANGE"]


@dataclass
class DeviceSettings:
    """Per-device solver settings.

    Attributes:
        check_every: Lanczos steps between convergence checks (a tiny tridiagonal solve: one thread of the
            problem's team, no host synchronization).
        memory_budget: bytes of similarity blocks (CPU) or matrices (CUDA) one chunk of the batch may hold.
        graph_budget: bytes of packed graphs (N^2 / 8 per problem) one solver call may hold; on the CPU a
            call always takes at least one problem per thread; on CUDA 2 GiB is 10,000 problems of 3600
            tokens, so a batch is normally a single launch with one thread block per problem.
    """

    check_every: int
    memory_budget: int
    graph_budget: int


SETTINGS = {"cpu": DeviceSettings(check_every=2, memory_budget=1 << 28, graph_budget=1 << 29),
            "cuda": DeviceSettings(check_every=4, memory_budget=1 << 31, graph_budget=1 << 31)}
#: Rows of the similarity formed per matrix product (a multiple of 64). Binary graphs only need the upper
#: part (rows [r0, r0 + ROW_BLOCK) against columns [r0, N)); 192 rows keep a block of a 3600-token image at
#: 2.8 MB (in L2) while each product stays large enough for the BLAS to run at full speed.
ROW_BLOCK = 192
#: Row norms outside this range are normalized before the product (a copy of the features); inside it the
#: raw float32 dot products can neither overflow nor lose precision to underflow.
NORM_RANGE = (2.0**-40, 2.0**40)


def _inverse_norms(k: torch.Tensor, lengths: torch.Tensor, feats: torch.Tensor,
                   painted: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows the raw products read and their inverse norms ``1 / max(||k_i||, 1e-12)`` ``(B, n)`` in k's
    dtype (1 on padding), or None where an unpainted norm is outside ``NORM_RANGE`` (the caller normalizes
    first). ``k`` is ``feats`` converted to the similarity's dtype. Raises for NaN or infinite features.

    Painted rows (bool ``(B, n)`` or None) get inverse norm 0, which the packing reads as a zero row, so
    their features are never rewritten; only when one of their norms exceeds ``NORM_RANGE`` (its products
    might overflow) are they zeroed in a copy of ``k``.
    """
    norms = torch.linalg.vector_norm(k, dim=-1)
    valid = torch.arange(k.shape[1])[None, :] < lengths[:, None]
    vn = norms[valid]
    if not bool(torch.isfinite(vn).all()):
        rows = feats[valid][~torch.isfinite(vn)]
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("feats: contains NaN or inf")
    live = valid
    if painted is not None:
        live = valid & ~painted
        if not bool((norms[painted] <= NORM_RANGE[1]).all()):
            k = paint(k, painted)
        vn = norms[live]
    if not bool(torch.isfinite(vn).all()):
        return k, None  # finite features whose norm (or float32 conversion) overflows
    if bool(((vn > 0) & (vn < NORM_RANGE[0])).any()) or bool((vn > NORM_RANGE[1]).any()):
        return k, None
    zero = (norms == 0) & live
    if bool(zero.any()) and bool(k[zero].any()):
        return k, None  # a nonzero row whose squares underflow: its raw dot products would too
    one, nil = torch.ones((), dtype=k.dtype), torch.zeros((), dtype=k.dtype)
    return k, torch.where(live, 1.0 / norms.clamp_min(1e-12), torch.where(valid, nil, one)).contiguous()


def exact_graph_bits(feats: torch.Tensor, lengths: torch.Tensor, tau: float, *,
                     simd: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed exact graph (precision "exact", ``ncutfast.exact``) of finite CPU features.

    The extension computes the reference's float64 row norms, quantizes the normalized rows to int16
    (``exact_quantize_cpu``), screens every pair i <= j with the exact integer product and rechecks the
    entries within ``exact.int16_screen_bound`` of tau in float64 (``exact_graph_cpu``). No N x N float
    matrix and no float64 copy of the features exist.

    Args:
        feats: ``(B, n, C)`` any float dtype, finite within the lengths (the extension checks again);
            n = max(lengths).
        lengths: int64 ``(B,)`` CPU.
        tau: the threshold (strict >).
        simd: False takes the extension's portable screening kernel even where AVX2 exists (tests).

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
    norms = torch.empty(bsz, n, dtype=torch.float64)
    C.exact_row_norms_cpu(k.data_ptr(), kname, bsz, n, c, lengths.data_ptr(), norms.data_ptr())
    cq = c + c % 2
    q = torch.empty(bsz, n, cq, dtype=torch.int16)
    err = torch.empty(bsz, n, dtype=torch.float64)
    C.exact_quantize_cpu(k.data_ptr(), kname, bsz, n, c, lengths.data_ptr(), norms.data_ptr(), q.data_ptr(), cq,
                         err.data_ptr())
    bits = torch.empty(bsz, n, C.words_per_row(n), dtype=torch.int64)
    rechecked = torch.zeros(bsz, dtype=torch.int64)
    C.exact_graph_cpu(q.data_ptr(), cq, k.data_ptr(), kname, c, norms.data_ptr(), bsz, n, lengths.data_ptr(),
                      float(tau), exact.int16_screen_bound(c, float(err.max())), exact.dot_bound(c),
                      exact.dot2_bound(c, tau), bits.data_ptr(), rechecked.data_ptr(), simd=simd)
    return bits, rechecked


def solve(feats: torch.Tensor, lengths: torch.Tensor, params: SolveParams, *, device_type: str = "cpu",
          painted: torch.Tensor | None = None, table: bool = True, team: int = 0) -> Spectrum:
    """The backend contract (``backends.contract``) on ``device_type`` ("cpu" or "cuda") tensors.

    Painted rows: on the CPU's binary "float32" / "fast" / "float64" graphs, inverse norm 0 (``_inverse_norms``:
    no copy of the features); elsewhere a zeroed copy (``contract.paint``).

    Any strides and float dtypes (float16/bfloat16/float32/float64) are accepted. NaN or infinite features
    (within the lengths) raise ``ValueError`` on the CPU (finiteness of CUDA features is the caller's, as
    ``ncutfast.api`` does). A non-binary graph with a degree <= 0 (tau = 0 and an all-zero row; tau < 0 is
    refused by ``SolveParams``) raises ``ValueError``. CPU only:
    ``table=False`` replaces the subset-sum-table mat-vec by the set-bit loop the CUDA kernels use, and
    ``team=k`` solves each problem with k threads that synchronize like a CUDA thread block (0: one thread
    per problem unless a small batch holds huge problems); tests run both to cover the GPU's code paths.
    """
    if device_type not in SETTINGS:
        raise ValueError(f"device_type: expected one of {tuple(SETTINGS)}, got {device_type!r}")
    lengths = check_batch(feats, lengths, (device_type,))
    if not isinstance(table, bool):
        raise TypeError(f"table: expected a bool, got {type(table).__name__}")
    if _ext.C is None:
        raise RuntimeError(f"backend: the compiled extension ncutfast._C is not available ({_ext.IMPORT_ERROR})")
    team = check_positive_int(team, "team", minimum=0, maximum=_ext.C.MAX_TEAM)
    painted = check_painted(painted, feats)
    n = int(lengths.max())  # columns beyond every length are padding: drop them
    painted = None if painted is None else painted[:, :n]
    out = Outputs.allocate(feats.shape[0], n, feats.device)
    if device_type == "cuda":
        if not table or team:
            raise ValueError("table, team: the CUDA kernels take neither (they are CPU test settings)")
        _solve_cuda(paint(feats[:, :n], painted), lengths, params, out)
    else:
        _solve_cpu(feats[:, :n], lengths, params, out, painted, table=table, team=team)
    return out.spectrum(feats.shape[1], params.tol)


def _common(p: SolveParams, device_type: str) -> dict[str, object]:
    return dict(tol=p.tol, max_iter=p.max_iter, krylov_dim=KRYLOV_DIM,
                check_every=SETTINGS[device_type].check_every)


def _solve_cpu(feats: torch.Tensor, lengths: torch.Tensor, p: SolveParams, out: Outputs,
               painted: torch.Tensor | None, *, table: bool, team: int) -> None:
    C = _ext.C
    bsz, n = feats.shape[0], feats.shape[1]
    cfg = SETTINGS["cpu"]
    common = _common(p, "cpu") | dict(team=team)
    if p.binary and p.precision == "exact":
        feats = paint(feats, painted)
        # before any product; padding is finite by contract, so one sum finds NaN and inf in a single pass
        # (in the features' own dtype: a converting float64 sum costs ~30x more; a finite sum that overflows
        # takes the exact look)
        if not math.isfinite(float(feats.sum())):
            valid = torch.arange(n)[None, :] < lengths[:, None]
            if not bool(torch.isfinite(feats[valid]).all()):
                raise ValueError("feats: contains NaN or inf")
        out.recheck = torch.zeros(bsz, dtype=torch.float64)
        # the int16 rows and their packed copy, plus a float32 copy of features of other dtypes
        per_problem = n * C.words_per_row(n) * 8 + n * feats.shape[2] * 8
        for grp in batch_slices(0, bsz, per_problem, cfg.graph_budget, at_least=C.cpu_threads()):
            bits, rechecked = exact_graph_bits(feats[grp], lengths[grp], p.tau)
            out.recheck[grp] = exact.recheck_fraction(rechecked, lengths[grp])
            C.solve_binary_cpu(bits.data_ptr(), bits.shape[0], n, lengths[grp].data_ptr(), p.eps,
                               table=table, **common, **out.pointers(grp))
        return
    wide = p.precision in ("float64", "exact")  # non-binary "exact": the float64 similarity
    dtype = torch.float64 if wide else torch.float32
    k, inv = _inverse_norms(feats.to(dtype), lengths, feats, painted)  # a view when the dtype matches
    sim_dtype = "float64" if wide else "float32"
    itemsize = 8 if wide else 4
    if not p.binary:
        feats = paint(feats, painted)
        for sl in batch_slices(0, bsz, n * n * itemsize, cfg.memory_budget):
            s = similarity(feats[sl], lengths[sl], p.precision)
            C.solve_dense_cpu(s.data_ptr(), sim_dtype, s.shape[0], n, lengths[sl].data_ptr(), p.tau, p.eps,
                              **common, **out.pointers(sl))
        return
    if inv is None:  # extreme norms: normalize first, then the products are cosines already
        k = normalized_features(paint(feats, painted), lengths, p.precision)
    words = C.words_per_row(n)
    block = min(ROW_BLOCK, n)
    # Groups of problems share one solver call (at least one problem per thread keeps all busy); their
    # graphs are packed from the upper part of S, a block of rows at a time, through one reused buffer.
    # Words are uint64 held in int64 (only the address reaches the kernels).
    for grp in batch_slices(0, bsz, n * words * 8, cfg.graph_budget, at_least=C.cpu_threads()):
        bits = torch.empty(grp.stop - grp.start, n, words, dtype=torch.int64)
        slices = batch_slices(grp.start, grp.stop, block * n * itemsize, cfg.memory_budget)
        buf = torch.empty(max(sl.stop - sl.start for sl in slices) * block * n, dtype=dtype)
        for sl in slices:
            b = sl.stop - sl.start
            inv_ptr = 0 if inv is None else inv[sl].data_ptr()
            for r0 in range(0, n, block):
                r1 = min(r0 + block, n)
                s = buf[: b * (r1 - r0) * (n - r0)].view(b, r1 - r0, n - r0)
                torch.bmm(k[sl, r0:r1], k[sl, r0:].transpose(1, 2), out=s)
                C.pack_graph_block_cpu(s.data_ptr(), sim_dtype, b, n, r0, r1 - r0, lengths[sl].data_ptr(),
                                       p.tau, bits[sl.start - grp.start].data_ptr(), inv_norms=inv_ptr)
        del buf, s
        C.solve_binary_cpu(bits.data_ptr(), bits.shape[0], n, lengths[grp].data_ptr(), p.eps,
                           table=table, **common, **out.pointers(grp))


def _solve_cuda(feats: torch.Tensor, lengths_host: torch.Tensor, p: SolveParams, out: Outputs) -> None:
    C = _ext.C
    if not _ext.HAS_CUDA_EXT:
        raise RuntimeError("backend: ncutfast._C was built without CUDA kernels")
    bsz, n = feats.shape[0], feats.shape[1]
    cfg = SETTINGS["cuda"]
    device = feats.device
    dev_index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(device).cuda_stream
    lengths = lengths_host.to(device)
    wide = p.precision in ("float64", "exact")
    sim_dtype = "float64" if wide else "float32"
    sim_bytes = n * n * (8 if wide else 4)
    if p.binary and p.precision == "exact":
        out.recheck = torch.zeros(bsz, dtype=torch.float64, device=device)

    def launch(work_batch: int) -> dict[str, object]:
        work = torch.empty(work_batch, C.workspace_doubles(n, KRYLOV_DIM), dtype=torch.float64, device=device)
        return _common(p, "cuda") | dict(workspace=work.data_ptr(), device=dev_index, stream=stream)

    with torch.cuda.device(device):
        # Freed tensors go back to torch's caching allocator, which orders their reuse on this stream after
        # the kernels queued here.
        if not p.binary:
            for sl in batch_slices(0, bsz, sim_bytes, cfg.memory_budget):
                s = similarity(feats[sl], lengths[sl], p.precision)
                C.solve_dense_cuda(s.data_ptr(), sim_dtype, s.shape[0], n, lengths[sl].data_ptr(), p.tau, p.eps,
                                   **launch(s.shape[0]), **out.pointers(sl))
        else:
            words = C.words_per_row(n)
            for grp in batch_slices(0, bsz, n * words * 8, cfg.graph_budget):
                bits = torch.empty(grp.stop - grp.start, n, words, dtype=torch.int64, device=device)
                for sl in batch_slices(grp.start, grp.stop, sim_bytes, cfg.memory_budget):
                    tau, dt = p.tau, sim_dtype
                    if out.recheck is not None:  # the exact edges as 0 / 1, packed at 0.5
                        edges, out.recheck[sl] = exact.exact_mask(normalized_features(feats[sl], lengths_host[sl],
                                                                                      "exact"), lengths_host[sl], tau)
                        s, tau, dt = edges.to(torch.float32).contiguous(), 0.5, "float32"
                    else:
                        s = similarity(feats[sl], lengths[sl], p.precision)
                    C.pack_graph_cuda(s.data_ptr(), dt, s.shape[0], n, lengths[sl].data_ptr(), tau,
                                      bits[sl.start - grp.start].data_ptr(), dev_index, stream)
                    del s
                C.solve_binary_cuda(bits.data_ptr(), bits.shape[0], n, lengths[grp].data_ptr(), p.eps,
                                    **launch(bits.shape[0]), **out.pointers(grp))
    if not p.binary and bool((out.iterations < 0).any()):  # the solver's flag for a degree <= 0 (lanczos.h)
        b = int((out.iterations < 0).nonzero()[0, 0])
        raise ValueError(f"feats: problem {b} has a degree <= 0 in the non-binary graph (an all-zero feature row "
                         "with tau = 0?)")
