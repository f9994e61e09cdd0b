"""ncutfast._C's CPU kernels and the "cpu" backend against ncutfast.reference.

The solver's algorithm (csrc/ncut/lanczos.h) is the one the CUDA kernels run; ``table=False`` also runs
the GPU's per-word mat-vec math, so these tests cover the shared code on a machine without a GPU.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from ncutfast import _ext, backends, reference
from ncutfast.backends import SolveParams, ext
from ncutfast.reference import relative_gap
from ncutfast.testing import GAP_MIN, TOLERANCES, d_alignment, planted_scene

pytestmark = pytest.mark.skipif(not _ext.HAS_CPU_EXT, reason=f"ncutfast._C not built ({_ext.IMPORT_ERROR})")

SIZES = [1, 2, 3, 7, 31, 97, 211, 400]
TOL = 1e-8


def solve(feats: torch.Tensor, lengths: torch.Tensor, *, table: bool = True, team: int = 0,
          **params: object) -> backends.Spectrum:
    """The "cpu" backend with the parameters as keywords."""
    return ext.solve(feats, lengths, SolveParams(**params), table=table, team=team)


def test_extension_present_when_required() -> None:
    """CI sets NCUTFAST_REQUIRE_EXT=1 so that a missing build fails instead of skipping everything, and a
    machine with nvcc must have compiled the CUDA kernels (a CUDA compile error fails the build)."""
    if os.environ.get("NCUTFAST_REQUIRE_EXT", "") in ("", "0"):
        pytest.skip("NCUTFAST_REQUIRE_EXT not set")
    assert _ext.HAS_CPU_EXT, _ext.IMPORT_ERROR
    if shutil.which("nvcc") and os.environ.get("NCUTFAST_NO_CUDA", "") in ("", "0"):
        assert _ext.HAS_CUDA_EXT


def _unpack(bits: torch.Tensor, n: int) -> np.ndarray:
    """(B, N, words) int64 words -> (B, N, n) bool, bit j % 64 of word j // 64."""
    raw = bits.numpy().view(np.uint64)
    shifts = np.arange(64, dtype=np.uint64)
    expanded = (raw[..., None] >> shifts) & np.uint64(1)
    return expanded.reshape(*raw.shape[:2], -1)[..., :n].astype(bool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lengths", [[1], [2, 1], [63, 64, 65], [97, 13, 130]])
def test_pack_graph_matches_threshold(rng: np.random.Generator, dtype: torch.dtype, lengths: list[int]) -> None:
    C = _ext.C
    n_max = max(lengths)
    s = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(len(lengths), n_max, n_max))).to(dtype)
    tau = float(s[0, 0, 0])  # a value that occurs exactly: checks the strict '>'
    ln = torch.tensor(lengths, dtype=torch.int64)
    bits = torch.full((len(lengths), n_max, C.words_per_row(n_max)), -1, dtype=torch.int64)
    C.pack_graph_cpu(s.data_ptr(), str(dtype).removeprefix("torch."), len(lengths), n_max, ln.data_ptr(), tau,
                     bits.data_ptr())
    got = _unpack(bits, C.words_per_row(n_max) * 64)
    for b, n in enumerate(lengths):
        want = np.zeros((n_max, got.shape[-1]), dtype=bool)
        want[:n, :n] = (s[b, :n, :n] > tau).numpy()
        np.testing.assert_array_equal(got[b], want)


