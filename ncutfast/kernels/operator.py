"""Driver glue of the Triton backend: the bitmask operator and the fused-step driver (with its CUDA graphs).

``BitmaskOperator`` is ``M = D^-1/2 W D^-1/2`` of a padded batch held as bitmask + degrees, the operator
interface of ``ncutfast.backends.lanczos``; ``FusedSteps`` is that driver's ``steps`` hook, launching the
kernels of ``kernels.lanczos`` (or ``kernels.matvec``'s prepared mat-vecs) and the Ritz pairs of ``kernels.ritz``.
"""

from __future__ import annotations

import warnings

import torch
import triton

from ..backends.contract import BREAKDOWN, PARK
from ._utils import block_sizes
from .lanczos import _lanczos_matvec_kernel, _lanczos_persistent_kernel, _lanczos_step_kernel
from .matvec import (
    _bitmask_matvec_i8_kernel,
    _digits_kernel,
    degrees_from_counts,
    launch_dp4a,
    launch_matvec,
    launch_table,
    table_scratch,
)
from .ritz import PIVMIN, ritz_top2

__all__ = ["BitmaskOperator", "FusedSteps"]


class BitmaskOperator:
    """``M = D^-1/2 W D^-1/2`` of a padded batch, held as bitmask + degrees; ``op(v, idx)`` is the operator
    interface of ``ncutfast.backends.lanczos``. A call launches one kernel (two per vector with the int8, dp4a
    and nibble-table variants of launch setting matvec.int8) and never synchronizes with the host.

    Attributes:
        mask: int32 ``(B, N_max, W)``; eps: float;
        degrees: float64 ``(B, N_max)`` (0 beyond lengths[b]); s: float64 ``(B, N_max)``, ``d^-1/2``
        (0 beyond lengths[b]); lens: int32 ``(B,)`` and eps_t: float64 ``(1,)``, the lengths and eps as the
        kernels take them (device tensors).
    """

    def __init__(self, mask: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor, eps: float) -> None:
        dev = mask.device
        self.mask = mask
        self.eps = float(eps)
        self.degrees = degrees_from_counts(counts, lengths, self.eps)
        pos = self.degrees > 0
        self.s = torch.where(pos, self.degrees.clamp_min(1e-300).rsqrt(), torch.zeros_like(self.degrees))
        self.lens = lengths.to(device=dev, dtype=torch.int32)
        self.eps_t = torch.tensor([self.eps], dtype=torch.float64, device=dev)
        self._all = torch.arange(mask.shape[0], device=dev, dtype=torch.int32)

    def __call__(self, v: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``M v`` for float64 ``v`` of shape ``(b, N_max)`` or ``(b, N_max, K)``, row p of v belonging to
        image ``idx[p]`` (default: all B images in order)."""
        idx32 = self._all if idx is None else idx.to(dtype=torch.int32)
        return launch_matvec(self.mask, self.lens, self.s, self.eps_t, idx32, v)


class FusedSteps:
    """Lanczos steps in Triton launches: the ``steps`` hook of ``ncutfast.backends.lanczos.lanczos_fiedler``.

    ``mode`` (launch setting "lanczos" ``solve``):
    - "steps": two launches per step, ``_lanczos_matvec_kernel`` (many programs per problem) and
      ``_lanczos_step_kernel`` (reorthogonalization + bookkeeping, one program per problem);
    - "graph": the same launches, captured once per cycle as a CUDA graph of ``check_every`` steps and
      replayed between convergence checks (CUDA only; the first chunk runs eagerly, compiling the kernels);
    - "persistent": one launch per chunk of steps, ``_lanczos_persistent_kernel`` (one program per problem);
      given ``tol`` and ``check_every`` it tests convergence itself, so a whole cycle is one launch.
    The step counter lives on the device (one int32 per problem), so every launch of a chunk is identical.
    The Ritz pairs (convergence checks, end of a cycle) come from ``kernels.ritz`` (one launch) instead of
    a batched ``eigh``.
    """

    MODES = ("steps", "graph", "persistent")

    def __init__(self, op: BitmaskOperator, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode: expected one of {self.MODES}, got {mode!r}")
        if mode == "graph" and op.mask.device.type != "cuda":
            mode = "steps"  # CUDA graphs need CUDA; the interpreter runs the same launches eagerly
        self.op, self.mode = op, mode
        self.self_checking = mode == "persistent"
        self._st = None
        self._graph = None

    def begin(self, state, tol: float | None = None, check_every: int = 0) -> None:
        """Start a cycle on ``state`` (an ``ncutfast.backends.lanczos.CycleState``): scratch and step counter. With
        ``tol`` and ``check_every``, mode "persistent" tests convergence itself every ``check_every`` steps
        (``self_checking``: the driver then runs the whole cycle as one chunk)."""
        b, _, n = state.basis.shape
        if n != self.op.mask.shape[1] or not state.basis.is_contiguous():
            raise ValueError(f"state.basis: expected a contiguous (b, m + 2, {self.op.mask.shape[1]}) tensor, "
                             f"got {tuple(state.basis.shape)}")
        dev = state.basis.device
        self._st = state
        self._w = torch.empty(b, n, dtype=torch.float64, device=dev)
        self._step = torch.zeros(b, dtype=torch.int32, device=dev)
        self._idx = state.idx.to(dtype=torch.int32)
        self._flags = (state.live.view(torch.int8), state.done.view(torch.int8), state.stalled.view(torch.int8))
        self._graph, self._graph_len, self._warm, self._dig, self._dig_kind = None, 0, False, None, 0
        self._check = check_every if self.self_checking and tol is not None else 0
        self._tol = torch.tensor([0.5 * tol, tol**0.5] if tol is not None else [0.0, 0.0], dtype=torch.float64,
                                 device=dev)
        self._tri = torch.empty(b, 6 * max(2, triton.next_power_of_2(state.alpha.shape[1])), dtype=torch.float64,
                                device=dev)  # scratch of kernels.ritz

    def run(self, j0: int, j1: int) -> None:
        """Steps j0, ..., j1 - 1 of the cycle (the device counter is at j0), no host synchronization."""
        count = j1 - j0
        if count <= 0:
            return
        if self.mode == "persistent":
            self._persistent(count)
        elif self.mode == "graph" and self._warm:
            if (self._graph is None or self._graph_len != count) and not self._capture(count):
                self.run(j0, j1)  # now mode "steps"
                return
            self._graph.replay()
        else:
            for _ in range(count):
                self._one_step()
            self._warm = True

    def _capture(self, count: int) -> bool:
        """Capture ``count`` steps as a CUDA graph (nothing runs). If capture fails (a driver or a Triton
        version that cannot capture these launches), warn once and fall back to mode "steps": the state is
        untouched, since captured launches do not execute."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for _ in range(count):
                    self._one_step()
        except RuntimeError as err:
            warnings.warn(f"ncutfast: CUDA graph capture of the Lanczos steps failed ({err}); launching them one "
                          "by one instead (launch setting lanczos.solve='steps' avoids the attempt)",
                          RuntimeWarning, stacklevel=3)
            self.mode, self._graph = "steps", None
            return False
        self._graph, self._graph_len = graph, count
        return True

    def ritz(self, k: int, vectors: bool = False):
        """Top two Ritz pairs after k steps from ``kernels.ritz.ritz_top2`` (one launch, no eigensolver)."""
        st = self._st
        return ritz_top2(st.alpha, st.beta, self._flags[0], k, vectors=vectors)

    def _one_step(self) -> None:
        self.launch_matvec()
        self.launch_step()

    def launch_matvec(self) -> None:
        """First launch(es) of a step: w = M q for every problem (the benchmark also times it alone). With
        launch setting matvec ``int8`` = 1, 2, 3 the tensor-core, dp4a or nibble-table variant (two launches)
        computes it."""
        st, op = self._st, self.op
        b, _, n = st.basis.shape
        _, done, stalled = self._flags
        kind = block_sizes("matvec")["int8"]
        if kind == 3:
            tab, tot = self._scratch(kind)
            launch_table(op.mask, op.lens, op.s, op.eps_t, self._idx, st.basis[:, 0], self._w, tab, tot,
                         (self._step, done, stalled), st.basis.stride(1))
            return
        if kind == 2:
            dig, scale, tot = self._scratch(kind)
            launch_dp4a(op.mask, op.lens, op.s, op.eps_t, self._idx, st.basis[:, 0], self._w, dig, scale, tot,
                        (self._step, done, stalled), st.basis.stride(1))
            return
        if kind:
            cfg = block_sizes("matvec_int8")
            dig, scale, tot = self._scratch(kind)
            _digits_kernel[(b,)](
                op.s, op.lens, self._idx, st.basis, dig, scale, tot, self._step, done, stalled, n, n, 1,
                st.basis.stride(0), 1, 0, st.basis.stride(1), BR=cfg["BR"], KP=2, STEPPED=True, LANES=False,
                num_warps=4,
            )
            _bitmask_matvec_i8_kernel[(triton.cdiv(n, cfg["BM"]), b)](
                op.mask, op.s, op.lens, op.eps_t, self._idx, dig, scale, tot, self._w, self._step, done, stalled,
                n, op.mask.shape[2], 1, n, 1, 1, BM=cfg["BM"], BN=cfg["BN"], KP=2, STEPPED=True,
                num_warps=cfg["num_warps"],
            )
            return
        cfg = block_sizes("lanczos")
        _lanczos_matvec_kernel[(triton.cdiv(n, cfg["BM"]), b)](
            op.mask, op.s, op.lens, op.eps_t, self._idx, st.basis, self._w, done, stalled, self._step,
            n, op.mask.shape[2], st.basis.stride(0), st.basis.stride(1),
            BM=cfg["BM"], BN=cfg["BN"], num_warps=cfg["num_warps"],
        )

    def _scratch(self, kind: int) -> tuple[torch.Tensor, ...]:
        """Scratch of the mat-vecs with a preparation launch, made once per cycle so that a captured graph
        keeps them: kind 1 (tensor cores, K = 1 padded to 2): (2 x 8 int8 digit columns per row, scale, tot);
        kind 2 (dp4a): (8 digits of each of the 32 W columns of a mask row, scale, tot); kind 3 (nibble
        table): (the 1 KiB-aligned fp64 table, tot)."""
        if self._dig is None or self._dig_kind != kind:
            b, _, n = self._st.basis.shape
            dev = self._st.basis.device
            W = self.op.mask.shape[2]
            k = 2 if kind == 1 else 1
            tot = torch.empty(b, k, dtype=torch.float64, device=dev)
            if kind == 3:
                self._dig = (table_scratch(b, W, dev), tot)
            else:
                self._dig = (torch.empty(b, 16 * n if kind == 1 else 256 * W, dtype=torch.int8, device=dev),
                             torch.empty(b, k, dtype=torch.float64, device=dev), tot)
            self._dig_kind = kind
        return self._dig

    def launch_step(self) -> None:
        """Second launch of a step: reorthogonalization and bookkeeping, one program per problem."""
        st, op = self._st, self.op
        b, rows, n = st.basis.shape
        live, done, stalled = self._flags
        cfg = block_sizes("lanczos")
        _lanczos_step_kernel[(b,)](
            op.lens, self._idx, st.basis, self._w, st.alpha, st.beta, live, st.klen, st.cap, done, stalled,
            self._step, n, st.alpha.shape[1], st.basis.stride(0), st.basis.stride(1),
            BREAKDOWN=BREAKDOWN, KB=triton.next_power_of_2(rows), BN=cfg["BS"], num_warps=cfg["num_warps"],
        )

    def rewind(self, j: int) -> None:
        """Put every problem back at step j, iterating (benchmarks repeat one step with it)."""
        self._step.fill_(j)
        self._st.klen.fill_(j)
        self._st.done.zero_()
        self._st.stalled.zero_()

    def _persistent(self, count: int) -> None:
        st, op = self._st, self.op
        b, rows, n = st.basis.shape
        live, done, stalled = self._flags
        cfg, rz = block_sizes("lanczos"), block_sizes("ritz")
        _lanczos_persistent_kernel[(b,)](
            op.mask, op.s, op.lens, op.eps_t, self._idx, st.basis, self._w, st.alpha, st.beta, live, st.klen,
            st.cap, done, stalled, self._step, self._tri, self._tol, n, op.mask.shape[2], st.alpha.shape[1],
            st.basis.stride(0), st.basis.stride(1), count,
            BREAKDOWN=BREAKDOWN, KB=triton.next_power_of_2(rows), BM=cfg["BM"], BN=cfg["BN"], BS=cfg["BS"],
            CHECK=self._check, KR=self._tri.shape[1] // 6, S=rz["S"], ROUNDS=rz["ROUNDS"], PARK=PARK,
            PIVMIN=PIVMIN, num_warps=cfg["num_warps"],
        )
