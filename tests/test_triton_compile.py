"""Compile every Triton kernel for sm_90 without launching it (no GPU needed).

Catches code the interpreter accepts but the compiler does not (layouts, dtypes, unsupported ops). The
kernels must be imported with TRITON_INTERPRET unset (under the interpreter ``@triton.jit`` yields
interpreted functions that cannot be compiled), so the compilation runs in a fresh subprocess: this file
run as a script compiles everything at the GPU launch settings and prints one JSON line per kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _variants() -> list[tuple[str, object, dict, dict, dict]]:
    """(label, kernel, signature, constexprs, options) for every specialization the library launches."""
    import triton.language as tl

    from ncutfast.kernels import _utils
    from ncutfast.kernels.affinity import (
        _PRECISIONS,
        _affinity_exact_kernel,
        _affinity_kernel,
        _exact_normalize_kernel,
        _normalize_kernel,
        _recheck_kernel,
    )
    from ncutfast.kernels.lanczos import _lanczos_matvec_kernel, _lanczos_persistent_kernel, _lanczos_step_kernel
    from ncutfast.kernels.matvec import (
        _bitmask_matvec_dp4a_kernel,
        _bitmask_matvec_i8_kernel,
        _bitmask_matvec_kernel,
        _bitmask_matvec_table_kernel,
        _digits_kernel,
        _nibble_table_kernel,
    )
    from ncutfast.kernels.ritz import _ritz_top2_kernel

    tl_name = {"torch.float16": "fp16", "torch.float32": "fp32", "torch.float64": "fp64"}
    out = []
    norm = _utils.block_sizes("normalize")
    acc_of = {"fp16": tl.float32, "fp32": tl.float32, "fp64": tl.float64}
    for src, dst, half in (("fp32", "fp32", False), ("fp16", "fp32", False), ("bf16", "fp16", False),
                           ("fp64", "fp64", False), ("fp64", "fp32", False), ("fp32", "fp32", True)):
        sig = {"x_ptr": f"*{src}", "out_ptr": f"*{dst}", "half_ptr": "*fp16" if half else f"*{dst}", "len_ptr": "*i32",
               "N_max": "i32", "C": "i32", "stride_xb": "i32", "stride_xn": "i32", "stride_xc": "i32",
               "BR": "constexpr", "BC": "constexpr", "ACC": "constexpr", "WIDE": "constexpr", "HALF": "constexpr"}
        wide = tl.float64 if src == "fp64" else acc_of[dst]  # normalize_fwd's rule
        consts = {"BR": norm["BR"], "BC": norm["BC"], "ACC": acc_of[dst], "WIDE": wide, "HALF": half}
        options = {"num_warps": norm["num_warps"]}
        out.append((f"normalize-{src}-{dst}" + ("-half" if half else ""), _normalize_kernel, sig, consts, options))
    for precision, (dtype, dot_precision) in _PRECISIONS.items():
        cfg = _utils.block_sizes("affinity_fast" if precision == "fast" else "affinity")
        sig = {"f_ptr": f"*{tl_name[str(dtype)]}", "pairs_ptr": "*i32", "len_ptr": "*i32", "tau_ptr": "*fp64",
               "mask_ptr": "*i32", "count_ptr": "*i32", "N_max": "i32", "C": "i32", "W": "i32",
               "BT": "constexpr", "BK": "constexpr", "ACC": "constexpr", "DOT_PRECISION": "constexpr"}
        acc = tl.float64 if precision == "float64" else tl.float32
        options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        dots = [(precision, dot_precision)] + ([("float32-tf32x3", "tf32x3")] if precision == "float32" else [])
        for label, dot in dots:
            consts = {"BT": cfg["BT"], "BK": cfg["BK"], "ACC": acc, "DOT_PRECISION": dot}
            out.append((f"affinity-{label}", _affinity_kernel, sig, consts, options))
    fast = _utils.block_sizes("affinity_fast")  # precision "exact": fp16 screen + candidate list
    sig = {"f_ptr": "*fp16", "pairs_ptr": "*i32", "len_ptr": "*i32", "thr_ptr": "*fp32", "mask_ptr": "*i32",
           "count_ptr": "*i32", "cand_ptr": "*i32", "N_max": "i32", "C": "i32", "W": "i32",
           "BT": "constexpr", "BK": "constexpr"}
    out.append(("affinity-exact", _affinity_exact_kernel, sig, {"BT": fast["BT"], "BK": fast["BK"]},
                {"num_warps": fast["num_warps"], "num_stages": fast["num_stages"]}))
    ne = _utils.block_sizes("normalize_exact")  # sum of squares unrolled per C: the benchmark's C
    for src in ("fp32", "fp64"):
        sig = {"x_ptr": f"*{src}", "f_ptr": "*fp64", "h_ptr": "*fp16", "len_ptr": "*i32", "N_max": "i32",
               "stride_xb": "i32", "stride_xn": "i32", "stride_xc": "i32",
               "C": "constexpr", "BR": "constexpr", "BC": "constexpr"}
        out.append((f"normalize-exact-{src}", _exact_normalize_kernel, sig,
                    {"C": 768, "BR": ne["BR"], "BC": ne["BC"]}, {"num_warps": ne["num_warps"]}))
    rc = _utils.block_sizes("recheck")  # the screen's candidates: float64 ("exact") or fixed-order float32
    for label, rows, exact in (("recheck-exact", "*fp64", True), ("recheck-float32", "*fp32", False)):
        sig = {"rows_ptr": rows, "cand_ptr": "*i64", "thr_ptr": "*fp64", "mask_ptr": "*i32", "count_ptr": "*i32",
               "undecided_ptr": "*i8", "N_max": "i32", "C": "i32", "W": "i32", "total": "i32",
               "BLOCK": "constexpr", "BC": "constexpr", "EXACT": "constexpr"}
        out.append((label, _recheck_kernel, sig, {"BLOCK": rc["BLOCK"], "BC": rc["BC"], "EXACT": exact},
                    {"num_warps": rc["num_warps"], "enable_fp_fusion": False}))
    mv = _utils.block_sizes("matvec")
    for kp in (1, 4):
        sig = {"mask_ptr": "*i32", "s_ptr": "*fp64", "len_ptr": "*i32", "eps_ptr": "*fp64", "idx_ptr": "*i32",
               "v_ptr": "*fp64", "y_ptr": "*fp64", "N_max": "i32", "W": "i32", "K": "i32",
               "stride_vb": "i32", "stride_vn": "i32", "stride_vk": "i32",
               "stride_yb": "i32", "stride_yn": "i32", "stride_yk": "i32",
               "BM": "constexpr", "BN": "constexpr", "KP": "constexpr"}
        consts = {"BM": mv["BM"], "BN": max(32, mv["BN"] // kp), "KP": kp}
        out.append((f"matvec-k{kp}", _bitmask_matvec_kernel, sig, consts, {"num_warps": mv["num_warps"]}))
    i8 = _utils.block_sizes("matvec_int8")
    dp = _utils.block_sizes("matvec_dp4a")
    flag_names = ("step_ptr", "done_ptr", "stalled_ptr")
    flags = dict.fromkeys(flag_names, "*i32") | {"done_ptr": "*i8", "stalled_ptr": "*i8"}
    for kp, stepped, lanes in ((2, False, False), (4, False, False), (2, True, False), (1, False, True),
                               (1, True, True)):
        # stepped: FusedSteps' mat-vecs (K = 1); unstepped launches pass None for the step/done/stalled flags
        tag = f"k{kp}" + ("-stepped" if stepped else "")
        fl = flags if stepped else dict.fromkeys(flag_names, "constexpr")
        none = {} if stepped else dict.fromkeys(flag_names)
        sig = {"s_ptr": "*fp64", "len_ptr": "*i32", "idx_ptr": "*i32", "v_ptr": "*fp64", "dig_ptr": "*i8",
               "scale_ptr": "*fp64", "tot_ptr": "*fp64", **fl, "N_max": "i32", "NP": "i32", "K": "i32",
               "stride_vb": "i32", "stride_vn": "i32", "stride_vk": "i32", "stride_vr": "i32",
               "BR": "constexpr", "KP": "constexpr", "STEPPED": "constexpr", "LANES": "constexpr"}
        consts = {**none, "BR": (dp if lanes else i8)["BR"], "KP": kp, "STEPPED": stepped, "LANES": lanes}
        out.append((f"digits-{'lanes-' if lanes else ''}{tag}", _digits_kernel, sig, consts, {"num_warps": 4}))
        common = {"mask_ptr": "*i32", "s_ptr": "*fp64", "len_ptr": "*i32", "eps_ptr": "*fp64", "idx_ptr": "*i32",
                  "dig_ptr": "*i32" if lanes else "*i8", "scale_ptr": "*fp64", "tot_ptr": "*fp64", "y_ptr": "*fp64",
                  **fl, "N_max": "i32", "W": "i32"}
        if lanes:
            sig = {**common, "stride_yb": "i32", "stride_yn": "i32", "BM": "constexpr", "BW": "constexpr",
                   "STEPPED": "constexpr", "ASM": "constexpr"}
            consts = {**none, "BM": dp["BM"], "BW": dp["BW"], "STEPPED": stepped, "ASM": True}
            out.append((f"matvec-dp4a-{tag}", _bitmask_matvec_dp4a_kernel, sig, consts,
                        {"num_warps": dp["num_warps"]}))
        else:
            sig = {**common, "K": "i32", "stride_yb": "i32", "stride_yn": "i32", "stride_yk": "i32",
                   "BM": "constexpr", "BN": "constexpr", "KP": "constexpr", "STEPPED": "constexpr"}
            consts = {**none, "BM": i8["BM"], "BN": i8["BN"], "KP": kp, "STEPPED": stepped}
            out.append((f"matvec-int8-{tag}", _bitmask_matvec_i8_kernel, sig, consts,
                        {"num_warps": i8["num_warps"]}))
    tb = _utils.block_sizes("matvec_table")
    for stepped in (False, True):
        tag = "k1" + ("-stepped" if stepped else "")
        fl = flags if stepped else dict.fromkeys(flag_names, "constexpr")
        none = {} if stepped else dict.fromkeys(flag_names)
        sig = {"s_ptr": "*fp64", "len_ptr": "*i32", "idx_ptr": "*i32", "v_ptr": "*fp64", "tab_ptr": "*fp64",
               "tot_ptr": "*fp64", **fl, "N_max": "i32", "W": "i32", "stride_vb": "i32", "stride_vn": "i32",
               "stride_vr": "i32", "BG": "constexpr", "STEPPED": "constexpr"}
        out.append((f"table-sums-{tag}", _nibble_table_kernel, sig, {**none, "BG": tb["BG"], "STEPPED": stepped},
                    {"num_warps": 4}))
        sig = {"mask_ptr": "*i32", "s_ptr": "*fp64", "len_ptr": "*i32", "eps_ptr": "*fp64", "idx_ptr": "*i32",
               "tab_ptr": "*fp64", "tot_ptr": "*fp64", "y_ptr": "*fp64", **fl, "N_max": "i32", "W": "i32",
               "stride_yb": "i32", "stride_yn": "i32", "BM": "constexpr", "BW": "constexpr", "STEPPED": "constexpr"}
        consts = {**none, "BM": tb["BM"], "BW": tb["BW"], "STEPPED": stepped}
        out.append((f"matvec-table-{tag}", _bitmask_matvec_table_kernel, sig, consts, {"num_warps": tb["num_warps"]}))
    # fused Lanczos steps (FusedSteps), at the default Krylov dimension 48: KB = next power of two of 50
    lz = _utils.block_sizes("lanczos")
    state = {"basis_ptr": "*fp64", "w_ptr": "*fp64", "alpha_ptr": "*fp64", "beta_ptr": "*fp64", "live_ptr": "*i8",
             "klen_ptr": "*i64", "cap_ptr": "*i64", "done_ptr": "*i8", "stalled_ptr": "*i8", "step_ptr": "*i32"}
    operator = {"mask_ptr": "*i32", "s_ptr": "*fp64", "len_ptr": "*i32", "eps_ptr": "*fp64", "idx_ptr": "*i32"}
    sig = {**operator, **{k: state[k] for k in ("basis_ptr", "w_ptr", "done_ptr", "stalled_ptr", "step_ptr")},
           "N_max": "i32", "W": "i32", "stride_bb": "i32", "stride_br": "i32", "BM": "constexpr", "BN": "constexpr"}
    out.append(("lanczos-matvec", _lanczos_matvec_kernel, sig, {"BM": lz["BM"], "BN": lz["BN"]},
                {"num_warps": lz["num_warps"]}))
    body = {"BREAKDOWN": 1e-13, "KB": 64}
    sig = {"len_ptr": "*i32", "idx_ptr": "*i32", **state, "N_max": "i32", "M": "i32", "stride_bb": "i32",
           "stride_br": "i32", "BREAKDOWN": "constexpr", "KB": "constexpr", "BN": "constexpr"}
    out.append(("lanczos-step", _lanczos_step_kernel, sig, {**body, "BN": lz["BS"]}, {"num_warps": lz["num_warps"]}))
    rz = _utils.block_sizes("ritz")
    sig = {**operator, **state, "tri_ptr": "*fp64", "tol_ptr": "*fp64", "N_max": "i32", "W": "i32", "M": "i32",
           "stride_bb": "i32", "stride_br": "i32", "n_steps": "i32", "BREAKDOWN": "constexpr", "KB": "constexpr",
           "BM": "constexpr", "BN": "constexpr", "BS": "constexpr", "CHECK": "constexpr", "KR": "constexpr",
           "S": "constexpr", "ROUNDS": "constexpr", "PARK": "constexpr", "PIVMIN": "constexpr"}
    for check in (0, 6):  # chunks without checks; a whole self-checking cycle (GPU check interval 6)
        consts = {**body, "BM": lz["BM"], "BN": lz["BN"], "BS": lz["BS"], "CHECK": check, "KR": 64, "S": rz["S"],
                  "ROUNDS": rz["ROUNDS"], "PARK": -8.0, "PIVMIN": 1e-290}
        out.append((f"lanczos-persistent-check{check}", _lanczos_persistent_kernel, sig, consts,
                    {"num_warps": lz["num_warps"]}))
    sig = {"alpha_ptr": "*fp64", "beta_ptr": "*fp64", "live_ptr": "*i8", "tri_ptr": "*fp64", "vec_ptr": "*fp64",
           "out_ptr": "*fp64", "M": "i32", "k": "i32", "KP": "constexpr", "S": "constexpr", "ROUNDS": "constexpr",
           "PARK": "constexpr", "PIVMIN": "constexpr", "STORE": "constexpr"}
    for store in (False, True):  # convergence checks; end of a cycle (with the eigenvector)
        consts = {"KP": 64, "S": rz["S"], "ROUNDS": rz["ROUNDS"], "PARK": -8.0, "PIVMIN": 1e-290, "STORE": store}
        out.append((f"ritz-top2{'-vectors' if store else ''}", _ritz_top2_kernel, sig, consts,
                    {"num_warps": rz["num_warps"]}))
    return out


def _registers(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) that Triton's ptxas reports for the PTX on sm_90a."""
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as fh:
        fh.write(ptx)
        fh.flush()
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", fh.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    return (max(int(r) for r in re.findall(r"Used (\d+) registers", log)),
            sum(int(b) for b in re.findall(r"(\d+) bytes spill stores", log)))


