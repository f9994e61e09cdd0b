r"""Precision "exact": the float64 reference graph from a low-precision product, with certified decisions.

Every graph edge is one decision, ``s_ij > tau``. Most similarities lie far from tau, so a cheap product
with a rigorous error bound decides them, and only the few within the bound are recomputed in float64.

What is guaranteed
------------------
Let ``f`` be the rows normalized in float64 exactly as ``reference.normalize_rows`` computes them (the CPU
extension and ``normalized_rows`` reproduce NumPy's pairwise sum of squares and its correctly rounded sqrt
bit for bit, on every backend) and ``s*_ij = f_i . f_j`` the **exact**
real dot product of those float64 rows. The exact mode's graph is ``B_ij = [s*_ij > tau]`` (strict), with
one convention: an entry with ``|s*_ij - tau| <= dot2_bound`` (below 1e-25 for C <= 4096; in practice only
exact ties ``s*_ij == tau``) counts as a tie, i.e. no edge.

The reference computes ``S = f @ f.T`` in float64 with its BLAS's summation order, whose own error is up to
``gamma_C^(64) |f_i| |f_j|`` (about C * 1.1e-16). Hence the exact graph equals the reference's graph at
every entry except where the reference's own rounding decides: ``|s*_ij - tau| <= dot_bound(C)``. Inside
that band the reference's graph is an artefact of its BLAS (a different BLAS or thread count may flip it);
there the exact mode keeps the exact decision. Every entry whose float64 products and sums are exact (ties
built from exactly representable data, e.g. ``k = (3, 4)`` against ``(1, 0)`` at ``tau = 0.6``) is decided
exactly as the reference does, strict ``>`` included.

The bounds (u_p = 2^-p is the unit roundoff of a p-bit significand; gamma_n(u) = n u / (1 - n u))
-------------------------------------------------------------------------------------------------
1. Normalized rows. With sigma = fl(sum k_q^2) = ||k||^2 (1 + theta), |theta| <= gamma_C(u_53), the
   computed norm and the C divisions give ``||f|| <= (1 + u)/((1 - u) sqrt(1 - gamma_C)) <= nu`` with
   ``nu = 1 + (C + 4) u_53`` (``norm_bound``). Clamped rows (norm < 1e-12) are shorter still.
2. CPU screen (``int16_error_bound``), an exact integer product. The extension quantizes each row to
   q_i = clamp(rint(f_i 2^15), -32767, 32767) (int16) and forms e_i = f_i - q~_i with q~_i = 2^-15 q_i;
   e_i is exact (q_k = 0: e_k = f_k; an unclamped q_k != 0 needs |f_k| > 2^-16, so f_k and q~_k are
   multiples of 2^-68 at most 2^-16 apart; a clamped one, |f_k| in [1 - 2^-16, nu], multiples of 2^-53
   less than 2^-14 apart: 52 significant bits either way). Its
   norm bound err_i >= ||e_i|| is the float64 sum of squares (any order) times 1 + (C + 4) 2^-52 (C + 1
   roundings), plus C 2^-1074 (squares that underflow), whose sqrt is then raised by a relative 2^-50.
   The screen is a_ij = q_i . q_j summed in int32: every |q_k| <= 32767 keeps each pair sum of vpmaddwd
   below 2^31, and every partial sum is at most sum|q_ik q_jk| <= ||q_i|| ||q_j|| <= 2^30 (nu + err)^2,
   below 2^31 while nu + err < sqrt(2) (err = max_i err_i; checked). So a_ij is exact, and

       |2^-30 a_ij - s*| = |e_i . f_j + q~_i . e_j| <= err nu + (nu + err) err = err (2 nu + err)

   (``int16_error_bound``, raised by a relative 2^-50 for its own float64 evaluation). For rows of C
   features err is about sqrt(C / 12) 2^-15 (2.6e-4 at C = 768, at most sqrt(C) 2^-16 plus clamping):
   a bound about 10 times the float32 product's, from a product that runs at twice the float32 FMA rate
   (16 multiply-adds per AVX2 vpmaddwd against 8 per FMA). The kernel uses ``SCREEN_MARGIN`` times it
   (``int16_screen_bound``), as integer thresholds hi = floor(2^30 up(tau + B)) and
   lo = ceil(2^30 down(tau - B)) (up/down: the next float64 outwards), so a_ij > hi proves s* > tau and
   a_ij < lo proves s* < tau exactly; the entries in between go to the recheck.
2'. GPU screen (``tensor_core_bound``, the Triton kernel): h = fl16(f) (through float32, as torch converts:
   |h_q - f_q| <= u |f_q| + eta with u = 2^-11 + 2^-23 and eta = 2^-25 for fp16 subnormals), one
   tensor-core product with fp32 accumulation. Tensor cores add products with truncation and fewer
   alignment bits than IEEE fp32, so the accumulation is charged gamma_C(2^-21) (8 times float32's
   unit roundoff) over sum|h_i h_j| <= ((1 + u) nu + eta sqrt(C))^2; the inputs cost
   u (2 + u) nu^2 + eta (2 + u) sqrt(C) nu + C eta^2 (Cauchy-Schwarz on the absolute part). For C = 768
   that is 1.4e-3: splitting f into hi + lo fp16 parts (three products) would shrink only the input term
   while the accumulation term (3.7e-4) stays, so one product is the cheaper screen; the float64 recheck
   of the few percent it leaves is cheap on a GPU.
3. Recheck, stage 1 (``dot_bound``): a float64 dot in any order is within ``gamma_C(u_53) nu^2`` of s*; the
   subtraction of tau rounds once more (relative u_53), and products below 2^-1022 lose at most 2^-1074
   each. An entry is decided when ``|fl(dot) - tau|`` exceeds twice that.
4. Recheck, stage 2 (``dot2_bound``): Dot2 (Ogita, Rump, Oishi 2005) of the C + 1 terms (the products and
   -tau) gives res with ``|res - (s* - tau)| <= u_53 |s* - tau| + gamma_{C+1}(u_53)^2 (nu^2 + |tau|)``, so
   ``res > E`` (E the second term) implies ``s* > tau`` and ``res < -E`` implies ``s* < tau``. Twice E
   (plus the underflow term) is the tie band of the convention above.

5. The same screen certifies precision "float32" on the GPU (``float32_screen_bound``). There the graph is
   ``[fl32(g_i . g_j) > tau]`` with g the float32-normalized rows (``||g|| <= 1 + (C + 4) 2^-24``, step 1's
   argument with u_24: ``float32_norm_bound``) and fl32 one fixed order: the products rounded to float32 and
   added sequentially over the features, no FMA. The screen h = fl16(g) errs by at most step 2''s bound with
   that norm, and any float32 summation of the C products errs by at most ``gamma_C(2^-24) ||g||^2`` plus
   2^-149 per underflowing product, so |screen - fl32(g_i . g_j)| <= the sum (``float32_screen_error_bound``);
   entries within twice it are recomputed in that order.

The fraction of entries (pairs i <= j of each image) that the screen leaves to the recheck is reported per
image (``NcutResult.recheck_fraction``).
"""

