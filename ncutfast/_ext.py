"""Guarded import of the compiled extension ``ncutfast._C``.

``HAS_CPU_EXT`` is True when the module imports (it always carries the CPU kernels); ``HAS_CUDA_EXT`` when
it was also built with its CUDA kernels. Neither touches the GPU: ``cuda_device_available()`` asks the
extension's own (statically linked) CUDA runtime, on first call only, and never raises.
"""

from __future__ import annotations

import functools
from types import ModuleType

__all__ = ["HAS_CPU_EXT", "HAS_CUDA_EXT", "C", "IMPORT_ERROR", "cuda_device_available"]

C: ModuleType | None
IMPORT_ERROR: str | None
try:
    from . import _C as C
except ImportError as exc:  # not built (pure-Python install) or built for another Python
    C = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    IMPORT_ERROR = None

HAS_CPU_EXT: bool = C is not None
HAS_CUDA_EXT: bool = C is not None and bool(C.HAS_CUDA)


@functools.cache
def cuda_device_available() -> bool:
    """True if the extension has CUDA kernels and its runtime sees at least one device."""
    if not HAS_CUDA_EXT:
        return False
    count, _err, _msg = C.cuda_device_count()
    return count > 0
