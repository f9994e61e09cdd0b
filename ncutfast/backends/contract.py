"""What every backend shares: the parameters and their checks, the result type, the converged rule, the
output allocation, the row normalization and similarity, and the solver's constants.

A backend is a function ``solve(feats, lengths, params, **options) -> Spectrum``:

- ``feats``: torch tensor ``(B, N_max, C)``, floating point, on the backend's device. Rows at or beyond
  ``lengths[b]`` are padding and must be ignored (they may hold anything finite).
- ``lengths``: int64 CPU tensor ``(B,)`` with ``1 <= lengths[b] <= N_max``.
- ``params``: a ``SolveParams`` (checked when it is made).
- ``painted`` (keyword, optional): bool ``(B, N_max)`` on the features' device, the rows to solve as zero
  rows (MaskCut's painted tokens, spec §4 step 1): the result is that of the features with those rows
  zeroed (``paint``), bit for bit, whether a backend zeroes a copy or never reads the rows' values.
- The backend L2-normalizes rows (norm clamped at 1e-12: ``normalized_features``), forms the similarity in
  ``params.precision`` ("float64", "float32" = fp32 without tf32, "fast" = tensor cores where the device
  has them, "exact" = the float64 graph certified from a low-precision product: ``ncutfast.exact``),
  builds W (binary: 1 where similarity > tau else eps; non-binary: the similarity with entries < tau set to
  eps, for tau >= 0 only, and a degree <= 0 raises ``ValueError``), degrees d = W 1, and returns the 2nd
  and 3rd smallest generalized eigenpairs of (D - W, D).

This module imports no other module of ``ncutfast.backends``; the backends import it, and the chooser
(``ncutfast.backends``) imports the backends.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .._validate import FLOAT_DTYPE_NAMES, check_choice, check_eps, check_positive_int, check_tau, dtype_name
from ..exact import normalized_rows
from ..reference import NORM_EPS

__all__ = ["BACKEND_NAMES", "BREAKDOWN", "KRYLOV_DIM", "PARK", "PRECISIONS", "Outputs", "SolveParams", "Spectrum",
           "batch_slices", "check_batch", "check_painted", "converged_flags", "matmul_precision",
           "normalized_features", "paint", "similarity", "solvable"]

BACKEND_NAMES = ("torch", "cpu", "cuda", "triton")
PRECISIONS = ("float64", "float32", "fast", "exact")

#: Basis vectors per Lanczos cycle (a cycle that ends unconverged restarts from its Ritz vector); every
#: backend's solver uses it (the compiled one receives it as ``krylov_dim``).
KRYLOV_DIM = 48
#: A new Lanczos vector of norm <= BREAKDOWN is rounding noise and the space is continued with a fresh
#: vector (||M|| <= 1, so this is relative too). The wanted eigenvalues cluster within ~1e-5 of 1, so
#: genuine couplings can be as small as 1e-11, and one of 1e-11 still matters when the eigengap (and with it
#: the tolerance tol * gap) is 1e-6; classical Gram-Schmidt applied twice keeps even a tiny vector
#: orthogonal. The compiled extension's ``kBreakdown`` (``csrc/ncut/lanczos.h``, exported as
#: ``ncutfast._C.BREAKDOWN``) is the same number.
BREAKDOWN = 1e-14
#: Diagonal entry that parks padded rows of a tridiagonal matrix far below M's spectrum [-1, 1].
PARK = -8.0


@dataclass(frozen=True)
class SolveParams:
    """The graph and solver parameters of one solve, checked when made (each failure names its argument).

    Attributes:
        tau: similarity threshold in (-1, 1); >= 0 for a non-binary graph (``_validate.check_tau``).
        eps: weight of non-edges, > 0.
        binary: True for TokenCut's binary graph, False for its ``--no-binary-graph`` ablation.
        precision: one of ``PRECISIONS``.
        tol: convergence tolerance > 0: residual <= tol * min(1, lambda3 - lambda2).
        max_iter: Lanczos steps per problem, all restarts included, >= 1.
    """

    tau: float
    eps: float
    binary: bool = True
    precision: str = "float32"
    tol: float = 1e-8
    max_iter: int = 300

    def __post_init__(self) -> None:
        if not isinstance(self.binary, bool):
            raise TypeError(f"binary: expected a bool, got {type(self.binary).__name__}")
        object.__setattr__(self, "tau", check_tau(self.tau, binary=self.binary))
        object.__setattr__(self, "eps", check_eps(self.eps))
        check_choice(self.precision, "precision", PRECISIONS)
        tol = self.tol
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
            raise ValueError(f"tol: must be a finite number > 0, got {tol!r}")
        object.__setattr__(self, "tol", float(tol))
        object.__setattr__(self, "max_iter", check_positive_int(self.max_iter, "max_iter"))


def check_batch(feats: object, lengths: object, device_types: tuple[str, ...] | None = None) -> torch.Tensor:
    """Check a padded batch against the contract (``device_types``: the devices the backend runs on, None
    for any); return ``lengths`` as a contiguous int64 CPU tensor.

    Host-side checks only (no synchronization): the features' finiteness is the caller's (``ncutfast.api``
    checks it; the CPU extension backend finds it in its row norms).
    """
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"feats: expected a torch.Tensor, got {type(feats).__name__}")
    if device_types is not None and feats.device.type not in device_types:
        raise ValueError(f"feats: this backend needs {' or '.join(d.upper() for d in device_types)} tensors, "
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
    return lengths.to(torch.int64).contiguous()


def check_painted(painted: object, feats: torch.Tensor) -> torch.Tensor | None:
    """Check the ``painted`` rows of a padded batch (None: no row is painted); return them as given."""
    if painted is None:
        return None
    if not isinstance(painted, torch.Tensor):
        raise TypeError(f"painted: expected a torch.Tensor or None, got {type(painted).__name__}")
    if painted.dtype != torch.bool:
        raise TypeError(f"painted: expected dtype bool, got {dtype_name(painted.dtype)}")
    if tuple(painted.shape) != tuple(feats.shape[:2]):
        raise ValueError(f"painted: expected shape {tuple(feats.shape[:2])} (B, N_max), got {tuple(painted.shape)}")
    if painted.device != feats.device:
        raise ValueError(f"painted: expected device {feats.device} (the features'), got {painted.device}")
    return painted


def paint(feats: torch.Tensor, painted: torch.Tensor | None) -> torch.Tensor:
    """``feats`` ``(B, N, C)`` with the ``painted`` rows (bool ``(B, N)``, or None: none) zeroed: a new
    tensor, or ``feats`` itself when nothing is painted."""
    return feats if painted is None else feats.masked_fill(painted[:, :, None], 0)


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
        converged: ``(B,)`` bool, ``converged_flags``.
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

    The eigenvector's angle error is about residual / gap, so a degenerate spectrum (lambda3 == lambda2)
    never converges: its eigenvector is not determined. N = 1 and N = 2 count as converged (gap = 1).
    """
    gap = torch.nan_to_num(lambda3 - lambda2, nan=1.0).clamp(max=1.0)
    return residual <= tol * gap


