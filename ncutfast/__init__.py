"""ncutfast: exact, batched normalized cut (TokenCut / MaskCut) on CPUs and GPUs.

``ncut``, ``tokencut`` and ``maskcut`` take torch, NumPy or CuPy features, one image or a (ragged) batch;
``ncutfast.reference`` is the float64 specification they are tested against; ``ncutfast.compat`` holds
drop-in replacements for TokenCut's and CutLER's functions.
"""

from .api import MaskCutResult, NcutResult, TokenCutResult, maskcut, ncut, tokencut
from .backends import available_backends

__version__ = "0.1.0"

__all__ = [
    "ncut",
    "tokencut",
    "maskcut",
    "NcutResult",
    "TokenCutResult",
    "MaskCutResult",
    "available_backends",
    "__version__",
]
