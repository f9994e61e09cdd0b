"""kernels/matvec.py, kernels/lanczos.py, kernels/operator.py and the triton backend against ncutfast.reference.

The mat-vec must equal the reference's D^-1/2 W D^-1/2 v to float64 rounding; the full solve
(``backend="triton"``: affinity kernel + bitmask operator + ncutfast.backends.lanczos) must agree with the reference
per the agreement rules of ``ncutfast.testing``. Runs under TRITON_INTERPRET=1 on CPU tensors, or on CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from ncutfast import backends, reference, testing  # noqa: E402
from ncutfast.backends import SolveParams  # noqa: E402
from ncutfast.backends import lanczos as _lanczos  # noqa: E402
from ncutfast.backends import triton_backend as tb  # noqa: E402
from ncutfast.kernels import _utils  # noqa: E402
from ncutfast.kernels.affinity import affinity_fwd  # noqa: E402
from ncutfast.kernels.matvec import _dp4a, bitmask_matvec_fwd  # noqa: E402
from ncutfast.kernels.operator import BitmaskOperator, FusedSteps  # noqa: E402

DEVICE = "cpu" if _utils.interpreting() else "cuda"


@pytest.fixture(autouse=True)
def _triton_can_run() -> None:
    # checked per test, not at import: collection never touches CUDA
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1")


EPS = reference.EPS


@triton.jit
def _dp4a_kernel(a_ptr, b_ptr, c_ptr, o_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(o_ptr + i, _dp4a(tl.load(a_ptr + i), tl.load(b_ptr + i), tl.load(c_ptr + i), False))


def batch(feats: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``(n_b, C)`` arrays into ``(B, N_max, C)`` float32 on DEVICE (padding rows are garbage)."""
    lengths = [f.shape[0] for f in feats]
    x = torch.full((len(feats), max(lengths), feats[0].shape[1]), -3.25)
    for b, f in enumerate(feats):
        x[b, : lengths[b]] = torch.from_numpy(f)
    return x.to(DEVICE), torch.tensor(lengths)


def reference_operator(f: np.ndarray, tau: float) -> np.ndarray:
    """Dense D^-1/2 W D^-1/2 of the reference graph (float64)."""
    w = reference.affinity(f, tau, EPS)
    s = 1.0 / np.sqrt(reference.degrees(w))
    return s[:, None] * w * s[None, :]


MATVECS = pytest.mark.parametrize("int8", [0, 1, 2, 3], ids=["fp64", "int8", "dp4a", "table"])


@MATVECS
@pytest.mark.parametrize("k", [None, 1, 3, 5])
def test_matvec_matches_reference(k, int8):
    rng = np.random.default_rng(20 + (k or 0))
    feats = [rng.standard_normal((n, 29)).astype(np.float32) for n in (97, 2, 33, 1, 64)]
    x, lengths = batch(feats)
    # float64 similarity so that the graph is exactly the reference's (no threshold flips to excuse)
    op = BitmaskOperator(*affinity_fwd(x, lengths, tau=0.2, precision="float64"), lengths, EPS)
    shape = (len(feats), x.shape[1]) + (() if k is None else (k,))
    v = torch.from_numpy(rng.standard_normal(shape)).to(DEVICE)
    with _utils.override("matvec", int8=int8), _utils.override("matvec_int8", BM=32, BN=64, BR=32), \
            _utils.override("matvec_dp4a", BM=32, BW=2, BR=32), _utils.override("matvec_table", BM=32, BW=3, BG=16):
        y = op(v).cpu().numpy()
    assert y.shape == shape and y.dtype == np.float64
    for b, f in enumerate(feats):
        n = f.shape[0]
        vb = v[b, :n].cpu().numpy()
        want = reference_operator(f, 0.2) @ vb
        err = np.linalg.norm(y[b, :n] - want) / np.linalg.norm(want)
        assert err < 1e-14, err
        assert not y[b, n:].any(), "non-zero output on padding rows"
        np.testing.assert_allclose(op.degrees[b, :n].cpu().numpy(),
                                   reference.degrees(reference.affinity(f, 0.2, EPS)), rtol=1e-14, atol=0)