@dataclass
class Outputs:
    """A batch's result arrays while a backend fills them, initialized to N = 1's answer (spec: no second
    eigenpair, lambda = NaN, x = [0]); ``x`` is ``(B, n)`` with n <= N_max the widest problem. ``recheck``
    is set by backends that build an exact graph (``Spectrum.recheck_fraction``; N = 1 needs none: 0)."""

    lambda2: torch.Tensor
    lambda3: torch.Tensor
    x: torch.Tensor
    residual: torch.Tensor
    iterations: torch.Tensor
    recheck: torch.Tensor | None = None

    @classmethod
    def allocate(cls, batch: int, n: int, device: torch.device) -> Outputs:
        lam2 = torch.full((batch,), float("nan"), dtype=torch.float64, device=device)
        return cls(lam2, lam2.clone(), torch.zeros(batch, n, dtype=torch.float64, device=device),
                   torch.zeros(batch, dtype=torch.float64, device=device),
                   torch.zeros(batch, dtype=torch.int64, device=device))

    def pointers(self, sl: slice) -> dict[str, int]:
        """The compiled extension's output arguments for the problems ``sl``."""
        return dict(lambda2=self.lambda2[sl].data_ptr(), lambda3=self.lambda3[sl].data_ptr(),
                    x=self.x[sl].data_ptr(), residual=self.residual[sl].data_ptr(),
                    iterations=self.iterations[sl].data_ptr())

    def spectrum(self, n_max: int, tol: float) -> Spectrum:
        """The finished Spectrum, ``x`` zero-padded to ``n_max`` columns."""
        x = torch.nn.functional.pad(self.x, (0, n_max - self.x.shape[1]))
        return Spectrum(self.lambda2, self.lambda3, x, self.residual,
                        converged_flags(self.residual, self.lambda2, self.lambda3, tol), self.iterations,
                        self.recheck)


