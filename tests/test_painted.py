"""The backends' ``painted`` rows (MaskCut's painted tokens, ``backends.contract``): a solve with painted rows
equals, bit for bit, the solve of the features with those rows zeroed, on every backend that runs here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncutfast import _ext, backends
from ncutfast.backends import ext
from ncutfast.backends.contract import SolveParams, check_painted, paint
from ncutfast.reference import NORM_EPS
from ncutfast.testing import planted_scene

FIELDS = ("lambda2", "lambda3", "x", "residual", "converged", "iterations", "recheck_fraction")
CPU_BACKENDS = [b for b in ("torch", "cpu") if backends._load(b) is not None]


def _batch(rng: np.random.Generator, lengths: list[int], c: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A padded batch of planted scenes (padding holds junk) and painted rows: random ones, every row of
    one image, none of another, and a huge and a tiny painted row (outside the extension's raw-product
    norm range) where the image is long enough."""
    n_max = max(lengths)
    feats = torch.from_numpy(rng.normal(size=(len(lengths), n_max, c))).to(dtype)
    painted = torch.from_numpy(rng.uniform(size=(len(lengths), n_max)) < 0.3)
    for b, n in enumerate(lengths):
        feats[b, :n] = torch.from_numpy(planted_scene(rng, n, c).features).to(dtype)
    painted[0] = True
    painted[-1] = False
    b = int(np.argmax(lengths))
    if lengths[b] >= 4 and dtype != torch.float16:
        feats[b, 1] *= 1e30  # its products with itself overflow float32
        feats[b, 2] *= 1e-14
        painted[b, 1:3] = True
    return feats, torch.tensor(lengths), painted


def _assert_same(got: backends.Spectrum, want: backends.Spectrum) -> None:
    for f in FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        if a is None or b is None:
            assert a is None and b is None, f
            continue
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f)


def _solvers() -> list[tuple[str, dict]]:
    out = [(b, {}) for b in CPU_BACKENDS]
    if "cpu" in CPU_BACKENDS:
        out += [("cpu", {"table": False}), ("cpu", {"team": 3})]
    return out


@pytest.mark.parametrize("backend,options", _solvers())
@pytest.mark.parametrize("precision", ["float32", "float64", "fast", "exact"])
@pytest.mark.parametrize("tau", [-0.3, 0.0, 0.15])
def test_painted_rows_solve_as_zero_rows(rng, backend: str, options: dict, precision: str, tau: float) -> None:
    feats, lengths, painted = _batch(rng, [1, 2, 5, 13, 97, 64, 31], 33, torch.float32)
    params = SolveParams(tau, 1e-5, True, precision)
    got = backends.solve(feats, lengths, params, backend=backend, painted=painted, **options)
    want = backends.solve(paint(feats, painted), lengths, params, backend=backend, **options)
    _assert_same(got, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_painted_rows_any_dtype_and_the_non_binary_graph(rng, backend: str, dtype: torch.dtype) -> None:
    feats, lengths, painted = _batch(rng, [7, 2, 41, 1, 23], 5, dtype)
    for binary in (True, False):
        params = SolveParams(0.2, 1e-5, binary, "float32")
        got = backends.solve(feats, lengths, params, backend=backend, painted=painted)
        want = backends.solve(paint(feats, painted), lengths, params, backend=backend)
        _assert_same(got, want)


def test_painted_rows_on_triton_under_the_interpreter(rng) -> None:
    if backends._load("triton") is None:
        pytest.skip("triton cannot run here")
    feats, lengths, painted = _batch(rng, [2, 37, 11, 1], 19, torch.float32)
    for precision in ("float32", "exact"):
        params = SolveParams(0.1, 1e-5, True, precision)
        got = backends.solve(feats, lengths, params, backend="triton", painted=painted)
        want = backends.solve(paint(feats, painted), lengths, params, backend="triton")
        _assert_same(got, want)


def test_bad_painted_names_the_argument() -> None:
    feats = torch.zeros(2, 3, 4)
    with pytest.raises(TypeError, match="^painted: expected a torch.Tensor"):
        check_painted(np.zeros((2, 3), dtype=bool), feats)
    with pytest.raises(TypeError, match="^painted: expected dtype bool"):
        check_painted(torch.zeros(2, 3), feats)
    with pytest.raises(ValueError, match=r"^painted: expected shape \(2, 3\)"):
        check_painted(torch.zeros(2, 4, dtype=torch.bool), feats)
    assert check_painted(None, feats) is None
    for backend in CPU_BACKENDS:
        with pytest.raises(ValueError, match="^painted: expected shape"):
            backends.solve(feats + 1, torch.tensor([3, 2]), SolveParams(0.2, 1e-5), backend=backend,
                           painted=torch.zeros(3, 3, dtype=torch.bool))


@pytest.mark.skipif(not _ext.HAS_CPU_EXT, reason="needs the compiled extension")
def test_packing_reads_inverse_norm_zero_as_a_zero_row(rng) -> None:
    """pack_graph_block_cpu with inverse norm 0 on some rows gives the bits of those rows zeroed (cosine 0:
    an edge iff 0 > tau), also for the rows' own products left unzeroed in the similarity."""
    C = _ext.C
    n, c = 150, 24
    k = torch.from_numpy(rng.normal(size=(n, c)).astype(np.float32))
    zero = torch.from_numpy(rng.uniform(size=n) < 0.25)
    ln = torch.tensor([n])
    words = C.words_per_row(n)
    for tau in (-0.1, 0.0, 0.2):
        bits = []
        for rows, inv in ((k, torch.where(zero, 0.0, 1.0 / k.norm(dim=-1))),
                          (paint(k[None], zero[None])[0], 1.0 / k.norm(dim=-1).clamp_min(NORM_EPS))):
            out = torch.full((1, n, words), -1, dtype=torch.int64)
            for r0 in range(0, n, 64):
                r1 = min(r0 + 64, n)
                blk = (rows[r0:r1] @ rows[r0:].T).contiguous()
                C.pack_graph_block_cpu(blk.data_ptr(), "float32", 1, n, r0, r1 - r0, ln.data_ptr(), tau,
                                       out.data_ptr(), inv_norms=inv[None].contiguous().data_ptr())
            bits.append(out)
        assert torch.equal(bits[0], bits[1])
        row = zero.nonzero()[0, 0]
        assert bool((bits[0][0, row] != 0).any()) == (tau < 0)


def test_cpu_extension_never_copies_features_for_painted_rows(rng, monkeypatch) -> None:
    """On the CPU's binary float32 graph, painted rows in the norm range cost no zeroed copy."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("needs the compiled extension")
    feats = torch.from_numpy(planted_scene(rng, 45, 16).features)[None]
    painted = torch.zeros(1, 45, dtype=torch.bool)
    painted[0, :9] = True
    calls = []
    monkeypatch.setattr(ext, "paint", lambda f, p: calls.append(p) or paint(f, p))
    ext.solve(feats, torch.tensor([45]), SolveParams(0.15, 1e-5), painted=painted)
    assert calls == []
