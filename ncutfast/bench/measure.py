"""The benchmarks' one timer and one memory sampler (the harness and the scripts in ``benchmarks/`` use them).

``timed_call`` times one call (``time.perf_counter`` on the CPU, CUDA events and a synchronize on a GPU);
``median_time`` is the median and minimum of repeated calls after a warm-up; ``peak_memory`` samples a
block's peak memory growth.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["median_time", "peak_memory", "timed_call"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc), so that re-using them shows up as RSS growth."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_memory(device: str, cupy_pool: bool = False) -> Iterator[list[float]]:
    """Yield a one-element list that holds the block's peak memory growth in bytes on exit (NaN if unknown).

    CPU: the peak resident set size during the block minus the RSS before it, after ``malloc_trim``: the
    kernel's high-water mark (VmHWM, reset before the block through ``/proc/self/clear_refs``) where it can be
    reset, and in any case the RSS sampled every millisecond from ``/proc/self/statm`` by a background thread
    (page-granular, every allocator included). CUDA:
    ``torch.cuda.max_memory_allocated`` growth (plus the CuPy pool's with ``cupy_pool``)."""
    result = [math.nan]
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        pool = None
        if cupy_pool:
            import cupy

            pool = cupy.get_default_memory_pool()
            pool.free_all_blocks()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield result
        torch.cuda.synchronize()
        result[0] = torch.cuda.max_memory_allocated() - base + (pool.total_bytes() if pool else 0)
        return
    if not os.path.exists("/proc/self/statm"):
        yield result
        return
    _malloc_trim()
    base = _rss_bytes()
    hwm = _reset_peak_rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.001):
            peak[0] = max(peak[0], _rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result[0] = max(peak[0], _rss_bytes(), _peak_rss_bytes() if hwm else 0) - base


def timed_call(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    """Call ``fn`` once; return its output and the elapsed seconds (synchronized on CUDA)."""
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def median_time(fn: Callable[[], Any], repeats: int, device: str = "cpu") -> tuple[float, float]:
    """(median, min) seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = [timed_call(fn, device)[1] for _ in range(repeats)]
    return statistics.median(times), min(times)
