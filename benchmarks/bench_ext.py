"""CPU benchmark of the compiled extension (issue 3): every target measured side by side in one run.

    python benchmarks/bench_ext.py              # N = 3600, C = 768 single image; N = 784, C = 384, batch 64
    python benchmarks/bench_ext.py --quick      # fewer repeats, batch 16 (a smoke run, noisier)

Single image, N = 3600, C = 768 (planted-object scene of ``ncutfast.testing``, tau = 0.2, eps = 1e-5):

- ``GEMM full`` / ``GEMM upper``: the float32 similarity product alone, ``F F^T`` and the upper part the
  cpu backend forms (blocks of ``ROW_BLOCK`` rows against the columns from the block on), on normalized
  features, preallocated outputs. FLOPs: 2 N^2 C (full), about N (N + ROW_BLOCK) C (upper).
- ``reference``: TokenCut's path: torch float32 similarity, ``W = where(S > tau, 1, eps)`` in float64,
  ``D = diag(W 1)``, ``scipy.linalg.eigh(D - W, D, subset_by_index=[1, 2])``.
- ``scipy eigh``: that last call alone (its inputs prepared outside the timer): the part after the GEMM.
- ``ARPACK``: the same W, ``scipy.sparse.linalg.eigsh(D^-1/2 W D^-1/2, k=2, which="LA")`` (the trivial
  top pair and the wanted one), seeded v0: the fastest CPU peer.
- ``ncutfast cpu``: ``ncutfast.backends.ext.solve`` end to end (norms, blocked GEMM, packing, Lanczos).
- ``ncutfast post-GEMM``: the packing of precomputed similarity blocks plus the Lanczos solve: everything
  the backend does after the product.
- peak memory: resident-set high-water mark of one solve beyond the features (method below).

Batch, N = 784, C = 384, 64 images: the reference image by image vs the cpu backend on the padded batch
(and ``ncutfast.ncut(backend="cpu")``, which adds the seed and partition), as images per second.

Timing: ``time.perf_counter`` around each call (CPU: no synchronization needed), one warm-up call, then the
median of ``--repeats`` calls (the slow reference gets fewer). The machine may be shared: the load average
before and after is printed, and the min beside the median shows the noise.

Memory method: each measurement runs in a fresh interpreter with ``MALLOC_MMAP_THRESHOLD_=65536`` (so large
blocks are mmapped and returned on free instead of lingering in the heap), after one warm-up solve (BLAS and
OpenMP buffers, imports); the benchmarks' memory sampler (``ncutfast.bench.measure.peak_memory``:
``gc.collect()``, ``malloc_trim(0)``, the kernel's peak-RSS counter VmHWM reset through
``/proc/self/clear_refs``) gives the peak RSS of one more solve minus the RSS before it: the memory the solve
needed beyond its inputs (page-granular, includes every allocator: torch, the extension's std::vector, MKL).
torch's CPU allocator has no peak statistics, so this is the measure. Linux only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch
import torch.nn.functional as F

TAU, EPS, TOL, MAX_ITER = 0.2, 1e-5, 1e-8, 300
SEED = 20261126


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, min) seconds of ``repeats`` calls after one warm-up call (the harness's timer)."""
    from ncutfast.bench.measure import median_time

    return median_time(fn, repeats)


def scene(n: int, c: int, seed: int) -> torch.Tensor:
    from ncutfast.testing import planted_scene

    return torch.from_numpy(planted_scene(np.random.default_rng(seed), n, c).features)


def tokencut_reference(k: torch.Tensor) -> np.ndarray:
    """TokenCut's answer by the reference: its graph (``tokencut_affinity``) and scipy's generalized eigh."""
    from ncutfast import reference
    from ncutfast.bench.providers import tokencut_affinity

    return reference.fiedler(tokencut_affinity(k, TAU, EPS))[2]


def tokencut_w(k: torch.Tensor) -> np.ndarray:
    from ncutfast.bench.providers import tokencut_affinity

    return tokencut_affinity(k, TAU, EPS)


def arpack(k: torch.Tensor) -> np.ndarray:
    w = tokencut_w(k)
    s = 1.0 / np.sqrt(w.sum(axis=1))
    m = w * s[:, None] * s[None, :]
    v0 = np.random.default_rng(0).standard_normal(m.shape[0])
    vals, vecs = scipy.sparse.linalg.eigsh(m, k=2, which="LA", v0=v0)
    return vecs[:, np.argmin(vals)] * s


def cpu_solve(feats: torch.Tensor, lengths: torch.Tensor):
    from ncutfast.backends import SolveParams, ext

    return ext.solve(feats, lengths, SolveParams(TAU, EPS, True, "float32", TOL, MAX_ITER))


