"""benchmarks/gpu_model.py: the SASS parser on tiny known Triton kernels, and the roofline arithmetic on
hand-made numbers.

The tiny kernels are compiled for sm_90a in a fresh subprocess (this file run as a script: Triton compiles
only kernels imported with TRITON_INTERPRET unset, and conftest sets it), which writes their SASS text;
the parsing and counting run in the test process.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_model():
    spec = importlib.util.spec_from_file_location("gpu_model", ROOT / "benchmarks" / "gpu_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


gm = _load_model()


# ------------------------------------------------------------------ tiny kernels (compiled in a subprocess)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _add_kernel(x_ptr, y_ptr, o_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        tl.store(o_ptr + i, tl.load(x_ptr + i, mask=ok) + tl.load(y_ptr + i, mask=ok), mask=ok)

    @triton.jit
    def _sum64_kernel(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros((BLOCK,), tl.float64)
        for c0 in range(0, n, BLOCK):
            i = c0 + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + i, mask=i < n, other=0.0).to(tl.float64)
        tl.store(o_ptr + tl.arange(0, BLOCK), acc)

    return [(_add_kernel, {"x_ptr": ("*fp32", 0), "y_ptr": ("*fp32", 0), "o_ptr": ("*fp32", 0), "n": ("i32", 1000),
                           "BLOCK": ("constexpr", 1024)}),
            (_sum64_kernel, {"x_ptr": ("*fp32", 0), "o_ptr": ("*fp64", 0), "n": ("i32", 1000),
                             "BLOCK": ("constexpr", 128)})]


def _compile_tiny() -> None:
    """Script mode: print one JSON line per tiny kernel with its SASS text and resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for fn, sig in _kernels():
        types, consts, attrs = gm.specialize(sig)
        k = triton.compile(ASTSource(fn=fn, signature=types, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        sass, usage = gm.disassemble(k.asm["cubin"])
        print(json.dumps({"name": fn.__name__, "sass": sass, "usage": usage.get(k.metadata.name)}), flush=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, dict]:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    out = {}
    for r in rows:
        u = r["usage"] or {"regs": 0, "smem": 0}
        out[r["name"]] = gm.kernel_from_sass(r["name"], r["sass"], u["regs"], u["smem"], 4)
    return out


def test_add_kernel_classes(tiny):
    k = tiny["_add_kernel"]
    assert k.loops == []
    c = gm.count(k.instrs, k.loops, {})
    # two loads, one store, the adds; no fp64, tensor-core or loop work; a straight line ending in EXIT
    assert c.by_class["ldst"] >= 3 and c.by_class["fp32"] >= 1
    assert c.by_class["fp64"] == 0 and c.by_class["tensor"] == 0
    assert k.instrs[-1].opcode == "EXIT"
    assert any(i.opcode.startswith("LDG") for i in k.instrs) and any(i.opcode.startswith("STG") for i in k.instrs)
    assert c.total == len(k.instrs)  # no loop: every instruction once
    assert 0 < k.regs <= 255


def test_sum_kernel_loop_detection(tiny):
    k = tiny["_sum64_kernel"]
    names = [lp.name for lp in k.loops]
    assert names and set(names) == {"_sum64_kernel#0"}  # the back-edge's line is the for statement's
    main = max(k.loops, key=lambda lp: lp.end - lp.start)
    body = [i for i in k.instrs if main.start <= i.addr <= main.end]
    ops = Counter(gm.classify(i.opcode)[0] for i in body)
    assert ops["fp64"] >= 1 and ops["conv"] >= 1 and ops["ldst"] >= 1  # DADD, F2F.F64.F32, LDG in the body
    assert body[-1].opcode == "BRA" and body[-1].pred  # the conditional back-edge closes the body
    # executed instructions grow linearly with the trip count, by the body size per trip
    c1 = gm.count(k.instrs, k.loops, {"_sum64_kernel#0": 10})
    c2 = gm.count(k.instrs, k.loops, {"_sum64_kernel#0": 30})
    per_trip = sum(lp.end - lp.start + 16 for lp in k.loops) // 16
    assert c2.total - c1.total == pytest.approx(20 * per_trip)
    assert c2.by_class["fp64"] - c1.by_class["fp64"] == pytest.approx(20 * sum(
        1 for lp in k.loops for i in k.instrs if lp.start <= i.addr <= lp.end and i.opcode.startswith("DADD")))
    with pytest.raises(KeyError, match="_sum64_kernel#0"):
        gm.count(k.instrs, k.loops, {})


# ------------------------------------------------------------------ parser and arithmetic on hand-made text
SASS = """
        .text._k:
	//## File "/nowhere/k.py", line 3
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_0:
	//## File "/nowhere/k.py", line 5
        /*0010*/                   LDG.E.64 R2, desc[UR4][R4.64] ;
.L_x_1:
        /*0020*/                   DFMA R6, R2, R2, R6 ;
        /*0030*/                   HGMMA.64x128x16.F32 R8, gdesc[UR4], R8 ;
	//## File "/nowhere/k.py", line 6
        /*0040*/              @!P0 BRA `(.L_x_1) ;
	//## File "/nowhere/k.py", line 4
        /*0050*/              @!P1 BRA `(.L_x_0) ;
        /*0060*/                   STG.E desc[UR4][R4.64], R6 ;
        /*0070*/                   EXIT ;
.L_x_2:
        /*0080*/                   BRA `(.L_x_2);
        /*0090*/                   NOP;
$__internal_0_$__cuda_sm20_div_rn_f64_full:
        /*00a0*/                   DFMA R6, R2, R2, R6 ;
        /*00b0*/                   RET.REL.NODEC R2 `(_k) ;
"""


def test_parse_hand_made_sass():
    instrs, labels = gm.parse_sass(SASS)
    assert [i.opcode for i in instrs][:3] == ["S2R", "LDG.E.64", "DFMA"]
    assert labels[".L_x_0"] == 0x10 and labels[".L_x_1"] == 0x20
    assert instrs[4].pred == "@!P0" and instrs[4].line == 6 and instrs[1].file == "/nowhere/k.py"
    hot = gm.hot_region(instrs, labels)
    assert hot[-1].opcode == "EXIT"  # padding and the called subroutine are cut
    loops = gm.find_loops(hot, labels)
    assert [(lp.start, lp.end, lp.parent) for lp in loops] == [(0x10, 0x50, None), (0x20, 0x40, 0)]
    for lp, name in zip(loops, ("outer", "inner"), strict=True):
        lp.name = name
    assert gm.weights(loops, {"outer": 3, "inner": 5}) == [3, 15]
    assert gm.weights(loops, {"outer": 3, "inner": 8}, unroll={"inner": 4}) == [3, 6]
    c = gm.count(hot, loops, {"outer": 3, "inner": 5})
    # S2R, STG, EXIT once; LDG and the outer BRA 3 times; DFMA, HGMMA, the inner BRA 15 times
    assert c.total == 3 + 2 * 3 + 3 * 15
    assert c.by_class["fp64"] == 15 and c.by_class["tensor"] == 15 and c.by_class["ldst"] == 3 + 1
    assert c.global_bytes == 3 * 32 * 8 + 32 * 4
    assert c.tensor["tc_fp16"] == 15 * 64 * 128 * 16 * 2 / 4  # a warpgroup instruction: a quarter per warp


def test_classify_and_widths():
    assert gm.classify("DFMA")[0] == "fp64" and gm.classify("FFMA") == ("fp32", "fp32")
    assert gm.classify("IMAD.WIDE.U32") == ("int", "imad") and gm.classify("LOP3.LUT") == ("int", "alu")
    assert gm.classify("F2F.F64.F32") == ("conv", "xu") and gm.classify("POPC") == ("int", "xu")
    assert gm.classify("BAR.SYNC.DEFER_BLOCKING")[0] == "barrier" and gm.classify("SHFL.BFLY")[0] == "ldst"
    assert gm.classify("IGMMA.64x64x32.S8.S8") == ("tensor", "tensor")
    assert gm.access_bytes("LDG.E.128") == 16 and gm.access_bytes("STG.E") == 4 and gm.access_bytes("LDS.64") == 0
    assert gm.access_bytes("LDG.E.U8") == 1
    assert gm.tensor_flops("IGMMA.64x64x32.S8.S8") == ("tc_int8", 2 * 64 * 64 * 32 / 4)
    assert gm.tensor_flops("HMMA.16816.F32")[1] == 0.0  # no MxNxK shape: not counted, rather than guessed
    assert gm.tensor_flops("DMMA.8x8x4") == ("tc_fp64", 2 * 8 * 8 * 4)


def test_occupancy_limits():
    assert gm.occupancy(64, 0, 4) == 8  # registers: 65536 / (64 * 32 * 4)
    assert gm.occupancy(32, 0, 4) == 16  # warps: 64 / 4
    assert gm.occupancy(216, 98304 + 1024, 8) == 1  # registers (216 -> 7168 per warp) and shared memory
    assert gm.occupancy(16, 0, 1) == 32  # blocks
    assert gm.occupancy(255, 0, 32) == 0  # does not fit at all


def _counts(**by_pipe) -> object:
    cls = {"fp64": "fp64", "fp32": "fp32", "alu": "int", "imad": "int", "xu": "conv", "lsu": "ldst"}
    return gm.Counts(Counter({cls[p]: v for p, v in by_pipe.items()}), Counter(by_pipe), Counter(), 0.0)


def test_roofline_arithmetic():
    r = gm.RATES["H100 SXM"]
    clk, sms = r["clock_hz"], r["sms"]
    # 2 programs per SM of 8 warps, 1000 fp64 instructions per warp: 2 * 8 * 1000 * 32 lanes / 64 per clock
    b = gm.roofline(_counts(fp64=1000), programs=2 * sms, warps=8, occ=4, dram_bytes=0.0, gpu="H100 SXM")
    assert b.binds == "fp64" and b.seconds == pytest.approx(2 * 8 * 1000 * 32 / 64 / clk)
    assert b.parts["issue"] == pytest.approx(2 * 8 * 1000 / 4 / clk)
    # one program more: the busiest SM has 3
    b3 = gm.roofline(_counts(fp64=1000), programs=2 * sms + 1, warps=8, occ=4, dram_bytes=0.0, gpu="H100 SXM")
    assert b3.seconds == pytest.approx(1.5 * b.seconds)
    # memory: 3.35 GB at 3.35 TB/s is 1 ms, whatever the instructions
    m = gm.roofline(_counts(fp32=10), programs=sms, warps=4, occ=8, dram_bytes=3.35e9, gpu="H100 SXM")
    assert m.binds == "dram" and m.seconds == pytest.approx(1e-3)
    h200 = gm.roofline(_counts(fp32=10), programs=sms, warps=4, occ=8, dram_bytes=3.35e9, gpu="H200")
    assert h200.seconds == pytest.approx(3.35 / 4.8 * 1e-3)
    # fma pipe: IMAD at 64 lanes, FP32 at 128 lanes, sharing the pipe
    f = gm.roofline(_counts(fp32=1000, imad=1000), programs=sms, warps=4, occ=8, dram_bytes=0, gpu="H100 SXM")
    assert f.parts["fma"] == pytest.approx(max(1000 * 4 * 32 / 64, 2000 * 4 * 32 / 128) / clk)
    # issue: 4 warp instructions per clock per SM, 16 warps -> 4000 cycles for 1000 instructions each
    i = gm.roofline(_counts(alu=200, fp32=800), programs=sms, warps=16, occ=4, dram_bytes=0, gpu="H100 SXM")
    assert i.binds == "issue" and i.seconds == pytest.approx(16 * 1000 / 4 / clk)
    # warp-serial: one program per SM of one warp, 1000 instructions: 1000 clocks
    s = gm.roofline(_counts(alu=1000), programs=sms, warps=1, occ=32, dram_bytes=0, gpu="H100 SXM")
    assert s.binds == "warp-serial" and s.seconds == pytest.approx(1000 / clk)
    # tensor cores: the FLOPs of one SM at the datasheet rate per SM
    t = gm.Counts(Counter({"tensor": 1}), Counter({"tensor": 1}), Counter({"tc_fp16": 1e9}), 0.0)
    tb = gm.roofline(t, programs=sms, warps=4, occ=1, dram_bytes=0, gpu="H100 SXM")
    assert tb.binds == "tensor" and tb.seconds == pytest.approx(4e9 / (r["tc_fp16"] / sms))


def test_step_counts():
    assert gm.gpu_steps([1, 6, 7, 12, 50]) == [6, 6, 12, 12, 54]  # multiples of 6 within each 48-step cycle
    assert gm.active_per_step([6, 12], 256) == [256] * 6 + [128] * 6
    assert math.isclose(sum(gm.active_per_step([6, 12, 18], 3)), 6 + 12 + 18)


def test_specialize_like_the_jit():
    types, consts, attrs = gm.specialize({"p": ("*fp64", 0), "n": ("i32", 3600), "w": ("i32", 114),
                                          "one": ("i32", 1), "B": ("constexpr", 32)})
    assert types == {"p": "*fp64", "n": "i32", "w": "i32", "one": "constexpr", "B": "constexpr"}
    assert consts == {"one": 1, "B": 32}
    assert sorted(attrs) == [(0,), (1,)]  # the pointer and 3600 (divisible by 16), not 114


if __name__ == "__main__":
    _compile_tiny()
