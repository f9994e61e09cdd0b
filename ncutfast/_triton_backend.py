"""The Triton backend: bitmask affinity kernels + bitmask Lanczos operator, float64 Lanczos driver.

Per padded batch: ``kernels.affinity.affinity_fwd`` builds the thresholded graph as a bitmask with row
popcounts in one launch (never an N x N float matrix), degrees follow exactly from the popcounts, and the
batched deflated Lanczos of ``ncutfast._lanczos`` runs on ``kernels.lanczos.BitmaskOperator``: its steps
between two convergence checks are fused (``kernels.lanczos.FusedSteps``: two launches per step, optionally
replayed from a CUDA graph, or one persistent launch per cycle; launch setting "lanczos" ``solve``), the
convergence checks run on the device (``kernels.ritz``), and the host synchronizes once per check. Every
problem of the batch shares each launch, whatever its length.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before
``ncutfast.kernels`` is first imported), which makes the whole path testable without a GPU. Non-binary
graphs (the ``--no-binary-graph`` ablation) have no bitmask form and go to the torch backend.
"""

from __future__ import annotations

import importlib

import torch

from ._dispatch import Spectrum, converged_flags

__all__ = ["available", "solve"]


def available() -> bool:
    """True when Triton imports and can run here: a CUDA device, or the interpreter."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    from .kernels._utils import interpreting

    return interpreting() or torch.cuda.is_available()


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
    """Backend contract of ``ncutfast._dispatch``: padded ``(B, N_max, C)`` features -> Spectrum.

    ``precision`` selects the similarity kernel ("float64", "float32" = IEEE fp32 without tf32, "fast" =
    fp16 tensor cores); the degrees and the eigen-solve are float64 in every mode. Precision "exact" runs the
    torch backend's exact graph (``ncutfast.exact``): there is no exact Triton kernel yet.
    """
    if not binary or precision == "exact":
        from ._torch_backend import solve as torch_solve

        return torch_solve(feats, lengths, tau=tau, eps=eps, binary=binary, precision=precision, tol=tol,
                           max_iter=max_iter)
    from ._lanczos import lanczos_fiedler
    from .kernels._utils import block_sizes, interpreting
    from .kernels.affinity import affinity_fwd
    from .kernels.lanczos import BitmaskOperator, FusedSteps

    device = feats.device
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"triton backend: {device.type} tensors need TRITON_INTERPRET=1 (set before "
                           "ncutfast.kernels is imported); on a GPU pass CUDA tensors")
    bsz, n_max = feats.shape[0], feats.shape[1]
    lengths = lengths.to(torch.int64).cpu()
    lam2 = torch.full((bsz,), float("nan"), dtype=torch.float64, device=device)
    lam3 = torch.full_like(lam2, float("nan"))
    x = torch.zeros(bsz, n_max, dtype=torch.float64, device=device)
    resid = torch.zeros(bsz, dtype=torch.float64, device=device)
    iters = torch.zeros(bsz, dtype=torch.int64, device=device)
    # N = 1 has no second eigenpair: lambda = NaN, x = [0] (reference.fiedler's definition).
    sub = torch.nonzero(lengths >= 2).flatten()
    if sub.numel():
        sub_dev = sub.to(device)
        ln = lengths[sub]
        nm = int(ln.max())
        # a view when every problem takes part (no copy of a large batch), else a gather
        f = feats[:, :nm] if sub.numel() == bsz else feats[sub_dev, :nm]
        mask, counts = affinity_fwd(f, ln, tau=tau, precision=precision)
        op = BitmaskOperator(mask, counts, ln, eps)
        sd = op.degrees.sqrt()  # 0 on padding
        y0 = sd / sd.norm(dim=-1, keepdim=True)
        mode = block_sizes("lanczos")["solve"]
        steps = None if mode == "torch" else FusedSteps(op, mode)
        res = lanczos_fiedler(op, y0, ln, tol=tol, max_iter=max_iter, steps=steps)
        # True residual of the returned pair (one extra mat-vec): ||M y - theta1 y||.
        r = (op(res.y) - res.theta1[:, None] * res.y).norm(dim=-1)
        lam2[sub_dev] = 1.0 - res.theta1
        lam3[sub_dev] = 1.0 - res.theta2
        x[sub_dev, :nm] = op.s * res.y
        resid[sub_dev] = r
        iters[sub_dev] = res.iterations
    return Spectrum(lam2, lam3, x, resid, converged_flags(resid, lam2, lam3, tol), iters)
