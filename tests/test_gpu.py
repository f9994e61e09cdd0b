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
