"""The one place a backend is chosen.

Every backend implements the same contract, ``solve(feats, lengths, *, tau, eps, binary, precision, tol,
max_iter) -> Spectrum``:

- ``feats``: torch tensor ``(B, N_max, C)``, floating point, on the backend's device. Rows at or beyond
  ``lengths[b]`` are padding and must be ignored (they may hold anything finite).
- ``lengths``: int64 CPU tensor ``(B,)`` with ``1 <= lengths[b] <= N_max``.
- The backend L2-normalizes rows (norm clamped at 1e-12), forms the similarity in ``precision``
  ("float64", "float32" = fp32 without tf32, "fast" = tensor cores where the device has them, "exact" = the
  float64 graph certified from a low-precision product: ``ncutfast.exact``),
  builds W (binary: 1 where similarity > tau else eps; non-binary: the similarity with entries < tau set to
  eps), degrees d = W 1, and returns the 2nd and 3rd smallest generalized eigenpairs of (D - W, D).

Backends register themselves in ``_BACKENDS`` under a name; ``NCUTFAST_BACKEND`` forces one for every call
whose ``backend`` argument is "auto", and a forced or requested backend that is unavailable raises.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Spectrum", "BACKEND_NAMES", "available_backends", "converged_flags", "resolve_backend", "solve"]


@dataclass
class Spectrum:
    """Eigen-solution of a batch of ncut problems (all tensors on the features' device).

    Attributes:
        lambda2: ``(B,)`` float64, 2nd smallest generalized eigenvalue (the Ncut relaxation value).
        lambda3: ``(B,)`` float64, 3rd smallest; NaN where ``lengths[b] < 3`` (no such eigenpair exists).
        x: ``(B, N_max)`` float64 generalized eigenvector of lambda2, ``x^T D x = 1``, zero beyond
            ``lengths[b]``. Its sign is whatever the solver produced (arbitrary); the API fixes it.
        residual: ``(B,)`` float64, ``||M y - (1 - lambda2) y||_2`` with ``M = D^-1/2 W D^-1/2`` and
            ``y = D^1/2 x`` (unit norm); ``||M|| <= 1`` so this is also a relative residual.
        converged: ``(B,)`` bool, ``residual <= tol * min(1, lambda3 - lambda2)`` (the gap term: residual
            / gap bounds the eigenvector's angle error). A degenerate spectrum (lambda3 == lambda2) never
            converges: its eigenvector is not determined. N = 1 and N = 2 count as converged (gap = 1).
        iterations: ``(B,)`` int64, Lanczos steps taken (0 for dense solves).
        recheck_fraction: ``(B,)`` float64 for precision "exact" (binary graphs): the fraction of the
            entries (pairs i <= j) that the screening product left to the float64 recheck; None otherwise.
    """

    lambda2: torch.Tensor
    lambda3: torch.Tensor
    x: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor
    recheck_fraction: torch.Tensor | None = None


def converged_flags(residual: torch.Tensor, lambda2: torch.Tensor, lambda3: torch.Tensor, tol: float) -> torch.Tensor:
    """Every backend's rule: residual <= tol * min(1, lambda3 - lambda2) (gap 1 where lambda3 is NaN).

    The eigenvector's angle error is about residual / gap, so a degenerate spectrum is never "converged".
    """
    gap = torch.nan_to_num(lambda3 - lambda2, nan=1.0).clamp(max=1.0)
    return residual <= tol * gap


SolveFn = Callable[..., Spectrum]

BACKEND_NAMES = ("torch", "cpu", "cuda", "triton")
PRECISIONS = ("float64", "float32", "fast", "exact")


def _load(name: str) -> SolveFn | None:
    """Return the solve function of backend ``name`` or None if it cannot run in this process."""
    if name == "torch":
        from ._torch_backend import solve

        return solve
    if name == "cpu":
        from . import _ext

        if not _ext.HAS_CPU_EXT:
            return None
        from ._cpu_backend import solve as cpu_solve

        return cpu_solve
    if name == "cuda":
        from . import _ext

        if not _ext.HAS_CUDA_EXT or not _ext.cuda_device_available():
            return None
        from ._cuda_backend import solve as cuda_solve

        return cuda_solve
    if name == "triton":
        try:
            from ._triton_backend import available, solve
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
    backend: str = "auto",
) -> Spectrum:
    """Dispatch one padded batch to a backend (see the module docstring for the contract)."""
    _, fn = resolve_backend(backend, feats.device)
    return fn(feats, lengths, tau=tau, eps=eps, binary=binary, precision=precision, tol=tol,
              max_iter=max_iter)
