"""Input geometry of the three entry points (``shared/spec/tokencut.md`` section 1) and mask mapping back.

- ``tokencut`` (object discovery): no resize; the normalized image is zero-padded at the bottom and right to
  ``ceil(H/p)*p x ceil(W/p)*p``; grid ``(ceil(H/p), ceil(W/p))``.
- ``saliency``: LANCZOS resize to ``round(W/p)*p x round(H/p)*p`` (Python's banker's rounding, at least one
  patch); no padding.
- ``maskcut``: LANCZOS resize to ``fixed x fixed`` ignoring the aspect ratio, then the same round-to-multiple
  step (a no-op when ``fixed`` is a multiple of ``p``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .vit import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["MODES", "Prepared", "to_rgb", "prepare", "to_pixels", "upsample_tokens"]

MODES = ("maskcut", "tokencut", "saliency")


@dataclass
class Prepared:
    """One decoded image after its mode's resize (normalization and padding happen later, batched).

    Attributes:
        rgb: ``(Hr, Wr, 3)`` uint8 torch tensor, the image the ViT sees before padding (a tensor so that
            DataLoader workers hand it over through shared memory; 4x less than float32).
        grid: ``(h, w)`` token grid; the ViT input is ``(h*p, w*p)`` (tokencut: zero-padded in normalized
            units, i.e. with the mean colour, at the bottom and right).
        size: ``(H, W)`` of the original image.
    """

    rgb: torch.Tensor
    grid: tuple[int, int]
    size: tuple[int, int]


def to_pixels(rgbs: list[torch.Tensor], grid: tuple[int, int], patch: int, device: torch.device,
              mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """Batch ViT input: uint8 ``(Hr, Wr, 3)`` images of one size -> ``(B, 3, h*p, w*p)`` float32 on ``device``.

    ToTensor ([0, 1]) and per-channel normalization (ImageNet's by default), then zero padding at the bottom
    and right up to the grid.
    """
    x = torch.stack(rgbs).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    pad_h, pad_w = grid[0] * patch - x.shape[2], grid[1] * patch - x.shape[3]
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


def _round_to_patch(img: Image.Image, patch: int) -> Image.Image:
    """LANCZOS resize so both sides are ``round(side / p) * p`` (banker's rounding, at least ``p``)."""
    width = max(1, round(img.width / patch)) * patch
    height = max(1, round(img.height / patch)) * patch
    if (width, height) == img.size:
        return img
    return img.resize((width, height), Image.LANCZOS)


_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``img`` (the image itself when it is RGB already).

    16-bit grayscale (PIL modes ``I;16*``, and ``I``, which is read as 16-bit) is scaled by 255/65535 and
    rounded; PIL's own ``convert`` would clip every value above 255 to white.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        wide = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return img.convert("RGB")


def prepare(img: Image.Image, mode: str, patch: int, fixed_size: int = 480) -> Prepared:
    """Apply ``mode``'s geometry to a PIL image (converted by :func:`to_rgb`; see the module docstring)."""
    img = to_rgb(img)
    size = (img.height, img.width)
    if mode == "tokencut":
        grid = (-(-img.height // patch), -(-img.width // patch))
    elif mode == "saliency":
        img = _round_to_patch(img, patch)
        grid = (img.height // patch, img.width // patch)
    elif mode == "maskcut":
        img = _round_to_patch(img.resize((fixed_size, fixed_size), Image.LANCZOS), patch)
        grid = (img.height // patch, img.width // patch)
    else:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return Prepared(torch.from_numpy(np.array(img, dtype=np.uint8)), grid, size)


def upsample_tokens(mask: np.ndarray, patch: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a token mask: ``(h, w)`` -> ``(h*p, w*p)``, same dtype."""
    return np.repeat(np.repeat(mask, patch, axis=0), patch, axis=1)
