"""kernels/affinity.py against ncutfast.reference: bitmask, popcounts and degrees.

Runs under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py sets it when there is no GPU) and on CUDA
tensors on a GPU machine. Block sizes are the interpreter's (large) unless a test overrides them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from ncutfast import exact, reference, testing  # noqa: E402
from ncutfast.kernels import _utils  # noqa: E402
from ncutfast.kernels.affinity import affinity_fwd, normalize_fwd  # noqa: E402
from ncutfast.kernels.matvec import degrees_from_counts  # noqa: E402

DEVICE = "cpu" if _utils.interpreting() else "cuda"


@pytest.fixture(autouse=True)
def _triton_can_run() -> None:
    # checked per test, not at import: collection never touches CUDA
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1")


EPS = reference.EPS
# |S64 - tau| below which a threshold decision may legitimately differ from float64, per precision:
# fp32 rounding of a C-term dot of unit vectors (C <= 64 here) and fp16 inputs (2^-11 relative per entry).
ROUNDING = {"float64": 1e-12, "float32": 1e-5, "fast": 4e-3}
# Upper bounds on the measured flip rate (numerics.md: fp32 8e-8, fp16 3e-5 on 150 M entries).
MAX_FLIP_RATE = {"float64": 0.0, "float32": 1e-3, "fast": 2e-2}


def unpack(mask: torch.Tensor) -> torch.Tensor:
    """bool ``(B, N_max, 32 W)`` from the int32 ``(B, N_max, W)`` layout (bit j % 32 of word j // 32)."""
    b, n, w = mask.shape
    bits = (mask.cpu().to(torch.int64)[..., None] >> torch.arange(32)) & 1
    return bits.reshape(b, n, w * 32).bool()


def padded_batch(rng: np.random.Generator, lengths: list[int], channels: int) -> tuple[torch.Tensor, list]:
    """Random features padded to max(lengths) with garbage (finite) padding rows; and the unpadded list."""
    n_max = max(lengths)
    feats = [rng.standard_normal((n, channels)).astype(np.float32) for n in lengths]
    pad = np.full((len(lengths), n_max, channels), 7.5, dtype=np.float32)
    for b, f in enumerate(feats):
        pad[b, : f.shape[0]] = f
    return torch.from_numpy(pad).to(DEVICE), feats


def check_against_reference(mask, counts, lengths, feats, tau, precision) -> tuple[int, int]:
    """Assert the kernel output matches reference.affinity; return (flips, entries) vs float64."""
    bits = unpack(mask)
    counts = counts.cpu()
    n_max = mask.shape[1]
    assert mask.shape[2] == 2 * ((n_max + 63) // 64)
    flips = entries = 0
    for b, f in enumerate(feats):
        n = lengths[b]
        assert not bits[b, n:].any() and not bits[b, :, n:].any(), "bits outside the n x n block"
        got = bits[b, :n, :n].numpy()
        assert np.array_equal(got, got.T), "bitmask not symmetric"
        assert np.array_equal(counts[b, :n].numpy(), got.sum(1)), "counts != row popcounts"
        assert not counts[b, n:].any()
        w_ref = reference.affinity(f, tau, EPS)
        want = w_ref == 1.0
        diff = got != want
        if diff.any():
            fn = reference.normalize_rows(f)
            s64 = fn @ fn.T
            assert np.abs(s64[diff] - tau).max() <= ROUNDING[precision], "flip far from tau"
        flips += int(diff.sum())
        entries += n * n
        if not diff.any():
            assert np.array_equal(counts[b, :n].numpy(), (w_ref == 1.0).sum(1))
            d = degrees_from_counts(counts[b : b + 1], torch.tensor([n]), EPS)[0, :n].numpy()
            np.testing.assert_allclose(d, reference.degrees(w_ref), rtol=1e-14, atol=0)
    assert flips <= MAX_FLIP_RATE[precision] * entries
    return flips, entries


@pytest.mark.parametrize("precision", ["float32", "fast", "float64"])
def test_ragged_batch_matches_reference(precision):
    rng = np.random.default_rng(4)
    lengths = [1, 2, 31, 33, 63, 65, 97]
    x, feats = padded_batch(rng, lengths, channels=37)
    mask, counts = affinity_fwd(x, torch.tensor(lengths), tau=0.2, precision=precision)
    assert mask.dtype == torch.int32 and counts.dtype == torch.int32
    assert mask.shape == (7, 97, 4) and counts.shape == (7, 97)
    check_against_reference(mask, counts, lengths, feats, 0.2, precision)


@pytest.mark.parametrize("precision", ["float32", "fast"])
def test_planted_scenes_match_reference(precision):
    rng = np.random.default_rng(11)
    scenes = [testing.planted_scene(rng, n, channels=48) for n in (35, 72, 99)]
    feats = [s.features for s in scenes]
    lengths = [f.shape[0] for f in feats]
    x = torch.zeros(len(feats), max(lengths), 48)
    for b, f in enumerate(feats):
        x[b, : lengths[b]] = torch.from_numpy(f)
    mask, counts = affinity_fwd(x.to(DEVICE), torch.tensor(lengths), tau=reference.MASKCUT_TAU,
                                precision=precision)
    check_against_reference(mask, counts, lengths, feats, reference.MASKCUT_TAU, precision)


def fixed_order_dots(g: np.ndarray) -> np.ndarray:
    """float32 ``(n, n)``: fl32(g_i . g_j) in precision float32's certified order (each product rounded to
    float32, then added to the running float32 sum, features left to right)."""
    acc = np.zeros((g.shape[0], g.shape[0]), dtype=np.float32)
    for q in range(g.shape[1]):
        acc = acc + np.multiply.outer(g[:, q], g[:, q])
    return acc


def check_fixed_order(mask, counts, x, lengths, tau) -> int:
    """Assert the graph is [fl32(g_i . g_j) > tau] bit for bit, g = normalize_fwd's float32 rows; return the
    number of entries (i <= j) within the screen's bound of tau (the ones the recheck decided)."""
    g = normalize_fwd(x, torch.tensor(lengths), torch.float32).cpu().numpy()
    bits, counts = unpack(mask), counts.cpu()
    rechecked = 0
    for b, n in enumerate(lengths):
        dots = fixed_order_dots(g[b, :n])
        want = dots.astype(np.float64) > tau
        np.testing.assert_array_equal(bits[b, :n, :n].numpy(), want)
        assert not bits[b, n:].any() and not bits[b, :, n:].any()
        np.testing.assert_array_equal(counts[b, :n].numpy(), want.sum(1))
        near = np.abs(dots.astype(np.float64) - tau) <= exact.float32_screen_bound(x.shape[2])
        rechecked += int(np.triu(near).sum())
    return rechecked


@pytest.mark.parametrize("c", [1, 3, 97, 768])
def test_float32_is_the_fixed_order_float32_dot(c):
    """Precision float32 (fp16 screen + fixed-order recheck) gives [fl32(g_i . g_j) > tau] bit for bit on a
    ragged batch of awkward sizes, with rows planted within the screen's bound of tau and tau equal to one
    of the dots (a tie: strict >)."""
    rng = np.random.default_rng(c)
    lengths = [1, 2, 37, 61]
    x, _ = padded_batch(rng, lengths, c)
    if c >= 2:  # image 3: rows whose cosines with row 0 lie within half the bound of 0.1
        e = rng.standard_normal((61, c))
        e[:, 0] = 0.0
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        cos = 0.1 + rng.uniform(-0.5, 0.5, size=61) * exact.float32_screen_bound(c)
        rows = cos[:, None] * np.eye(c)[0] + np.sqrt(1.0 - cos[:, None] ** 2) * e
        rows[0] = np.eye(c)[0]
        x[3, :61] = torch.from_numpy(rows.astype(np.float32)).to(DEVICE)
    g = normalize_fwd(x, torch.tensor(lengths), torch.float32).cpu().numpy()
    tau = float(fixed_order_dots(g[3, :61])[0, 5])
    mask, counts = affinity_fwd(x, torch.tensor(lengths), tau=tau, precision="float32")
    assert check_fixed_order(mask, counts, x, lengths, tau) >= (60 if c >= 2 else 1)


def test_float32_screen_rows_are_the_rows_rounded():
    """The certified float32 path's normalization also writes the fp16 screen rows: fl16 of its fp32 rows."""
    from ncutfast.kernels.affinity import _normalize

    rng = np.random.default_rng(9)
    lengths = [1, 2, 37]
    x, _ = padded_batch(rng, lengths, 131)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    g, h = _normalize(x, lens, torch.float32, half=True)
    assert torch.equal(g, normalize_fwd(x, lens, torch.float32)) and torch.equal(h, g.to(torch.float16))


def test_float32_duplicates_and_ties():
    """Many exact duplicates (their dots all equal, far more candidates than 1/256 of the entries) with tau
    equal to one of the dots: ties everywhere, all decided by the recheck."""
    rng = np.random.default_rng(7)
    pool = rng.standard_normal((3, 2)).astype(np.float32)
    x = torch.from_numpy(pool[rng.integers(0, 3, size=(1, 67))]).to(DEVICE)
    g = normalize_fwd(x, torch.tensor([67]), torch.float32).cpu().numpy()
    tau = float(fixed_order_dots(g[0])[0, 0])
    mask, counts = affinity_fwd(x, torch.tensor([67]), tau=tau, precision="float32")
    assert check_fixed_order(mask, counts, x, [67], tau) > 67 * 67 // 256


def test_float32_single_kernel_setting():
    """Launch setting affinity.certified = 0 keeps the single-kernel IEEE float32 product."""
    rng = np.random.default_rng(8)
    lengths = [1, 2, 31, 33, 65]
    x, feats = padded_batch(rng, lengths, channels=19)
    with _utils.override("affinity", certified=0):
        mask, counts = affinity_fwd(x, torch.tensor(lengths), tau=0.2, precision="float32")
    check_against_reference(mask, counts, lengths, feats, 0.2, "float32")


def test_tile_sizes_do_not_change_the_result():
    # Several tiles per image (diagonal and off-diagonal pairs, transposed writes) with small blocks.
    rng = np.random.default_rng(5)
    lengths = [65, 40, 3]
    x, feats = padded_batch(rng, lengths, channels=21)
    base = affinity_fwd(x, torch.tensor(lengths), tau=0.1)
    with _utils.override("affinity", BT=32, BK=16), _utils.override("normalize", BR=32, BC=16):
        small = affinity_fwd(x, torch.tensor(lengths), tau=0.1)
    assert torch.equal(base[0], small[0]) and torch.equal(base[1], small[1])
    check_against_reference(*small, lengths, feats, 0.1, "float32")


def test_zero_rows_and_negative_tau():
    # MaskCut zeroes painted keys: a zero row has similarity 0 with everything, itself included, so with
    # tau < 0 it connects to every token and with tau > 0 to none (numerics.md).
    rng = np.random.default_rng(6)
    lengths = [33, 20]
    x, feats = padded_batch(rng, lengths, channels=16)
    x[0, [0, 5, 32]] = 0.0
    feats[0][[0, 5, 32]] = 0.0
    for tau in (-0.05, 0.15):
        mask, counts = affinity_fwd(x, torch.tensor(lengths), tau=tau)
        check_against_reference(mask, counts, lengths, feats, tau, "float32")
        row = unpack(mask)[0, 5, :33]
        assert bool(row.all()) if tau < 0 else not row.any()


def test_strided_and_half_inputs():
    rng = np.random.default_rng(7)
    lengths = [30, 17]
    x, feats = padded_batch(rng, lengths, channels=26)
    wide = torch.zeros(2, 30, 52, device=DEVICE)
    wide[:, :, ::2] = x
    strided = wide[:, :, ::2]  # non-contiguous feature axis
    assert torch.equal(affinity_fwd(strided, torch.tensor(lengths), tau=0.2)[0],
                       affinity_fwd(x, torch.tensor(lengths), tau=0.2)[0])
    half = x.half()
    mask, counts = affinity_fwd(half, torch.tensor(lengths), tau=0.2)
    rounded = [h.cpu().numpy()[:n] for h, n in zip(half, lengths, strict=True)]
    check_against_reference(mask, counts, lengths, rounded, 0.2, "float32")


def test_normalize_rows():
    rng = np.random.default_rng(8)
    lengths = [9, 4]
    x, feats = padded_batch(rng, lengths, channels=19)
    x[1, 2] = 0.0
    feats[1][2] = 0.0
    out = normalize_fwd(x, torch.tensor(lengths), torch.float32).cpu()
    for b, f in enumerate(feats):
        np.testing.assert_allclose(out[b, : lengths[b]].numpy(), reference.normalize_rows(f), rtol=1e-6,
                                   atol=1e-7)
        assert not out[b, lengths[b]:].any()


def test_flip_rate_is_reported_small():
    # The fast (fp16) path against float64 on a batch big enough to see flips; the rate is printed
    # (pytest -s) and bounded.
    rng = np.random.default_rng(9)
    lengths = [128, 128]
    x, feats = padded_batch(rng, lengths, channels=64)
    out = {}
    for precision in ("float32", "fast"):
        mask, counts = affinity_fwd(x, torch.tensor(lengths), tau=0.1, precision=precision)
        flips, entries = check_against_reference(mask, counts, lengths, feats, 0.1, precision)
        out[precision] = flips / entries
    print(f"flip rate vs float64: float32 {out['float32']:.2e}, fast {out['fast']:.2e}")


@pytest.mark.parametrize(
    ("feats", "lengths", "kwargs", "exc"),
    [
        (torch.zeros(2, 3), torch.tensor([1, 1]), {}, ValueError),
        (torch.zeros(2, 3, 4, dtype=torch.int32), torch.tensor([1, 1]), {}, TypeError),
        (torch.ones(2, 3, 4), torch.tensor([1]), {}, ValueError),
        (torch.ones(2, 3, 4), torch.tensor([0, 3]), {}, ValueError),
        (torch.ones(2, 3, 4), torch.tensor([4, 3]), {}, ValueError),
        (torch.ones(2, 3, 4), torch.tensor([2, 3]), {"precision": "bf16"}, ValueError),
    ],
)
def test_bad_input_raises(feats, lengths, kwargs, exc):
    with pytest.raises(exc):
        affinity_fwd(feats.to(DEVICE), lengths, tau=0.2, **kwargs)


def test_layout_matches_the_cpu_extension():
    # The bitmask layout is shared with csrc/: int32 words (B, N_max, 2 ceil(N_max / 64)) read as uint64
    # words (B, N_max, ceil(N_max / 64)) must be the C++ helper's packing of the same graph.
    from ncutfast import _ext

    if not _ext.HAS_CPU_EXT:
        pytest.skip(f"compiled extension not built ({_ext.IMPORT_ERROR})")
    rng = np.random.default_rng(10)
    lengths = [65, 1, 31, 64]
    x, feats = padded_batch(rng, lengths, channels=23)
    mask, _ = affinity_fwd(x, torch.tensor(lengths), tau=0.2, precision="float64")
    n_max = x.shape[1]
    s = torch.zeros(len(lengths), n_max, n_max, dtype=torch.float64)
    for b, f in enumerate(feats):
        fn = reference.normalize_rows(f)
        s[b, : lengths[b], : lengths[b]] = torch.from_numpy(fn @ fn.T)
    lens = torch.tensor(lengths, dtype=torch.int64)
    bits = torch.zeros(len(lengths), n_max, _ext.C.words_per_row(n_max), dtype=torch.int64)
    _ext.C.pack_graph_cpu(s.data_ptr(), "float64", len(lengths), n_max, lens.data_ptr(), 0.2, bits.data_ptr())
    assert torch.equal(mask.cpu().view(torch.int64), bits)


@pytest.mark.parametrize("seed", range(8))
def test_random_shapes_match_reference(seed):
    # Random ragged batches, feature widths and thresholds (tau < 0 included), one seeded draw per case.
    rng = np.random.default_rng(1000 + seed)
    lengths = [int(n) for n in rng.integers(1, 131, size=rng.integers(1, 4))]
    channels, tau = int(rng.integers(1, 41)), float(rng.uniform(-0.5, 0.6))
    x, feats = padded_batch(rng, lengths, channels)
    mask, counts = affinity_fwd(x, torch.tensor(lengths), tau=tau)
    check_against_reference(mask, counts, lengths, feats, tau, "float32")
