"""The labeling pipeline: decode (DataLoader workers) -> ViT keys (batched) -> cut (batched) -> post-process
(optionally in a process pool) -> append-only shard records -> atomic COCO JSON.

:func:`run` is a sequence of named stages: :func:`_check_options` (settings alone, before any work),
:func:`_open` (device, backend and memory via :mod:`.machine`, images, resume marker and ``--out``
protection, weights), :func:`_todo` (what the shards already hold), :func:`_label_batches` (per batch
:func:`_keys_and_cuts`, :func:`_submit_post`, :func:`_write_batch`) and :func:`_finish` (rank 0 merges the
shards into ``--out``).

See :mod:`ncutfast.label.records` for the resume and sharding guarantees and :mod:`ncutfast.label.coco` for
the output layout.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import multiprocessing
import os
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .._validate import check_eps, check_tau
from ._procs import die_with_parent
from .backbones import Backbone, BackboneError, amp_note, load_backbone
from .cut import ImageCut, cut_batch
from .errors import LabelError
from .geometry import MODES, prepare, to_rgb
from .machine import check_backend, check_memory, resolve_device, reuse_freed_memory
from .masks import REFINES, MasksError, MaskWriter
from .post import PostConfig, annotations_for, crf_available, overlay, pixel_masks
from .records import (
    ShardWriter,
    check_manifest,
    merge_parts,
    parts_dir_for,
    read_batches,
    same_command,
    write_manifest,
)
from .weights import WeightsError

__all__ = ["IMAGE_SUFFIXES", "MAX_FIXED_SIZE", "LabelError", "LabelConfig", "RunSummary", "list_images", "run",
           "default_tau", "default_arch", "overlay_names"]

log = logging.getLogger("ncutfast.label")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                            ".pgm"})

#: Largest ``--fixed-size``: 4096 x 4096 is already 65536 tokens at patch 16 (a 17 GB float32 affinity).
MAX_FIXED_SIZE = 4096


def default_tau(mode: str) -> float:
    """The papers' tau: 0.15 for MaskCut (CutLER's ImageNet run), 0.2 for TokenCut and its saliency mode."""
    return 0.15 if mode == "maskcut" else 0.2


def default_arch(mode: str) -> str:
    """The papers' backbone: ViT-B/8 for MaskCut, ViT-S/16 for TokenCut and saliency."""
    return "vit_base_patch8" if mode == "maskcut" else "vit_small_patch16"


@dataclass
class LabelConfig:
    """Everything a labeling run needs (the CLI options; see ``ncutfast label --help``)."""

    images: Path
    out: Path
    weights: Path
    arch: str = "vit_base_patch8"  # backbone name: vendored DINO arch or timm:<model> (see .backbones)
    mode: str = "maskcut"
    taus: tuple[float, ...] = (0.15,)
    n_masks: int = 3
    fixed_size: int = 480
    eps: float = 1e-5
    sign_rule: str = "canonical"
    batch_size: int = 16
    workers: int = 2
    post_workers: int = 0
    device: str = "auto"
    amp: str = "none"
    precision: str = "float32"
    backend: str = "auto"
    crf: bool = False
    visualize: Path | None = None
    visualize_count: int = 16
    progress: bool = True
    overwrite: bool = False
    masks_dir: Path | None = None
    refine: str = "none"


@dataclass
class RunSummary:
    """What a run did: image counts and seconds per stage (this rank only).

    ``annotations`` counts this run's new annotations; ``out_images`` / ``out_annotations`` what ``out``
    holds once written (rank 0), earlier runs' results included.
    """

    images: int = 0
    skipped: int = 0
    already_done: int = 0
    annotations: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("decode", "wait", "vit", "cut", "masks", "post", "write", "total"), 0.0))
    out: Path | None = None
    out_images: int = 0
    out_annotations: int = 0


