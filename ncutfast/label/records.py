"""Append-only per-shard records, resume, and the atomic merge into one COCO JSON.

Layout: ``<out>.parts/`` holds ``manifest.json`` (everything that changes the output: the image list's hash,
the model, the geometry and cut settings, the batch size) and one ``rank-XXXXX.jsonl`` per rank. The dataset
is cut into fixed global batches (consecutive images of the sorted list, ``batch_size`` each); rank ``r`` of
``world`` owns the batches ``j`` with ``j % world == r``. One JSON line records one finished batch (its images
with their annotations, and the images that could not be read); it is written with a single ``write`` and
fsync'ed, so a SIGKILL leaves at most a torn last line, which the next run truncates away and recomputes.
A complete line that is not a valid record of this run (a damaged disk block, a hand edit) is skipped and
reported; the records after it are kept and only its batch is recomputed.

Because an image is always processed inside the same global batch, a resumed run, a run with another world
size and a one-process run produce the same records, and :func:`merge_parts` (which orders by batch and
renumbers image and annotation ids from 1) writes the same JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from .coco import build_coco
from .errors import LabelError

__all__ = ["ManifestMismatch", "parts_dir_for", "read_manifest", "write_manifest", "check_manifest",
           "same_command", "info_from_manifest", "ShardWriter", "read_batches", "atomic_write_json",
           "merge_parts"]

log = logging.getLogger("ncutfast.label")

#: Settings that only MaskCut uses; a TokenCut or saliency file's ``info`` leaves them out.
MASKCUT_ONLY = ("n_masks", "fixed_size", "sign_rule", "crf")


class ManifestMismatch(LabelError):
    """The parts directory was written by a different command (other images, model or settings)."""


def parts_dir_for(out: str | os.PathLike[str]) -> Path:
    """The shard directory of an output file: ``labels.json`` -> ``labels.json.parts``."""
    return Path(str(out) + ".parts")


def atomic_write_json(path: Path, obj: object) -> None:
    """Write JSON to ``path`` via a temporary file, fsync and ``os.replace`` (never half a file).

    On any failure (disk full, read-only folder, an object JSON cannot encode) the temporary file is removed
    and the exception propagates; ``path`` is left as it was.
    """
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json_object(path: Path, what: str, expected: str, missing: str | None = None) -> dict:
    """The JSON object in ``path``; a missing, unreadable or non-JSON file, or a top level that is not an
    object, raises LabelError naming the file (``missing``: the message for a file that does not exist)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        if missing is None:
            raise LabelError(f"cannot read {path}: {exc.strerror or exc}") from exc
        raise LabelError(missing) from None
    except OSError as exc:
        raise LabelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise LabelError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise LabelError(f"{path} is not {what} (its top level is a JSON {type(data).__name__}, expected "
                         f"{expected})")
    return data


def read_manifest(parts: Path) -> dict:
    """The manifest of a parts folder, checked to be an object with a usable ``n_images`` and ``batch_size``.

    Raises:
        LabelError: no manifest, unreadable or not JSON, or not a label manifest.
    """
    path = parts / "manifest.json"
    manifest = _read_json_object(
        path, "a label manifest", "an object",
        missing=f"{parts} has no manifest.json: it is not the .parts folder of a label run")
    for key, low in (("n_images", 0), ("batch_size", 1)):
        if not _is_int(manifest.get(key)) or manifest[key] < low:
            raise LabelError(f"{path} is damaged: {key} must be an integer >= {low}, got {manifest.get(key)!r}")
    return manifest


def write_manifest(parts: Path, manifest: dict) -> None:
    """Create ``parts`` and its manifest, or check an existing one (raises :class:`ManifestMismatch`)."""
    parts.mkdir(parents=True, exist_ok=True)
    if (parts / "manifest.json").exists():
        check_manifest(parts, manifest)
    else:
        atomic_write_json(parts / "manifest.json", manifest)


def check_manifest(parts: Path, manifest: dict) -> None:
    """Raise :class:`ManifestMismatch` naming the differing settings if ``parts`` was written differently."""
    old = read_manifest(parts)
    diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
    if diff:
        raise ManifestMismatch(
            f"{parts} holds results of a different command (differs in: {', '.join(diff)}); "
            f"delete it or choose another --out to start over"
        )


def same_command(out: Path, manifest: dict) -> bool:
    """True when ``out``'s parts folder was written by the command described by ``manifest``.

    This is the resume marker that lets a rerun replace its own earlier ``out``.
    """
    try:
        return read_manifest(parts_dir_for(out)) == manifest
    except LabelError:
        return False


