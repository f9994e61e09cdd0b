"""ncutfast.decide (the post-solve decisions, batched in torch) against ncutfast.reference and SciPy."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

import ncutfast
from ncutfast import decide, reference
from ncutfast.testing import planted_scene


def _canonical(labels: np.ndarray) -> np.ndarray:
    """scipy's labels as decide.components writes them: each component's first flat index, -1 elsewhere."""
    flat = labels.reshape(-1)
    out = np.full(flat.shape, -1, dtype=np.int64)
    for lab in np.unique(flat[flat > 0]):
        idx = np.flatnonzero(flat == lab)
        out[idx] = idx[0]
    return out.reshape(labels.shape)


def _spiral(h: int, w: int) -> np.ndarray:
    """A one-cell-wide spiral corridor: one component whose path visits ~half of the grid."""
    g = np.zeros((h, w), dtype=bool)
    r = c = 0
    dirs = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    d = 0
    g[0, 0] = True
    turns = 0
    while turns < 2:
        dr, dc = dirs[d]
        r1, c1, r2, c2 = r + dr, c + dc, r + 2 * dr, c + 2 * dc
        free = 0 <= r1 < h and 0 <= c1 < w and not (0 <= r2 < h and 0 <= c2 < w and g[r2, c2])
        if free:
            r, c = r1, c1
            g[r, c] = True
            turns = 0
        else:
            d = (d + 1) % 4
            turns += 1
    return g


def _grids(rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for h, w in [(1, 1), (1, 17), (23, 1), (5, 7), (13, 11), (29, 31), (28, 28)]:
        for p in (0.3, 0.55, 0.8):
            out.append(rng.uniform(size=(h, w)) < p)
    out += [_spiral(n, m) for n, m in [(7, 7), (15, 16), (31, 29)]]
    out += [np.indices((h, w)).sum(0) % 2 == 0 for h, w in [(9, 11), (1, 5), (6, 1)]]
    out += [np.ones((3, 5), dtype=bool), np.zeros((4, 3), dtype=bool)]
    return out


def test_spiral_is_one_long_component() -> None:
    g = _spiral(31, 29)
    labels, count = ndimage.label(g)
    assert count == 1 and g.sum() > 400


@pytest.mark.parametrize("fn", [decide.components, decide.components_torch])
@pytest.mark.parametrize("batch", [1, 3])
def test_components_equal_scipy_label(rng: np.random.Generator, batch: int, fn) -> None:
    """Every test grid alone and in batches of equal shapes: the same components as scipy.ndimage.label,
    per image (the torch propagation the GPU runs, and the whole-batch SciPy call of CPU tensors)."""
    grids = _grids(rng)
    for g in grids:
        stack = np.stack([g] + [rng.uniform(size=g.shape) < 0.5 for _ in range(batch - 1)])
        got = fn(torch.from_numpy(stack)).numpy()
        for b in range(batch):
            np.testing.assert_array_equal(got[b], _canonical(ndimage.label(stack[b])[0]), err_msg=str(g.shape))


def _ragged(rng: np.random.Generator, shapes: list[tuple[int, int]], p: float):
    """Token masks of ragged grids, padded to (B, N_max), plus the grids as an int64 tensor."""
    n_max = max(h * w for h, w in shapes)
    masks = np.zeros((len(shapes), n_max), dtype=bool)
    for b, (h, w) in enumerate(shapes):
        masks[b, : h * w] = rng.uniform(size=h * w) < p
    return masks, torch.tensor(shapes, dtype=torch.int64)


def test_seed_component_matches_reference_on_ragged_grids(rng: np.random.Generator) -> None:
    shapes = [(7, 5), (1, 13), (11, 1), (9, 9), (3, 4), (2, 2), (1, 1)]
    for p in (0.4, 0.6, 0.9):
        masks, grids = _ragged(rng, shapes, p)
        seeds = np.array([rng.integers(h * w) for h, w in shapes])  # inside or outside the mask
        got = decide.seed_component(torch.from_numpy(masks), torch.from_numpy(seeds), grids).numpy()
        for b, (h, w) in enumerate(shapes):
            _, want = reference.seed_component(masks[b, : h * w], int(seeds[b]), (h, w))
            np.testing.assert_array_equal(got[b, : h * w], want.reshape(-1))
            assert not got[b, h * w :].any()


def test_boxes_match_reference(rng: np.random.Generator) -> None:
    shapes = [(7, 5), (1, 13), (11, 1), (9, 9), (1, 1)]
    masks, grids = _ragged(rng, shapes, 0.3)
    for b, (h, w) in enumerate(shapes):
        masks[b, rng.integers(h * w)] = True  # non-empty
    sizes = torch.tensor([[h * 16 - 5, w * 8 - 3] for h, w in shapes])
    got = decide.boxes(torch.from_numpy(masks), grids, (16, 8), sizes).numpy()
    for b, (h, w) in enumerate(shapes):
        want = reference.box_from_mask(masks[b, : h * w].reshape(h, w), (16, 8), tuple(sizes[b].tolist()))
        assert tuple(got[b]) == want


def _vectors(rng: np.random.Generator, lengths: list[int]) -> np.ndarray:
    x = np.zeros((len(lengths), max(lengths)))
    for b, n in enumerate(lengths):
        x[b, :n] = rng.standard_normal(n) * rng.uniform(0.01, 10)
    return x


def test_tokencut_cut_matches_reference(rng: np.random.Generator) -> None:
    lengths = [1, 2, 3, 35, 97, 211]
    x = _vectors(rng, lengths)
    got = decide.tokencut_cut(torch.from_numpy(x), torch.tensor(lengths))
    for b, n in enumerate(lengths):
        part, xo, seed = reference.orient_tokencut(x[b, :n])
        assert int(got.seed[b]) == seed
        np.testing.assert_array_equal(got.partition[b, :n].numpy(), part)
        np.testing.assert_array_equal(got.x[b, :n].numpy(), xo)
        assert not got.partition[b, n:].any()


def _tie_argmax(v: np.ndarray) -> int:
    scale = float(np.abs(v).max())
    return int(np.flatnonzero(v >= v.max() - decide.TIE_RTOL * scale)[0])


@pytest.mark.parametrize("sign_rule", reference.SIGN_RULES)
def test_maskcut_side_matches_reference(rng: np.random.Generator, sign_rule: str) -> None:
    shapes = [(1, 1), (1, 2), (3, 1), (5, 7), (12, 12), (13, 9)]
    lengths = [h * w for h, w in shapes]
    for trial in range(4):
        x = _vectors(rng, lengths)
        if trial == 1:  # corner-heavy positive side: the corner rule fires
            for b, (h, w) in enumerate(shapes):
                for c in (0, w - 1, (h - 1) * w, h * w - 1):
                    x[b, c] = abs(x[b, c]) + 1.0
        if trial == 2:
            x = -x
        got = decide.maskcut_side(torch.from_numpy(x), torch.tensor(lengths), torch.tensor(shapes), sign_rule)
        for b, (h, w) in enumerate(shapes):
            n = h * w
            part, seed, used = reference.maskcut_decision(x[b, :n], (h, w), sign_rule=sign_rule,
                                                          argmax=_tie_argmax, mean_rtol=decide.TIE_RTOL)
            np.testing.assert_array_equal(got.partition[b, :n].numpy(), part)
            assert int(got.seed[b]) == seed
            np.testing.assert_array_equal(got.x[b, :n].numpy(), used)


def test_maskcut_filter_matches_the_reference_rule(rng: np.random.Generator) -> None:
    n = 211
    cases = []
    for _ in range(40):
        k = int(rng.integers(0, 8))
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, size=k if rng.uniform() < 0.3 else int(rng.integers(0, n)), replace=False)] = True
        prev = np.zeros(n, dtype=bool) if rng.uniform() < 0.3 else mask ^ (rng.uniform(size=n) < 0.2)
        cases.append((mask, prev))
    masks = torch.from_numpy(np.stack([c[0] for c in cases]))
    prevs = torch.from_numpy(np.stack([c[1] for c in cases]))
    got = decide.maskcut_filter(masks, prevs, torch.full((len(cases),), n)).numpy()
    for (mask, prev), g in zip(cases, got, strict=True):
        rejected = reference.token_iou(prev, mask) > 0.5 or mask.sum() / n <= 0.01
        np.testing.assert_array_equal(g, np.zeros(n, dtype=bool) if rejected else mask)


def test_same_component_never_selects_padding() -> None:
    """Seeds in a component, outside the mask (every token outside it) and in padding (nothing)."""
    labels = torch.tensor([[0, 0, -1, 3, 3, -1, -2, -2]] * 3)
    got = decide.same_component(labels, torch.tensor([1, 2, 7]))
    assert got.tolist() == [[True, True, False, False, False, False, False, False],
                            [False, False, True, False, False, True, False, False],
                            [False] * 8]


def test_maskcut_steps_paint_and_subtract_earlier_masks() -> None:
    """decide.maskcut with scripted solves on a 1 x 23 grid: step masks A, B (overlapping A), A again. The
    solves see the union of the earlier steps' masks painted; the returned masks are each minus the earlier
    ones (``reference.subtract_earlier``), and the third step (only tokens of A) is empty and not valid."""
    n = 23
    a = torch.zeros(n, dtype=torch.bool)
    a[3:9] = True
    b = torch.zeros(n, dtype=torch.bool)
    b[7:15] = True
    seen = []

    def solve(painted):
        seen.append(None if painted is None else painted.clone())
        x = torch.where((a, b, a)[len(seen) - 1], 1.0, -0.5).to(torch.float64)[None]
        return SimpleNamespace(lambda2=torch.full((1,), 0.1 * len(seen)), lambda3=torch.ones(1), x=x)

    res = decide.maskcut(solve, torch.tensor([n]), torch.tensor([[1, n]]), 3, "canonical")
    assert seen[0] is None and torch.equal(seen[1][0], a) and torch.equal(seen[2][0], a | b)
    want = reference.subtract_earlier(torch.stack([a, b, a]).numpy())
    np.testing.assert_array_equal(res.masks[0].numpy(), want)
    assert res.valid[0].tolist() == [True, True, False]
    assert res.seeds[0].tolist() == [3, 7, 3]
    torch.testing.assert_close(res.lambda2[0], torch.tensor([0.1, 0.2, 0.3]))


def test_maskcut_never_returns_overlapping_masks_or_an_object_twice() -> None:
    """Issue 10 item 15: the token-level masks are disjoint, and a step that found only tokens of earlier
    masks is empty and not valid (the steps' own masks overlap on many of these scenes)."""
    rng = np.random.default_rng(15)
    scenes = [planted_scene(rng, grid=(12, 12), channels=48, n_objects=int(rng.integers(1, 4))) for _ in range(16)]
    feats = np.stack([s.features for s in scenes])
    out = ncutfast.maskcut(feats, (12, 12), n_masks=3)
    overlapping_steps = 0
    for i, s in enumerate(scenes):
        m = out.masks[i].reshape(3, -1)
        assert (m.sum(0) <= 1).all(), i
        np.testing.assert_array_equal(out.valid[i], m.any(-1))
        raw = reference.maskcut(s.features, s.grid, sign_rule="canonical", similarity_dtype=np.float32).masks
        raw = raw.reshape(3, -1)
        overlapping_steps += int((raw.sum(0) > 1).any())
        for t in range(3):
            for u in range(t):
                assert not (m[t].any() and np.array_equal(m[t], m[u])), (i, t, u)
    assert overlapping_steps > 0  # the rule matters on these scenes


def test_token_components_number_like_scipy_on_ragged_grids(rng: np.random.Generator) -> None:
    shapes = [(7, 5), (1, 13), (11, 1), (9, 9), (2, 2), (1, 1)]
    masks, grids = _ragged(rng, shapes, 0.55)
    labels = decide.token_components(torch.from_numpy(masks), grids)
    numbers = decide.label_numbers(labels).numpy()
    labels = labels.numpy()
    for b, (h, w) in enumerate(shapes):
        want = ndimage.label(masks[b, : h * w].reshape(h, w))[0].reshape(-1)
        np.testing.assert_array_equal(numbers[b, : h * w], want)
        np.testing.assert_array_equal(labels[b, : h * w], _canonical(want))
        assert (labels[b, h * w :] == -2).all() and (numbers[b, h * w :] == 0).all()
