"""The benchmark harness: workloads, timing, memory and agreement with the reference.

One run measures every provider (:mod:`ncutfast.bench.providers`) on every workload of a suite;
:mod:`ncutfast.bench.report` writes ``<device>_results.csv``, ``<device>_results.md`` and PNG plots.

Method (``shared/spec/conventions.md``):

- Workloads are planted-object token maps (:func:`ncutfast.testing.planted_scene`) at the token counts
  of real images (spec section 5): N = 196, 784 (VOC/COCO at p=16), 1200, 2961 (VOC at p=8), 3600
  (MaskCut's 480x480 at p=8), 4800 (COCO at p=8); C = 384 (ViT-S) or 768 (ViT-B); B images per call.
  Image i of a workload is the same scene whatever B is, so batch sizes share their reference answers.
- Timing: one warm-up call (which also measures peak memory), then ``repeats`` timed calls; the table
  gives the median. CPU: ``time.perf_counter`` around the call (every provider returns host-complete or
  synchronous torch results). GPU: CUDA events recorded around the call, then a device synchronize.
  A provider whose warm-up exceeds the per-row budget gets fewer repeats (at least one) and is skipped on
  every larger workload (larger or equal N, C and B); it is also skipped where its time per image at a
  smaller batch of the same (N, C), times B, predicts a call over twice the budget.
- Peak memory: CPU: the peak resident set size of this process during the warm-up call minus the RSS
  just before it, sampled every millisecond from ``/proc/self/statm`` by a background thread, after
  ``malloc_trim`` hands freed heap pages back (tracemalloc cannot see torch's allocations). GPU:
  ``torch.cuda.max_memory_allocated`` minus the allocation before the call (plus the CuPy pool's growth
  for CuPy providers).
- Agreement with the reference, per image, with :func:`ncutfast.testing.compare_to_reference`:
  eigenvector alignment ``|<x, x_ref>_D|`` (unit D-norms) and identical partitions (off the tokens tied
  with the mean), both counted only on images whose relative eigengap ``(lambda3 - lambda2) / lambda3`` is
  at least :data:`ncutfast.testing.GAP_MIN` (elsewhere the eigenvector is not well defined). Where the
  reference's max|x| is reached by entries of both signs, TokenCut's side is rounding's pick and the
  complement counts as identical too. Providers that return only a vector get TokenCut's rule
  (:func:`ncutfast.reference.orient_tokencut`); ncutfast's own partitions are taken as returned. The
  reference solves the first ``ref_images`` images of each (N, C) (its time per image is measured there,
  once for all batch sizes), and agreement is measured on the first ``min(B, ref_images)`` images of each
  workload.
- Work formulas (per image): the Gram matrix costs ``2 N^2 C`` flops (the ``gram_gflops`` column divides
  that by the time: a throughput-equivalent, not a count of what each solver does); a float32 W is
  ``4 N^2`` bytes, a bitmask ``N^2 / 8``; the reference's dense generalized eigensolve is O(N^3)
  (Cholesky N^3/3, reduction to standard form ~N^3, tridiagonalization 4N^3/3), a Lanczos solve with k
  steps on a dense W is ``2 k N^2``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.metadata
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from .. import reference, testing
from .providers import Provider, Solution, build_providers, tokencut_affinity

__all__ = [
    "SIZES",
    "MASKCUT_N",
    "Suite",
    "suite_for",
    "Row",
    "fit_exponent",
    "measured_rows",
    "make_batch",
    "measure_agreement",
    "run",
]

#: Token counts of real images: VOC/COCO at p=16 (196 is ImageNet's 224), VOC at p=8, MaskCut, COCO at p=8.
SIZES = (196, 784, 1200, 2961, 3600, 4800)
#: MaskCut's 480x480 image at patch 8: the size of the speed-up plot.
MASKCUT_N = 3600


@dataclass
class Suite:
    """Which workloads to run and how hard to time them.

    Attributes:
        ns: token counts N.
        cs: channel counts C.
        batches: images per call B.
        repeats: timed calls after the warm-up (0: the warm-up's time is reported; dry runs only).
        budget_s: per-row time budget in seconds (see the module docstring).
        ref_images: how many images of each workload the reference solves (agreement is measured there).
        fit_min_n: smallest N used when fitting scaling exponents (overheads dominate below).
    """

    ns: tuple[int, ...]
    cs: tuple[int, ...]
    batches: tuple[int, ...]
    repeats: int
    budget_s: float
    ref_images: int
    fit_min_n: int = 784


def suite_for(device: str, *, quick: bool, dry: bool) -> Suite:
    """The default suite: full, ``quick`` (< 2 minutes on a 2-core CPU) or ``dry`` (tiny, one call each)."""
    if dry:
        return Suite(ns=(64, 144), cs=(32,), batches=(2,), repeats=0, budget_s=math.inf, ref_images=2,
                     fit_min_n=0)
    if device == "cuda":
        if quick:
            return Suite(ns=(784, 3600), cs=(768,), batches=(1, 64), repeats=5, budget_s=20.0, ref_images=1)
        return Suite(ns=SIZES, cs=(384, 768), batches=(1, 16, 64, 256), repeats=10, budget_s=60.0,
                     ref_images=2)
    if quick:
        return Suite(ns=(196, 784, 1200, 2961, 3600), cs=(384,), batches=(1,), repeats=3, budget_s=6.0,
                     ref_images=1)
    return Suite(ns=SIZES, cs=(384, 768), batches=(1,), repeats=5, budget_s=60.0, ref_images=1)


@dataclass
class Row:
    """One line of the results table (one provider on one workload); NaN where not measured."""

    device: str
    provider: str
    family: str
    exact: bool
    n: int
    c: int
    batch: int
    status: str = "ok"
    repeats: int = 0
    time_ms: float = math.nan  # median time per image
    images_per_s: float = math.nan
    speedup: float = math.nan  # reference time per image / this time per image, same run
    gram_gflops: float = math.nan  # 2 N^2 C / time per image
    peak_mib: float = math.nan
    agree_n: int = 0  # images with a well-defined eigenvector that were compared
    partitions: float = math.nan  # fraction of those with the reference's partition
    tokens: float = math.nan  # mean fraction of tokens on the reference's side, over those
    align_min: float = math.nan  # min |<x, x_ref>_D| over those
    lambda2_err: float = math.nan  # max |lambda2 - lambda2_ref| over all compared images
    agrees: str = "-"  # "yes"/"NO": all partitions equal and align_min within the float32 tolerance
    recheck: float = math.nan  # precision "exact": mean fraction of graph entries rechecked in float64


def fit_exponent(ns: Sequence[float], ts: Sequence[float]) -> float:
    """Least-squares slope of log(t) against log(N): the empirical exponent k in t ~ N^k."""
    return float(np.polyfit(np.log(np.asarray(ns, float)), np.log(np.asarray(ts, float)), 1)[0])


def measured_rows(rows: Sequence[Row]) -> list[Row]:
    """The rows that hold a time (measured or dry), in order."""
    return [r for r in rows if r.status in ("ok", "dry") and np.isfinite(r.time_ms)]


def make_batch(n: int, c: int, b: int, *, seed: int, device: str) -> torch.Tensor:
    """``b`` planted-object scenes of ``n`` tokens and ``c`` channels as float32 ``(b, n, c)`` on ``device``.

    Scene i depends only on (seed, n, c, i), so batches of different sizes share their leading images.
    """
    grid = testing.grid_for(n)
    scenes = [testing.planted_scene(np.random.default_rng([seed, n, c, i]), channels=c, grid=grid).features
              for i in range(b)]
    return torch.from_numpy(np.stack(scenes)).to(device)


@dataclass
class _Reference:
    """The reference's answers for the first images of one (N, C): cuts, degrees and time per image."""

    cuts: list[reference.NcutResult]
    degrees: list[np.ndarray]
    time_per_image: float


def measure_agreement(sol: Solution, ref: _Reference) -> dict[str, Any]:
    """Agreement columns of a row: compare ``sol``'s first images with the reference's answers."""
    k = min(len(ref.cuts), sol.x.shape[0])
    compared, same, aligns, lam_errs, tokens = 0, 0, [], [], []
    for i in range(k):
        x = sol.x[i]
        if sol.partition is not None and sol.seed is not None:
            part, seed = sol.partition[i], int(sol.seed[i])
        else:
            part, _, seed = reference.orient_tokencut(x)
        cut = ref.cuts[i]
        a = testing.compare_to_reference(x, part, seed, float(sol.lambda2[i]), cut, ref.degrees[i])
        if np.isfinite(sol.lambda2[i]):
            lam_errs.append(a.lambda2_error)
        if a.well_defined:
            compared += 1
            untied = ~testing.mean_tied_tokens(cut.eigenvector)  # the others are rounding's pick
            match = (np.asarray(part, bool) == cut.partition)[untied]
            if _sign_tied(cut.eigenvector):
                # max|x| is reached with both signs: rounding chose the reference's side; either is exact
                same += a.same_partition or bool(np.all(~match))
                tokens.append(float(max(match.mean(), 1.0 - match.mean())))
            else:
                same += a.same_partition
                tokens.append(float(match.mean()))
            aligns.append(a.alignment if np.isfinite(a.alignment) else 0.0)
    out: dict[str, Any] = {"agree_n": compared, "lambda2_err": max(lam_errs) if lam_errs else math.nan}
    if compared:
        out["partitions"] = same / compared
        out["tokens"] = float(np.mean(tokens))
        out["align_min"] = min(aligns)
        ok = same == compared and out["align_min"] >= testing.TOLERANCES["float32"]["alignment"]
        out["agrees"] = "yes" if ok else "NO"
    return out


def _sign_tied(x: np.ndarray) -> bool:
    """True when the tokens tied for max|x| have both signs: TokenCut's seed (and side) is rounding's pick."""
    t = testing.tied_tokens(x)
    return bool((x[t] > 0).any() and (x[t] < 0).any())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc), so that re-using them shows up as RSS growth."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _peak_memory(device: str, cupy_pool: bool) -> Iterator[list[float]]:
    """Yield a one-element list that holds the call's peak memory growth in bytes on exit (NaN if unknown)."""
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
        result[0] = max(peak[0], _rss_bytes()) - base


