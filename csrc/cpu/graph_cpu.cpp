#include "graph_cpu.h"

#include <cmath>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../ncut/exact.h"
#include "../ncut/graph.h"

namespace ncutfast {

namespace {

/// The largest T not above x: for v of type T, v > x (in double) iff v > round_down<T>(x), which keeps
/// a float32 comparison exact against a float64 tau.
template <typename T>
T round_down(double x) {
  T r = static_cast<T>(x);
  if (static_cast<double>(r) > x) r = std::nextafter(r, -std::numeric_limits<T>::infinity());
  return r;
}

/// Bits k of the result: src[k] * scale[k] > thr for k < count (scale null: src[k] > thr), one rounding in
/// T. `nan` counts NaN entries. The SIMD versions below compute the same decisions 4 or 2 at a time.
template <typename T>
uint64_t decide_scalar(const T* src, const T* scale, int64_t count, T thr, int64_t* nan) {
  uint64_t word = 0;
  for (int64_t k = 0; k < count; ++k) {
    const T v = scale ? src[k] * scale[k] : src[k];
    *nan += v != v;
    word |= static_cast<uint64_t>(v > thr) << k;
  }
  return word;
}

template <typename T>
uint64_t decide(const T* src, const T* scale, int64_t count, T thr, int64_t* nan) {
  return decide_scalar(src, scale, count, thr, nan);
}

#if defined(__SSE2__)
template <>
uint64_t decide<float>(const float* src, const float* scale, int64_t count, float thr, int64_t* nan) {
  const __m128 t = _mm_set1_ps(thr);
  uint64_t word = 0;
  int64_t k = 0;
  int unord = 0;
  for (; k + 4 <= count; k += 4) {
    __m128 v = _mm_loadu_ps(src + k);
    if (scale) v = _mm_mul_ps(v, _mm_loadu_ps(scale + k));
    word |= static_cast<uint64_t>(_mm_movemask_ps(_mm_cmpgt_ps(v, t))) << k;
    unord |= _mm_movemask_ps(_mm_cmpunord_ps(v, v));
  }
  if (unord) *nan += 1;
  if (k < count) word |= decide_scalar(src + k, scale ? scale + k : nullptr, count - k, thr, nan) << k;
  return word;
}

template <>
uint64_t decide<double>(const double* src, const double* scale, int64_t count, double thr, int64_t* nan) {
  const __m128d t = _mm_set1_pd(thr);
  uint64_t word = 0;
  int64_t k = 0;
  int unord = 0;
  for (; k + 2 <= count; k += 2) {
    __m128d v = _mm_loadu_pd(src + k);
    if (scale) v = _mm_mul_pd(v, _mm_loadu_pd(scale + k));
    word |= static_cast<uint64_t>(_mm_movemask_pd(_mm_cmpgt_pd(v, t))) << k;
    unord |= _mm_movemask_pd(_mm_cmpunord_pd(v, v));
  }
  if (unord) *nan += 1;
  if (k < count) word |= decide_scalar(src + k, scale ? scale + k : nullptr, count - k, thr, nan) << k;
  return word;
}
#endif

/// In-place transpose of a 64 x 64 bit matrix: bit j of a[i] (row i, column j) moves to bit i of a[j].
void transpose64(uint64_t* a) {
  uint64_t m = 0x00000000FFFFFFFFull;
  for (int j = 32; j != 0; j >>= 1, m ^= m << j) {
    for (int k = 0; k < 64; k = ((k | j) + 1) & ~j) {
      const uint64_t t = ((a[k] >> j) ^ a[k | j]) & m;
      a[k] ^= t << j;
      a[k | j] ^= t;
    }
  }
}

template <typename T>
int64_t pack_graph_impl(const T* s, int64_t batch, int64_t n_max, const int64_t* lengths, double tau,
                        uint64_t* bits) {
  const int64_t words = words_per_row(n_max);
  const T thr = round_down<T>(tau);
  int64_t nan = 0;
#pragma omp parallel for collapse(2) schedule(static) reduction(+ : nan)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < n_max; ++i) {
      const int64_t n = lengths[b];
      const T* row = s + (b * n_max + i) * n_max;
      uint64_t* out = bits + (b * n_max + i) * words;
      for (int64_t w = 0; w < words; ++w) {
        const int64_t count = i < n ? (n - 64 * w < 64 ? n - 64 * w : 64) : 0;
        out[w] = count > 0 ? decide<T>(row + 64 * w, nullptr, count, thr, &nan) : 0;
      }
    }
  }
  return nan;
}

