"""``ncutfast bench`` and ``python -m ncutfast.bench``: run the benchmark harness from the command line.

Examples::

    ncutfast bench --quick                 # < 2 minutes on a 2-core CPU; GPU suite if one is visible
    ncutfast bench --device cpu --n 784 3600 --c 768 --providers ncutfast torch.linalg
    ncutfast bench --quick --dry           # smoke test: tiny sizes, every provider called once
    ncutfast bench --list                  # which providers would run, and why others are skipped
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "register", "run_from_args", "main"]

DEFAULT_OUT = Path("benchmarks") / "results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser``."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (auto: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--quick", action="store_true", help="the short suite (< 2 minutes on a 2-core CPU)")
    parser.add_argument("--dry", action="store_true",
                        help="smoke test: tiny sizes, every provider called once, outputs still written")
    parser.add_argument("--n", type=int, nargs="+", help="token counts N (overrides the suite's)")
    parser.add_argument("--c", type=int, nargs="+", help="channel counts C (overrides the suite's)")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes B (overrides the suite's)")
    parser.add_argument("--repeats", type=int, help="timed repeats after the warm-up (median reported)")
    parser.add_argument("--budget", type=float, help="per-row time budget in seconds")
    parser.add_argument("--ref-images", type=int, help="images per workload solved by the reference")
    parser.add_argument("--providers", nargs="+", default=(),
                        help="keep providers whose name contains one of these (the reference always runs)")
    parser.add_argument("--tau", type=float, default=0.2, help="similarity threshold (TokenCut: 0.2)")
    parser.add_argument("--eps", type=float, default=1e-5, help="weight of non-edges (TokenCut: 1e-5)")
    parser.add_argument("--seed", type=int, default=0, help="scene seed")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--list", action="store_true", help="list the providers and exit")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object; its ``func`` runs it."""
    parser = subparsers.add_parser("bench", help="benchmark ncutfast against the reference and its peers",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run_from_args)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run the harness as the parsed ``args`` say; returns the process exit code."""
    import torch

    from . import harness, report
    from .providers import build_providers

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.list:
        providers, skipped = build_providers(device)
        for p in providers:
            print(f"{p.name:>22}  {p.family:<9} {'exact' if p.exact else 'approx':<6}  {p.note}")
        for line in skipped:
            print(line)
        return 0
    suite = harness.suite_for(device, quick=args.quick, dry=args.dry)
    overrides = {"ns": args.n, "cs": args.c, "batches": args.batch, "repeats": args.repeats,
                 "budget_s": args.budget, "ref_images": args.ref_images}
    for key, value in overrides.items():
        if value is None:
            continue
        values = tuple(value) if isinstance(value, list) else value
        if (key in ("ns", "cs", "batches") and min(values) < 1) or (key == "ref_images" and value < 1):
            print(f"bench: --{key} values must be >= 1", file=sys.stderr)
            return 2
        suite = replace(suite, **{key: values})
    argv = getattr(args, "argv", None)
    if argv is None:  # called through the ``ncutfast`` console script: the options follow "bench"
        argv = sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else sys.argv[1:]
    command = "ncutfast bench " + shlex.join(argv)
    result = harness.run(device, suite, select=tuple(args.providers), tau=args.tau, eps=args.eps,
                         seed=args.seed, command=command)
    report.write_outputs(result, Path(args.out), plots=not args.no_plots, log=print)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m ncutfast.bench`` and ``benchmarks/run.py``."""
    parser = argparse.ArgumentParser(prog="ncutfast bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return run_from_args(args)