@MATVECS
def test_matvec_subset_and_strides(int8):
    # The Lanczos driver passes strided views of its basis and index subsets after restarts.
    rng = np.random.default_rng(30)
    feats = [rng.standard_normal((n, 17)).astype(np.float32) for n in (40, 65, 7)]
    x, lengths = batch(feats)
    mask, counts = affinity_fwd(x, lengths, tau=0.1)
    op = BitmaskOperator(mask, counts, lengths, EPS)
    basis = torch.from_numpy(rng.standard_normal((3, 4, x.shape[1]))).to(DEVICE)
    with _utils.override("matvec", int8=int8):
        full = op(basis[:, 2])
        idx = torch.tensor([2, 0], device=DEVICE)
        sub = op(basis[idx, 1], idx)
        assert torch.equal(sub, op(basis[:, 1])[idx])
        public = bitmask_matvec_fwd(mask, lengths, op.s, basis[:, 2], EPS)
    assert torch.equal(full, public)


def test_dp4a_fallback_is_dp4a():
    # The interpreter's stand-in for the GPU's dp4a.u32.s32: acc + sum over the 4 bytes of unsigned a times
    # signed b, wrapping in int32 like the instruction.
    rng = np.random.default_rng(7)
    a, b, c = (rng.integers(-2**31, 2**31, 64, dtype=np.int64).astype(np.int32) for _ in range(3))
    a[:3], b[:3], c[:3] = -1, [-1, 2**31 - 1, -2**31], [2**31 - 1, 0, -5]  # all bytes 255 / -1, 127, -128
    out = torch.empty(64, dtype=torch.int32, device=DEVICE)
    _dp4a_kernel[(1,)](*(torch.from_numpy(x).to(DEVICE) for x in (a, b, c)), out, N=64)
    ab, bb = a.view(np.uint8).reshape(64, 4).astype(np.int64), b.view(np.int8).reshape(64, 4).astype(np.int64)
    want = ((c.astype(np.int64) + (ab * bb).sum(1) + 2**31) % 2**32 - 2**31).astype(np.int32)
    np.testing.assert_array_equal(out.cpu().numpy(), want)


def test_dp4a_matvec_sums_the_int8_digits():
    # Same digits and exact integer sums as the tensor-core variant: the two differ only by the rounding of
    # the fp64 recombination (a few ulps of the largest term), on awkward sizes and ragged lengths.
    rng = np.random.default_rng(41)
    feats = [rng.standard_normal((n, 11)).astype(np.float32) for n in (1, 31, 67, 2, 129)]
    x, lengths = batch(feats)
    op = BitmaskOperator(*affinity_fwd(x, lengths, tau=0.1), lengths, EPS)
    mag = 10.0 ** rng.integers(-3, 3, (len(feats), 1))
    v = torch.from_numpy(rng.standard_normal((len(feats), x.shape[1])) * mag).to(DEVICE)
    with _utils.override("matvec_int8", BM=32, BN=64, BR=32), _utils.override("matvec_dp4a", BM=64, BW=3, BR=64):
        with _utils.override("matvec", int8=1):
            y1 = op(v)
        with _utils.override("matvec", int8=2):
            y2 = op(v)
    n = lengths.to(DEVICE)[:, None]
    scale = (op.s * v).abs().amax(dim=1, keepdim=True) * op.s.amax(dim=1, keepdim=True) * n
    assert ((y2 - y1).abs() <= 4 * 2.0**-52 * scale).all()
    assert not y2[0, 1:].any() and not y2[3, 2:].any()