from __future__ import annotations

import numpy as np
import torch

from . import reference

__all__ = ["SCREEN_MARGIN", "norm_bound", "int16_error_bound", "int16_screen_bound", "tensor_core_error_bound",
           "tensor_core_bound", "float32_norm_bound", "float32_screen_error_bound", "float32_screen_bound",
           "dot_bound", "dot2_bound",
           "normalized_rows", "recheck", "recheck_fraction", "exact_mask"]

_U64 = 2.0**-53
_U32 = 2.0**-24
_ETA64 = 2.0**-1074  # float64 absolute error per underflowing product
#: Factor between the proven screening bound and the one the kernels use.
SCREEN_MARGIN = 2.0
#: The int16 screen's integer products stay below 2^31 while ||q_i|| 2^-15 <= nu + err < sqrt(2) (step 2).
_INT16_ERR_MAX = 2.0**0.5


def _gamma(n: int, u: float) -> float:
    if n * u >= 0.5:
        raise ValueError(f"c: {n} features are too many for the exact mode's bounds (n u = {n * u:.3g})")
    return n * u / (1.0 - n * u)


def norm_bound(c: int) -> float:
    """Bound nu on the 2-norm of a float64-normalized row of ``c`` features (derivation step 1)."""
    return 1.0 + (c + 4) * _U64


