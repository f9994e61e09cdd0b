"""Benchmark harness: ncutfast against TokenCut's reference solver and every peer.

Run it with ``ncutfast bench`` (or ``python -m ncutfast.bench``, or ``python benchmarks/run.py``); see
:mod:`ncutfast.bench.cli` for the options and :mod:`ncutfast.bench.harness` for the method. Importing this
package runs nothing.
"""