@pytest.mark.parametrize("block", [64, 128, 192])
@pytest.mark.parametrize("lengths", [[1], [2, 1], [63, 200, 129], [130, 64, 65]])
def test_pack_graph_block_mirrors_upper_part(rng: np.random.Generator, block: int, lengths: list[int]) -> None:
    """Row blocks of the upper part give pack_graph_cpu's bits of the symmetrized matrix (upper mirrored)."""
    C = _ext.C
    n_max = max(lengths)
    s = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(len(lengths), n_max, n_max)).astype(np.float32))
    upper = torch.triu(s) + torch.triu(s, 1).transpose(1, 2)  # S_ij := S_min(i,j),max(i,j)
    ln = torch.tensor(lengths, dtype=torch.int64)
    words = C.words_per_row(n_max)
    want = torch.empty(len(lengths), n_max, words, dtype=torch.int64)
    C.pack_graph_cpu(upper.contiguous().data_ptr(), "float32", len(lengths), n_max, ln.data_ptr(), 0.3,
                     want.data_ptr())
    got = torch.full_like(want, -1)
    for r0 in range(0, n_max, block):
        r1 = min(r0 + block, n_max)
        blk = s[:, r0:r1, r0:].contiguous()  # the lower part of the diagonal block must be ignored
        C.pack_graph_block_cpu(blk.data_ptr(), "float32", len(lengths), n_max, r0, r1 - r0, ln.data_ptr(), 0.3,
                               got.data_ptr())
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="row0"):
        C.pack_graph_block_cpu(blk.data_ptr(), "float32", len(lengths), n_max, 1, 1, ln.data_ptr(), 0.3,
                               got.data_ptr())


@pytest.mark.parametrize("m", [1, 2, 7, 48])
def test_tridiagonal_eigh(rng: np.random.Generator, m: int) -> None:
    diag = rng.uniform(-1.0, 1.0, m)
    off = rng.uniform(-0.5, 0.5, m)
    off[rng.uniform(size=m) < 0.2] = 0.0  # split blocks, as breakdowns produce
    t = np.diag(diag) + np.diag(off[: m - 1], 1) + np.diag(off[: m - 1], -1)
    d, e, z = diag.copy(), off.copy(), np.empty((m, m))
    assert _ext.C.tridiagonal_eigh(d.ctypes.data, e.ctypes.data, m, z.ctypes.data)
    np.testing.assert_allclose(np.sort(d), np.linalg.eigvalsh(t), atol=1e-13)
    np.testing.assert_allclose(t @ z, z * d[None, :], atol=1e-12)
    np.testing.assert_allclose(z.T @ z, np.eye(m), atol=1e-12)


@pytest.mark.parametrize("m", [1, 2, 7, 48])
@pytest.mark.parametrize("exponent", [1024, -1000])
def test_tridiagonal_eigh_extreme_magnitudes(rng: np.random.Generator, m: int, exponent: int) -> None:
    """Entries near DBL_MAX (or tiny ones) are decomposed as the same matrix at unit scale would be. Near
    DBL_MAX, |d_i| + |d_i+1| overflowed QL's split test and the diagonal came back unchanged with ok=True;
    the eigenvalues here are representable (Gershgorin: |lambda| <= 0.95 * 2^1024)."""
    diag = rng.uniform(0.5, 0.55, m) * rng.choice([-1.0, 1.0], m)
    off = rng.uniform(-0.2, 0.2, m)
    t = np.diag(diag) + np.diag(off[: m - 1], 1) + np.diag(off[: m - 1], -1)
    d, e, z = np.ldexp(diag, exponent), np.ldexp(off, exponent), np.empty((m, m))
    assert _ext.C.tridiagonal_eigh(d.ctypes.data, e.ctypes.data, m, z.ctypes.data)
    lam = np.ldexp(d, -exponent)
    np.testing.assert_allclose(np.sort(lam), np.linalg.eigvalsh(t), atol=1e-13)
    np.testing.assert_allclose(t @ z, z * lam[None, :], atol=1e-12)
    np.testing.assert_allclose(z.T @ z, np.eye(m), atol=1e-12)


def test_tridiagonal_eigh_overflowing_eigenvalues_raise() -> None:
    """Finite entries whose eigenvalues exceed float64's range (here 3e308) cannot be returned: ValueError."""
    d, e, z = np.array([1.5e308, 1.5e308]), np.array([1.5e308, 0.0]), np.empty((2, 2))
    with pytest.raises(ValueError, match="^diag: eigenvalue 1 overflows float64"):
        _ext.C.tridiagonal_eigh(d.ctypes.data, e.ctypes.data, 2, z.ctypes.data)


