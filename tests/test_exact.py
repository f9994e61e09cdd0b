"""Precision "exact" (ncutfast.exact): the float64 reference graph, certified, on the CPU extension and torch.

Graphs are compared entry by entry with ``reference.affinity`` (zero flips); the bounds are checked against
inputs built to make the screening product's error as large as possible.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

import ncutfast
from ncutfast import _ext, exact, reference
from ncutfast.testing import TOLERANCES, d_alignment, planted_scene

needs_ext = pytest.mark.skipif(not _ext.HAS_CPU_EXT, reason=f"ncutfast._C not built ({_ext.IMPORT_ERROR})")


def _unpack(bits: torch.Tensor, n: int) -> np.ndarray:
    """(B, N, words) int64 words -> (B, N, n) bool, bit j % 64 of word j // 64."""
    raw = bits.numpy().view(np.uint64)
    expanded = (raw[..., None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    return expanded.reshape(*raw.shape[:2], -1)[..., :n].astype(bool)


def _graphs(feats: list[np.ndarray], tau: float, backend: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Exact graphs of a ragged batch (padded with nonzero junk) and their recheck fractions."""
    lengths = [f.shape[0] for f in feats]
    n, c = max(lengths), feats[0].shape[1]
    pad = np.full((len(feats), n, c), 7.0, dtype=feats[0].dtype)  # padding must be ignored
    for b, f in enumerate(feats):
        pad[b, : f.shape[0]] = f
    t, ln = torch.from_numpy(pad), torch.tensor(lengths)
    if backend.startswith("cpu"):
        from ncutfast.backends.ext import exact_graph_bits

        bits, rechecked = exact_graph_bits(t, ln, tau, simd=backend == "cpu")
        dense = _unpack(bits, n)
        frac = rechecked.numpy() / (ln.numpy() * (ln.numpy() + 1) / 2)
    else:
        mask, fr = exact.exact_mask(exact.normalized_rows(t, ln), ln, tau)
        dense, frac = mask.numpy(), fr.numpy()
    for b, m in enumerate(lengths):  # nothing set on padding
        assert not dense[b, m:].any() and not dense[b, :, m:].any()
    return [dense[b, :m, :m] for b, m in enumerate(lengths)], frac


def _near_tau(rng: np.random.Generator, n: int, c: int, tau: float, spread: float) -> np.ndarray:
    """Rows whose cosines with row 0 lie within +-spread of tau (C >= 2): every pair (0, j) needs a recheck."""
    e = rng.standard_normal((n, c))
    e[:, 0] = 0.0
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    cos = tau + rng.uniform(-spread, spread, size=n)
    rows = cos[:, None] * np.eye(c)[0] + np.sqrt(1.0 - cos[:, None] ** 2) * e
    rows[0] = np.eye(c)[0]
    return rows * rng.uniform(0.5, 2.0, size=(n, 1))


BACKENDS = [pytest.param("cpu", marks=needs_ext), "torch"]
# graph builders of _graphs; "cpu-portable": the extension's portable screening kernel where AVX2 exists
GRAPH_BACKENDS = [*BACKENDS, pytest.param("cpu-portable", marks=needs_ext)]


@needs_ext
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (97, 64), (13, 129), (5, 1000), (3, 1024)])
def test_extension_norms_are_the_reference_denominators(rng: np.random.Generator, dtype: type,
                                                        shape: tuple[int, int]) -> None:
    """exact_row_norms_cpu reproduces the norms of reference.normalize_rows bit for bit (NumPy's pairwise
    sum), so k / max(norm, 1e-12) is the reference's float64 row exactly."""
    n, c = shape
    k = (rng.standard_normal((2, n, c)) * rng.uniform(0.01, 100.0)).astype(dtype)
    k[1, 0] = 0.0  # a painted (zero) token stays zero
    norms = torch.empty(2, n, dtype=torch.float64)
    t, ln = torch.from_numpy(k), torch.tensor([n, n])
    _ext.C.exact_row_norms_cpu(t.data_ptr(), np.dtype(dtype).name, 2, n, c, ln.data_ptr(), norms.data_ptr())
    for b in range(2):
        k64 = k[b].astype(np.float64)
        f = k64 / np.maximum(norms[b].numpy(), reference.NORM_EPS)[:, None]
        np.testing.assert_array_equal(f, reference.normalize_rows(k[b]))


@pytest.mark.parametrize("c", [1, 3, 7, 9, 64, 129, 768, 1000])
def test_torch_rows_are_the_references(rng: np.random.Generator, c: int) -> None:
    """exact.normalized_rows (any device) equals reference.normalize_rows bit for bit, padding zeroed."""
    k = rng.standard_normal((2, 11, c)) * rng.uniform(0.01, 100.0)
    f = exact.normalized_rows(torch.from_numpy(k), torch.tensor([11, 6])).numpy()
    np.testing.assert_array_equal(f[0], reference.normalize_rows(k[0]))
    np.testing.assert_array_equal(f[1, :6], reference.normalize_rows(k[1, :6]))
    assert not f[1, 6:].any()


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
@pytest.mark.parametrize("c", [1, 3, 64, 384, 768, 1024])
def test_zero_flips_gaussian_and_planted_ragged(rng: np.random.Generator, backend: str, c: int) -> None:
    """Ragged batches of Gaussian features (dense near tau at small C) and planted scenes: the reference's
    graph exactly, and a recheck fraction that counts what was rechecked."""
    sizes = [97, 1, 2, 61] if c < 768 else [97, 2]
    feats = [rng.standard_normal((m, c)).astype(np.float32) for m in sizes[:-1]]
    feats.append(planted_scene(rng, sizes[-1], c).features if sizes[-1] > 2 else rng.standard_normal((2, c)))
    feats = [f.astype(np.float32) for f in feats]
    if c in (3, 768):  # rows below the 1e-12 norm clamp: the CPU screens the normalized rows instead
        feats[0][:5] *= 1e-14
    tau = 0.2 if c > 3 else 0.6
    graphs, frac = _graphs(feats, tau, backend)
    for f, g in zip(feats, graphs, strict=True):
        np.testing.assert_array_equal(g, reference.affinity(f, tau) == 1.0)
    assert np.all((frac >= 0) & (frac <= 1))


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 1e25])
@pytest.mark.parametrize("c", [2, 64, 768])
def test_entries_within_the_bound_are_rechecked_exactly(rng: np.random.Generator, backend: str, c: int,
                                                        scale: float) -> None:
    """Cosines planted within the screening bound of tau (but far beyond float64 rounding): the screen cannot
    decide them, the recheck must, and it must match the reference, at any norm (float64 input). Row 0 is a
    unit vector, whose clamped int16 row errs by 2^-15, so the CPU's bound is at least the one used here."""
    tau = 0.2
    spread = 0.5 * exact.int16_screen_bound(c, 2.0**-15)
    f = _near_tau(rng, 131, c, tau, spread) * scale
    (g,), frac = _graphs([f], tau, backend)
    want = reference.affinity(f, tau) == 1.0
    np.testing.assert_array_equal(g, want)
    assert want[0, 1:].any() and not want[0, 1:].all()  # both sides of tau are present
    if backend != "torch":  # the int16 screen leaves at least row 0's planted pairs to the recheck
        assert frac[0] * 131 * 132 / 2 >= 130


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
@pytest.mark.parametrize("tau", [-3.0, -1.0, 1.0, 2.5])
def test_thresholds_at_and_beyond_the_similarity_range(rng: np.random.Generator, backend: str, tau: float) -> None:
    """The graph builders take any finite tau (the public API keeps it in (-1, 1)): beyond the similarities'
    range (the CPU screen's integer thresholds leave the int32 range) and at its ends, where rows along the
    axes (cosines exactly -1, 0 or 1; zero rows give 0) tie with tau = +-1."""
    pool = np.concatenate([np.eye(5), -np.eye(5), np.zeros((1, 5))])
    f = pool[rng.integers(0, 11, size=37)] * rng.choice([1.0, 0.25, 3.0], size=(37, 1))
    (g,), _ = _graphs([f], tau, backend)
    fn = reference.normalize_rows(f)  # exactly the pool's rows: the products below are exact
    np.testing.assert_array_equal(g, fn @ fn.T > tau)


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
@pytest.mark.parametrize("c", [2, 3, 64, 384])
def test_exact_ties_honour_the_strict_threshold(rng: np.random.Generator, backend: str, c: int) -> None:
    """Pythagorean rows (3, 4) / 5 against (1, 0): the float64 similarity is fl(0.6) == tau exactly, so no
    edge; (4, 3) / 5 gives fl(0.8) > tau, an edge. Zero rows (MaskCut's painted tokens) give 0."""
    tau = 0.6
    pool = np.zeros((5, c))
    pool[0, 0] = 5.0
    pool[1, :2] = (3.0, 4.0)
    pool[2, :2] = (4.0, 3.0)
    pool[3, 1] = 2.0
    f = pool[rng.integers(0, 5, size=89)] * rng.choice([1.0, 0.5, 4.0], size=(89, 1))
    sim = reference.normalize_rows(f) @ reference.normalize_rows(f).T
    assert (sim == tau).sum() > 0  # exact ties are present
    (g,), frac = _graphs([f], tau, backend)
    np.testing.assert_array_equal(g, reference.affinity(f, tau) == 1.0)
    assert frac[0] > 0  # ties are always rechecked


def _exact_dot(a: np.ndarray, b: np.ndarray) -> Fraction:
    return sum((Fraction(float(x)) * Fraction(float(y)) for x, y in zip(a, b, strict=True)), Fraction(0))


def _quantize(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """exact_quantize_cpu of float64 rows ``f`` (n, c) taken as normalized (norms 1): q (n, cq) int16 and the
    error norm bounds err (n,)."""
    n, c = f.shape
    cq = c + c % 2
    t = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float64))[None]
    ln, norms = torch.tensor([n]), torch.ones(1, n, dtype=torch.float64)
    q, err = torch.empty(1, n, cq, dtype=torch.int16), torch.empty(1, n, dtype=torch.float64)
    _ext.C.exact_quantize_cpu(t.data_ptr(), "float64", 1, n, c, ln.data_ptr(), norms.data_ptr(), q.data_ptr(), cq,
                              err.data_ptr())
    return q[0].numpy(), err[0].numpy()


