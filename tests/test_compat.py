"""Drop-ins return what the reference returns, with the originals' signatures, types and shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ncutfast import reference
from ncutfast.compat import maskcut as cm
from ncutfast.compat import tokencut as ct
from ncutfast.reference import relative_gap
from ncutfast.testing import GAP_MIN, mean_tied_tokens, planted_scene, tied_tokens


def _with_cls(features: np.ndarray, rng) -> torch.Tensor:
    cls = rng.standard_normal((1, features.shape[1])).astype(np.float32)
    return torch.from_numpy(np.concatenate([cls, features]))[None]


@pytest.mark.parametrize("grid", [(7, 9), (20, 31), (24, 32)])
@pytest.mark.parametrize("no_binary_graph", [False, True])
def test_tokencut_ncut_matches_reference(rng, grid, no_binary_graph) -> None:
    scene = planted_scene(rng, grid=grid, channels=64)
    h, w = grid
    image = (3, h * 16 - 5, w * 16 - 9)  # padded image: boxes get clipped to (H, W)
    out = ct.ncut(_with_cls(scene.features, rng), [h, w], [16, 16], image, tau=0.2, eps=1e-5,
                  im_name="x.jpg", no_binary_graph=no_binary_graph)
    pred, objects, mask, seed, bins, eigvec = out
    assert isinstance(pred, np.ndarray) and pred.shape == (4,) and pred.dtype.kind == "i"
    assert objects.shape == (h, w) and objects.dtype == np.int32
    assert mask.shape == (h, w) and mask.dtype == np.float64 and set(np.unique(mask)) <= {0.0, 1.0}
    assert isinstance(seed, np.int64) and bins is None
    assert eigvec.shape == (h, w) and eigvec.dtype == np.float64
    ref = reference.tokencut(scene.features, grid, patch=16, image_size=image[1:], binary=not no_binary_graph,
                             similarity_dtype=np.float32)
    assert pred[2] <= image[2] and pred[3] <= image[1]
    if relative_gap(ref.ncut.lambda2, ref.ncut.lambda3) < GAP_MIN or mean_tied_tokens(ref.ncut.eigenvector).any():
        return  # ill-defined cut, or tokens tied with the mean (the reference's rounding placed them)
    assert int(seed) in tied_tokens(ref.ncut.eigenvector)
    labels, mask_ref = reference.seed_component(ref.ncut.partition, int(seed), grid)
    assert np.array_equal(objects, labels) and np.array_equal(mask, mask_ref.astype(float))
    assert tuple(pred.tolist()) == reference.box_from_mask(mask_ref, (16, 16), image[1:])
    x_ref = ref.ncut.eigenvector.reshape(grid)
    assert np.abs(eigvec - x_ref).max() <= 1e-4 * np.abs(x_ref).max()  # same sign: the seed rule fixes it


def test_tokencut_ncut_batch_equals_single(rng) -> None:
    scenes = [planted_scene(rng, grid=g, channels=32) for g in ((5, 6), (9, 4), (11, 13))]
    feats = [_with_cls(s.features, rng) for s in scenes]
    dims = [list(s.grid) for s in scenes]
    sizes = [(3, s.grid[0] * 8, s.grid[1] * 8) for s in scenes]
    batch = ct.ncut_batch(feats, dims, [8, 8], sizes, tau=0.2)
    for f, d, size, b in zip(feats, dims, sizes, batch, strict=True):
        one = ct.ncut(f, d, [8, 8], size, tau=0.2)
        assert np.array_equal(one[0], b[0]) and np.array_equal(one[2], b[2]) and one[3] == b[3]


def test_tokencut_ncut_bad_input(rng) -> None:
    f = _with_cls(rng.standard_normal((12, 8)).astype(np.float32), rng)
    with pytest.raises(ValueError, match="dims"):
        ct.ncut(f, [3, 5], [16, 16], (3, 48, 64), tau=0.2)
    with pytest.raises(ValueError, match="feats"):
        ct.ncut(f[0], [3, 4], [16, 16], (3, 48, 64), tau=0.2)
    with pytest.raises(ValueError, match="tau"):
        ct.ncut(f, [3, 4], [16, 16], (3, 48, 64), tau=2.0)


def test_maskcut_forward_matches_reference(rng) -> None:
    checked = 0
    for _ in range(5):
        scene = planted_scene(rng, grid=(15, 15), channels=64)
        feats = torch.from_numpy(scene.features).T.contiguous()  # CutLER passes (dim, N)
        seed, bipartitions, eigvecs = cm.maskcut_forward(feats, [15, 15], [8, 8], [120, 120], tau=0.15, N=3)
        assert isinstance(seed, np.int64) and len(bipartitions) == 3 and len(eigvecs) == 3
        assert all(b.shape == (120, 120) and b.dtype == np.float64 for b in bipartitions)
        assert all(e.shape == (120, 120) and e.dtype == np.float64 for e in eigvecs)
        total = np.sum(bipartitions, axis=0)
        assert total.max() <= 1.0  # earlier masks are subtracted: disjoint
        ref = reference.maskcut(scene.features, (15, 15), n_masks=3, tau=0.15, sign_rule="canonical",
                                similarity_dtype=np.float32)
        gaps = (ref.lambda3 - ref.lambda2) / ref.lambda3
        if not np.all(gaps >= GAP_MIN) or any(mean_tied_tokens(v).any() for v in ref.eigenvectors):
            continue
        checked += 1
        expected, earlier = [], 0
        for m in ref.masks:
            up = F.interpolate(torch.from_numpy(m.astype(np.float64))[None, None], size=(120, 120),
                               mode="nearest")[0, 0].numpy()
            up = up - earlier
            up[up <= 0] = 0
            expected.append(up)
            earlier = np.sum(expected, axis=0)
        for got, want in zip(bipartitions, expected, strict=True):
            assert np.array_equal(got, want)
        assert int(seed) == ref.seeds[-1] or int(seed) in tied_tokens(ref.eigenvectors[-1])
    assert checked >= 2


def test_maskcut_forward_batch_equals_single(rng) -> None:
    scenes = [planted_scene(rng, grid=(10, 10), channels=32) for _ in range(3)]
    feats = [torch.from_numpy(s.features).T.contiguous() for s in scenes]
    batch = cm.maskcut_forward_batch(feats, [10, 10], [8, 8], [80, 80], tau=0.15, N=2)
    for f, b in zip(feats, batch, strict=True):
        one = cm.maskcut_forward(f, [10, 10], [8, 8], [80, 80], tau=0.15, N=2)
        assert one[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(one[1], b[1], strict=True))