/// Phase 2 of packing a block of rows [row0, row0 + rows) whose bits at columns >= row0 are written.
void mirror_block(uint64_t* bits, int64_t batch, int64_t n_max, int64_t row0, int64_t rows) {
  const int64_t words = words_per_row(n_max);
  const int64_t w0 = row0 / 64, w1 = (row0 + rows + 63) / 64;
  // By 64 x 64 tiles of bits: the diagonal tiles keep their upper triangle and mirror it; tile
  // (w, t), t > w, of the block's rows is transposed into tile (t, w) (rows below, block's columns). Tiles
  // read and written are disjoint, so the jobs run in parallel.
#pragma omp parallel for collapse(3) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t t = w0; t < words; ++t) {
        if (t < w) continue;
        uint64_t a[64];
        uint64_t* base = bits + b * n_max * words;
        const int64_t rmax = n_max - 64 * w < 64 ? n_max - 64 * w : 64;
        for (int64_t k = 0; k < 64; ++k) a[k] = k < rmax ? base[(64 * w + k) * words + t] : 0;
        if (t == w) {
          uint64_t upper[64];
          for (int k = 0; k < 64; ++k) {
            upper[k] = a[k] & (~0ull << k);
            a[k] &= k == 63 ? 0ull : ~0ull << (k + 1);  // strictly upper, to be mirrored
          }
          transpose64(a);
          for (int64_t k = 0; k < rmax; ++k) base[(64 * w + k) * words + w] = upper[k] | a[k];
        } else {
          transpose64(a);
          const int64_t tmax = n_max - 64 * t < 64 ? n_max - 64 * t : 64;
          for (int64_t k = 0; k < tmax; ++k) base[(64 * t + k) * words + w] = a[k];
        }
      }
    }
  }
}

template <typename T>
int64_t pack_block_impl(const T* s, int64_t batch, int64_t n_max, int64_t row0, int64_t rows, const T* inv,
                        const int64_t* lengths, double tau, uint64_t* bits) {
  const int64_t words = words_per_row(n_max);
  const int64_t cols = n_max - row0;
  const int64_t w0 = row0 / 64;
  int64_t nan = 0;
  // Phase 1: each row of the block, columns from row0 on, straight from its contiguous row of s (the part
  // left of the diagonal is overwritten in phase 2).
#pragma omp parallel for collapse(2) schedule(static) reduction(+ : nan)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = lengths[b], i = row0 + r;
      const T* row = s + (b * rows + r) * cols;  // row[j - row0] = S_ij
      const T* scale = inv ? inv + b * n_max : nullptr;
      const double si = inv ? static_cast<double>(scale[i < n ? i : 0]) : 1.0;
      // si = 0: a zero row (MaskCut's painted token) has cosine 0 with every row: an edge iff 0 > tau. Its
      // columns in the other rows are s_ij * 0 = 0 (s is finite), compared with tau / inv_i as any 0 is.
      const T inf = std::numeric_limits<T>::infinity();
      const T thr = si == 0 ? (tau < 0 ? -inf : inf) : round_down<T>(tau / si);
      uint64_t* out = bits + (b * n_max + i) * words;
      for (int64_t w = w0; w < words; ++w) {
        const int64_t count = i < n ? (n - 64 * w < 64 ? n - 64 * w : 64) : 0;
        out[w] = count > 0 ? decide<T>(row + (64 * w - row0), scale ? scale + 64 * w : nullptr, count, thr, &nan)
                           : 0;
      }
    }
  }
  mirror_block(bits, batch, n_max, row0, rows);
  return nan;
}


/// The float64 rows the exact recheck reads, made on demand from the input rows and the reference's norms:
/// f_q = double(k_q) / norm, the very division reference.normalize_rows performs.
template <typename T>
struct ExactRows {
  const T* k;
  const double* norms;
  int64_t c;
  void row(int64_t i, double* out) const {
    const T* src = k + i * c;
    for (int64_t q = 0; q < c; ++q) out[q] = static_cast<double>(src[q]) / norms[i];
  }
};

