"""hypothesis fuzzing of the compiled extension's entry points and of the "cpu" backend built on them.

Every bad argument must raise ``TypeError``/``ValueError`` naming it (the extension's checks live in
``csrc/ncutfast.cpp``, the backend's in ``ncutfast.backends``), never crash and never return NaN
silently; valid inputs of any stride, float dtype and awkward size must give finite results. The extension
takes raw addresses, so its fuzzing keeps every buffer at least as large as the sizes it is told (that is
the documented contract: a size larger than its buffer cannot be detected) and makes exactly one argument
bad per example, so the error must name that one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ncutfast import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_CPU_EXT, reason=f"ncutfast._C not built ({_ext.IMPORT_ERROR})")

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Sizes the extension refuses outright (ncutfast.cpp: kMaxTokens, kMaxBatch, kMaxKrylov).
MAX_TOKENS = 1 << 24
MAX_KRYLOV = 4096
BAD_SIZES = st.one_of(st.integers(-(1 << 62), 0), st.integers(min_value=MAX_TOKENS + 1, max_value=1 << 62))
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])

# --------------------------------------------------------------------------------------------------------
# ncutfast._C: scalar arguments against buffers sized for the valid ones
# --------------------------------------------------------------------------------------------------------

CAP_B, CAP_N = 3, 70  # every buffer below holds (CAP_B, CAP_N, ...) whatever the sizes passed


class Buffers:
    """Host buffers big enough for batch <= CAP_B, n_max <= CAP_N, krylov_dim <= 64."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.s32 = torch.from_numpy(rng.uniform(-1, 1, (CAP_B, CAP_N, CAP_N)).astype(np.float32))
        self.s64 = self.s32.double()
        self.bits = torch.zeros(CAP_B, CAP_N, 2, dtype=torch.int64)
        self.lengths = torch.full((CAP_B,), CAP_N, dtype=torch.int64)
        self.inv = torch.ones(CAP_B, CAP_N, dtype=torch.float32)
        self.out = [torch.zeros(CAP_B, CAP_N, dtype=torch.float64) for _ in range(4)]
        self.iters = torch.zeros(CAP_B, dtype=torch.int64)

    def outputs(self) -> dict[str, int]:
        names = ("lambda2", "lambda3", "x", "residual")
        return {k: t.data_ptr() for k, t in zip(names, self.out, strict=True)} | {"iterations": self.iters.data_ptr()}


@st.composite
def one_bad(draw: st.DrawFn, good: dict, bad: dict) -> tuple[dict, str]:
    """``good`` with exactly one entry replaced by a draw from ``bad[name]``; returns (kwargs, name)."""
    name = draw(st.sampled_from(sorted(bad)))
    return good | {name: draw(bad[name])}, name


