"""Drop-in for CutLER's ``maskcut.maskcut_forward`` (facebookresearch/CutLER, spec §4).

``from ncutfast.compat.maskcut import maskcut_forward`` replaces CutLER's function: same arguments, same
return values (seed, pixel masks, eigenvectors) in the same order, shapes and types.

One documented difference: CutLER's corner rule depends on the arbitrary sign scipy gives the eigenvector
(CutLER #71), so its own output is not reproducible across LAPACK builds. This drop-in uses ncutfast's
canonical sign rule (``ncutfast.maskcut(sign_rule="canonical")``): the seed's side unless it holds >= 3 of
the 4 corners. Everything else (zeroed painted keys, signed-argmax seed, <= 1% / IoU > 0.5 filters,
nearest-neighbour upsampling, disjoint masks: each minus the earlier ones) follows CutLER.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import api
from .._validate import check_choice, check_positive_int

__all__ = ["maskcut_forward", "maskcut_forward_batch"]


def _upsample(a: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """CutLER's ``F.interpolate(..., size=init_image_size, mode='nearest')`` of an (h, w) map."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))[None, None]
    return F.interpolate(t, size=(int(size[0]), int(size[1])), mode="nearest")[0, 0].numpy()


def maskcut_forward_batch(
    feats: Sequence[torch.Tensor],
    dims: Sequence[int],
    scales: Sequence[int],
    init_image_size: Sequence[int],
    tau: float = 0,
    N: int = 3,  # noqa: N803 - CutLER's argument name
    cpu: bool = False,
    *,
    precision: str | None = None,
) -> list[tuple]:
    """``maskcut_forward`` for many images (each ``(dim, h*w)``) sharing dims and image size, solved as one
    batch per step. Returns the list of ``(seed, bipartitions, eigvecs)`` triples."""
    n_masks = check_positive_int(N, "N")
    if precision is not None:
        check_choice(precision, "precision", api.PRECISIONS)
    h, w = int(dims[0]), int(dims[1])
    toks = []
    for i, f in enumerate(feats):
        if not isinstance(f, torch.Tensor) or f.ndim != 2:
            raise ValueError(f"feats[{i}]: expected a torch tensor of shape (dim, h*w)")
        if f.shape[1] != h * w:
            raise ValueError(f"dims: {h}x{w} does not match the {f.shape[1]} tokens of feats[{i}]")
        toks.append(f.transpose(0, 1))
    if not toks:
        raise ValueError("feats: empty batch")
    if precision is None:  # CutLER's arithmetic: the keys' own dtype
        precision = "float64" if toks[0].dtype == torch.float64 else "float32"
    res = api.maskcut(torch.stack(toks), (h, w), n_masks=n_masks, tau=tau, eps=1e-5, sign_rule="canonical",
                      precision=precision)
    masks = res.masks.cpu().numpy()
    seeds = res.seeds.cpu().numpy()
    vecs = res.eigenvectors.cpu().numpy()
    out = []
    for i in range(len(toks)):
        # spec §4 step 6: the token masks are already disjoint (ncutfast.maskcut subtracts the earlier
        # masks), and nearest upsampling keeps them so: CutLER's pixel subtraction changes nothing.
        bipartitions = [_upsample(masks[i, t].astype(np.float64), init_image_size) for t in range(n_masks)]
        eigvecs = [_upsample(vecs[i, t].reshape(h, w), init_image_size) for t in range(n_masks)]
        out.append((np.int64(seeds[i, -1]), bipartitions, eigvecs))
    return out


def maskcut_forward(
    feats: torch.Tensor,
    dims: Sequence[int],
    scales: Sequence[int],
    init_image_size: Sequence[int],
    tau: float = 0,
    N: int = 3,  # noqa: N803 - CutLER's argument name
    cpu: bool = False,
    *,
    precision: str | None = None,
) -> tuple:
    """CutLER's MaskCut: ``(seed, bipartitions, eigvecs)``.

    Args:
        feats: torch ``(dim, h*w)`` keys (CLS removed), as CutLER passes them.
        dims: (h, w) token grid. scales: patch size pair (unused by CutLER's computation, kept).
        init_image_size: (H, W) of the resized image the masks are upsampled to.
        tau: graph threshold (CutLER's default 0; its scripts pass 0.15). N: number of masks.
        cpu: accepted for the signature; computation runs on ``feats``' device.
        precision: keyword only, not in CutLER: None (CutLER's arithmetic: the keys' dtype) or a precision
            of ``ncutfast.maskcut`` (e.g. "exact": the float64 graph, certified).

    Returns:
        seed: int64, the last step's seed; bipartitions: N float64 (H, W) 0/1 masks, disjoint;
        eigvecs: N float64 (H, W) nearest-upsampled eigenvectors (the vector each step's rule saw).
    """
    return maskcut_forward_batch([feats], dims, scales, init_image_size, tau, N, cpu, precision=precision)[0]
