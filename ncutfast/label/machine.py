"""What the machine allows, checked before any work: the device, the cut backend, a batch's memory."""

from __future__ import annotations

import os

import torch

from .errors import LabelError

__all__ = ["batch_bytes", "available_bytes", "resolve_device", "check_backend", "check_memory"]


def batch_bytes(grids: list[tuple[int, int]], pixels: list[int], dim: int, precision: str) -> int:
    """About the peak bytes of the ViT forward and the cut of one batch (an estimate that errs high).

    Per image with ``N`` tokens and ``P`` pixels: the uint8 image and its float32 input (``15 P``), the
    ViT's activations (``8 * 4 * N * dim``: the residual stream, the MLP's 4x hidden layer, fused qkv) and
    the cut's dense similarity and affinity (``2 * N^2`` values: 4 bytes for "float32" and "fast", 8 for
    "float64" and "exact", whose recheck may run in float64).
    """
    item = 4 if precision in ("float32", "fast") else 8
    total = 0
    for (h, w), p in zip(grids, pixels, strict=True):
        n = h * w
        total += 15 * p + 32 * n * dim + 2 * item * n * n
    return total


def available_bytes(device: torch.device) -> int:
    """Memory a batch may use now: a CUDA device's free memory plus what torch's allocator holds unused (its
    cache of earlier batches), else the host's available memory."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + cached
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def resolve_device(spec: str) -> torch.device:
    """``--device`` -> a torch device that exists here (``cuda`` means ``cuda:LOCAL_RANK``)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise LabelError(f"--device {spec!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise LabelError(f"--device {spec}: only 'auto', 'cpu', 'cuda' and 'cuda:N' are supported")
    if not torch.cuda.is_available():
        build = " (this torch is a CPU-only build)" if torch.version.cuda is None else ""
        raise LabelError(f"--device {spec}: no CUDA device visible{build}; use --device cpu or auto")
    index = local_rank if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise LabelError(f"--device {spec}: device {index} does not exist ({torch.cuda.device_count()} CUDA "
                         "devices visible)")
    return torch.device("cuda", index)


def check_backend(backend: str, device: torch.device) -> None:
    """Solve one tiny cut with ``backend`` on ``device``: an unknown or unavailable backend fails here."""
    if backend == "reference":
        return
    from .. import api

    feats = torch.arange(12, dtype=torch.float32).reshape(1, 4, 3).cos().to(device)
    try:
        api.tokencut(feats, (2, 2), patch=1, backend=backend)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise LabelError(f"--backend {backend!r} cannot run on {device}: {exc}") from exc


def check_memory(grids: list[tuple[int, int]], pixels: list[int], dim: int, precision: str,
                 device: torch.device, what: str, advice: str) -> None:
    """Raise :class:`LabelError` when a batch's estimated peak (:func:`batch_bytes`) exceeds the memory
    :func:`available_bytes` reports now; the message names ``what`` and ends with ``advice``."""
    need = batch_bytes(grids, pixels, dim, precision)
    have = available_bytes(device)
    if need > have:
        raise LabelError(f"{what} needs about {_gib(need)} on {device} (ViT and dense affinity), but only "
                         f"{_gib(have)} is available; {advice}")
