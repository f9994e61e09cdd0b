"""The cut stage: a batch of per-image key matrices -> token masks and confidence numbers.

Two backends:
- ``"reference"``: :mod:`ncutfast.reference` (float64 SciPy, one image at a time). Slow; for verification and
  for bit-exact CutLER output (``sign_rule="cutler"``).
- anything else (``"auto"``, ``"torch"``, ...): the batched public API (:func:`ncutfast.api.tokencut` /
  :func:`ncutfast.api.maskcut`), one call per batch and tau value, never one image at a time.

Confidence (documented in the README of the label command): for every mask, ``ncut`` is the cut's
generalized eigenvalue lambda2 (the relaxed Ncut value; 0 = perfectly separated), ``eigengap`` is
``lambda3 - lambda2``, and ``score = 1 - lambda2 / lambda3`` in [0, 1] (the relative eigengap; 1 means the 2nd
eigenvector is well separated from the 3rd, so the bipartition is stable; 0 means a degenerate spectrum,
where the eigenvector -- and so the mask -- is arbitrary). ``--tau auto`` keeps, per image, the tau whose
first cut has the highest ``score`` (ties: the earliest tau in the list).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import reference
from .._arrays import to_host
from ..reference import relative_gap

__all__ = ["ImageCut", "relative_gap", "cut_batch"]


@dataclass
class ImageCut:
    """The cut of one image at token level.

    Attributes:
        masks: bool ``(M, h, w)``: M = ``n_masks`` for MaskCut (disjoint: each minus the earlier ones; rejected
            steps all False), 1 for TokenCut (the seed's 4-connected component).
        lambda2, lambda3: float64 ``(M,)`` eigenvalues of each cut (NaN where undefined).
        tau: the threshold that produced this cut.
        eigenvector: float64 ``(h, w)``, the 2nd eigenvector of the first cut as its foreground rule saw it
            (for overlays only; None when unknown).
    """

    masks: np.ndarray
    lambda2: np.ndarray
    lambda3: np.ndarray
    tau: float
    eigenvector: np.ndarray | None = None


def _np(x: object) -> np.ndarray:
    """A torch tensor or array-like -> NumPy on the CPU."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _reference_cut(feats: list[torch.Tensor], grids: list[tuple[int, int]], mode: str, tau: float,
                   n_masks: int, eps: float, sign_rule: str, patch: int) -> list[ImageCut]:
    out = []
    for f, grid in zip(feats, grids, strict=True):
        if mode == "maskcut":
            r = reference.maskcut(_np(f), grid, n_masks=n_masks, tau=tau, eps=eps, sign_rule=sign_rule)
            out.append(ImageCut(reference.subtract_earlier(r.masks), r.lambda2, r.lambda3, tau,
                                r.eigenvectors[0].reshape(grid)))
        else:
            t = reference.tokencut(_np(f), grid, patch=patch, tau=tau, eps=eps)
            out.append(ImageCut(t.mask[None], np.array([t.ncut.lambda2]), np.array([t.ncut.lambda3]), tau,
                                t.ncut.eigenvector.reshape(grid)))
    return out


def _api_cut(feats: list[torch.Tensor], grids: list[tuple[int, int]], mode: str, tau: float, n_masks: int,
             eps: float, sign_rule: str, patch: int, precision: str, backend: str) -> list[ImageCut]:
    from .. import api

    same = len(set(grids)) == 1
    x = torch.stack(feats) if same else feats  # a padded batch, or the ragged list API
    g = grids[0] if same else grids
    if mode == "maskcut":
        r = api.maskcut(x, g, n_masks=n_masks, tau=tau, eps=eps, sign_rule=sign_rule, precision=precision,
                        backend=backend)
        fields = [r.masks, r.lambda2, r.lambda3, r.eigenvectors]
    else:
        r = api.tokencut(x, g, patch=patch, tau=tau, eps=eps, precision=precision, backend=backend)
        fields = [r.masks, r.ncut.lambda2, r.ncut.lambda3, r.ncut.eigenvector]
    # Every field (per-image lists for ragged grids) comes to the host in one copy for the whole batch.
    flat = [t for f in fields for t in (f if isinstance(f, list) else [f])]
    host = iter(to_host(flat))
    masks, lam2, lam3, vecs = ([next(host) for _ in f] if isinstance(f, list) else next(host) for f in fields)
    out = []
    for b, (h, w) in enumerate(grids):
        if mode == "maskcut":
            out.append(ImageCut(np.asarray(masks[b], dtype=bool), lam2[b].astype(np.float64),
                                lam3[b].astype(np.float64), tau, vecs[b][0, : h * w].reshape(h, w)))
        else:
            out.append(ImageCut(np.asarray(masks[b], dtype=bool)[None], np.array([float(lam2[b])]),
                                np.array([float(lam3[b])]), tau, vecs[b][: h * w].reshape(h, w)))
    return out


def cut_batch(feats: list[torch.Tensor], grids: list[tuple[int, int]], *, mode: str, taus: tuple[float, ...],
              n_masks: int, eps: float, sign_rule: str, patch: int, precision: str,
              backend: str) -> list[ImageCut]:
    """Cut every image of a batch, for each tau in ``taus``, and keep per image the most separable cut.

    Args:
        feats: per image float32 torch ``(N_i, C)`` keys (any device), row-major over ``grids[i]``.
        grids: per image ``(h, w)`` with ``h * w == N_i``.
        mode: "maskcut" (MaskCut, ``n_masks`` cuts) or "tokencut"/"saliency" (one TokenCut cut).
        taus: one tau, or several (``--tau auto``); with several, the first cut's :func:`relative_gap` picks.
        backend: "reference" for the float64 spec, otherwise the batched API's backend name.

    Returns one :class:`ImageCut` per image.
    """
    best: list[ImageCut] | None = None
    for tau in taus:
        if backend == "reference":
            cuts = _reference_cut(feats, grids, mode, tau, n_masks, eps, sign_rule, patch)
        else:
            cuts = _api_cut(feats, grids, mode, tau, n_masks, eps, sign_rule, patch, precision, backend)
        if best is None:
            best = cuts
            continue
        for i, c in enumerate(cuts):
            old = best[i]
            if relative_gap(c.lambda2[0], c.lambda3[0]) > relative_gap(old.lambda2[0], old.lambda3[0]):
                best[i] = c
    assert best is not None
    return best