def int16_error_bound(c: int, err: float) -> float:
    """Proven bound on the int16 screen's error |2^-30 q_i . q_j - f_i . f_j| (step 2) when every row's
    quantization error has 2-norm <= ``err`` (``exact_quantize_cpu``'s per-row bounds, maximised)."""
    nu = norm_bound(c)
    if not 0.0 <= err < _INT16_ERR_MAX - nu:
        raise ValueError(f"err: the int16 screen needs 0 <= err < {_INT16_ERR_MAX - nu:.3g}, got {err!r}")
    return err * (2.0 * nu + err) * (1.0 + 2.0**-50)


def int16_screen_bound(c: int, err: float) -> float:
    """The int16 screening bound the CPU kernel uses: ``SCREEN_MARGIN * int16_error_bound(c, err)``."""
    return SCREEN_MARGIN * int16_error_bound(c, err)


def _tensor_core_error(c: int, nu: float) -> float:
    """Step 2''s bound for rows of 2-norm at most ``nu`` rounded to fp16 and multiplied on tensor cores."""
    u = 2.0**-11 + 2.0**-23  # fp16 rounding, after torch's double -> float -> half conversion
    eta, acc = 2.0**-25, 2.0**-21  # fp16 subnormal half-spacing; tensor-core accumulation unit (8 u_24)
    root = c**0.5
    inputs = u * (2.0 + u) * nu**2 + eta * (2.0 + u) * root * nu + c * eta**2
    return inputs + _gamma(c, acc) * ((1.0 + u) * nu + eta * root) ** 2


def tensor_core_error_bound(c: int) -> float:
    """Proven bound on the GPU screen's error |fl_tc(h_i . h_j) - f_i . f_j|, h = fl16(f) (step 2')."""
    return _tensor_core_error(c, norm_bound(c))


def tensor_core_bound(c: int) -> float:
    """The GPU screening bound the Triton kernel uses: ``SCREEN_MARGIN * tensor_core_error_bound(c)``."""
    return SCREEN_MARGIN * tensor_core_error_bound(c)


def float32_norm_bound(c: int) -> float:
    """Bound on the 2-norm of a row normalized in float32 (``kernels.affinity.normalize_fwd``; step 5)."""
    return 1.0 + (c + 4) * _U32


def float32_screen_error_bound(c: int) -> float:
    """Proven bound on |fl_tc(h_i . h_j) - fl32(g_i . g_j)|, h = fl16(g), g the float32-normalized rows and
    fl32 any float32 summation order of the C products (step 5)."""
    nu = float32_norm_bound(c)
    return _tensor_core_error(c, nu) + _gamma(c, _U32) * nu**2 + c * 2.0**-149


def float32_screen_bound(c: int) -> float:
    """The float32 screening bound the Triton kernels use: ``SCREEN_MARGIN * float32_screen_error_bound(c)``."""
    return SCREEN_MARGIN * float32_screen_error_bound(c)


def dot_bound(c: int) -> float:
    """Stage-1 recheck: |fl64(f_i . f_j) - tau| beyond this decides the entry (step 3)."""
    return 2.0 * (_gamma(c, _U64) * norm_bound(c) ** 2 * (1.0 + 2.0 * _U64) + c * _ETA64)


def dot2_bound(c: int, tau: float) -> float:
    """Stage-2 recheck: Dot2's result beyond this decides the entry; within it is a tie (step 4)."""
    g = _gamma(c + 1, _U64)
    return 2.0 * (g * g * (norm_bound(c) ** 2 + abs(tau)) + (c + 1) * _ETA64)


def _pairwise_sum(sq: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis in NumPy's pairwise order (``numpy/_core/src/umath/loops_utils.h.src``,
    blocks of 128, 8 partial sums), so float64 rounding is NumPy's bit for bit, on any device."""
    n = sq.shape[-1]
    if n < 8:
        res = torch.zeros(sq.shape[:-1], dtype=sq.dtype, device=sq.device)
        for i in range(n):
            res = res + sq[..., i]
        return res
    if n <= 128:
        r = sq[..., :8]
        for i in range(8, n - n % 8, 8):
            r = r + sq[..., i : i + 8]
        res = ((r[..., 0] + r[..., 1]) + (r[..., 2] + r[..., 3])) + ((r[..., 4] + r[..., 5]) + (r[..., 6] + r[..., 7]))
        for i in range(n - n % 8, n):
            res = res + sq[..., i]
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_sum(sq[..., :n2]) + _pairwise_sum(sq[..., n2:])


