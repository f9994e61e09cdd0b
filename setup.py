"""Build ncutfast._C: C++/OpenMP always, plus the CUDA sources when nvcc is found.

Environment:
    NCUTFAST_NO_CUDA=1     build without CUDA even if nvcc is found.
    NCUTFAST_CUDA_ARCHS    semicolon-separated SM versions (default "80;90"); PTX of the last is embedded too.
    NCUTFAST_NATIVE=1      compile the CPU code with -march=native (never ship such a build).
    CUDA_HOME / CUDA_PATH  toolkit root (otherwise found from nvcc, which may be a wrapper script).

A missing nvcc only skips CUDA; a CUDA source that fails to compile fails the build. One line says which.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _rel(paths: list[Path]) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def _find_nvcc() -> str | None:
    if os.environ.get("NCUTFAST_NO_CUDA", "") not in ("", "0"):
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_home(nvcc: str) -> Path:
    """The toolkit root. The nvcc on PATH can be a wrapper script, so ask nvcc itself (its TOP= line)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"],
                         capture_output=True, text=True, check=False)
    match = re.search(r"^#\$ TOP=(.+)$", out.stderr + out.stdout, re.MULTILINE)
    if match:
        return Path(match.group(1).strip()).resolve()
    return Path(nvcc).resolve().parent.parent


def _cpu_flags() -> list[str]:
    flags = ["-O3", "-g0", "-std=c++17", "-fopenmp", "-fvisibility=hidden"]
    if os.environ.get("NCUTFAST_NATIVE", "") not in ("", "0"):
        flags.append("-march=native")
    elif platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=x86-64-v2")  # POPCNT; the baseline turns popcount into a libgcc call
    return flags


class BuildExt(build_ext):
    """Compile the .cu files with nvcc into objects and link them into the pybind11 module."""

    def build_extension(self, ext: Extension) -> None:
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        nvcc = _find_nvcc()
        if cu_sources and nvcc:
            home = _cuda_home(nvcc)
            archs = [a.strip() for a in os.environ.get("NCUTFAST_CUDA_ARCHS", "80;90").split(";") if a.strip()]
            if not archs:
                raise SystemExit("NCUTFAST_CUDA_ARCHS: no SM version given (example: '80;90')")
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
            out_dir = Path(self.build_temp) / "cuda"
            out_dir.mkdir(parents=True, exist_ok=True)
            for src in cu_sources:
                obj = out_dir / (Path(src).stem + ".o")
                cmd = [nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                       "-Xcompiler", "-fvisibility=hidden", f"-I{CSRC}", *gencode]
                subprocess.run(cmd, check=True)  # a CUDA compile error fails the build
                ext.extra_objects.append(str(obj))
            ext.define_macros.append(("NCUTFAST_WITH_CUDA", "1"))
            ext.library_dirs += [str(home / "lib64"), str(home / "lib")]
            ext.libraries += ["cudart_static", "rt", "pthread", "dl"]  # static cudart: no libcudart.so at import
            print(f"ncutfast: building _C with CPU (OpenMP) and CUDA (sm {','.join(archs)}) from {home}")
        else:
            reason = "NCUTFAST_NO_CUDA is set" if os.environ.get("NCUTFAST_NO_CUDA") else "nvcc not found"
            print(f"ncutfast: building _C with CPU (OpenMP) only; CUDA skipped ({reason})")
        super().build_extension(ext)


ext = Extension(
    "ncutfast._C",
    sources=_rel(list(CSRC.glob("*.cpp")) + list((CSRC / "cpu").glob("*.cpp")) + list((CSRC / "cuda").glob("*.cu"))),
    # Headers hold the shared math and .cu files are compiled outside `sources`: a change must relink.
    # (Switching NCUTFAST_NO_CUDA on an existing build needs `build_ext --force`.)
    depends=_rel(list(CSRC.rglob("*.h")) + list((CSRC / "cuda").glob("*.cu"))),
    include_dirs=[pybind11.get_include(), str(CSRC)],
    extra_compile_args=_cpu_flags(),
    extra_link_args=["-fopenmp"],
    language="c++",
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
