"""The API on a CUDA device (torch and CuPy inputs): collected everywhere, skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ncutfast
from ncutfast import reference
from ncutfast.reference import relative_gap
from ncutfast.testing import GAP_MIN, flip_rate, planted_scene

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_cuda_tensors_match_reference(rng, cuda, backend: str, precision: str) -> None:
    scenes = [planted_scene(rng, n, 384) for n in (1, 2, 97, 784, 1201)]
    out = ncutfast.ncut([torch.from_numpy(s.features).to(cuda) for s in scenes], precision=precision,
                        backend=backend)
    for s, x, p in zip(scenes, out.eigenvector, out.partition, strict=True):
        assert x.device.type == "cuda" and p.device.type == "cuda"
        ref = reference.ncut(s.features, similarity_dtype=np.float64 if precision == "float64" else np.float32)
        if relative_gap(ref.lambda2, ref.lambda3) >= GAP_MIN:
            assert np.array_equal(p.cpu().numpy(), ref.partition)


def test_cupy_in_cupy_out(rng, cuda) -> None:
    cupy = pytest.importorskip("cupy")
    scene = planted_scene(rng, 400, 64)
    out = ncutfast.tokencut(cupy.asarray(scene.features), scene.grid, patch=16)
    assert isinstance(out.masks, cupy.ndarray) and isinstance(out.ncut.eigenvector, cupy.ndarray)
    ref = reference.tokencut(scene.features, scene.grid, patch=16, similarity_dtype=np.float32)
    if relative_gap(ref.ncut.lambda2, ref.ncut.lambda3) >= GAP_MIN:
        assert np.array_equal(cupy.asnumpy(out.ncut.partition), ref.ncut.partition)


def test_fast_precision_flip_rate_is_measured(rng, cuda) -> None:
    feats = np.concatenate([planted_scene(rng, 1024, 768).features for _ in range(4)])
    rate32 = flip_rate(feats, precision="float32", device="cuda")
    rate_fast = flip_rate(feats, precision="fast", device="cuda")
    print(f"threshold flip rate vs float64 on {torch.cuda.get_device_name()}: float32 {rate32:.2e}, "
          f"fast {rate_fast:.2e}")
    assert rate32 <= 1e-5 and rate_fast <= 1e-2


def test_exact_graph_on_the_gpu_is_the_float64_graph(rng, cuda) -> None:
    """Precision "exact" on CUDA: the Triton kernel (fp16 tensor-core screen + float64 recheck) gives the
    reference's graph on a ragged batch, the real sizes included, and the backends agree on the cut."""
    from ncutfast.kernels.affinity import affinity_exact_fwd

    feats = [planted_scene(rng, n, c).features for n, c in ((3600, 768), (784, 384), (97, 64), (1, 64))]
    for f in feats:
        mask, counts, _ = affinity_exact_fwd(torch.from_numpy(f)[None].to(cuda), torch.tensor([f.shape[0]]),
                                             tau=0.2)
        raw = mask[0].cpu().numpy().view(np.uint32)
        bits = ((raw[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(raw.shape[0], -1)
        want = reference.affinity(f, 0.2) == 1.0
        assert np.array_equal(bits[:, : f.shape[0]].astype(bool), want)
        assert np.array_equal(counts[0].cpu().numpy(), want.sum(1))
    from ncutfast.backends import available_backends

    for backend in [b for b in ("triton", "cuda", "torch") if b in available_backends()]:
        out = ncutfast.ncut([torch.from_numpy(f).to(cuda) for f in feats[1:]], precision="exact", backend=backend)
        ref = ncutfast.ncut(feats[1:], precision="float64", backend="cpu")
        for a, b in zip(out.lambda2, ref.lambda2, strict=True):
            assert float(a) == pytest.approx(float(b), abs=1e-8) or np.isnan(float(b))
