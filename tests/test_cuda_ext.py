"""ncutfast._C's CUDA kernels and the "cuda" backend, against the CPU extension and the reference.

Skipped without a GPU (the device is queried inside the tests, never at import or collection time). On a
machine without a GPU the CUDA sources are still compiled by the build, which is what CI checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncutfast import _ext, backends, reference
from ncutfast.backends import SolveParams, ext
from ncutfast.reference import relative_gap
from ncutfast.testing import GAP_MIN, TOLERANCES, d_alignment, planted_scene

pytestmark = pytest.mark.gpu
TOL = 1e-8


def solve(feats: torch.Tensor, lengths: torch.Tensor, **params: object) -> backends.Spectrum:
    """The "cuda" backend with the parameters as keywords."""
    return ext.solve(feats, lengths, SolveParams(**params), device_type="cuda")


@pytest.fixture
def cuda() -> torch.device:
    if not _ext.cuda_device_available() or not torch.cuda.is_available():
        pytest.skip("needs a CUDA device and ncutfast._C built with CUDA")
    return torch.device("cuda")


def _feats(rng: np.random.Generator, lengths: list[int], channels: int = 32) -> torch.Tensor:
    n_max = max(lengths)
    out = torch.from_numpy(rng.standard_normal((len(lengths), n_max, channels)).astype(np.float32))
    for b, n in enumerate(lengths):
        k = planted_scene(rng, n, channels).features if n >= 4 else rng.standard_normal((n, channels)) + 0.3
        out[b, :n] = torch.from_numpy(np.asarray(k, dtype=np.float32))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pack_graph_matches_cpu(cuda: torch.device, rng: np.random.Generator, dtype: torch.dtype) -> None:
    C = _ext.C
    lengths = [1, 63, 64, 65, 130]
    n_max = max(lengths)
    s = torch.from_numpy(rng.uniform(-1, 1, size=(len(lengths), n_max, n_max))).to(dtype)
    ln = torch.tensor(lengths)
    words = C.words_per_row(n_max)
    want = torch.empty(len(lengths), n_max, words, dtype=torch.int64)
    C.pack_graph_cpu(s.data_ptr(), str(dtype)[6:], len(lengths), n_max, ln.data_ptr(), 0.1, want.data_ptr())
    s_d, ln_d = s.to(cuda), ln.to(cuda)
    got = torch.full((len(lengths), n_max, words), -1, dtype=torch.int64, device=cuda)
    C.pack_graph_cuda(s_d.data_ptr(), str(dtype)[6:], len(lengths), n_max, ln_d.data_ptr(), 0.1, got.data_ptr(),
                      cuda.index or 0, torch.cuda.current_stream().cuda_stream)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_cuda_backend_matches_reference(cuda: torch.device, rng: np.random.Generator, binary: bool,
                                        precision: str) -> None:
    lengths = [1, 2, 3, 31, 97, 211, 1031]
    feats = _feats(rng, lengths)
    ln = torch.tensor(lengths)
    kw = dict(tau=0.2, eps=1e-5, binary=binary, precision=precision, tol=TOL, max_iter=300)
    gpu = ext.solve(feats.to(cuda), ln, SolveParams(**kw), device_type="cuda")
    cpu = ext.solve(feats, ln, SolveParams(**kw))
    assert gpu.x.device.type == "cuda"
    sim = np.float64 if precision == "float64" else np.float32
    for b, n in enumerate(lengths):
        x = gpu.x[b].cpu().numpy()
        assert np.all(x[n:] == 0.0)
        if n == 1:
            assert torch.isnan(gpu.lambda2[b]).item() and x[0] == 0.0
            continue
        w = reference.affinity(feats[b, :n].numpy(), 0.2, 1e-5, binary=binary, similarity_dtype=sim)
        lam2, lam3, x_ref = reference.fiedler(w)
        d = reference.degrees(w)
        rel = 1e-6 if not binary and precision != "float64" else 1e-9
        assert float(gpu.lambda2[b]) == pytest.approx(lam2, rel=rel, abs=1e-10)
        assert float(gpu.lambda2[b]) == pytest.approx(float(cpu.lambda2[b]), rel=rel, abs=1e-10)
        assert float(gpu.residual[b]) <= TOL
        gap = relative_gap(lam2, lam3)
        if gap >= GAP_MIN:
            assert d_alignment(x[:n], x_ref, d) >= TOLERANCES[precision]["alignment"]


def test_cuda_backend_is_deterministic(cuda: torch.device, rng: np.random.Generator) -> None:
    feats = _feats(rng, [400, 257]).to(cuda)
    kw = dict(tau=0.2, eps=1e-5, binary=True, precision="float32", tol=TOL, max_iter=300)
    a = solve(feats, torch.tensor([400, 257]), **kw)
    b = solve(feats, torch.tensor([400, 257]), **kw)
    assert torch.equal(a.x, b.x) and torch.equal(a.lambda2, b.lambda2)


def test_cuda_fast_precision_and_chunking(cuda: torch.device, rng: np.random.Generator, monkeypatch) -> None:
    """tf32 similarities ("fast") still give converged, D-normalized eigenvectors close to float64's; tiny
    budgets split the batch into many similarity chunks and solver launches without changing results."""
    lengths = [300, 97, 1, 256]
    feats = _feats(rng, lengths).to(cuda)
    ln = torch.tensor(lengths)
    kw = dict(tau=0.2, eps=1e-5, binary=True, tol=TOL, max_iter=300)
    exact = solve(feats, ln, precision="float64", **kw)
    fast = solve(feats, ln, precision="fast", **kw)
    assert bool((fast.residual <= TOL).all())
    for b, n in enumerate(lengths[:2]):
        d = np.ones(n)
        assert d_alignment(fast.x[b, :n].cpu().numpy(), exact.x[b, :n].cpu().numpy(), d) > 0.9
    monkeypatch.setattr(ext.SETTINGS["cuda"], "memory_budget", 1)
    monkeypatch.setattr(ext.SETTINGS["cuda"], "graph_budget", 1)
    parts = solve(feats, ln, precision="float64", **kw)
    # cuBLAS may pick another kernel for another batch size: equal up to rounding, not bit for bit.
    torch.testing.assert_close(parts.lambda2, exact.lambda2, rtol=1e-9, atol=1e-12, equal_nan=True)
    for b, n in enumerate(lengths[:2]):
        assert d_alignment(parts.x[b, :n].cpu().numpy(), exact.x[b, :n].cpu().numpy(), np.ones(n)) > 1 - 1e-6


def test_cuda_backend_rejects_bad_arguments(cuda: torch.device) -> None:
    """The cuda backend shares the contract's argument checks (tau < 0 with a non-binary graph is refused);
    a non-binary graph with a degree <= 0 (tau = 0 and an all-zero row) is flagged by the shared solver and
    raises."""
    kw = dict(tau=0.2, eps=1e-5, binary=True, precision="float32", tol=TOL, max_iter=60)
    f = torch.ones(1, 4, 3, device=cuda)
    with pytest.raises(ValueError, match="^feats: this backend needs CUDA tensors"):
        solve(f.cpu(), torch.tensor([4]), **kw)
    with pytest.raises(ValueError, match="^lengths: "):
        solve(f, torch.tensor([5]), **kw)
    with pytest.raises(ValueError, match="^eps: "):
        solve(f, torch.tensor([4]), **(kw | {"eps": 0.0}))
    angles = torch.tensor([0.0, 100.0, 110.0, 120.0]).deg2rad()  # row 0: 1 + cos 100 + cos 110 + cos 120 < 0
    feats = torch.stack([angles.cos(), angles.sin()], dim=-1)[None].to(cuda)
    with pytest.raises(ValueError, match="^tau: must be >= 0 for a non-binary graph"):
        solve(feats, torch.tensor([4]), **(kw | {"tau": -0.95, "binary": False}))
    feats[0, 2] = 0.0
    with pytest.raises(ValueError, match="degree <= 0"):
        solve(feats, torch.tensor([4]), **(kw | {"tau": 0.0, "binary": False}))
