"""Test configuration shared by every test file.

- Without a CUDA device, Triton kernels run under its interpreter: TRITON_INTERPRET must be set before any
  module defining @triton.jit kernels is imported, so it is set here (conftest is imported first). The GPU
  is detected without initialising CUDA (no torch.cuda call at import time).
- ``rng``: a NumPy Generator seeded from the test's node id, fresh per test and reproducible.
- ``weights``: a random-init ViT-S/16 state dict saved once per session, for the labeling CLI tests.
- ``agreement_log``: tests record reference-agreement numbers for ill-conditioned scenes; the terminal
  summary reports them (the issue asks for agreement rates where the eigengap is too small to compare).
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest

_HAS_GPU = Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()
if not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_CACHE_DIR", str(Path(tempfile.gettempdir()) / "ncutfast-triton-cache"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

_AGREEMENT: list[tuple[str, bool]] = []


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from ncutfast.label.vit import build_vit

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "dino_vits16_random.pth"
    torch.save(build_vit("vit_small_patch16").state_dict(), path)
    return path


@pytest.fixture
def agreement_log(request: pytest.FixtureRequest):
    def log(same_partition: bool) -> None:
        _AGREEMENT.append((request.node.nodeid, bool(same_partition)))

    return log


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if _AGREEMENT:
        same = sum(s for _, s in _AGREEMENT)
        terminalreporter.write_line(
            f"ncutfast: scenes with relative eigengap < 1e-3 (partition not well defined): {len(_AGREEMENT)}, "
            f"partition identical to the reference on {same}/{len(_AGREEMENT)} "
            f"({100.0 * same / len(_AGREEMENT):.1f}%)"
        )
