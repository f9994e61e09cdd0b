"""Framework plumbing: torch / NumPy / CuPy in, padded torch batch inside, the caller's framework out."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._validate import check_feature_matrix, check_lengths

__all__ = ["Batch", "as_batch", "to_framework", "framework_of", "to_host"]


def framework_of(x: Any) -> str:
    """'torch', 'numpy' or 'cupy' (CuPy is recognised without importing it)."""
    if isinstance(x, torch.Tensor):
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return "cupy"
    raise TypeError(f"features: expected a torch tensor, NumPy array or CuPy array, got {type(x).__name__}")


def _to_torch(x: Any, framework: str) -> torch.Tensor:
    """The input as a torch tensor, detached from autograd: the cut is not differentiable (thresholding and
    an eigen-solve), so features that require grad (straight from a model without ``no_grad``) are read as
    constants, here, once for every entry point."""
    if framework == "torch":
        return x.detach()
    if framework == "numpy":
        return torch.from_numpy(np.ascontiguousarray(x))
    return torch.from_dlpack(x)  # CuPy: zero-copy on the same device


def to_framework(t: torch.Tensor, framework: str, device: torch.device) -> Any:
    """Return ``t`` in the caller's framework, on the caller's device."""
    if framework == "numpy":
        return t.detach().cpu().numpy()
    t = t.to(device)
    if framework == "cupy":
        import cupy

        return cupy.from_dlpack(t.contiguous())
    return t


def to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Tensors on one device as NumPy arrays, in one device-to-host copy: their bytes are concatenated on
    the device first (CPU tensors are returned as views, without a copy). Any shapes; dtypes NumPy has."""
    if not tensors:
        return []
    if all(t.device.type == "cpu" for t in tensors):
        return [t.detach().numpy() for t in tensors]
    raw = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]).cpu().numpy()
    out, at = [], 0
    for t in tensors:
        size = t.numel() * t.element_size()
        dtype = torch.empty(0, dtype=t.dtype).numpy().dtype
        out.append(raw[at : at + size].copy().view(dtype).reshape(tuple(t.shape)))  # copy: aligned
        at += size
    return out


@dataclass
class Batch:
    """A validated padded batch.

    Attributes:
        feats: ``(B, N_max, C)`` torch tensor on the input's device (input dtype).
        lengths: ``(B,)`` int64 CPU tensor.
        layout: "single" ((N, C) input), "batch" ((B, N, C) without lengths), "padded" ((B, N, C) + lengths)
            or "list" (a list of (N_i, C) arrays).
        framework: "torch", "numpy" or "cupy".
        device: the input's torch device.
    """

    feats: torch.Tensor
    lengths: torch.Tensor
    layout: str
    framework: str
    device: torch.device


def _finite(t: torch.Tensor, lengths: torch.Tensor | None) -> bool:
    """All valid entries finite? The min and max propagate NaN and show +-inf: one pass (``aminmax``) and no
    temporary copy."""
    if lengths is not None:
        valid = torch.arange(t.shape[1], device=t.device)[None, :] < lengths.to(t.device)[:, None]
        t = torch.where(valid[:, :, None], t, torch.zeros((), dtype=t.dtype, device=t.device))
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def as_batch(features: Any, lengths: Any = None) -> Batch:
    """Validate ``features`` (+ ``lengths``) and return them as a padded torch batch.

    Raises ``TypeError`` for a non-array, an unsupported dtype or lengths that are not integers, and
    ``ValueError`` for a wrong rank, an empty batch or axis, NaN/inf in the valid rows, mismatched channel
    counts, or lengths that don't fit. Features are detached from autograd (see ``_to_torch``).
    """
    if isinstance(features, (list, tuple)):
        if lengths is not None:
            raise ValueError("lengths: only allowed with a padded (B, N_max, C) array, not with a list")
        if not features:
            raise ValueError("features: empty batch (an empty list)")
        fws = {framework_of(f) for f in features}
        if len(fws) != 1:
            raise TypeError(f"features: all list items must come from one framework, got {sorted(fws)}")
        fw = fws.pop()
        items = []
        for i, f in enumerate(features):
            t = _to_torch(f, fw)
            check_feature_matrix(t, f"features[{i}]", ndims=(2,), all_finite=None)
            check_feature_matrix(t, f"features[{i}]", ndims=(2,), all_finite=_finite(t, None))
            items.append(t)
        chans = {int(t.shape[1]) for t in items}
        if len(chans) != 1:
            raise ValueError(f"features: list items have different channel counts {sorted(chans)}")
        if len({t.device for t in items}) != 1 or len({t.dtype for t in items}) != 1:
            raise ValueError("features: list items must share one device and one dtype")
        lens = torch.tensor([int(t.shape[0]) for t in items], dtype=torch.int64)
        n_max = int(lens.max())
        feats = items[0].new_zeros((len(items), n_max, chans.pop()))
        for i, t in enumerate(items):
            feats[i, : t.shape[0]] = t
        return Batch(feats, lens, "list", fw, items[0].device)

    fw = framework_of(features)
    t = _to_torch(features, fw)
    check_feature_matrix(t, "features", ndims=(2, 3), all_finite=None)
    if t.ndim == 2:
        if lengths is not None:
            raise ValueError("lengths: only allowed with a padded (B, N_max, C) array")
        check_feature_matrix(t, "features", ndims=(2,), all_finite=_finite(t, None))
        return Batch(t[None], torch.tensor([t.shape[0]], dtype=torch.int64), "single", fw, t.device)
    if lengths is None:
        check_feature_matrix(t, "features", ndims=(3,), all_finite=_finite(t, None))
        lens = torch.full((t.shape[0],), t.shape[1], dtype=torch.int64)
        return Batch(t, lens, "batch", fw, t.device)
    if isinstance(lengths, (torch.Tensor, np.ndarray)):
        if lengths.ndim != 1:
            raise ValueError(f"lengths: expected a 1-D sequence, got shape {tuple(lengths.shape)}")
        lengths = lengths.tolist()
    lens = torch.tensor(check_lengths(lengths, t.shape[0], t.shape[1]), dtype=torch.int64)
    check_feature_matrix(t, "features", ndims=(3,), all_finite=_finite(t, lens))
    return Batch(t, lens, "padded", fw, t.device)