def list_images(source: Path) -> tuple[Path, list[str]]:
    """The dataset's files, sorted, as paths relative to ``root`` (which is returned too).

    ``source`` is a folder (searched recursively for image suffixes, hidden entries skipped) or a text file
    with one path per line (blank lines and ``#`` comments skipped; relative paths are relative to the text
    file's folder). ``file_name`` in the JSON is the relative path. Symbolic links with an image suffix are
    listed even when they are dangling or loop: decoding them fails, so they are logged and counted in
    ``skipped_images`` like any unreadable image.
    """
    source = Path(source)
    if source.is_dir():
        files = sorted(
            p.relative_to(source).as_posix() for p in source.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_symlink() or p.is_file())
            and not any(part.startswith(".") for part in p.relative_to(source).parts)
        )
        root = source
    elif source.is_file():
        root = source.parent
        with open(source, encoding="utf-8") as fh:
            files = [line.strip() for line in fh if line.strip() and not line.lstrip().startswith("#")]
    else:
        raise LabelError(f"no such folder or list file: {source}")
    if not files:
        raise LabelError(f"no images found in {source} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return root, files


def overlay_names(files: list[str], count: int) -> dict[int, str]:
    """``--visualize`` file names of the first ``count`` images: ``a/photo.jpg`` -> ``a__photo.png``.

    When two of the dataset's files would get the same name (``photo.jpg`` and ``photo.png``), both keep
    their suffix (``photo.jpg.png``, ``photo.png.png``), so no overlay overwrites another.
    """
    flat = [f.replace("/", "__") for f in files]
    short = [str(Path(f).with_suffix(".png")) if Path(f).suffix else f + ".png" for f in flat]
    taken: dict[str, int] = {}
    for name in short:
        taken[name] = taken.get(name, 0) + 1
    return {i: short[i] if taken[short[i]] == 1 else flat[i] + ".png" for i in range(min(count, len(files)))}


class _Images(Dataset):
    """Decodes and prepares image ``i``; failures become ``{"index", "error"}`` items (never raised)."""

    def __init__(self, root: Path, files: list[str], mode: str, patch: int, fixed_size: int) -> None:
        self.root, self.files, self.mode, self.patch, self.fixed_size = root, files, mode, patch, fixed_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        t0 = time.perf_counter()
        try:
            with Image.open(self.root / self.files[i]) as img:
                img.load()
                prep = prepare(img, self.mode, self.patch, self.fixed_size)
        except Exception as exc:  # noqa: BLE001 -- any decode failure is logged and skipped, never fatal
            return {"index": i, "error": f"{type(exc).__name__}: {exc}"}
        return {"index": i, "prep": prep, "decode_s": time.perf_counter() - t0}


def _collate(items: list[dict]) -> list[dict]:
    return items


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest(cfg: LabelConfig, files: list[str]) -> dict:
    """Everything that changes the records; a resumed run must match it exactly."""
    return {
        "format": 1,
        "n_images": len(files),
        "images_sha256": hashlib.sha256("\n".join(files).encode("utf-8")).hexdigest(),
        "weights_sha256": _sha256(cfg.weights),
        "arch": cfg.arch, "mode": cfg.mode, "taus": list(cfg.taus), "n_masks": cfg.n_masks,
        "fixed_size": cfg.fixed_size, "eps": cfg.eps, "sign_rule": cfg.sign_rule,
        "batch_size": cfg.batch_size, "amp": cfg.amp, "precision": cfg.precision, "backend": cfg.backend,
        "crf": cfg.crf, "masks": cfg.masks_dir is not None, "refine": cfg.refine,
    }


def _check_options(cfg: LabelConfig) -> None:
    """Stage 0: the settings alone (no images, weights or devices touched yet)."""
    if cfg.mode not in MODES:
        raise LabelError(f"unknown mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    if cfg.crf and not crf_available():
        raise LabelError("--crf needs a DenseCRF package: pip install pydensecrf2")
    if cfg.crf and cfg.mode != "maskcut":
        raise LabelError("--crf applies to --mode maskcut only")
    _check_masks_options(cfg)
    if not 1 <= cfg.fixed_size <= MAX_FIXED_SIZE:
        raise LabelError(f"--fixed-size must lie in [1, {MAX_FIXED_SIZE}], got {cfg.fixed_size}")
    if cfg.batch_size < 1:
        raise LabelError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    try:
        for tau in cfg.taus:
            check_tau(tau)
        check_eps(cfg.eps)
    except (TypeError, ValueError) as exc:
        raise LabelError(str(exc)) from exc
    if Path(cfg.out).is_dir():
        raise LabelError(f"--out {cfg.out} is a folder; give the path of the JSON file to write, e.g. "
                         f"{Path(cfg.out) / 'labels.json'}")


def _check_memory(grids: list[tuple[int, int]], pixels: list[int], cfg: LabelConfig, dim: int,
                  device: torch.device, what: str) -> None:
    """:func:`~.machine.check_memory` with the run's ViT width ``dim``, precision and advice."""
    other = "--fixed-size" if cfg.mode == "maskcut" else "leave out the largest images"
    advice = f"lower --batch-size or {other}"
    check_memory(grids, pixels, dim, cfg.precision, device, what, advice)


def _setup_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; returns (rank, world)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=24))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _check_masks_options(cfg: LabelConfig) -> None:
    if cfg.refine not in REFINES:
        raise LabelError(f"unknown --refine {cfg.refine!r}; choose one of {', '.join(REFINES)}")
    if cfg.masks_dir is not None and cfg.mode != "saliency":
        raise LabelError("--masks-dir applies to --mode saliency only")
    if cfg.refine != "none" and cfg.masks_dir is None:
        raise LabelError("--refine bilateral writes DIR/bilateral/: give --masks-dir DIR")


