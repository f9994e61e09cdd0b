"""Static roofline of ncutfast's default GPU path, computed from the compiled SASS on a machine without a GPU.

For every hot kernel that a batched solve launches (Triton: normalize and affinity per precision, the
Lanczos mat-vec (the launch setting matvec.int8 picks it: by default the nibble-table kernels) and step
kernels, the Ritz check, the final residual mat-vec; alternatives: the other mat-vecs (fp64 select-add,
int8 tensor cores, byte-lane dp4a) and the persistent Lanczos kernel; the CUDA extension's kernels,
statically), this
script compiles the exact specialization that the batch-256 / N = 3600 / C = 768 workload (and N = 784,
C = 384) launches for sm_90a, disassembles it with the ``nvdisasm`` that Triton ships, and reports per
launch:

- instructions by class (FP64, FP32, tensor core, int/logic, load/store, barrier, conversion, ...), per
  warp and per unit of work, registers, shared memory and occupancy (``cuobjdump -res-usage`` and the
  Hopper SM limits);
- bytes moved (a DRAM formula per kernel, unique bytes) and bytes requested by the global loads/stores of
  the SASS;
- a lower-bound time = max(issue-limited, each pipe's throughput-limited, memory-limited), from the rates
  of ``RATES`` below, on the busiest SM. Not counted: launch overheads, host synchronizations, memory and
  instruction latencies, L2 traffic (the CSV has the bytes the loads request), masked-off lanes (a
  predicated instruction costs its issue slot and its lanes either way).

Method for loops (static counts times trip counts): a loop of the SASS is a backward branch; its body is
the address range [branch target, branch]. Nested loops are ranges inside ranges. Every instruction
carries the source line that Triton's line info gives it, and the line of a back-edge branch is the line
of the ``for`` statement it closes, so each SASS loop is named ``function#k`` (the k-th ``for`` of that
function, counted in source order). The launch description gives each name its trip count per entry,
derived from the launch parameters (e.g. ``cdiv(n, BN)``); the instructions of a loop's own body (its
nested loops excluded) execute trips x (the trip counts of the loops around it) times. Code outside
loops is counted once per program, both sides of a branch included; the subroutines that the code calls
(slow paths of fp64 division and square root, for special operands) are not counted. ptxas may unroll a
loop (the body then holds several iterations): a launch description gives that loop's unroll factor
(none of the default path's loops is unrolled; the unit test's tiny kernel is).

Whole solve: per precision, normalize + affinity + the Lanczos launches + the checks + the final residual,
with the Lanczos step counts of CPU runs of the same planted scenes (``ITERATIONS``, measured by
``--measure-iterations``), rounded up to the GPU's check interval (6 steps): the launches of a step run for
the whole batch until its slowest problem has converged, and the problems that are done skip their work.

    python benchmarks/gpu_model.py                 # both workloads, H100 SXM and H200, every kernel
    python benchmarks/gpu_model.py --quick         # N = 3600 on the H100 SXM, default path kernels (CI)
    python benchmarks/gpu_model.py --cuda-ext      # also the CUDA extension's kernels (nvcc), statically
    python benchmarks/gpu_model.py --out DIR       # CSV + markdown into DIR (default benchmarks/results)
    python benchmarks/gpu_model.py --measure-iterations   # re-measure ITERATIONS on the CPU (minutes)
    python benchmarks/gpu_model.py --compare bench_triton.csv  # measured (GPU) beside predicted, per row

The last line printed is ``predicted images/s (H100 SXM, batch 256, N=3600, C=768): fast=.. exact=..
float32=..`` (solver "steps": the library's GPU launch settings; solver "fp64" in the tables is the same
path with the fp64 select-add mat-vec, the default before the nibble table). Run it from the checkout root
with ``PYTHONPATH=.`` so that the checkout's ``ncutfast`` is the one compiled.

Precisions "exact" and "float32" (its default launch setting affinity.certified = 1) are certified: a
normalization (exact: ``_exact_normalize_kernel``; float32: the fp32 one, also writing the fp16 copy), the
fp16 tensor-core screen ``_affinity_exact_kernel`` and ``_recheck_kernel`` on the candidates
(``EXACT_CANDIDATES``, the largest candidate fraction measured on the planted scenes, scaled for float32's
bound), all from their SASS, as a note under each solve table says.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ncutfast.backends.contract import BREAKDOWN, KRYLOV_DIM, PARK

# ---------------------------------------------------------------------------------------------------------
# Machine rates. One table; per-SM per-clock lane rates are from the CUDA C++ Programming Guide, section
# "Arithmetic Instructions" (throughput table, compute capability 9.0) and the Hopper whitepaper (SM
# layout: 4 sub-partitions, each issuing one warp instruction per clock); SM counts, clocks, HBM bandwidth
# and tensor-core rates are from NVIDIA's datasheets (dense rates, i.e. the sparsity figures halved).
# Sources: https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet (H100 SXM5:
# 132 SMs, 3.35 TB/s, FP64 34 / FP64 TC 67 / FP32 67 / TF32 TC 494.7 / FP16 TC 989.4 / INT8 TC 1978.9
# TFLOPS), https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM: same compute, 4.8 TB/s HBM3e),
# https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper (boost clock 1.98 GHz: 132 SMs x
# 128 FP32 lanes x 2 x 1.98 GHz = 66.9 TFLOPS), https://docs.nvidia.com/cuda/cuda-c-programming-guide/
# #arithmetic-instructions (lanes per clock per SM on cc 9.0: FP32 128, FP64 64, integer add/logic/shift/
# compare 64, integer multiply-add 64, conversions and popc 16, warp shuffle 32). Loads and stores: 32 lanes
# per clock (the whitepaper's SM diagram: 8 LD/ST units per sub-partition), shuffles counted with them.
# ---------------------------------------------------------------------------------------------------------
RATES: dict[str, dict[str, float]] = {
    "H100 SXM": {"sms": 132, "clock_hz": 1.98e9, "dram_bps": 3.35e12, "tc_fp16": 989.4e12, "tc_tf32": 494.7e12,
                 "tc_int8": 1978.9e12, "tc_fp64": 66.9e12},
    "H200": {"sms": 132, "clock_hz": 1.98e9, "dram_bps": 4.8e12, "tc_fp16": 989.4e12, "tc_tf32": 494.7e12,
             "tc_int8": 1978.9e12, "tc_fp64": 66.9e12},
}
# Thread lanes per clock per SM of each pipe (cc 9.0). "fma" serves FP32 at 128 lanes and integer
# multiply-adds (IMAD, on the FMA-heavy half) at 64: its cycles are max(imad / 64, (fp32 + imad) / 128).
LANES = {"fp32": 128, "imad": 64, "alu": 64, "fp64": 64, "xu": 16, "lsu": 32}
ISSUE_WARPS_PER_CLK = 4  # one warp instruction per clock per sub-partition
# Per-SM limits of compute capability 9.0 (occupancy): threads, warps, blocks, registers, shared memory.
SM_LIMITS = {"warps": 64, "blocks": 32, "regs": 65536, "smem": 227 * 1024, "smem_reserved": 1024}

CLASSES = ("fp64", "fp32", "tensor", "int", "ldst", "barrier", "conv", "uniform", "move", "control")


def classify(opcode: str) -> tuple[str, str]:
    """(class, pipe) of a SASS opcode (modifiers included, e.g. ``IMAD.WIDE.U32``). Pipes: fp32, imad, alu,
    fp64, xu, lsu, tensor, or "" for instructions that only take an issue slot (uniform datapath, moves of
    special registers, control, barriers)."""
    base = opcode.split(".")[0]
    if base in ("HGMMA", "IGMMA", "QGMMA", "BGMMA", "HMMA", "IMMA", "DMMA", "BMMA"):
        return "tensor", "tensor"
    if base in ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "DSET"):
        return "fp64", "fp64"
    if base in ("FADD", "FMUL", "FFMA", "HADD2", "HMUL2", "HFMA2", "FADD32I", "FMUL32I", "FFMA32I", "FSWZADD"):
        return "fp32", "fp32"
    if base in ("FSETP", "FSET", "FSEL", "FMNMX", "FCHK", "HSETP2", "HMNMX2"):
        return "fp32", "alu"
    if base == "MUFU":
        return "fp32", "xu"
    if base in ("F2F", "F2I", "I2F", "I2FP", "F2FP", "FRND", "I2I", "F2IP"):
        return "conv", "xu"
    if base in ("IMAD", "IDP", "IMUL", "IMADSP"):
        return "int", "imad"
    if base in ("POPC", "FLO", "BREV"):
        return "int", "xu"
    if base in ("IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "IMNMX", "VIMNMX", "IABS", "LEA",
                "SEL", "PRMT", "SGXT", "BMSK", "VIADD", "VIADDMNMX", "PLOP3", "P2R", "R2P", "BFI", "BFE", "ICMP",
                "LEPC", "VOTE", "MATCH"):
        return "int", "alu"
    if base in ("LDG", "STG", "LDS", "STS", "LD", "ST", "LDL", "STL", "ATOM", "ATOMG", "ATOMS", "RED", "REDUX",
                "LDGSTS", "LDSM", "STSM", "SHFL", "LDC", "UBLKCP", "UTMALDG", "UTMASTG", "UTMAPF", "CCTL", "SUST",
                "SULD", "TEX", "TLD"):
        return "ldst", "lsu"
    if base in ("BAR", "BSYNC", "BSSY", "WARPSYNC", "MEMBAR", "DEPBAR", "LDGDEPBAR", "WARPGROUP", "ERRBAR",
                "FENCE", "SYNCS", "ARRIVES", "ELECT", "NANOSLEEP", "B2R", "R2B"):
        return "barrier", ""
    if base in ("BRA", "BRX", "EXIT", "CALL", "RET", "JMP", "JMX", "NOP", "YIELD", "BPT", "BREAK", "KILL", "RTT",
                "ACQBULK", "WARPGROUPSET"):
        return "control", ""
    if base.startswith("U") or base in ("S2UR", "R2UR", "CS2UR", "LDCU"):
        return "uniform", ""
    return "move", ""  # MOV, S2R, CS2R, ...: register moves (issue slot; the ALU pipe is not charged)


_WIDTH = {"8": 1, "U8": 1, "S8": 1, "16": 2, "U16": 2, "S16": 2, "64": 8, "128": 16}


def access_bytes(opcode: str) -> int:
    """Bytes per thread of a global load/store/atomic (``LDG.E.64`` -> 8; the default access is 4 bytes);
    0 for other instructions (shared memory, constants, shuffles)."""
    parts = opcode.split(".")
    if parts[0] not in ("LDG", "STG", "LDGSTS", "ATOM", "ATOMG", "RED"):
        return 0
    widths = [_WIDTH[p] for p in parts[1:] if p in _WIDTH]
    return widths[-1] if widths else 4


def tensor_flops(opcode: str) -> tuple[str, float]:
    """(rate key, FLOPs per warp) of a tensor-core instruction. A Hopper ``HGMMA.MxNxK`` is a warpgroup
    instruction (4 warps issue it, each a quarter of the 2 M N K operations); ``HMMA/IMMA/DMMA.MxNxK`` are
    per warp."""
    parts = opcode.split(".")
    shape = next((p for p in parts if re.fullmatch(r"\d+x\d+x\d+", p)), None)
    if shape is None:
        return "tc_fp16", 0.0
    m, n, k = (int(v) for v in shape.split("x"))
    flops = 2.0 * m * n * k
    if parts[0].endswith("GMMA"):
        flops /= 4
    kinds = set(parts[1:])
    if parts[0] in ("IGMMA", "IMMA"):
        key = "tc_int8"
    elif parts[0] == "DMMA":
        key = "tc_fp64"
    elif kinds & {"TF32"}:
        key = "tc_tf32"
    else:
        key = "tc_fp16"
    return key, flops


# ---------------------------------------------------------------------------------------------------------
# SASS parsing
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Instr:
    """One SASS instruction: address, predicate guard ("" if none), opcode with modifiers, operand text and
    the source location of Triton's/nvcc's line info (file "" and line 0 where there is none)."""

    addr: int
    pred: str
    opcode: str
    operands: str
    file: str
    line: int


@dataclasses.dataclass
class Loop:
    """A loop of the SASS: body = instructions with start <= addr <= end (end = the back-edge branch)."""

    start: int
    end: int
    file: str
    line: int
    parent: int | None = None  # index of the innermost enclosing loop
    name: str = ""


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^(\.L\w+|\$[\w$.]+):")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')


def parse_sass(text: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions and label addresses of the text section of ``nvdisasm -c -gi`` output (one kernel). An
    instruction's location is the innermost one of its line info (``-gi`` prints the inlining chain, innermost
    first)."""
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    file, line = "", 0
    innermost = False  # a location was read since the last instruction: the next ones are its callers
    for raw in text.splitlines():
        m = _LINE.search(raw)
        if m:
            if not innermost:
                file, line, innermost = m.group(1), int(m.group(2)), True
            continue
        m = _LABEL.match(raw.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(raw)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            instrs.append(Instr(addr, (m.group(2) or "").strip(), m.group(3), m.group(4).strip(), file, line))
            innermost = False
    for lab in pending:  # a label at the very end
        labels[lab] = instrs[-1].addr + 16 if instrs else 0
    return instrs, labels


def find_loops(instrs: list[Instr], labels: dict[str, int]) -> list[Loop]:
    """Loops = backward branches (``BRA`` to a label at or before it), sorted by start address, each with
    the index of its innermost enclosing loop."""
    loops = []
    for ins in instrs:
        if ins.opcode.split(".")[0] != "BRA":
            continue
        m = re.search(r"`\((\.L\w+)\)", ins.operands)
        if m and m.group(1) in labels and labels[m.group(1)] <= ins.addr:
            loops.append(Loop(labels[m.group(1)], ins.addr, ins.file, ins.line))
    loops.sort(key=lambda lp: (lp.start, -lp.end))
    for i, lp in enumerate(loops):
        enclosing = [j for j, o in enumerate(loops) if j != i and o.start <= lp.start and lp.end <= o.end
                     and (o.end - o.start) > (lp.end - lp.start)]
        lp.parent = min(enclosing, key=lambda j: loops[j].end - loops[j].start) if enclosing else None
    return loops


def hot_region(instrs: list[Instr], labels: dict[str, int]) -> list[Instr]:
    """The kernel's own code: the instructions before the first called subroutine (labels ``$...``: the
    slow paths of fp64 division and square root, called for special operands only), without the padding
    at the end (a branch to itself and NOPs)."""
    end = min((a for lab, a in labels.items() if lab.startswith("$")), default=math.inf)
    hot = [ins for ins in instrs if ins.addr < end]
    at = {a: lab for lab, a in labels.items()}
    while hot and (hot[-1].opcode == "NOP" or (hot[-1].opcode == "BRA" and f"({at.get(hot[-1].addr)})" in
                                               hot[-1].operands)):
        hot.pop()
    return hot


@dataclasses.dataclass
class _ForSite:
    file: str
    line: int
    name: str


def for_sites(path: str) -> list[_ForSite]:
    """Every ``for`` statement of a Python source file, named ``function#k`` (k-th for in the function)."""
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            fors = sorted((n for n in ast.walk(node) if isinstance(n, ast.For)), key=lambda n: n.lineno)
            out += [_ForSite(path, f.lineno, f"{node.name}#{k}") for k, f in enumerate(fors)]
    return out


def name_loops(loops: list[Loop]) -> None:
    """Name each loop after the ``for`` statement on its back-edge line (``function#k``), or
    ``file:line`` when that line is not a Python ``for`` (CUDA sources, or a loop the compiler made)."""
    cache: dict[str, dict[int, str]] = {}
    for lp in loops:
        if lp.file not in cache:
            cache[lp.file] = {s.line: s.name for s in for_sites(lp.file)} if lp.file.endswith(".py") else {}
        lp.name = cache[lp.file].get(lp.line, f"{os.path.basename(lp.file)}:{lp.line}")


# ---------------------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Counts:
    """Executed warp instructions of one program (per warp: every warp of a Triton program runs the same
    instruction stream), by class and by pipe, plus tensor FLOPs by rate key and global bytes requested."""

    by_class: Counter
    by_pipe: Counter
    tensor: Counter
    global_bytes: float  # per warp: bytes requested by global loads/stores/atomics (32 lanes each)

    @property
    def total(self) -> float:
        return float(sum(self.by_class.values()))


def weights(loops: list[Loop], trips: dict[str, float], unroll: dict[str, int] | None = None) -> list[float]:
    """Executions of each loop's body per program: its trips (divided by its unroll factor) times those of
    the loops around it. A loop whose name has no trip count raises (the launch description is stale)."""
    unroll = unroll or {}
    missing = sorted({lp.name for lp in loops if lp.name not in trips})
    if missing:
        raise KeyError(f"trips: no trip count for the SASS loop(s) {missing}")
    own = [trips[lp.name] / unroll.get(lp.name, 1) for lp in loops]
    out = []
    for i in range(len(loops)):
        w, j = own[i], loops[i].parent
        while j is not None:
            w *= own[j]
            j = loops[j].parent
        out.append(w)
    return out


def count(instrs: list[Instr], loops: list[Loop], trips: dict[str, float],
          unroll: dict[str, int] | None = None) -> Counts:
    """Executed instructions per warp of one program: each instruction once, or as often as the innermost
    loop containing it runs (``weights``)."""
    w = weights(loops, trips, unroll)
    by_class: Counter = Counter()
    by_pipe: Counter = Counter()
    tensor: Counter = Counter()
    gbytes = 0.0
    for ins in instrs:
        inner = [i for i, lp in enumerate(loops) if lp.start <= ins.addr <= lp.end]
        times = w[max(inner, key=lambda i: loops[i].start)] if inner else 1.0
        cls, pipe = classify(ins.opcode)
        by_class[cls] += times
        if pipe:
            by_pipe[pipe] += times
        if cls == "tensor":
            key, flops = tensor_flops(ins.opcode)
            tensor[key] += times * flops
        gbytes += times * 32 * access_bytes(ins.opcode)
    return Counts(by_class, by_pipe, tensor, gbytes)


def occupancy(regs: int, smem: int, warps: int) -> int:
    """Resident programs per SM (cc 9.0): the tightest of warps, blocks, registers (allocated per warp in
    units of 256) and shared memory (plus 1 KiB reserved per block)."""
    lim = SM_LIMITS
    by_warps = lim["warps"] // warps
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = lim["regs"] // (regs_per_warp * warps)
    by_smem = lim["smem"] // (smem + lim["smem_reserved"]) if smem else lim["blocks"]
    return max(0, min(lim["blocks"], by_warps, by_regs, by_smem))


@dataclasses.dataclass
class Bound:
    """Lower-bound time of a launch on one GPU and the resource that sets it."""

    seconds: float
    binds: str
    parts: dict[str, float]


def roofline(c: Counts, *, programs: int, warps: int, occ: int, dram_bytes: float, gpu: str) -> Bound:
    """max(issue, each pipe, memory, warp-serial) for ``programs`` programs of ``warps`` warps with per-warp
    counts ``c``, on the busiest SM (programs spread evenly: ceil(programs / SMs) on it).

    issue: the SM issues 4 warp instructions per clock; pipe p: its lanes per clock (``LANES``; tensor cores:
    the datasheet FLOP rate per SM); memory: ``dram_bytes`` at the HBM bandwidth (the whole GPU); warp-serial:
    a warp issues at most one instruction per clock, and at most ``occ`` programs are resident per SM."""
    r = RATES[gpu]
    if programs <= 0:
        return Bound(0.0, "-", {})
    per_sm = math.ceil(programs / r["sms"])
    clk = r["clock_hz"]
    warp_insts = per_sm * warps
    parts = {"issue": warp_insts * c.total / ISSUE_WARPS_PER_CLK / clk}
    lanes = {p: warp_insts * 32 * v for p, v in c.by_pipe.items()}
    fma = max(lanes.get("imad", 0.0) / LANES["imad"], (lanes.get("fp32", 0.0) + lanes.get("imad", 0.0)) / LANES["fp32"])
    parts["fma"] = fma / clk
    for p in ("alu", "fp64", "xu", "lsu"):
        parts[p] = lanes.get(p, 0.0) / LANES[p] / clk
    parts["tensor"] = sum(per_sm * warps * f / (r[k] / r["sms"]) for k, f in c.tensor.items())
    parts["dram"] = dram_bytes / r["dram_bps"]
    parts["warp-serial"] = math.ceil(per_sm / max(occ, 1)) * c.total / clk
    binds = max(parts, key=parts.get)
    return Bound(parts[binds], binds, parts)


# ---------------------------------------------------------------------------------------------------------
# Compilation (Triton kernels for sm_90a, the CUDA extension with nvcc) and disassembly
# ---------------------------------------------------------------------------------------------------------
def _nvidia_bin(tool: str) -> str:
    """Path of a CUDA binary tool shipped with Triton (nvdisasm, cuobjdump, ptxas), else on PATH."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    if path.exists():
        return str(path)
    found = shutil.which(tool)
    if not found:
        raise FileNotFoundError(f"{tool}: not shipped with triton and not on PATH")
    return found


@dataclasses.dataclass
class Kernel:
    """A compiled kernel: its SASS (parsed), loops, registers, shared memory (bytes), warps per program."""

    name: str
    instrs: list[Instr]
    loops: list[Loop]
    regs: int
    smem: int
    warps: int


def disassemble(cubin: bytes) -> tuple[str, dict[str, dict[str, int]]]:
    """(``nvdisasm -c -gi`` text, {function: {"regs", "smem"}} from ``cuobjdump -res-usage``) of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        sass = subprocess.run([_nvidia_bin("nvdisasm"), "-c", "-gi", path], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([_nvidia_bin("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    usage: dict[str, dict[str, int]] = {}
    name = None
    for line in res.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+).*SHARED:(\d+)", line)
        if m and name:
            usage[name] = {"regs": int(m.group(1)), "smem": int(m.group(2))}
    return sass, usage


def split_functions(sass: str) -> dict[str, str]:
    """SASS text per function of a multi-kernel cubin (sections ``.text.<name>``)."""
    out: dict[str, list[str]] = {}
    cur = None
    for line in sass.splitlines():
        m = re.match(r"\s*\.section\s+\.text\.(\S+?),", line)
        if m:
            cur = m.group(1)
            out[cur] = []
            continue
        if cur is not None:
            out[cur].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def kernel_from_sass(name: str, sass: str, regs: int, smem: int, warps: int) -> Kernel:
    """Parse, keep the hot region, find and name the loops."""
    instrs, labels = parse_sass(sass)
    hot = hot_region(instrs, labels)
    loops = find_loops(hot, labels)
    name_loops(loops)
    return Kernel(name, hot, loops, regs, smem, warps)


def specialize(sig: dict[str, tuple[str, object]]) -> tuple[dict[str, str], dict[str, object], dict]:
    """Signature, constexprs and attributes as Triton's JIT specializes a launch with these argument values:
    pointers (torch allocations) are 16-byte aligned, an integer equal to 1 becomes a constant, an integer
    divisible by 16 gets tt.divisibility = 16. ``sig`` maps each argument to (type, value); constexprs
    have type "constexpr"."""
    types: dict[str, str] = {}
    consts: dict[str, object] = {}
    attrs: dict = {}
    for i, (name, (ty, val)) in enumerate(sig.items()):
        if ty == "constexpr":
            types[name], consts[name] = "constexpr", val
        elif ty.startswith("*"):
            types[name] = ty
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif ty in ("i32", "i64") and val == 1:
            types[name], consts[name] = "constexpr", 1
        else:
            types[name] = ty
            if ty in ("i32", "i64") and isinstance(val, int) and val % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return types, consts, attrs


_COMPILED: dict[tuple, Kernel] = {}


def compile_triton(fn, sig: dict[str, tuple[str, object]], options: dict[str, int]) -> Kernel:
    """Compile ``fn`` for sm_90a at this specialization (cached per specialization) and parse its SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types, consts, attrs = specialize(sig)
    key = (fn.__name__, tuple(types.items()), tuple((k, str(v)) for k, v in consts.items()),
           tuple(sorted(attrs)), tuple(sorted(options.items())))
    if key not in _COMPILED:
        k = triton.compile(ASTSource(fn=fn, signature=types, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=options)
        sass, usage = disassemble(k.asm["cubin"])
        u = usage.get(k.metadata.name, {"regs": 0, "smem": 0})
        _COMPILED[key] = kernel_from_sass(fn.__name__, sass, u["regs"], k.metadata.shared + u["smem"],
                                          options.get("num_warps", 4))
    return _COMPILED[key]


def compile_cuda_extension(root: Path) -> list[Kernel]:
    """The CUDA extension's kernels (csrc/cuda/*.cu), compiled with nvcc -cubin for sm_90a with line info.
    Empty when nvcc is missing."""
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return []
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted((root / "csrc" / "cuda").glob("*.cu")):
            cubin = os.path.join(tmp, src.stem + ".cubin")
            subprocess.run([nvcc, "-cubin", "-arch=sm_90a", "-O3", "-std=c++17", "-lineinfo", f"-I{root / 'csrc'}",
                            str(src), "-o", cubin], check=True, capture_output=True, text=True)
            sass, usage = disassemble(Path(cubin).read_bytes())
            for fname, text in split_functions(sass).items():
                u = usage.get(fname, {"regs": 0, "smem": 0})
                out.append(kernel_from_sass(fname, text, u["regs"], u["smem"], 0))
    return out


# ---------------------------------------------------------------------------------------------------------
# The workload: what a batched solve launches, with its trip counts and bytes
# ---------------------------------------------------------------------------------------------------------
# Lanczos steps per problem of CPU runs of the planted scenes (torch backend, precision "float32", default
# tol 1e-8, max_iter 300, krylov_dim 48; "fast" gave the same counts on 8 scenes of each size),
# measured with: python benchmarks/gpu_model.py --measure-iterations   (24 scenes per size, seeds 0..23)
ITERATIONS = {
    (3600, 768): [9, 12, 7, 7, 7, 9, 6, 8, 14, 9, 7, 5, 12, 7, 5, 7, 6, 14, 14, 12, 7, 5, 7, 5],
    (784, 384): [16, 14, 12, 9, 16, 16, 14, 18, 16, 11, 7, 10, 12, 16, 5, 14, 7, 7, 16, 14, 11, 6, 16, 6],
}
CHECK_EVERY_GPU = 6  # ncutfast.backends.lanczos.lanczos_fiedler's check interval on a GPU
BATCH = 256
PRECISIONS = ("fast", "exact", "float32")
#: Other ways to compute precision "float32" (launch settings): affinity.certified = 0 (one IEEE fp32
#: ``tl.dot`` per tile, plain FMAs) and affinity.tf32x3 = 1 (three tf32 tensor-core products).
FLOAT32_VARIANTS = ("float32-fma", "float32-tf32x3")
#: Fraction of the entries (i <= j) that the fp16 screen of precision "exact" leaves to the float64 recheck:
#: the largest measured on the planted scenes (``tests/test_exact.py``'s scenes; 5e-8 .. 3.7e-3). The float32
#: screen's fraction is this one scaled by the ratio of the two bounds (candidates lie within the bound of tau).
EXACT_CANDIDATES = 3.7e-3
EXACT_NOTE = ('"exact": the float64 normalization and fp16 rounding (_exact_normalize_kernel), the fp16 '
              "tensor-core screen (_affinity_exact_kernel), and the float64 recheck kernel (_recheck_kernel) on "
              f"{EXACT_CANDIDATES:g} of the entries (candidates in image order: each image's float64 rows read "
              'once from HBM, then from L2). "float32" (certified): fp32 normalization writing an fp16 copy too '
              "(_normalize_kernel, HALF), the same screen, and the fixed-order float32 recheck kernel on the "
              "candidates of its bound (fp32 rows read once per image).")


def gpu_steps(iterations: Iterable[int], check: int = CHECK_EVERY_GPU, m: int = KRYLOV_DIM) -> list[int]:
    """Steps each problem takes on the GPU: its CPU count (checked every 2 steps) rounded up to a multiple of
    the GPU's check interval within each cycle of m steps."""
    out = []
    for c in iterations:
        full, rest = divmod(int(c), m)
        out.append(full * m + min(m, check * math.ceil(rest / check)))
    return out


def active_per_step(steps: list[int], batch: int) -> list[int]:
    """Problems still iterating at each step j = 0 .. max(steps) - 1, scaled from the sample to ``batch``."""
    return [round(batch * sum(s > j for s in steps) / len(steps)) for j in range(max(steps))]


@dataclasses.dataclass
class Launch:
    """One kernel launch of the workload: the kernel, its programs doing work, the trip count of each of its
    loops per entry, DRAM bytes moved (unique), and its unit of work (name, count) for the per-unit column."""

    label: str
    kernel: Kernel
    programs: int
    trips: dict[str, float]
    dram_bytes: float
    unit: tuple[str, float]
    unroll: dict[str, int] = dataclasses.field(default_factory=dict)

    def counts(self) -> Counts:
        return count(self.kernel.instrs, self.kernel.loops, self.trips, self.unroll)

    def bound(self, gpu: str) -> Bound:
        k = self.kernel
        return roofline(self.counts(), programs=self.programs, warps=k.warps, occ=occupancy(k.regs, k.smem, k.warps),
                        dram_bytes=self.dram_bytes, gpu=gpu)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Workload:
    """The launches of one batched solve of ``batch`` images of n tokens and c channels (all the same size,
    as in MaskCut's batches), at the library's GPU launch settings (``ncutfast.kernels._utils._GPU``)."""

    def __init__(self, n: int, c: int, batch: int = BATCH) -> None:
        from ncutfast.kernels import _utils

        self.n, self.c, self.b = n, c, batch
        self.m = min(KRYLOV_DIM, n)
        self.words = _utils.words_per_row(n)
        self.cfg = {k: dict(v) for k, v in _utils._GPU.items()}

    # -- affinity -------------------------------------------------------------------------------------------
    def normalize(self, precision: str, half: bool = False) -> Launch:
        """The normalization launch of "fast" (fp16 rows) or "float32" (fp32 rows; with ``half`` also their fp16
        copy, as the certified float32 path launches it)."""
        import triton.language as tl

        from ncutfast.kernels.affinity import _normalize_kernel

        dst, size = {"fast": ("fp16", 2), "float32": ("fp32", 4)}[precision]
        cfg, n, c, b = self.cfg["normalize"], self.n, self.c, self.b
        sig = {"x_ptr": ("*fp32", 0), "out_ptr": (f"*{dst}", 0), "half_ptr": ("*fp16" if half else f"*{dst}", 0),
               "len_ptr": ("*i32", 0), "N_max": ("i32", n), "C": ("i32", c), "stride_xb": ("i32", n * c),
               "stride_xn": ("i32", c), "stride_xc": ("i32", 1), "BR": ("constexpr", cfg["BR"]),
               "BC": ("constexpr", cfg["BC"]), "ACC": ("constexpr", tl.float32), "WIDE": ("constexpr", tl.float32),
               "HALF": ("constexpr", half)}
        k = compile_triton(_normalize_kernel, sig, {"num_warps": cfg["num_warps"]})
        trips = {f"_normalize_kernel#{i}": _cdiv(c, cfg["BC"]) for i in range(3)}  # max|x|, sum of squares, store
        return Launch(f"normalize-{dst}" + ("+fp16" if half else ""), k, _cdiv(n, cfg["BR"]) * b, trips,
                      b * n * c * (4 + size + 2 * half), ("feature", b * n * c))

    def affinity(self, precision: str, tf32x3: bool | None = None) -> Launch:
        """The single-kernel affinity launch (``_affinity_kernel``) of "fast" or "float32" (its launch setting
        affinity.certified = 0); ``tf32x3`` overrides the launch setting of that name (float32 only)."""
        import triton.language as tl

        from ncutfast.kernels.affinity import _affinity_kernel

        cfg = self.cfg["affinity_fast" if precision == "fast" else "affinity"]
        dtype, size, dot = {"fast": ("fp16", 2, "tf32"), "float32": ("fp32", 4, "ieee")}[precision]
        x3 = cfg["tf32x3"] if tf32x3 is None else tf32x3
        if precision != "fast" and x3:
            dot = "tf32x3"
        n, c, b, bt = self.n, self.c, self.b, cfg["BT"]
        sig = {"f_ptr": (f"*{dtype}", 0), "pairs_ptr": ("*i32", 0), "len_ptr": ("*i32", 0), "tau_ptr": ("*fp64", 0),
               "mask_ptr": ("*i32", 0), "count_ptr": ("*i32", 0), "N_max": ("i32", n), "C": ("i32", c),
               "W": ("i32", self.words), "BT": ("constexpr", bt), "BK": ("constexpr", cfg["BK"]),
               "ACC": ("constexpr", tl.float32), "DOT_PRECISION": ("constexpr", dot)}
        k = compile_triton(_affinity_kernel, sig, {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        tiles = _cdiv(n, bt)
        pairs = tiles * (tiles + 1) // 2
        dram = b * (n * c * size + n * self.words * 4 + n * 4)  # features once, mask and counts written
        label = f"affinity-{precision}" + ("-tf32x3" if dot == "tf32x3" else "")
        return Launch(label, k, pairs * b, {"_tile_dot#0": _cdiv(c, cfg["BK"])}, dram,
                      ("similarity", pairs * b * bt * bt))

    def candidates(self, precision: str) -> float:
        """Candidates (pairs i <= j) that the fp16 screen leaves to the recheck, over the batch."""
        from ncutfast import exact

        frac = EXACT_CANDIDATES
        if precision == "float32":
            frac *= exact.float32_screen_bound(self.c) / exact.tensor_core_bound(self.c)
        return frac * self.b * self.n * (self.n + 1) / 2

    def screen(self, precision: str) -> Launch:
        """The fp16 tensor-core screen of "exact" or certified "float32" (``_affinity_exact_kernel``): the
        entries beyond the bound decided, the candidates listed."""
        from ncutfast.kernels.affinity import _affinity_exact_kernel

        cfg = self.cfg["affinity_fast"]
        n, c, b, bt = self.n, self.c, self.b, cfg["BT"]
        sig = {"f_ptr": ("*fp16", 0), "pairs_ptr": ("*i32", 0), "len_ptr": ("*i32", 0), "thr_ptr": ("*fp32", 0),
               "mask_ptr": ("*i32", 0), "count_ptr": ("*i32", 0), "cand_ptr": ("*i32", 0), "N_max": ("i32", n),
               "C": ("i32", c), "W": ("i32", self.words), "BT": ("constexpr", bt), "BK": ("constexpr", cfg["BK"])}
        k = compile_triton(_affinity_exact_kernel, sig, {"num_warps": cfg["num_warps"],
                                                         "num_stages": cfg["num_stages"]})
        tiles = _cdiv(n, bt)
        pairs = tiles * (tiles + 1) // 2
        dram = b * (n * c * 2 + n * self.words * 4 + n * 4) + self.candidates(precision) * 4  # + candidate words
        return Launch(f"affinity-{precision}-screen", k, pairs * b, {"_tile_dot#0": _cdiv(c, cfg["BK"])}, dram,
                      ("similarity", pairs * b * bt * bt))

    def recheck(self, precision: str) -> Launch:
        """``_recheck_kernel`` on the screen's candidates: float64 ("exact", blocked dot) or float32 (one fixed
        order, sequential over the features). DRAM: the candidate list (and the undecided flags) plus each
        image's rows once (the list is in image order, and one image's rows fit in L2)."""
        from ncutfast.kernels.affinity import _recheck_kernel

        cfg = self.cfg["recheck"]
        n, c, b = self.n, self.c, self.b
        ex = precision == "exact"
        size = 8 if ex else 4
        cand = self.candidates(precision)
        sig = {"rows_ptr": ("*fp64" if ex else "*fp32", 0), "cand_ptr": ("*i64", 0), "thr_ptr": ("*fp64", 0),
               "mask_ptr": ("*i32", 0), "count_ptr": ("*i32", 0), "undecided_ptr": ("*i8", 0), "N_max": ("i32", n),
               "C": ("i32", c), "W": ("i32", self.words), "total": ("i32", 3),
               "BLOCK": ("constexpr", cfg["BLOCK"]), "BC": ("constexpr", cfg["BC"]), "EXACT": ("constexpr", ex)}
        k = compile_triton(_recheck_kernel, sig, {"num_warps": cfg["num_warps"], "enable_fp_fusion": False})
        trips = {"_recheck_kernel#0": _cdiv(c, cfg["BC"])} if ex else {"_recheck_kernel#1": c // 4,
                                                                       "_recheck_kernel#2": c % 4}
        unroll = {}
        if not ex:  # ptxas unrolls the loop of 4 features; its body holds 4 float32 adds per iteration
            body = next(lp for lp in k.loops if lp.name == "_recheck_kernel#1")
            adds = sum(ins.opcode.split(".")[0] == "FADD" for ins in k.instrs if body.start <= ins.addr <= body.end)
            unroll["_recheck_kernel#1"] = max(1, adds // 4)
        dram = cand * (8 + ex) + b * n * c * size
        return Launch(f"recheck-{precision}", k, _cdiv(round(cand), cfg["BLOCK"]), trips, dram,
                      ("candidate", cand), unroll)

    def normalize_exact(self) -> Launch:
        """Precision "exact"'s rows (``_exact_normalize_kernel``): float64 rows bit for bit as the reference's
        and their fp16 copy, from the fp32 features (read for the sum of squares, then again for the division)."""
        from ncutfast.kernels.affinity import _exact_normalize_kernel

        cfg, n, c, b = self.cfg["normalize_exact"], self.n, self.c, self.b
        sig = {"x_ptr": ("*fp32", 0), "f_ptr": ("*fp64", 0), "h_ptr": ("*fp16", 0), "len_ptr": ("*i32", 0),
               "N_max": ("i32", n), "stride_xb": ("i32", n * c), "stride_xn": ("i32", c), "stride_xc": ("i32", 1),
               "C": ("constexpr", c), "BR": ("constexpr", cfg["BR"]), "BC": ("constexpr", cfg["BC"])}
        k = compile_triton(_exact_normalize_kernel, sig, {"num_warps": cfg["num_warps"]})
        return Launch("normalize-exact", k, _cdiv(n, cfg["BR"]) * b, {"_exact_normalize_kernel#0": _cdiv(c, cfg["BC"])},
                      b * n * c * (4 + 8 + 2), ("feature", b * n * c))  # unique bytes: the re-read hits L2

    # -- Lanczos ---------------------------------------------------------------------------------------------
    def _state_sig(self) -> dict[str, tuple[str, object]]:
        return {"basis_ptr": ("*fp64", 0), "w_ptr": ("*fp64", 0), "alpha_ptr": ("*fp64", 0),
                "beta_ptr": ("*fp64", 0), "live_ptr": ("*i8", 0), "klen_ptr": ("*i64", 0), "cap_ptr": ("*i64", 0),
                "done_ptr": ("*i8", 0), "stalled_ptr": ("*i8", 0), "step_ptr": ("*i32", 0)}

    def lanczos_matvec(self, active: int) -> Launch:
        from ncutfast.kernels.lanczos import _lanczos_matvec_kernel

        cfg, n = self.cfg["lanczos"], self.n
        st = self._state_sig()
        sig = {"mask_ptr": ("*i32", 0), "s_ptr": ("*fp64", 0), "len_ptr": ("*i32", 0), "eps_ptr": ("*fp64", 0),
               "idx_ptr": ("*i32", 0), **{k: st[k] for k in ("basis_ptr", "w_ptr", "done_ptr", "stalled_ptr",
                                                             "step_ptr")},
               "N_max": ("i32", n), "W": ("i32", self.words), "stride_bb": ("i32", (self.m + 2) * n),
               "stride_br": ("i32", n), "BM": ("constexpr", cfg["BM"]), "BN": ("constexpr", cfg["BN"])}
        k = compile_triton(_lanczos_matvec_kernel, sig, {"num_warps": cfg["num_warps"]})
        dram = active * (n * self.words * 4 + 3 * n * 8)  # mask, q, s, w
        return Launch("lanczos-matvec", k, _cdiv(n, cfg["BM"]) * active, {"_matvec_rows#0": _cdiv(n, cfg["BN"])},
                      dram, ("mask bit", active * n * n))

    def lanczos_step(self, active: int, j: int) -> Launch:
        import triton

        from ncutfast.kernels.lanczos import _lanczos_step_kernel

        cfg, n = self.cfg["lanczos"], self.n
        sig = {"len_ptr": ("*i32", 0), "idx_ptr": ("*i32", 0), **self._state_sig(), "N_max": ("i32", n),
               "M": ("i32", self.m), "stride_bb": ("i32", (self.m + 2) * n), "stride_br": ("i32", n),
               "BREAKDOWN": ("constexpr", BREAKDOWN), "KB": ("constexpr", triton.next_power_of_2(self.m + 2)),
               "BN": ("constexpr", cfg["BS"])}
        k = compile_triton(_lanczos_step_kernel, sig, {"num_warps": cfg["num_warps"]})
        t = _cdiv(n, cfg["BS"])
        trips = {"_lanczos_step_body#0": t, "_lanczos_step_body#1": t, "_cgs_sweep#0": t}
        # three sweeps over basis rows 0 .. j + 1; w read 3 times, written 2 times; the new basis row written
        dram = active * n * 8 * (3 * (j + 2) + 6)
        return Launch("lanczos-step", k, active, trips, dram, ("basis entry", active * 3 * (j + 2) * n))

    def ritz(self, k_steps: int, vectors: bool) -> Launch:
        import triton

        from ncutfast.kernels.ritz import PIVMIN, _ritz_top2_kernel

        rz = self.cfg["ritz"]
        kp = max(2, triton.next_power_of_2(k_steps))
        sig = {"alpha_ptr": ("*fp64", 0), "beta_ptr": ("*fp64", 0), "live_ptr": ("*i8", 0), "tri_ptr": ("*fp64", 0),
               "vec_ptr": ("*fp64", 0), "out_ptr": ("*fp64", 0), "M": ("i32", self.m), "k": ("i32", k_steps),
               "KP": ("constexpr", kp), "S": ("constexpr", rz["S"]), "ROUNDS": ("constexpr", rz["ROUNDS"]),
               "PARK": ("constexpr", PARK), "PIVMIN": ("constexpr", PIVMIN), "STORE": ("constexpr", vectors)}
        k = compile_triton(_ritz_top2_kernel, sig, {"num_warps": rz["num_warps"]})
        trips = {"_ritz_core#0": rz["ROUNDS"], "_sturm_count#0": k_steps, "_pivots#0": k_steps,
                 "_pivots#1": k_steps, "_ritz_core#1": k_steps, "_ritz_core#2": k_steps}
        return Launch("ritz-top2" + ("-vectors" if vectors else ""), k, self.b, trips,
                      self.b * k_steps * 8 * (3 + 6), ("problem", self.b))

    def residual_matvec(self, kind: int | None = None) -> list[Launch]:
        """The final residual's mat-vec (``BitmaskOperator``, K = 1) with launch setting matvec.int8 = ``kind``
        (default: the library's GPU setting); kind 1 is modeled by the fused step's (stepped) specialization."""
        from ncutfast.kernels.matvec import _bitmask_matvec_kernel

        kind = self.cfg["matvec"]["int8"] if kind is None else kind
        if kind == 1:
            return self.int8_matvec(self.b)
        if kind == 2:
            return self.dp4a_matvec(self.b, stepped=False)
        if kind == 3:
            return self.table_matvec(self.b, stepped=False)

        cfg, n, b = self.cfg["matvec"], self.n, self.b
        sig = {"mask_ptr": ("*i32", 0), "s_ptr": ("*fp64", 0), "len_ptr": ("*i32", 0), "eps_ptr": ("*fp64", 0),
               "idx_ptr": ("*i32", 0), "v_ptr": ("*fp64", 0), "y_ptr": ("*fp64", 0), "N_max": ("i32", n),
               "W": ("i32", self.words), "K": ("i32", 1), "stride_vb": ("i32", n), "stride_vn": ("i32", 1),
               "stride_vk": ("i32", 1), "stride_yb": ("i32", n), "stride_yn": ("i32", 1), "stride_yk": ("i32", 1),
               "BM": ("constexpr", cfg["BM"]), "BN": ("constexpr", cfg["BN"]), "KP": ("constexpr", 1)}
        k = compile_triton(_bitmask_matvec_kernel, sig, {"num_warps": cfg["num_warps"]})
        return [Launch("residual-matvec", k, _cdiv(n, cfg["BM"]) * b, {"_matvec_rows#0": _cdiv(n, cfg["BN"])},
                       b * (n * self.words * 4 + 3 * n * 8), ("mask bit", b * n * n))]

    # -- the mat-vecs of launch setting matvec.int8 = 1, 2, 3; the persistent kernel (lanczos.solve) ----------
    def int8_matvec(self, active: int) -> list[Launch]:
        from ncutfast.kernels.matvec import _bitmask_matvec_i8_kernel, _digits_kernel

        i8, n = self.cfg["matvec_int8"], self.n
        flags = {"step_ptr": ("*i32", 0), "done_ptr": ("*i8", 0), "stalled_ptr": ("*i8", 0)}
        sig = {"s_ptr": ("*fp64", 0), "len_ptr": ("*i32", 0), "idx_ptr": ("*i32", 0), "v_ptr": ("*fp64", 0),
               "dig_ptr": ("*i8", 0), "scale_ptr": ("*fp64", 0), "tot_ptr": ("*fp64", 0), **flags,
               "N_max": ("i32", n), "NP": ("i32", n), "K": ("i32", 1), "stride_vb": ("i32", (self.m + 2) * n),
               "stride_vn": ("i32", 1), "stride_vk": ("i32", 0), "stride_vr": ("i32", n), "BR": ("constexpr", i8["BR"]),
               "KP": ("constexpr", 2), "STEPPED": ("constexpr", True), "LANES": ("constexpr", False)}
        kd = compile_triton(_digits_kernel, sig, {"num_warps": 4})
        t = _cdiv(n, i8["BR"])
        digits = Launch("int8-digits", kd, active, {"_digits_kernel#0": t, "_digits_kernel#1": t},
                        active * n * (8 * 3 + 16), ("vector entry", active * n))
        sig = {"mask_ptr": ("*i32", 0), "s_ptr": ("*fp64", 0), "len_ptr": ("*i32", 0), "eps_ptr": ("*fp64", 0),
               "idx_ptr": ("*i32", 0), "dig_ptr": ("*i8", 0), "scale_ptr": ("*fp64", 0), "tot_ptr": ("*fp64", 0),
               "y_ptr": ("*fp64", 0), **flags, "N_max": ("i32", n), "W": ("i32", self.words), "K": ("i32", 1),
               "stride_yb": ("i32", n), "stride_yn": ("i32", 1), "stride_yk": ("i32", 1),
               "BM": ("constexpr", i8["BM"]), "BN": ("constexpr", i8["BN"]), "KP": ("constexpr", 2),
               "STEPPED": ("constexpr", True)}
        km = compile_triton(_bitmask_matvec_i8_kernel, sig, {"num_warps": i8["num_warps"]})
        mv = Launch("int8-matvec", km, _cdiv(n, i8["BM"]) * active, {"_bitmask_matvec_i8_kernel#0": _cdiv(n, i8["BN"])},
                    active * (n * self.words * 4 + n * 16 + 2 * n * 8), ("mask bit", active * n * n))
        return [digits, mv]

    def dp4a_matvec(self, active: int, stepped: bool = True) -> list[Launch]:
        """The byte-lane dp4a mat-vec (launch setting matvec.int8 = 2): digits, then mat-vec; ``stepped``: a
        fused step's launches, else ``BitmaskOperator``'s (no step/done/stalled flags)."""
        from ncutfast.kernels.matvec import _bitmask_matvec_dp4a_kernel, _digits_kernel

        dp, n, w = self.cfg["matvec_dp4a"], self.n, self.words
        names = ("step_ptr", "done_ptr", "stalled_ptr")
        flags = ({"step_ptr": ("*i32", 0), "done_ptr": ("*i8", 0), "stalled_ptr": ("*i8", 0)} if stepped
                 else dict.fromkeys(names, ("constexpr", None)))
        sig = {"s_ptr": ("*fp64", 0), "len_ptr": ("*i32", 0), "idx_ptr": ("*i32", 0), "v_ptr": ("*fp64", 0),
               "dig_ptr": ("*i8", 0), "scale_ptr": ("*fp64", 0), "tot_ptr": ("*fp64", 0), **flags,
               "N_max": ("i32", n), "NP": ("i32", 32 * w), "K": ("i32", 1), "stride_vb": ("i32", (self.m + 2) * n),
               "stride_vn": ("i32", 1), "stride_vk": ("i32", 0), "stride_vr": ("i32", n), "BR": ("constexpr", dp["BR"]),
               "KP": ("constexpr", 1), "STEPPED": ("constexpr", stepped), "LANES": ("constexpr", True)}
        kd = compile_triton(_digits_kernel, sig, {"num_warps": 4})
        tag = "" if stepped else "residual-"
        digits = Launch(f"{tag}dp4a-digits", kd, active, {"_digits_kernel#0": _cdiv(n, dp["BR"]),
                                                    "_digits_kernel#1": _cdiv(32 * w, dp["BR"])},
                        active * (n * 8 * 3 + 32 * w * 8), ("vector entry", active * n))
        sig = {"mask_ptr": ("*i32", 0), "s_ptr": ("*fp64", 0), "len_ptr": ("*i32", 0), "eps_ptr": ("*fp64", 0),
               "idx_ptr": ("*i32", 0), "dig_ptr": ("*i32", 0), "scale_ptr": ("*fp64", 0), "tot_ptr": ("*fp64", 0),
               "y_ptr": ("*fp64", 0), **flags, "N_max": ("i32", n), "W": ("i32", w), "stride_yb": ("i32", n),
               "stride_yn": ("i32", 1), "BM": ("constexpr", dp["BM"]), "BW": ("constexpr", dp["BW"]),
               "STEPPED": ("constexpr", stepped), "ASM": ("constexpr", True)}
        km = compile_triton(_bitmask_matvec_dp4a_kernel, sig, {"num_warps": dp["num_warps"]})
        # every program reads its rows' mask words once and the problem's digits (8 bytes per column, L2)
        mv = Launch(f"{tag}dp4a-matvec", km, _cdiv(n, dp["BM"]) * active,
                    {"_bitmask_matvec_dp4a_kernel#0": _cdiv(_cdiv(n, 32), dp["BW"])},
                    active * (n * w * 4 + 32 * w * 8 + 2 * n * 8), ("mask bit", active * n * n))
        return [digits, mv]

    def table_matvec(self, active: int, stepped: bool = True) -> list[Launch]:
        """The nibble-table mat-vec (launch setting matvec.int8 = 3): subset-sum table, then mat-vec;
        ``stepped`` as in ``dp4a_matvec``."""
        from ncutfast.kernels.matvec import _bitmask_matvec_table_kernel, _nibble_table_kernel

        tb, n, w = self.cfg["matvec_table"], self.n, self.words
        names = ("step_ptr", "done_ptr", "stalled_ptr")
        flags = ({"step_ptr": ("*i32", 0), "done_ptr": ("*i8", 0), "stalled_ptr": ("*i8", 0)} if stepped
                 else dict.fromkeys(names, ("constexpr", None)))
        sig = {"s_ptr": ("*fp64", 0), "len_ptr": ("*i32", 0), "idx_ptr": ("*i32", 0), "v_ptr": ("*fp64", 0),
               "tab_ptr": ("*fp64", 0), "tot_ptr": ("*fp64", 0), **flags, "N_max": ("i32", n), "W": ("i32", w),
               "stride_vb": ("i32", (self.m + 2) * n if stepped else n), "stride_vn": ("i32", 1),
               "stride_vr": ("i32", n if stepped else 0), "BG": ("constexpr", tb["BG"]),
               "STEPPED": ("constexpr", stepped)}
        kt = compile_triton(_nibble_table_kernel, sig, {"num_warps": 4})
        tag = "" if stepped else "residual-"
        table = Launch(f"{tag}table-sums", kt, active, {"_nibble_table_kernel#0": _cdiv(8 * w, tb["BG"])},
                       active * (2 * n * 8 + 128 * w * 8), ("vector entry", active * n))
        sig = {"mask_ptr": ("*i32", 0), "s_ptr": ("*fp64", 0), "len_ptr": ("*i32", 0), "eps_ptr": ("*fp64", 0),
               "idx_ptr": ("*i32", 0), "tab_ptr": ("*fp64", 0), "tot_ptr": ("*fp64", 0), "y_ptr": ("*fp64", 0),
               **flags, "N_max": ("i32", n), "W": ("i32", w), "stride_yb": ("i32", n), "stride_yn": ("i32", 1),
               "BM": ("constexpr", tb["BM"]), "BW": ("constexpr", tb["BW"]), "STEPPED": ("constexpr", stepped)}
        km = compile_triton(_bitmask_matvec_table_kernel, sig, {"num_warps": tb["num_warps"]})
        # DRAM: the mask once, the table once (its re-reads by the row blocks of a problem hit L2), s and y
        mv = Launch(f"{tag}table-matvec", km, _cdiv(n, tb["BM"]) * active,
                    {"_bitmask_matvec_table_kernel#0": _cdiv(_cdiv(n, 32), tb["BW"])},
                    active * (n * w * 4 + 128 * w * 8 + 2 * n * 8), ("mask bit", active * n * n))
        return [table, mv]

    def step_matvec(self, active: int, kind: int | None = None) -> list[Launch]:
        """The mat-vec launches of a fused step with launch setting matvec.int8 = ``kind`` (default: the
        library's GPU setting): 0 fp64, 1 int8 tensor cores, 2 byte-lane dp4a."""
        kind = self.cfg["matvec"]["int8"] if kind is None else kind
        return {0: lambda: [self.lanczos_matvec(active)], 1: lambda: self.int8_matvec(active),
                2: lambda: self.dp4a_matvec(active), 3: lambda: self.table_matvec(active)}[kind]()

    def persistent(self, steps: list[int]) -> Launch:
        """The first cycle as one self-checking launch (check interval 6): every program runs the m steps of
        the chunk, doing work in the steps before its problem converged (the busiest SM holds the slowest
        problem: trips at the sample's largest step count, the rest of the steps cost their loop control
        only, which is not counted)."""
        import triton

        from ncutfast.kernels.lanczos import _lanczos_persistent_kernel
        from ncutfast.kernels.ritz import PIVMIN

        cfg, rz, n = self.cfg["lanczos"], self.cfg["ritz"], self.n
        kr = max(2, triton.next_power_of_2(self.m))
        sig = {"mask_ptr": ("*i32", 0), "s_ptr": ("*fp64", 0), "len_ptr": ("*i32", 0), "eps_ptr": ("*fp64", 0),
               "idx_ptr": ("*i32", 0), **self._state_sig(), "tri_ptr": ("*fp64", 0), "tol_ptr": ("*fp64", 0),
               "N_max": ("i32", n), "W": ("i32", self.words), "M": ("i32", self.m),
               "stride_bb": ("i32", (self.m + 2) * n), "stride_br": ("i32", n), "n_steps": ("i32", self.m),
               "BREAKDOWN": ("constexpr", BREAKDOWN), "KB": ("constexpr", triton.next_power_of_2(self.m + 2)),
               "BM": ("constexpr", cfg["BM"]), "BN": ("constexpr", cfg["BN"]), "BS": ("constexpr", cfg["BS"]),
               "CHECK": ("constexpr", CHECK_EVERY_GPU), "KR": ("constexpr", kr), "S": ("constexpr", rz["S"]),
               "ROUNDS": ("constexpr", rz["ROUNDS"]), "PARK": ("constexpr", PARK), "PIVMIN": ("constexpr", PIVMIN)}
        k = compile_triton(_lanczos_persistent_kernel, sig, {"num_warps": cfg["num_warps"]})
        g = max(steps)
        t = _cdiv(n, cfg["BS"])
        k_mean = (g + CHECK_EVERY_GPU) / 2  # mean k of the checks at 6, 12, .., g
        per_check = 1 / CHECK_EVERY_GPU  # the checks' loops run once every CHECK steps of the outer loop
        trips = {"_lanczos_persistent_kernel#0": g, "_lanczos_persistent_kernel#1": _cdiv(n, cfg["BM"]),
                 "_matvec_rows#0": _cdiv(n, cfg["BN"]), "_lanczos_step_body#0": t, "_lanczos_step_body#1": t,
                 "_cgs_sweep#0": t, "_ritz_core#0": rz["ROUNDS"] * per_check, "_sturm_count#0": k_mean,
                 "_pivots#0": k_mean * per_check, "_pivots#1": k_mean * per_check,
                 "_ritz_core#1": k_mean * per_check, "_ritz_core#2": k_mean * per_check}
        mean = sum(steps) / len(steps)
        dram = self.b * mean * (n * self.words * 4 + 3 * n * 8 + n * 8 * (3 * (mean / 2 + 2) + 6))
        return Launch("lanczos-persistent", k, self.b, trips, dram, ("step", self.b * mean))


# ---------------------------------------------------------------------------------------------------------
# Whole solve
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Solve:
    """Predicted lower-bound seconds of one batched solve by phase, and the launches it counts."""

    phases: dict[str, float]
    launches: int

    @property
    def seconds(self) -> float:
        return sum(self.phases.values())


#: Solver modes of ``solve_time`` beside "steps" (the library's GPU launch settings) that fix the mat-vec of
#: the fused steps and the residual (launch setting matvec.int8): "fp64" (0, the default before the nibble
#: table), "int8" (1), "dp4a" (2), "table" (3).
SOLVER_MATVEC = {"fp64": 0, "int8": 1, "dp4a": 2, "table": 3}


def solve_time(w: Workload, precision: str, gpu: str, steps: list[int], solver: str = "steps") -> Solve:
    """Lower bound of a whole solve of the batch: normalize + affinity + Lanczos (mode ``solver``: "steps" =
    the default launches per step (two, three with a prepared mat-vec), "fp64" / "int8" / "dp4a" / "table" =
    with that mat-vec (``SOLVER_MATVEC``), "persistent" = one launch for the first cycle) + the convergence checks (one
    Ritz launch every 6 steps, the last with the vector) + the final residual mat-vec. Launch overheads and
    host synchronizations are not counted."""
    bw = RATES[gpu]["dram_bps"]
    if precision == "exact":
        ph = {"normalize": w.normalize_exact().bound(gpu).seconds}
    elif precision == "float32":  # fp32 rows and their fp16 copy
        ph = {"normalize": w.normalize("float32", half=True).bound(gpu).seconds}
    else:
        base, _, variant = precision.partition("-")
        ph = {"normalize": w.normalize(base).bound(gpu).seconds,
              "affinity": w.affinity(base, tf32x3=variant == "tf32x3").bound(gpu).seconds}
    if precision in ("exact", "float32"):  # + the candidate bitmask's zeroing and its scan (torch ops)
        ph["affinity"] = w.screen(precision).bound(gpu).seconds + 2 * w.b * w.n * w.words * 4 / bw
        ph["recheck"] = w.recheck(precision).bound(gpu).seconds
    active = active_per_step(steps, w.b)
    launches = 2
    if solver == "persistent":
        ph["lanczos"] = w.persistent(steps).bound(gpu).seconds
        launches += 1
    else:
        mv = step = 0.0
        kind = SOLVER_MATVEC.get(solver)
        for j, a in enumerate(active):
            mvs = w.step_matvec(a, kind)
            mv += sum(ln.bound(gpu).seconds for ln in mvs)
            launches += len(mvs)
            step += w.lanczos_step(a, j).bound(gpu).seconds
            launches += 1
        ph["mat-vec"], ph["step"] = mv, step
        checks = list(range(CHECK_EVERY_GPU, len(active) + 1, CHECK_EVERY_GPU))
        ph["checks"] = sum(w.ritz(k, False).bound(gpu).seconds for k in checks[:-1])
        ph["checks"] += w.ritz(len(active), True).bound(gpu).seconds
        launches += len(checks)
    ph["residual"] = sum(ln.bound(gpu).seconds for ln in w.residual_matvec(SOLVER_MATVEC.get(solver)))
    return Solve(ph, launches + 1)


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
def launch_row(workload: str, gpu: str, ln: Launch) -> dict[str, object]:
    """One CSV row: counts per warp of one program (by class), totals per unit of work, bounds in us."""
    c, k = ln.counts(), ln.kernel
    b = ln.bound(gpu)
    total_threads = ln.programs * k.warps * 32
    row: dict[str, object] = {
        "workload": workload, "gpu": gpu, "launch": ln.label, "programs": ln.programs, "warps": k.warps,
        "regs": k.regs, "smem_kb": round(k.smem / 1024, 1), "occupancy": occupancy(k.regs, k.smem, k.warps),
        "warp_insts": round(c.total)}
    row.update({cls: round(c.by_class.get(cls, 0.0)) for cls in CLASSES})
    row["tensor_gflop"] = round(sum(c.tensor.values()) * ln.programs * k.warps / 1e9, 3)
    row["unit"] = ln.unit[0]
    row["thread_insts_per_unit"] = round(c.total * total_threads / ln.unit[1], 2) if ln.unit[1] else 0
    for cls in CLASSES:
        row[f"{cls}_per_unit"] = round(c.by_class.get(cls, 0.0) * total_threads / ln.unit[1], 3) if ln.unit[1] else 0
    row["dram_mb"] = round(ln.dram_bytes / 1e6, 2)
    row["requested_mb"] = round(c.global_bytes * ln.programs * k.warps / 1e6, 2)
    row["bound_us"] = round(b.seconds * 1e6, 2)
    row["binds"] = b.binds
    for name in ("issue", "fma", "alu", "fp64", "xu", "lsu", "tensor", "dram", "warp-serial"):
        row[name.replace("-", "_") + "_us"] = round(b.parts.get(name, 0.0) * 1e6, 2)
    return row


# Innermost loops of the CUDA extension worth a per-unit count (loop name = innermost source line of its
# back-edge): what one iteration of each does, per thread.
CUDA_HOT_LOOPS = {"graph.h:58": "set bit of a mask word (word_dot)", "solve_cuda.cu:78": "mask word of a row",
                  "solve_cuda.cu:47": "unrolled iteration of a dot (reorthogonalization)",
                  "graph_cuda.cu:24": "mask word packed from similarities"}


def static_rows(k: Kernel) -> list[dict[str, object]]:
    """A CUDA-extension kernel without a launch model (its whole Lanczos solve runs in one program per
    problem, through ~100 loops): one row of static counts (each instruction once), then one row per hot
    loop (``CUDA_HOT_LOOPS``; the first copy of it in the SASS): its own body per iteration, by class."""
    c = count(k.instrs, k.loops, {lp.name: 1 for lp in k.loops})
    m = re.search(r"\d+([a-z][a-z_]*_kernel)(I([df])E)?", k.name)
    short = (m.group(1) + {"d": "<double>", "f": "<float>", None: ""}[m.group(3)]) if m else k.name
    rows = [{"kernel": short, "part": f"whole kernel, static ({len(k.loops)} loops)", "regs": k.regs,
             "smem_kb": round(k.smem / 1024, 1), "instructions": round(c.total),
             **{cls: round(c.by_class.get(cls, 0.0)) for cls in CLASSES}}]
    seen = set()
    for i, lp in enumerate(k.loops):
        if lp.name not in CUDA_HOT_LOOPS or lp.name in seen:
            continue
        seen.add(lp.name)
        inner = [j for j, o in enumerate(k.loops) if o.parent == i]
        body = [ins for ins in k.instrs if lp.start <= ins.addr <= lp.end
                and not any(k.loops[j].start <= ins.addr <= k.loops[j].end for j in inner)]
        cls = Counter(classify(ins.opcode)[0] for ins in body)
        rows.append({"kernel": short, "part": f"loop {lp.name}: per {CUDA_HOT_LOOPS[lp.name]}", "regs": "",
                     "smem_kb": "", "instructions": len(body), **{c_: cls.get(c_, 0) for c_ in CLASSES}})
    return rows


def _table(rows: list[dict[str, object]], cols: list[str]) -> list[str]:
    head = "| " + " | ".join(cols) + " |"
    sep = "| " + " | ".join("---" for _ in cols) + " |"
    return [head, sep] + ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]


SHOWN = ["launch", "programs", "regs", "smem_kb", "occupancy", "warp_insts", "fp64", "fp32", "tensor", "int",
         "ldst", "barrier", "conv", "unit", "thread_insts_per_unit", "dram_mb", "bound_us", "binds"]


def model(workloads: list[tuple[int, int]], gpus: list[str], alternatives: bool) -> tuple[list, list, list[str]]:
    """(launch rows, solve rows, markdown lines) for the workloads on the GPUs."""
    rows, solves, md = [], [], []
    for n, c in workloads:
        w = Workload(n, c)
        steps = gpu_steps(ITERATIONS[(n, c)])
        active = active_per_step(steps, w.b)
        label = f"batch {w.b}, N={n}, C={c}"
        launches = [w.normalize("fast"), w.normalize("float32"), w.normalize("float32", half=True),
                    w.normalize_exact(), w.affinity("fast"),
                    w.screen("exact"), w.recheck("exact"), w.screen("float32"), w.recheck("float32"),
                    w.affinity("float32"),
                    *w.step_matvec(w.b), w.lanczos_step(w.b, len(active) // 2), w.ritz(len(active), False),
                    w.ritz(len(active), True), *w.residual_matvec()]
        if alternatives:
            others = [k for k in (0, 1, 2, 3) if k != w.cfg["matvec"]["int8"]]
            launches += [w.affinity("float32", tf32x3=True), *(ln for k in others for ln in w.step_matvec(w.b, k)),
                         w.persistent(steps)]
        for gpu in gpus:
            gpu_rows = [launch_row(label, gpu, ln) for ln in launches]
            rows += gpu_rows
            md += [f"### {gpu}, {label}: one launch each (step kernel at j = {len(active) // 2}, all problems "
                   "active)", "", *_table(gpu_rows, SHOWN), ""]
            modes = ["steps", "fp64"] + (["int8", "dp4a", "table", "persistent"] if alternatives else [])
            srows = []
            for solver in modes:
                variants = FLOAT32_VARIANTS if alternatives else FLOAT32_VARIANTS[:1]
                for precision in PRECISIONS + (variants if solver == "steps" else ()):
                    s = solve_time(w, precision, gpu, steps, solver)
                    srows.append({"workload": label, "gpu": gpu, "precision": precision, "solver": solver,
                                  "lanczos_steps": len(active), "launches": s.launches,
                                  **{f"{p}_ms": round(t * 1e3, 3) for p, t in s.phases.items()},
                                  "total_ms": round(s.seconds * 1e3, 3), "images_per_s": round(w.b / s.seconds)})
            solves += srows
            phases = list(dict.fromkeys(k for r in srows for k in r if k.endswith("_ms") and k != "total_ms"))
            cols = ["precision", "solver", "lanczos_steps", "launches", *phases, "total_ms", "images_per_s"]
            md += [f"### {gpu}, {label}: whole solve (lower bound; Lanczos steps per problem {steps}, the batch "
                   f"runs {len(active)})", "", *_table(srows, cols), "",
                   EXACT_NOTE, ""]
    return rows, solves, md


def _write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=fields)
        wr.writeheader()
        wr.writerows(rows)


def measure_iterations(scenes: int) -> None:
    """Print ``ITERATIONS``: Lanczos steps per problem of the torch backend on the CPU for planted scenes of
    both sizes (seeds 0 .. scenes - 1, precision float32, default tol and max_iter)."""
    import numpy as np

    import ncutfast
    from ncutfast import testing

    for n, c in ITERATIONS:
        feats = np.stack([testing.planted_scene(np.random.default_rng(s), n_tokens=n, channels=c).features
                          for s in range(scenes)])
        r = ncutfast.ncut(feats, backend="torch", precision="float32")
        print(f"    ({n}, {c}): {[int(v) for v in r.iterations]},", flush=True)


def _steps_for(n: int, c: int) -> list[int]:
    """GPU step counts of the planted scenes at (n, c), else at the measured size with the same n."""
    key = (n, c) if (n, c) in ITERATIONS else next((k for k in ITERATIONS if k[0] == n), None)
    if key is None:
        raise KeyError(f"n: no measured Lanczos step counts for N={n} (ITERATIONS has {sorted(ITERATIONS)})")
    return gpu_steps(ITERATIONS[key])


def predicted_for_bench(w: Workload, precision: str, kernel: str, gpu: str) -> tuple[float, str] | None:
    """(lower-bound seconds, binding resource) of a row of benchmarks/bench_triton.py, or None when the model
    has no counterpart (other precisions, the eigh baseline, CUDA graph / op-by-op solve modes)."""
    if precision not in ("fast", "float32"):
        return None
    step_at = 16  # bench_triton's _STEP_AT
    single = {"matvec": w.residual_matvec, "matvec-fp64": lambda: w.residual_matvec(0),
              "step-matvec": lambda: w.step_matvec(w.b), "step-matvec-fp64": lambda: w.step_matvec(w.b, 0),
              "step-matvec-int8": lambda: w.int8_matvec(w.b), "step-reorth": lambda: [w.lanczos_step(w.b, step_at)],
              "step": lambda: [*w.step_matvec(w.b), w.lanczos_step(w.b, step_at)],
              "affinity": lambda: ([w.normalize(precision, half=True), w.screen(precision), w.recheck(precision)]
                                   if precision == "float32" else [w.normalize(precision), w.affinity(precision)])}
    if kernel in single:
        bounds = [ln.bound(gpu) for ln in single[kernel]()]
        return sum(b.seconds for b in bounds), "+".join(b.binds for b in bounds)
    solver = {"ncut": "steps", "ncut-steps-fp64": "fp64", "ncut-steps-int8": "int8",
              "ncut-persistent": "persistent"}.get(kernel)
    if solver is None:
        return None
    return solve_time(w, precision, gpu, _steps_for(w.n, w.c), solver).seconds, "sum of launches"


def compare(bench_csv: Path, channels: int, batch: int) -> list[str]:
    """Markdown table: each row of a bench_triton.py CSV (measured on a GPU) beside the model's lower bound
    for the same launch on the datasheet rates of that card (H200 if its name says so, else H100 SXM)."""
    with bench_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        gpu = "H200" if "H200" in r.get("card", "") else "H100 SXM"
        w = Workload(int(r["N"]), channels, batch)
        pred = predicted_for_bench(w, r["precision"], r["kernel"], gpu)
        if pred is None:
            continue
        ms = float(r["ms"])
        out.append({"N": r["N"], "precision": r["precision"], "kernel": r["kernel"], "card": r.get("card", ""),
                    "measured_ms": r["ms"], "model": gpu, "predicted_ms": f"{pred[0] * 1e3:.3f}",
                    "measured/predicted": f"{ms / (pred[0] * 1e3):.2f}" if pred[0] > 0 else "",
                    "binds": pred[1]})
    if not out:
        return ["(no benchmark row has a model counterpart)"]
    return _table(out, list(out[0]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=3600 only, H100 SXM only, default path kernels")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                    help="folder for gpu_model.csv, gpu_model_solve.csv, gpu_model.md")
    ap.add_argument("--cuda-ext", action="store_true", help="also disassemble the CUDA extension (nvcc)")
    ap.add_argument("--measure-iterations", type=int, metavar="SCENES", nargs="?", const=24,
                    help="measure ITERATIONS on the CPU instead (default 24 scenes per size)")
    ap.add_argument("--compare", type=Path, metavar="CSV",
                    help="instead: put the rows of a benchmarks/bench_triton.py CSV beside the model's bounds")
    ap.add_argument("--channels", type=int, default=768, help="C of the --compare benchmark (its default)")
    ap.add_argument("--batch", type=int, default=BATCH, help="batch of the --compare benchmark (its default)")
    args = ap.parse_args(argv)
    if args.measure_iterations:
        measure_iterations(args.measure_iterations)
        return 0
    if os.environ.pop("TRITON_INTERPRET", None) not in (None, "", "0"):
        # @triton.jit chose the interpreter if ncutfast.kernels was imported already: compile needs a fresh one
        print("gpu_model: TRITON_INTERPRET is set; unset it (kernels must be compiled, not interpreted)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu_model-triton-") as cache:
        # A private Triton cache: a cached cubin's line info names the source path it was first compiled
        # from (another checkout, maybe gone or at other lines), and loops are named from those lines.
        os.environ["TRITON_CACHE_DIR"] = cache
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.compare:
        if not args.compare.is_file():
            print(f"gpu_model: --compare: no such file: {args.compare}", file=sys.stderr)
            return 2
        lines = compare(args.compare, args.channels, args.batch)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_model_compare.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    workloads = [(3600, 768)] if args.quick else [(3600, 768), (784, 384)]
    gpus = ["H100 SXM"] if args.quick else list(RATES)
    rows, solves, md = model(workloads, gpus, alternatives=not args.quick)
    if args.cuda_ext:
        ext = [r for k in compile_cuda_extension(Path(__file__).resolve().parent.parent) for r in static_rows(k)]
        md += ["### CUDA extension (csrc/cuda, sm_90a): static counts and the hot loops' bodies (thread "
               "instructions per iteration)", "", *_table(ext, list(ext[0]) if ext else ["kernel"]), ""]
    args.out.mkdir(parents=True, exist_ok=True)
    _write_csv(args.out / "gpu_model.csv", rows)
    _write_csv(args.out / "gpu_model_solve.csv", solves)
    (args.out / "gpu_model.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"(CSV and markdown in {args.out})")
    head = {s["precision"]: s["images_per_s"] for s in solves
            if s["gpu"] == "H100 SXM" and s["workload"].endswith("N=3600, C=768") and s["solver"] == "steps"}
    print("predicted images/s (H100 SXM, batch 256, N=3600, C=768): "
          + " ".join(f"{p}={head[p]}" for p in PRECISIONS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