def test_table_matvec_within_its_bound():
    # The nibble-table mat-vec sums the same terms u_j = s_j v_j in another association: against an 80-bit
    # (long double) evaluation, each row's error stays within (6 + ceil(n / 32)) 2^-53 sum_j B_ij |u_j|
    # (matvec.py), plus the eps term's and the row scaling's roundings.
    rng = np.random.default_rng(43)
    feats = [rng.standard_normal((n, 7)).astype(np.float32) for n in (131, 1, 64, 3, 97)]
    x, lengths = batch(feats)
    op = BitmaskOperator(*affinity_fwd(x, lengths, tau=0.05), lengths, EPS)
    v = torch.from_numpy(rng.standard_normal((len(feats), x.shape[1])) * 10.0 ** rng.integers(-4, 4, x.shape[1]))
    v = v.to(DEVICE)
    with _utils.override("matvec", int8=3), _utils.override("matvec_table", BM=64, BW=2, BG=32):
        y = op(v).cpu().numpy()
    mask = op.mask.cpu().numpy().view(np.uint32)
    for b, f in enumerate(feats):
        n = f.shape[0]
        bits = ((mask[b, :n, :, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(n, -1)[:, :n]
        s = op.s[b, :n].cpu().numpy().astype(np.longdouble)
        u = s * v[b, :n].cpu().numpy().astype(np.longdouble)
        want = s * (np.longdouble(EPS) * u.sum() + np.longdouble(1 - EPS) * (bits @ u))
        bound = (6 + -(-n // 32) + 8) * 2.0**-53 * s * (EPS * np.abs(u).sum() + (1 - EPS) * (bits @ np.abs(u)))
        assert (np.abs(y[b, :n] - want) <= bound).all(), (n, np.abs(y[b, :n] - want).max(), bound.min())
        assert not y[b, n:].any()


def test_table_scratch_is_aligned():
    from ncutfast.kernels.matvec import launch_table, table_scratch

    tab = table_scratch(3, 2, torch.device(DEVICE))
    assert tab.shape == (3, 256) and tab.data_ptr() % 1024 == 0
    mask = torch.zeros(3, 40, 2, dtype=torch.int32, device=DEVICE)
    ones = torch.ones(3, 40, dtype=torch.float64, device=DEVICE)
    idx, lens, eps_t = (torch.arange(3, dtype=torch.int32, device=DEVICE), torch.full((3,), 40, device=DEVICE,
                        dtype=torch.int32), torch.tensor([EPS], dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="tab"):
        launch_table(mask, lens, ones, eps_t, idx, ones, ones.clone(), tab.view(-1)[1:257].view(1, 256), ones[:, 0])


def test_matvec_bad_input_raises():
    mask = torch.zeros(2, 5, 2, dtype=torch.int32, device=DEVICE)
    s = torch.ones(2, 5, dtype=torch.float64, device=DEVICE)
    v = torch.ones(2, 5, dtype=torch.float64, device=DEVICE)
    lengths = torch.tensor([5, 3])
    with pytest.raises(ValueError):
        bitmask_matvec_fwd(mask.float(), lengths, s, v, EPS)
    with pytest.raises(ValueError):
        bitmask_matvec_fwd(mask[:, :, :1], lengths, s, v, EPS)
    with pytest.raises(ValueError):
        bitmask_matvec_fwd(mask, lengths, s.float(), v, EPS)
    with pytest.raises(ValueError):
        bitmask_matvec_fwd(mask, lengths, s, v.float(), EPS)
    with pytest.raises(ValueError):
        bitmask_matvec_fwd(mask, lengths[:1], s, v, EPS)


def _cycle_problems() -> tuple[BitmaskOperator, torch.Tensor, torch.Tensor]:
    """Operator, y0 and lengths of a batch that exercises every branch of a Lanczos step: n = 2 (the
    deflated space is full after one step), n = 6 (full after five), a two-clique graph (rank 2: breaks
    down after two steps), random and planted graphs of awkward sizes (97, 53)."""
    rng = np.random.default_rng(80)
    two = np.repeat(rng.standard_normal((2, 13)), [9, 14], axis=0)  # 23 tokens, two identical groups
    feats = [rng.standard_normal((2, 13)), rng.standard_normal((6, 13)), two, rng.standard_normal((97, 13)),
             testing.planted_scene(rng, 53, channels=13).features]
    x, lengths = batch([f.astype(np.float32) for f in feats])
    op = BitmaskOperator(*affinity_fwd(x, lengths, tau=0.2, precision="float64"), lengths, EPS)
    sd = op.degrees.sqrt()
    return op, sd / sd.norm(dim=-1, keepdim=True), lengths


_NEEDS_CUDA = pytest.mark.skipif(DEVICE == "cpu", reason="CUDA graphs need CUDA")


@pytest.mark.parametrize(("mode", "int8"), [("steps", 0), ("persistent", 0),
                                            pytest.param("graph", 0, marks=_NEEDS_CUDA),
                                            ("steps", 1), pytest.param("graph", 1, marks=_NEEDS_CUDA),
                                            ("steps", 2), pytest.param("graph", 2, marks=_NEEDS_CUDA),
                                            ("steps", 3), pytest.param("graph", 3, marks=_NEEDS_CUDA)],
                         ids=["steps", "persistent", "graph", "steps-int8", "graph-int8", "steps-dp4a",
                              "graph-dp4a", "steps-table", "graph-table"])
def test_fused_steps_match_torch_steps(mode, int8):
    # FusedSteps must do exactly what the shared driver's op-by-op step does, branch for branch: the same
    # live slots, step counts, breakdowns and finished problems, and the same numbers to rounding. The
    # chunks (2, 1, 6 steps) make "graph" run eagerly once, then capture and replay two graphs.
    op, y0, lengths = _cycle_problems()
    b, m = y0.shape[0], 9
    idx = torch.arange(b, device=DEVICE)
    v0 = _lanczos.start_vectors(lengths, y0.shape[1], 0, y0.device)
    ours, want = (_lanczos.init_state(y0, lengths, v0, idx, m) for _ in range(2))
    fused = FusedSteps(op, mode)
    fused.begin(ours)
    # several column steps and row blocks per problem; int8: the tensor-core mat-vec in both
    with _utils.override("lanczos", BM=32, BN=32, BS=32), _utils.override("matvec", int8=int8), \
            _utils.override("matvec_int8", BM=32, BN=64, BR=32), _utils.override("matvec_dp4a", BM=32, BW=2, BR=32), \
            _utils.override("matvec_table", BM=32, BW=2, BG=32):
        for j0, j1 in ((0, 2), (2, 3), (3, m)):
            fused.run(j0, j1)
            for j in range(j0, j1):
                _lanczos._torch_step(op, want, j, slice(None), idx)
            for name in ("live", "klen", "done", "stalled"):
                assert torch.equal(getattr(ours, name), getattr(want, name)), (name, j1)
    assert want.stalled[2] and want.done[:2].all() and not want.done[3:].any()  # every branch was taken
    assert fused.mode == mode and (mode != "graph" or fused._graph is not None)
    assert int(want.klen[0]) == 1 and int(want.klen[1]) == 5
    for name in ("alpha", "beta", "basis"):
        torch.testing.assert_close(getattr(ours, name), getattr(want, name), rtol=0, atol=1e-12)


@pytest.mark.parametrize("krylov_dim", [7, 48])
@pytest.mark.parametrize("mode", ["steps", "persistent", pytest.param("graph", marks=_NEEDS_CUDA)])
def test_solve_modes_agree(mode, krylov_dim):
    # The fused solve gives the op-by-op driver's spectrum (convergence checks, revivals after a breakdown
    # and restarts included: a Krylov space of 7 forces restarts; in one of 48 the problems converge at
    # different checks of one cycle).
    op, y0, lengths = _cycle_problems()
    want = _lanczos.lanczos_fiedler(op, y0, lengths, tol=1e-10, max_iter=120, krylov_dim=krylov_dim)
    got = _lanczos.lanczos_fiedler(op, y0, lengths, tol=1e-10, max_iter=120, krylov_dim=krylov_dim,
                                   steps=FusedSteps(op, mode))
    # "persistent" checks itself inside its first cycle (the same decisions, so the same steps), but cannot
    # continue a breakdown there: the rank-2 problem (index 2) finishes in a restart, one step later.
    same = torch.ones_like(want.iterations, dtype=torch.bool)
    if mode == "persistent":
        same[2] = False
        assert 0 < int(got.iterations[2] - want.iterations[2]) <= 3
    assert torch.equal(got.iterations[same], want.iterations[same])
    if krylov_dim == 7:
        assert int(want.iterations.max()) > 7  # restarted
    else:
        assert int(want.iterations[4]) < int(want.iterations.max()) < 48  # frozen at a check, one cycle
    torch.testing.assert_close(got.theta1, want.theta1, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.theta2, want.theta2, rtol=0, atol=1e-10, equal_nan=True)
    align = (got.y * want.y).sum(-1).abs()
    gap = want.theta1 - want.theta2
    assert bool((align[gap > 1e-6] > 1 - 1e-9).all()), align


def test_graph_capture_failure_falls_back_to_launches(monkeypatch):
    # If a CUDA graph cannot be captured, "graph" warns and launches the same kernels one by one, with the
    # cycle's state untouched by the failed capture (captured launches do not run). Simulated: the capture
    # raises before anything runs, as torch does when the stream cannot be captured.
    class FailingCapture:
        def __init__(self, graph):
            pass

        def __enter__(self):
            raise RuntimeError("operation not permitted when stream is capturing")

        def __exit__(self, *exc):
            return False

    op, y0, lengths = _cycle_problems()
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", FailingCapture)
    want = _lanczos.lanczos_fiedler(op, y0, lengths, tol=1e-10, max_iter=40)
    fused = FusedSteps(op, "steps")
    fused.mode = "graph"  # as on a CUDA device (on CPU tensors the constructor picks "steps" itself)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture"):
        got = _lanczos.lanczos_fiedler(op, y0, lengths, tol=1e-10, max_iter=40, steps=fused)
    assert fused.mode == "steps"
    assert torch.equal(got.iterations, want.iterations)
    torch.testing.assert_close(got.theta1, want.theta1, rtol=0, atol=1e-12)


def _eigh_top2(alpha, beta, live, k):
    """Reference for ritz_top2: the dense eigh of ncutfast.backends.lanczos: theta1 >= theta2, |last components|, and
    the top eigenvector."""
    evals, evecs = _lanczos._ritz(alpha, beta, live, k)
    slots = torch.arange(k, device=alpha.device)
    last = torch.where(live[:, :k], slots, torch.full_like(slots, -1)).max(1).values
    top = evecs[:, :, -2:].flip(-1) if k >= 2 else evecs[:, :, -1:].expand(-1, -1, 2)
    theta = evals[:, -2:].flip(-1) if k >= 2 else evals[:, -1:].expand(-1, 2)
    return theta, top.gather(1, last[:, None, None].expand(-1, 1, 2))[:, 0].abs(), evecs[:, :, -1]


@pytest.mark.parametrize("settings", [{}, {"S": 32, "ROUNDS": 11}], ids=["default", "gpu-multisection"])
def test_ritz_top2_matches_eigh(settings):
    # Random tridiagonals (k = 1, 2, 3, 7, 16, 17 of 17 slots) with a live prefix, a dead slot inside, a zero
    # coupling (two blocks) and couplings of 1e-9 (eigenvectors localized anywhere, the last slot included:
    # a one-directional recurrence fails there): Ritz values, last components and the top eigenvector as
    # eigh has them.
    from ncutfast.kernels.ritz import ritz_top2

    g = torch.Generator().manual_seed(90)
    b, m = 6, 17
    alpha = (torch.rand(b, m, dtype=torch.float64, generator=g) * 2 - 1).to(DEVICE)
    beta = (torch.rand(b, m, dtype=torch.float64, generator=g) * 0.5 + 1e-3).to(DEVICE)
    live = torch.ones(b, m, dtype=torch.bool, device=DEVICE)
    live[1, 9:] = False  # stopped early (converged or stalled): a live prefix
    live[2, 4] = False  # stalled at slot 3, revived at slot 5: a dead slot inside
    beta[3, 6] = 0.0  # breakdown: two blocks
    beta[4] = 1e-9  # nearly diagonal
    for k in (1, 2, 3, 7, 16, 17):
        with _utils.override("ritz", **settings):  # the GPU's narrow, many-round multisection too
            theta, s_last, vec = ritz_top2(alpha, beta, live, k, vectors=True)
        want_theta, want_s, want_vec = _eigh_top2(alpha, beta, live, k)
        used = 2 if k >= 2 else 1
        torch.testing.assert_close(theta[:, :used], want_theta[:, :used], rtol=0, atol=1e-13)
        torch.testing.assert_close(s_last[:, :used], want_s[:, :used], rtol=1e-9, atol=1e-15)
        assert vec.shape == (b, k)
        align = (vec * want_vec).sum(-1).abs()
        assert bool((align > 1 - 1e-12).all()), (k, align)
    with pytest.raises(ValueError, match="k="):
        ritz_top2(alpha, beta, live, m + 1)


def test_ritz_top2_on_lanczos_states():
    # The matrices it is made for: after each chunk of a real cycle the device test must decide like the
    # eigh-based one, and |s_last| be accurate down to the tiny values of converged pairs.
    from ncutfast.kernels.ritz import ritz_top2

    op, y0, lengths = _cycle_problems()
    b, m = y0.shape[0], 24
    idx = torch.arange(b, device=DEVICE)
    st = _lanczos.init_state(y0, lengths, _lanczos.start_vectors(lengths, y0.shape[1], 0, y0.device), idx, m)
    fused = FusedSteps(op, "steps")
    fused.begin(st)
    for k in (4, 8, 16, 24):
        fused.run(k - 4, k)
        theta, s_last, vec = ritz_top2(st.alpha, st.beta, st.live, k, vectors=True)
        want_theta, want_s, want_vec = _eigh_top2(st.alpha, st.beta, st.live, k)
        torch.testing.assert_close(theta, want_theta, rtol=0, atol=1e-13)
        ok = st.klen >= 2
        torch.testing.assert_close(s_last[ok], want_s[ok], rtol=1e-9, atol=1e-16)
        assert bool(((vec * want_vec).sum(-1).abs() > 1 - 1e-12).all())
        for tol in (1e-6, 1e-8, 1e-10):
            got = _lanczos.convergence_test(theta, s_last, st.beta, st.live, k, tol)[0]
            assert torch.equal(got, _lanczos._converged(st.alpha, st.beta, st.live, k, tol)[2]), (k, tol)
    assert bool((want_s[:, 0] < 1e-9).any())  # converged pairs were among the cases


def test_unusable_ritz_vectors_fall_back_to_eigh(monkeypatch):
    # A vector that came out non-finite or zero from kernels.ritz (an overflowed recurrence) is recomputed by
    # eigh for its rows alone: the solve still matches the op-by-op driver's.
    op, y0, lengths = _cycle_problems()
    want = _lanczos.lanczos_fiedler(op, y0, lengths, tol=1e-10, max_iter=60)
    fused = FusedSteps(op, "steps")
    real = fused.ritz

    def broken(k, vectors=False):
        out = real(k, vectors)
        if vectors:
            out[2][3] = float("nan")
            out[2][4] = 0.0
        return out

    monkeypatch.setattr(fused, "ritz", broken)
    got = _lanczos.lanczos_fiedler(op, y0, lengths, tol=1e-10, max_iter=60, steps=fused)
    assert torch.equal(got.iterations, want.iterations)
    torch.testing.assert_close(got.theta1, want.theta1, rtol=0, atol=1e-12)
    assert bool(((got.y * want.y).sum(-1).abs()[3:] > 1 - 1e-9).all())


def test_fused_steps_bad_mode_and_state():
    op, y0, lengths = _cycle_problems()
    with pytest.raises(ValueError, match="mode"):
        FusedSteps(op, "cuda-graph")
    st = _lanczos.init_state(y0[:, :-1], lengths, y0[:, :-1], torch.arange(5, device=DEVICE), 4)
    with pytest.raises(ValueError, match="state.basis"):
        FusedSteps(op, "steps").begin(st)


def solve(x: torch.Tensor, lengths: torch.Tensor, tau: float, precision: str, **kw) -> backends.Spectrum:
    return tb.solve(x, lengths, SolveParams(tau, EPS, kw.pop("binary", True), precision, 1e-8,
                                            kw.pop("max_iter", 300)), **kw)


@pytest.mark.parametrize(("precision", "int8", "mode"), [("float32", 0, "steps"), ("fast", 0, "steps"),
                                                         ("float64", 0, "persistent"), ("float32", 1, "torch"),
                                                         ("fast", 3, "steps")])
def test_solve_agrees_with_reference(precision, int8, mode):
    rng = np.random.default_rng(40)
    scenes = [testing.planted_scene(rng, n, channels=40) for n in (12, 35, 64, 97, 120)]
    feats = [s.features for s in scenes]
    x, lengths = batch(feats)
    tau = reference.TOKENCUT_TAU
    with _utils.override("matvec", int8=int8), _utils.override("lanczos", solve=mode):
        spec = solve(x, lengths, tau, precision)
    tol = testing.TOLERANCES[precision]["alignment"]
    compared = 0
    for b, f in enumerate(feats):
        n = f.shape[0]
        ref = reference.ncut(f, tau, EPS)
        d_ref = reference.degrees(reference.affinity(f, tau, EPS))
        xb = spec.x[b, :n].cpu().numpy()
        assert not spec.x[b, n:].any()
        assert bool(spec.converged[b]), float(spec.residual[b])
        np.testing.assert_allclose(float(xb @ (d_ref * xb)), 1.0, rtol=1e-4)  # x^T D x = 1
        partition, _, seed = reference.orient_tokencut(xb)
        agree = testing.compare_to_reference(xb, partition, seed, float(spec.lambda2[b]), ref, d_ref)
        assert agree.alignment >= tol, (b, agree)
        if agree.well_defined:
            compared += 1
            assert agree.same_partition, (b, agree)
            loose = precision == "fast"  # a few threshold flips move the eigenvalues slightly
            assert agree.lambda2_error <= (1e-2 if loose else 1e-9), (b, agree)
            np.testing.assert_allclose(float(spec.lambda3[b]), ref.lambda3, rtol=1e-2 if loose else 1e-7)
    assert compared >= 3


def test_forced_backend_and_small_problems(monkeypatch):
    # NCUTFAST_BACKEND=triton routes "auto" through the kernels on CPU tensors under the interpreter.
    monkeypatch.setenv("NCUTFAST_BACKEND", "triton")
    assert backends.resolve_backend("auto", torch.device(DEVICE))[0] == "triton"
    assert tb.available()
    rng = np.random.default_rng(50)
    feats = [rng.standard_normal((n, 11)).astype(np.float32) for n in (1, 2, 3, 31)]
    x, lengths = batch(feats)
    spec = backends.solve(x, lengths, SolveParams(tau=0.0, eps=EPS, max_iter=100))
    assert np.isnan(float(spec.lambda2[0])) and np.isnan(float(spec.lambda3[0]))
    assert not spec.x[0].any()
    assert np.isnan(float(spec.lambda3[1]))
    for b in (1, 2, 3):
        ref = reference.ncut(feats[b], 0.0, EPS)
        np.testing.assert_allclose(float(spec.lambda2[b]), ref.lambda2, rtol=1e-6, atol=1e-9)


def test_non_binary_graph_uses_the_torch_backend():
    rng = np.random.default_rng(60)
    feats = [testing.planted_scene(rng, n, channels=16).features for n in (20, 30)]
    x, lengths = batch(feats)
    ours = solve(x, lengths, 0.2, "float32", binary=False)
    theirs = backends.solve(x, lengths, SolveParams(tau=0.2, eps=EPS, binary=False), backend="torch")
    assert torch.equal(ours.lambda2, theirs.lambda2) and torch.equal(ours.x, theirs.x)


def test_public_api_runs_through_triton(monkeypatch):
    # Issue 4, item 3: NCUTFAST_BACKEND=triton sends the whole public API through the kernels (CPU tensors
    # under the interpreter, CUDA tensors on a GPU).
    import ncutfast

    monkeypatch.setenv("NCUTFAST_BACKEND", "triton")
    rng = np.random.default_rng(70)
    scenes = [testing.planted_scene(rng, grid=g, channels=24) for g in ((7, 9), (10, 10))]
    feats = [torch.from_numpy(s.features).to(DEVICE) for s in scenes]
    out = ncutfast.ncut(feats)
    assert out.backend == "triton"
    for i, s in enumerate(scenes):
        ref = reference.ncut(s.features)
        if reference.relative_gap(ref.lambda2, ref.lambda3) >= testing.GAP_MIN:
            assert np.array_equal(out.partition[i].cpu().numpy(), ref.partition)
    mc = ncutfast.maskcut(feats[1], scenes[1].grid, n_masks=2)
    ref_mc = reference.maskcut(scenes[1].features, scenes[1].grid, n_masks=2, sign_rule="canonical",
                               similarity_dtype=np.float32)
    gaps = (ref_mc.lambda3 - ref_mc.lambda2) / ref_mc.lambda3
    if np.all(np.isfinite(gaps) & (gaps >= testing.GAP_MIN)):
        assert np.array_equal(mc.masks.cpu().numpy(), reference.subtract_earlier(ref_mc.masks))


@pytest.mark.slow
def test_benchmark_dry_run(tmp_path):
    # benchmarks/bench_triton.py --dry --sweep: the GPU check's benchmark command at tiny shapes under the interpreter
    # (a fresh process: --dry sets TRITON_INTERPRET before the kernels are imported, even on a GPU machine).
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    csv = tmp_path / "bench.csv"
    proc = subprocess.run([sys.executable, "-W", "ignore", os.path.join(root, "benchmarks", "bench_triton.py"),
                           "--dry", "--sweep", "--csv", str(csv)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ncut-persistent" in proc.stdout and "torch.linalg.eigh" in proc.stdout
    # header; float32: affinity, tf32x3, ncut; fast: affinity, ncut, 2 matvecs, 4 fused-step rows, 8 sweep
    # rows, 6 other solve modes (steps-int8, graph, graph-int8, persistent, torch, torch-int8); eigh
    assert len(csv.read_text().splitlines()) == 1 + 3 + (2 + 2 + 4 + 8 + 6) + 1
