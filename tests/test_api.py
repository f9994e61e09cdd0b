"""Public API: frameworks in/out, layouts, sign invariance, MaskCut modes and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ncutfast
from ncutfast import backends, reference
from ncutfast.backends.contract import paint
from ncutfast.reference import relative_gap
from ncutfast.testing import GAP_MIN, mean_tied_tokens, planted_scene


def test_numpy_in_numpy_out_torch_in_torch_out(rng) -> None:
    scene = planted_scene(rng, 120, 32)
    out_np = ncutfast.ncut(scene.features)
    out_t = ncutfast.ncut(torch.from_numpy(scene.features))
    assert isinstance(out_np.eigenvector, np.ndarray) and isinstance(out_t.eigenvector, torch.Tensor)
    assert out_np.eigenvector.dtype == np.float64 and out_np.partition.dtype == bool
    assert out_t.partition.dtype == torch.bool and out_t.eigenvector.shape == (120,)
    assert np.array_equal(out_np.partition, out_t.partition.numpy())
    tc = ncutfast.tokencut(torch.from_numpy(scene.features), scene.grid, patch=16)
    assert isinstance(tc.masks, torch.Tensor) and tc.masks.shape == scene.grid and tc.boxes.shape == (4,)
    mc = ncutfast.maskcut(scene.features, scene.grid, n_masks=2)
    assert isinstance(mc.masks, np.ndarray) and mc.masks.shape == (2, *scene.grid)
    batch = ncutfast.ncut(torch.from_numpy(np.stack([scene.features] * 3)))
    assert batch.eigenvector.shape == (3, 120) and batch.lambda2.shape == (3,)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_input_dtypes(rng, dtype) -> None:
    scene = planted_scene(rng, 64, 16)
    out = ncutfast.ncut(scene.features.astype(dtype), precision="float64")
    ref = reference.ncut(scene.features.astype(dtype))
    assert float(out.lambda2) == pytest.approx(ref.lambda2, rel=1e-9)


def test_bfloat16_torch_input(rng) -> None:
    scene = planted_scene(rng, 50, 16)
    t = torch.from_numpy(scene.features).to(torch.bfloat16)
    ref = reference.ncut(t.to(torch.float64).numpy())
    assert float(ncutfast.ncut(t, precision="float64").lambda2) == pytest.approx(ref.lambda2, rel=1e-9)


def test_ragged_list_outputs_lists(rng) -> None:
    scenes = [planted_scene(rng, n, 24) for n in (7, 30, 12)]
    tc = ncutfast.tokencut([s.features for s in scenes], [s.grid for s in scenes], patch=8,
                           image_size=[(s.grid[0] * 8 - 3, s.grid[1] * 8) for s in scenes])
    assert [m.shape for m in tc.masks] == [s.grid for s in scenes]
    assert tc.boxes.shape == (3, 4)
    for i, (s, m, box) in enumerate(zip(scenes, tc.masks, tc.boxes, strict=True)):
        ref = reference.tokencut(s.features, s.grid, patch=8, image_size=(s.grid[0] * 8 - 3, s.grid[1] * 8))
        one = ncutfast.tokencut(s.features, s.grid, patch=8, image_size=(s.grid[0] * 8 - 3, s.grid[1] * 8))
        assert np.array_equal(m, one.masks) and np.array_equal(box, one.boxes)  # ragged == one by one
        well = relative_gap(ref.ncut.lambda2, ref.ncut.lambda3) >= GAP_MIN
        if well and not mean_tied_tokens(ref.ncut.eigenvector).any():
            seed = int(tc.seeds[i])
            assert np.array_equal(m, reference.seed_component(ref.ncut.partition, seed, s.grid)[1])
        assert box[3] <= s.grid[0] * 8 - 3  # clipped to the image height
    mc = ncutfast.maskcut([s.features for s in scenes], [s.grid for s in scenes], n_masks=2)
    assert [m.shape for m in mc.masks] == [(2, *s.grid) for s in scenes]
    assert [v.shape for v in mc.eigenvectors] == [(2, s.features.shape[0]) for s in scenes]


def _negating_backend(monkeypatch) -> None:
    """Make every solve return -x: the solver's sign is arbitrary, so nothing downstream may change."""
    real = backends.resolve_backend

    def flipped(backend, device):
        name, fn = real(backend, device)

        def solve(*args, **kwargs):
            sp = fn(*args, **kwargs)
            sp.x = -sp.x
            return sp

        return name, solve

    monkeypatch.setattr(backends, "resolve_backend", flipped)