def post_gemm_parts(k: torch.Tensor) -> Callable[[], object]:
    """The cpu backend's work after the product: pack precomputed upper blocks, then the Lanczos solve."""
    from ncutfast._ext import C
    from ncutfast.backends import contract, ext

    n = k.shape[0]
    block = min(ext.ROW_BLOCK, n)
    inv = (1.0 / torch.linalg.vector_norm(k, dim=-1).clamp_min(1e-12))[None].contiguous()
    blocks = [(r0, (k[r0 : r0 + block] @ k[r0:].T).contiguous()) for r0 in range(0, n, block)]
    lengths = torch.tensor([n])
    words = C.words_per_row(n)
    bits = torch.empty(1, n, words, dtype=torch.int64)
    out = [torch.empty(1, dtype=torch.float64) for _ in range(2)] + [torch.empty(1, n, dtype=torch.float64),
                                                                     torch.empty(1, dtype=torch.float64)]
    iters = torch.empty(1, dtype=torch.int64)

    def run() -> None:
        for r0, s in blocks:
            C.pack_graph_block_cpu(s.data_ptr(), "float32", 1, n, r0, s.shape[0], lengths.data_ptr(), TAU,
                                   bits.data_ptr(), inv_norms=inv.data_ptr())
        C.solve_binary_cpu(bits.data_ptr(), 1, n, lengths.data_ptr(), EPS, tol=TOL, max_iter=MAX_ITER,
                           krylov_dim=contract.KRYLOV_DIM, check_every=ext.SETTINGS["cpu"].check_every, table=True,
                           team=0, lambda2=out[0].data_ptr(), lambda3=out[1].data_ptr(), x=out[2].data_ptr(),
                           residual=out[3].data_ptr(), iterations=iters.data_ptr())

    return run


def gemm_full(f: torch.Tensor) -> Callable[[], object]:
    out = torch.empty(f.shape[0], f.shape[0])
    return lambda: torch.matmul(f, f.T, out=out)


def eigh_alone(k: torch.Tensor) -> Callable[[], object]:
    """scipy's generalized eigh of TokenCut's (D - W, D), its inputs prepared outside the timer."""
    w = tokencut_w(k)
    d = np.diag(w.sum(axis=1))
    dw = d - w
    return lambda: scipy.linalg.eigh(dw, d, subset_by_index=[1, 2])


def gemm_upper(f: torch.Tensor) -> Callable[[], object]:
    from ncutfast.backends.ext import ROW_BLOCK

    n = f.shape[0]
    block = min(ROW_BLOCK, n)
    buf = torch.empty(block * n)

    def run() -> None:
        for r0 in range(0, n, block):
            r1 = min(r0 + block, n)
            torch.matmul(f[r0:r1], f[r0:].T, out=buf[: (r1 - r0) * (n - r0)].view(r1 - r0, n - r0))

    return run


# ---------------------------------------------------------------------------------------------- memory

def _memory_child(what: str, n: int, c: int, repeats: int) -> list[int]:
    """In the fresh interpreter: warm up, then per repeat one solve's peak (the benchmarks' sampler)."""
    from ncutfast.bench.measure import peak_memory as sampled_peak

    k = scene(n, c, SEED)
    fn = {"cpu": lambda: cpu_solve(k[None], torch.tensor([n])), "reference": lambda: tokencut_reference(k)}[what]
    fn()
    deltas = []
    for _ in range(repeats):
        with sampled_peak("cpu") as peak:
            out = fn()
        deltas.append(int(peak[0]))
        del out
    return deltas