@needs_ext
@pytest.mark.parametrize("c", [1, 2, 3, 64, 768, 1024])
def test_int16_screening_error_stays_inside_the_proven_bound(rng: np.random.Generator, c: int) -> None:
    """Adversarial int16 screens: rows of norm just below 1 whose every entry lies just below a quantization
    midpoint (each error as large as it gets, all parallel to the rows, so the products' errors add up),
    one of them negated, plus rows concentrated on one or two channels (clamped at 32767). The quantizer
    rounds as documented, its err bounds the true error norms, and every exact integer product stays within
    int16_error_bound, which such rows nearly reach."""
    m = np.floor(0.999 / np.sqrt(c) * 2.0**15) + rng.integers(-3, 1, size=(4, c))
    f = (m + 0.5 - 2.0**-20) / 2.0**15
    f[3] *= -1.0
    spikes = np.zeros((3, c))
    spikes[0, 0] = 1.0  # clamped
    spikes[1, -1] = 1.0 - 2.0**-17  # clamped from below the largest int16
    spikes[2, : min(c, 2)] = (0.6, 0.8)[: min(c, 2)]
    f = np.concatenate([f, spikes])
    assert np.linalg.norm(f, axis=1).max() <= exact.norm_bound(c)
    q, err = _quantize(f)
    np.testing.assert_array_equal(q[:, :c], np.clip(np.rint(f * 2.0**15), -32767, 32767))
    assert not q[:, c:].any()
    for i in range(f.shape[0]):
        e = [Fraction(float(x)) - Fraction(int(y), 2**15) for x, y in zip(f[i], q[i, :c], strict=True)]
        assert sum(x * x for x in e) <= Fraction(float(err[i])) ** 2
    bound = exact.int16_error_bound(c, float(err.max()))
    worst = 0.0
    for i in range(f.shape[0]):
        for j in range(i, f.shape[0]):
            screened = Fraction(int(q[i].astype(np.int64) @ q[j].astype(np.int64)), 2**30)
            worst = max(worst, abs(float(screened - _exact_dot(f[i], f[j]))))
    assert 0.9 * bound <= worst <= bound


