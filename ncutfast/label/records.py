"""Append-only per-shard records, resume, and the atomic merge into one COCO JSON.

Layout: ``<out>.parts/`` holds ``manifest.json`` (everything that changes the output: the image list's hash,
the model, the geometry and cut settings, the batch size) and one ``rank-XXXXX.jsonl`` per rank. The dataset
is cut into fixed global batches (consecutive images of the sorted list, ``batch_size`` each); rank ``r`` of
``world`` owns the batches ``j`` with ``j % world == r``. One JSON line records one finished batch (its images
with their annotations, and the images that could not be read); it is written with a single ``write`` and
fsync'ed, so a SIGKILL leaves at most a torn last line, which the next run truncates away and recomputes.

Because an image is always processed inside the same global batch, a resumed run, a run with another world
size and a one-process run produce the same records, and :func:`merge` (which orders by batch and renumbers
image and annotation ids from 1) writes the same JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["ManifestMismatch", "parts_dir_for", "write_manifest", "check_manifest", "ShardWriter",
           "read_batches", "atomic_write_json"]


class ManifestMismatch(Exception):
    """The parts directory was written by a different command (other images, model or settings)."""


def parts_dir_for(out: str | os.PathLike[str]) -> Path:
    """The shard directory of an output file: ``labels.json`` -> ``labels.json.parts``."""
    return Path(str(out) + ".parts")


def atomic_write_json(path: Path, obj: object) -> None:
    """Write JSON to ``path`` via a temporary file, fsync and ``os.replace`` (never half a file)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, separators=(",", ":"))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_manifest(parts: Path, manifest: dict) -> None:
    """Create ``parts`` and its manifest, or check an existing one (raises :class:`ManifestMismatch`)."""
    parts.mkdir(parents=True, exist_ok=True)
    path = parts / "manifest.json"
    if path.exists():
        check_manifest(parts, manifest)
    else:
        atomic_write_json(path, manifest)


def check_manifest(parts: Path, manifest: dict) -> None:
    """Raise :class:`ManifestMismatch` naming the differing settings if ``parts`` was written differently."""
    with open(parts / "manifest.json", encoding="utf-8") as fh:
        old = json.load(fh)
    diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
    if diff:
        raise ManifestMismatch(
            f"{parts} holds results of a different command (differs in: {', '.join(diff)}); "
            f"delete it or choose another --out to start over"
        )


def _valid_lines(path: Path) -> tuple[list[dict], int]:
    """Parse complete JSON lines of a shard; returns the records and the byte length of the valid prefix."""
    records: list[dict] = []
    good = 0
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good += len(line)
    return records, good


def read_batches(parts: Path) -> dict[int, dict]:
    """Every finished batch recorded in any shard of ``parts``: ``{batch_id: record}`` (first copy wins)."""
    done: dict[int, dict] = {}
    for path in sorted(parts.glob("rank-*.jsonl")):
        for rec in _valid_lines(path)[0]:
            done.setdefault(int(rec["batch"]), rec)
    return done


class ShardWriter:
    """Append-only writer of one rank's shard; truncates a torn last line left by a killed run."""

    def __init__(self, parts: Path, rank: int) -> None:
        self.path = parts / f"rank-{rank:05d}.jsonl"
        if self.path.exists():
            _, good = _valid_lines(self.path)
            if good != self.path.stat().st_size:
                os.truncate(self.path, good)
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
