"""Launch settings and small device helpers shared by the Triton kernels.

Block sizes live in one table per execution mode: the Triton interpreter (``TRITON_INTERPRET=1``, CPU
tensors) pays ~0.5 ms per program instance and ~30 us per tl op, so it wants few, large programs; a GPU
wants tiles sized for registers and shared memory. ``override`` changes them temporarily (tests use it to
keep the interpreter fast, benchmarks to sweep).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import triton
import triton.language as tl

__all__ = ["interpreting", "block_sizes", "override", "popc32", "words_per_row"]

# Per kernel: the constexpr block sizes and num_warps of one launch.
# affinity: BT = square tile side (multiple of 32: a tile row packs into BT // 32 words), BK = feature chunk;
#           tf32x3 = 1 computes the "float32" similarity with 3 tf32 tensor-core products instead of IEEE
#           fp32 FMAs (faster on the GPU, error ~2^-22 instead of ~2^-24; the benchmark measures both);
#           certified = 1 (the default) computes it instead as precision "exact" does: an fp16 tensor-core
#           screen with a proven bound and the entries within it recomputed as float32 dots in one fixed
#           order (kernels/affinity.py); certified = 0 keeps the single-kernel float32 product above.
# recheck: the recheck of the screens' candidates: BLOCK candidates per program, BC = feature chunk of
#          the float64 dot (precision "exact"; the float32 dot is sequential over the features).
# normalize: BR = rows per program, BC = feature chunk; normalize_exact: the same for precision "exact"'s
#            float64 rows (the sum of squares is unrolled for each C at compile time).
# matvec: BM = rows per program, BN = columns per inner step (multiple of 32), scaled down by the number of
#         vectors so that the (BM, BN, K) fp64 accumulator stays in registers (32 per thread by default);
#         int8 selects the kernel: 0 = that fp64 kernel, 1 = the tensor-core variant (fixed-point digits,
#         int8 tl.dot) with the matvec_int8 settings (BR: digit rows per step of the digits kernel), 2 = the
#         byte-lane dp4a variant (the same digits, 4 mask bits per 2 integer ops and one dp4a per digit) with
#         the matvec_dp4a settings (BM rows per program, BW mask words per loop trip, BR as above), 3 = the
#         nibble-table variant (fp64 subset sums of each 4 columns, one cached load and add per 4 mask bits)
#         with the matvec_table settings (BM, BW as dp4a; BG column groups per step of the table kernel).
#         The GPU default is 3: fewest instructions per mask bit by benchmarks/gpu_model.py (RESULTS.md); the
#         interpreter keeps 0 (tests select the others with override).
# lanczos: how the Triton backend runs the Lanczos steps between convergence checks (kernels/operator.py
#          FusedSteps, kernels/lanczos.py): solve = "torch" (op by op, the shared driver's torch step around the matvec
#          kernel), "steps" (two fused launches per step), "graph" (those launches replayed from a CUDA
#          graph, captured once per Lanczos cycle), "persistent" (one launch per cycle, convergence tested
#          inside with kernels/ritz.py; it always uses the fp64 mat-vec, the others follow matvec's
#          int8 setting). "steps" is
#          the default until bench_triton.py has measured the others on a GPU. BM, BN = mat-vec tile of the
#          fused kernels, BS = columns per sweep of the reorthogonalization (GPU values: no register spills
#          on sm_90, checked by tests/test_triton_compile.py).
# ritz: convergence test kernel (kernels/ritz.py): S shifts per eigenvalue and ROUNDS multisection rounds,
#       (S + 1) ** ROUNDS >= 1e16 (the interpreter pays per op, not per element: few rounds, many shifts).
_GPU = {
    "affinity": {"BT": 128, "BK": 32, "num_warps": 8, "num_stages": 3, "tf32x3": 0, "certified": 1},
    "affinity_fast": {"BT": 128, "BK": 64, "num_warps": 8, "num_stages": 3, "tf32x3": 0},
    "recheck": {"BLOCK": 128, "BC": 16, "num_warps": 4},
    "normalize": {"BR": 16, "BC": 256, "num_warps": 4},
    "normalize_exact": {"BR": 16, "BC": 64, "num_warps": 4},
    "matvec": {"BM": 32, "BN": 128, "num_warps": 4, "int8": 3},
    "matvec_int8": {"BM": 128, "BN": 128, "BR": 256, "num_warps": 8},
    "matvec_dp4a": {"BM": 128, "BW": 2, "BR": 256, "num_warps": 4},
    "matvec_table": {"BM": 256, "BW": 4, "BG": 256, "num_warps": 8},
    "lanczos": {"solve": "steps", "BM": 32, "BN": 64, "BS": 32, "num_warps": 8},
    "ritz": {"S": 32, "ROUNDS": 11, "num_warps": 1},
}
_INTERP = {
    "affinity": {"BT": 64, "BK": 64, "num_warps": 4, "num_stages": 1, "tf32x3": 0, "certified": 1},
    "affinity_fast": {"BT": 64, "BK": 64, "num_warps": 4, "num_stages": 1, "tf32x3": 0},
    "recheck": {"BLOCK": 4096, "BC": 64, "num_warps": 4},
    "normalize": {"BR": 128, "BC": 128, "num_warps": 4},
    "normalize_exact": {"BR": 128, "BC": 128, "num_warps": 4},
    "matvec": {"BM": 128, "BN": 128, "num_warps": 4, "int8": 0},
    "matvec_int8": {"BM": 128, "BN": 128, "BR": 128, "num_warps": 4},
    "matvec_dp4a": {"BM": 128, "BW": 2, "BR": 128, "num_warps": 4},
    "matvec_table": {"BM": 128, "BW": 2, "BG": 256, "num_warps": 4},
    "lanczos": {"solve": "steps", "BM": 128, "BN": 128, "BS": 128, "num_warps": 4},
    "ritz": {"S": 4096, "ROUNDS": 5, "num_warps": 1},
}
_OVERRIDES: dict[str, dict[str, int | str]] = {}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def block_sizes(kernel: str) -> dict[str, int | str]:
    """Launch settings of ``kernel`` for the current mode, with any active ``override`` applied."""
    base = dict((_INTERP if interpreting() else _GPU)[kernel])
    base.update(_OVERRIDES.get(kernel, {}))
    return base


@contextlib.contextmanager
def override(kernel: str, **settings: int | str) -> Iterator[None]:
    """Temporarily replace some launch settings of ``kernel`` (e.g. ``override("affinity", BT=32)``)."""
    if kernel not in _GPU:
        raise KeyError(f"kernel: unknown kernel {kernel!r}; expected one of {sorted(_GPU)}")
    unknown = set(settings) - set(_GPU[kernel])
    if unknown:
        raise KeyError(f"settings: unknown settings {sorted(unknown)} for kernel {kernel!r}")
    saved = _OVERRIDES.get(kernel)
    _OVERRIDES[kernel] = {**(saved or {}), **settings}
    try:
        yield
    finally:
        if saved is None:
            _OVERRIDES.pop(kernel, None)
        else:
            _OVERRIDES[kernel] = saved


def words_per_row(n_max: int) -> int:
    """int32 words per bitmask row: rows are padded to whole 64-bit words (layout shared with csrc/)."""
    return 2 * triton.cdiv(n_max, 64)


@triton.jit
def popc32(x):
    """Population count of each element of a 32-bit integer tensor (int32 is read bit for bit as uint32).

    Plain SWAR arithmetic, because libdevice/inline asm do not run in the interpreter; on the GPU LLVM
    recognises the pattern as ctpop and emits ``popc.b32``.
    """
    x = x.to(tl.uint32, bitcast=True)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24
