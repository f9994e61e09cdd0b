"""Drop-in for TokenCut's ``object_discovery.ncut`` (YangtaoWANG95/TokenCut, spec §2).

``from ncutfast.compat.tokencut import ncut`` replaces ``from object_discovery import ncut``: same
arguments, same return values in the same order, shapes and types. The similarity is computed in float32,
as TokenCut does it (torch; float64 inputs stay float64); the eigen-solve is ncutfast's (float64). The seed
uses ncutfast's documented tie-breaks (``ncutfast.api.TIE_RTOL``) where TokenCut's argmax sees a tie
decided by rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .. import decide
from .._arrays import as_batch
from .._validate import check_choice, check_eps, check_tau
from ..api import _solve
from ..backends import PRECISIONS, SolveParams

__all__ = ["ncut", "ncut_batch"]


def _features(feats: torch.Tensor, name: str) -> torch.Tensor:
    """TokenCut passes (1, 1 + N, C) with the CLS token first; drop it as ``feats[0, 1:, :]`` does."""
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"{name}: expected a torch tensor of shape (1, 1 + N, C), got {type(feats).__name__}")
    if feats.ndim != 3 or feats.shape[0] != 1 or feats.shape[1] < 2:
        raise ValueError(f"{name}: expected shape (1, 1 + N, C) with N >= 1, got {tuple(feats.shape)}")
    return feats[0, 1:, :]


def ncut_batch(
    feats: Sequence[torch.Tensor],
    dims: Sequence[Sequence[int]],
    scales: Sequence[int],
    init_image_size: Sequence[Sequence[int]],
    tau: float = 0,
    eps: float = 1e-5,
    im_name: str | Sequence[str] = "",
    no_binary_graph: bool = False,
    *,
    precision: str | None = None,
) -> list[tuple]:
    """Many images in one batched solve: ``ncut`` for ``feats[i]``, ``dims[i]``, ``init_image_size[i]``.

    Returns the list of ``ncut``'s 6-tuples. ``scales``, ``tau``, ``eps``, ``precision`` are shared by all
    images.
    """
    tau, eps = check_tau(tau, binary=not no_binary_graph), check_eps(eps)
    if precision is not None:
        check_choice(precision, "precision", PRECISIONS)
    if not len(feats) == len(dims) == len(init_image_size):
        raise ValueError(f"feats, dims, init_image_size: lengths differ ({len(feats)}, {len(dims)}, "
                         f"{len(init_image_size)})")
    toks = [_features(f, f"feats[{i}]") for i, f in enumerate(feats)]
    for i, (t, d) in enumerate(zip(toks, dims, strict=True)):
        if int(d[0]) * int(d[1]) != t.shape[0]:
            raise ValueError(f"dims[{i}]: {d[0]}x{d[1]} does not match the {t.shape[0]} patch tokens")
    batch = as_batch(toks)
    if precision is None:  # TokenCut's similarity: a torch matmul in the features' own dtype (float32 from the ViT)
        precision = "float64" if batch.feats.dtype == torch.float64 else "float32"
    cut = _solve(batch.feats, batch.lengths, SolveParams(tau, eps, not no_binary_graph, precision), "auto")
    # TokenCut's detect_box for the whole batch on the solve's device, then one copy of each field.
    grids = torch.tensor([[int(d[0]), int(d[1])] for d in dims], dtype=torch.int64)
    labels = decide.token_components(cut.partition, grids)
    mask = decide.same_component(labels, cut.seed)
    sizes = torch.tensor([[int(s[1]), int(s[2])] for s in init_image_size], dtype=torch.int64)
    boxes = decide.boxes(mask, grids, (int(scales[0]), int(scales[1])), sizes).cpu().numpy()
    objects = decide.label_numbers(labels).cpu().numpy()
    mask = mask.cpu().numpy()
    x = cut.x.cpu().numpy()
    seeds = cut.seed.cpu().numpy()
    out = []
    for i, (h, w) in enumerate(grids.tolist()):
        n = h * w
        out.append((boxes[i], objects[i, :n].reshape(h, w), mask[i, :n].reshape(h, w).astype(np.float64),
                    seeds[i], None, x[i, :n].reshape(h, w)))
    return out


def ncut(
    feats: torch.Tensor,
    dims: Sequence[int],
    scales: Sequence[int],
    init_image_size: Sequence[int],
    tau: float = 0,
    eps: float = 1e-5,
    im_name: str = "",
    no_binary_graph: bool = False,
    *,
    precision: str | None = None,
) -> tuple:
    """TokenCut's ncut: ``(pred, objects, mask, seed, None, eigenvector)``.

    Args:
        feats: torch ``(1, 1 + N, C)``, CLS token first (dropped).
        dims: (h, w) of the token grid (TokenCut names them ``[w_featmap, h_featmap]`` but means rows, cols).
        scales: (patch rows, patch cols) in pixels.
        init_image_size: the image tensor's shape (C, H, W); boxes are clipped to (H, W).
        tau, eps: graph threshold and non-edge weight (the function's defaults 0 and 1e-5; CLIs pass 0.2).
        im_name: unused, kept for the signature.
        no_binary_graph: TokenCut's ablation: similarities as weights, entries below tau set to eps.
        precision: keyword only, not in TokenCut: None (TokenCut's arithmetic: float32, float64 for float64
            features) or a precision of ``ncutfast.ncut`` (e.g. "exact": the float64 graph, certified).

    Returns:
        pred: int ndarray (x1, y1, x2, y2); objects: int32 (h, w) component labels; mask: float64 (h, w)
        0/1 seed component; seed: int64; None; eigenvector: float64 (h, w), oriented by the seed rule.
    """
    return ncut_batch([feats], [dims], scales, [init_image_size], tau, eps, im_name, no_binary_graph,
                      precision=precision)[0]
