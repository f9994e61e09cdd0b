"""The batched bilateral solver against the float64 reference port, side by side in one run.

    python benchmarks/bench_bilateral.py                    # 16 images of 400x300 (an ECSSD-sized batch)
    python benchmarks/bench_bilateral.py --device cuda      # the batched solver on a GPU (reference on CPU)
    python benchmarks/bench_bilateral.py --images 4 --size 64 48 --repeats 2    # a smoke run

Inputs: ``ncutfast.testing.synthetic_photo`` images (smooth gradient, a textured object, noise) with their
blocky TokenCut-like masks, seeded. Rows:

- ``reference``: ``ncutfast.reference.bilateral_solve`` image by image (SciPy sparse matrices and
  ``scipy.sparse.linalg.cg``, as TokenCut runs it).
- ``batched``: ``ncutfast.refine.bilateral_solve`` on the whole batch in one call (inputs already on the
  device; the outputs stay there).

Timing: ``time.perf_counter`` around each call (a CUDA device is synchronized before the clock stops), one
warm-up call of each, then ``--repeats`` calls of each, alternating reference and batched; the median and
the min of each. Speed-up = the reference's time per image divided by the batched time per image, both
from this run (medians, and mins: on a shared machine the min is the least disturbed). On the CPU the
process's CPU time (``time.process_time``) of the same calls is printed too: with one thread for each
solver (``--threads 1`` and ``OPENBLAS_NUM_THREADS=1``) it is the work each one does, which an
oversubscribed machine inflates less than the wall-clock time (waits for a core are not counted). The
largest |batched - reference| over all pixels is printed as the agreement check. The load average before
and after is printed (the machine may be shared). Nothing is downloaded; nothing runs at import.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable


def _interleaved(fns: list[Callable[[], object]], repeats: int,
                 sync: Callable[[], None]) -> tuple[list[list[float]], list[list[float]]]:
    """Wall-clock and CPU seconds of ``repeats`` calls of each function, alternating between them (after one
    warm-up call of each), so that a change of the machine's load hits every row alike."""
    for fn in fns:
        fn()
        sync()
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, w, c in zip(fns, wall, cpu, strict=True):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            w.append(time.perf_counter() - t0)
            c.append(time.process_time() - c0)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--size", type=int, nargs=2, default=(400, 300), metavar=("W", "H"),
                   help="image width and height (default 400 300)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls of each after the warm-up (default 7)")
    p.add_argument("--device", default="cpu", help="device of the batched solver (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import numpy as np
    import scipy
    import torch

    from ncutfast import reference
    from ncutfast.refine import bilateral_solve
    from ncutfast.testing import synthetic_photo

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(args.seed)
    width, height = args.size
    photos = [synthetic_photo(rng, height, width) for _ in range(args.images)]
    images = [torch.from_numpy(im).to(device) for im, _ in photos]
    targets = [torch.from_numpy(m).to(device) for _, m in photos]

    print(f"load average before: {os.getloadavg()[0]:.2f}")
    refs: list[np.ndarray] = []

    def run_reference() -> None:
        refs[:] = [reference.bilateral_solve(im, m) for im, m in photos]

    outs: list[torch.Tensor] = []

    def run_batched() -> None:
        outs[:] = bilateral_solve(images, targets)

    (ref_times, bat_times), (ref_cpu, bat_cpu) = _interleaved([run_reference, run_batched], args.repeats, sync)
    err = max(float(np.abs(o.cpu().numpy() - r).max()) for o, r in zip(outs, refs, strict=True))
    n = args.images
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"torch {torch.__version__}, scipy {scipy.__version__}, numpy {np.__version__}, "
          f"torch threads {torch.get_num_threads()}, device {device}")
    print(f"{n} images of {width}x{height}; max |batched - reference| = {err:.2e}")
    clocks = [("wall-clock", ref_times, bat_times)]
    if device.type == "cpu":
        clocks.append(("CPU time", ref_cpu, bat_cpu))
    for clock, ref_t, bat_t in clocks:
        t_ref, t_ref_min = statistics.median(ref_t), min(ref_t)
        t_bat, t_bat_min = statistics.median(bat_t), min(bat_t)
        print()
        print(f"| solver ({clock}) | ms / image (median) | ms / image (min) | speed-up (medians) | speed-up (mins) |")
        print("|---|---|---|---|---|")
        print(f"| reference (SciPy, one by one) | {1e3 * t_ref / n:.1f} | {1e3 * t_ref_min / n:.1f} | 1.0x | 1.0x |")
        print(f"| batched ({device}) | {1e3 * t_bat / n:.1f} | {1e3 * t_bat_min / n:.1f} | {t_ref / t_bat:.1f}x | "
              f"{t_ref_min / t_bat_min:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
