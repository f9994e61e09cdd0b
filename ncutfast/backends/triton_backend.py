"""The Triton backend: bitmask affinity kernels + bitmask Lanczos operator, float64 Lanczos driver.

Per padded batch: ``kernels.affinity.affinity_fwd`` builds the thresholded graph as a bitmask with row
popcounts in one launch (never an N x N float matrix), degrees follow exactly from the popcounts, and the
batched deflated Lanczos of ``backends.lanczos`` runs on ``kernels.operator.BitmaskOperator``: its steps
between two convergence checks are fused (``kernels.operator.FusedSteps``: two launches per step, optionally
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

from ..exact import recheck_fraction
from .contract import Outputs, SolveParams, Spectrum, check_batch, check_painted, paint, solvable
from .lanczos import lanczos_fiedler
from .torch_backend import solve as torch_solve

__all__ = ["available", "solve"]


def available() -> bool:
    """True when Triton imports and can run here: a CUDA device, or the interpreter."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    from ..kernels._utils import interpreting

    return interpreting() or torch.cuda.is_available()


def solve(feats: torch.Tensor, lengths: torch.Tensor, params: SolveParams, *,
          painted: torch.Tensor | None = None) -> Spectrum:
    """The backend contract (``backends.contract``) on CUDA tensors, or CPU ones under the interpreter.

    ``params.precision`` selects the similarity kernel ("float64", "float32" = the fp32 dot without tf32, by
    default certified: an fp16 tensor-core screen and fixed-order fp32 rechecks, "fast" = fp16 tensor cores,
    "exact" = ``affinity_exact_fwd``: the same screen and float64 rechecks); the degrees and the
    eigen-solve are float64 in every mode. Painted rows: a zeroed copy.
    """
    if not params.binary:
        return torch_solve(feats, lengths, params, painted=painted)
    from ..kernels._utils import block_sizes, interpreting
    from ..kernels.affinity import affinity_exact_fwd, affinity_fwd
    from ..kernels.operator import BitmaskOperator, FusedSteps

    lengths = check_batch(feats, lengths)
    feats = paint(feats, check_painted(painted, feats))
    device = feats.device
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"triton backend: {device.type} tensors need TRITON_INTERPRET=1 (set before "
                           "ncutfast.kernels is imported); on a GPU pass CUDA tensors")
    out = Outputs.allocate(feats.shape[0], feats.shape[1], device)
    exact = params.precision == "exact"
    if exact:
        out.recheck = torch.zeros(feats.shape[0], dtype=torch.float64, device=device)
    part = solvable(feats, lengths, lengths >= 2)
    if part is not None:
        di, ln, f = part
        if exact:
            mask, counts, rechecked = affinity_exact_fwd(f, ln, tau=params.tau)
            out.recheck[di] = recheck_fraction(rechecked, ln)
        else:
            mask, counts = affinity_fwd(f, ln, tau=params.tau, precision=params.precision)
        op = BitmaskOperator(mask, counts, ln, params.eps)
        sd = op.degrees.sqrt()  # 0 on padding
        y0 = sd / sd.norm(dim=-1, keepdim=True)
        mode = block_sizes("lanczos")["solve"]
        steps = None if mode == "torch" else FusedSteps(op, mode)
        res = lanczos_fiedler(op, y0, ln, tol=params.tol, max_iter=params.max_iter, steps=steps)
        # True residual of the returned pair (one extra mat-vec): ||M y - theta1 y||.
        out.residual[di] = (op(res.y) - res.theta1[:, None] * res.y).norm(dim=-1)
        out.lambda2[di] = 1.0 - res.theta1
        out.lambda3[di] = 1.0 - res.theta2
        out.x[di, : f.shape[1]] = op.s * res.y
        out.iterations[di] = res.iterations
    return out.spectrum(feats.shape[1], params.tol)
