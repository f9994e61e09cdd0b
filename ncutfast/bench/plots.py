"""PNG plots of a benchmark run (matplotlib's object API; no pyplot state, no display needed).

- ``<device>_time_vs_n.png``: time per image against N on log-log axes, one line per provider, one panel
  per C, at the smallest batch size; the legend gives each line's fitted exponent.
- ``<device>_speedup.png``: speed-up over the reference at MaskCut's N = 3600 (or the largest N measured),
  one bar per provider and (C, B) (only the largest C when there are several batch sizes), approximations
  hatched.
- ``<device>_batch_scaling.png`` (several batch sizes only): time per image against B at that N.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .harness import MASKCUT_N, Row, fit_exponent, measured_rows

__all__ = ["write_plots"]


def _title(machine: dict[str, str]) -> str:
    return machine.get("gpu", machine.get("cpu", ""))


def _time_vs_n(rows: Sequence[Row], path: Path, machine: dict[str, str], fit_min_n: int) -> None:
    cs = sorted({r.c for r in rows})
    b = min(r.batch for r in rows if r.family != "reference")
    fig = Figure(figsize=(6.5 * len(cs), 5.0), layout="constrained")
    axes = fig.subplots(1, len(cs), squeeze=False)[0]
    for ax, c in zip(axes, cs, strict=True):
        names = dict.fromkeys(r.provider for r in rows)
        for name in names:
            pts = sorted((r.n, r.time_ms) for r in rows if r.provider == name and r.c == c
                         and (r.batch == b or r.family == "reference"))
            if not pts:
                continue
            ns, ts = zip(*pts, strict=True)
            fit = [(n, t) for n, t in pts if n >= fit_min_n]
            label = name
            if len(fit) >= 2:
                label += f" (N^{fit_exponent(*zip(*fit, strict=True)):.2f})"
            ax.loglog(ns, ts, marker="o", label=label)
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel("time per image (ms)")
        ax.set_title(f"C={c}, B={b}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"ncut time per image vs N: {_title(machine)}", fontsize=9)
    fig.savefig(path, dpi=120)


def _speedup(rows: Sequence[Row], path: Path, machine: dict[str, str]) -> None:
    ns = {r.n for r in rows}
    n = MASKCUT_N if MASKCUT_N in ns else max(ns)
    sel = [r for r in rows if r.n == n and r.family != "reference"]
    batches = sorted({r.batch for r in sel})
    cs = sorted({r.c for r in sel}) if len(batches) == 1 else [max(r.c for r in sel)]
    combos = [(c, b) for c in cs for b in batches]
    names = list(dict.fromkeys(r.provider for r in sel))
    fig = Figure(figsize=(max(6.0, 0.6 * len(names) * len(combos) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(combos)
    for j, (c, b) in enumerate(combos):
        for i, name in enumerate(names):
            hit = [r for r in sel if r.provider == name and r.c == c and r.batch == b]
            if not hit:
                continue
            bars = ax.bar(i + j * width, hit[0].speedup, width, color=f"C{j}",
                          hatch="" if hit[0].exact else "//", label=f"C={c}, B={b}" if i == 0 else None)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(names)) + width * (len(combos) - 1) / 2, names, rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel("speed-up over the TokenCut reference (x)")
    ax.set_title(f"N={n} (hatched: approximation): {_title(machine)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def _batch_scaling(rows: Sequence[Row], path: Path, machine: dict[str, str]) -> None:
    ns = {r.n for r in rows}
    n = MASKCUT_N if MASKCUT_N in ns else max(ns)
    c = max(r.c for r in rows)
    fig = Figure(figsize=(6.5, 5.0), layout="constrained")
    ax = fig.subplots()
    for name in dict.fromkeys(r.provider for r in rows if r.family != "reference"):
        pts = sorted((r.batch, r.time_ms) for r in rows if r.provider == name and r.n == n and r.c == c)
        if pts:
            ax.loglog(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("time per image (ms)")
    ax.set_title(f"N={n}, C={c}: {_title(machine)}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


def write_plots(rows: Sequence[Row], out_dir: Path, stem: str, machine: dict[str, str],
                fit_min_n: int) -> list[Path]:
    """Write the plots that the measured rows support; return their paths."""
    meas = measured_rows(rows)
    if not meas:
        return []
    files = [out_dir / f"{stem}_time_vs_n.png", out_dir / f"{stem}_speedup.png"]
    _time_vs_n(meas, files[0], machine, fit_min_n)
    _speedup(meas, files[1], machine)
    if len({r.batch for r in meas if r.family != "reference"}) > 1:
        files.append(out_dir / f"{stem}_batch_scaling.png")
        _batch_scaling(meas, files[-1], machine)
    return files