def _open_masks(cfg: LabelConfig, files: list[str], manifest: dict, rank: int) -> MaskWriter | None:
    """The ``--masks-dir`` writer (rank 0 claims the folder first, the other ranks then join it)."""
    if cfg.masks_dir is None:
        return None
    try:
        if rank == 0:
            writer = MaskWriter.open(cfg.masks_dir, cfg.refine, files, manifest)
        _barrier()
        if rank != 0:
            writer = MaskWriter.open(cfg.masks_dir, cfg.refine, files, manifest)
    except MasksError as exc:
        raise LabelError(str(exc)) from exc
    return writer


def _write_masks(masks: MaskWriter, root: Path, files: list[str], items: list[dict], cuts: list[ImageCut],
                 patch: int, device: torch.device, cfg: LabelConfig) -> dict[int, np.ndarray]:
    """The ``--masks-dir`` stage of one batch; returns the soft bilateral outputs of the images to draw."""
    post_cfg = PostConfig(cfg.mode, patch)
    tokencut = [pixel_masks(cut, it["prep"].size, post_cfg)[0] for it, cut in zip(items, cuts, strict=True)]
    softs = masks.write(root, [it["index"] for it in items], files, tokencut, device)
    drawn = cfg.visualize_count if cfg.visualize is not None else 0
    return {i: s for i, s in softs.items() if i < drawn}


def _bilateral_overlay_ann(soft: np.ndarray, anns: list[dict]) -> dict:
    """The binary bilateral output (TokenCut's rule, against the image's TokenCut mask) as an overlay-only
    annotation."""
    from pycocotools import mask as mask_util

    from ..refine import bilateral_binary

    h, w = soft.shape
    tokencut = np.zeros((h, w), dtype=bool)
    for ann in anns:
        tokencut |= mask_util.decode({"size": [h, w], "counts": ann["segmentation"]["counts"].encode("ascii")}
                                     ).astype(bool)
    rle = mask_util.encode(np.asfortranarray(bilateral_binary(soft, tokencut).astype(np.uint8)))
    return {"segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
            "bbox": [float(v) for v in mask_util.toBbox(rle)]}


@dataclass
class _Job:
    """What the stages of one run share (built by :func:`_open`)."""

    cfg: LabelConfig
    root: Path
    files: list[str]
    backbone: Backbone
    device: torch.device
    rank: int
    world: int
    manifest: dict
    overlays: dict[int, str]
    masks: MaskWriter | None
    softs: dict[int, np.ndarray] = field(default_factory=dict)  # bilateral outputs still to be drawn

    @property
    def parts(self) -> Path:
        return parts_dir_for(self.cfg.out)

    def batch(self, j: int) -> list[int]:
        """Image indices of global batch ``j``."""
        bs = self.cfg.batch_size
        return list(range(j * bs, min(len(self.files), (j + 1) * bs)))


def _open(cfg: LabelConfig) -> _Job:
    """Stage 1: device and backend, images, the manifest and ``--out``, the backbone, a MaskCut batch's
    memory."""
    device = resolve_device(cfg.device)
    check_backend(cfg.backend, device)
    root, files = list_images(cfg.images)
    if not Path(cfg.weights).is_file():
        raise LabelError(f"weights file not found: {cfg.weights}")
    manifest = _manifest(cfg, files)
    if (parts_dir_for(cfg.out) / "manifest.json").exists():
        check_manifest(parts_dir_for(cfg.out), manifest)  # another command's shards: say how it differs
    if Path(cfg.out).exists() and not cfg.overwrite and not same_command(cfg.out, manifest):
        raise LabelError(f"--out {cfg.out} already exists and is not this label command's earlier output; "
                         "pass --overwrite to replace it, or choose another --out")
    try:
        backbone = load_backbone(cfg.arch, cfg.weights)
    except (WeightsError, BackboneError) as exc:
        raise LabelError(str(exc)) from exc
    if cfg.mode == "maskcut":
        side, count = max(1, round(cfg.fixed_size / backbone.patch)), min(cfg.batch_size, len(files))
        _check_memory([(side, side)] * count, [cfg.fixed_size**2] * count, cfg, backbone.dim, device,
                      f"a batch of {count} images at --fixed-size {cfg.fixed_size}")
    backbone.to(device)
    if (note := amp_note(cfg.amp, device)) is not None:
        log.warning(note)
    rank, world = _setup_distributed(device)
    if rank == 0:
        write_manifest(parts_dir_for(cfg.out), manifest)
    _barrier()
    if rank != 0:
        check_manifest(parts_dir_for(cfg.out), manifest)
    return _Job(cfg, root, files, backbone, device, rank, world, manifest,
                overlay_names(files, cfg.visualize_count) if cfg.visualize is not None else {},
                _open_masks(cfg, files, manifest, rank))