def test_sign_invariance(rng, monkeypatch) -> None:
    scenes = [planted_scene(rng, grid=(9, 11), channels=32) for _ in range(8)]
    feats = np.stack([s.features for s in scenes])
    tc = ncutfast.tokencut(feats, (9, 11), patch=16)
    mc = ncutfast.maskcut(feats, (9, 11))
    nc = ncutfast.ncut(feats)
    _negating_backend(monkeypatch)
    tc2 = ncutfast.tokencut(feats, (9, 11), patch=16)
    mc2 = ncutfast.maskcut(feats, (9, 11))
    nc2 = ncutfast.ncut(feats)
    assert np.array_equal(tc.masks, tc2.masks) and np.array_equal(tc.boxes, tc2.boxes)
    assert np.array_equal(mc.masks, mc2.masks) and np.array_equal(mc.seeds, mc2.seeds)
    assert np.array_equal(nc.eigenvector, nc2.eigenvector)  # the seed rule fixes the returned sign


def test_maskcut_matches_reference_in_both_modes(rng, monkeypatch) -> None:
    """'canonical' against the canonical reference; 'cutler' with the solver's sign aligned to scipy's."""
    scenes = [planted_scene(rng, grid=(12, 12), channels=48) for _ in range(6)]
    feats = np.stack([s.features for s in scenes])
    refs_c = [reference.maskcut(s.features, s.grid, sign_rule="canonical", similarity_dtype=np.float32)
              for s in scenes]
    refs_s = [reference.maskcut(s.features, s.grid, sign_rule="cutler", similarity_dtype=np.float32)
              for s in scenes]

    def comparable(r) -> bool:
        well = all(np.isfinite(g) and g >= GAP_MIN for g in (r.lambda3 - r.lambda2) / r.lambda3)
        return well and not any(mean_tied_tokens(v).any() for v in r.eigenvectors)

    out = ncutfast.maskcut(feats, (12, 12))
    checked = 0
    for i, r in enumerate(refs_c):
        if comparable(r):
            assert np.array_equal(out.masks[i], reference.subtract_earlier(r.masks))
            checked += 1
    # "cutler": make each solve return scipy's sign (read off the reference), then CutLER's rule must agree.
    real = backends.resolve_backend

    def aligned(backend, device):
        name, fn = real(backend, device)

        def solve(feats_b, lengths, params, painted=None):
            sp = fn(feats_b, lengths, params, painted=painted)
            zeroed = paint(feats_b, painted)  # the features the step solved
            for b in range(sp.x.shape[0]):
                f = zeroed[b].numpy()
                x_ref = reference.fiedler(reference.affinity(f, params.tau, similarity_dtype=np.float32))[2]
                if float(np.dot(x_ref, sp.x[b].numpy())) < 0:
                    sp.x[b] = -sp.x[b]
            return sp

        return name, solve

    monkeypatch.setattr(backends, "resolve_backend", aligned)
    out_s = ncutfast.maskcut(feats, (12, 12), sign_rule="cutler")
    for i, r in enumerate(refs_s):
        if comparable(r):
            assert np.array_equal(out_s.masks[i], reference.subtract_earlier(r.masks))
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize(
    "call",
    [
        "ncut",
        "tokencut",
    ],
)
@pytest.mark.parametrize(
    "bad,kwargs,exc",
    [
        ("nan", {}, ValueError),
        ("inf", {}, ValueError),
        ("rank1", {}, ValueError),
        ("rank4", {}, ValueError),
        ("n0", {}, ValueError),
        ("c0", {}, ValueError),
        ("int", {}, TypeError),
        ("list", {}, TypeError),
        ("ok", {"tau": 1.0}, ValueError),
        ("ok", {"tau": -1.0}, ValueError),
        ("ok", {"tau": float("nan")}, ValueError),
        ("ok", {"eps": 0.0}, ValueError),
        ("ok", {"eps": -1e-5}, ValueError),
        ("ok", {"tau": "0.2"}, TypeError),
    ],
)
def test_bad_input_same_exception_as_reference(rng, call: str, bad: str, kwargs: dict, exc) -> None:
    good = rng.standard_normal((12, 5)).astype(np.float32)
    x = {
        "nan": np.where(np.arange(60).reshape(12, 5) == 7, np.nan, good),
        "inf": np.where(np.arange(60).reshape(12, 5) == 3, -np.inf, good),
        "rank1": good[0],
        "rank4": good[None, None],
        "n0": good[:0],
        "c0": good[:, :0],
        "int": good.astype(np.int32),
        "list": good.tolist(),
        "ok": good,
    }[bad]
    extra = {"grid": (3, 4), "patch": 8} if call == "tokencut" else {}
    with pytest.raises(exc) as e_api:
        getattr(ncutfast, call)(x, **{**extra, **kwargs})
    ref_fn = getattr(reference, call)
    with pytest.raises(exc) as e_ref:
        if call == "tokencut":
            ref_fn(x, (3, 4), patch=8, **kwargs)
        else:
            ref_fn(x, **kwargs)
    # Both name the offending argument.
    name = next(iter(kwargs), "features")
    assert name in str(e_api.value)
    assert (name if kwargs else "feats") in str(e_ref.value)