/// Decisions of up to 64 columns (j0, j0 + 1, ...) of row i of the exact graph. The screening value
/// v = s (times scale[j] when given) decides where it is outside [lo, hi] (which contain the row's
/// [tau - bound, tau + bound]); the others are recomputed in float64 and counted in `*rechecked`. Columns in
/// `skip` (left of the diagonal: mirrored later) are never rechecked. fi: row i's float64 values, filled on
/// first use (`*fi_ready`); fj: scratch for the other row.
template <typename T>
uint64_t decide_exact(const float* s, const float* scale, int64_t count, uint64_t skip, float lo, float hi,
                      const ExactRows<T>& rows, int64_t i, int64_t j0, double* fi, bool* fi_ready, double* fj,
                      double tau, double dot_bound, double dot2_bound, int64_t* rechecked) {
  uint64_t above = 0, unsure = 0;
  int64_t k = 0;
#if defined(__SSE2__)
  const __m128 vlo = _mm_set1_ps(lo), vhi = _mm_set1_ps(hi);
  for (; k + 4 <= count; k += 4) {
    __m128 v = _mm_loadu_ps(s + k);
    if (scale) v = _mm_mul_ps(v, _mm_loadu_ps(scale + k));
    const int gt = _mm_movemask_ps(_mm_cmpgt_ps(v, vhi));
    const int lt = _mm_movemask_ps(_mm_cmplt_ps(v, vlo));
    above |= static_cast<uint64_t>(gt) << k;
    unsure |= static_cast<uint64_t>(~(gt | lt) & 0xF) << k;
  }
#endif
  for (; k < count; ++k) {
    const float v = scale ? s[k] * scale[k] : s[k];
    above |= static_cast<uint64_t>(v > hi) << k;
    unsure |= static_cast<uint64_t>(!(v > hi) && !(v < lo)) << k;  // NaN is unsure too
  }
  unsure &= ~skip;
  *rechecked += __builtin_popcountll(unsure);
  if (unsure && !*fi_ready) {
    rows.row(i, fi);
    *fi_ready = true;
  }
  while (unsure) {
    const int j = __builtin_ctzll(unsure);
    rows.row(j0 + j, fj);
    above |= static_cast<uint64_t>(exact_edge(fi, fj, rows.c, tau, dot_bound, dot2_bound)) << j;
    unsure &= unsure - 1;
  }
  return above;
}

/// Smallest float >= x and largest float <= x, for x a finite double, widened by a relative 2^-50 first
/// (x itself carries one float64 rounding).
float float_above(double x) {
  x += std::fabs(x) * std::ldexp(1.0, -50);
  float r = static_cast<float>(x);
  if (static_cast<double>(r) < x) r = std::nextafter(r, std::numeric_limits<float>::infinity());
  return r;
}
float float_below(double x) { return -float_above(-x); }

template <typename T>
int64_t exact_norms_impl(const T* k, int64_t batch, int64_t n_max, int64_t c, const int64_t* lengths,
                         double* norms) {
  int64_t bad = 0;
#pragma omp parallel reduction(+ : bad)
  {
    std::vector<double> sq(static_cast<size_t>(c));
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < n_max; ++i) {
        if (i >= lengths[b]) {
          norms[b * n_max + i] = 1.0;
          continue;
        }
        const T* row = k + (b * n_max + i) * c;
        for (int64_t q = 0; q < c; ++q) {
          const double v = static_cast<double>(row[q]);
          bad += !std::isfinite(v);
          sq[q] = v * v;  // reference.normalize_rows: (f * f).sum(axis=1) on the float64 copy, then sqrt
        }
        const double norm = std::sqrt(numpy_pairwise_sum(sq.data(), c));
        norms[b * n_max + i] = norm > 1e-12 ? norm : 1e-12;  // np.maximum(norms, 1e-12)
      }
    }
  }
  return bad;
}

