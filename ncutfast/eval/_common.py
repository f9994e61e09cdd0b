"""What the three metrics share: the error type, how files are matched, label JSON and CSV I/O.

Matching rule: an image is identified by the **stem of the last component** of its file name, so
``JPEGImages/000005.jpg`` (a label JSON's ``file_name``), ``000005`` (a VOC ``ImageSets`` line),
``Annotations/000005.xml`` and ``train2014/COCO_train2014_000000000009.jpg`` (a COCO20k list line) are all
``000005`` / ``COCO_train2014_000000000009``. Folders in a ``file_name`` (class folders, ``train2014/``) are
ignored; two entries of one file with the same stem are an error (:class:`EvalError` naming both).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

__all__ = ["EvalError", "image_key", "read_json", "read_coco_gt", "keyed_images", "load_labels",
           "annotations_by_image", "read_image_list", "select_images", "write_csv"]

PathLike = str | os.PathLike[str]


class EvalError(ValueError):
    """A user-facing evaluation error (missing or malformed file, unmatched images); the CLI exits with 2."""


def image_key(name: str) -> str:
    """The matching key of a file name: the stem of its last path component (``a/b/c.jpg`` -> ``c``)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    dot = base.rfind(".")
    return base[:dot] if 0 < dot < len(base) - 1 else base  # PurePosixPath(base).stem, without its cost


def read_json(path: PathLike, what: str) -> object:
    """Parse a JSON file; a missing or malformed file raises :class:`EvalError` naming it and ``what`` it is."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{what} {path}: no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvalError(f"{what} {path}: not valid JSON ({exc})") from None


def _coco_lists(data: object, path: PathLike, what: str) -> Mapping:
    if not (isinstance(data, Mapping) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise EvalError(f"{what} {path}: not a COCO-style JSON (needs 'images' and 'annotations' lists)")
    for img in data["images"]:
        if not (isinstance(img, Mapping) and "id" in img and isinstance(img.get("file_name"), str)):
            raise EvalError(f"{what} {path}: an entry of 'images' lacks 'id' or 'file_name'")
    return data


def read_coco_gt(path: PathLike) -> Mapping:
    """A COCO instances JSON (a folder or a file without ``images``/``annotations`` lists raises EvalError)."""
    if Path(path).is_dir():
        raise EvalError(f"COCO ground truth {path} is a folder; an instances JSON file is expected")
    data = read_json(path, "COCO ground truth")
    if not (isinstance(data, Mapping) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise EvalError(f"COCO ground truth {path}: not a COCO instances JSON (needs 'images' and 'annotations' "
                        "lists)")
    return data


def keyed_images(data: Mapping, path: PathLike, what: str) -> dict[str, Mapping]:
    """``{image_key(file_name): image}`` of a COCO-style JSON; duplicate keys raise :class:`EvalError`."""
    out: dict[str, Mapping] = {}
    for img in data["images"]:
        key = image_key(img["file_name"])
        if key in out:
            raise EvalError(f"{what} {path}: duplicate file name {key!r} ({out[key]['file_name']} and "
                            f"{img['file_name']}); images are matched by file name without folders")
        out[key] = img
    return out


def load_labels(pred: PathLike | Mapping, what: str = "predictions") -> tuple[Mapping, dict[str, Mapping], str]:
    """A label JSON (``ncutfast label``'s output, or any COCO-style file) keyed by image.

    Returns ``(data, {key: image}, name)`` where ``name`` names the source in messages. An empty ``images``
    list raises :class:`EvalError`.
    """
    name = "<dict>" if isinstance(pred, Mapping) else str(pred)
    data = pred if isinstance(pred, Mapping) else read_json(pred, what)
    data = _coco_lists(data, name, what)
    if not data["images"]:
        raise EvalError(f"{what} {name}: no images (empty prediction set)")
    return data, keyed_images(data, name, what), name


def annotations_by_image(data: Mapping) -> dict[object, list[Mapping]]:
    """``{image_id: [annotation, ...]}`` in file order."""
    out: dict[object, list[Mapping]] = {}
    for ann in data["annotations"]:
        out.setdefault(ann.get("image_id"), []).append(ann)
    return out


def read_image_list(image_list: PathLike | Sequence[str]) -> list[str]:
    """Keys of an image list: a text file (one name per line; blank lines and ``#`` comments skipped) or a
    sequence of names. Duplicates raise :class:`EvalError`."""
    if isinstance(image_list, (str, os.PathLike)):
        path = Path(image_list)
        if not path.is_file():
            raise EvalError(f"image list {path}: no such file")
        with open(path, encoding="utf-8") as fh:
            names = [line.strip() for line in fh if line.strip() and not line.lstrip().startswith("#")]
        source = str(path)
    else:
        names, source = [str(n) for n in image_list], "image list"
    if not names:
        raise EvalError(f"{source}: no image names")
    keys: dict[str, str] = {}
    for n in names:
        k = image_key(n)
        if k in keys:
            raise EvalError(f"{source}: duplicate file name {k!r} ({keys[k]} and {n})")
        keys[k] = n
    return list(keys)


def write_csv(path: PathLike, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a CSV through a temporary file in the same folder; an existing ``path`` is never overwritten."""
    path = Path(path)
    if path.exists():
        raise EvalError(f"per-image file {path} already exists; choose another path (it is never overwritten)")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
        if path.exists():
            raise EvalError(f"per-image file {path} appeared while writing; it is never overwritten")
        os.replace(tmp, path)
    except OSError as exc:
        raise EvalError(f"per-image file {path}: cannot write ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


def select_images(gt_images: Mapping[str, object], preds: Mapping[str, Mapping], gt: PathLike, source: str,
                  image_list: PathLike | Sequence[str] | None) -> list[str]:
    """The keys to evaluate: the image list's (each must be a key of ``gt_images``; predictions of other
    images are ignored), or every GT image in order (then every prediction must be a GT image). Raises
    :class:`EvalError` otherwise; ``gt`` and ``source`` name the files in its message."""
    if image_list is not None:
        keys = read_image_list(image_list)
        unknown = [k for k in keys if k not in gt_images]
        if unknown:
            raise EvalError(f"image list: {len(unknown)} image(s) not in the ground truth {gt}, e.g. {unknown[0]!r}")
        return keys
    unknown = [k for k in preds if k not in gt_images]
    if unknown:
        raise EvalError(f"predictions {source}: {preds[unknown[0]]['file_name']} is not in the ground truth {gt} "
                        f"({len(unknown)} such image(s)); use --image-list to evaluate a subset")
    return list(gt_images)