def _todo(job: _Job, summary: RunSummary) -> list[int]:
    """Stage 2: the global batches this rank still owes (corrupted shard records are reported, skipped)."""
    done, problems = read_batches(job.parts, job.manifest)
    if job.rank == 0:
        for problem in problems:
            log.warning("ignored a corrupted record in %s (%s)", job.parts, problem)
    n_batches = -(-len(job.files) // job.cfg.batch_size)
    summary.already_done = sum(len(rec["images"]) + len(rec["errors"]) for rec in done.values())
    if summary.already_done:
        log.info("resuming: %d images already labelled in %s", summary.already_done, job.parts)
    return [j for j in range(job.rank, n_batches, job.world) if j not in done]


def _keys_and_cuts(job: _Job, batch_id: int, items: list[dict], summary: RunSummary) -> list[ImageCut]:
    """ViT keys then the batched cut of the decoded ``items`` (checked against the memory available), and
    the ``--masks-dir`` files of the batch."""
    if not items:
        return []
    cfg, sec = job.cfg, summary.seconds
    preps = [it["prep"] for it in items]
    if cfg.mode != "maskcut":
        largest = max(items, key=lambda it: it["prep"].grid[0] * it["prep"].grid[1])
        _check_memory([p.grid for p in preps], [p.rgb.shape[0] * p.rgb.shape[1] for p in preps], cfg,
                      job.backbone.dim, job.device, f"batch {batch_id} (largest image: {job.files[largest['index']]}, "
                      f"{largest['prep'].grid[0]}x{largest['prep'].grid[1]} tokens)")
    t0 = time.perf_counter()
    feats = job.backbone.batch_keys([p.rgb for p in preps], [p.grid for p in preps], cfg.amp)
    if job.device.type == "cuda":
        torch.cuda.synchronize(job.device)
    sec["vit"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    cuts = cut_batch(feats, [p.grid for p in preps], mode=cfg.mode, taus=cfg.taus, n_masks=cfg.n_masks,
                     eps=cfg.eps, sign_rule=cfg.sign_rule, patch=job.backbone.patch, precision=cfg.precision,
                     backend=cfg.backend)
    sec["cut"] += time.perf_counter() - t0
    if job.masks is not None:
        t0 = time.perf_counter()
        job.softs.update(_write_masks(job.masks, job.root, job.files, items, cuts, job.backbone.patch,
                                      job.device, cfg))
        sec["masks"] += time.perf_counter() - t0
    return cuts


def _post_pool(workers: int) -> cf.ProcessPoolExecutor | None:
    """The post-processing pool (spawned workers that die with this process), or None for inline work."""
    if workers == 0:
        return None
    return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=die_with_parent, initargs=(os.getpid(),))


def _submit_post(job: _Job, pool: cf.ProcessPoolExecutor | None, items: list[dict],
                 cuts: list[ImageCut]) -> list:
    """Pixel masks and RLE of each image: futures when ``pool`` is given, else the annotation lists."""
    post_cfg = PostConfig(job.cfg.mode, job.backbone.patch, job.cfg.crf)
    out = []
    for it, cut in zip(items, cuts, strict=True):
        rgb = it["prep"].rgb.numpy() if job.cfg.crf else None
        if pool is not None:
            out.append(pool.submit(annotations_for, cut, it["prep"].size, post_cfg, rgb))
        else:
            out.append(annotations_for(cut, it["prep"].size, post_cfg, rgb))
    return out


@dataclass
class _Pending:
    """A batch whose post-processing may still run in the pool."""

    batch_id: int
    items: list[dict]
    cuts: list[ImageCut]
    posts: list
    errors: list[dict]


def _write_batch(job: _Job, batch: _Pending, writer: ShardWriter, bar, summary: RunSummary) -> None:
    """Collect a batch's annotations (and overlays), append its record to the shard, advance the bar."""
    t0 = time.perf_counter()
    images = []
    for it, cut, post in zip(batch.items, batch.cuts, batch.posts, strict=True):
        anns = post.result() if isinstance(post, cf.Future) else post
        prep, i = it["prep"], it["index"]
        images.append({"index": i, "file_name": job.files[i], "width": prep.size[1], "height": prep.size[0],
                       "annotations": anns})
        summary.annotations += len(anns)
        if i in job.overlays:
            soft = job.softs.pop(i, None)
            extra = [] if soft is None else [_bilateral_overlay_ann(soft, anns)]
            _visualize(job.cfg.visualize / job.overlays[i], job.root / job.files[i], anns + extra, cut)
        bar.update(1)
    summary.seconds["post"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    writer.append({"batch": batch.batch_id, "images": images, "errors": batch.errors})
    summary.seconds["write"] += time.perf_counter() - t0
    bar.update(len(batch.errors))


def _label_batches(job: _Job, todo: list[int], summary: RunSummary) -> None:
    """Stage 3: decode -> keys -> cut -> post -> one shard record per batch (post overlaps the next batch)."""
    from tqdm import tqdm

    cfg, sec = job.cfg, summary.seconds
    batches = [job.batch(j) for j in todo]
    writer = ShardWriter(job.parts, job.rank, job.manifest)
    pool = _post_pool(cfg.post_workers)
    loader = DataLoader(_Images(job.root, job.files, cfg.mode, job.backbone.patch, cfg.fixed_size),
                        batch_sampler=batches, collate_fn=_collate, num_workers=cfg.workers)
    bar = tqdm(total=sum(map(len, batches)), unit="img", disable=not cfg.progress or job.rank != 0,
               desc=f"label {cfg.mode}", smoothing=0.1)
    pending: deque[_Pending] = deque()
    try:
        t_wait = time.perf_counter()
        for batch_id, items in zip(todo, loader, strict=True):
            sec["wait"] += time.perf_counter() - t_wait
            errors = [{"index": it["index"], "file_name": job.files[it["index"]], "error": it["error"]}
                      for it in items if "error" in it]
            for err in errors:
                log.warning("skipped unreadable image %s (%s)", err["file_name"], err["error"])
            summary.skipped += len(errors)
            items = [it for it in items if "error" not in it]
            sec["decode"] += sum(it["decode_s"] for it in items)
            summary.images += len(items)
            cuts = _keys_and_cuts(job, batch_id, items, summary)
            t0 = time.perf_counter()
            pending.append(_Pending(batch_id, items, cuts, _submit_post(job, pool, items, cuts), errors))
            sec["post"] += time.perf_counter() - t0
            while len(pending) > (2 if pool is not None else 0):
                _write_batch(job, pending.popleft(), writer, bar, summary)
            t_wait = time.perf_counter()
        while pending:
            _write_batch(job, pending.popleft(), writer, bar, summary)
    finally:
        bar.close()
        writer.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _finish(job: _Job, summary: RunSummary) -> None:
    """Stage 4: when every rank is done, rank 0 merges the shards into ``--out`` (atomically)."""
    _barrier()
    if job.rank == 0:
        t0 = time.perf_counter()
        coco = merge_parts([job.parts], job.cfg.out)
        summary.seconds["write"] += time.perf_counter() - t0
        summary.out = job.cfg.out
        summary.out_images, summary.out_annotations = len(coco["images"]), len(coco["annotations"])
    _barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


def run(cfg: LabelConfig) -> RunSummary:
    """Label every image of ``cfg.images`` and write ``cfg.out`` (rank 0); resumes from ``<out>.parts``.

    While it runs, freed C-heap memory stays in the process for the next batch
    (:func:`~.machine.reuse_freed_memory`; glibc only, process-wide until the run returns).

    Raises:
        LabelError: bad settings, no images, unreadable/mismatched weights, no such device or backend, a
            batch too large for the memory available, an existing ``--out`` that is not this command's
            output (without ``overwrite``), or a parts directory from another command.
        OSError: the shards or ``--out`` cannot be written (no temporary file is left behind).
    """
    t_start = time.perf_counter()
    summary = RunSummary()
    _check_options(cfg)
    with reuse_freed_memory():
        job = _open(cfg)
        _label_batches(job, _todo(job, summary), summary)
        _finish(job, summary)
    summary.seconds["total"] = time.perf_counter() - t_start
    return summary


def _visualize(target: Path, source: Path, anns: list[dict], cut: ImageCut) -> None:
    """Write ``target``: the image at ``source`` with masks, boxes and (when known) the eigenvector heat-map."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as img:
        overlay(to_rgb(img), anns, cut.eigenvector).save(target)