def solvable(feats: torch.Tensor, lengths: torch.Tensor,
             select: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The problems where ``select`` (bool ``(B,)``, CPU) holds: their indices on the features' device,
    their lengths (CPU) and their features cut to the longest of them (a view when every problem takes
    part, else a gather); None when there is none."""
    idx = torch.nonzero(select).flatten()
    if not idx.numel():
        return None
    ln = lengths[idx]
    nm = int(ln.max())
    idx_dev = idx.to(feats.device)
    f = feats[:, :nm] if idx.numel() == feats.shape[0] else feats[idx_dev, :nm]
    return idx_dev, ln, f


def batch_slices(start: int, stop: int, per_bytes: int, budget: int, at_least: int = 1) -> list[slice]:
    """Consecutive slices of [start, stop) holding max(at_least, budget // per_bytes) problems each."""
    per = max(at_least, budget // max(1, per_bytes))
    return [slice(i, min(i + per, stop)) for i in range(start, stop, per)]


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


#: Range of the row scaling's exponent e per working dtype: 2^e and 2^-e are normal numbers of it, and
#: 1e-12 2^-e is finite in float32 (rows below 2^-126 are scaled less; they fall under the clamp anyway).
_EXPONENTS = {torch.float32: (-125, 125), torch.float64: (-125, 1021)}


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2.0 ** k as float64 for integers k in [-1022, 1023], built from its bits (exact on every device)."""
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)


def normalized_features(feats: torch.Tensor, lengths: torch.Tensor, precision: str) -> torch.Tensor:
    """Rows divided by max(||row||, 1e-12) as the reference does, padding rows zeroed; float64 or float32
    ``(B, N, C)``.

    Each row is first multiplied by the power of two 2^-e that brings its largest |entry| into [0.5, 1):
    exact, so rows of normal numbers give the plain formula's bits, while huge finite rows (float32 beyond
    about 1e19, float64 beyond 1e154, float64 beyond float32's range at float32 precision) no longer
    overflow when squared or converted. The clamp applies to the unscaled norm (||g|| 2^e), so a row whose
    norm is below 1e-12 still becomes row / 1e-12 (1e-12 rounded to the output dtype, as torch's clamp).

    Precision "exact" gives ``reference.normalize_rows``'s float64 rows bit for bit (``exact.normalized_rows``).
    """
    if precision == "exact":
        return normalized_rows(feats, lengths)
    dtype = torch.float64 if precision == "float64" else torch.float32
    work = torch.float64 if feats.dtype == torch.float64 else dtype  # holds the input exactly
    f = feats.to(work)
    valid = torch.arange(f.shape[1], device=f.device)[None, :] < lengths.to(f.device)[:, None]
    f = torch.where(valid[:, :, None], f, torch.zeros((), dtype=work, device=f.device))
    amax = torch.linalg.vector_norm(f, ord=float("inf"), dim=-1, keepdim=True)
    e = torch.frexp(amax).exponent.clamp(*_EXPONENTS[work])
    g = (f * _pow2(-e).to(work)).to(dtype)
    del f
    norm = g.norm(dim=-1, keepdim=True)
    clamp = torch.tensor(NORM_EPS, dtype=dtype).item()
    tiny = norm.to(torch.float64) * _pow2(e) < clamp  # the unscaled norm (inf if it overflows) below 1e-12
    # Tiny rows: g / (1e-12 2^-e) = row / 1e-12, the same power of two scaling both operands.
    return g / torch.where(tiny, (clamp * _pow2(-e)).to(dtype), norm)


def similarity(feats: torch.Tensor, lengths: torch.Tensor, precision: str) -> torch.Tensor:
    """Contiguous cosine similarities ``(b, n, n)``: float64 for "float64" and "exact", IEEE float32 for
    "float32", tf32 for "fast" on CUDA devices (float32 elsewhere)."""
    f = normalized_features(feats, lengths, precision)
    with matmul_precision(f.device, precision):
        return torch.bmm(f, f.transpose(1, 2)).contiguous()