@pytest.mark.parametrize("team", [1025, 32768, 100000, (1 << 31) - 1])
def test_team_is_bounded(team: int) -> None:
    """Teams far beyond a thread block aborted in libgomp (32768) or crashed (100000): ValueError now."""
    bits = torch.zeros(1, 3, 1, dtype=torch.int64)
    s = torch.eye(3, dtype=torch.float64)[None]
    lengths = torch.tensor([3])
    outs = [torch.zeros(1, 3, dtype=torch.float64) for _ in range(4)]
    kw = dict(tol=1e-8, max_iter=10, krylov_dim=4, check_every=2, team=team, lambda2=outs[0].data_ptr(),
              lambda3=outs[1].data_ptr(), x=outs[2].data_ptr(), residual=outs[3].data_ptr(),
              iterations=torch.zeros(1, dtype=torch.int64).data_ptr())
    match = rf"^team: must be in \[0, {_ext.C.MAX_TEAM}\], got {team}"
    with pytest.raises(ValueError, match=match):
        _ext.C.solve_binary_cpu(bits.data_ptr(), 1, 3, lengths.data_ptr(), 1e-5, table=True, **kw)
    with pytest.raises(ValueError, match=match):
        _ext.C.solve_dense_cpu(s.data_ptr(), "float64", 1, 3, lengths.data_ptr(), 0.2, 1e-5, **kw)
    with pytest.raises(ValueError, match=match):
        solve(torch.ones(1, 3, 2), lengths, tau=0.2, eps=1e-5, binary=True, precision="float32", tol=1e-8,
              max_iter=10, team=team)


def _scene(rng: np.random.Generator, n: int, channels: int = 24) -> np.ndarray:
    if n < 4:
        return rng.standard_normal((n, channels)).astype(np.float32) + 0.3
    return planted_scene(rng, n, channels).features


def _check_against_reference(k: np.ndarray, sp: backends.Spectrum, b: int, *, binary: bool,
                             precision: str) -> None:
    n = k.shape[0]
    sim = np.float64 if precision == "float64" else np.float32
    tau = 0.2
    w = reference.affinity(k, tau, 1e-5, binary=binary, similarity_dtype=sim)
    lam2, lam3, x_ref = reference.fiedler(w)
    d = reference.degrees(w)
    x = sp.x[b].numpy()
    assert np.all(x[n:] == 0.0)
    if n == 1:
        assert np.isnan(float(sp.lambda2[b])) and np.isnan(float(sp.lambda3[b])) and x[0] == 0.0
        return
    # A non-binary float32 graph is continuous in S: torch's and NumPy's float32 rounding differ by ~1e-7.
    rel = 1e-6 if not binary and precision != "float64" else 1e-9
    assert float(sp.lambda2[b]) == pytest.approx(lam2, rel=rel, abs=1e-10)
    if n >= 3:
        assert float(sp.lambda3[b]) == pytest.approx(lam3, rel=1e-4, abs=1e-8)
    else:
        assert np.isnan(float(sp.lambda3[b]))
    assert float(np.sum(d * x[:n] ** 2)) == pytest.approx(1.0, rel=rel)
    assert float(sp.residual[b]) <= TOL
    gap = relative_gap(lam2, lam3)
    if gap >= GAP_MIN:
        assert d_alignment(x[:n], x_ref, d) >= TOLERANCES[precision]["alignment"]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("table", [True, False])
def test_binary_matches_reference(rng: np.random.Generator, n: int, table: bool) -> None:
    k = _scene(rng, n)
    sp = solve(torch.from_numpy(k)[None], torch.tensor([n]), tau=0.2, eps=1e-5, binary=True,
               precision="float32", tol=TOL, max_iter=300, table=table)
    _check_against_reference(k, sp, 0, binary=True, precision="float32")


@pytest.mark.parametrize("n", [2, 5, 97, 211])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_dense_matches_reference(rng: np.random.Generator, n: int, precision: str) -> None:
    k = _scene(rng, n)
    sp = solve(torch.from_numpy(k)[None], torch.tensor([n]), tau=0.2, eps=1e-5, binary=False,
               precision=precision, tol=TOL, max_iter=300)
    _check_against_reference(k, sp, 0, binary=False, precision=precision)


