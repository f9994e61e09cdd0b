"""``import ncutfast`` and the CPU paths work when the compiled extension, or its CUDA part, is absent.

Each "absent" case runs in a fresh interpreter whose import system hides ``ncutfast._C`` (as on a pure-Python
install) or replaces it by a view without its CUDA kernels (as a build on a machine without nvcc), so the
guarded import in ``ncutfast._ext`` really runs. The last tests use the real extension of this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ncutfast import _ext, backends

# Installed before anything imports ncutfast: a meta-path finder that refuses ncutfast._C ("missing") or
# loads the real module and re-exports it without the CUDA entry points ("cpu_only").
_HIDE_EXTENSION = """
import importlib.abc, importlib.machinery, importlib.util, sys, types

MODE = {mode!r}

class _Hide(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name != "ncutfast._C":
            return None
        if MODE == "missing":
            raise ImportError("ncutfast._C hidden by test_no_cuda")
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        sys.meta_path.remove(self)
        real_spec = importlib.util.find_spec("ncutfast._C")
        real = importlib.util.module_from_spec(real_spec)
        real_spec.loader.exec_module(real)
        view = types.ModuleType("ncutfast._C")
        for key, value in vars(real).items():
            if "cuda" not in key and not key.startswith("__"):
                setattr(view, key, value)
        view.HAS_CUDA = False
        return view

    def exec_module(self, module):
        pass

sys.meta_path.insert(0, _Hide())
"""

_CHECKS = """
import json, os
import numpy as np
import torch

import ncutfast
from ncutfast import _ext, backends

out = {{"has_cpu": _ext.HAS_CPU_EXT, "has_cuda": _ext.HAS_CUDA_EXT, "cuda_device": _ext.cuda_device_available(),
        "import_error": _ext.IMPORT_ERROR, "available": ncutfast.available_backends(),
        "auto": backends.resolve_backend("auto", torch.device("cpu"))[0]}}
rng = np.random.default_rng(7)
feats = rng.standard_normal((37, 11)).astype(np.float32) + 0.5
res = ncutfast.ncut(feats)
out["ncut_backend"] = res.backend
out["ncut_lambda2"] = float(res.lambda2)
for name in ("cpu", "cuda"):
    try:
        backends.resolve_backend(name, torch.device("cpu"))
        out[name] = "ok"
    except RuntimeError as exc:
        out[name] = "RuntimeError: " + str(exc)
os.environ["NCUTFAST_BACKEND"] = "cpu"
try:
    ncutfast.ncut(feats)
    out["forced_cpu"] = "ok"
except RuntimeError as exc:
    out["forced_cpu"] = "RuntimeError: " + str(exc)
print(json.dumps(out))
"""


def _run(mode: str) -> dict:
    """Run the checks in a fresh interpreter with the extension hidden ("missing") or CPU-only."""
    code = textwrap.dedent(_HIDE_EXTENSION.format(mode=mode)) + textwrap.dedent(_CHECKS.format())
    env = {k: v for k, v in os.environ.items() if k != "NCUTFAST_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _reference_lambda2() -> float:
    from ncutfast import reference

    rng = np.random.default_rng(7)
    feats = rng.standard_normal((37, 11)).astype(np.float32) + 0.5
    return reference.fiedler(reference.affinity(feats, similarity_dtype=np.float32))[0]


def test_import_without_extension_falls_back_to_torch() -> None:
    out = _run("missing")
    assert out["has_cpu"] is False and out["has_cuda"] is False and out["cuda_device"] is False
    assert "hidden by test_no_cuda" in out["import_error"]
    assert "cpu" not in out["available"] and "cuda" not in out["available"]
    assert out["auto"] == "torch" and out["ncut_backend"] == "torch"
    assert out["ncut_lambda2"] == pytest.approx(_reference_lambda2(), rel=1e-7)
    assert out["cpu"].startswith("RuntimeError: backend: backend 'cpu' is not available")
    assert out["cuda"].startswith("RuntimeError: backend: backend 'cuda' is not available")
    assert out["forced_cpu"].startswith("RuntimeError: NCUTFAST_BACKEND: backend 'cpu' is not available")


@pytest.mark.skipif(not _ext.HAS_CPU_EXT, reason=f"ncutfast._C not built ({_ext.IMPORT_ERROR})")
def test_cpu_only_build_uses_the_cpu_extension() -> None:
    """A build without nvcc: the CPU kernels work, the CUDA backend is unavailable with a clear error."""
    out = _run("cpu_only")
    assert out["has_cpu"] is True and out["has_cuda"] is False and out["cuda_device"] is False
    assert "cpu" in out["available"] and "cuda" not in out["available"]
    assert out["auto"] == "cpu" and out["ncut_backend"] == "cpu"
    assert out["ncut_lambda2"] == pytest.approx(_reference_lambda2(), rel=1e-7)
    assert out["cpu"] == "ok" and out["forced_cpu"] == "ok"
    assert out["cuda"].startswith("RuntimeError: backend: backend 'cuda' is not available")


def test_cpu_backend_without_extension_raises_runtime_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Called directly (not through dispatch), the cpu backend names the missing extension."""
    from ncutfast.backends import SolveParams, ext

    monkeypatch.setattr(_ext, "C", None)
    monkeypatch.setattr(_ext, "IMPORT_ERROR", "ImportError: hidden")
    with pytest.raises(RuntimeError, match=r"^backend: the compiled extension ncutfast\._C is not available"):
        ext.solve(torch.ones(1, 5, 3), torch.tensor([5]), SolveParams(tau=0.2, eps=1e-5, max_iter=10))


@pytest.mark.skipif(not _ext.HAS_CPU_EXT, reason=f"ncutfast._C not built ({_ext.IMPORT_ERROR})")
def test_real_extension_reports_no_device_and_auto_picks_cpu() -> None:
    """On a machine without a GPU the CUDA-enabled build reports (0, err, message) instead of raising."""
    if _ext.HAS_CUDA_EXT:
        count, err, msg = _ext.C.cuda_device_count()
        if count > 0:
            pytest.skip("a CUDA device is present")
        assert err != 0 and msg
    assert _ext.cuda_device_available() is False
    assert backends.resolve_backend("auto", torch.device("cpu"))[0] == "cpu"
    assert "cuda" not in backends.available_backends()
    with pytest.raises(RuntimeError, match="^backend: backend 'cuda' is not available"):
        backends.resolve_backend("cuda", torch.device("cpu"))