def normalized_rows(feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``reference.normalize_rows`` of each image, bit for bit, on the features' device: float64
    ``(B, N, C)``, padding rows zeroed. ``feats`` must be finite within the lengths."""
    k = feats.to(torch.float64)
    valid = torch.arange(k.shape[1], device=k.device)[None, :] < lengths.to(k.device)[:, None]
    k = torch.where(valid[:, :, None], k, torch.zeros((), dtype=k.dtype, device=k.device))
    # NumPy's sqrt on the host: torch's CPU sqrt of float64 is not always correctly rounded (1 ulp seen)
    sq = _pairwise_sum(k * k).cpu().numpy()
    norms = torch.from_numpy(np.sqrt(sq)).to(k.device).clamp_min(reference.NORM_EPS)
    return k / norms[..., None]


def _two_prod(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dekker's TwoProduct (Veltkamp split, no fma): h + r == a * b exactly for |a|, |b| <= 1."""
    def split(x):
        t = x * 134217729.0  # 2^27 + 1
        hi = t - (t - x)
        return hi, x - hi

    h = a * b
    ah, al = split(a)
    bh, bl = split(b)
    r = al * bl - (((h - ah * bh) - al * bh) - ah * bl)
    return h, r


def recheck(fa: torch.Tensor, fb: torch.Tensor, tau: float) -> torch.Tensor:
    """Exact decisions ``[f_a . f_b > tau]`` for gathered float64 row pairs ``fa, fb`` ``(K, C)`` -> bool ``(K,)``.

    The same two stages as ``csrc/ncut/exact.h``'s ``exact_edge`` (float64 dot, then Dot2 where it cannot
    decide; ties within ``dot2_bound`` are no edge).
    """
    c = fa.shape[-1]
    d = (fa * fb).sum(-1) - tau
    out = d > dot_bound(c)
    unsure = (d.abs() <= dot_bound(c)).nonzero().flatten()
    if unsure.numel():
        a, b = fa[unsure], fb[unsure]
        h, r = _two_prod(a, b)
        p = torch.full((unsure.numel(),), -tau, dtype=torch.float64, device=fa.device)
        s = torch.zeros_like(p)
        for q in range(c):  # TwoSum chain: sequential over features, vectorized over the pairs
            x = p + h[:, q]
            z = x - p
            s = s + ((p - (x - z)) + (h[:, q] - z)) + r[:, q]
            p = x
        out[unsure] = (p + s) > dot2_bound(c, tau)
    return out


def exact_mask(f: torch.Tensor, lengths: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact graph of float64 rows ``f`` ``(B, N, C)``: bool ``(B, N, N)`` mask (False on padding) and the
    per-image recheck fraction float64 ``(B,)``. The screen is the float64 product with ``dot_bound``."""
    n = f.shape[1]
    s = torch.bmm(f, f.transpose(1, 2))
    valid = torch.arange(n, device=f.device)[None, :] < lengths.to(f.device)[:, None]
    pair = valid[:, :, None] & valid[:, None, :]
    bound = dot_bound(f.shape[2])
    upper = pair & torch.ones(n, n, dtype=torch.bool, device=f.device).triu()
    mask = (s - tau > bound) & upper
    unsure = ((s - tau).abs() <= bound) & upper
    bi, ii, jj = unsure.nonzero(as_tuple=True)
    if bi.numel():
        mask[bi, ii, jj] = recheck(f[bi, ii], f[bi, jj], tau)
    mask = mask | mask.transpose(1, 2)  # only S_ij with i <= j decides: exactly symmetric
    return mask, recheck_fraction(unsure.sum((1, 2)), lengths)


def recheck_fraction(counts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Rechecked entries per image ``(B,)`` as a fraction of its n (n + 1) / 2 pairs i <= j: float64
    ``(B,)`` on ``counts``' device."""
    ln = lengths.to(counts.device, torch.float64)
    return counts.to(torch.float64) / (ln * (ln + 1) / 2)