def info_from_manifest(manifest: dict) -> dict:
    """The output JSON's ``info`` block: the settings that shaped the labels (MaskCut's only for MaskCut)."""
    keys = ("arch", "weights_sha256", "mode", "taus", "n_masks", "fixed_size", "eps", "sign_rule", "crf",
            "precision")
    if manifest["mode"] != "maskcut":
        keys = tuple(k for k in keys if k not in MASKCUT_ONLY)
    return {
        "description": "ncutfast label: class-agnostic pseudo-labels (TokenCut / MaskCut on DINO keys)",
        **{k: manifest[k] for k in keys},
        "score": "1 - lambda2/lambda3 of the cut (relative eigengap, in [0, 1]); ncut = lambda2; "
                 "eigengap = lambda3 - lambda2",
    }


_IMAGE_KEYS = frozenset({"index", "file_name", "width", "height", "annotations"})


def _record_problem(rec: object, manifest: dict) -> str | None:
    """Why ``rec`` is not a batch record of the run described by ``manifest`` (None when it is one)."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not a batch record"
    bs, n = manifest["batch_size"], manifest["n_images"]
    batch = rec.get("batch")
    if not _is_int(batch) or not 0 <= batch * bs < n:
        return f"batch id {batch!r} is not a batch of this run"
    images, errors = rec.get("images"), rec.get("errors")
    if not isinstance(images, list) or not isinstance(errors, list):
        return "'images' and 'errors' must be lists"
    first, stop = batch * bs, min(n, (batch + 1) * bs)
    for img in images:
        if not isinstance(img, dict) or not _IMAGE_KEYS <= img.keys() or not isinstance(img["annotations"], list):
            return f"an image entry lacks one of {', '.join(sorted(_IMAGE_KEYS))}"
        if not all(isinstance(a, dict) for a in img["annotations"]):
            return "an annotation is not an object"
    for item in images + errors:
        if not isinstance(item, dict) or not _is_int(item.get("index")) or not first <= item["index"] < stop:
            return f"an entry's index is not an image of batch {batch}"
    if len(images) + len(errors) != stop - first:
        return f"batch {batch} should hold {stop - first} images, the record has {len(images) + len(errors)}"
    return None


def _scan(path: Path, manifest: dict) -> tuple[list[dict], list[str], int]:
    """Read a shard: (valid records, a description of each bad complete line, bytes of complete lines).

    A last line without its newline is a write torn by a kill: it is neither a record nor a problem.
    """
    records: list[dict] = []
    problems: list[str] = []
    complete = 0
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):
                break
            complete += len(line)
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                problems.append(f"{path.name} line {number}: not JSON")
                continue
            problem = _record_problem(rec, manifest)
            if problem is None:
                records.append(rec)
            else:
                problems.append(f"{path.name} line {number}: {problem}")
    return records, problems, complete


def read_batches(parts: Path, manifest: dict) -> tuple[dict[int, dict], list[str]]:
    """Every finished batch recorded in any shard of ``parts``: ``({batch_id: record}, problems)``.

    The first valid copy of a batch wins. ``problems`` describes each corrupted line that was skipped
    (``"rank-00000.jsonl line 5: not JSON"``); the valid records after it are kept.
    """
    done: dict[int, dict] = {}
    problems: list[str] = []
    for path in sorted(parts.glob("rank-*.jsonl")):
        records, bad, _ = _scan(path, manifest)
        problems += bad
        for rec in records:
            done.setdefault(rec["batch"], rec)
    return done, problems


class ShardWriter:
    """Append-only writer of one rank's shard; truncates a torn last line left by a killed run."""

    def __init__(self, parts: Path, rank: int, manifest: dict) -> None:
        self.path = parts / f"rank-{rank:05d}.jsonl"
        if self.path.exists():
            _, _, complete = _scan(self.path, manifest)
            if complete != self.path.stat().st_size:
                os.truncate(self.path, complete)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict) -> None:
        """Append one batch record as a single line, then fsync."""
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"short write to {self.path}")
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file descriptor."""
        os.close(self._fd)


def _merge_shards(dirs: list[Path]) -> dict:
    """The COCO dict of finished ``.parts`` folders of one command (ordered by global batch id)."""
    manifests = [read_manifest(d) for d in dirs]
    if any(m != manifests[0] for m in manifests[1:]):
        raise LabelError("the .parts folders were written by different commands")
    manifest = manifests[0]
    batches: dict[int, dict] = {}
    problems: list[str] = []
    for d in dirs:
        done, bad = read_batches(d, manifest)
        problems += [f"{d / p}" for p in bad]
        for j, rec in done.items():
            batches.setdefault(j, rec)
    n_batches = -(-manifest["n_images"] // manifest["batch_size"])
    missing = [j for j in range(n_batches) if j not in batches]
    if missing:
        because = (f"; corrupted records were skipped: {'; '.join(problems[:3])}"
                   f"{' ...' if len(problems) > 3 else ''}" if problems else "")
        raise LabelError(f"{len(missing)} of {n_batches} batches are not finished yet (first missing: batch "
                         f"{missing[0]}){because}; rerun the same label command to complete them")
    for p in problems:
        log.warning("merge: skipped a corrupted record (%s); its batch has a valid copy", p)
    return build_coco([batches[j] for j in range(n_batches)], info_from_manifest(manifest))


def _read_coco(path: Path) -> dict:
    """A COCO JSON file, checked enough to be merged without dropping anything silently."""
    data = _read_json_object(path, "a COCO JSON file", "an object with 'images' and 'annotations'")
    images, anns = data.get("images"), data.get("annotations")
    if not isinstance(images, list) or not isinstance(anns, list):
        raise LabelError(f"{path} is not a COCO JSON file ('images' and 'annotations' must be lists)")
    if not isinstance(data.get("info", {}), dict):
        raise LabelError(f"{path}: 'info' must be an object")
    ids: set[int] = set()
    for img in images:
        if not (isinstance(img, dict) and _is_int(img.get("id")) and isinstance(img.get("file_name"), str)
                and _is_int(img.get("width")) and _is_int(img.get("height"))):
            raise LabelError(f"{path}: every image needs an integer id, a file_name, a width and a height")
        if img["id"] in ids:
            raise LabelError(f"{path}: image id {img['id']} appears twice, so its annotations are ambiguous")
        ids.add(img["id"])
    orphans = [a for a in anns if not isinstance(a, dict) or a.get("image_id") not in ids]
    if orphans:
        first = orphans[0].get("image_id") if isinstance(orphans[0], dict) else orphans[0]
        raise LabelError(f"{path}: {len(orphans)} annotations refer to no image of the file (first: image_id "
                         f"{first!r})")
    return data


def _merge_files(paths: list[Path]) -> dict:
    """The COCO dict of several COCO files of one labeling setup, ids renumbered, duplicates removed."""
    records: list[dict] = []
    seen: dict[str, Path] = {}
    settings: dict | None = None
    first_path = paths[0]
    skipped = 0
    for path in paths:
        data = _read_coco(path)
        info = {k: v for k, v in data.get("info", {}).items() if k != "skipped_images"}
        if settings is None:
            settings = info
        elif info != settings:
            diff = sorted(k for k in set(info) | set(settings) if info.get(k) != settings.get(k))
            raise LabelError(f"{path} and {first_path} were labelled with different settings (info differs in: "
                             f"{', '.join(diff)}); merge only files of one labeling setup")
        extra = data.get("info", {}).get("skipped_images", 0)
        skipped += extra if _is_int(extra) else 0
        anns_of: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            anns_of.setdefault(ann["image_id"], []).append(
                {k: v for k, v in ann.items() if k not in ("id", "image_id")})
        images, dups = [], []
        for img in data["images"]:
            if img["file_name"] in seen:
                dups.append(img["file_name"])
                continue
            seen[img["file_name"]] = path
            images.append({**{k: img[k] for k in ("file_name", "width", "height")},
                           "annotations": anns_of.get(img["id"], [])})
        if dups:
            log.warning("merge: %d images of %s were already merged (same file_name, e.g. %s from %s); kept the "
                        "first copy", len(dups), path, dups[0], seen[dups[0]])
        records.append({"batch": len(records), "errors": [], "images": images})
    coco = build_coco(records, settings or {})
    coco["info"]["skipped_images"] = skipped
    return coco


def merge_parts(inputs: list[Path], out: Path, *, overwrite: bool = False) -> dict:
    """Merge finished shards (``<out>.parts`` folders) or COCO JSON files into one JSON at ``out``.

    Parts folders (all written by the same command) are merged by global batch id, so the result equals a
    one-process run's file. JSON files (of one labeling setup: equal ``info`` apart from ``skipped_images``,
    which is summed) are concatenated in the given order with image and annotation ids renumbered from 1;
    an image whose ``file_name`` was already merged is dropped with a warning. The file is written
    atomically; an existing ``out`` is replaced only with ``overwrite`` or when it is the output of the merged
    ``.parts`` folder itself (``labels.json`` of ``labels.json.parts``). Returns the merged dict.

    Raises:
        LabelError: ``out`` is a folder or an existing file not to be replaced, a batch is missing (a rank
            has not finished; corrupted records are named), inputs mix folders and files, the folders come
            from different commands, the files' settings differ, or an input is not a label manifest / COCO
            file (the message names it and what is wrong).
    """
    paths = [Path(p) for p in inputs]
    dirs = [p for p in paths if p.is_dir()]
    if dirs and len(dirs) != len(paths):
        raise LabelError("merge takes either .parts folders or COCO JSON files, not both")
    out = Path(out)
    if out.is_dir():
        raise LabelError(f"--out {out} is a folder; give the path of the JSON file to write")
    own = any(parts_dir_for(out).resolve() == d.resolve() for d in dirs)
    if out.exists() and not overwrite and not own:
        raise LabelError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out")
    coco = _merge_shards(dirs) if dirs else _merge_files(paths)
    atomic_write_json(out, coco)
    return coco