template <typename T>
void pack_exact_impl(const float* s, const float* scale, const T* k, int64_t c, const double* norms, int64_t batch,
                     int64_t n_max, int64_t row0, int64_t rows, const int64_t* lengths, double tau, double bound,
                     double dot_bound, double dot2_bound, uint64_t* bits, int64_t* rechecked) {
  const int64_t words = words_per_row(n_max);
  const int64_t cols = n_max - row0;
  const int64_t w0 = row0 / 64;
  const double margin = bound * (1.0 + std::ldexp(1.0, -40));
#pragma omp parallel
  {
    std::vector<double> fi(static_cast<size_t>(c)), fj(static_cast<size_t>(c));
#pragma omp for collapse(2) schedule(dynamic, 4)
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = lengths[b], i = row0 + r;
        const float* row = s + (b * rows + r) * cols;  // row[j - row0]: the screening product of (i, j)
        const float* sc = scale ? scale + b * n_max : nullptr;
        // With scale, v_ij = s_ij * scale_j estimates f_i . f_j * norm_i: the thresholds scale by norm_i.
        const double d = sc && i < n ? norms[b * n_max + i] : 1.0;
        const float hi = float_above((tau + margin) * d), lo = float_below((tau - margin) * d);
        const ExactRows<T> src{k + b * n_max * c, norms + b * n_max, c};
        uint64_t* out = bits + (b * n_max + i) * words;
        int64_t count_row = 0;
        bool fi_ready = false;
        // Words left of the diagonal's are mirrored from the block's upper part in phase 2; so are the bits
        // left of the diagonal in its word.
        for (int64_t w = w0; w < words; ++w) {
          const int64_t count = i < n && w >= i / 64 ? (n - 64 * w < 64 ? n - 64 * w : 64) : 0;
          const uint64_t skip = w == i / 64 ? (1ull << (i % 64)) - 1 : 0;
          out[w] = count > 0 ? decide_exact(row + (64 * w - row0), sc ? sc + 64 * w : nullptr, count, skip, lo, hi,
                                            src, i, 64 * w, fi.data(), &fi_ready, fj.data(), tau, dot_bound,
                                            dot2_bound, &count_row)
                             : 0;
        }
        if (count_row) {
#pragma omp atomic
          rechecked[b] += count_row;
        }
      }
    }
  }
  mirror_block(bits, batch, n_max, row0, rows);
}

}  // namespace

int64_t pack_graph_block_cpu(const void* s, DType dtype, int64_t batch, int64_t n_max, int64_t row0, int64_t rows,
                             const void* inv_norms, const int64_t* lengths, double tau, uint64_t* bits) {
  int64_t nan = 0;
  NCUT_DISPATCH_FLOAT(dtype, [&] {
    nan = pack_block_impl(static_cast<const scalar_t*>(s), batch, n_max, row0, rows,
                          static_cast<const scalar_t*>(inv_norms), lengths, tau, bits);
  });
  return nan;
}

int64_t pack_graph_cpu(const void* s, DType dtype, int64_t batch, int64_t n_max, const int64_t* lengths,
                       double tau, uint64_t* bits) {
  int64_t nan = 0;
  NCUT_DISPATCH_FLOAT(dtype, [&] {
    nan = pack_graph_impl(static_cast<const scalar_t*>(s), batch, n_max, lengths, tau, bits);
  });
  return nan;
}

int64_t exact_row_norms_cpu(const void* k, DType dtype, int64_t batch, int64_t n_max, int64_t c,
                            const int64_t* lengths, double* norms) {
  int64_t bad = 0;
  NCUT_DISPATCH_FLOAT(dtype, [&] {
    bad = exact_norms_impl(static_cast<const scalar_t*>(k), batch, n_max, c, lengths, norms);
  });
  return bad;
}

void pack_graph_block_exact_cpu(const float* s, const float* scale, const void* k, DType dtype, int64_t c,
                                const double* norms, int64_t batch, int64_t n_max, int64_t row0, int64_t rows,
                                const int64_t* lengths, double tau, double bound, double dot_bound,
                                double dot2_bound, uint64_t* bits, int64_t* rechecked) {
  NCUT_DISPATCH_FLOAT(dtype, [&] {
    pack_exact_impl(s, scale, static_cast<const scalar_t*>(k), c, norms, batch, n_max, row0, rows, lengths, tau,
                    bound, dot_bound, dot2_bound, bits, rechecked);
  });
}

int64_t find_stray_bits(const uint64_t* bits, int64_t batch, int64_t n_max, const int64_t* lengths) {
  const int64_t words = words_per_row(n_max);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = lengths[b];
    const int64_t last = (n - 1) / 64;  // the word holding column n - 1
    const uint64_t keep = n % 64 == 0 ? ~0ull : (1ull << (n % 64)) - 1;
    for (int64_t i = 0; i < n_max; ++i) {
      const uint64_t* row = bits + (b * n_max + i) * words;
      for (int64_t w = i < n ? last : 0; w < words; ++w) {
        const uint64_t allowed = i < n && w == last ? keep : 0;
        if (row[w] & ~allowed) return b;
      }
    }
  }
  return -1;
}

}  // namespace ncutfast
