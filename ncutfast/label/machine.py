"""What the machine allows, checked before any work: the device, the cut backend, a batch's memory."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

import torch

from .errors import LabelError

__all__ = ["batch_bytes", "available_bytes", "held_free_bytes", "reuse_freed_memory", "resolve_device",
           "check_backend", "check_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


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
    cache of earlier batches), else the host's available memory plus what this process's C heap holds
    free (:func:`held_free_bytes`)."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + cached
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 + held_free_bytes()
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") + held_free_bytes()


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc with ``mallopt``, ``malloc_trim`` and ``mallinfo2`` (2.33+), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version, libc.mallopt, libc.malloc_trim  # noqa: B018 -- AttributeError if absent
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return None
    return libc


def held_free_bytes() -> int:
    """Bytes this process's C heap holds free for reuse (glibc's ``mallinfo2().fordblks``; 0 elsewhere).

    The operating system counts them as used, yet the next batch's tensors can take them.
    """
    libc = _glibc()
    return 0 if libc is None else int(libc.mallinfo2().fordblks)


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """While the block runs, keep freed C-heap memory in the process for the next allocation (glibc only).

    glibc serves every allocation above its mmap threshold (128 KiB to 32 MiB) with a fresh ``mmap`` and
    unmaps it on free, so each of a ViT forward's large intermediate tensors (tens to hundreds of MB per
    batch) is first touched page by page (a page fault and a kernel zeroing per 4 KiB) and handed back to
    the kernel, batch after batch. Inside the block ``mallopt(M_MMAP_MAX, 0)`` serves them from the heap
    and ``mallopt(M_TRIM_THRESHOLD, max)`` keeps freed memory there, so later batches reuse pages already
    mapped; the values computed are the same. On exit glibc's documented defaults are set back (its dynamic
    mmap threshold stays off) and ``malloc_trim(0)`` returns the free memory to the system.

    Yields True when the settings changed; False (nothing done) off glibc or when the environment already
    tunes malloc (``GLIBC_TUNABLES`` with ``glibc.malloc``, or ``MALLOC_TRIM_THRESHOLD_`` and the like).
    """
    libc = _glibc()
    tuned = "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(k in os.environ for k in _MALLOC_ENV)
    if libc is None or tuned:
        yield False
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield True
    finally:
        for param, value in _GLIBC_DEFAULTS.items():
            libc.mallopt(param, value)
        libc.malloc_trim(0)


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