@needs_ext
def test_int16_screen_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="err"):
        exact.int16_error_bound(768, 0.5)  # the int32 sums could overflow
    f = torch.ones(1, 3, 5, dtype=torch.float64)
    q, err, ln = torch.empty(1, 3, 6, dtype=torch.int16), torch.empty(1, 3, dtype=torch.float64), torch.tensor([3])
    with pytest.raises(ValueError, match="cq"):
        _ext.C.exact_quantize_cpu(f.data_ptr(), "float64", 1, 3, 5, ln.data_ptr(), err.data_ptr(), q.data_ptr(), 5,
                                  err.data_ptr())


@pytest.mark.parametrize("c", [1, 3, 64, 768, 1024])
def test_gpu_screening_error_stays_inside_the_proven_bound(rng: np.random.Generator, c: int) -> None:
    """The Triton screen's inputs: fp16 rows as torch rounds them (through float32), entries just under half
    an fp16 ulp above an fp16 value, all products positive; the float32 sums (BLAS and naive) stay within
    tensor_core_error_bound (which charges the accumulation 8x float32's roundoff for tensor cores)."""
    ulp = float(np.spacing(np.float16(0.999 / np.sqrt(c))))
    base = np.float16(0.999 / np.sqrt(c)) + (ulp * rng.integers(-3, 4, size=(4, c))).astype(np.float16)
    f = base.astype(np.float64) + 0.499 * ulp
    assert np.linalg.norm(f, axis=1).max() <= exact.norm_bound(c)
    h = torch.from_numpy(f).to(torch.float16).to(torch.float32)
    np.testing.assert_array_equal(h.numpy(), base.astype(np.float32))
    blas = (h @ h.T).numpy()
    worst = 0.0
    for i in range(4):
        for j in range(i, 4):
            naive = np.float32(0.0)
            for q in range(c):
                naive = np.float32(naive + h[i, q].item() * h[j, q].item())
            true = _exact_dot(f[i], f[j])
            for v in (blas[i, j], naive):
                worst = max(worst, abs(float(Fraction(float(v)) - true)))
    assert 0.0 < worst <= exact.tensor_core_error_bound(c)


