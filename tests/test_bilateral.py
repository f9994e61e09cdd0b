"""The batched bilateral solver (``ncutfast.refine``) against the float64 reference port (spec §3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncutfast import _ext, reference, refine
from ncutfast.refine import _BatchGrid, _KeyLayout, _pixel_keys, bilateral_binary, bilateral_solve
from ncutfast.testing import synthetic_photo

needs_ext = pytest.mark.skipif(not _ext.HAS_CPU_EXT, reason=f"ncutfast._C not built ({_ext.IMPORT_ERROR})")

TOL = 1e-6  # the bound on [0, 1] outputs
SIGMAS = (reference.BS_SIGMA_SPATIAL, reference.BS_SIGMA_LUMA, reference.BS_SIGMA_CHROMA)


def _reference_grid(image: np.ndarray, sigmas: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The reference grid as (vertex of every pixel, dense off-centre blur matrix)."""
    grid = reference.BilateralGrid.from_coords(reference.bilateral_coords(image, *sigmas))
    inverse = grid.splat_matrix.tocsc().indices  # one vertex per pixel column
    return inverse, sum(b.toarray() for b in grid.blurs)


def _assert_same_grid(images: list[np.ndarray], sigmas: tuple[float, float, float]) -> None:
    grid = _BatchGrid([torch.from_numpy(im) for im in images], [im.shape[:2] for im in images], sigmas)
    blur = grid.blur_matrix.to_dense().numpy()
    counts = grid.counts.numpy()
    assert len(grid.inverses) == len(images)
    for i, (im, grid_inverse) in enumerate(zip(images, grid.inverses, strict=True)):
        inverse, ref_blur = _reference_grid(im, sigmas)
        nv, first = ref_blur.shape[0], i * grid.vmax
        np.testing.assert_array_equal(grid_inverse.numpy(), inverse)
        np.testing.assert_array_equal(counts[first:first + nv], np.bincount(inverse))
        np.testing.assert_array_equal(blur[first:first + nv, first:first + nv], ref_blur)
        assert not counts[first + nv:first + grid.vmax].any()  # padding slots: no pixel
    assert blur.sum() == sum(_reference_grid(im, sigmas)[1].sum() for im in images)  # no other tap


