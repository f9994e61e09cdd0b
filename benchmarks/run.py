"""Run the ncutfast benchmark harness: ``python benchmarks/run.py --quick`` (options as ``ncutfast bench``).

A thin wrapper around :func:`ncutfast.bench.cli.main`; ncutfast must be importable (``pip install -e .``).
Results go to ``benchmarks/results/`` (git-ignored); ``benchmarks/RESULTS.md`` holds the committed tables.
"""

from ncutfast.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