def _valid_sizes(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    batch = draw(st.integers(1, CAP_B))
    n_max = draw(st.integers(1, CAP_N))
    lengths = draw(st.lists(st.integers(1, n_max), min_size=batch, max_size=batch))
    return batch, n_max, lengths


@FUZZ
@given(data=st.data())
def test_pack_graph_cpu_bad_arguments(data: st.DataObject) -> None:
    buf = Buffers(0)
    batch, n_max, lengths = _valid_sizes(data.draw)
    buf.lengths[:batch] = torch.tensor(lengths)
    good = dict(s=buf.s32.data_ptr(), dtype="float32", batch=batch, n_max=n_max, lengths=buf.lengths.data_ptr(),
                tau=0.2, bits=buf.bits.data_ptr())
    bad = dict(dtype=st.sampled_from(["float16", "int32", "", "Float32", "float"]), batch=BAD_SIZES,
               n_max=BAD_SIZES, tau=NON_FINITE, s=st.just(0), lengths=st.just(0), bits=st.just(0))
    kwargs, name = data.draw(one_bad(good, bad))
    with pytest.raises(ValueError, match=f"^{name}: "):
        _ext.C.pack_graph_cpu(**kwargs)


@FUZZ
@given(data=st.data(), bad_len=st.one_of(st.integers(-(1 << 62), 0), st.integers(CAP_N + 1, 1 << 40)))
def test_lengths_out_of_range(data: st.DataObject, bad_len: int) -> None:
    buf = Buffers(1)
    batch, n_max, lengths = _valid_sizes(data.draw)
    where = data.draw(st.integers(0, batch - 1))
    lengths[where] = bad_len if bad_len <= 0 else n_max + bad_len - CAP_N
    buf.lengths[:batch] = torch.tensor(lengths)
    with pytest.raises(ValueError, match=rf"^lengths: lengths\[{where}\]"):
        _ext.C.pack_graph_cpu(buf.s32.data_ptr(), "float32", batch, n_max, buf.lengths.data_ptr(), 0.2,
                              buf.bits.data_ptr())
    ptrs = buf.outputs()
    with pytest.raises(ValueError, match="^lengths: "):
        _ext.C.solve_binary_cpu(buf.bits.data_ptr(), batch, n_max, buf.lengths.data_ptr(), 1e-5, 1e-8, 10, 4, 2,
                                True, 1, **ptrs)


@FUZZ
@given(data=st.data())
def test_pack_graph_block_cpu_bad_rows(data: st.DataObject) -> None:
    buf = Buffers(2)
    n_max = data.draw(st.integers(65, CAP_N))
    row0 = data.draw(st.sampled_from([-64, -1, 1, 63, 65, n_max, n_max + 64]))
    with pytest.raises(ValueError, match="^row0: "):
        _ext.C.pack_graph_block_cpu(buf.s32.data_ptr(), "float32", 1, n_max, row0, 1, buf.lengths.data_ptr(), 0.2,
                                    buf.bits.data_ptr())
    rows = data.draw(st.sampled_from([0, -5, 1, 63, n_max + 1]))  # row0 + rows: neither a multiple of 64 nor n_max
    buf.lengths[0] = n_max
    with pytest.raises(ValueError, match="^rows: "):
        _ext.C.pack_graph_block_cpu(buf.s32.data_ptr(), "float32", 1, n_max, 0, rows, buf.lengths.data_ptr(), 0.2,
                                    buf.bits.data_ptr())


@FUZZ
@given(data=st.data(), use64=st.booleans())
def test_nan_similarity_raises_only_within_lengths(data: st.DataObject, use64: bool) -> None:
    """A NaN similarity inside a problem raises (its bit would silently be 0); one in the padding is ignored."""
    buf = Buffers(3)
    batch, n_max, lengths = _valid_sizes(data.draw)
    buf.lengths[:batch] = torch.tensor(lengths)
    s = (buf.s64 if use64 else buf.s32)[:batch, :n_max, :n_max].contiguous()
    b = data.draw(st.integers(0, batch - 1))
    i, j = data.draw(st.integers(0, n_max - 1)), data.draw(st.integers(0, n_max - 1))
    s[b, i, j] = math.nan
    inside = i < lengths[b] and j < lengths[b]
    dtype = "float64" if use64 else "float32"

    def call() -> None:
        _ext.C.pack_graph_cpu(s.data_ptr(), dtype, batch, n_max, buf.lengths.data_ptr(), 0.2, buf.bits.data_ptr())

    if inside:
        with pytest.raises(ValueError, match="^s: contains NaN"):
            call()
    else:
        call()
    # The block packer reads only the upper part of its diagonal block: a NaN there (or above) raises.
    if inside and i <= j:
        with pytest.raises(ValueError, match="^s: contains NaN"):
            _ext.C.pack_graph_block_cpu(s.data_ptr(), dtype, batch, n_max, 0, n_max, buf.lengths.data_ptr(), 0.2,
                                        buf.bits.data_ptr())


@FUZZ
@given(data=st.data(), dense=st.booleans())
def test_solvers_bad_arguments(data: st.DataObject, dense: bool) -> None:
    buf = Buffers(4)
    batch, n_max, lengths = _valid_sizes(data.draw)
    buf.lengths[:batch] = torch.tensor(lengths)
    good = dict(batch=batch, n_max=n_max, lengths=buf.lengths.data_ptr(), eps=1e-5, tol=1e-8, max_iter=10,
                krylov_dim=4, check_every=2, team=data.draw(st.integers(0, 3))) | buf.outputs()
    bad = dict(batch=BAD_SIZES, n_max=BAD_SIZES, eps=st.one_of(NON_FINITE, st.floats(max_value=0.0)),
               tol=st.one_of(NON_FINITE, st.floats(max_value=0.0)), max_iter=st.integers(-(1 << 31), 0),
               krylov_dim=st.one_of(st.integers(-(1 << 31), 0), st.integers(MAX_KRYLOV + 1, 1 << 30)),
               check_every=st.integers(-(1 << 31), 0),
               team=st.one_of(st.integers(-(1 << 31), -1), st.integers(_ext.C.MAX_TEAM + 1, (1 << 31) - 1)),
               lengths=st.just(0),
               lambda2=st.just(0), lambda3=st.just(0), x=st.just(0), residual=st.just(0), iterations=st.just(0))
    if dense:
        good |= dict(s=buf.s32.data_ptr(), dtype="float32", tau=0.2)
        bad |= dict(s=st.just(0), tau=NON_FINITE, dtype=st.sampled_from(["float16", "bfloat16", "f4"]))
    else:
        good |= dict(bits=buf.bits.data_ptr(), table=data.draw(st.booleans()))
        bad |= dict(bits=st.just(0))
    kwargs, name = data.draw(one_bad(good, bad))
    fn = _ext.C.solve_dense_cpu if dense else _ext.C.solve_binary_cpu
    with pytest.raises(ValueError, match=f"^{name}: "):
        fn(**kwargs)


@FUZZ
@given(data=st.data())
def test_stray_bits_raise(data: st.DataObject) -> None:
    """A bit at or beyond a problem's length breaks the packed layout the solvers rely on."""
    buf = Buffers(5)
    batch, n_max, lengths = _valid_sizes(data.draw)
    buf.lengths[:batch] = torch.tensor(lengths)
    words = _ext.C.words_per_row(n_max)
    bits = torch.zeros(batch, n_max, words * 8, dtype=torch.uint8)  # little-endian bytes of the words
    b = data.draw(st.integers(0, batch - 1))
    i = data.draw(st.integers(0, n_max - 1))
    first = lengths[b] if i < lengths[b] else 0  # the first column whose bit must be zero in row i
    assume(first < 64 * words)
    j = data.draw(st.integers(first, 64 * words - 1))
    bits[b, i, j // 8] = 1 << (j % 8)
    with pytest.raises(ValueError, match=f"^bits: problem {b} "):
        _ext.C.solve_binary_cpu(bits.data_ptr(), batch, n_max, buf.lengths.data_ptr(), 1e-5, 1e-8, 10, 4, 2, True,
                                1, **buf.outputs())


def test_dense_negative_degrees_raise() -> None:
    """tau < 0 keeps negative similarities as weights: a degree <= 0 has no D^-1/2 and must raise."""
    s = torch.full((1, 5, 5), -0.5, dtype=torch.float64)
    s[0].fill_diagonal_(1.0)
    buf = Buffers(6)
    buf.lengths[0] = 5
    with pytest.raises(ValueError, match="^s: problem 0 has a degree <= 0"):
        _ext.C.solve_dense_cpu(s.data_ptr(), "float64", 1, 5, buf.lengths.data_ptr(), -0.9, 1e-5, 1e-8, 10, 4, 2, 1,
                               **buf.outputs())
    s[0, 0, 1] = math.nan
    with pytest.raises(ValueError, match="^s: problem 0 "):
        _ext.C.solve_dense_cpu(s.data_ptr(), "float64", 1, 5, buf.lengths.data_ptr(), 0.2, 1e-5, 1e-8, 10, 4, 2, 1,
                               **buf.outputs())


@FUZZ
@given(n=BAD_SIZES, m=st.one_of(st.integers(-(1 << 31), 0), st.integers(MAX_KRYLOV + 1, (1 << 31) - 1)))
def test_size_helpers_bad_arguments(n: int, m: int) -> None:
    with pytest.raises(ValueError, match="^n_max: "):
        _ext.C.words_per_row(n)
    with pytest.raises(ValueError, match="^n_max: "):
        _ext.C.workspace_doubles(n, 4)
    with pytest.raises(ValueError, match="^krylov_dim: "):
        _ext.C.workspace_doubles(10, m)
    z = np.zeros(4)
    with pytest.raises(ValueError, match="^m: "):
        _ext.C.tridiagonal_eigh(z.ctypes.data, z.ctypes.data, m, z.ctypes.data)


@FUZZ
@given(value=st.one_of(st.text(max_size=3), st.floats(allow_nan=True), st.none(), st.lists(st.integers(), max_size=2),
                       st.integers(max_value=-1)),
       position=st.integers(0, 6))
def test_wrong_python_types_raise_type_error(value: object, position: int) -> None:
    """pybind11 refuses a wrong type (a float for an int, a negative address, ...) with TypeError."""
    buf = Buffers(7)
    args = [buf.s32.data_ptr(), "float32", 1, 4, buf.lengths.data_ptr(), 0.2, buf.bits.data_ptr()]
    if position == 1 and isinstance(value, str) or position == 5 and isinstance(value, (int, float)):
        value = None  # a str dtype / a number for tau has a valid type: make it a wrong one
    if position in (2, 3) and isinstance(value, int):
        value = float(value)
    args[position] = value
    with pytest.raises(TypeError):
        _ext.C.pack_graph_cpu(*args)


# --------------------------------------------------------------------------------------------------------
# ncutfast.backends.ext.solve: the backend contract
# --------------------------------------------------------------------------------------------------------

GOOD_KW = dict(tau=0.2, eps=1e-5, binary=True, precision="float32", tol=1e-8, max_iter=60)


def _solve(feats: object, lengths: object, *, table: object = True, team: object = 0, **kw: object):
    from ncutfast.backends import SolveParams, ext

    return ext.solve(feats, lengths, SolveParams(**(GOOD_KW | kw)), table=table, team=team)


@st.composite
def feature_batches(draw: st.DrawFn) -> tuple[np.ndarray, list[int]]:
    """(B, N_max, C) float32 features in clustered directions (so graphs have edges), awkward sizes."""
    batch = draw(st.integers(1, 3))
    n_max = draw(st.sampled_from([1, 2, 3, 31, 33, 63, 64, 65, 97]))
    channels = draw(st.integers(1, 9))
    lengths = draw(st.lists(st.integers(1, n_max), min_size=batch, max_size=batch))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    centers = rng.standard_normal((3, channels))
    feats = centers[rng.integers(0, 3, (batch, n_max))] + 0.4 * rng.standard_normal((batch, n_max, channels))
    feats *= rng.uniform(0.1, 10.0, (batch, n_max, 1))
    return feats.astype(np.float32), lengths


BAD_BACKEND_ARGS = dict(
    tau=st.one_of(NON_FINITE, st.sampled_from([-1.0, 1.0, 1.5, -7.0]), st.just("0.2"), st.none(), st.just(True)),
    eps=st.one_of(NON_FINITE, st.floats(max_value=0.0), st.just("1e-5"), st.none()),
    binary=st.sampled_from([1, 0, None, "yes", np.bool_(True)]),
    precision=st.sampled_from(["float16", "", "FLOAT32", None, 3]),
    tol=st.one_of(NON_FINITE, st.floats(max_value=0.0), st.just(True), st.just("1e-8")),
    max_iter=st.one_of(st.integers(max_value=0), st.just(2.5), st.just(True), st.just("60")),
    team=st.one_of(st.integers(max_value=-1), st.integers(min_value=1025), st.just(1.5)),
    table=st.sampled_from([1, None, "True"]),
)


@FUZZ
@given(batch=feature_batches(), data=st.data())
def test_backend_bad_scalars_name_the_argument(batch: tuple[np.ndarray, list[int]], data: st.DataObject) -> None:
    feats, lengths = batch
    name = data.draw(st.sampled_from(sorted(BAD_BACKEND_ARGS)))
    value = data.draw(BAD_BACKEND_ARGS[name])
    with pytest.raises((TypeError, ValueError), match=f"^{name}: "):
        _solve(torch.from_numpy(feats), torch.tensor(lengths), **{name: value})


@FUZZ
@given(batch=feature_batches(), data=st.data())
def test_backend_bad_arrays_name_the_argument(batch: tuple[np.ndarray, list[int]], data: st.DataObject) -> None:
    feats, lengths = batch
    f, ln = torch.from_numpy(feats), torch.tensor(lengths)
    bsz, n_max, ch = f.shape
    cases = {
        "feats": [feats, f.tolist(), None, f[0], f[None], f.to(torch.int32), f > 0, f.to(torch.complex64),
                  torch.empty(0, n_max, ch), torch.empty(bsz, 0, ch), torch.empty(bsz, n_max, 0),
                  f.to("meta")],
        "lengths": [lengths, np.array(lengths), ln.double(), ln > 0, ln[None], torch.cat([ln, ln]), ln * 0,
                    ln - n_max - 1, ln + n_max, torch.empty(0, dtype=torch.int64)],
    }
    name = data.draw(st.sampled_from(sorted(cases)))
    value = data.draw(st.sampled_from(cases[name]))
    args = (value, ln) if name == "feats" else (f, value)
    with pytest.raises((TypeError, ValueError), match=f"^{name}: "):
        _solve(*args)


@FUZZ
@given(batch=feature_batches(), data=st.data(), binary=st.booleans())
def test_backend_non_finite_features_raise(batch: tuple[np.ndarray, list[int]], data: st.DataObject,
                                           binary: bool) -> None:
    """NaN/inf inside a problem raises; the same values in the padding are ignored (finite results)."""
    feats, lengths = batch
    b = data.draw(st.integers(0, len(lengths) - 1))
    i = data.draw(st.integers(0, feats.shape[1] - 1))
    c = data.draw(st.integers(0, feats.shape[2] - 1))
    feats[b, i, c] = data.draw(NON_FINITE)
    if i < lengths[b]:
        with pytest.raises(ValueError, match="^feats: contains NaN or inf"):
            _solve(torch.from_numpy(feats), torch.tensor(lengths), binary=binary)
    else:
        _check_finite(_solve(torch.from_numpy(feats), torch.tensor(lengths), binary=binary), lengths)


def _check_finite(sp, lengths: list[int]) -> None:
    for b, n in enumerate(lengths):
        assert int(sp.iterations[b]) >= 0
        assert torch.isfinite(sp.x[b]).all()
        assert bool((sp.x[b, n:] == 0).all())
        if n >= 2:
            assert math.isfinite(float(sp.lambda2[b])) and math.isfinite(float(sp.residual[b]))
        if n >= 3:
            assert math.isfinite(float(sp.lambda3[b]))


def _strided(f: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as f in another memory layout."""
    if layout == "channels_first":
        return f.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "every_other":
        wide = torch.zeros(f.shape[0], f.shape[1], 2 * f.shape[2], dtype=f.dtype)
        wide[:, :, ::2] = f
        return wide[:, :, ::2]
    if layout == "batch_last":
        return f.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return f


@FUZZ
@given(batch=feature_batches(), layout=st.sampled_from(["channels_first", "every_other", "batch_last"]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       binary=st.booleans(), precision=st.sampled_from(["float32", "float64", "fast"]))
def test_backend_any_strides_and_dtypes(batch: tuple[np.ndarray, list[int]], layout: str, dtype: torch.dtype,
                                        binary: bool, precision: str) -> None:
    """Valid inputs in any layout and float dtype give finite results equal to a contiguous copy's."""
    feats, lengths = batch
    f = torch.from_numpy(feats).to(dtype)
    ln = torch.tensor(lengths, dtype=torch.int32)
    got = _solve(_strided(f, layout), ln, binary=binary, precision=precision)
    _check_finite(got, lengths)
    want = _solve(f.contiguous(), ln, binary=binary, precision=precision)
    # Strides change the product's rounding (not its threshold decisions, short of a 1-ulp tie at tau): the
    # spectrum agrees to rounding (a non-binary graph is continuous in S: float32 rounding moves eigenvalues
    # by ~1e-7 absolute), the residual (a convergence measure) is only small in both.
    atol = 1e-6 if not binary and precision != "float64" else 1e-8
    for field in ("lambda2", "lambda3"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=atol,
                                   equal_nan=True)
    assert bool((got.residual[torch.tensor(lengths) >= 2] <= 1e-6).all())


def test_backend_non_binary_negative_tau_and_zero_degree_raise() -> None:
    """Non-binary graphs keep similarities >= tau as weights: tau < 0 would make anti-aligned tokens'
    weights negative (here a degree < 0) and is refused, as by the reference; with tau = 0 an all-zero row
    has degree 0 and no D^-1/2."""
    angles = torch.tensor([0.0, 100.0, 110.0, 120.0]).deg2rad()  # row 0: 1 + cos 100 + cos 110 + cos 120 < 0
    feats = torch.stack([angles.cos(), angles.sin()], dim=-1)[None]
    with pytest.raises(ValueError, match="^tau: must be >= 0 for a non-binary graph"):
        _solve(feats, torch.tensor([4]), tau=-0.95, binary=False)
    _check_finite(_solve(feats, torch.tensor([4]), tau=-0.95, binary=True), [4])
    feats[0, 2] = 0.0
    with pytest.raises(ValueError, match="degree <= 0"):
        _solve(feats, torch.tensor([4]), tau=0.0, binary=False)


@FUZZ
@given(m=st.integers(1, 48), where=st.integers(0, 47), bad=NON_FINITE, in_diag=st.booleans())
def test_tridiagonal_non_finite_raises(m: int, where: int, bad: float, in_diag: bool) -> None:
    rng = np.random.default_rng(m)
    diag, off, z = rng.uniform(-1, 1, m), rng.uniform(-1, 1, m), np.empty((m, m))
    where %= m if in_diag or m == 1 else m - 1  # off[m - 1] is ignored
    (diag if in_diag or m == 1 else off)[where] = bad
    name = "diag" if in_diag or m == 1 else "off"
    with pytest.raises(ValueError, match=f"^{name}: entry {where} "):
        _ext.C.tridiagonal_eigh(diag.ctypes.data, off.ctypes.data, m, z.ctypes.data)


@FUZZ
@given(data=st.data(), bad=st.one_of(NON_FINITE, st.floats(-1e30, -1e-30)), use64=st.booleans())
def test_bad_inverse_norms_raise(data: st.DataObject, bad: float, use64: bool) -> None:
    """pack_graph_block_cpu's inverse norms must be >= 0 (0: a zero row) and finite where read (within the
    lengths)."""
    buf = Buffers(8)
    batch, n_max, lengths = _valid_sizes(data.draw)
    buf.lengths[:batch] = torch.tensor(lengths)
    inv = torch.ones(batch, n_max, dtype=torch.float64 if use64 else torch.float32)
    b = data.draw(st.integers(0, batch - 1))
    i = data.draw(st.integers(0, n_max - 1))
    inv[b, i] = bad
    s = (buf.s64 if use64 else buf.s32)[:batch, :n_max, :n_max].contiguous()

    def call() -> None:
        _ext.C.pack_graph_block_cpu(s.data_ptr(), "float64" if use64 else "float32", batch, n_max, 0, n_max,
                                    buf.lengths.data_ptr(), 0.2, buf.bits.data_ptr(), inv_norms=inv.data_ptr())

    if i < lengths[b]:
        with pytest.raises(ValueError, match=rf"^inv_norms: entry \[{b}, {i}\]"):
            call()
    else:
        call()