@pytest.fixture(params=["dense", "search"])
def neighbour_search(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with each of the two neighbour searches, and checks that it ran the one named."""
    if request.param == "search":
        monkeypatch.setattr(refine, "_DENSE_TABLE_MAX", 0)  # no table is small enough: searchsorted
    else:
        def no_search(*args: object) -> None:
            raise AssertionError("the dense neighbour search was expected")
        monkeypatch.setattr(refine, "_search_taps", no_search)
    return request.param


@pytest.fixture(params=["compiled", "torch"])
def solver_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Runs a test with the extension's CPU solve and with the torch one, and checks that the path named (and
    only it) ran: the compiled one counts its calls, the torch one is taken by hiding the extension."""
    calls = []
    if request.param == "compiled":
        if not _ext.HAS_CPU_EXT:
            pytest.skip(f"ncutfast._C not built ({_ext.IMPORT_ERROR})")
        solve = _ext.C.bilateral_solve_cpu

        def counted(*args: object) -> None:
            calls.append(args)
            solve(*args)
        monkeypatch.setattr(_ext.C, "bilateral_solve_cpu", counted)
    else:
        monkeypatch.setattr(_ext, "HAS_CPU_EXT", False)
    yield request.param
    assert bool(calls) == (request.param == "compiled")


def _compiled_grid(images: list[np.ndarray], sigmas: tuple[float, float, float]) -> list[tuple[np.ndarray, ...]]:
    """``_C.bilateral_grid_cpu`` on the images' pixel keys: per image (sorted vertex keys, counts, taps
    ``(V, 10)``, inverse)."""
    sizes = [im.shape[:2] for im in images]
    layout = _KeyLayout(sizes, sigmas)
    keys = _pixel_keys([torch.from_numpy(im) for im in images], sigmas, layout.strides, layout.dtype).numpy()
    return _grid_of_keys(keys, [h * w for h, w in sizes], layout.strides)


def _grid_of_keys(keys: np.ndarray, npix: list[int], strides: list[int]) -> list[tuple[np.ndarray, ...]]:
    total = keys.shape[0]
    npix_a = np.asarray(npix, dtype=np.int64)
    inverse = np.empty(total, np.int64)
    n_vertices = np.empty(len(npix), np.int64)
    vertex_keys, counts = np.empty(total, np.int64), np.empty(total, np.int64)
    taps = np.empty((total, 2 * reference.BS_DIMS), np.int32)
    _ext.C.bilateral_grid_cpu(keys.ctypes.data, str(keys.dtype), len(npix), npix_a.ctypes.data, strides,
                              inverse.ctypes.data, n_vertices.ctypes.data, vertex_keys.ctypes.data,
                              counts.ctypes.data, taps.ctypes.data)
    out, start = [], 0
    for p, nv in zip(npix, n_vertices.tolist(), strict=True):
        out.append((vertex_keys[start:start + nv], counts[start:start + nv], taps[start:start + nv],
                    inverse[start:start + p]))
        start += p
    return out


def _expected_taps(uniq: np.ndarray, strides: list[int]) -> np.ndarray:
    """Taps by binary search in the sorted keys (below in dims 4..0, above in dims 0..4; -1 where absent)."""
    cols = []
    for sign, dims in ((-1, reversed(range(reference.BS_DIMS))), (1, range(reference.BS_DIMS))):
        for d in dims:
            wanted = uniq + sign * strides[d]
            loc = np.clip(np.searchsorted(uniq, wanted), 0, uniq.shape[0] - 1)
            cols.append(np.where(uniq[loc] == wanted, loc, -1))
    return np.stack(cols, axis=1)


def _compiled_keys(images: list[torch.Tensor], sigmas: tuple[float, float, float], layout: _KeyLayout) -> torch.Tensor:
    keys = torch.empty(sum(im.shape[0] * im.shape[1] for im in images), dtype=layout.dtype)
    ptrs = torch.tensor([im.data_ptr() for im in images], dtype=torch.int64)
    heights = torch.tensor([im.shape[0] for im in images], dtype=torch.int64)
    widths = torch.tensor([im.shape[1] for im in images], dtype=torch.int64)
    _ext.C.bilateral_keys_cpu(ptrs.data_ptr(), heights.data_ptr(), widths.data_ptr(), len(images), sigmas,
                              [c for row in reference.RGB_TO_YUV for c in row], reference.YUV_OFFSET,
                              layout.strides, str(layout.dtype).removeprefix("torch."), keys.data_ptr())
    return keys


@needs_ext
def test_compiled_keys_identical_to_torch_keys(rng: np.random.Generator) -> None:
    """``_C.bilateral_keys_cpu`` gives the torch path's pixel keys bit for bit (so the reference's
    coordinates): all 256 greys (YUV on cell boundaries), noise, extreme colours, 1x1, 2x2, 3x500, grayscale,
    a 400x300 photo, odd sigmas, and int64 keys (TokenCut's radix 255 with sigma_spatial 1)."""
    greys = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
    corners = np.array([[[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)]], dtype=np.uint8)
    images = [greys, corners, np.full((1, 1, 3), 255, np.uint8), rng.integers(0, 256, (2, 2, 3), dtype=np.uint8),
              rng.integers(0, 256, (3, 500, 3), dtype=np.uint8), synthetic_photo(rng, 61, 47, gray=True)[0],
              synthetic_photo(rng, 300, 400)[0], rng.integers(0, 256, (29, 23, 3), dtype=np.uint8)]
    tensors = [torch.from_numpy(im) for im in images]
    for sigmas in (SIGMAS, (3.0, 1.5, 2.5), (7.0, 0.7, 0.3), (1.0, 16.0, 8.0)):
        layout = _KeyLayout([im.shape[:2] for im in images], sigmas)
        expected = _pixel_keys(tensors, sigmas, layout.strides, layout.dtype)
        assert torch.equal(_compiled_keys(tensors, sigmas, layout), expected), sigmas
    assert layout.dtype == torch.int64  # the last sigmas: TokenCut's own (wrapping) hash


@needs_ext
def test_compiled_grid_identical_to_reference(rng: np.random.Generator) -> None:
    """The extension's hash-table grid: vertices, counts, every pixel's vertex and the blur taps equal the
    reference's exactly (greys on cell boundaries, noise, extreme colours, 1x1, 3x500, grayscale, a 400x300
    photo; TokenCut's wrapping hash with sigma_spatial 1)."""
    greys = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
    corners = np.array([[[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)]], dtype=np.uint8)
    wrap = np.broadcast_to(rng.integers(0, 256, size=3, dtype=np.uint8), (3, 300, 3)).copy()
    cases = [([greys, rng.integers(0, 256, size=(29, 23, 3), dtype=np.uint8)], SIGMAS),
             ([np.full((1, 1, 3), 255, np.uint8), corners, rng.integers(0, 256, size=(3, 500, 3), dtype=np.uint8),
               synthetic_photo(rng, 61, 47, gray=True)[0], synthetic_photo(rng, 300, 400)[0]], SIGMAS),
             ([corners, greys], (3.0, 1.5, 2.5)),
             ([wrap, synthetic_photo(rng, 5, 7)[0]], (1.0, 16.0, 8.0))]
    for images, sigmas in cases:
        for image, (keys, counts, taps, inverse) in zip(images, _compiled_grid(images, sigmas), strict=True):
            ref_inverse, ref_blur = _reference_grid(image, sigmas)
            np.testing.assert_array_equal(inverse, ref_inverse)
            np.testing.assert_array_equal(counts, np.bincount(ref_inverse))
            nv = keys.shape[0]
            assert np.all(np.diff(keys) > 0)
            blur = np.zeros((nv, nv))
            rows = np.repeat(np.arange(nv), taps.shape[1])
            present = taps.reshape(-1) >= 0
            np.add.at(blur, (rows[present], taps.reshape(-1)[present]), 1.0)
            np.testing.assert_array_equal(blur, ref_blur)


@needs_ext
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_compiled_grid_of_random_keys(rng: np.random.Generator, dtype: type) -> None:
    """Random keys with many duplicates, images of 1, 2, 7, 13 and 4099 pixels, key ranges from a few
    values (every pixel shares a vertex) to sparse ones, odd strides: np.unique's vertices, counts and
    inverse, and the taps a binary search finds."""
    npix = [1, 2, 7, 13, 4099]
    high = 2**31 - 2**20 if dtype == np.int32 else 2**62
    strides = [3, 17, 1000, 65537, 2**20] if dtype == np.int32 else [1, 5, 2**33, 2**40, 2**50]
    parts = []
    for i, p in enumerate(npix):
        span = [1, 3, 50, 10**6, high][i]
        base = rng.integers(0, span, size=max(1, p // 3))
        near = base[rng.integers(0, base.shape[0], size=p)] + rng.choice(strides, size=p) * rng.integers(0, 2, p)
        parts.append(np.clip(near, 0, high).astype(dtype))
    keys = np.concatenate(parts)
    for part, (vkeys, counts, taps, inverse) in zip(parts, _grid_of_keys(keys, npix, strides), strict=True):
        uniq, ref_inverse, ref_counts = np.unique(part, return_inverse=True, return_counts=True)
        np.testing.assert_array_equal(vkeys, uniq)
        np.testing.assert_array_equal(inverse, ref_inverse)
        np.testing.assert_array_equal(counts, ref_counts)
        np.testing.assert_array_equal(taps, _expected_taps(uniq.astype(np.int64), strides))
    assert (np.concatenate([t for _, _, t, _ in _grid_of_keys(keys, npix, strides)]) >= 0).any()  # taps exist


@needs_ext
def test_compiled_bindings_name_bad_arguments() -> None:
    keys, npix = np.zeros(4, np.int32), np.array([4], np.int64)
    out = np.zeros(4)
    ptrs = np.array([out.ctypes.data], np.int64)
    iters = np.zeros(1, np.int64)
    strides = [1, 2, 3, 4, 5]

    def solve(dtype: str = "int32", n_images: int = 1, npix_a: np.ndarray = npix, strides: list = strides,
              lam: float = 1.0, targets: np.ndarray = ptrs) -> None:
        _ext.C.bilateral_solve_cpu(keys.ctypes.data, dtype, n_images, npix_a.ctypes.data, strides, targets.ctypes.data,
                                   0.5, lam, 10, 1e-5, 1e-5, 25, ptrs.ctypes.data, iters.ctypes.data)
    solve()  # valid
    for kw, word in [({"dtype": "float32"}, "dtype"), ({"n_images": 0}, "n_images"),
                     ({"npix_a": np.array([0], np.int64)}, "npix"), ({"strides": [1, 2, 3]}, "strides"),
                     ({"strides": [1, 2, 0, 4, 5]}, "strides"), ({"lam": float("nan")}, "lam"),
                     ({"targets": np.zeros(1, np.int64)}, "targets")]:
        with pytest.raises(ValueError, match=word):
            solve(**kw)
    image = np.zeros((2, 3, 3), np.uint8)
    image_ptrs, sides = np.array([image.ctypes.data], np.int64), np.array([2, 3], np.int64)
    key_buf = np.zeros(6, np.int32)

    def keys_of(heights: np.ndarray = sides[:1], sigmas: tuple = (1.0, 1.0, 1.0), coef: list = [0.5] * 9) -> None:
        _ext.C.bilateral_keys_cpu(image_ptrs.ctypes.data, heights.ctypes.data, sides[1:].ctypes.data, 1, sigmas,
                                  coef, (0.0, 128.0, 128.0), strides, "int32", key_buf.ctypes.data)
    keys_of()  # valid
    for kw, word in [({"heights": np.array([0], np.int64)}, "heights"), ({"sigmas": (1.0, 0.0, 1.0)}, "sigmas"),
                     ({"coef": [0.5] * 8}, "coef")]:
        with pytest.raises(ValueError, match=word):
            keys_of(**kw)


def test_grid_identical_to_reference_on_every_kind_of_colour(rng: np.random.Generator,
                                                              neighbour_search: str) -> None:
    """Vertices and blur taps equal the reference's exactly, including the colours whose YUV lands on a
    cell boundary (all 256 greys, e.g. grey 16 has U = 128 - 1 ulp), random colours, extreme colours and
    odd sizes (1x1, 3x500, grayscale), with either neighbour search."""
    greys = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
    noise = rng.integers(0, 256, size=(29, 23, 3), dtype=np.uint8)
    _assert_same_grid([greys, noise], SIGMAS)
    _assert_same_grid([noise, greys], (3.0, 1.5, 2.5))
    corners = np.array([[[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)]], dtype=np.uint8)
    one = np.full((1, 1, 3), 255, dtype=np.uint8)
    _assert_same_grid([one, corners, rng.integers(0, 256, size=(3, 500, 3), dtype=np.uint8), one,
                       synthetic_photo(rng, 61, 47, gray=True)[0]], SIGMAS)
    _assert_same_grid([corners, one], (1.5, 2.0, 2.0))


def test_grid_keeps_tokencut_hash_wraparound(rng: np.random.Generator, solver_path: str) -> None:
    """Coordinates >= 254 (here sigma_spatial 1 on a 300-px wide image): TokenCut's hash wraps (x = 254 at
    row 0 and x = 0 at row 1 become blur neighbours); the batched grid (its binary search: the dense one
    assumes no carries) keeps that behaviour."""
    image = rng.integers(0, 256, size=(3, 300, 3), dtype=np.uint8)
    image[:] = image[0, 0]  # one colour: only x and y vary, so the wrapped taps exist
    _assert_same_grid([image, synthetic_photo(rng, 5, 7)[0]], (1.0, 16.0, 8.0))
    grid = reference.BilateralGrid.from_coords(reference.bilateral_coords(image, 1.0, 16.0, 8.0))
    assert grid.blurs[0][254, 255] == 1.0  # the wrapped tap the reference has: (254, 0) -> (0, 1)
    soft = bilateral_solve(image, np.arange(900).reshape(3, 300) % 7 < 3, sigma_spatial=1.0)
    ref = reference.bilateral_solve(image, np.arange(900).reshape(3, 300) % 7 < 3, sigma_spatial=1.0)
    assert float(np.abs(soft.numpy() - ref).max()) <= TOL


SIZES = [(1, 1, False), (2, 2, False), (3, 500, False), (61, 47, True), (17, 31, False), (300, 400, False)]


def test_batch_of_mixed_sizes_matches_reference_and_one_by_one(rng: np.random.Generator, solver_path: str) -> None:
    photos = [synthetic_photo(rng, h, w, gray=g) for h, w, g in SIZES]
    images = [im for im, _ in photos]
    targets = [m.astype(np.float64) for _, m in photos]
    batched = bilateral_solve(images, targets)
    assert isinstance(batched, list) and len(batched) == len(images)
    for (h, w, _), out, image, target in zip(SIZES, batched, images, targets, strict=True):
        assert out.shape == (h, w) and out.dtype == torch.float64
        ref = reference.bilateral_solve(image, target)
        assert float(np.abs(out.numpy() - ref).max()) <= TOL, (h, w)
        if 0 < target.mean() < 1:
            assert float(np.abs(ref - target).max()) > 0.05  # the solver changed the mask: a real test
    for i in (0, 3, 4):  # one-by-one (single-array calls) equals the batch
        alone = bilateral_solve(images[i], targets[i])
        assert float((alone - batched[i]).abs().max()) <= 1e-12


@needs_ext
def test_compiled_and_torch_paths_agree(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The extension's solve and the torch one on the same batch (the issue's sizes, extreme colours, a
    400x300 photo, soft targets): within 1e-12 of each other, both within TOL of the reference."""
    corners = np.array([[[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)]], dtype=np.uint8)
    photos = [synthetic_photo(rng, h, w, gray=g) for h, w, g in SIZES]
    images = [im for im, _ in photos] + [corners]
    targets = [m * rng.uniform(0.5, 1.0, size=m.shape) for _, m in photos] + [np.arange(8.0).reshape(1, 8) % 2]
    images.append(torch.from_numpy(images[3]).transpose(0, 1))  # a non-contiguous (W, H, 3) view
    targets.append(targets[3].T)
    compiled = bilateral_solve(images, targets)
    monkeypatch.setattr(_ext, "HAS_CPU_EXT", False)
    torch_path = bilateral_solve(images, targets)
    for a, b, image, target in zip(compiled, torch_path, images, targets, strict=True):
        assert float((a - b).abs().max()) <= 1e-12
        ref = reference.bilateral_solve(np.ascontiguousarray(np.asarray(image)), target)
        assert float(np.abs(a.numpy() - ref).max()) <= TOL


@pytest.mark.parametrize("sigmas,lam,confidence", [((8.0, 4.0, 4.0), 64.0, 0.5), ((24.0, 4.0, 4.0), 256.0, 0.999)])
def test_other_parameters_match_reference(rng: np.random.Generator, sigmas, lam, confidence,
                                          solver_path: str) -> None:
    photos = [synthetic_photo(rng, h, w) for h, w in ((37, 53), (64, 41))]
    kw = dict(zip(("sigma_spatial", "sigma_luma", "sigma_chroma"), sigmas, strict=True), lam=lam,
              confidence=confidence)
    soft_targets = [m * rng.uniform(0.6, 1.0, size=m.shape) for _, m in photos]  # non-binary targets too
    outs = bilateral_solve([torch.from_numpy(im) for im, _ in photos], soft_targets, **kw)
    for out, (image, _), target in zip(outs, photos, soft_targets, strict=True):
        assert float(np.abs(out.numpy() - reference.bilateral_solve(image, target, **kw)).max()) <= TOL


def test_constant_targets(rng: np.random.Generator, solver_path: str) -> None:
    """An all-zero target gives zeros (SciPy returns b when ||b|| = 0) and an all-one target ones, next to
    an ordinary image in the same batch."""
    image, mask = synthetic_photo(rng, 23, 19)
    outs = bilateral_solve([image, image, image], [np.zeros((23, 19)), np.ones((23, 19)), mask])
    for out, target in zip(outs, [np.zeros((23, 19)), np.ones((23, 19)), mask], strict=True):
        ref = reference.bilateral_solve(image, target)
        assert float(np.abs(out.numpy() - ref).max()) <= TOL
    assert float(outs[0].abs().max()) == 0.0
    assert float((outs[1] - 1.0).abs().max()) <= 1e-12


def test_bad_input_names_the_argument(rng: np.random.Generator) -> None:
    image, mask = synthetic_photo(rng, 5, 6)
    cases = [
        ((image.astype(np.float32), mask), {}, TypeError, "images"),
        ((image[..., :2], mask), {}, ValueError, "images"),
        ((image, mask[:4]), {}, ValueError, "targets"),
        ((image, np.full((5, 6), np.nan)), {}, ValueError, "NaN"),
        ((image, mask), {"confidence": 0.0}, ValueError, "confidence"),
        ((image, mask), {"sigma_luma": -1.0}, ValueError, "sigma_luma"),
        ((image, mask), {"lam": float("inf")}, ValueError, "lam"),
    ]
    for args, kw, exc, word in cases:
        with pytest.raises(exc, match=word):
            bilateral_solve(*args, **kw)
        with pytest.raises(exc):  # the reference rejects the same input with the same type
            reference.bilateral_solve(*args, **kw)
    with pytest.raises(ValueError, match=r"targets\[1\]"):
        bilateral_solve([image, image], [mask, mask[:, :3]])
    with pytest.raises(ValueError, match="targets"):
        bilateral_solve([image, image], [mask])
    with pytest.raises(TypeError, match="images, targets"):
        bilateral_solve(image, [mask])
    with pytest.raises(TypeError, match=r"targets\[0\]: expected an array"):
        bilateral_solve([image], ["mask"])
    with pytest.raises(ValueError, match="sigma_chroma: too small"):
        bilateral_solve(image, mask, sigma_chroma=1e-15)


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


def test_binary_output_rules() -> None:
    h, w = 40, 50
    big, small = _disk(h, w, 15, 15, 9), _disk(h, w, 30, 40, 4)
    ring = big & ~_disk(h, w, 15, 15, 4)
    soft = np.where(ring | small, 0.8, 0.1)
    # Holes filled, the largest foreground component kept, the small one dropped.
    out = bilateral_binary(torch.from_numpy(soft), big)
    np.testing.assert_array_equal(out, big)
    np.testing.assert_array_equal(reference.bilateral_binary(soft, big), out)
    # IoU with the TokenCut mask < 0.5: complemented (TokenCut negates it for display).
    np.testing.assert_array_equal(bilateral_binary(soft, small), ~big)
    # Nothing above 0.5: everything is foreground (then complemented against a small TokenCut mask).
    np.testing.assert_array_equal(bilateral_binary(np.full((h, w), 0.2), np.ones((h, w), bool)), np.ones((h, w)))
    np.testing.assert_array_equal(bilateral_binary(np.full((h, w), 0.2), small), np.zeros((h, w)))
    # Everything above 0.5: the only label is the largest, so label 0 (empty) is "second": TokenCut's rule.
    np.testing.assert_array_equal(bilateral_binary(np.full((h, w), 0.9), np.zeros((h, w), bool)),
                                  np.zeros((h, w)))


@pytest.mark.gpu
def test_cuda_matches_reference(rng: np.random.Generator) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    photos = [synthetic_photo(rng, h, w, gray=g) for h, w, g in SIZES]
    outs = bilateral_solve([torch.from_numpy(im).cuda() for im, _ in photos],
                           [torch.from_numpy(m).cuda() for _, m in photos])
    for out, (image, mask) in zip(outs, photos, strict=True):
        assert out.device.type == "cuda"
        assert float(np.abs(out.cpu().numpy() - reference.bilateral_solve(image, mask)).max()) <= TOL
