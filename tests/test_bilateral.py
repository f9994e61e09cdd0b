"""The batched bilateral solver (``ncutfast.refine``) against the float64 reference port (spec §3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncutfast import reference, refine
from ncutfast.refine import _BatchGrid, bilateral_binary, bilateral_solve
from ncutfast.testing import synthetic_photo

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


def test_grid_keeps_tokencut_hash_wraparound(rng: np.random.Generator) -> None:
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


def test_batch_of_mixed_sizes_matches_reference_and_one_by_one(rng: np.random.Generator) -> None:
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


@pytest.mark.parametrize("sigmas,lam,confidence", [((8.0, 4.0, 4.0), 64.0, 0.5), ((24.0, 4.0, 4.0), 256.0, 0.999)])
def test_other_parameters_match_reference(rng: np.random.Generator, sigmas, lam, confidence) -> None:
    photos = [synthetic_photo(rng, h, w) for h, w in ((37, 53), (64, 41))]
    kw = dict(zip(("sigma_spatial", "sigma_luma", "sigma_chroma"), sigmas, strict=True), lam=lam,
              confidence=confidence)
    soft_targets = [m * rng.uniform(0.6, 1.0, size=m.shape) for _, m in photos]  # non-binary targets too
    outs = bilateral_solve([torch.from_numpy(im) for im, _ in photos], soft_targets, **kw)
    for out, (image, _), target in zip(outs, photos, soft_targets, strict=True):
        assert float(np.abs(out.numpy() - reference.bilateral_solve(image, target, **kw)).max()) <= TOL


def test_constant_targets(rng: np.random.Generator) -> None:
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