def test_bad_batch_arguments(rng) -> None:
    good = rng.standard_normal((3, 10, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="features: empty batch"):
        ncutfast.ncut([])
    with pytest.raises(ValueError, match="features"):
        ncutfast.ncut(good[:0])
    with pytest.raises(ValueError, match="lengths: has 2 entries"):
        ncutfast.ncut(good, lengths=[10, 5])
    with pytest.raises(ValueError, match="lengths: entry 1 is 11"):
        ncutfast.ncut(good, lengths=[10, 11, 3])
    with pytest.raises(ValueError, match="lengths: entry 2 is 0"):
        ncutfast.ncut(good, lengths=[10, 1, 0])
    with pytest.raises(ValueError, match="channel counts"):
        ncutfast.ncut([good[0], good[1, :, :3]])
    with pytest.raises(ValueError, match="grid: 3x4 = 12 tokens does not match the 10"):
        ncutfast.tokencut(good, (3, 4), patch=8)
    with pytest.raises(ValueError, match="grid: 3x4"):
        reference.tokencut(good[0], (3, 4), patch=8)
    with pytest.raises(ValueError, match="grid: has 2 entries"):
        ncutfast.tokencut(good, [(2, 5), (5, 2)], patch=8)
    with pytest.raises(ValueError, match="precision"):
        ncutfast.ncut(good, precision="float16")
    with pytest.raises(ValueError, match="backend"):
        ncutfast.ncut(good, backend="opencl")
    with pytest.raises(ValueError, match="sign_rule"):
        ncutfast.maskcut(good, (2, 5), sign_rule="scipy")
    with pytest.raises(ValueError, match="n_masks"):
        ncutfast.maskcut(good, (2, 5), n_masks=0)
    with pytest.raises(ValueError, match="tol"):
        ncutfast.ncut(good, tol=0.0)
    padded_nan = good.copy()
    padded_nan[0, 8:] = np.nan  # NaN in padding is ignored, NaN in a valid row is not
    ncutfast.ncut(padded_nan, lengths=[8, 10, 10])
    with pytest.raises(ValueError, match="NaN or inf"):
        ncutfast.ncut(padded_nan, lengths=[9, 10, 10])


def test_backend_selection(monkeypatch, rng) -> None:
    x = rng.standard_normal((20, 4)).astype(np.float32)
    monkeypatch.setenv("NCUTFAST_BACKEND", "torch")
    assert ncutfast.ncut(x).backend == "torch"
    monkeypatch.setenv("NCUTFAST_BACKEND", "cuda")
    if backends._load("cuda") is None:
        with pytest.raises(RuntimeError, match="NCUTFAST_BACKEND: backend 'cuda' is not available"):
            ncutfast.ncut(x)
    monkeypatch.delenv("NCUTFAST_BACKEND")
    assert ncutfast.ncut(x).backend in ncutfast.available_backends()
    assert "torch" in ncutfast.available_backends()


def test_fast_precision_runs_and_reports_flips(rng) -> None:
    """On a CPU 'fast' is fp32; the comparison against float64 is measurable either way."""
    scene = planted_scene(rng, 300, 64)
    fast = ncutfast.ncut(scene.features, precision="fast")
    f64 = ncutfast.ncut(scene.features, precision="float64")
    assert float(fast.lambda2) == pytest.approx(float(f64.lambda2), rel=1e-3)


def test_tie_break_is_lowest_index_within_rtol() -> None:
    from ncutfast import decide

    v = torch.tensor([[0.5, 1.0 - 1e-9, 1.0, 1.0 - 1e-3]], dtype=torch.float64)
    valid, scale = torch.ones_like(v, dtype=torch.bool), v.abs().amax(-1)
    assert int(decide.tie_argmax(v, valid, scale)[0]) == 1
    assert int(decide.tie_argmax(-v, valid, scale)[0]) == 0


def test_flip_rate_on_cpu(rng) -> None:
    """float32 similarity flips almost no threshold decisions against float64 (measured, not assumed)."""
    from ncutfast.testing import flip_rate

    feats = planted_scene(rng, 900, 384).features
    assert flip_rate(feats, precision="float64") == 0.0
    assert flip_rate(feats, precision="float32") <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_features_that_require_grad_are_read_detached(rng, backend) -> None:
    """Features straight from a model (requires_grad) give the same cut as detached ones, on every layout."""
    if backend not in ncutfast.available_backends():
        pytest.skip(f"backend {backend} not available")
    scene = planted_scene(rng, 43, 12)
    plain = torch.from_numpy(scene.features)
    leaf = plain.clone().requires_grad_(True)
    for feats, want in ((leaf * 2.0, plain * 2.0), ([leaf[:17], leaf], [plain[:17], plain])):
        out = ncutfast.ncut(feats, backend=backend)
        ref = ncutfast.ncut(want, backend=backend)
        vecs = out.eigenvector if isinstance(out.eigenvector, list) else [out.eigenvector]
        refs = ref.eigenvector if isinstance(ref.eigenvector, list) else [ref.eigenvector]
        for v, r in zip(vecs, refs, strict=True):
            assert not v.requires_grad and torch.equal(v, r)
    mc = ncutfast.maskcut(leaf, scene.grid, n_masks=2, backend=backend)
    assert torch.equal(mc.masks, ncutfast.maskcut(plain, scene.grid, n_masks=2, backend=backend).masks)


def test_compat_drop_ins_accept_features_that_require_grad(rng) -> None:
    from ncutfast.compat import maskcut as cm
    from ncutfast.compat import tokencut as ct

    scene = planted_scene(rng, grid=(5, 7), channels=10)
    tokens = torch.from_numpy(np.concatenate([scene.features[:1], scene.features]))[None]
    out = ct.ncut(tokens.clone().requires_grad_(True), [5, 7], [8, 8], (3, 40, 56), tau=0.2)
    ref = ct.ncut(tokens, [5, 7], [8, 8], (3, 40, 56), tau=0.2)
    assert np.array_equal(out[0], ref[0]) and np.array_equal(out[5], ref[5])
    keys = torch.from_numpy(scene.features.T.copy())
    seed, masks, _ = cm.maskcut_forward(keys.clone().requires_grad_(True), [5, 7], [8, 8], [40, 56], tau=0.15, N=2)
    seed_ref, masks_ref, _ = cm.maskcut_forward(keys, [5, 7], [8, 8], [40, 56], tau=0.15, N=2)
    assert seed == seed_ref and all(np.array_equal(a, b) for a, b in zip(masks, masks_ref, strict=True))


@pytest.mark.parametrize(
    "lengths",
    [[10, 5.7, 3], [10, 5.0, 3], [True, True, True], [10, np.float64(4), 3], np.array([10.0, 5.0, 3.0]),
     torch.tensor([10, 5, 3]) > 0, torch.tensor([10.0, 5.0, 3.0]), np.array([True, True, True]), 10, "abc"],
)
def test_lengths_must_be_integers(rng, lengths) -> None:
    good = rng.standard_normal((3, 10, 4)).astype(np.float32)
    with pytest.raises(TypeError, match="^lengths: "):
        ncutfast.ncut(good, lengths=lengths)


def test_integer_lengths_of_any_integer_type(rng) -> None:
    good = rng.standard_normal((3, 10, 4)).astype(np.float32)
    want = ncutfast.ncut([good[0], good[1, :5], good[2, :3]]).lambda2
    for lengths in ([10, 5, 3], (np.int32(10), np.int64(5), 3), np.array([10, 5, 3]), torch.tensor([10, 5, 3])):
        assert np.array_equal(ncutfast.ncut(good, lengths=lengths).lambda2, want)


CPU_BACKENDS = ["torch", "cpu", "triton"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_binary_graph_refuses_negative_tau_everywhere(rng, backend) -> None:
    """binary=False with tau < 0 makes negative weights (an indefinite D - W: NaN degrees or a different
    eigenpair than scipy's): refused by the reference, every backend and the drop-in, naming tau."""
    if backend not in ncutfast.available_backends():
        pytest.skip(f"backend {backend} not available")
    feats = rng.standard_normal((23, 8))
    for tau in (-0.3, -0.05, -1e-9):
        with pytest.raises(ValueError, match="^tau: must be >= 0 for a non-binary graph"):
            ncutfast.ncut(feats, tau=tau, binary=False, backend=backend)
        with pytest.raises(ValueError, match="^tau: must be >= 0 for a non-binary graph"):
            ncutfast.tokencut(feats, (1, 23), patch=8, tau=tau, binary=False, backend=backend)
    with pytest.raises(ValueError, match="^tau: must be >= 0 for a non-binary graph"):
        reference.ncut(feats, tau=-0.3, binary=False)
    with pytest.raises(ValueError, match="^tau: must be >= 0 for a non-binary graph"):
        reference.tokencut(feats, (1, 23), patch=8, tau=-0.3, binary=False)
    # tau = 0 non-binary graphs match the reference, and binary graphs keep accepting tau < 0 (not run on
    # Triton: its interpreted Lanczos is slow, and the binary path is not what this test is about).
    for tau, binary in ((0.0, False),) if backend == "triton" else ((0.0, False), (-0.3, True)):
        out = ncutfast.ncut(feats, tau=tau, binary=binary, backend=backend, precision="float64")
        ref = reference.ncut(feats, tau=tau, binary=binary)
        assert float(out.lambda2) == pytest.approx(ref.lambda2, rel=1e-7)
        assert float(out.lambda3) == pytest.approx(ref.lambda3, rel=1e-7)


def test_non_binary_compat_refuses_negative_tau(rng) -> None:
    from ncutfast.compat import tokencut as ct

    tokens = torch.from_numpy(rng.standard_normal((1, 13, 6)).astype(np.float32))
    with pytest.raises(ValueError, match="^tau: must be >= 0 for a non-binary graph"):
        ct.ncut(tokens, [3, 4], [8, 8], (3, 24, 32), tau=-0.2, no_binary_graph=True)
    ct.ncut(tokens, [3, 4], [8, 8], (3, 24, 32), tau=-0.2)  # binary: fine


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n", [5, 97])  # dense and Lanczos paths
def test_non_binary_zero_degree_raises_everywhere(rng, backend, n) -> None:
    """tau = 0 and an all-zero row: every weight of that token is 0 (degree 0, no D^-1/2)."""
    if backend not in ncutfast.available_backends():
        pytest.skip(f"backend {backend} not available")
    feats = rng.standard_normal((n, 6))
    feats[n // 2] = 0.0
    with pytest.raises(ValueError, match=r"degree (<= )?0"):
        reference.ncut(feats, tau=0.0, binary=False)
    with pytest.raises(ValueError, match=r"degree (<= )?0"):
        ncutfast.ncut(feats, tau=0.0, binary=False, backend=backend)