def _timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
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


@dataclass
class _Timing:
    raw: Any
    per_call: float
    repeats: int
    peak_bytes: float
    first_call: float


def _time_provider(p: Provider, feats: torch.Tensor, tau: float, eps: float, suite: Suite) -> _Timing:
    """Warm-up (memory measured) then median of the timed repeats, within the row budget."""
    fn = lambda: p.solve(feats, tau, eps)  # noqa: E731
    with _peak_memory(p.device, p.name.startswith("cupy")) as mem:
        raw, first = _timed(fn, p.device)
    repeats = suite.repeats
    if repeats and first * repeats > suite.budget_s:
        repeats = max(1, int(suite.budget_s / max(first, 1e-9)))
    times = []
    for _ in range(repeats):
        raw, t = _timed(fn, p.device)
        times.append(t)
    per_call = float(np.median(times)) if times else first
    return _Timing(raw, per_call, repeats, mem[0], first)


def _memory_cap(device: str) -> int:
    """Bytes a single provider may be expected to use: half the host RAM, or 90% of the GPU's memory."""
    if device == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(0).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):
        return 8 << 30


@dataclass
class RunResult:
    """Everything one run produced (``rows`` in run order; ``skipped`` lines for missing providers)."""

    device: str
    suite: Suite
    rows: list[Row]
    providers: list[Provider]
    skipped: list[str]
    machine: dict[str, str]
    command: str