def _compile_all() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    for label, fn, sig, constexprs, options in _variants():
        # As the JIT specializes real launches: pointers (torch allocations) and the sizes that are
        # multiples of 16 in practice (C = 384/768, N_max = 784/3600) carry tt.divisibility = 16.
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig)
                 if sig[name].startswith("*") or name in ("C", "N_max")}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs), target=target,
                           options=options)
        ptx = k.asm["ptx"]
        regs, spills = _registers(ptx)
        print(json.dumps({"label": label, "registers": regs, "spill_bytes": spills, "cubin": len(k.asm["cubin"]),
                          "popc": "popc.b32" in ptx, "dp4a": "dp4a.u32.s32" in ptx, "fma_f32": "fma.rn.f32" in ptx,
                          "wgmma": "wgmma" in ptx, "pipelined": "async_copy_global_to_local" in k.asm["ttgir"],
                          "shared": k.metadata.shared}), flush=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["label"]: r for r in rows}


def test_every_kernel_compiles_for_sm90(compiled):
    labels = [v[0] for v in _variants()]
    assert sorted(compiled) == sorted(labels)
    assert all(r["cubin"] > 0 for r in compiled.values())


def test_affinity_uses_popc_and_tensor_cores(compiled):
    assert all(compiled[f"affinity-{p}"]["popc"] for p in ("float32", "fast", "float64"))
    assert compiled["affinity-fast"]["wgmma"]  # fp16 tiles go to Hopper tensor cores
    assert compiled["affinity-exact"]["wgmma"] and compiled["affinity-exact"]["popc"]  # exact: the same screen


