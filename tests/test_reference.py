"""The reference on small graphs whose answers are known by hand, and its documented edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from ncutfast import reference


def _clique_features(sizes: list[int], rng: np.random.Generator, channels: int = 16) -> np.ndarray:
    """Tokens of clique k all point along e_k (scaled randomly): similarity 1 inside, 0 across."""
    rows = []
    for k, n in enumerate(sizes):
        e = np.zeros(channels)
        e[k] = 1.0
        rows.append(e[None, :] * rng.uniform(0.5, 2.0, size=(n, 1)))
    return np.concatenate(rows)


@pytest.mark.parametrize("a,b", [(5, 3), (2, 7), (13, 11)])
def test_two_cliques_joined_by_eps(rng: np.random.Generator, a: int, b: int) -> None:
    feats = _clique_features([a, b], rng)
    eps = 1e-5
    res = reference.ncut(feats, tau=0.2, eps=eps)
    w = reference.affinity(feats, 0.2, eps)
    d = reference.degrees(w)
    assert np.array_equal(w[:a, :a], np.ones((a, a))) and np.array_equal(w[:a, a:], np.full((a, b), eps))
    # By hand: x is constant on each clique, lambda2 = eps (a d_A + b d_B) / (d_A d_B); lambda3 = 1.
    d_a, d_b = a + eps * b, b + eps * a
    assert res.lambda2 == pytest.approx(eps * (a * d_a + b * d_b) / (d_a * d_b), rel=1e-9)
    assert res.lambda3 == pytest.approx(1.0, rel=1e-9)
    # The smaller clique has the larger |x| (x_B / x_A = -a d_A / (b d_B)), so it holds the seed.
    small = np.arange(a, a + b) if b < a else np.arange(a)
    assert set(np.flatnonzero(res.partition)) == set(small.tolist())
    assert res.seed in small
    assert float(res.eigenvector @ (d * res.eigenvector)) == pytest.approx(1.0, rel=1e-9)
    assert abs(float(d @ res.eigenvector)) < 1e-9  # D-orthogonal to the constant vector


def test_path_graph_splits_into_halves() -> None:
    n = 10
    feats = np.zeros((n, n + 1))
    for i in range(n):
        feats[i, i] = feats[i, i + 1] = 1.0  # neighbours have cosine 1/2, others 0
    w = reference.affinity(feats)
    assert np.array_equal(w > 0.5, np.abs(np.subtract.outer(np.arange(n), np.arange(n))) <= 1)
    res = reference.ncut(feats)
    x = res.eigenvector
    assert np.all(np.diff(x) > 0) or np.all(np.diff(x) < 0)  # the Fiedler vector of a path is monotone
    halves = ({*range(n // 2)}, {*range(n // 2, n)})
    assert set(np.flatnonzero(res.partition)) in halves
    assert res.lambda2 < res.lambda3


def test_all_identical_features_degenerate(rng: np.random.Generator) -> None:
    feats = np.tile(rng.standard_normal(8), (6, 1))
    w = reference.affinity(feats)
    assert np.array_equal(w, np.ones((6, 6)))
    lam2, lam3, x = reference.fiedler(w)
    # (N I - 1 1^T) x = lambda N x: every eigenvalue but the first is 1; x is any D-orthogonal vector.
    assert lam2 == pytest.approx(1.0) and lam3 == pytest.approx(1.0)
    d = reference.degrees(w)
    assert float(x @ (d * x)) == pytest.approx(1.0) and abs(float(d @ x)) < 1e-12
    out = reference.tokencut(feats, (2, 3), patch=8)
    assert out.mask[np.unravel_index(out.seed, (2, 3))]


def test_single_token_defined() -> None:
    feats = np.array([[0.3, -1.2, 2.0]])
    lam2, lam3, x = reference.fiedler(reference.affinity(feats))
    assert np.isnan(lam2) and np.isnan(lam3) and np.array_equal(x, [0.0])
    out = reference.tokencut(feats, (1, 1), patch=16, image_size=(10, 20))
    assert out.mask.tolist() == [[True]] and out.box == (0, 0, 16, 10)
    mc = reference.maskcut(feats, (1, 1))
    # Step 1 repeats step 0's mask (IoU 1 > 0.5): rejected. CutLER's quirk: painting is then unchanged, and
    # step 2 recomputes the same cut against an empty previous mask, so it is accepted again (spec §4.5).
    assert [m.tolist() for m in mc.masks] == [[[True]], [[False]], [[True]]]


@pytest.mark.parametrize("similar", [True, False])
def test_two_tokens(similar: bool) -> None:
    feats = np.array([[1.0, 0.1], [1.0, -0.1]]) if similar else np.array([[1.0, 0.0], [0.0, 1.0]])
    res = reference.ncut(feats)
    assert np.isnan(res.lambda3)
    expected = 1.0 if similar else 2e-5 / (1 + 1e-5)  # W = ones, or two cliques of one token
    assert res.lambda2 == pytest.approx(expected, rel=1e-9)
    assert res.partition.sum() == 1


def test_reference_matches_a_direct_dense_solve(rng: np.random.Generator) -> None:
    """The pieces compose to exactly what TokenCut's ncut computes (D - W, D, subset [1, 2])."""
    feats = rng.standard_normal((37, 5))
    w = reference.affinity(feats, 0.2)
    dmat = np.diag(w.sum(1))
    vals, vecs = scipy.linalg.eigh(dmat - w, dmat, subset_by_index=[1, 2])
    res = reference.ncut(feats, 0.2)
    assert res.lambda2 == vals[0] and res.lambda3 == vals[1]
    assert np.allclose(np.abs(res.eigenvector), np.abs(vecs[:, 0]), rtol=0, atol=1e-12)