def peak_memory(what: str, n: int, c: int, repeats: int = 3) -> list[int]:
    """Bytes of resident memory one solve adds at its peak, per repeat (fresh interpreter, see the module
    docstring). ``what``: "cpu" (the cpu backend) or "reference" (TokenCut's path)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-of", what, "--memory-size", str(n), str(c),
           "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and batch 16")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per fast measurement (default 9)")
    p.add_argument("--json", default=None, help="also write the raw numbers to this file")
    p.add_argument("--memory-of", choices=("cpu", "reference"), help=argparse.SUPPRESS)
    p.add_argument("--memory-size", type=int, nargs=2, default=(3600, 768), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_of:  # the fresh interpreter of peak_memory()
        print(json.dumps(_memory_child(args.memory_of, *args.memory_size, args.repeats or 3)))
        return 0
    reps = args.repeats or (3 if args.quick else 9)
    slow_reps = 1 if args.quick else 3
    batch = 16 if args.quick else 64
    if sys.platform != "linux":
        print("bench_ext: the memory measurement needs Linux (/proc); skipped")
    from ncutfast import _ext

    if not _ext.HAS_CPU_EXT:
        print(f"bench_ext: ncutfast._C is not built ({_ext.IMPORT_ERROR}); nothing to measure")
        return 0
    load0 = os.getloadavg()
    r: dict[str, tuple[float, float]] = {}

    # Single image, N = 3600, C = 768.
    n, c = 3600, 768
    k = scene(n, c, SEED)
    f = F.normalize(k, p=2, dim=1)
    r["gemm_full"] = timed(gemm_full(f), reps)
    r["gemm_upper"] = timed(gemm_upper(f), reps)
    r["cpu"] = timed(lambda: cpu_solve(k[None], torch.tensor([n])), reps)
    r["post_gemm"] = timed(post_gemm_parts(k), reps)
    r["eigh"] = timed(eigh_alone(k), slow_reps)
    r["reference"] = timed(lambda: tokencut_reference(k), slow_reps)
    r["arpack"] = timed(lambda: arpack(k), reps)
    gc.collect()
    mem = {"cpu": peak_memory("cpu", n, c)} if sys.platform == "linux" else {}
    if mem and not args.quick:
        mem["reference"] = peak_memory("reference", n, c, repeats=1)

    # Batch, N = 784, C = 384.
    nb, cb = 784, 384
    feats = torch.stack([scene(nb, cb, SEED + i) for i in range(batch)])
    lengths = torch.full((batch,), nb)
    r["batch_reference"] = timed(lambda: [tokencut_reference(x) for x in feats], slow_reps)
    r["batch_cpu"] = timed(lambda: cpu_solve(feats, lengths), reps)

    def api_call() -> object:
        import ncutfast

        return ncutfast.ncut(feats, backend="cpu")

    r["batch_api"] = timed(api_call, reps)
    fb = F.normalize(feats, p=2, dim=-1)
    bout = torch.empty(batch, nb, nb)
    r["batch_gemm"] = timed(lambda: torch.bmm(fb, fb.transpose(1, 2), out=bout), reps)
    load1 = os.getloadavg()

    ms = {key: (1e3 * med, 1e3 * lo) for key, (med, lo) in r.items()}
    print(f"# bench_ext: CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; load average "
          f"{load0[0]:.2f} before, {load1[0]:.2f} after; median of {reps} ({slow_reps} for the reference and "
          f"scipy eigh) after a warm-up; min in parentheses\n")
    print(f"## Single image, N = {n}, C = {c}\n")
    print("| measurement | time, ms (min) |")
    print("| --- | --- |")
    labels = [("gemm_full", "similarity GEMM, full"), ("gemm_upper", "similarity GEMM, upper part (floor)"),
              ("reference", "TokenCut reference (torch f32 + scipy eigh(D-W, D))"),
              ("eigh", "scipy generalized eigh alone (after the GEMM)"),
              ("arpack", "ARPACK peer (same W, eigsh on D^-1/2 W D^-1/2, k=2)"),
              ("cpu", "**ncutfast cpu, end to end**"), ("post_gemm", "ncutfast after the GEMM (pack + Lanczos)")]
    for key, label in labels:
        print(f"| {label} | {ms[key][0]:.1f} ({ms[key][1]:.1f}) |")
    if mem:
        mb = [v / 2**20 for v in mem["cpu"]]
        line = f"| peak memory beyond the features, ncutfast cpu | {statistics.median(mb):.2f} MB "
        print(line + f"(runs: {', '.join(f'{v:.2f}' for v in mb)}) |")
        if "reference" in mem:
            print(f"| peak memory beyond the features, reference | {mem['reference'][0] / 2**20:.0f} MB |")
    print(f"\n## Batch of {batch}, N = {nb}, C = {cb}\n")
    print("| measurement | ms per image (min) | images/s |")
    print("| --- | --- | --- |")
    for key, label in (("batch_gemm", "similarity GEMM, full (bmm)"), ("batch_reference", "TokenCut reference"),
                       ("batch_cpu", "**ncutfast cpu backend**"), ("batch_api", "ncutfast.ncut(backend='cpu')")):
        per = ms[key][0] / batch
        print(f"| {label} | {per:.2f} ({ms[key][1] / batch:.2f}) | {1e3 / per:.1f} |")

    print("\n## Targets (issue 3), medians\n")
    print("| target | measured | met |")
    print("| --- | --- | --- |")
    checks = [
        ("N=3600: >= 12x faster than the reference", ms["reference"][0] / ms["cpu"][0], 12.0, True),
        ("N=3600: >= 1.5x faster than ARPACK", ms["arpack"][0] / ms["cpu"][0], 1.5, True),
        ("N=3600: <= 1.3x the full GEMM's time", ms["cpu"][0] / ms["gemm_full"][0], 1.3, False),
        ("N=3600: <= 1.3x the upper-part GEMM's time", ms["cpu"][0] / ms["gemm_upper"][0], 1.3, False),
        ("after the GEMM: >= 50x faster than scipy eigh", ms["eigh"][0] / ms["post_gemm"][0], 50.0, True),
        (f"N=784 batch {batch}: >= 12x the reference's throughput", ms["batch_reference"][0] / ms["batch_cpu"][0],
         12.0, True),
    ]
    for label, value, bound, at_least in checks:
        ok = value >= bound if at_least else value <= bound
        print(f"| {label} | {value:.2f}x | {'yes' if ok else 'no'} |")
    if mem:
        peak = statistics.median(mem["cpu"]) / 2**20
        print(f"| peak memory per image at N=3600 <= 8 MB beyond the features | {peak:.2f} MB | "
              f"{'yes' if peak <= 8 else 'no'} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"ms": ms, "memory_bytes": mem, "batch": batch, "load": [load0, load1]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
