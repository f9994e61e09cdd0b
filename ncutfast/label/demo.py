"""A tiny generated dataset: images with a few drawn shapes on a textured background (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["make_demo_images"]


def make_demo_images(folder: str | Path, n: int = 8, *, size: tuple[int, int] = (160, 120), seed: int = 0,
                     subfolders: int = 2) -> list[Path]:
    """Write ``n`` JPEG/PNG images of 1-3 filled shapes into ``folder/class_k/`` and return their paths.

    Args:
        folder: destination (created).
        n: number of images.
        size: (W, H) of the first image; later ones vary by up to +-25% (sizes and aspect ratios differ).
        seed: RNG seed; the same seed gives the same files.
        subfolders: images are spread over this many ``class_k`` folders (CutLER's ImageNet layout).
    """
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    paths = []
    for i in range(n):
        w = int(size[0] * (1 + (0.5 * rng.random() - 0.25) * (i > 0)))
        h = int(size[1] * (1 + (0.5 * rng.random() - 0.25) * (i > 0)))
        bg = rng.integers(40, 90, 3)
        noise = rng.integers(-12, 13, (h, w, 3))
        img = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            x1, y1 = x0 + int(rng.integers(w // 6, w // 2)), y0 + int(rng.integers(h // 6, h // 2))
            colour = tuple(int(c) for c in rng.integers(150, 256, 3))
            if rng.random() < 0.5:
                draw.ellipse([x0, y0, x1, y1], fill=colour)
            else:
                draw.rectangle([x0, y0, x1, y1], fill=colour)
        sub = folder / f"class_{i % max(1, subfolders)}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img_{i:04d}.{'png' if i % 2 else 'jpg'}"
        img.save(path)
        paths.append(path)
    return paths