def test_strict_threshold_and_non_binary_variant() -> None:
    # Rows (1, 0) and (3, 4)/5 have cosine exactly fl(0.6): tau = 0.6 must give eps (strict >).
    feats = np.array([[1.0, 0.0], [3.0, 4.0]])
    assert reference.affinity(feats, tau=0.6)[0, 1] == 1e-5
    assert reference.affinity(feats, tau=0.5999)[0, 1] == 1.0
    w = reference.affinity(feats, tau=0.7, binary=False)
    assert w[0, 1] == 1e-5 and w[0, 0] == pytest.approx(1.0)
    w = reference.affinity(feats, tau=0.6, binary=False)
    assert w[0, 1] == pytest.approx(0.6)  # the ablation replaces entries *below* tau only


def test_zero_rows_stay_zero_and_connect_by_eps_only() -> None:
    feats = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.1]])
    w = reference.affinity(feats, tau=0.15)
    assert np.all(w[1] == 1e-5)  # a painted (zeroed) token: eps edges only, self-loop included
    w = reference.affinity(feats, tau=-0.5)
    assert np.all(w[1] == 1.0)  # with tau <= 0 the same token connects to everything


def test_maskcut_painted_tokens_share_one_value(rng: np.random.Generator) -> None:
    from ncutfast.testing import planted_scene

    scene = planted_scene(rng, grid=(12, 12), channels=64, n_objects=2)
    res = reference.maskcut(scene.features, scene.grid, n_masks=2)
    painted = res.masks[0].reshape(-1)
    assert painted.any()
    x = res.eigenvectors[1]
    assert np.ptp(x[painted]) <= 1e-9 * np.abs(x).max()


def test_maskcut_sign_rules() -> None:
    """Spec §4 step 3 on a toy vector: the seed (max |x|) sits on the corner-heavy side."""
    x = np.array([5.0, -1, 2, -1, -1, -1, 2, -1, 2])  # 3x3 grid, positive at all four corners
    cross = np.array([False, True, False, True, True, True, False, True, False])
    p_pos, s_pos, _ = reference.maskcut_decision(x, (3, 3), sign_rule="cutler")
    p_neg, s_neg, _ = reference.maskcut_decision(-x, (3, 3), sign_rule="cutler")
    assert np.array_equal(p_pos, cross) and s_pos == 1  # >= 3 corners in {x > mean}: reverse
    assert np.array_equal(p_neg, ~cross) and s_neg == 0  # the other sign keeps the corners
    for v in (x, -x):
        p, s, used = reference.maskcut_decision(v, (3, 3), sign_rule="canonical")
        assert np.array_equal(p, cross) and s == 1 and np.array_equal(used, x)


def test_maskcut_filters(rng: np.random.Generator) -> None:
    from ncutfast.testing import planted_scene

    scene = planted_scene(rng, grid=(14, 14), channels=64, n_objects=1)
    res = reference.maskcut(scene.features, scene.grid, n_masks=3)
    n = 14 * 14
    for t in range(1, 3):
        m, prev = res.masks[t], res.masks[t - 1]
        if m.any():
            assert m.sum() / n > 0.01
            assert not (reference.token_iou(prev, m) > 0.5)