@pytest.mark.parametrize("c", [1, 3, 64, 768, 1024])
def test_float32_screening_error_stays_inside_the_proven_bound(rng: np.random.Generator, c: int) -> None:
    """Precision float32's screen: float32 rows of norm just below 1 whose entries lie just under half an
    fp16 ulp above an fp16 value, all products positive; the fp16 product (BLAS and naive float32 sums)
    stays within float32_screen_error_bound of the float32 dots (BLAS and the sequential order)."""
    ulp = float(np.spacing(np.float16(0.999 / np.sqrt(c))))
    base = np.float16(0.999 / np.sqrt(c)) + (ulp * rng.integers(-3, 1, size=(4, c))).astype(np.float16)
    g = (base.astype(np.float64) + 0.499 * ulp).astype(np.float32)
    assert np.linalg.norm(g.astype(np.float64), axis=1).max() <= exact.float32_norm_bound(c)
    h = torch.from_numpy(g).to(torch.float16).to(torch.float32)
    np.testing.assert_array_equal(h.numpy(), base.astype(np.float32))
    screens = (h @ h.T).numpy()
    dots = (torch.from_numpy(g) @ torch.from_numpy(g).T).numpy()
    worst = 0.0
    for i in range(4):
        for j in range(i, 4):
            naive_h = naive_g = np.float32(0.0)
            for q in range(c):
                naive_h = np.float32(naive_h + h[i, q].item() * h[j, q].item())
                naive_g = np.float32(naive_g + g[i, q] * g[j, q])
            for v in (screens[i, j], naive_h):
                for w in (dots[i, j], naive_g):
                    worst = max(worst, abs(float(Fraction(float(v)) - Fraction(float(w)))))
    assert 0.0 < worst <= exact.float32_screen_error_bound(c)


