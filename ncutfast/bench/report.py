"""The benchmark's reports: markdown tables, the CSV, scaling fits and (with matplotlib) plots.

Reads the rows that :func:`ncutfast.bench.harness.run` measured; measures nothing itself.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from .. import testing
from .harness import Row, RunResult, fit_exponent, measured_rows

__all__ = ["markdown", "scaling_table", "write_csv", "write_outputs"]


def scaling_table(rows: Sequence[Row], fit_min_n: int) -> list[dict[str, Any]]:
    """Per (provider, C, B): fitted exponent of time per image vs N over the measured N >= ``fit_min_n``."""
    groups: dict[tuple[str, int, int], list[Row]] = {}
    for r in measured_rows(rows):
        groups.setdefault((r.provider, r.c, r.batch), []).append(r)
    out = []
    for (name, c, b), rs in groups.items():
        pts = sorted((r.n, r.time_ms) for r in rs if r.n >= fit_min_n)
        if len(pts) < 2:
            continue
        out.append({"provider": name, "c": c, "batch": b, "n_range": f"{pts[0][0]}-{pts[-1][0]}",
                    "points": len(pts), "exponent": fit_exponent([p[0] for p in pts], [p[1] for p in pts])})
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not np.isfinite(v):
            return "-"
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        if abs(v) >= 1e-3:
            return f"{v:.4f}"
        return f"{v:.1e}"
    return str(v)


def _md_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in line) + " |" for line in body]
    return lines


def _align_text(v: float) -> str:
    """Alignment shown as 1 - (1 - a) so that 0.9999997 reads as 1-3e-07 rather than 1.0000."""
    if not np.isfinite(v):
        return "-"
    return "1" if v >= 1.0 else (f"1-{1.0 - v:.0e}" if v > 0.99 else f"{v:.3f}")


def markdown(result: RunResult) -> str:
    """The run as markdown: machine, providers, the results table, scaling exponents and notes."""
    s = result.suite
    lines = [f"## ncutfast benchmark, {result.device.upper()}", ""]
    lines += [f"- {k}: {v}" for k, v in result.machine.items()]
    if result.command:
        lines.append(f"- command: `{result.command}`")
    lines.append(f"- suite: N {list(s.ns)}, C {list(s.cs)}, B {list(s.batches)}; 1 warm-up + {s.repeats} "
                 f"timed repeats (median), row budget {s.budget_s:g} s; the reference solves the first "
                 f"{s.ref_images} image(s) of each (N, C) and agreement is measured on those")
    lines += ["", "Providers:", ""]
    lines += [f"- `{p.name}` ({p.family}{'' if p.exact else ', approximation'}): {p.note}"
              for p in result.providers]
    lines += [f"- {line}" for line in result.skipped]
    lines += ["", "Results (time and memory per image; speed-up = reference time / time; agreement on images "
              "with a well-defined eigenvector):", ""]
    header = ["provider", "N", "C", "B", "ms/img", "img/s", "speed-up", "peak MiB", "cmp", "same part.",
              "tokens", "min align", "agrees", "recheck", "status"]
    body = []
    for r in result.rows:
        if r.status.startswith("skipped") and "not selected" in r.status:
            continue
        body.append([r.provider, r.n, r.c, r.batch, r.time_ms, r.images_per_s, r.speedup, r.peak_mib,
                     r.agree_n, r.partitions, r.tokens, _align_text(r.align_min), r.agrees,
                     "-" if math.isnan(r.recheck) else f"{r.recheck:.2e}", r.status])
    lines += _md_table(header, body)
    scaling = scaling_table(result.rows, s.fit_min_n)
    if scaling:
        lines += ["", f"Scaling: time per image ~ N^k, least-squares fit over N >= {s.fit_min_n} "
                  "(the reference's dense eigensolve is O(N^3)):", ""]
        lines += _md_table(["provider", "C", "B", "N range", "points", "k"],
                           [[e["provider"], e["c"], e["batch"], e["n_range"], e["points"], e["exponent"]]
                            for e in scaling])
    if len(s.batches) > 1:
        lines += ["", "Batch scaling (ms per image):", ""]
        lines += _batch_table(result.rows)
    lines += ["", "Notes: peak memory is "
              + ("`torch.cuda.max_memory_allocated` growth (plus CuPy's pool)" if result.device == "cuda"
                 else "the growth of the process RSS sampled every 1 ms during the warm-up call")
              + "; `agrees` = every compared partition identical and min alignment >= "
              f"{testing.TOLERANCES['float32']['alignment']}; gap threshold {testing.GAP_MIN}; "
              "`tokens` = mean fraction of tokens (off the mean-tied ones) on the reference's side; "
              "`recheck` = precision \"exact\": mean fraction of graph entries rechecked in float64.", "",
              "Work per image: the Gram matrix is 2 N^2 C flops (the CSV's `gram_gflops` = that / time); a "
              "float32 W is 4 N^2 bytes, a bitmask N^2 / 8; the reference's dense generalized eigh is O(N^3) "
              "(N^3/3 Cholesky + ~N^3 reduction + 4N^3/3 tridiagonalization); k Lanczos steps on a dense W "
              "are 2 k N^2 flops.", ""]
    return "\n".join(lines)


def _batch_table(rows: Sequence[Row]) -> list[str]:
    meas = [r for r in measured_rows(rows) if r.family != "reference"]
    batches = sorted({r.batch for r in meas})
    order = {name: i for i, name in enumerate(dict.fromkeys(r.provider for r in meas))}
    keys = sorted({(r.provider, r.n, r.c) for r in meas}, key=lambda k: (k[2], k[1], order[k[0]]))
    table = {(r.provider, r.n, r.c, r.batch): r.time_ms for r in meas}
    body = [[p, n, c] + [table.get((p, n, c, b), math.nan) for b in batches] for p, n, c in keys]
    return _md_table(["provider", "N", "C"] + [f"B={b}" for b in batches], body)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """All rows, every column of :class:`Row`."""
    names = [f.name for f in fields(Row)]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))


def write_outputs(result: RunResult, out_dir: Path, *, plots: bool, log: Callable[[str], None]) -> list[Path]:
    """Write ``<device>_results.csv``, ``<device>_results.md`` and the plots into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result.device
    csv_path, md_path = out_dir / f"{stem}_results.csv", out_dir / f"{stem}_results.md"
    write_csv(result.rows, csv_path)
    md_path.write_text(markdown(result))
    files = [csv_path, md_path]
    if plots:
        try:
            from . import plots as plotting
        except ImportError as exc:
            log(f"plots: skipped, {exc} (pip install matplotlib)")
        else:
            files += plotting.write_plots(result.rows, out_dir, stem, result.machine, result.suite.fit_min_n)
    for f in files:
        log(f"wrote {f}")
    return files
