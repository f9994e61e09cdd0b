"""GPU benchmark of the Triton backend (issue 4): whole ncut throughput, per-kernel FLOP/s and bytes/s.

    python benchmarks/bench_triton.py                  # GPU: batch 256, C=768, N=784 and 3600
    python benchmarks/bench_triton.py --dry            # CPU smoke run under TRITON_INTERPRET=1, tiny shapes

For each N and precision ("float32": IEEE fp32 similarity; "fast": fp16 tensor cores) it times, on one
padded batch of planted-object scenes (ncutfast.testing):

- ``affinity``: ``affinity_fwd`` (row normalization + similarity + threshold + bitmask + popcounts), with
  the flip rate of its threshold decisions against float64; for float32 also ``affinity-tf32x3``;
- ``ncut``: the whole backend solve (affinity + degrees + deflated Lanczos to ``--tol``) at the default
  launch settings, giving images/s;

and at precision "fast" (else the first one) also

- ``step-matvec`` / ``step-matvec-fp64`` / ``step-matvec-int8`` / ``step-reorth`` / ``step``: one fused
  Lanczos step (kernels/lanczos.py, launched by kernels/operator.py's FusedSteps) at step 16 for the whole
  batch: its mat-vec (the default of launch setting matvec.int8, the fp64 one, int8 tensor cores),
  its reorthogonalization + bookkeeping launch, both
  (with ``--sweep``, also the first two at other launch settings, at the largest N);

- ``matvec`` / ``matvec-fp64`` / ``matvec-int8``: one application of the bitmask operator D^-1/2 W D^-1/2
  to the whole batch, the default mat-vec / the fp64 select-add kernel / int8 tensor cores (kernels/matvec.py;
  the fp64 rows only when another mat-vec is the default);
- ``ncut-<mode>``: the whole solve with the Lanczos steps run another way (launch setting "lanczos"
  ``solve``, ``--modes``): "steps" (two fused launches per step, the default), "graph" (the same launches
  replayed from a CUDA graph), "persistent" (one launch per Lanczos cycle: it tests convergence itself), "torch"
  (the shared driver op by op); all but "persistent" also with the fp64 and int8 mat-vecs (``-fp64``,
  ``-int8``) when they are not the default: the fastest one should become the default;

and prints the FLOP and byte counts of each kernel beside the achieved TFLOP/s and GB/s, and on an H100 or
H200 the fraction of the datasheet roofline it reaches ("% peak": the larger of FLOP/s over the peak of the
kernel's math path and bytes/s over the HBM peak). The baseline is
batched ``torch.linalg.eigh`` of M = D^-1/2 W D^-1/2 in float32 (graph build included; the harness's
``TorchEigh`` provider) on the same card, in the same run; at large N it is measured on ``--eigh-batch``
images (its cost is per matrix) and reported as images/s. Without a CUDA device and without ``--dry`` it
prints one skip line and exits 0. Nothing is downloaded; nothing runs at import.

Counts (per image of n tokens, C channels, W = 2 ceil(n / 64) words per row, s = bytes per normalized
feature: 4 fp32, 2 fp16):
- affinity FLOPs: n^2 C multiply-adds on the computed upper-triangle tiles = n (n + 1) C useful FLOPs (the
  symmetric half of 2 n^2 C) plus 3 n C for the normalization. Bytes: features read twice and written once
  by the normalization (n C (2 * 4 + s)), normalized rows read once per tile pair they appear in is L2
  traffic and not counted; bitmask written (4 n W), counts (4 n).
- matvec ops: 2 n^2 (one select-add per bit and vector); bytes: the bitmask (4 n W) plus v, s, y in fp64
  (24 n).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--channels", type=int, default=768)
    p.add_argument("--n", type=int, nargs="+", default=[784, 3600])
    p.add_argument("--precision", nargs="+", default=["float32", "fast"],
                   choices=["float32", "fast", "float64"])
    p.add_argument("--tau", type=float, default=0.2)
    p.add_argument("--eps", type=float, default=1e-5)
    p.add_argument("--tol", type=float, default=1e-8)
    p.add_argument("--max-iter", type=int, default=300)
    p.add_argument("--modes", nargs="+", default=["graph", "steps", "persistent", "torch"],
                   choices=["graph", "steps", "persistent", "torch"],
                   help="Lanczos step modes compared (launch setting lanczos.solve), at precision fast")
    p.add_argument("--sweep", action="store_true",
                   help="also time the fused step kernels at other launch settings (largest N only)")
    p.add_argument("--scenes", type=int, default=16, help="distinct planted scenes, tiled over the batch")
    p.add_argument("--eigh-batch", type=int, default=16, help="images for the torch.linalg.eigh baseline")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dry", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1 (smoke test)")
    p.add_argument("--csv", default="", help="also write the rows to this CSV file")
    return p.parse_args(argv)


# Datasheet peaks (dense) of the cards the GPU check runs on, for the "% peak" column: HBM bytes/s and the
# FLOP/s of the math path each kernel uses. The first key found in the device name applies.
_PEAKS = {
    "H200": {"hbm": 4.8e12, "fp64": 34e12, "fp64_tc": 67e12, "fp32": 67e12, "tf32_tc": 494e12,
             "fp16_tc": 989e12, "int8_tc": 1979e12},
    "H100 PCIe": {"hbm": 2.0e12, "fp64": 26e12, "fp64_tc": 51e12, "fp32": 51e12, "tf32_tc": 378e12,
                  "fp16_tc": 756e12, "int8_tc": 1513e12},
    "H100": {"hbm": 3.35e12, "fp64": 34e12, "fp64_tc": 67e12, "fp32": 67e12, "tf32_tc": 494e12,
             "fp16_tc": 989e12, "int8_tc": 1979e12},
}
# Math path of each kernel row (affinity by precision; 3xTF32 does three tf32 products per multiply-add).
_PATH = {("affinity", "float32"): ("fp32", 1), ("affinity", "fast"): ("fp16_tc", 1),
         ("affinity", "float64"): ("fp64_tc", 1), ("affinity-tf32x3", "float32"): ("tf32_tc", 3),
         ("matvec-int8", None): ("int8_tc", 1)}

#: The mat-vec of each value of launch setting matvec.int8 (kernels/_utils.py), for the rows' notes.
MATVEC_KINDS = {0: "fp64 select-add", 1: "int8 tensor-core", 2: "dp4a byte-lane", 3: "nibble-table"}


def _percent_of_peak(card: str, kernel: str, precision: str, t: float, flop: float, nbytes: float) -> str:
    """Achieved fraction of the roofline: max(FLOP/s / peak of the kernel's math path, bytes/s / HBM peak),
    with the bound that gives it ("flop" or "hbm"); empty for an unknown card or a row without counts."""
    peaks = next((v for k, v in _PEAKS.items() if k in card), None)
    if peaks is None or flop != flop:
        return ""
    path, mult = _PATH.get((kernel, precision)) or _PATH.get((kernel, None)) or ("fp64", 1)
    f = flop * mult / t / peaks[path]
    m = nbytes / t / peaks["hbm"]
    return f"{100 * max(f, m):.0f}% ({'flop' if f >= m else 'hbm'})"


# --sweep: (BM, BN, num_warps) of the step's mat-vec and (BS, num_warps) of its reorthogonalization.
_SWEEP_MATVEC = [(16, 128, 4), (32, 128, 4), (64, 64, 8), (64, 128, 8)]
_SWEEP_REORTH = [(16, 4), (32, 4), (64, 8), (128, 8)]

# Lanczos step at which one fused step is timed: the benchmark's scenes converge in 12-24 steps.
_STEP_AT = 16


def _fmt(x: float, scale: float, spec: str) -> str:
    """x / scale formatted with spec; empty for NaN (a count that does not apply to the row)."""
    return "" if x != x else format(x / scale, spec)


def _timer(args: argparse.Namespace):
    """Median seconds of fn() after one warm-up call (compilation, caches): triton.testing.do_bench
    (synchronizing, L2 flushed) on the GPU; a plain synchronized timer in --dry and for calls that take
    over half a second (the eigh baseline at large N), where one more call is enough."""
    import torch

    def wall(fn) -> float:
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def timed(fn) -> float:
        first = wall(fn)
        if args.dry or first > 0.5:
            return statistics.median(wall(fn) for _ in range(args.repeats if first <= 0.5 else 1))
        from triton.testing import do_bench

        return do_bench(fn, warmup=1, rep=max(1, args.repeats) * 50, return_mode="median") / 1e3

    return timed


def _solve_note(spec, b: int) -> str:
    """Lanczos steps and convergence of a Spectrum, for the table's note column."""
    it = spec.iterations.double()
    return (f"Lanczos steps median {it.median().item():.0f} max {it.max().item():.0f}; "
            f"converged {int(spec.converged.sum())}/{b}")


def _fused_step_rows(args: argparse.Namespace, timed, op, lengths, n: int, precision: str, emit) -> None:
    """One fused Lanczos step at step j = ``_STEP_AT`` (its basis has j + 2 rows), whole batch: the
    mat-vec launch alone, the reorthogonalization + bookkeeping launch alone, and both (FusedSteps); each
    row goes to ``emit`` as soon as it is measured.

    Counts per image: mat-vec as ``matvec``; step: 3 sweeps over the (j + 2, n) fp64 basis (24 (j + 2) n
    bytes) plus w (7 passes of 8 n bytes), FLOPs 2 (j + 2) n for the first sweep and 4 (j + 2) n for each
    of the two update sweeps (the update and the next coefficients)."""
    import torch

    from ncutfast.backends import lanczos as _lanczos
    from ncutfast.backends.contract import KRYLOV_DIM
    from ncutfast.kernels._utils import block_sizes, override, words_per_row
    from ncutfast.kernels.operator import FusedSteps

    b, j, w = lengths.shape[0], _STEP_AT, words_per_row(n)
    sd = op.degrees.sqrt()
    y0 = sd / sd.norm(dim=-1, keepdim=True)
    idx = torch.arange(b, device=y0.device)
    st = _lanczos.init_state(y0, lengths, _lanczos.start_vectors(lengths, n, 0, y0.device), idx, KRYLOV_DIM)
    fused = FusedSteps(op, "steps")
    fused.begin(st)
    fused.run(0, j)

    def again(*launches):
        def fn():
            fused.rewind(j)
            for launch in launches:
                launch()
        return fn

    mv_flop, mv_bytes = b * 2 * n * n, b * (4 * n * w + 24 * n)
    st_flop, st_bytes = b * 10 * (j + 2) * n, b * (24 * (j + 2) * n + 56 * n)
    t_mv = timed(again(fused.launch_matvec))
    t_st = timed(again(fused.launch_step))
    t_both = timed(again(fused.launch_matvec, fused.launch_step))
    with override("matvec", int8=1):
        t_mv8 = timed(again(fused.launch_matvec))
    nan = float("nan")
    note = f"fused step at j={j}, whole batch"
    kind = block_sizes("matvec")["int8"]
    rows = [(n, precision, "step-matvec", t_mv, nan, mv_flop, mv_bytes, note + f"; {MATVEC_KINDS[kind]} mat-vec")]
    if kind:  # the fp64 select-add kernel, the default before the nibble table
        with override("matvec", int8=0):
            rows.append((n, precision, "step-matvec-fp64", timed(again(fused.launch_matvec)), nan, mv_flop, mv_bytes,
                         note + "; fp64 mat-vec launch"))
    for row in [*rows,
            (n, precision, "step-matvec-int8", t_mv8, nan, mv_flop, mv_bytes, note + "; int8 mat-vec (2 launches)"),
            (n, precision, "step-reorth", t_st, nan, st_flop, st_bytes, note + "; CGS2 + bookkeeping launch"),
            (n, precision, "step", t_both, nan, mv_flop + st_flop, mv_bytes + st_bytes, note + "; both launches")]:
        emit(row)
    if args.sweep and n == max(args.n):
        # Other launch settings of the two step kernels (the defaults are in kernels/_utils.py, "lanczos").

        for bm, bn, nw in _SWEEP_MATVEC:  # settings of the fp64 mat-vec kernel
            with override("lanczos", BM=bm, BN=bn, num_warps=nw), override("matvec", int8=0):
                t = timed(again(fused.launch_matvec))
            emit((n, precision, f"step-matvec BM={bm} BN={bn} w={nw}", t, nan, mv_flop, mv_bytes, "sweep"))
        for bs, nw in _SWEEP_REORTH:
            with override("lanczos", BS=bs, num_warps=nw):
                t = timed(again(fused.launch_step))
            emit((n, precision, f"step-reorth BS={bs} w={nw}", t, nan, st_flop, st_bytes, "sweep"))


def _measure(args: argparse.Namespace, device, n: int, emit) -> None:
    """Rows (N, precision, kernel, seconds, images/s, FLOP, bytes, note) for one token count, each passed to
    ``emit`` as soon as it is measured (a timeout keeps the rows before it)."""
    import numpy as np
    import torch

    from ncutfast import testing
    from ncutfast.backends import SolveParams, triton_backend
    from ncutfast.bench.providers import TorchEigh
    from ncutfast.kernels._utils import block_sizes, override, words_per_row
    from ncutfast.kernels.affinity import affinity_fwd
    from ncutfast.kernels.operator import BitmaskOperator

    timed = _timer(args)
    rng = np.random.default_rng(n)
    scenes = [testing.planted_scene(rng, n, channels=args.channels).features for _ in range(args.scenes)]
    base = torch.from_numpy(np.stack(scenes)).to(device)
    feats = base[torch.arange(args.batch, device=device) % args.scenes].contiguous()
    lengths = torch.full((args.batch,), n, dtype=torch.int64)
    b, c, w = args.batch, args.channels, words_per_row(n)
    nf = min(16, b)  # images on which threshold flips against float64 are counted
    ref_mask = affinity_fwd(feats[:nf], lengths[:nf], tau=args.tau, precision="float64")[0]
    table = torch.tensor([bin(i).count("1") for i in range(256)], device=device)
    compare_at = "fast" if "fast" in args.precision else args.precision[0]
    for precision in args.precision:
        mask = affinity_fwd(feats[:nf], lengths[:nf], tau=args.tau, precision=precision)[0]
        flips = int(table[(mask ^ ref_mask).view(torch.uint8).long()].sum())
        flip_note = f"threshold flips vs float64: {flips / (nf * n * n):.2e} ({flips} of {nf} images' n^2)"
        s_bytes = {"float32": 4, "fast": 2, "float64": 8}[precision]
        aff_flop = b * (n * (n + 1) * c + 3 * n * c)
        aff_bytes = b * (n * c * (2 * 4 + s_bytes) + 4 * n * w + 4 * n)
        t_aff = timed(lambda p=precision: affinity_fwd(feats, lengths, tau=args.tau, precision=p))
        emit((n, precision, "affinity", t_aff, b / t_aff, aff_flop, aff_bytes, flip_note))
        nan = float("nan")

        def whole(p=precision):
            return triton_backend.solve(feats, lengths, SolveParams(args.tau, args.eps, True, p, args.tol,
                                                                    args.max_iter))

        if precision == "float32":
            with override("affinity", tf32x3=1):
                t_x3 = timed(lambda: affinity_fwd(feats, lengths, tau=args.tau, precision="float32"))
                mask = affinity_fwd(feats[:nf], lengths[:nf], tau=args.tau, precision="float32")[0]
            flips = int(table[(mask ^ ref_mask).view(torch.uint8).long()].sum())
            emit((n, precision, "affinity-tf32x3", t_x3, b / t_x3, aff_flop, aff_bytes,
                  f"3xTF32 dot; threshold flips vs float64: {flips / (nf * n * n):.2e}"))
        default = block_sizes("lanczos")["solve"]
        t_all = timed(whole)
        emit((n, precision, "ncut", t_all, b / t_all, nan, nan, f"solve={default}; " + _solve_note(whole(), b)))
        if precision != compare_at:
            continue
        op = BitmaskOperator(*affinity_fwd(feats, lengths, tau=args.tau, precision=precision), lengths,
                             args.eps)
        v = torch.randn(b, n, dtype=torch.float64, device=device)
        mv_flop, mv_bytes = b * 2 * n * n, b * (4 * n * w + 24 * n)
        t_mv = timed(lambda op=op, v=v: op(v))
        with override("matvec", int8=1):
            t_mv8 = timed(lambda op=op, v=v: op(v))
        kind = block_sizes("matvec")["int8"]
        emit((n, precision, "matvec", t_mv, nan, mv_flop, mv_bytes, f"{MATVEC_KINDS[kind]}; one step, whole batch"))
        if kind:
            with override("matvec", int8=0):
                emit((n, precision, "matvec-fp64", timed(lambda op=op, v=v: op(v)), nan, mv_flop, mv_bytes,
                      "fp64 select-add; one step"))
        emit((n, precision, "matvec-int8", t_mv8, nan, mv_flop, mv_bytes, "int8 tensor cores; one step"))
        _fused_step_rows(args, timed, op, lengths, n, precision, emit)
        # How the Lanczos steps run between convergence checks (issue 4: CUDA graph vs persistent kernel),
        # plus the op-by-op driver with either mat-vec, on the same batch.
        kind = block_sizes("matvec")["int8"]
        for mode in args.modes:
            # the default mat-vec, the fp64 one and the int8 one; the persistent kernel's mat-vec is fp64
            for int8 in (kind,) if mode == "persistent" else tuple(dict.fromkeys((kind, 0, 1))):
                if mode == default and int8 == kind:
                    continue
                with override("lanczos", solve=mode), override("matvec", int8=int8):
                    t = timed(whole)
                    note = _solve_note(whole(), b)
                label = f"ncut-{mode}" + ("" if int8 == kind else {0: "-fp64", 1: "-int8"}[int8])
                what = {"graph": "2 launches/step replayed from a CUDA graph", "steps": "2 launches/step",
                        "persistent": "1 launch per Lanczos cycle, checks itself",
                        "torch": "op by op, ~30 torch ops/step"}[mode]
                if mode == "graph" and device.type != "cuda":
                    what += " (run eagerly here: no CUDA)"
                mv = MATVEC_KINDS[0 if mode == "persistent" else int8]
                emit((n, precision, label, t, b / t, nan, nan, f"{what}, {mv} mat-vec; " + note))
    eb = min(args.eigh_batch, args.batch)
    provider = TorchEigh(device.type, torch.float32)
    t_eigh = timed(lambda: provider.solve(feats[:eb], args.tau, args.eps))
    emit((n, "float32", "torch.linalg.eigh", t_eigh, eb / t_eigh, float("nan"), float("nan"),
          f"baseline on {eb} images (graph build + batched eigh of M)"))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.dry:
        # Must precede the first import of ncutfast.kernels: @triton.jit picks interpreter vs JIT then.
        os.environ["TRITON_INTERPRET"] = "1"
        args.batch, args.channels, args.n, args.scenes = 3, 32, [48], 3
        args.eigh_batch, args.repeats = 3, 1
    import torch

    if not args.dry and not torch.cuda.is_available():
        print("bench_triton: skipped, no CUDA device (run with --dry for a CPU interpreter smoke run)")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_triton: skipped, triton is not installed (pip install 'ncutfast[triton]')")
        return 0
    device = torch.device("cpu" if args.dry else "cuda")
    card = "CPU (Triton interpreter)" if args.dry else torch.cuda.get_device_name(device)
    print(f"bench_triton on {card}; torch {torch.__version__}, triton {sys.modules['triton'].__version__}; "
          f"batch {args.batch}, C={args.channels}, tau={args.tau}, tol={args.tol}")

    rows = []
    header = ("N", "precision", "kernel", "ms", "images/s", "GFLOP", "TFLOP/s", "MB", "GB/s", "% peak", "note")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    with contextlib.ExitStack() as stack:
        fh = stack.enter_context(open(args.csv, "w")) if args.csv else None
        if fh:
            fh.write(",".join(header) + ",card\n")
            fh.flush()

        def emit(row: tuple) -> None:
            """Print and write one row at once, so that a run cut short keeps what it measured."""
            n, prec, kern, t, ips, flop, nbytes, note = row
            rows.append(row)
            vals = (n, prec, kern, f"{t * 1e3:.3f}", _fmt(ips, 1, ",.0f"), _fmt(flop, 1e9, ".3f"),
                    _fmt(flop / t, 1e12, ".2f"), _fmt(nbytes, 1e6, ".1f"), _fmt(nbytes / t, 1e9, ".1f"),
                    _percent_of_peak(card, kern, prec, t, flop, nbytes), note)
            print("| " + " | ".join(str(x) for x in vals) + " |", flush=True)
            if fh:
                fh.write(",".join(str(x).replace(",", "") for x in vals) + f",{card}\n")
                fh.flush()

        for n in args.n:
            _measure(args, device, n, emit)
    for n in args.n:
        by = {(r[1], r[2]): r for r in rows if r[0] == n}
        eigh_ips = by[("float32", "torch.linalg.eigh")][4]
        for prec in args.precision:
            for kern in sorted(k for p_, k in by if p_ == prec and k.startswith("ncut")):
                ips = by[(prec, kern)][4]
                print(f"N={n} {prec} {kern}: {ips:,.0f} images/s = {ips / eigh_ips:,.1f}x torch.linalg.eigh "
                      f"({card})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
