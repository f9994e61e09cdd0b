"""The solvers of the ncut eigenproblem, and the one place a backend is chosen.

``contract`` (imported by every backend, importing none) holds what they share: ``SolveParams``,
``Spectrum``, ``converged_flags``, the argument checks, the output allocation and the solver constants.
The backends: ``torch_backend`` (any torch device), ``ext`` (the compiled extension ``ncutfast._C``, CPU and
CUDA, one backend per device name) and ``triton_backend`` (Triton kernels); ``lanczos`` is the batched
Lanczos driver of the torch and Triton backends. The modules below import nothing from this one, which
imports them only when a backend is first asked for.

``NCUTFAST_BACKEND`` forces a backend for every call whose ``backend`` argument is "auto", and a forced or
requested backend that is unavailable raises.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from .contract import BACKEND_NAMES, PRECISIONS, SolveParams, Spectrum

__all__ = ["BACKEND_NAMES", "PRECISIONS", "SolveFn", "SolveParams", "Spectrum", "available_backends",
           "resolve_backend", "solve"]

#: ``fn(feats, lengths, params, **options) -> Spectrum`` (the contract of ``backends.contract``).
SolveFn = Callable[..., Spectrum]


def _load(name: str) -> SolveFn | None:
    """Return the solve function of backend ``name`` or None if it cannot run in this process."""
    if name == "torch":
        from .torch_backend import solve

        return solve
    if name in ("cpu", "cuda"):
        from .. import _ext

        if not _ext.HAS_CPU_EXT or (name == "cuda" and not (_ext.HAS_CUDA_EXT and _ext.cuda_device_available())):
            return None
        from . import ext

        return functools.partial(ext.solve, device_type=name)
    if name == "triton":
        try:
            from .triton_backend import available, solve
        except ImportError:
            return None
        return solve if available() else None
    raise ValueError(f"backend: unknown backend {name!r}; expected 'auto' or one of {BACKEND_NAMES}")


def available_backends() -> list[str]:
    """Names of the backends that can run in this process, fastest first."""
    return [n for n in ("cuda", "triton", "cpu", "torch") if _load(n) is not None]


def resolve_backend(backend: str, device: torch.device) -> tuple[str, SolveFn]:
    """Pick the backend for tensors on ``device``.

    ``backend`` is "auto" or a name from ``BACKEND_NAMES``. With "auto", ``NCUTFAST_BACKEND`` (if set)
    forces a backend; otherwise CUDA tensors go to triton, then the CUDA extension, then torch, and CPU
    tensors go to the CPU extension, then torch. A requested or forced backend that is unavailable raises
    ``RuntimeError``.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    forced = backend
    if backend == "auto":
        forced = os.environ.get("NCUTFAST_BACKEND", "auto") or "auto"
    if forced != "auto":
        fn = _load(forced)
        if fn is None:
            where = "NCUTFAST_BACKEND" if backend == "auto" else "backend"
            raise RuntimeError(f"{where}: backend {forced!r} is not available in this process")
        return forced, fn
    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
    for name in order:
        fn = _load(name)
        if fn is not None:
            return name, fn
    raise RuntimeError("backend: no backend available")  # unreachable: torch always loads


def solve(feats: torch.Tensor, lengths: torch.Tensor, params: SolveParams, *, backend: str = "auto",
          **options: object) -> Spectrum:
    """Solve one padded batch on the chosen backend (``options``: backend-specific, e.g. the CPU
    extension's ``table`` and ``team``)."""
    _, fn = resolve_backend(backend, feats.device)
    return fn(feats, lengths, params, **options)
