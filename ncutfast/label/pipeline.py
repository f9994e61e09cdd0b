"""The labeling pipeline: decode (DataLoader workers) -> ViT keys (batched) -> cut (batched) -> post-process
(optionally in a process pool) -> append-only shard records -> atomic COCO JSON.

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
from .backbones import BackboneError, amp_note, load_backbone
from .coco import build_coco
from .cut import ImageCut, cut_batch
from .geometry import MODES, prepare
from .masks import REFINES, MasksError, MaskWriter
from .post import PostConfig, annotations_for, crf_available, overlay, pixel_masks
from .records import (
    ManifestMismatch,
    ShardWriter,
    atomic_write_json,
    check_manifest,
    parts_dir_for,
    read_batches,
    write_manifest,
)
from .weights import WeightsError

__all__ = ["IMAGE_SUFFIXES", "LabelError", "LabelConfig", "RunSummary", "list_images", "run", "merge_parts",
           "default_tau", "default_arch"]

log = logging.getLogger("ncutfast.label")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                            ".pgm"})


class LabelError(Exception):
    """A user-facing error (bad input, weights or settings); the CLI prints it and exits with status 2."""


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
    masks_dir: Path | None = None
    refine: str = "none"


@dataclass
class RunSummary:
    """What a run did: image counts and seconds per stage (this rank only)."""

    images: int = 0
    skipped: int = 0
    already_done: int = 0
    annotations: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("decode", "wait", "vit", "cut", "masks", "post", "write", "total"), 0.0))
    out: Path | None = None


def list_images(source: Path) -> tuple[Path, list[str]]:
    """The dataset's files, sorted, as paths relative to ``root`` (which is returned too).

    ``source`` is a folder (searched recursively for image suffixes, hidden entries skipped) or a text file
    with one path per line (blank lines and ``#`` comments skipped; relative paths are relative to the text
    file's folder). ``file_name`` in the JSON is the relative path.
    """
    source = Path(source)
    if source.is_dir():
        files = sorted(
            p.relative_to(source).as_posix() for p in source.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
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


def _info(manifest: dict) -> dict:
    keys = ("arch", "weights_sha256", "mode", "taus", "n_masks", "fixed_size", "eps", "sign_rule", "crf",
            "precision")
    return {
        "description": "ncutfast label: class-agnostic pseudo-labels (TokenCut / MaskCut on DINO keys)",
        **{k: manifest[k] for k in keys},
        "score": "1 - lambda2/lambda3 of the cut (relative eigengap, in [0, 1]); ncut = lambda2; "
                 "eigengap = lambda3 - lambda2",
    }


def _setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=24))
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if device == "auto":
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return rank, world, dev


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _log_skips(records: list[dict]) -> None:
    for err in records:
        log.warning("skipped unreadable image %s (%s)", err["file_name"], err["error"])


def run(cfg: LabelConfig) -> RunSummary:
    """Label every image of ``cfg.images`` and write ``cfg.out`` (rank 0); resumes from ``<out>.parts``.

    Raises:
        LabelError: no images, unreadable/mismatched weights, a parts directory from another command, or
            ``--crf`` without a DenseCRF package.
    """
    t_start = time.perf_counter()
    summary = RunSummary()
    sec = summary.seconds
    if cfg.mode not in MODES:
        raise LabelError(f"unknown mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    if cfg.crf and not crf_available():
        raise LabelError("--crf needs a DenseCRF package: pip install pydensecrf2")
    if cfg.crf and cfg.mode != "maskcut":
        raise LabelError("--crf applies to --mode maskcut only")
    _check_masks_options(cfg)
    try:
        for tau in cfg.taus:
            check_tau(tau)
        check_eps(cfg.eps)
    except (TypeError, ValueError) as exc:
        raise LabelError(str(exc)) from exc
    root, files = list_images(cfg.images)
    try:
        backbone = load_backbone(cfg.arch, cfg.weights)
    except (WeightsError, BackboneError) as exc:
        raise LabelError(str(exc)) from exc
    patch = backbone.patch
    rank, world, device = _setup_distributed(cfg.device)
    backbone.to(device)
    if (note := amp_note(cfg.amp, device)) is not None:
        log.warning(note)
    parts = parts_dir_for(cfg.out)
    manifest = _manifest(cfg, files)
    try:
        if rank == 0:
            write_manifest(parts, manifest)
        _barrier()
        if rank != 0:
            check_manifest(parts, manifest)
    except ManifestMismatch as exc:
        raise LabelError(str(exc)) from exc
    masks = _open_masks(cfg, files, manifest, rank)

    bs = cfg.batch_size
    n_batches = -(-len(files) // bs)
    done = read_batches(parts)
    mine = [j for j in range(rank, n_batches, world) if j not in done]
    summary.already_done = sum(len(rec["images"]) + len(rec["errors"]) for rec in done.values())
    if summary.already_done:
        log.info("resuming: %d images already labelled in %s", summary.already_done, parts)
    batches = [list(range(j * bs, min(len(files), (j + 1) * bs))) for j in mine]
    writer = ShardWriter(parts, rank)
    post_cfg = PostConfig(cfg.mode, patch, cfg.crf)
    pool = (cf.ProcessPoolExecutor(cfg.post_workers, mp_context=multiprocessing.get_context("spawn"))
            if cfg.post_workers > 0 else None)
    loader = DataLoader(_Images(root, files, cfg.mode, patch, cfg.fixed_size),
                        batch_sampler=batches, collate_fn=_collate, num_workers=cfg.workers)
    from tqdm import tqdm

    bar = tqdm(total=sum(map(len, batches)), unit="img", disable=not cfg.progress or rank != 0,
               desc=f"label {cfg.mode}", smoothing=0.1)
    pending: deque = deque()
    softs: dict[int, np.ndarray] = {}  # bilateral outputs of the images still to be drawn

    def finish_oldest() -> None:
        batch_id, items, cuts, futures, errors = pending.popleft()
        t0 = time.perf_counter()
        images = []
        for it, cut, fut in zip(items, cuts, futures, strict=True):
            anns = fut.result() if pool is not None else fut
            prep = it["prep"]
            images.append({"index": it["index"], "file_name": files[it["index"]], "width": prep.size[1],
                           "height": prep.size[0], "annotations": anns})
            summary.annotations += len(anns)
            if cfg.visualize is not None and it["index"] < cfg.visualize_count:
                soft = softs.pop(it["index"], None)
                extra = [] if soft is None else [_bilateral_overlay_ann(soft, anns)]
                _visualize(cfg.visualize, root, files[it["index"]], anns + extra, cut)
        sec["post"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        writer.append({"batch": batch_id, "images": images, "errors": errors})
        sec["write"] += time.perf_counter() - t0
        bar.update(len(items) + len(errors))

    try:
        t_wait = time.perf_counter()
        for batch_id, items in zip(mine, loader, strict=True):
            sec["wait"] += time.perf_counter() - t_wait
            errors = [{"index": it["index"], "file_name": files[it["index"]], "error": it["error"]}
                      for it in items if "error" in it]
            _log_skips(errors)
            summary.skipped += len(errors)
            items = [it for it in items if "error" not in it]
            sec["decode"] += sum(it["decode_s"] for it in items)
            summary.images += len(items)
            cuts: list[ImageCut] = []
            if items:
                t0 = time.perf_counter()
                feats = backbone.batch_keys([it["prep"].rgb for it in items],
                                            [it["prep"].grid for it in items], cfg.amp)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                sec["vit"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                cuts = cut_batch(feats, [it["prep"].grid for it in items], mode=cfg.mode, taus=cfg.taus,
                                 n_masks=cfg.n_masks, eps=cfg.eps, sign_rule=cfg.sign_rule, patch=patch,
                                 precision=cfg.precision, backend=cfg.backend)
                sec["cut"] += time.perf_counter() - t0
                if masks is not None:
                    t0 = time.perf_counter()
                    softs.update(_write_masks(masks, root, files, items, cuts, patch, device, cfg))
                    sec["masks"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            futures = []
            for it, cut in zip(items, cuts, strict=True):
                rgb = it["prep"].rgb.numpy() if cfg.crf else None
                if pool is not None:
                    futures.append(pool.submit(annotations_for, cut, it["prep"].size, post_cfg, rgb))
                else:
                    futures.append(annotations_for(cut, it["prep"].size, post_cfg, rgb))
            sec["post"] += time.perf_counter() - t0
            pending.append((batch_id, items, cuts, futures, errors))
            while len(pending) > (2 if pool is not None else 0):
                finish_oldest()
            t_wait = time.perf_counter()
        while pending:
            finish_oldest()
    finally:
        bar.close()
        writer.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    _barrier()
    if rank == 0:
        t0 = time.perf_counter()
        merge_parts([parts], cfg.out)
        sec["write"] += time.perf_counter() - t0
        summary.out = cfg.out
    _barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    sec["total"] = time.perf_counter() - t_start
    return summary


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


def _visualize(folder: Path, root: Path, file_name: str, anns: list[dict], cut: ImageCut) -> None:
    """Write ``folder/<file_name>.png``: masks, boxes and (when known) the eigenvector heat-map."""
    target = folder / (file_name.replace("/", "__") + ".png")
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(root / file_name) as img:
        overlay(img, anns, cut.eigenvector).save(target)


def merge_parts(inputs: list[Path], out: Path) -> dict:
    """Merge finished shards (``<out>.parts`` folders) or COCO JSON files into one JSON at ``out``.

    Parts folders (all written by the same command) are merged by global batch id, so the result equals a
    one-process run's file. JSON files are concatenated in the given order with image and annotation ids
    renumbered from 1. The file is written atomically. Returns the merged dict.

    Raises:
        LabelError: a batch is missing (a rank has not finished), inputs mix folders and files, or the
            folders come from different commands.
    """
    import json

    dirs = [Path(p) for p in inputs if Path(p).is_dir()]
    if dirs and len(dirs) != len(inputs):
        raise LabelError("merge takes either .parts folders or COCO JSON files, not both")
    if not dirs:
        merged: list[dict] = []
        for path in inputs:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            old_to_img = {img["id"]: img for img in data["images"]}
            anns_of: dict[int, list[dict]] = {}
            for ann in data["annotations"]:
                anns_of.setdefault(ann["image_id"], []).append(
                    {k: v for k, v in ann.items() if k not in ("id", "image_id")})
            images = [{**{k: img[k] for k in ("file_name", "width", "height")},
                       "annotations": anns_of.get(i, [])} for i, img in old_to_img.items()]
            merged.append({"batch": len(merged), "errors": [], "images": images})
            info = data.get("info", {})
        coco = build_coco(merged, {k: v for k, v in info.items() if k != "skipped_images"})
        atomic_write_json(Path(out), coco)
        return coco
    manifests = []
    for d in dirs:
        with open(d / "manifest.json", encoding="utf-8") as fh:
            manifests.append(json.load(fh))
    if any(m != manifests[0] for m in manifests[1:]):
        raise LabelError("the .parts folders were written by different commands")
    manifest = manifests[0]
    batches: dict[int, dict] = {}
    for d in dirs:
        for j, rec in read_batches(d).items():
            batches.setdefault(j, rec)
    n_batches = -(-manifest["n_images"] // manifest["batch_size"])
    missing = [j for j in range(n_batches) if j not in batches]
    if missing:
        raise LabelError(f"{len(missing)} of {n_batches} batches are not finished yet (first missing: batch "
                         f"{missing[0]}); rerun the same label command to complete them")
    coco = build_coco([batches[j] for j in range(n_batches)], _info(manifest))
    atomic_write_json(Path(out), coco)
    return coco