def machine_info(device: str) -> dict[str, str]:
    """CPU model, cores, threads, library versions, GPU name and the date (UTC)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    import scipy

    from .. import __version__

    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "versions": f"ncutfast {__version__}, torch {torch.__version__}, numpy {np.__version__}, "
        f"scipy {scipy.__version__}",
    }
    optional = []
    for dist in ("triton", "cupy-cuda13x", "cupy-cuda12x", "ncut-pytorch", "fastncut"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            optional.append(f"{dist} {importlib.metadata.version(dist)}")
    if optional:
        info["versions"] += ", " + ", ".join(optional)
    if device == "cuda":
        info["gpu"] = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return info


def _dominated(over: list[tuple[int, int, int]], n: int, c: int, b: int) -> tuple[int, int, int] | None:
    for o in over:
        if o[0] <= n and o[1] <= c and o[2] <= b:
            return o
    return None


def _error_text(exc: BaseException) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"error: {type(exc).__name__}: {msg}"[:160]


def run(
    device: str,
    suite: Suite,
    *,
    select: Sequence[str] = (),
    tau: float = reference.TOKENCUT_TAU,
    eps: float = reference.EPS,
    seed: int = 0,
    command: str = "",
    log: Callable[[str], None] = print,
) -> RunResult:
    """Measure every provider on every workload of ``suite`` (``bench.report`` writes the results).

    Args:
        device: "cpu" or "cuda".
        suite: the workloads and timing settings.
        select: keep only providers whose name contains one of these strings (the reference always runs).
        tau, eps: the graph's threshold and non-edge weight (TokenCut's defaults).
        seed: scene seed.
        command: the command line, recorded in the markdown.
        log: where progress lines go.
    """
    providers, skipped = build_providers(device)
    if select:
        kept = [p for p in providers if p.family == "reference" or any(s in p.name for s in select)]
        skipped += [f"{p.name}: not selected" for p in providers if p not in kept]
        providers = kept
    for line in skipped:
        log(line)
    cap = _memory_cap(device)
    over: dict[str, list[tuple[int, int, int]]] = {p.name: [] for p in providers}
    refs: dict[tuple[int, int], _Reference] = {}
    rows: list[Row] = []
    per_image: dict[tuple[str, int, int], float] = {}  # (provider, N, C) -> last time per image
    for c in suite.cs:
        for b in suite.batches:
            for n in suite.ns:
                if (n, c) not in refs:
                    ref_feats = make_batch(n, c, suite.ref_images, seed=seed, device=device)
                    ref_row, refs[(n, c)] = _run_reference(providers[0], ref_feats, tau, eps, suite)
                    rows.append(ref_row)
                    log(_progress(ref_row))
                    del ref_feats
                ref = refs[(n, c)]
                feats = make_batch(n, c, b, seed=seed, device=device)
                for p in providers[1:]:
                    row = Row(device, p.name, p.family, p.exact, n, c, b)
                    need = p.footprint(n, c, b)
                    prior = _dominated(over[p.name], n, c, b)
                    predicted = per_image.get((p.name, n, c), 0.0) * b
                    if need > cap:
                        row.status = f"skipped: needs ~{need / 2**30:.1f} GiB > {cap / 2**30:.1f} GiB"
                    elif prior is not None:
                        row.status = (f"skipped: over the {suite.budget_s:g} s budget at N={prior[0]}, "
                                      f"B={prior[2]}")
                    elif predicted > 2 * suite.budget_s:
                        row.status = f"skipped: ~{predicted:.0f} s per call predicted from a smaller batch"
                    else:
                        if _measure(row, p, feats, tau, eps, suite, ref):
                            over[p.name].append((n, c, b))
                        if row.status.startswith("error") and device == "cuda":
                            torch.cuda.empty_cache()
                    if np.isfinite(row.time_ms):
                        per_image[(p.name, n, c)] = row.time_ms / 1e3
                    rows.append(row)
                    log(_progress(row))
                del feats
    return RunResult(device, suite, rows, providers, skipped, machine_info(device), command)


def _run_reference(p: Provider, feats: torch.Tensor, tau: float, eps: float,
                   suite: Suite) -> tuple[Row, _Reference]:
    """Time the reference on ``feats`` and keep its answers (oriented cuts and degrees)."""
    b, n, c = feats.shape
    timing = _time_provider(p, feats, tau, eps, suite)
    sol = p.finish(timing.raw, feats, tau, eps)
    cuts, degrees = [], []
    for i in range(b):
        part, x, s = reference.orient_tokencut(sol.x[i])
        cuts.append(reference.NcutResult(float(sol.lambda2[i]), float(sol.lambda3[i]), x, part, s))
        degrees.append(reference.degrees(tokencut_affinity(feats[i], tau, eps)))
    per_image = timing.per_call / b
    row = Row(p.device, p.name, p.family, p.exact, n, c, b, status="ok" if suite.repeats else "dry",
              repeats=timing.repeats)
    _fill_timing(row, timing, per_image, per_image)
    ref = _Reference(cuts, degrees, per_image)
    for key, value in measure_agreement(sol, ref).items():  # with itself: shows how many are comparable
        setattr(row, key, value)
    return row, ref


def _fill_timing(row: Row, timing: _Timing, per_image: float, ref_per_image: float) -> None:
    row.repeats = timing.repeats
    row.time_ms = per_image * 1e3
    row.images_per_s = 1.0 / per_image if per_image > 0 else math.nan
    row.speedup = ref_per_image / per_image if per_image > 0 else math.nan
    row.gram_gflops = 2.0 * row.n * row.n * row.c / per_image / 1e9 if per_image > 0 else math.nan
    row.peak_mib = timing.peak_bytes / 2**20


def _measure(row: Row, p: Provider, feats: torch.Tensor, tau: float, eps: float, suite: Suite,
             ref: _Reference) -> bool:
    """Fill ``row`` with ``p``'s timing, memory and agreement on ``feats``; errors end up in ``status``.

    Returns True when the warm-up call alone exceeded the row budget.
    """
    try:
        timing = _time_provider(p, feats, tau, eps, suite)
        sol = p.finish(timing.raw, feats, tau, eps)
    except Exception as exc:  # a provider's failure is a result, not the end of the run
        row.status = _error_text(exc)
        return False
    _fill_timing(row, timing, timing.per_call / row.batch, ref.time_per_image)
    if sol.recheck is not None:
        row.recheck = float(np.mean(sol.recheck))
    if not suite.repeats:
        row.status = "dry"
    for key, value in measure_agreement(sol, ref).items():
        setattr(row, key, value)
    return timing.first_call > suite.budget_s


def _progress(row: Row) -> str:
    if not row.status.startswith(("ok", "dry")):
        return f"{row.provider:>22} N={row.n:<5} C={row.c:<4} B={row.batch:<4} {row.status}"
    return (f"{row.provider:>22} N={row.n:<5} C={row.c:<4} B={row.batch:<4} {row.time_ms:10.2f} ms/img "
            f"x{row.speedup:8.2f} mem {row.peak_mib:8.1f} MiB part {row.partitions:.2f} "
            f"align {row.align_min:.6f} ({row.agree_n} cmp)")