def test_exact_affinity_does_not_spill(compiled):
    """The exact variant adds the fp64 threshold tests and the candidate list to the fp16 tile."""
    assert compiled["affinity-exact"]["spill_bytes"] == 0, compiled["affinity-exact"]
    assert all(compiled[f"affinity-{p}"]["pipelined"] for p in ("float32", "fast"))  # cp.async stages
    assert compiled["affinity-float32-tf32x3"]["wgmma"]
    assert not compiled["affinity-float32"]["wgmma"]  # IEEE fp32: no tf32 tensor-core path
    assert all(compiled[f"matvec-int8-{tag}"]["wgmma"] for tag in ("k2", "k4", "k2-stepped"))  # int8 wgmma


def test_recheck_kernels(compiled):
    """The recheck kernels and exact's normalization stay in registers; the float32 recheck has no FMA (its
    order rounds every product)."""
    assert compiled["recheck-exact"]["spill_bytes"] == 0 and compiled["recheck-float32"]["spill_bytes"] == 0
    assert not compiled["recheck-float32"]["fma_f32"]
    assert all(compiled[f"normalize-exact-{src}"]["spill_bytes"] == 0 for src in ("fp32", "fp64"))


def test_dp4a_matvec_uses_dp4a(compiled):
    # the GPU variant of matvec._dp4a is the instruction, not the interpreter's byte arithmetic
    assert all(compiled[f"matvec-dp4a-{tag}"]["dp4a"] for tag in ("k1", "k1-stepped"))
    assert not compiled["matvec-int8-k2"]["dp4a"]


def test_fp64_kernels_do_not_spill(compiled):
    # fp64 tiles cost two registers per element: the GPU block sizes of the mat-vec and the fused Lanczos
    # kernels are chosen to stay in registers (ptxas of sm_90a, at the default launch settings).
    for label in ("matvec-k1", "matvec-k4", "matvec-dp4a-k1", "matvec-dp4a-k1-stepped", "matvec-table-k1",
                  "matvec-table-k1-stepped", "table-sums-k1", "table-sums-k1-stepped", "lanczos-matvec",
                  "lanczos-step", "lanczos-persistent-check0", "lanczos-persistent-check6", "ritz-top2",
                  "ritz-top2-vectors"):
        assert compiled[label]["spill_bytes"] == 0, compiled[label]


if __name__ == "__main__":
    _compile_all()