def test_recheck_decides_dot2_ties_and_near_ties() -> None:
    """exact.recheck's second stage: a float64 dot that rounds onto tau although the exact one is above."""
    tau = 0.5
    a = torch.tensor([[0.5, 2.0**-60, 0.0], [0.5, -(2.0**-60), 0.0], [0.5, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0, 0.0]] * 3, dtype=torch.float64)
    assert float((a[0] * b[0]).sum()) == tau  # float64 cannot tell
    np.testing.assert_array_equal(exact.recheck(a, b, tau).numpy(), [True, False, False])


@needs_ext
def test_extension_recheck_resolves_below_float64_rounding() -> None:
    """The same near-ties through the extension's exact_edge (C = 3, tau = 0.5)."""
    f = np.array([[1.0, 1.0, 0.0], [0.5, 2.0**-60, 0.0], [0.5, -(2.0**-60), 0.0], [0.5, 0.0, 0.0]])
    # rows are normalized, so feed pre-normalized directions whose cosines are exactly these dots
    (g,), _ = _graphs([f], 0.5, "cpu")
    fn = reference.normalize_rows(f)
    want = np.array([_exact_dot(fn[0], fn[j]) > Fraction(0.5) for j in range(4)])
    np.testing.assert_array_equal(g[0], want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_api_exact_matches_float64_and_reports_fraction(rng: np.random.Generator, backend: str) -> None:
    """ncut / tokencut / maskcut accept precision="exact"; the cut equals float64's (same graph)."""
    feats = [planted_scene(rng, m, 64).features for m in (97, 45)] + [rng.standard_normal((1, 64))]
    feats = [f.astype(np.float32) for f in feats]
    ex = ncutfast.ncut(feats, precision="exact", backend=backend)
    ref = ncutfast.ncut(feats, precision="float64", backend=backend)
    for b, f in enumerate(feats):
        assert 0.0 <= float(ex.recheck_fraction[b]) <= 1.0
        if f.shape[0] >= 3:
            w = reference.affinity(f)
            lam2, _, x_ref = reference.fiedler(w)
            assert abs(float(ex.lambda2[b]) - lam2) <= 1e-8
            d = reference.degrees(w)
            assert d_alignment(np.asarray(ex.eigenvector[b]), x_ref, d) >= TOLERANCES["exact"]["alignment"]
    assert np.isnan(np.asarray(ref.recheck_fraction)).all()
    tc = ncutfast.tokencut(feats[0], (1, 97), patch=8, precision="exact", backend=backend)
    assert 0.0 <= float(tc.ncut.recheck_fraction) <= 1.0
    mc = ncutfast.maskcut(feats[0], (1, 97), n_masks=2, precision="exact", backend=backend)
    assert np.asarray(mc.recheck_fraction).shape == (2,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_rejects_nan_and_inf(backend: str) -> None:
    f = np.ones((5, 4), dtype=np.float32)
    for bad in (np.nan, np.inf):
        f[3, 2] = bad
        with pytest.raises(ValueError, match="features: contains NaN or inf"):
            ncutfast.ncut(f, precision="exact", backend=backend)


@needs_ext
def test_cpu_backend_rejects_nan_before_any_product() -> None:
    """The backend itself checks (within the lengths only: padding may hold anything finite)."""
    from ncutfast.backends import SolveParams
    from ncutfast.backends.ext import solve

    f = torch.ones(2, 5, 4)
    f[1, 4, 0] = float("inf")
    params = SolveParams(0.2, 1e-5, precision="exact", max_iter=50)
    with pytest.raises(ValueError, match="feats: contains NaN or inf"):
        solve(f, torch.tensor([5, 5]), params)
    f[1, 4, 0] = 1e30  # finite padding is ignored
    assert solve(f, torch.tensor([5, 4]), params).recheck_fraction.shape == (2,)


@needs_ext
def test_large_planted_scene_zero_flips(rng: np.random.Generator) -> None:
    """N = 3600 (the benchmark's size) and N = 784 at C = 768, one batch: zero flips."""
    feats = [planted_scene(rng, 3600, 32).features, planted_scene(rng, 784, 768).features]
    for f in feats:
        (g,), _ = _graphs([f], 0.2, "cpu")
        np.testing.assert_array_equal(g, reference.affinity(f, 0.2) == 1.0)


def test_compat_drop_ins_take_precision_keyword(rng: np.random.Generator) -> None:
    """TokenCut's and CutLER's drop-ins: precision is keyword only, validated, and "exact" cuts like float64."""
    from ncutfast.compat.maskcut import maskcut_forward
    from ncutfast.compat.tokencut import ncut as tokencut_ncut

    scene = planted_scene(rng, 96, 64)
    feats = torch.from_numpy(np.concatenate([scene.features[:1], scene.features]))[None]
    args = (feats, scene.grid, (8, 8), (3, 8 * scene.grid[0], 8 * scene.grid[1]), 0.2)
    ex, f64 = tokencut_ncut(*args, precision="exact"), tokencut_ncut(*args, precision="float64")
    np.testing.assert_array_equal(ex[2], f64[2])
    with pytest.raises(ValueError, match="precision"):
        tokencut_ncut(*args, precision="double")
    keys = torch.from_numpy(scene.features.T.copy())
    mc = maskcut_forward(keys, scene.grid, (8, 8), (16, 24), 0.15, 2, precision="exact")
    mf = maskcut_forward(keys, scene.grid, (8, 8), (16, 24), 0.15, 2, precision="float64")
    for a, b in zip(mc[1], mf[1], strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError):
        maskcut_forward(keys, scene.grid, (8, 8), (16, 24), 0.15, 2, False, "exact")  # keyword only


def _triton_graphs(feats: list[np.ndarray], tau: float) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """affinity_exact_fwd on a ragged batch (interpreter on CPU): graphs, counts and recheck counts."""
    from ncutfast.kernels.affinity import affinity_exact_fwd

    lengths = [f.shape[0] for f in feats]
    n, c = max(lengths), feats[0].shape[1]
    pad = np.full((len(feats), n, c), 5.0, dtype=np.float64)
    for b, f in enumerate(feats):
        pad[b, : f.shape[0]] = f
    mask, counts, rechecked = affinity_exact_fwd(torch.from_numpy(pad), torch.tensor(lengths), tau=tau)
    raw = mask.cpu().numpy().view(np.uint32)
    bits = ((raw[..., None] >> np.arange(32, dtype=np.uint32)) & np.uint32(1)).reshape(*raw.shape[:2], -1)
    assert not bits[:, :, n:].any()
    for b, m in enumerate(lengths):
        assert not bits[b, m:].any() and not bits[b, :, m:].any()
    return [bits[b, :m, :m].astype(bool) for b, m in enumerate(lengths)], counts.cpu().numpy(), rechecked.numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [1, 7, 8, 9, 127, 128, 129, 384, 1000])
def test_triton_exact_rows_are_the_references(rng: np.random.Generator, dtype: type, c: int) -> None:
    """exact_normalize_fwd (one kernel, NumPy's pairwise sum of squares unrolled for C) equals
    exact.normalized_rows bit for bit on strided input with a zero row, a row under the 1e-12 clamp and
    padding; the fp16 copy is torch's rounding of those rows."""
    from ncutfast.kernels.affinity import exact_normalize_fwd

    k = (rng.standard_normal((2, c, 13)) * rng.uniform(0.01, 100.0)).astype(dtype)
    k[0, :, 3] = 0.0
    k[1, :, 2] *= 1e-15
    x, lengths = torch.from_numpy(k).transpose(1, 2), torch.tensor([13, 6])
    f, h = exact_normalize_fwd(x, lengths)
    want = exact.normalized_rows(x, lengths)
    assert torch.equal(f, want) and torch.equal(h, want.to(torch.float16))
    np.testing.assert_array_equal(f[0].numpy(), reference.normalize_rows(np.ascontiguousarray(k[0].T)))


def test_triton_exact_kernel_matches_the_float64_graph(rng: np.random.Generator) -> None:
    """The fp16 tensor-core screen plus float64 recheck (interpreter): zero flips on a ragged batch of
    Gaussian features, a planted scene, rows planted within the screen's bound of tau, one token, and
    counts equal to the rows' popcounts."""
    c = 64
    tau = 0.2
    feats = [rng.standard_normal((97, c)), planted_scene(rng, 70, c).features.astype(np.float64),
             _near_tau(rng, 53, c, tau, 0.5 * exact.tensor_core_bound(c)), rng.standard_normal((1, c))]
    graphs, counts, rechecked = _triton_graphs(feats, tau)
    for b, (f, g) in enumerate(zip(feats, graphs, strict=True)):
        want = reference.affinity(f, tau) == 1.0
        np.testing.assert_array_equal(g, want)
        np.testing.assert_array_equal(counts[b, : f.shape[0]], want.sum(1))
    assert rechecked[2] >= 52  # row 0's planted pairs cannot be screened


@pytest.mark.parametrize("c", [2, 3])
def test_triton_exact_kernel_ties(rng: np.random.Generator, c: int) -> None:
    """Exact ties at tau (strict >) through the GPU path, with far more candidates than 1/256 of the
    entries."""
    pool = np.zeros((4, c))
    pool[0, 0], pool[1, :2], pool[2, :2], pool[3, -1] = 5.0, (3.0, 4.0), (4.0, 3.0), 2.0
    f = pool[rng.integers(0, 4, size=67)] * rng.choice([1.0, 0.5, 4.0], size=(67, 1))
    (g,), _, rechecked = _triton_graphs([f], 0.6)
    np.testing.assert_array_equal(g, reference.affinity(f, 0.6) == 1.0)
    assert rechecked[0] > 67 * 67 // 256


def test_triton_backend_solves_the_exact_graph(rng: np.random.Generator) -> None:
    """ncut(backend="triton", precision="exact") (interpreter): the reference's eigenpair, and the recheck
    fraction the kernel counted."""
    from ncutfast.kernels._utils import override

    f = _near_tau(rng, 41, 16, 0.2, 0.5 * exact.tensor_core_bound(16)).astype(np.float32)
    with override("lanczos", solve="torch"):  # the interpreter's fused steps are slow; the graph is the point
        res = ncutfast.ncut([f, f[:1]], precision="exact", backend="triton")
    w = reference.affinity(f)
    lam2, _, x_ref = reference.fiedler(w)
    assert abs(float(res.lambda2[0]) - lam2) <= 1e-8
    assert d_alignment(np.asarray(res.eigenvector[0]), x_ref, reference.degrees(w)) >= TOLERANCES["exact"]["alignment"]
    assert float(res.recheck_fraction[0]) * 41 * 42 / 2 >= 40 and float(res.recheck_fraction[1]) == 0.0


def test_triton_exact_recheck_resolves_below_float64_rounding(rng: np.random.Generator) -> None:
    """Float64 dots within float64 rounding of tau (C = 3: rows one ulp apart, tau one of their dots): the
    recheck kernel leaves them undecided and Dot2 decides them exactly, edges and non-edges."""
    base = rng.standard_normal((2, 3))
    f = np.vstack([base[:1], base[1] + np.arange(-6, 7)[:, None] * np.spacing(base[1])])
    fn = reference.normalize_rows(f)
    tau = float(fn[0] @ fn[7])
    (g,), _, rechecked = _triton_graphs([f], tau)
    dots = [_exact_dot(fn[0], fn[j]) for j in range(1, 14)]
    np.testing.assert_array_equal(g[0, 1:], [d > Fraction(tau) for d in dots])
    np.testing.assert_array_equal(g[1:, 1:], reference.affinity(f[1:], tau) == 1.0)  # far from tau
    near = [d for d in dots if abs(d - Fraction(tau)) <= exact.dot_bound(3)]
    assert len(near) >= 4 and any(d > Fraction(tau) for d in near) and any(d <= Fraction(tau) for d in near)
    assert rechecked[0] >= 13