def test_ragged_batch_matches_single_problems(rng: np.random.Generator) -> None:
    """A padded batch gives each problem's lone result."""
    lengths = [97, 1, 1031, 2, 50, 7]
    n_max = max(lengths)
    feats = torch.from_numpy(rng.standard_normal((len(lengths), n_max, 24)).astype(np.float32))
    scenes = [_scene(rng, n) for n in lengths]
    for b, k in enumerate(scenes):
        feats[b, : k.shape[0]] = torch.from_numpy(k)
    kw = dict(tau=0.2, eps=1e-5, binary=True, precision="float64", tol=TOL, max_iter=300)
    batched = solve(feats, torch.tensor(lengths), **kw)
    for b, (k, n) in enumerate(zip(scenes, lengths, strict=True)):
        _check_against_reference(k, batched, b, binary=True, precision="float64")
        single = solve(torch.from_numpy(k)[None], torch.tensor([n]), **kw)
        if n > 1:
            assert float(batched.lambda2[b]) == pytest.approx(float(single.lambda2[0]), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("team", [2, 3])
def test_team_matches_single_thread(rng: np.random.Generator, binary: bool, team: int) -> None:
    """Teams synchronize like the GPU's thread blocks (begin/end partitions, barriers, fixed-order sums):
    every problem must come out as a single thread solves it, up to the order of the sums."""
    lengths = [2, 3, 31, 200, 67]
    feats = torch.zeros(len(lengths), max(lengths), 24)
    for b, n in enumerate(lengths):
        feats[b, :n] = torch.from_numpy(_scene(rng, n))
    kw = dict(tau=0.2, eps=1e-5, binary=binary, precision="float64", tol=TOL, max_iter=300)
    one = solve(feats, torch.tensor(lengths), team=1, **kw)
    many = solve(feats, torch.tensor(lengths), team=team, **kw)
    torch.testing.assert_close(many.lambda2, one.lambda2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(many.lambda3, one.lambda3, rtol=1e-6, atol=1e-10, equal_nan=True)
    for b, n in enumerate(lengths):
        d_align = d_alignment(many.x[b, :n].numpy(), one.x[b, :n].numpy(), np.ones(n))
        assert d_align == pytest.approx(1.0, abs=1e-6)
    assert bool((many.residual <= TOL).all())


@pytest.mark.parametrize("binary", [True, False])
def test_chunked_batch_matches_one_chunk(rng: np.random.Generator, monkeypatch, binary: bool) -> None:
    """Tiny memory budgets: one problem per similarity chunk, one thread's worth per solver call."""
    lengths = [40, 7, 33, 1, 40]
    feats = torch.zeros(len(lengths), 41, 16)
    for b, n in enumerate(lengths):
        feats[b, :n] = torch.from_numpy(_scene(rng, n, 16))
    kw = dict(tau=0.2, eps=1e-5, binary=binary, precision="float32", tol=TOL, max_iter=300)
    whole = solve(feats, torch.tensor(lengths), **kw)
    monkeypatch.setattr(ext.SETTINGS["cpu"], "memory_budget", 1)
    monkeypatch.setattr(ext.SETTINGS["cpu"], "graph_budget", 1)
    parts = solve(feats, torch.tensor(lengths), **kw)
    assert parts.x.shape == (len(lengths), 41)
    for field in ("lambda2", "lambda3", "x", "residual", "iterations"):
        torch.testing.assert_close(getattr(parts, field), getattr(whole, field), rtol=0, atol=0, equal_nan=True)


def test_maskcut_painted_tokens(rng: np.random.Generator) -> None:
    """Zeroed keys (MaskCut's painted tokens) are almost disconnected and share one value of x."""
    k = planted_scene(rng, 143, 32).features
    k[:40] = 0.0
    sp = solve(torch.from_numpy(k)[None], torch.tensor([143]), tau=0.15, eps=1e-5, binary=True,
               precision="float32", tol=TOL, max_iter=300)
    w = reference.affinity(k, 0.15, 1e-5, similarity_dtype=np.float32)
    lam2, _, _ = reference.fiedler(w)
    assert float(sp.lambda2[0]) == pytest.approx(lam2, rel=1e-7, abs=1e-10)
    x = sp.x[0].numpy()
    np.testing.assert_allclose(x[:40], x[0], rtol=1e-6, atol=1e-12)


def test_dispatch_selects_cpu_extension() -> None:
    name, _ = backends.resolve_backend("auto", torch.device("cpu"))
    assert name == "cpu"
    assert "cpu" in backends.available_backends()


def test_no_gpu_reports_instead_of_raising() -> None:
    if _ext.HAS_CUDA_EXT:
        count, err, msg = _ext.C.cuda_device_count()
        assert count >= 0 and isinstance(err, int) and isinstance(msg, str)
        if count == 0:
            assert not _ext.cuda_device_available()
    if not _ext.cuda_device_available():
        with pytest.raises(RuntimeError, match="backend"):
            backends.resolve_backend("cuda", torch.device("cpu"))


def test_bad_arguments_name_the_argument() -> None:
    C = _ext.C
    s = torch.zeros(1, 3, 3)
    bits = torch.zeros(1, 3, 1, dtype=torch.int64)
    bad_len = torch.tensor([4])
    with pytest.raises(ValueError, match="lengths"):
        C.pack_graph_cpu(s.data_ptr(), "float32", 1, 3, bad_len.data_ptr(), 0.2, bits.data_ptr())
    ok_len = torch.tensor([3])
    with pytest.raises(ValueError, match="dtype"):
        C.pack_graph_cpu(s.data_ptr(), "float16", 1, 3, ok_len.data_ptr(), 0.2, bits.data_ptr())
    with pytest.raises(ValueError, match="tau"):
        C.pack_graph_cpu(s.data_ptr(), "float32", 1, 3, ok_len.data_ptr(), float("nan"), bits.data_ptr())
    outs = [torch.zeros(1, dtype=torch.float64) for _ in range(4)] + [torch.zeros(1, dtype=torch.int64)]
    ptrs = dict(zip(("lambda2", "lambda3", "x", "residual", "iterations"), (t.data_ptr() for t in outs),
                    strict=True))
    for arg, value in (("tol", 0.0), ("max_iter", 0), ("krylov_dim", 0), ("check_every", 0)):
        kw = dict(tol=1e-8, max_iter=10, krylov_dim=4, check_every=2) | {arg: value}
        with pytest.raises(ValueError, match=arg):
            C.solve_binary_cpu(bits.data_ptr(), 1, 3, ok_len.data_ptr(), 1e-5, table=True, team=1, **kw, **ptrs)
    with pytest.raises(ValueError, match="team"):
        C.solve_binary_cpu(bits.data_ptr(), 1, 3, ok_len.data_ptr(), 1e-5, 1e-8, 10, 4, 2, True, -1, **ptrs)
    with pytest.raises(ValueError, match="^x: null pointer"):
        C.solve_binary_cpu(bits.data_ptr(), 1, 3, ok_len.data_ptr(), 1e-5, 1e-8, 10, 4, 2, True, 1,
                           ptrs["lambda2"], ptrs["lambda3"], 0, ptrs["residual"], ptrs["iterations"])
    with pytest.raises(ValueError, match="feats"):
        solve(torch.zeros(1, 3, 2, device="meta"), torch.tensor([3]), tau=0.2, eps=1e-5, binary=True,
              precision="float32", tol=1e-8, max_iter=10)


@pytest.mark.parametrize("n", [50, 1100])
def test_degenerate_spectrum(n: int) -> None:
    """Identical features: W = 1 1^T and every eigenvalue but the first is 1 (breakdown at every step)."""
    sp = solve(torch.ones(1, n, 8), torch.tensor([n]), tau=0.2, eps=1e-5, binary=True, precision="float32",
               tol=TOL, max_iter=40)
    assert float(sp.lambda2[0]) == pytest.approx(1.0, abs=1e-12)
    assert float(sp.lambda3[0]) == pytest.approx(1.0, abs=1e-12)
    assert not bool(sp.converged[0])  # no eigengap: the eigenvector is not determined


@pytest.mark.parametrize("n", [1, 2, 31, 32, 33, 63, 64, 65, 1201])
def test_bitmask_and_degrees_from_raw_features_match_reference(rng: np.random.Generator, n: int) -> None:
    """The backend's path (raw dot products, cosine test through inverse norms, upper part mirrored) gives the
    reference's W and d exactly with a float64 similarity; entries within rounding of tau may flip (the
    scaled test rounds once more than the reference): every flip must be such an entry."""
    C = _ext.C
    k = _scene(rng, n, 40).astype(np.float64)
    k[rng.uniform(size=n) < 0.05] = 0.0  # painted tokens: zero rows, inverse norm clamped at 1e12
    kt = torch.from_numpy(k)
    inv = (1.0 / torch.linalg.vector_norm(kt, dim=-1).clamp_min(1e-12))[None].contiguous()
    ln = torch.tensor([n])
    words = C.words_per_row(n)
    bits = torch.full((1, n, words), -1, dtype=torch.int64)
    for r0 in range(0, n, 128):
        r1 = min(r0 + 128, n)
        blk = (kt[r0:r1] @ kt[r0:].T).contiguous()
        C.pack_graph_block_cpu(blk.data_ptr(), "float64", 1, n, r0, r1 - r0, ln.data_ptr(), 0.2, bits.data_ptr(),
                               inv_norms=inv.data_ptr())
    got = _unpack(bits, words * 64)[0]
    assert not got[:, n:].any()
    w = reference.affinity(k, 0.2, 1e-5, similarity_dtype=np.float64)
    want = w == 1.0
    f = reference.normalize_rows(k)
    s = f @ f.T
    flips = got[:, :n] != want
    assert np.all(np.abs(s[flips] - 0.2) <= 1e-14), "a flipped entry is not within rounding of tau"
    assert flips.sum() <= max(2, 1e-6 * n * n)
    assert np.array_equal(got[:, :n], got[:, :n].T)  # exactly symmetric whatever the product's rounding
    if not flips.any():  # the solver's degrees, eps n + (1 - eps) popcount, against W 1 (a float64 sum)
        popcount = got[:, :n].sum(axis=1)
        np.testing.assert_allclose(1e-5 * n + (1 - 1e-5) * popcount, reference.degrees(w), rtol=1e-13)


_PEAK_MEMORY_CHILD = """
import ctypes, gc, json
import numpy as np, torch
from ncutfast.backends import SolveParams, ext
from ncutfast.testing import planted_scene

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key))

k = torch.from_numpy(planted_scene(np.random.default_rng(3), 3600, 768).features)[None]
kw = SolveParams(tau=0.2, eps=1e-5, binary=True, precision="float32", tol=1e-8, max_iter=300)
ext.solve(k, torch.tensor([3600]), kw)  # warm-up: BLAS and OpenMP buffers
deltas = []
for _ in range(3):
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM (peak RSS) to the current RSS
    base = status("VmRSS:")
    sp = ext.solve(k, torch.tensor([3600]), kw)
    deltas.append(status("VmHWM:") - base)
    del sp
print(json.dumps(deltas))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_at_3600_tokens_stays_below_8_mb() -> None:
    """No N x N float matrix: one 3600-token, 768-channel image needs <= 8 MB beyond its features (measured
    4.1 MB: 1.6 MB of bits, a 2.8 MB similarity block, then 2.5 MB of solver vectors and tables). Measured as
    the peak-RSS rise of one solve in a fresh interpreter, large blocks mmapped (returned on free)."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_CHILD], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    deltas = json.loads(proc.stdout.strip().splitlines()[-1])
    assert min(deltas) <= 8 * 2**20, f"peak RSS rise per solve: {[d / 2**20 for d in deltas]} MB"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("scale", [1e-30, 1e-13, 1e13, 1e30])
def test_extreme_row_norms_fall_back_to_normalized_features(rng: np.random.Generator, scale: float) -> None:
    """Rows whose float32 dot products could under- or overflow (one row scaled here) take the normalized
    path and still give the reference's cut. At 1e30 the float32 norm itself overflows, in the reference too
    (its warning is expected): both then treat the row as a zero row."""
    k = _scene(rng, 143)
    k[5] *= np.float32(scale)
    assert np.isfinite(k).all()
    sp = solve(torch.from_numpy(k)[None], torch.tensor([143]), tau=0.2, eps=1e-5, binary=True,
               precision="float32", tol=TOL, max_iter=300)
    _check_against_reference(k, sp, 0, binary=True, precision="float32")


def test_solver_constants_agree_with_the_compiled_solver() -> None:
    """One breakdown threshold for every backend: the C++ solver's kBreakdown is the contract's."""
    from ncutfast.backends import contract

    assert _ext.C.BREAKDOWN == contract.BREAKDOWN
