"""Triton kernels of ncutfast (import needs triton; set TRITON_INTERPRET=1 first to run them on CPU).

- ``affinity``: fused normalize -> cosine similarity -> threshold -> bitmask + degree counts.
- ``lanczos``: the Lanczos operator D^-1/2 W D^-1/2 applied straight from the bitmask, and whole Lanczos
  steps fused around it (``FusedSteps``: two launches per step, a CUDA graph, or a persistent kernel).
- ``ritz``: the convergence test between steps (top two Ritz pairs of the tridiagonal matrices).
- ``_utils``: launch settings (overridable block sizes) and the popcount helper.
"""
