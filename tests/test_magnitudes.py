"""Huge and tiny feature magnitudes: row normalization must neither overflow nor change TokenCut's clamp.

f_i = k_i / max(||k_i||, 1e-12) is scale-invariant for rows above the clamp, so rows multiplied by huge
powers of two (exact) must give the reference's cut of the unscaled features; rows below the clamp become
k_i / 1e-12 and keep their (tiny) similarities' signs, which decide edges at tau = 0. Every backend that
runs on a CPU (torch, the compiled extension, Triton under its interpreter) is compared with the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ncutfast
from ncutfast import reference
from ncutfast.testing import TOLERANCES, compare_to_reference, mean_tied_tokens, planted_scene

BACKENDS = ["torch", "cpu", "triton"]


def _rows_scaled(rng: np.random.Generator, feats: np.ndarray, dtype: type, exponents: tuple[int, int],
                 fraction: float) -> np.ndarray:
    """``feats`` in ``dtype`` with a random ``fraction`` of rows (at least one) times 2^k, k drawn from
    ``exponents``: exact, so only the magnitude changes."""
    out = feats.astype(dtype)
    n = out.shape[0]
    rows = rng.choice(n, size=max(1, int(fraction * n)), replace=False)
    k = rng.integers(exponents[0], exponents[1] + 1, size=rows.size)
    out[rows] = np.ldexp(out[rows], k[:, None]).astype(dtype)
    assert np.isfinite(out).all()
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_normalize_rows_huge_and_tiny(rng, dtype) -> None:
    feats = rng.standard_normal((29, 13)).astype(dtype)
    plain = reference.normalize_rows(feats, dtype)
    top = 120 if dtype == np.float32 else 1015  # rows up to ~2^(top + 3): finite, squares overflow
    huge = feats * np.ldexp(1.0, rng.integers(top - 60, top + 1, size=(29, 1))).astype(dtype)
    assert np.array_equal(reference.normalize_rows(huge, dtype), plain)  # scaling by 2^k is exact
    low = -120 if dtype == np.float32 else -1000  # norms below 1e-12: the clamp applies
    tiny = feats * np.ldexp(1.0, rng.integers(low, -45, size=(29, 1))).astype(dtype)
    assert np.array_equal(reference.normalize_rows(tiny, dtype), tiny / dtype(reference.NORM_EPS))
    assert not reference.normalize_rows(np.zeros((3, 5), dtype), dtype).any()


CASES = {
    # name: (input dtype, exponent range, tau)
    "float32 huge": (np.float32, (60, 124), 0.2),
    "float64 huge": (np.float64, (500, 1018), 0.2),
    "float64 beyond float32": (np.float64, (130, 400), 0.2),
    "float32 tiny, tau 0": (np.float32, (-90, -45), 0.0),
    "float64 tiny, tau 0": (np.float64, (-90, -45), 0.0),
    "float32 squares underflow, tau 0": (np.float32, (-100, -80), 0.0),
}


def _scaled_case(rng: np.random.Generator, case: str, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(scaled features, unscaled float32 features, tau) of one case on a fresh planted scene."""
    dtype, exponents, tau = CASES[case]
    scene = planted_scene(rng, n, 24)
    return _rows_scaled(rng, scene.features, dtype, exponents, 0.4), scene.features, tau


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_extreme_rows_match_reference(rng, backend: str, case: str, precision: str) -> None:
    if backend not in ncutfast.available_backends():
        pytest.skip(f"backend {backend} not available")
    feats, plain, tau = _scaled_case(rng, case, 131)
    ref = reference.ncut(feats, tau=tau)
    d_ref = reference.degrees(reference.affinity(feats, tau=tau))
    if CASES[case][1][0] > 0:  # huge rows: the cut of the unscaled features
        assert ref.lambda2 == pytest.approx(reference.ncut(plain, tau=tau).lambda2, rel=1e-9)
    out = ncutfast.ncut(torch.from_numpy(feats), tau=tau, precision=precision, backend=backend)
    agree = compare_to_reference(out.eigenvector.numpy(), out.partition.numpy(), int(out.seed),
                                 float(out.lambda2), ref, d_ref)
    assert agree.lambda2_error <= (1e-9 if precision == "float64" else 1e-4) * max(1.0, abs(ref.lambda2))
    assert agree.well_defined  # these scenes have a clear cut; guard against a vacuous test
    assert agree.alignment >= TOLERANCES[precision]["alignment"]
    assert agree.seed_tied
    if not mean_tied_tokens(ref.eigenvector).any():
        assert agree.same_partition


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_extreme_rows_triton_graph_matches_reference(rng, case: str, precision: str) -> None:
    """The Triton backend's graph (its only magnitude-dependent step: normalize + threshold kernels)
    against the reference's, flips allowed only within rounding of the threshold decision."""
    pytest.importorskip("triton")
    if "triton" not in ncutfast.available_backends():
        pytest.skip("backend triton not available")
    from ncutfast.kernels.affinity import affinity_fwd

    feats, plain, tau = _scaled_case(rng, case, 97)
    n = feats.shape[0]
    mask, counts = affinity_fwd(torch.from_numpy(feats)[None], torch.tensor([n]), tau=tau, precision=precision)
    bits = ((mask[0].to(torch.int64)[..., None] >> torch.arange(32)) & 1).reshape(n, -1)[:, :n].bool().numpy()
    want = reference.affinity(feats, tau=tau) == 1.0
    cos = reference.normalize_rows(plain) @ reference.normalize_rows(plain).T  # tiny rows: s > 0 iff cos > 0
    assert np.abs(cos[bits != want] - tau).max(initial=0.0) <= 1e-5
    assert (bits != want).sum() <= 1e-3 * n * n
    assert np.array_equal(counts[0].numpy(), bits.sum(1))
