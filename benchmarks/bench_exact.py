"""CPU benchmark of precision "exact" (``ncutfast.exact``) against "float32", "float64" and TokenCut's path.

    python benchmarks/bench_exact.py              # N = 3600, C = 768, one planted scene, 5 repeats
    python benchmarks/bench_exact.py --repeats 3 --n 784 --c 384

All rows run side by side in one process on the same features (a planted-object scene of
``ncutfast.testing``, tau = 0.2, eps = 1e-5):

- ``reference``: TokenCut's path (torch float32 similarity, dense float64 W, ``scipy.linalg.eigh``), as
  ``ncutfast.bench.providers.tokencut_affinity`` builds it; fewer repeats (it is slow).
- ``cpu float32`` / ``cpu exact`` / ``cpu float64``: ``ncutfast.backends.ext.solve`` end to end.
- ``exact graph``: ``exact_graph_bits`` alone (float64 norms, int16 quantization, the int16 screen straight
  into the packed bits, rechecks).

Printed per row: median and min wall milliseconds, the median process CPU time (all threads), the ratio of
the float32 row's median to the row's (> 1: faster than float32), the reference's median over the row's, and
for "exact" the recheck fraction and the number of graph entries that differ from ``reference.affinity``
(the float64 graph; must be 0).

Timing: ``time.perf_counter`` and ``time.process_time`` around each call after one warm-up, median of
``--repeats``; the rows take turns within each repeat. The machine may be shared: the load average before
and after is printed (CPU time is less sensitive to other processes than wall time, but not immune: caches
are shared, and a BLAS that spins while it waits for a preempted thread burns CPU time). Thread counts
follow torch's (``OMP_NUM_THREADS=1`` for a one-thread run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy.linalg
import torch

from ncutfast import reference
from ncutfast.backends import SolveParams
from ncutfast.backends.ext import exact_graph_bits, solve
from ncutfast.bench.providers import tokencut_affinity
from ncutfast.testing import planted_scene

TAU, EPS, TOL, MAX_ITER = 0.2, 1e-5, 1e-8, 300
SEED = 20261130


def timed(fns: dict[str, tuple[Callable[[], object], int]]) -> dict[str, tuple[float, float, float]]:
    """Per name, (median wall, min wall, median CPU) seconds of its ``repeats`` calls after one warm-up
    call; the functions take turns."""
    for fn, _ in fns.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(max(repeats for _, repeats in fns.values())):
        for name, (fn, repeats) in fns.items():
            if r < repeats:
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {name: (statistics.median(wall[name]), min(wall[name]), statistics.median(cpu[name])) for name in fns}


def tokencut_reference(k: torch.Tensor) -> np.ndarray:
    w = tokencut_affinity(k, TAU, EPS)
    d = np.diag(w.sum(axis=1))
    return scipy.linalg.eigh(d - w, d, subset_by_index=[1, 2])[1][:, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3600)
    ap.add_argument("--c", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    k = torch.from_numpy(planted_scene(np.random.default_rng(SEED), args.n, args.c).features)
    feats, lengths = k[None], torch.tensor([args.n])
    print(f"N = {args.n}, C = {args.c}, one image; torch threads {torch.get_num_threads()}; "
          f"load average before: {os.getloadavg()[0]:.2f}")

    def cpu(precision: str) -> Callable[[], object]:
        params = SolveParams(TAU, EPS, precision=precision, tol=TOL, max_iter=MAX_ITER)
        return lambda: solve(feats, lengths, params)

    rows = timed({
        "cpu float32": (cpu("float32"), args.repeats),
        "cpu exact": (cpu("exact"), args.repeats),
        "cpu float64": (cpu("float64"), args.repeats),
        "exact graph": (lambda: exact_graph_bits(feats, lengths, TAU), args.repeats),
        "reference": (lambda: tokencut_reference(k), max(1, args.repeats // 2)),
    })
    bits, rechecked = exact_graph_bits(feats, lengths, TAU)
    raw = bits[0].numpy().view(np.uint64)
    got = ((raw[:, :, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).reshape(args.n, -1)[:, : args.n]
    flips = int((got.astype(bool) != (reference.affinity(k.numpy(), TAU) == 1.0)).sum())
    frac = float(rechecked[0]) / (args.n * (args.n + 1) / 2)
    base, ref = rows["cpu float32"][0], rows["reference"][0]
    cpu_base = rows["cpu float32"][2]
    print("| row | median ms | min ms | CPU ms (median) | float32 / row | float32 / row, CPU | reference / row |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (med, mn, cpu_med) in rows.items():
        print(f"| {name} | {1e3 * med:.1f} | {1e3 * mn:.1f} | {1e3 * cpu_med:.1f} | {base / med:.2f} | "
              f"{cpu_base / cpu_med:.2f} | {ref / med:.1f} |")
    print(f"exact: recheck fraction {frac:.3e} ({int(rechecked[0])} of {args.n * (args.n + 1) // 2} entries i <= j); "
          f"entries differing from reference.affinity (float64): {flips}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
