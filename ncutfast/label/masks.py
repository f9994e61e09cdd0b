"""``--masks-dir``: per-image saliency masks as PNG files, TokenCut's and (``--refine bilateral``) refined.

Layout (what ``ncutfast eval saliency --pred DIR/<kind>`` reads): for every image ``<path>/<stem>.<ext>`` of
the dataset (relative to its root), at the image's original resolution,

- ``DIR/tokencut/<path>/<stem>.png``: the TokenCut mask (the seed's component, nearest-neighbour upsampled),
  8-bit grey 0 / 255;
- ``DIR/bilateral/<path>/<stem>.png`` with ``--refine bilateral``: the bilateral solver's soft output
  (``shared/spec/tokencut.md`` section 3, :func:`ncutfast.refine.bilateral_solve`, on the original RGB
  file) clipped to [0, 1] and stored as ``round(255 * v)``.

Resume: ``DIR/ncutfast-masks.json`` records the run's manifest (the label run's settings and image list). A
folder without it must not hold any of the files the run would write (we never overwrite a file we did not
write); a folder with it must come from the same command. A batch's PNG files are written (each atomically)
before its record, so a batch interrupted in between is recomputed and rewrites only its own files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from .records import atomic_write_json

__all__ = ["REFINES", "MasksError", "MaskWriter", "mask_paths"]

REFINES = ("none", "bilateral")
_MARKER = "ncutfast-masks.json"


class MasksError(Exception):
    """A user-facing problem with ``--masks-dir`` (foreign files, another run's folder, clashing names)."""


def mask_paths(folder: Path, kinds: tuple[str, ...], files: list[str]) -> dict[str, list[Path]]:
    """``{kind: [folder/kind/<path>/<stem>.png per file]}``; raises :class:`MasksError` when two files share
    a target (``a.jpg`` and ``a.png`` in one folder)."""
    rel = [PurePosixPath(f).with_suffix(".png") for f in files]
    seen: dict[PurePosixPath, str] = {}
    for name, target in zip(files, rel, strict=True):
        if target in seen:
            raise MasksError(f"--masks-dir: {seen[target]} and {name} would both be written to {target}; "
                             "rename one of them")
        seen[target] = name
    return {kind: [folder / kind / r for r in rel] for kind in kinds}


def _write_png(path: Path, values: np.ndarray) -> None:
    """Write a uint8 ``(H, W)`` grey PNG via a temporary file and ``os.replace`` (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        Image.fromarray(values).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class MaskWriter:
    """Writes the masks of each batch (see the module docstring); :meth:`open` checks and claims the folder."""

    folder: Path
    refine: str
    paths: dict[str, list[Path]]

    @classmethod
    def open(cls, folder: Path, refine: str, files: list[str], manifest: dict) -> MaskWriter:
        """Claim ``folder`` for this run (write its marker) or resume it.

        Raises:
            MasksError: the folder is another run's, or holds a file this run would write but did not.
        """
        kinds = ("tokencut", "bilateral") if refine == "bilateral" else ("tokencut",)
        paths = mask_paths(folder, kinds, files)
        marker = folder / _MARKER
        if marker.exists():
            with open(marker, encoding="utf-8") as fh:
                if json.load(fh) != manifest:
                    raise MasksError(f"--masks-dir {folder} was written by a different label command (other "
                                     "images, model or settings); use another folder")
        else:
            for kind in kinds:
                for path in paths[kind]:
                    if path.exists():
                        raise MasksError(f"--masks-dir: {path} already exists and was not written by this "
                                         "command; use an empty folder (nothing is overwritten)")
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(marker, manifest)
        return cls(folder, refine, paths)

    def write(self, root: Path, indices: list[int], files: list[str], tokencut_masks: list[np.ndarray],
              device: torch.device) -> dict[int, np.ndarray]:
        """Write the masks of one batch; returns ``{index: soft bilateral output}`` (float64 ``(H, W)``,
        empty without ``--refine bilateral``).

        ``tokencut_masks``: bool ``(H, W)`` per image at the original resolution. The bilateral solver runs
        once for the whole batch on ``device``, on the original RGB files under ``root``.
        """
        for i, mask in zip(indices, tokencut_masks, strict=True):
            _write_png(self.paths["tokencut"][i], mask.astype(np.uint8) * 255)
        if self.refine != "bilateral" or not indices:
            return {}
        from ..refine import bilateral_solve

        images = []
        for i in indices:
            with Image.open(root / files[i]) as img:
                images.append(torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)))
        softs = bilateral_solve(images, [torch.from_numpy(m) for m in tokencut_masks], device=device)
        out = {}
        for i, soft in zip(indices, softs, strict=True):
            soft_np = soft.cpu().numpy()
            _write_png(self.paths["bilateral"][i], np.rint(np.clip(soft_np, 0.0, 1.0) * 255.0).astype(np.uint8))
            out[i] = soft_np
        return out
