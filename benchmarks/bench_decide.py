"""Time of ``ncutfast.tokencut`` and ``ncutfast.maskcut`` spent outside the eigen-solve (the post-solve
decisions plus input handling), against the solve time of the same call.

Every backend solve of a call is wrapped by the benchmarks' timer (``ncutfast.bench.measure``; through the
backend chooser, so the script also runs on older checkouts whose chooser is ``ncutfast._dispatch`` when
``ncutfast.bench.measure`` is copied there); "outside" is the call's time minus its solves'.
Run from a checkout's root::

    python benchmarks/bench_decide.py --batch 256 --grid 28 28 --channels 384 --repeats 3

Prints one markdown row per function: median call, solve and outside times, outside / solve of the medians,
and the smallest and largest outside / solve of the single repeats (the machine may be shared).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch


def _chooser():
    """The module whose ``resolve_backend`` the API calls (``ncutfast.backends``; ``ncutfast._dispatch`` in
    older checkouts)."""
    from ncutfast import api

    return api.backends if hasattr(api, "backends") else api._dispatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--grid", type=int, nargs=2, default=(28, 28))
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ncutfast
    from ncutfast.bench.measure import timed_call
    from ncutfast.testing import planted_scene

    rng = np.random.default_rng(args.seed)
    grid = tuple(args.grid)
    feats = torch.from_numpy(np.stack([planted_scene(rng, grid=grid, channels=args.channels).features
                                       for _ in range(args.batch)]))
    device = feats.device.type
    chooser = _chooser()
    real = chooser.resolve_backend
    spent = [0.0]

    def timed_resolve(backend, device):
        name, fn = real(backend, device)

        def solve(*a, **kw):
            out, seconds = timed_call(lambda: fn(*a, **kw), device)
            spent[0] += seconds
            return out

        return name, solve

    chooser.resolve_backend = timed_resolve
    calls = {"tokencut": lambda: ncutfast.tokencut(feats, grid, patch=16),
             "maskcut (3 steps)": lambda: ncutfast.maskcut(feats, grid, n_masks=3)}
    print(f"B = {args.batch}, grid {grid[0]}x{grid[1]} (N = {grid[0] * grid[1]}), C = {args.channels}, "
          f"torch threads {torch.get_num_threads()}, backend {real('auto', feats.device)[0]}")
    print("| call | call s | solve s | outside s | outside / solve | per repeat: min, max |")
    print("|---|---|---|---|---|---|")
    for name, call in calls.items():
        call()  # warm-up
        total, solve = [], []
        for _ in range(args.repeats):
            spent[0] = 0.0
            total.append(timed_call(call, device)[1])
            solve.append(spent[0])
        t, s = statistics.median(total), statistics.median(solve)
        ratios = [(ti - si) / si for ti, si in zip(total, solve, strict=True)]
        print(f"| {name} | {t:.3f} | {s:.3f} | {t - s:.3f} | {(t - s) / s:.1%} | {min(ratios):.1%}, "
              f"{max(ratios):.1%} |")


if __name__ == "__main__":
    main()
