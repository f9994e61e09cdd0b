"""Loading DINO ViT weights from a local file only (no hub, no download, ever).

Accepted files:
- the official DINO checkpoints (``dino_deitsmall16_pretrain.pth``, ``dino_deitsmall8_300ep_pretrain.pth``,
  ``dino_vitbase16_pretrain.pth``, ``dino_vitbase8_pretrain.pth``): a plain state dict;
- DINO training checkpoints (``{"teacher": {"module.backbone.<key>": ...}, ...}``): the teacher backbone;
- timm ``vit_*_patch*_224.dino`` weights as ``.pth`` or ``.safetensors``.

A checkpoint is data, never code: ``.pth`` files go through ``torch.load(weights_only=True)``, which refuses
any pickle that would import or call something other than tensors and plain containers.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import torch

from .errors import plain
from .vit import ARCHS, VisionTransformer

__all__ = ["WeightsError", "read_state_dict", "load_vit"]

_WRAPPERS = ("teacher", "model", "state_dict", "student")
_PREFIXES = ("module.", "backbone.", "encoder.")
_IGNORED = ("head.", "fc_norm.")


class WeightsError(Exception):
    """A weights file is missing, unreadable, unsafe, or does not match the requested architecture."""


def _why(exc: Exception) -> str:
    """The one line of torch's weights-only refusal that says what was refused (its advice left out)."""
    lines = [line for line in str(exc).splitlines() if "Unsupported" in line or "Unpickler error" in line]
    return plain(lines[0] if lines else str(exc).split("\n")[0]).split(" Please use")[0]


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` without executing code.

    Returns a flat ``{key: tensor}`` dict on the CPU with wrapper dicts (``teacher``, ``model``, ...) and key
    prefixes (``module.``, ``backbone.``) removed, and classification-head keys dropped.

    Raises:
        WeightsError: the file is missing, not a checkpoint, or a pickle that carries code.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"cannot read safetensors file {path}: {exc}") from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise WeightsError(
                f"refusing to load {path}: it is not a plain tensor checkpoint (torch.load with "
                f"weights_only=True rejected it; a checkpoint must be data, never code): {_why(exc)}"
            ) from exc
        except Exception as exc:  # noqa: BLE001 -- a text or truncated file fails in many ways inside pickle
            detail = plain(str(exc).split("\n")[0])
            raise WeightsError(f"cannot read weights file {path}: not a PyTorch checkpoint "
                               f"({type(exc).__name__}{': ' + detail if detail else ''})") from exc
    for _ in range(2):
        if isinstance(obj, dict):
            wrapped = [k for k in _WRAPPERS if isinstance(obj.get(k), dict)]
            if wrapped:
                obj = obj[wrapped[0]]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith(_IGNORED):
            out[key] = value
    return out


def _describe(state: dict[str, torch.Tensor]) -> str:
    """Name the architecture a state dict looks like, for error messages."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return "no ViT patch embedding (patch_embed.proj.weight missing)"
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    names = [n for n, s in ARCHS.items() if (s.dim, s.patch) == (dim, patch)]
    return f"{names[0] if names else 'an unknown ViT'} (dim {dim}, patch {patch})"


def load_vit(arch: str, path: str | os.PathLike[str]) -> VisionTransformer:
    """Build the ViT for ``arch`` and load ``path`` into it strictly; returns the model in eval mode.

    Raises:
        WeightsError: unreadable/unsafe file, a file whose keys or shapes do not match ``arch`` (the
            message names the file, the expected architecture and what the file holds), or NaN/inf values.
        ValueError: ``arch`` is not one of :data:`ncutfast.label.vit.ARCHS`.
    """
    if arch not in ARCHS:
        raise ValueError(f"unsupported arch {arch!r}; choose one of {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    state = read_state_dict(path)
    with torch.device("meta"):  # shapes only: the file's tensors become the parameters (no init, no copy)
        model = VisionTransformer(spec)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape))
            if keys
        )
        raise WeightsError(
            f"weights file {Path(path)} does not match --arch {arch} (expected dim {spec.dim}, patch "
            f"{spec.patch}, {spec.depth} blocks); the file holds {_describe(state)}. {detail}"
        )
    # A finite sum screens each tensor in one cheap pass; only an overflowing sum needs the elementwise check.
    bad = [k for k, v in state.items() if v.is_floating_point() and not math.isfinite(float(v.sum()))
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(f"weights file {Path(path)} holds NaN or infinite values (in {', '.join(bad[:4])}"
                           f"{' ...' if len(bad) > 4 else ''}); the file is damaged")
    model.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=True, assign=True)
    return model.eval()
