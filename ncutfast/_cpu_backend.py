"""The CPU backend: the compiled extension's OpenMP kernels (``ncutfast._C``, sources in ``csrc/``).

Per chunk of the padded batch: rows are L2-normalized and the similarity is formed by torch (its BLAS;
float64 for "float64", IEEE float32 otherwise: a CPU has no tensor cores, so "fast" equals "float32").
For binary graphs only the upper part of S is formed, a block of rows at a time, and the extension
thresholds and mirrors it into a packed bitmask (N^2 / 8 bytes per problem, exactly symmetric); then it
runs the deflated Lanczos solver of ``csrc/ncut/lanczos.h``, one OpenMP thread per problem (the solve is
small next to the similarity product: at N = 3600, C = 768 on 2 cores, about 15-30 ms against 60 ms for
the half product and 105 ms for the full one, best of 7). Non-binary
graphs are solved from the full similarity matrix. Results are deterministic (and do not depend on the
thread count unless a team solves a problem).
"""

from __future__ import annotations

import torch

from . import _ext
from ._dispatch import Spectrum, converged_flags
from ._torch_backend import normalized_features

__all__ = ["solve", "batch_slices", "KRYLOV_DIM", "CHECK_EVERY", "MEMORY_BUDGET",
           "ROW_BLOCK", "GRAPH_BUDGET"]

#: Basis vectors per Lanczos cycle (the cycle restarts from its Ritz vector when it ends unconverged).
KRYLOV_DIM = 48
#: Lanczos steps between convergence checks (a check is a tiny tridiagonal solve, no synchronization).
CHECK_EVERY = 2
#: Bytes of similarity blocks one chunk of the batch may hold.
MEMORY_BUDGET = 1 << 28
#: Rows of the similarity formed per matrix product (a multiple of 64). Binary graphs only need the upper
#: part: rows [r0, r0 + ROW_BLOCK) against columns [r0, N) is 57% of the full product's work at N = 3600.
ROW_BLOCK = 512
#: Bytes of packed graphs (N^2 / 8 per problem) one solver call may hold; it always takes at least one
#: problem per thread.
GRAPH_BUDGET = 1 << 29


def batch_slices(start: int, stop: int, per_bytes: int, budget: int, at_least: int = 1) -> list[slice]:
    """Consecutive slices of [start, stop) holding max(at_least, budget // per_bytes) problems each."""
    per = max(at_least, budget // max(1, per_bytes))
    return [slice(i, min(i + per, stop)) for i in range(start, stop, per)]


def _similarity(feats: torch.Tensor, lengths: torch.Tensor, precision: str) -> torch.Tensor:
    """Contiguous cosine similarities ``(b, n, n)``: float64 for "float64", IEEE float32 otherwise."""
    f = normalized_features(feats, lengths, precision)
    return torch.bmm(f, f.transpose(1, 2)).contiguous()


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

    ``table=False`` replaces the subset-sum-table mat-vec by the set-bit loop the CUDA kernels use, and
    ``team=k`` solves each problem with k threads that synchronize like a CUDA thread block (0: one thread
    per problem unless a small batch holds huge problems); tests run both to cover the GPU's code paths.
    ``converged`` follows ``_dispatch.converged_flags``.
    """
    if feats.device.type != "cpu":
        raise ValueError(f"feats: the cpu backend needs CPU tensors, got device {feats.device}")
    C = _ext.C
    if C is None:
        raise RuntimeError(f"backend: the compiled extension ncutfast._C is not available ({_ext.IMPORT_ERROR})")
    bsz, n_max = feats.shape[0], feats.shape[1]
    lengths = lengths.to(torch.int64).cpu().contiguous()
    n = int(lengths.max())  # columns beyond every length are padding: drop them
    feats = feats[:, :n]
    lam2, lam3, resid = (torch.empty(bsz, dtype=torch.float64) for _ in range(3))
    x = torch.empty(bsz, n, dtype=torch.float64)
    iters = torch.empty(bsz, dtype=torch.int64)
    sim_dtype = "float64" if precision == "float64" else "float32"
    itemsize = 8 if precision == "float64" else 4

    def outs(sl: slice) -> dict[str, int]:
        return dict(lambda2=lam2[sl].data_ptr(), lambda3=lam3[sl].data_ptr(), x=x[sl].data_ptr(),
                    residual=resid[sl].data_ptr(), iterations=iters[sl].data_ptr())

    common = dict(tol=tol, max_iter=max_iter, krylov_dim=KRYLOV_DIM, check_every=CHECK_EVERY, team=team)
    sim_bytes = n * n * itemsize
    if not binary:
        for sl in batch_slices(0, bsz, sim_bytes, MEMORY_BUDGET):
            s = _similarity(feats[sl], lengths[sl], precision)
            C.solve_dense_cpu(s.data_ptr(), sim_dtype, s.shape[0], n, lengths[sl].data_ptr(), tau, eps, **common,
                              **outs(sl))
    else:
        words = C.words_per_row(n)
        block = min(ROW_BLOCK, n)
        # Groups of problems share one solver call (at least one problem per thread keeps all busy); their
        # graphs are packed from the upper part of S, a block of rows at a time. Words are uint64 held in
        # int64 (only the address reaches the kernels).
        for grp in batch_slices(0, bsz, n * words * 8, GRAPH_BUDGET, at_least=C.cpu_threads()):
            bits = torch.empty(grp.stop - grp.start, n, words, dtype=torch.int64)
            for sl in batch_slices(grp.start, grp.stop, block * n * itemsize, MEMORY_BUDGET):
                f = normalized_features(feats[sl], lengths[sl], precision)
                for r0 in range(0, n, block):
                    r1 = min(r0 + block, n)
                    s = torch.bmm(f[:, r0:r1], f[:, r0:].transpose(1, 2)).contiguous()
                    C.pack_graph_block_cpu(s.data_ptr(), sim_dtype, s.shape[0], n, r0, r1 - r0,
                                           lengths[sl].data_ptr(), tau, bits[sl.start - grp.start].data_ptr())
                    del s
            C.solve_binary_cpu(bits.data_ptr(), bits.shape[0], n, lengths[grp].data_ptr(), eps, table=table,
                               **common, **outs(grp))
    x = torch.nn.functional.pad(x, (0, n_max - n))
    return Spectrum(lam2, lam3, x, resid, converged_flags(resid, lam2, lam3, tol), iters)
