"""The CUDA backend: the compiled extension's CUDA kernels (``ncutfast._C``, sources in ``csrc/cuda``).

Per chunk of the padded batch: torch normalizes the rows and forms the similarity with cuBLAS (float64,
IEEE float32, or tf32 for "fast"); ``pack_graph_cuda`` thresholds it into a packed bitmask (one warp per
row, two ballots per word), and ``solve_binary_cuda`` runs the deflated Lanczos solver of
``csrc/ncut/lanczos.h`` with one thread block per problem: the solve of the whole batch is one launch with
no host synchronization. Non-binary graphs are solved from the similarity matrix. Everything is queued on
torch's current stream of the features' device; the kernels take raw device pointers, so the extension
needs no CUDA build of torch. Results are deterministic (fixed-order reductions).
"""

from __future__ import annotations

import torch

from . import _ext
from ._cpu_backend import batch_slices, check_args
from ._dispatch import Spectrum, converged_flags
from ._torch_backend import matmul_precision, normalized_features

__all__ = ["solve", "KRYLOV_DIM", "CHECK_EVERY", "MEMORY_BUDGET", "GRAPH_BUDGET"]

#: Basis vectors per Lanczos cycle; the workspace is (KRYLOV_DIM + 6) float64 vectors per problem.
KRYLOV_DIM = 48
#: Lanczos steps between convergence checks (one thread solves the small tridiagonal matrix).
CHECK_EVERY = 4
#: Bytes of similarity matrices one chunk of the batch may hold.
MEMORY_BUDGET = 1 << 31
#: Bytes of packed graphs (N^2 / 8 per problem) one solver launch may hold: 2 GiB is 10,000 problems of
#: 3600 tokens, so a batch is normally a single launch with one thread block per problem.
GRAPH_BUDGET = 1 << 31


def _similarity(feats: torch.Tensor, lengths: torch.Tensor, precision: str) -> torch.Tensor:
    """Contiguous cosine similarities ``(b, n, n)`` by cuBLAS: float64, IEEE float32, or tf32 ("fast")."""
    f = normalized_features(feats, lengths, precision)
    with matmul_precision(f.device, precision):
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
) -> Spectrum:
    """Backend contract of ``ncutfast._dispatch``: padded ``(B, N_max, C)`` CUDA features -> Spectrum.

    Bad arguments raise ``TypeError``/``ValueError`` naming the argument (host-side checks: finiteness of
    the features is the caller's, as ``ncutfast.api`` does). A non-binary graph with a degree <= 0 (tau < 0)
    raises ``ValueError`` (one synchronization, non-binary graphs only). ``converged`` follows
    ``_dispatch.converged_flags``. Precision "exact" runs the torch backend's exact graph (``ncutfast.exact``).
    """
    if isinstance(lengths, torch.Tensor) and lengths.device.type != "cpu":
        lengths = lengths.cpu()
    check_args(feats, lengths, tau, eps, binary, precision, tol, max_iter, device_type="cuda")
    if precision == "exact":
        from ._torch_backend import solve as torch_solve

        return torch_solve(feats, lengths, tau=tau, eps=eps, binary=binary, precision=precision, tol=tol,
                           max_iter=max_iter)
    C = _ext.C
    if not _ext.HAS_CUDA_EXT:
        raise RuntimeError("backend: ncutfast._C was built without CUDA kernels")
    device = feats.device
    dev_index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(device).cuda_stream
    bsz, n_max = feats.shape[0], feats.shape[1]
    lengths_host = lengths.to(torch.int64).cpu()
    n = int(lengths_host.max())  # columns beyond every length are padding: drop them
    feats = feats[:, :n]
    lengths = lengths_host.to(device)
    lam2, lam3, resid = (torch.empty(bsz, dtype=torch.float64, device=device) for _ in range(3))
    x = torch.empty(bsz, n, dtype=torch.float64, device=device)
    iters = torch.empty(bsz, dtype=torch.int64, device=device)
    sim_dtype = "float64" if precision == "float64" else "float32"
    itemsize = 8 if precision == "float64" else 4

    def outs(sl: slice) -> dict[str, int]:
        return dict(lambda2=lam2[sl].data_ptr(), lambda3=lam3[sl].data_ptr(), x=x[sl].data_ptr(),
                    residual=resid[sl].data_ptr(), iterations=iters[sl].data_ptr())

    def workspace(b: int) -> torch.Tensor:
        return torch.empty(b, C.workspace_doubles(n, KRYLOV_DIM), dtype=torch.float64, device=device)

    def params(work: torch.Tensor) -> dict:
        return dict(tol=tol, max_iter=max_iter, krylov_dim=KRYLOV_DIM, check_every=CHECK_EVERY,
                    workspace=work.data_ptr(), device=dev_index, stream=stream)

    sim_bytes = n * n * itemsize
    with torch.cuda.device(device):
        # Freed tensors go back to torch's caching allocator, which orders their reuse on this stream after
        # the kernels queued here.
        if not binary:
            for sl in batch_slices(0, bsz, sim_bytes, MEMORY_BUDGET):
                s = _similarity(feats[sl], lengths[sl], precision)
                work = workspace(s.shape[0])
                C.solve_dense_cuda(s.data_ptr(), sim_dtype, s.shape[0], n, lengths[sl].data_ptr(), tau, eps,
                                   **params(work), **outs(sl))
        else:
            words = C.words_per_row(n)
            for grp in batch_slices(0, bsz, n * words * 8, GRAPH_BUDGET):
                bits = torch.empty(grp.stop - grp.start, n, words, dtype=torch.int64, device=device)
                for sl in batch_slices(grp.start, grp.stop, sim_bytes, MEMORY_BUDGET):
                    s = _similarity(feats[sl], lengths[sl], precision)
                    C.pack_graph_cuda(s.data_ptr(), sim_dtype, s.shape[0], n, lengths[sl].data_ptr(), tau,
                                      bits[sl.start - grp.start].data_ptr(), dev_index, stream)
                    del s
                work = workspace(bits.shape[0])
                C.solve_binary_cuda(bits.data_ptr(), bits.shape[0], n, lengths[grp].data_ptr(), eps,
                                    **params(work), **outs(grp))
    if not binary and bool((iters < 0).any()):  # the solver's flag for a degree <= 0 (csrc/ncut/lanczos.h)
        b = int((iters < 0).nonzero()[0, 0])
        raise ValueError(f"feats: problem {b} has a degree <= 0 (W = similarity where >= tau, with tau < 0 and "
                         "negative similarities?)")
    x = torch.nn.functional.pad(x, (0, n_max - n))
    return Spectrum(lam2, lam3, x, resid, converged_flags(resid, lam2, lam3, tol), iters)
