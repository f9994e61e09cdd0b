"""The mat-vec of the ncut problem's Lanczos operator, applied straight from the bitmask.

With W = eps 11^T + (1 - eps) B (B the 0/1 bitmask, self-loops included), d = W 1 and s = d^-1/2, the
symmetric operator whose 2nd largest eigenvector gives the cut is

    M v = s * (eps * (s . v) 1 + (1 - eps) * B (s * v))

(see ../shared/spec/numerics.md). Two implementations, chosen by the ``int8`` launch setting of "matvec":

- ``_bitmask_matvec_kernel`` (default): one launch; the D^-1/2 scaling on both sides and the rank-one eps
  term are fused into the pass over the bits, which are expanded in registers and accumulated in fp64.
- ``_digits_kernel`` + ``_bitmask_matvec_i8_kernel``: tensor cores. u = s * v is written in fixed point,
  ``u = scale * sum_d digit_d 128^d`` with 8 balanced base-128 digits in int8 (56 bits, scale = max|u| /
  2^54), so ``B u`` is an exact int8 x int8 -> int32 ``tl.dot`` of the 0/1 bits with the digits (|sum| <=
  64 n < 2^31) followed by an fp64 recombination; the only error is u's truncation to 2^-54 max|u|. This
  moves the multiply-adds off the ALUs (a candidate for the GPU; the benchmark measures both).
- ``_digits_kernel`` (``LANES``) + ``_bitmask_matvec_dp4a_kernel``: the same digits, stored so that one
  32-bit word holds digit d of the 4 columns c, c + 8, c + 16, c + 24 (c = a + 32 w, a < 8) as 4 bytes, the
  byte-lane order of ``(mask_word >> a) & 0x01010101`` (which holds those 4 columns' bits, one per byte):
  4 mask bits are expanded by 2 integer ops and multiplied with their digits by one ``dp4a`` (4-way
  int8 dot product into int32) per digit. The integer sums are exactly those of the tensor-core variant
  (same digits, |sum| <= 64 n), so the error bound is the same; only the fp64 recombination's rounding
  order differs.
- ``_nibble_table_kernel`` + ``_bitmask_matvec_table_kernel``: for every group of 4 columns, the 16 sums of
  u = s * v over the subsets of the group (fp64); a nibble of a mask word then picks its group's sum, so 4
  bits cost ~5 instructions (shift, AND-OR into the address, a move, an L1/L2-cached load, an fp64 add).
  The result is an fp64 sum of the same terms u_j in another association: each term passes through at most
  3 (table) + ceil(n / 32) (accumulator) + 3 (sum of the 8 accumulators) roundings, so |error of (B u)_i| <=
  (6 + ceil(n / 32)) 2^-53 sum_j B_ij |u_j| to first order, tighter than the fp64 kernel's.

Either way a Lanczos step reads N^2 / 8 bytes of mask per image instead of an N x N float matrix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import block_sizes, interpreting, words_per_row

__all__ = ["bitmask_matvec_fwd", "degrees_from_counts", "launch_dp4a", "launch_matvec", "launch_table",
           "table_scratch"]


@triton.jit
def _matvec_rows(
    mask_ptr, s_ptr, eps, b, n, N_max, W, rows, v_base, stride_vn, stride_vk, K, n_cols,
    BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr,
):
    """Rows ``rows`` (BM,) of M v for image b (n tokens), all K vectors of the block at ``v_base`` at once:
    a (BM, KP) fp64 tensor, zero on rows >= n. ``n_cols`` is n, or 0 to skip the work (rows past n).

    It walks the columns in steps of BN: loads u = s * v for those columns (BN, KP), expands the
    (BM, BN / 32) mask words to bits and adds the selected u into a (BM, BN, KP) fp64 accumulator; the
    column sums of u (for the eps term) build up the same way. Both are reduced over BN once, after the
    loop, so the loop body has no cross-thread reduction."""
    kk = tl.arange(0, KP)
    k_ok = kk[None, :] < K  # KP is K rounded up to a power of two
    sh = tl.arange(0, 32)
    wi = tl.arange(0, BN // 32)
    row_ok = rows < n  # padding rows (and rows past N_max in the last block) are not graph nodes
    mrow = mask_ptr + (b * N_max + rows[:, None]).to(tl.int64) * W
    acc = tl.zeros((BM, BN, KP), dtype=tl.float64)
    tot = tl.zeros((BN, KP), dtype=tl.float64)
    for c0 in range(0, n_cols, BN):
        cols = c0 + tl.arange(0, BN)
        col_ok = cols < n  # last column step; v may hold anything beyond n
        s_c = tl.load(s_ptr + b * N_max + cols, mask=col_ok, other=0.0)
        u = tl.load(v_base + cols[:, None] * stride_vn + kk[None, :] * stride_vk,
                    mask=col_ok[:, None] & k_ok, other=0.0).to(tl.float64) * s_c[:, None]
        tot += u
        # words past W do not exist (the last step may overhang the row); their columns are >= n anyway
        words = tl.load(mrow + c0 // 32 + wi[None, :], mask=row_ok[:, None] & (c0 // 32 + wi[None, :] < W),
                        other=0)
        bits = tl.reshape((words[:, :, None] >> sh[None, None, :]) & 1, (BM, BN))
        acc += tl.where(bits[:, :, None] != 0, u[None, :, :], 0.0)
    bu = tl.sum(acc, axis=1)
    s_r = tl.load(s_ptr + b * N_max + rows, mask=row_ok, other=0.0)
    return s_r[:, None] * (eps * tl.sum(tot, axis=0)[None, :] + (1.0 - eps) * bu)


@triton.jit
def _bitmask_matvec_kernel(
    mask_ptr, s_ptr, len_ptr, eps_ptr, idx_ptr, v_ptr, y_ptr,
    N_max, W, K,
    stride_vb, stride_vn, stride_vk,
    stride_yb, stride_yn, stride_yk,
    BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr,
):
    """One program computes BM rows of y = M v for one image, all K vectors at once: row p = program_id(1)
    of v and y belongs to image b = idx[p] of the mask, so a subset of the batch (Lanczos restarts) runs
    without gathering its masks. Row blocks entirely past n skip the column loop and store zeros."""
    pid = tl.program_id(0)
    p = tl.program_id(1)
    b = tl.load(idx_ptr + p)
    n = tl.load(len_ptr + b).to(tl.int32)
    rows = pid * BM + tl.arange(0, BM)
    kk = tl.arange(0, KP)
    eps = tl.load(eps_ptr)  # fp64 from memory: a Python float argument would be rounded to fp32
    y = _matvec_rows(mask_ptr, s_ptr, eps, b, n, N_max, W, rows, v_ptr + p * stride_vb, stride_vn, stride_vk,
                     K, tl.where(pid * BM < n, n, 0), BM, BN, KP)
    tl.store(y_ptr + p * stride_yb + rows[:, None] * stride_yn + kk[None, :] * stride_yk, y,
             mask=(rows[:, None] < N_max) & (kk[None, :] < K))


@triton.jit
def _vector_block(v_ptr, p, stride_vb, step_ptr, stride_vr, done_ptr, stalled_ptr, STEPPED: tl.constexpr):
    """Base pointer of vector block p and whether to compute with it. STEPPED (fused Lanczos steps): the
    block is row step[p] + 1 of problem p's basis (row stride stride_vr), and done or stalled problems are
    skipped; otherwise it is row p of v."""
    base = v_ptr + p.to(tl.int64) * stride_vb
    if STEPPED:
        base += (tl.load(step_ptr + p) + 1) * stride_vr
        active = (tl.load(done_ptr + p) == 0) & (tl.load(stalled_ptr + p) == 0)
    else:
        active = p >= 0
    return base, active


@triton.jit
def _digits_kernel(
    s_ptr, len_ptr, idx_ptr, v_ptr, dig_ptr, scale_ptr, tot_ptr, step_ptr, done_ptr, stalled_ptr,
    N_max, NP, K,
    stride_vb, stride_vn, stride_vk, stride_vr,
    BR: tl.constexpr, KP: tl.constexpr, STEPPED: tl.constexpr, LANES: tl.constexpr,
):
    """One program per vector block p = program_id(0) (image b = idx[p]) writes u = s * v in fixed point:
    ``dig[p, j, 8 k + d]`` (int8) with ``u_jk ~= scale[p, k] * sum_d dig * 128^d``, and ``tot[p, k] =
    sum_j u_jk`` (fp64) for the eps term. Pass 1 finds max |u| per vector, pass 2 writes the digits.
    Rows >= n (padding) and vectors >= K (power-of-two padding) get zero digits: the mat-vec reads them.
    The digit buffer holds NP rows per vector block (N_max, or 32 W with LANES).
    LANES (KP = 1, for ``_bitmask_matvec_dp4a_kernel``): the byte of digit d of column j goes to byte
    ``4 (8 (8 (j // 32) + d) + j % 8) + (j // 8) % 4`` of the block's ``8 NP`` bytes.
    STEPPED: see ``_vector_block`` (a skipped problem's digits are not written; the mat-vec skips it too)."""
    p = tl.program_id(0)
    b = tl.load(idx_ptr + p)
    n = tl.load(len_ptr + b).to(tl.int32)
    v_base, active = _vector_block(v_ptr, p, stride_vb, step_ptr, stride_vr, done_ptr, stalled_ptr, STEPPED)
    kk = tl.arange(0, KP)
    k_ok = kk[None, :] < K
    amax = tl.zeros((KP,), dtype=tl.float64)
    tot = tl.zeros((KP,), dtype=tl.float64)
    for r0 in range(0, tl.where(active, n, 0), BR):
        rows = r0 + tl.arange(0, BR)
        ok = rows < n
        s_r = tl.load(s_ptr + b * N_max + rows, mask=ok, other=0.0)
        u = tl.load(v_base + rows[:, None] * stride_vn + kk[None, :] * stride_vk,
                    mask=ok[:, None] & k_ok, other=0.0).to(tl.float64) * s_r[:, None]
        amax = tl.maximum(amax, tl.max(tl.abs(u), axis=0))
        tot += tl.sum(u, axis=0)
    # 2^54 / max|u|: |U| <= 2^54 fits the 8 balanced digits (range about +-2^55)
    inv = tl.where(amax > 0, 18014398509481984.0 / tl.where(amax > 0, amax, 1.0), 0.0)
    tl.store(scale_ptr + p * KP + kk, amax / 18014398509481984.0)
    tl.store(tot_ptr + p * KP + kk, tot)
    d_idx = tl.arange(0, 8)
    for r0 in range(0, tl.where(active, NP, 0), BR):
        rows = r0 + tl.arange(0, BR)
        ok = rows < n
        s_r = tl.load(s_ptr + b * N_max + rows, mask=ok, other=0.0)
        u = tl.load(v_base + rows[:, None] * stride_vn + kk[None, :] * stride_vk,
                    mask=ok[:, None] & k_ok, other=0.0).to(tl.float64) * s_r[:, None]
        big = (u * inv[None, :]).to(tl.int64)  # truncation: error < 1 unit = 2^-54 max|u|
        digits = tl.zeros((BR, KP, 8), dtype=tl.int64)
        for d in tl.static_range(8):
            dig = ((big + 64) & 127) - 64  # balanced digit in [-64, 63]
            digits = tl.where(d_idx[None, None, :] == d, dig[:, :, None], digits)
            big = (big - dig) >> 7  # exact: big - dig is a multiple of 128
        if LANES:
            tl.static_assert(KP == 1, "LANES: one vector per block")
            byte = 4 * (8 * (8 * (rows // 32)[:, None, None] + d_idx[None, None, :]) + (rows % 8)[:, None, None]) \
                + ((rows // 8) % 4)[:, None, None]
            tl.store(dig_ptr + p.to(tl.int64) * (NP * 8) + byte, digits.to(tl.int8), mask=(rows < NP)[:, None, None])
        else:
            cols = kk[:, None] * 8 + d_idx[None, :]
            tl.store(dig_ptr + (p * NP + rows[:, None, None]).to(tl.int64) * (KP * 8) + cols[None, :, :],
                     digits.to(tl.int8), mask=(rows < NP)[:, None, None])


@triton.jit
def _bitmask_matvec_i8_kernel(
    mask_ptr, s_ptr, len_ptr, eps_ptr, idx_ptr, dig_ptr, scale_ptr, tot_ptr, y_ptr, step_ptr, done_ptr,
    stalled_ptr, N_max, W, K,
    stride_yb, stride_yn, stride_yk,
    BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr, STEPPED: tl.constexpr,
):
    """One program computes BM rows of y = M v for vector block p = program_id(1) (image b = idx[p]).

    Per BN columns: bits (BM, BN) int8 from the mask words, digits (BN, 8 KP) int8, one exact int8 dot
    into an int32 accumulator. At the end the digit columns are recombined in fp64 (sum_d acc 128^d,
    times scale) and the eps term and the row scaling are applied. Row blocks past n skip the loop, and so
    do problems that STEPPED (``_vector_block``) skips."""
    pid = tl.program_id(0)
    p = tl.program_id(1)
    b = tl.load(idx_ptr + p)
    n = tl.load(len_ptr + b).to(tl.int32)
    rows = pid * BM + tl.arange(0, BM)
    row_ok = rows < n  # padding rows (and rows past N_max in the last block) are not graph nodes
    sh = tl.arange(0, 32)
    wi = tl.arange(0, BN // 32)
    dc = tl.arange(0, KP * 8)
    mrow = mask_ptr + (b * N_max + rows[:, None]).to(tl.int64) * W
    acc = tl.zeros((BM, KP * 8), dtype=tl.int32)
    _, active = _vector_block(dig_ptr, p, 0, step_ptr, 0, done_ptr, stalled_ptr, STEPPED)
    n_cols = tl.where(active & (pid * BM < n), n, 0)
    for c0 in range(0, n_cols, BN):
        cols = c0 + tl.arange(0, BN)
        # words past W do not exist (the last step may overhang the row); their columns are >= n anyway
        words = tl.load(mrow + c0 // 32 + wi[None, :], mask=row_ok[:, None] & (c0 // 32 + wi[None, :] < W),
                        other=0)
        bits = tl.reshape((words[:, :, None] >> sh[None, None, :]) & 1, (BM, BN)).to(tl.int8)
        # digit rows past N_max are outside the buffer (rows in [n, N_max) hold zeros)
        dig = tl.load(dig_ptr + (p * N_max + cols[:, None]).to(tl.int64) * (KP * 8) + dc[None, :],
                      mask=(cols < N_max)[:, None], other=0)
        acc = tl.dot(bits, dig, acc, out_dtype=tl.int32)
    kk = tl.arange(0, KP)
    weight = (tl.full((KP * 8,), 1, tl.int64) << (7 * (dc % 8))).to(tl.float64)  # 128^d, exact
    bu = tl.sum(tl.reshape(acc.to(tl.float64) * weight[None, :], (BM, KP, 8)), axis=2)
    scale = tl.load(scale_ptr + p * KP + kk)
    tot = tl.load(tot_ptr + p * KP + kk)
    s_r = tl.load(s_ptr + b * N_max + rows, mask=row_ok, other=0.0)
    eps = tl.load(eps_ptr)  # fp64 from memory: a Python float argument would be rounded to fp32
    y = s_r[:, None] * (eps * tot[None, :] + (1.0 - eps) * (bu * scale[None, :]))
    tl.store(y_ptr + p * stride_yb + rows[:, None] * stride_yn + kk[None, :] * stride_yk, y,
             mask=(rows[:, None] < N_max) & (kk[None, :] < K))


@triton.jit
def _dp4a(lanes, dig, acc, ASM: tl.constexpr):
    """``acc + sum_l byte_l(lanes) * sbyte_l(dig)`` per element (int32): the 4 unsigned bytes of ``lanes``
    times the 4 signed bytes of ``dig``. ASM: one ``dp4a.u32.s32`` (GPU); else the same sum in integer ops
    (the interpreter runs no inline assembly)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [lanes, dig, acc],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = acc
        for lane in tl.static_range(4):
            out += ((lanes >> (8 * lane)) & 0xFF) * ((dig << (24 - 8 * lane)) >> 24)
        return out


@triton.jit
def _bitmask_matvec_dp4a_kernel(
    mask_ptr, s_ptr, len_ptr, eps_ptr, idx_ptr, dig_ptr, scale_ptr, tot_ptr, y_ptr, step_ptr, done_ptr,
    stalled_ptr, N_max, W, stride_yb, stride_yn,
    BM: tl.constexpr, BW: tl.constexpr, STEPPED: tl.constexpr, ASM: tl.constexpr,
):
    """One program computes BM rows of y = M v for vector block p = program_id(1) (image b = idx[p], one
    vector), from the LANES digits of ``_digits_kernel`` (int32 view: ``dig[p, w, d, a]`` packs digit d of
    columns a + 32 w + 8 l, l = 0..3).

    Per mask word w of a row (BW words per loop trip): ``lanes[a] = (word >> a) & 0x01010101`` (a < 8) holds
    the bits of those same 4 columns as bytes, and ``acc_d[a] += dp4a(lanes[a], dig[p, w, d, a])`` for the 8
    digits. After the loop, ``bu = sum_d 128^d sum_a acc_d`` (fp64, exact integers up to the last additions),
    then the scale, the eps term and the row scaling as in ``_bitmask_matvec_i8_kernel``. Row blocks past n
    skip the loop, and so do problems that STEPPED (``_vector_block``) skips."""
    pid = tl.program_id(0)
    p = tl.program_id(1)
    b = tl.load(idx_ptr + p)
    n = tl.load(len_ptr + b).to(tl.int32)
    rows = pid * BM + tl.arange(0, BM)
    row_ok = rows < n  # padding rows (and rows past N_max in the last block) are not graph nodes
    a = tl.arange(0, 8)
    mrow = mask_ptr + (b * N_max + rows).to(tl.int64) * W
    dbase = dig_ptr + p.to(tl.int64) * W * 64 + a[None, :]
    _, active = _vector_block(dig_ptr, p, 0, step_ptr, 0, done_ptr, stalled_ptr, STEPPED)
    n_words = tl.where(active & (pid * BM < n), (n + 31) // 32, 0)
    acc0 = tl.zeros((BM, 8), dtype=tl.int32)
    acc1 = tl.zeros((BM, 8), dtype=tl.int32)
    acc2 = tl.zeros((BM, 8), dtype=tl.int32)
    acc3 = tl.zeros((BM, 8), dtype=tl.int32)
    acc4 = tl.zeros((BM, 8), dtype=tl.int32)
    acc5 = tl.zeros((BM, 8), dtype=tl.int32)
    acc6 = tl.zeros((BM, 8), dtype=tl.int32)
    acc7 = tl.zeros((BM, 8), dtype=tl.int32)
    for w0 in range(0, n_words, BW):
        for k in tl.static_range(BW):
            wd = w0 + k
            ok = wd < n_words  # the last trip may overhang the row; digits past n are zero anyway
            word = tl.load(mrow + wd, mask=row_ok & ok, other=0)
            lanes = (word[:, None] >> a[None, :]) & 0x01010101
            dp = dbase + wd * 64
            acc0 = _dp4a(lanes, tl.load(dp, mask=ok, other=0), acc0, ASM)
            acc1 = _dp4a(lanes, tl.load(dp + 8, mask=ok, other=0), acc1, ASM)
            acc2 = _dp4a(lanes, tl.load(dp + 16, mask=ok, other=0), acc2, ASM)
            acc3 = _dp4a(lanes, tl.load(dp + 24, mask=ok, other=0), acc3, ASM)
            acc4 = _dp4a(lanes, tl.load(dp + 32, mask=ok, other=0), acc4, ASM)
            acc5 = _dp4a(lanes, tl.load(dp + 40, mask=ok, other=0), acc5, ASM)
            acc6 = _dp4a(lanes, tl.load(dp + 48, mask=ok, other=0), acc6, ASM)
            acc7 = _dp4a(lanes, tl.load(dp + 56, mask=ok, other=0), acc7, ASM)
    # Horner from the top digit: every partial value is an integer, exact until it passes 2^53
    bu = tl.sum(acc7, axis=1).to(tl.float64)
    bu = bu * 128.0 + tl.sum(acc6, axis=1).to(tl.float64)
    bu = bu * 128.0 + tl.sum(acc5, axis=1).to(tl.float64)
    bu = bu * 128.0 + tl.sum(acc4, axis=1).to(tl.float64)
    bu = bu * 128.0 + tl.sum(acc3, axis=1).to(tl.float64)
    bu = bu * 128.0 + tl.sum(acc2, axis=1).to(tl.float64)
    bu = bu * 128.0 + tl.sum(acc1, axis=1).to(tl.float64)
    bu = bu * 128.0 + tl.sum(acc0, axis=1).to(tl.float64)
    scale = tl.load(scale_ptr + p)
    tot = tl.load(tot_ptr + p)
    s_r = tl.load(s_ptr + b * N_max + rows, mask=row_ok, other=0.0)
    eps = tl.load(eps_ptr)  # fp64 from memory: a Python float argument would be rounded to fp32
    y = s_r * (eps * tot + (1.0 - eps) * (bu * scale))
    tl.store(y_ptr + p * stride_yb + rows * stride_yn, y, mask=rows < N_max)


def launch_dp4a(mask: torch.Tensor, lens: torch.Tensor, s: torch.Tensor, eps_t: torch.Tensor, idx: torch.Tensor,
                v: torch.Tensor, y: torch.Tensor, dig: torch.Tensor, scale: torch.Tensor, tot: torch.Tensor,
                flags: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, stride_vr: int = 0) -> None:
    """y = M v by the byte-lane dp4a mat-vec: ``_digits_kernel`` (LANES) then ``_bitmask_matvec_dp4a_kernel``.

    v: float64 ``(nb, N_max)`` (any strides; with ``flags`` = (step, done, stalled), the block of problem p
    is row step[p] + 1 of its basis, ``stride_vr`` apart, and done or stalled problems are skipped); y:
    float64 ``(nb, N_max)`` (any strides); scratch: dig int8 ``(nb, 256 W)`` (int32-aligned), scale and tot
    float64 ``(nb,)``. No host sync.
    """
    _, N_max, W = mask.shape
    nb = idx.shape[0]
    cfg = block_sizes("matvec_dp4a")
    step, done, stalled = flags if flags is not None else (None, None, None)
    _digits_kernel[(nb,)](
        s, lens, idx, v, dig, scale, tot, step, done, stalled, N_max, 32 * W, 1, v.stride(0), v.stride(1), 0,
        stride_vr, BR=cfg["BR"], KP=1, STEPPED=flags is not None, LANES=True, num_warps=4,
    )
    _bitmask_matvec_dp4a_kernel[(triton.cdiv(N_max, cfg["BM"]), nb)](
        mask, s, lens, eps_t, idx, dig.view(torch.int32), scale, tot, y, step, done, stalled, N_max, W,
        y.stride(0), y.stride(1), BM=cfg["BM"], BW=cfg["BW"], STEPPED=flags is not None, ASM=not interpreting(),
        num_warps=cfg["num_warps"],
    )


@triton.jit
def _nibble_table_kernel(
    s_ptr, len_ptr, idx_ptr, v_ptr, tab_ptr, tot_ptr, step_ptr, done_ptr, stalled_ptr,
    N_max, W, stride_vb, stride_vn, stride_vr,
    BG: tl.constexpr, STEPPED: tl.constexpr,
):
    """One program per vector block p = program_id(0) (image b = idx[p], one vector) writes the subset sums
    of u = s * v over each group of 4 columns: ``tab[p, g, m] = sum_{t < 4, bit t of m} u[4 g + t]``
    (fp64, g < 8 W, m < 16; columns >= n count as 0), and ``tot[p] = sum_j u_j`` for the eps term.
    STEPPED: see ``_vector_block`` (a skipped problem's table is not written; the mat-vec skips it too)."""
    p = tl.program_id(0)
    b = tl.load(idx_ptr + p)
    n = tl.load(len_ptr + b).to(tl.int32)
    v_base, active = _vector_block(v_ptr, p, stride_vb, step_ptr, stride_vr, done_ptr, stalled_ptr, STEPPED)
    m = tl.arange(0, 16)
    tot = tl.zeros((BG,), dtype=tl.float64)
    for g0 in range(0, tl.where(active, 8 * W, 0), BG):
        g = g0 + tl.arange(0, BG)
        sums = tl.zeros((BG, 16), dtype=tl.float64)
        for t in tl.static_range(4):  # column 4 g + t is in the subsets m with bit t set
            col = 4 * g + t
            ok = col < n
            u = tl.load(v_base + col * stride_vn, mask=ok, other=0.0) * tl.load(s_ptr + b * N_max + col, mask=ok,
                                                                                other=0.0)
            tot += u
            sums += tl.where(((m >> t) & 1)[None, :] != 0, u[:, None], 0.0)
        tl.store(tab_ptr + p.to(tl.int64) * (128 * W) + g[:, None] * 16 + m[None, :], sums,
                 mask=(g < 8 * W)[:, None])
    tl.store(tot_ptr + p, tl.sum(tot, axis=0))


@triton.jit
def _bitmask_matvec_table_kernel(
    mask_ptr, s_ptr, len_ptr, eps_ptr, idx_ptr, tab_ptr, tot_ptr, y_ptr, step_ptr, done_ptr, stalled_ptr,
    N_max, W, stride_yb, stride_yn,
    BM: tl.constexpr, BW: tl.constexpr, STEPPED: tl.constexpr,
):
    """One program computes BM rows of y = M v for vector block p = program_id(1) (image b = idx[p], one
    vector) from the subset sums of ``_nibble_table_kernel`` (``tab`` 1 KiB-aligned): nibble q of mask word w
    of a row (bits 4 q .. 4 q + 3, the columns of group 8 w + q) indexes that group's 16 sums, so 4 mask bits
    cost a shift, an AND-OR into the address, one (cached) fp64 load and one fp64 add. BW words per loop
    trip; the (BM, 8) fp64 accumulator is summed once at the end, then the eps term and the row scaling. Row
    blocks past n skip the loop, and so do problems that STEPPED (``_vector_block``) skips."""
    pid = tl.program_id(0)
    p = tl.program_id(1)
    b = tl.load(idx_ptr + p)
    n = tl.load(len_ptr + b).to(tl.int32)
    rows = pid * BM + tl.arange(0, BM)
    row_ok = rows < n  # padding rows (and rows past N_max in the last block) are not graph nodes
    q = tl.arange(0, 8)
    rot = ((4 * q + 29) % 32).to(tl.uint32)  # rotating right by 4 q - 3 (mod 32) brings nibble q to bits 3..6
    mrow = mask_ptr + (b * N_max + rows).to(tl.int64) * W
    _, active = _vector_block(tab_ptr, p, 0, step_ptr, 0, done_ptr, stalled_ptr, STEPPED)
    n_words = tl.where(active & (pid * BM < n), (n + 31) // 32, 0)
    acc = tl.zeros((BM, 8), dtype=tl.float64)
    for w0 in range(0, n_words, BW):
        for k in tl.static_range(BW):
            # past the row's last word (the last trip may overhang) and on rows >= n the word is 0: its
            # nibbles pick the empty subsets, whose sums are 0, at a word that exists (unmasked loads)
            wd = tl.minimum(w0 + k, n_words - 1)
            word = tl.load(mrow + wd, mask=row_ok & (w0 + k < n_words), other=0).to(tl.uint32, bitcast=True)
            # entry nib of group 8 wd + q is byte 8 nib of the 128 bytes of the group, which start 128 q bytes
            # into the word's 1 KiB-aligned block: nib is OR-ed into the block's address (2 integer ops)
            lo = (word[:, None] >> rot[None, :]) | (word[:, None] << (32 - rot)[None, :])  # nibble q at bits 3..6
            block = (tab_ptr + p.to(tl.int64) * (128 * W) + 128 * wd).to(tl.uint64, bitcast=True)
            addr = (block | (lo & 0x78).to(tl.uint64)) + 128 * q[None, :].to(tl.uint64)
            acc += tl.load(addr.to(tl.pointer_type(tl.float64), bitcast=True))
    tot = tl.load(tot_ptr + p)
    s_r = tl.load(s_ptr + b * N_max + rows, mask=row_ok, other=0.0)
    eps = tl.load(eps_ptr)  # fp64 from memory: a Python float argument would be rounded to fp32
    y = s_r * (eps * tot + (1.0 - eps) * tl.sum(acc, axis=1))
    tl.store(y_ptr + p * stride_yb + rows * stride_yn, y, mask=rows < N_max)


def table_scratch(nb: int, W: int, device: torch.device) -> torch.Tensor:
    """An uninitialized float64 ``(nb, 128 W)`` table for ``launch_table``, starting at a 1 KiB boundary."""
    buf = torch.empty(nb * 128 * W + 128, dtype=torch.float64, device=device)
    skip = (-buf.data_ptr() % 1024) // 8
    return buf[skip: skip + nb * 128 * W].view(nb, 128 * W)


def launch_table(mask: torch.Tensor, lens: torch.Tensor, s: torch.Tensor, eps_t: torch.Tensor, idx: torch.Tensor,
                 v: torch.Tensor, y: torch.Tensor, tab: torch.Tensor, tot: torch.Tensor,
                 flags: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, stride_vr: int = 0) -> None:
    """y = M v by the nibble-table mat-vec: ``_nibble_table_kernel`` then ``_bitmask_matvec_table_kernel``.

    v, y, flags, stride_vr: as ``launch_dp4a``; scratch: tab float64 ``(nb, 128 W)`` starting at a 1 KiB
    boundary (``table_scratch``), tot float64 ``(nb,)``. No host sync.
    """
    _, N_max, W = mask.shape
    if tab.data_ptr() % 1024 or tab.shape != (idx.shape[0], 128 * W) or not tab.is_contiguous():
        raise ValueError(f"tab: expected a contiguous ({idx.shape[0]}, {128 * W}) table at a 1 KiB boundary, got "
                         f"{tuple(tab.shape)} at {tab.data_ptr():#x}")
    nb = idx.shape[0]
    cfg = block_sizes("matvec_table")
    step, done, stalled = flags if flags is not None else (None, None, None)
    _nibble_table_kernel[(nb,)](
        s, lens, idx, v, tab, tot, step, done, stalled, N_max, W, v.stride(0), v.stride(1), stride_vr,
        BG=cfg["BG"], STEPPED=flags is not None, num_warps=4,
    )
    _bitmask_matvec_table_kernel[(triton.cdiv(N_max, cfg["BM"]), nb)](
        mask, s, lens, eps_t, idx, tab, tot, y, step, done, stalled, N_max, W, y.stride(0), y.stride(1),
        BM=cfg["BM"], BW=cfg["BW"], STEPPED=flags is not None, num_warps=cfg["num_warps"],
    )


def degrees_from_counts(counts: torch.Tensor, lengths: torch.Tensor, eps: float) -> torch.Tensor:
    """Degrees ``d_i = eps * n + (1 - eps) * counts_i`` (float64 ``(B, N_max)``, 0 on padding rows).

    ``counts`` is the int32 ``(B, N_max)`` row popcount from ``affinity_fwd``; popcounts are exact
    integers, so d matches the reference's ``W.sum(1)`` up to float64 rounding of the sum.
    """
    n = lengths.to(device=counts.device, dtype=torch.float64)[:, None]
    valid = torch.arange(counts.shape[1], device=counts.device)[None, :] < n
    d = eps * n + (1.0 - eps) * counts.to(torch.float64)
    return torch.where(valid, d, torch.zeros((), dtype=torch.float64, device=counts.device))


def launch_matvec(mask: torch.Tensor, lens: torch.Tensor, s: torch.Tensor, eps_t: torch.Tensor, idx: torch.Tensor,
            v: torch.Tensor) -> torch.Tensor:
    """Launch the mat-vec on checked device tensors (int32 lens/idx, fp64 s/eps_t); no host sync, no copy
    to the device, so a solve built on it can be captured in a CUDA graph."""
    _, N_max, W = mask.shape
    nb = idx.shape[0]
    v3 = v if v.dim() == 3 else v.unsqueeze(-1)
    K = v3.shape[2]
    y3 = torch.empty((nb, N_max, K), dtype=torch.float64, device=v.device)
    kind = block_sizes("matvec")["int8"]
    if K and nb and kind == 3:
        tab = table_scratch(nb, W, v.device)
        tot = torch.empty((nb,), dtype=torch.float64, device=v.device)
        for k in range(K):  # one vector per launch pair
            launch_table(mask, lens, s, eps_t, idx, v3[:, :, k], y3[:, :, k], tab, tot)
    elif K and nb and kind == 2:
        dig = torch.empty((nb, 256 * W), dtype=torch.int8, device=v.device)
        scale = torch.empty((nb,), dtype=torch.float64, device=v.device)
        tot = torch.empty((nb,), dtype=torch.float64, device=v.device)
        for k in range(K):  # one vector per launch pair
            launch_dp4a(mask, lens, s, eps_t, idx, v3[:, :, k], y3[:, :, k], dig, scale, tot)
    elif K and nb and kind:
        cfg = block_sizes("matvec_int8")
        KP = max(2, triton.next_power_of_2(K))  # 8 KP >= 16 digit columns: the smallest tl.dot width
        dig = torch.empty((nb, N_max, 8 * KP), dtype=torch.int8, device=v.device)
        scale = torch.empty((nb, KP), dtype=torch.float64, device=v.device)
        tot = torch.empty((nb, KP), dtype=torch.float64, device=v.device)
        _digits_kernel[(nb,)](
            s, lens, idx, v3, dig, scale, tot, None, None, None, N_max, N_max, K, v3.stride(0), v3.stride(1),
            v3.stride(2), 0, BR=cfg["BR"], KP=KP, STEPPED=False, LANES=False, num_warps=4,
        )
        _bitmask_matvec_i8_kernel[(triton.cdiv(N_max, cfg["BM"]), nb)](
            mask, s, lens, eps_t, idx, dig, scale, tot, y3, None, None, None, N_max, W, K,
            y3.stride(0), y3.stride(1), y3.stride(2),
            BM=cfg["BM"], BN=cfg["BN"], KP=KP, STEPPED=False, num_warps=cfg["num_warps"],
        )
    elif K and nb:
        cfg = block_sizes("matvec")
        KP = triton.next_power_of_2(K)
        BN = max(32, cfg["BN"] // KP)  # keep the (BM, BN, KP) product at the register budget of K = 1
        grid = (triton.cdiv(N_max, cfg["BM"]), nb)
        _bitmask_matvec_kernel[grid](
            mask, s, lens, eps_t, idx, v3, y3, N_max, W, K,
            v3.stride(0), v3.stride(1), v3.stride(2), y3.stride(0), y3.stride(1), y3.stride(2),
            BM=cfg["BM"], BN=BN, KP=KP, num_warps=cfg["num_warps"],
        )
    return y3 if v.dim() == 3 else y3.squeeze(-1)


def bitmask_matvec_fwd(
    mask: torch.Tensor, lengths: torch.Tensor, s: torch.Tensor, v: torch.Tensor, eps: float,
    idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply ``M = D^-1/2 W D^-1/2`` of each image to one or a few vectors.

    Args:
        mask: int32 ``(B, N_max, W)`` bitmask from ``affinity_fwd`` (layout in kernels/affinity.py).
        lengths: ``(B,)`` integer, tokens per image.
        s: float64 ``(B, N_max)``, ``d^-1/2`` (entries beyond lengths[b] are ignored).
        v: float64 ``(b, N_max)`` or ``(b, N_max, K)`` (any strides); entries beyond the image's length
            are ignored.
        eps: weight of the non-edges.
        idx: optional integer ``(b,)``: row p of v belongs to image idx[p]; default all B images in order.

    Returns:
        float64 contiguous tensor shaped like ``v``: ``M v``, zero beyond the image's length.
    """
    if mask.dim() != 3 or mask.dtype != torch.int32:
        raise ValueError(f"mask: expected an int32 (B, N_max, W) tensor, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    B, N_max, W = mask.shape
    if W != words_per_row(N_max):
        raise ValueError(f"mask: expected {words_per_row(N_max)} words per row for N_max={N_max}, got {W}")
    if s.shape != (B, N_max) or s.dtype != torch.float64:
        raise ValueError(f"s: expected a float64 ({B}, {N_max}) tensor, got {s.dtype} {tuple(s.shape)}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths: expected shape ({B},), got {tuple(lengths.shape)}")
    dev = mask.device
    idx = torch.arange(B, device=dev) if idx is None else idx
    nb = idx.shape[0]
    if v.dtype != torch.float64 or v.dim() not in (2, 3) or tuple(v.shape[:2]) != (nb, N_max):
        raise ValueError(f"v: expected float64 ({nb}, {N_max}) or ({nb}, {N_max}, K), got {v.dtype} "
                         f"{tuple(v.shape)}")
    eps_t = torch.tensor([float(eps)], dtype=torch.float64, device=dev)
    return launch_matvec(mask, lengths.to(device=dev, dtype=torch.int32), s.contiguous(), eps_t,
                   idx.to(device=dev, dtype=torch.int32), v)
