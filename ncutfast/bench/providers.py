"""Benchmark providers: every solver the harness compares, one line each in the tables.

A provider answers one question for a batch of token features ``(B, N, C)`` (float32 torch tensor on the
provider's device): the 2nd-smallest generalized eigenpair of TokenCut's graph, ``(D - W) x = lambda D x``
with ``W_ij = 1`` if ``cos(f_i, f_j) > tau`` else ``eps`` (``shared/spec/tokencut.md`` section 2).
``solve`` is the timed part (features in, eigenvectors on the device out); ``finish`` is untimed and turns
the raw output into a host :class:`Solution` for the agreement check.

Families:

- ``reference``: TokenCut's own path, torch float32 similarity then ``scipy.linalg.eigh(D - W, D,
  subset_by_index=[1, 2])`` per image (through :func:`ncutfast.reference.fiedler`).
- ``ncutfast``: ``ncutfast.ncut(..., backend=name)`` for every backend available in this process.
- ``peer``: other ways to get the same vector. Dense peers work on the symmetric normalized affinity
  ``M = D^-1/2 W D^-1/2`` whose eigenvalues are ``1 - lambda``: the wanted vector is ``y`` of the 2nd
  largest eigenvalue of ``M`` and ``x = D^-1/2 y``. Like the reference, exact peers take TokenCut's float32
  similarity and solve in float64, so that their agreement columns measure the solver, not the dtype.
  Approximate peers (ncut-pytorch, fastncut) are measured
  all the same and their agreement with the reference shows what the approximation costs.

Optional peers that are not installed, or that need a GPU on a CPU run, are listed as skipped with a line
saying why; nothing is installed or downloaded here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import reference

__all__ = ["Solution", "Provider", "tokencut_affinity", "tokencut_graph", "build_providers"]


@dataclass
class Solution:
    """What a provider returned for each image of a batch, on the host.

    Attributes:
        x: float64 ``(B, N)``, the generalized eigenvector of lambda2 (any scale, any sign).
        lambda2: float64 ``(B,)``; NaN where the provider does not estimate it.
        lambda3: float64 ``(B,)``; NaN where the provider does not estimate it.
        partition: bool ``(B, N)`` when the provider decides the partition itself (ncutfast's API); None
            means the harness applies TokenCut's rule (:func:`ncutfast.reference.orient_tokencut`) to ``x``.
        seed: int ``(B,)`` with ``partition``: the provider's seed token (argmax |x|).
        recheck: float64 ``(B,)``, ncutfast's precision "exact": the fraction of graph entries rechecked in
            float64 (``NcutResult.recheck_fraction``); None for everything else.
    """

    x: np.ndarray
    lambda2: np.ndarray
    lambda3: np.ndarray
    partition: np.ndarray | None = None
    seed: np.ndarray | None = None
    recheck: np.ndarray | None = None


def _host(t: Any) -> np.ndarray:
    """A torch tensor, CuPy array or NumPy array as a float64 NumPy array."""
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float64).numpy()
    if hasattr(t, "get"):  # CuPy
        return np.asarray(t.get(), dtype=np.float64)
    return np.asarray(t, dtype=np.float64)


def tokencut_graph(feats: torch.Tensor, tau: float, eps: float,
                   dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenCut's graph on the features' device, for the torch-based peers.

    The similarity is float32, as in TokenCut; W and d are ``dtype`` (float64 by default, the precision of
    the reference's eigensolve, so that the agreement columns measure the solver rather than the dtype).

    Args:
        feats: ``(..., N, C)`` float32 features.
    Returns:
        ``(W, d)``: W ``(..., N, N)`` with 1 where the cosine similarity is > tau (strict) and eps
        elsewhere; d ``(..., N)`` = W 1 (self-loop included).
    """
    f = F.normalize(feats.float(), p=2, dim=-1)
    s = f @ f.transpose(-1, -2)
    one = torch.ones((), dtype=dtype, device=s.device)
    w = torch.where(s > tau, one, torch.full((), eps, dtype=dtype, device=s.device))
    return w, w.sum(-1)


def tokencut_affinity(f: torch.Tensor, tau: float, eps: float) -> np.ndarray:
    """TokenCut's W of one image, built as its code builds it.

    Args:
        f: ``(N, C)`` float32 features on any device.
    Returns:
        float64 NumPy ``(N, N)``: the float32 cosine similarity (computed by torch on ``f``'s device, then
        copied to the host) mapped to 1 where it is > tau and to eps elsewhere.
    """
    f = F.normalize(f, p=2, dim=1)
    return np.where((f @ f.T).cpu().numpy() > tau, 1.0, eps)


def _from_top3(vals: np.ndarray, vecs: np.ndarray, s: np.ndarray) -> Solution:
    """A Solution from the 3 largest eigenpairs of each M, in any order.

    Args:
        vals: ``(B, 3)`` eigenvalues of M; vecs: ``(B, N, 3)`` their eigenvectors; s: ``(B, N)`` = d^-1/2.
    """
    order = np.argsort(-vals, axis=-1)
    vals = np.take_along_axis(vals, order, -1)
    y2 = np.take_along_axis(vecs, order[:, None, 1:2], -1)[..., 0]
    return Solution(y2 * s, 1.0 - vals[:, 1], 1.0 - vals[:, 2])


def _normalized(w: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, s)`` with ``s = d^-1/2`` and ``M = diag(s) W diag(s)``."""
    s = torch.rsqrt(d)
    return s[..., :, None] * w * s[..., None, :], s


class Provider:
    """One line of the benchmark tables.

    Subclasses set the class attributes and implement ``solve``/``finish``/``footprint``.

    Attributes:
        name: the line's label.
        family: "reference", "ncutfast" or "peer".
        device: "cpu" or "cuda", where ``solve`` expects the features.
        exact: True if the provider solves the eigenproblem to solver tolerance; False for approximations.
        note: one line on what it computes (dtype, algorithm), printed in the tables' legend.
    """

    name: str = ""
    family: str = "peer"
    exact: bool = True
    note: str = ""

    def __init__(self, device: str) -> None:
        self.device = device

    def solve(self, feats: torch.Tensor, tau: float, eps: float) -> Any:
        """Timed: eigenvectors for the batch ``feats`` ``(B, N, C)``; returns a provider-specific object."""
        raise NotImplementedError

    def finish(self, raw: Any, feats: torch.Tensor, tau: float, eps: float) -> Solution:
        """Untimed: the raw output of ``solve`` as a host :class:`Solution`."""
        raise NotImplementedError

    def footprint(self, n: int, c: int, b: int) -> int:
        """Estimated peak bytes for ``b`` images of ``n`` tokens, ``c`` channels (to skip what cannot fit)."""
        raise NotImplementedError


class TokenCutReference(Provider):
    """TokenCut's solver, image by image: torch f32 similarity, dense float64 W and D, scipy ``eigh``."""

    name = "tokencut-scipy"
    family = "reference"
    note = "TokenCut's path: torch f32 similarity, dense f64 W, D; scipy.linalg.eigh(D-W, D, subset [1,2])"

    def solve(self, feats: torch.Tensor, tau: float, eps: float) -> list[tuple[float, float, np.ndarray]]:
        return [reference.fiedler(tokencut_affinity(f, tau, eps)) for f in feats]

    def finish(self, raw: list[tuple[float, float, np.ndarray]], feats: torch.Tensor, tau: float,
               eps: float) -> Solution:
        return Solution(np.stack([r[2] for r in raw]), np.array([r[0] for r in raw]),
                        np.array([r[1] for r in raw]))

    def footprint(self, n: int, c: int, b: int) -> int:
        # f32 similarity, f64 W, D, D - W, and eigh's copies of both matrices; one image at a time.
        return 44 * n * n


class NcutfastProvider(Provider):
    """``ncutfast.ncut`` with a forced backend and precision (the whole batch in one call)."""

    family = "ncutfast"

    def __init__(self, device: str, backend: str, precision: str = "float32") -> None:
        super().__init__(device)
        self.backend = backend
        self.precision = precision
        self.name = f"ncutfast-{backend}" + ("" if precision == "float32" else f"-{precision}")
        self.note = f"ncutfast.ncut(backend={backend!r}, precision={precision!r}), batched"

    def solve(self, feats: torch.Tensor, tau: float, eps: float) -> Any:
        from .. import api

        return api.ncut(feats, tau=tau, eps=eps, backend=self.backend, precision=self.precision)

    def finish(self, raw: Any, feats: torch.Tensor, tau: float, eps: float) -> Solution:
        b, n = feats.shape[0], feats.shape[1]
        return Solution(_host(raw.eigenvector).reshape(b, n), _host(raw.lambda2).reshape(b),
                        _host(raw.lambda3).reshape(b), _host(raw.partition).astype(bool).reshape(b, n),
                        _host(raw.seed).astype(np.int64).reshape(b),
                        _host(raw.recheck_fraction).reshape(b) if self.precision == "exact" else None)

    def footprint(self, n: int, c: int, b: int) -> int:
        # The torch backend chunks the batch to a fixed budget; the others hold at most a dense f64 W.
        return 8 * n * n * (1 if self.backend == "torch" else b)


class TorchEigh(Provider):
    """Batched dense ``torch.linalg.eigh`` of M (all N eigenpairs, then pick the 2nd largest).

    ``dtype`` is the precision of W, M and the eigensolve: float64 (the default, as the reference) or
    float32 (named ``torch.linalg.eigh-f32``; faster, less accurate where the eigengap is small).
    """

    def __init__(self, device: str, dtype: torch.dtype = torch.float64) -> None:
        super().__init__(device)
        self.dtype = dtype
        bits = torch.finfo(dtype).bits
        self.name = "torch.linalg.eigh" + ("" if dtype == torch.float64 else f"-f{bits}")
        self.note = f"torch f{bits}: batched torch.linalg.eigh(D^-1/2 W D^-1/2), all eigenpairs"

    def solve(self, feats: torch.Tensor, tau: float, eps: float) -> tuple[torch.Tensor, ...]:
        m, s = _normalized(*tokencut_graph(feats, tau, eps, self.dtype))
        vals, vecs = torch.linalg.eigh(m)  # ascending: the trivial 1 is last
        return vals, vecs[..., -2] * s

    def finish(self, raw: tuple[torch.Tensor, ...], feats: torch.Tensor, tau: float, eps: float) -> Solution:
        vals, x = raw
        return Solution(_host(x), 1.0 - _host(vals[..., -2]), 1.0 - _host(vals[..., -3]))

    def footprint(self, n: int, c: int, b: int) -> int:
        return (4 + 4 * torch.finfo(self.dtype).bits // 8) * n * n * b  # f32 similarity; W, M, vectors, work


class TorchLobpcg(Provider):
    """``torch.lobpcg`` for the 3 largest eigenpairs of M (float64, default tolerance, seeded start)."""

    name = "torch.lobpcg"
    note = "torch f64: torch.lobpcg(D^-1/2 W D^-1/2, k=3, largest, default tol), seeded random start"

    def solve(self, feats: torch.Tensor, tau: float, eps: float) -> tuple[torch.Tensor, ...]:
        m, s = _normalized(*tokencut_graph(feats, tau, eps))
        gen = torch.Generator(device=feats.device).manual_seed(0)
        x0 = torch.randn(m.shape[:-1] + (3,), generator=gen, device=m.device, dtype=m.dtype)
        vals, vecs = torch.lobpcg(m, k=3, X=x0, largest=True)
        return vals, vecs, s

    def finish(self, raw: tuple[torch.Tensor, ...], feats: torch.Tensor, tau: float, eps: float) -> Solution:
        return _from_top3(*(_host(t) for t in raw))

    def footprint(self, n: int, c: int, b: int) -> int:
        return 28 * n * n * b


class ScipyArpack(Provider):
    """scipy ARPACK ``eigsh`` (implicitly restarted Lanczos) on a dense float64 M, image by image."""

    name = "scipy-arpack"
    note = "f64: scipy.sparse.linalg.eigsh(D^-1/2 W D^-1/2, k=3, which='LA'), dense, seeded v0"

    def solve(self, feats: torch.Tensor, tau: float, eps: float) -> list[tuple[np.ndarray, ...]]:
        from scipy.sparse.linalg import eigsh

        out = []
        for f in feats:
            w = tokencut_affinity(f, tau, eps)
            s = 1.0 / np.sqrt(w.sum(axis=1))
            m = w * s[:, None] * s[None, :]
            v0 = np.random.default_rng(0).standard_normal(m.shape[0])
            out.append((*eigsh(m, k=3, which="LA", v0=v0), s))
        return out

    def finish(self, raw: list[tuple[np.ndarray, ...]], feats: torch.Tensor, tau: float,
               eps: float) -> Solution:
        return _from_top3(*(np.stack(parts) for parts in zip(*raw, strict=True)))

    def footprint(self, n: int, c: int, b: int) -> int:
        return 28 * n * n


class CupyEigh(Provider):
    """Batched dense ``cupy.linalg.eigh`` of M in float64 (GPU only); the graph is built in torch."""

    name = "cupy-eigh"
    note = "CuPy f64: batched cupy.linalg.eigh(D^-1/2 W D^-1/2) via DLPack"

    def solve(self, feats: torch.Tensor, tau: float, eps: float) -> tuple[Any, Any]:
        import cupy

        m, s = _normalized(*tokencut_graph(feats, tau, eps))
        vals, vecs = cupy.linalg.eigh(cupy.from_dlpack(m.contiguous()))
        return vals, vecs[..., -2] * cupy.from_dlpack(s)

    def finish(self, raw: tuple[Any, Any], feats: torch.Tensor, tau: float, eps: float) -> Solution:
        vals, x = raw
        vals = _host(vals)
        return Solution(_host(x), 1.0 - vals[..., -2], 1.0 - vals[..., -3])

    def footprint(self, n: int, c: int, b: int) -> int:
        return 36 * n * n * b


class CupyEigsh(Provider):
    """``cupyx.scipy.sparse.linalg.eigsh`` (thick-restart Lanczos) on a dense float64 M, image by image."""

    name = "cupy-eigsh"
    note = "CuPy f64: cupyx.scipy.sparse.linalg.eigsh(D^-1/2 W D^-1/2, k=3, which='LA') per image"

    def solve(self, feats: torch.Tensor, tau: float, eps: float) -> list[tuple[Any, ...]]:
        import cupy
        from cupyx.scipy.sparse.linalg import eigsh

        out = []
        for f in feats:
            m, s = _normalized(*tokencut_graph(f, tau, eps))
            m_cp, s_cp = cupy.from_dlpack(m.contiguous()), cupy.from_dlpack(s)
            v0 = cupy.random.default_rng(0).standard_normal(m.shape[0], dtype=cupy.float64)
            out.append((*eigsh(m_cp, k=3, which="LA", v0=v0), s_cp))
        return out

    def finish(self, raw: list[tuple[Any, ...]], feats: torch.Tensor, tau: float, eps: float) -> Solution:
        return _from_top3(*(np.stack([_host(t) for t in parts]) for parts in zip(*raw, strict=True)))

    def footprint(self, n: int, c: int, b: int) -> int:
        return 24 * n * n


class NcutPytorch(Provider):
    """ncut-pytorch's ``ncut_fn`` given TokenCut's affinity, image by image.

    Up to 8192 nodes it normalizes the full affinity and takes a randomized low-rank SVD (q = n_eig + 10,
    2 subspace iterations); above 8192 nodes it also subsamples nodes (Nystrom) and propagates the result,
    so it is an approximation in both regimes. Its vectors are those of M; ``finish`` maps them back to
    ``x = D^-1/2 y`` with the graph's degrees.
    """

    name = "ncut-pytorch"
    exact = False
    note = "ncut_pytorch.ncut_fn(n_eig=3, affinity_fn=TokenCut's), randomized SVD (Nystrom above 8192 nodes)"

    def solve(self, feats: torch.Tensor, tau: float, eps: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from ncut_pytorch import ncut_fn

        def affinity(x1: torch.Tensor, x2: torch.Tensor | None = None, sigma: float | None = None,
                     **_: Any) -> torch.Tensor:
            f1 = F.normalize(x1, p=2, dim=-1)
            f2 = f1 if x2 is None else F.normalize(x2, p=2, dim=-1)
            s = f1 @ f2.T
            return torch.where(s > tau, torch.ones((), dtype=s.dtype, device=s.device),
                               torch.full((), eps, dtype=s.dtype, device=s.device))

        torch.manual_seed(0)  # its SVD is randomized
        return [ncut_fn(f, n_eig=3, affinity_fn=affinity, sigma=1.0, device=self.device) for f in feats]

    def finish(self, raw: list[tuple[torch.Tensor, torch.Tensor]], feats: torch.Tensor, tau: float,
               eps: float) -> Solution:
        _, d = tokencut_graph(feats, tau, eps, torch.float32)
        y = np.stack([_host(r[0][:, 1]) for r in raw])
        vals = np.stack([_host(r[1]) for r in raw])
        return Solution(y / np.sqrt(_host(d)), 1.0 - vals[:, 1], 1.0 - vals[:, 2])

    def footprint(self, n: int, c: int, b: int) -> int:
        return 20 * n * n


class FastNcut(Provider):
    """fastncut's ``ncut``: power iteration on the linear-kernel graph F F^T, never forming N x N.

    It does not threshold at tau: its graph is the raw cosine kernel (d clamped at eps), so it answers a
    different, cheaper question; the agreement columns show how close that lands to TokenCut's cut. Its
    vector ``z`` lives in the D^1/2 basis of its own degrees; ``finish`` maps it back: ``x = z / sqrt(d)``.
    """

    name = "fastncut"
    exact = False
    note = "fastncut.ncut(num_iters=4, data_format='bnc'): 4 power steps on the cosine kernel, no tau"
    iters = 4  # the package's recommendation for hundreds of feature channels

    def solve(self, feats: torch.Tensor, tau: float, eps: float) -> dict[str, Any]:
        import fastncut

        f = F.normalize(feats, p=2, dim=-1)
        return fastncut.ncut(f, num_iters=self.iters, data_format="bnc", return_all=True, eps=eps)

    def finish(self, raw: dict[str, Any], feats: torch.Tensor, tau: float, eps: float) -> Solution:
        b = feats.shape[0]
        z = _host(raw["eigenvector"]).reshape(b, -1)
        d = _host(raw["d"]).reshape(b, -1)
        nan = np.full(b, np.nan)
        return Solution(z / np.sqrt(d), nan, nan)

    def footprint(self, n: int, c: int, b: int) -> int:
        return 16 * n * c * b  # O(B N C): it never forms an N x N matrix


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def build_providers(device: str) -> tuple[list[Provider], list[str]]:
    """Every provider that can run on ``device`` ("cpu" or "cuda"), and a line for each one skipped.

    The reference comes first. ncutfast contributes one line per backend that is available in this
    process and runs on ``device``, and one per such backend in precision "exact" (plus the "fast"
    precision on CUDA; float32 ``torch.linalg.eigh`` is added there too); optional peers that are missing
    are reported, never installed.
    """
    from ..backends import available_backends

    providers: list[Provider] = [TokenCutReference(device)]
    skipped: list[str] = []
    on_device = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}[device]
    backends = available_backends()
    for name in ("triton", "cuda", "cpu", "torch"):
        if name not in on_device:
            where = "GPU only" if device == "cpu" else "CPU only"
            skipped.append(f"ncutfast-{name}: skipped, {where} (this run is on the {device.upper()})")
        elif name in backends:
            providers.append(NcutfastProvider(device, name))
        else:
            skipped.append(f"ncutfast-{name}: skipped, backend not available in this process")
    providers += [NcutfastProvider(device, n, "exact") for n in ("triton", "cuda", "cpu", "torch")
                  if n in on_device and n in backends]
    if device == "cuda":
        providers += [NcutfastProvider(device, n, "fast") for n in ("triton", "cuda") if n in backends]
    providers.append(TorchEigh(device))
    if device == "cuda":  # float32 eigh is what GPU users reach for first; on 2 CPU cores it only adds time
        providers.append(TorchEigh(device, torch.float32))
    providers += [TorchLobpcg(device), ScipyArpack(device)]
    cupy_reason = None
    if device != "cuda":
        cupy_reason = "GPU only (this run is on the CPU)"
    elif not _has("cupy"):
        cupy_reason = "cupy is not installed (pip install cupy-cuda13x)"
    else:
        import cupy

        if not cupy.cuda.is_available():
            cupy_reason = "cupy sees no CUDA device"
    if cupy_reason is None:
        providers += [CupyEigh(device), CupyEigsh(device)]
    else:
        skipped += [f"{n}: skipped, {cupy_reason}" for n in ("cupy-eigh", "cupy-eigsh")]
    pin = f"torch=={torch.__version__.split('+')[0]}"  # they do not declare torch: keep pip off it
    peers: tuple[tuple[type[Provider], str, str], ...] = (
        (NcutPytorch, "ncut_pytorch", "ncut-pytorch"), (FastNcut, "fastncut", "fastncut"))
    for cls, module, pip in peers:
        if _has(module):
            providers.append(cls(device))
        else:
            skipped.append(f"{cls.name}: skipped, not installed (pip install {pip} {pin})")
    return providers, skipped
