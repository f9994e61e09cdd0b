#include "graph_cpu.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
// The int16 screen's AVX2 kernel is compiled for AVX2 whatever the build's -march and chosen at run time.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define NCUTFAST_X86_SIMD 1
#include <immintrin.h>
#else
#define NCUTFAST_X86_SIMD 0
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

/// The int16 screen (ncutfast.exact, step 2): q = clamp(rint(f * 2^15), +-32767) of the float64 rows
/// f = k / norms, and err_i >= ||f_i - q_i 2^-15||_2 rounded upwards.
template <typename T>
void exact_quantize_impl(const T* k, int64_t batch, int64_t n_max, int64_t c, const int64_t* lengths,
                         const double* norms, int16_t* q, int64_t cq, double* err) {
  const double widen = 1.0 + static_cast<double>(c + 4) * std::ldexp(1.0, -52);
  const double underflow = static_cast<double>(c) * std::ldexp(1.0, -1074);
#pragma omp parallel
  {
    std::vector<double> buf(static_cast<size_t>(c));
    double* f = buf.data();
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < n_max; ++i) {
        int16_t* out = q + (b * n_max + i) * cq;
        if (i >= lengths[b]) {
          std::fill(out, out + cq, int16_t{0});
          err[b * n_max + i] = 0.0;
          continue;
        }
        const T* row = k + (b * n_max + i) * c;
        const double norm = norms[b * n_max + i];
        for (int64_t p = 0; p < c; ++p) f[p] = static_cast<double>(row[p]) / norm;
        int64_t p = 0;
#if defined(__SSE2__)
        // the loop below, two at a time (the compiler does not vectorize its clamp: it cannot assume no NaN)
        for (; p + 2 <= c; p += 2) {
          const __m128d x = _mm_loadu_pd(f + p), m = _mm_set1_pd(0x1.8p52);
          __m128d v = _mm_sub_pd(_mm_add_pd(_mm_mul_pd(x, _mm_set1_pd(32768.0)), m), m);
          v = _mm_min_pd(_mm_max_pd(v, _mm_set1_pd(-32767.0)), _mm_set1_pd(32767.0));
          const __m128i w = _mm_cvttpd_epi32(v);  // two int32 in the low half
          const int32_t lo = _mm_cvtsi128_si32(w), hi = _mm_cvtsi128_si32(_mm_srli_si128(w, 4));
          out[p] = static_cast<int16_t>(lo);
          out[p + 1] = static_cast<int16_t>(hi);
          const __m128d e = _mm_sub_pd(x, _mm_mul_pd(v, _mm_set1_pd(1.0 / 32768.0)));
          _mm_storeu_pd(f + p, _mm_mul_pd(e, e));
        }
#endif
        for (; p < c; ++p) {
          // f * 2^15 is exact; adding and subtracting 1.5 * 2^52 rounds it to the nearest integer (ties to
          // even) for |f * 2^15| < 2^51, and unlike nearbyint it vectorizes
          const double v = std::min(std::max((f[p] * 32768.0 + 0x1.8p52) - 0x1.8p52, -32767.0), 32767.0);
          out[p] = static_cast<int16_t>(v);
          const double e = f[p] - v * (1.0 / 32768.0);  // exact (exact.py, step 2)
          f[p] = e * e;
        }
        for (int64_t p = c; p < cq; ++p) out[p] = 0;
        const double sq = numpy_pairwise_sum(f, c);  // any order will do; this one has 8 partial sums
        err[b * n_max + i] = std::sqrt(sq * widen + underflow) * (1.0 + std::ldexp(1.0, -50));
      }
    }
  }
}

constexpr int kTileRows = 6;    // rows i of a register tile
constexpr int kTileCols = 16;   // columns j of a register tile (one B panel)
constexpr int kBlockTiles = 8;  // row tiles per scheduled task: 48 rows share each B panel
constexpr int64_t kChunkPairs = 128;  // channel pairs per pass: an 8 KiB slice of the panel stays in L1

/// One 6 x 16 tile of int32 sums.
using TileAcc = int32_t[kTileRows][kTileCols];

/// acc[r][m] += sum_p a[r][p] * panel[p / 2][m][p % 2] over the channels p < 2 kp of this pass: int16
/// products summed in int32, exact (exact.py step 2).
void tile_scalar(const int16_t* const a[kTileRows], const int16_t* panel, int64_t kp, TileAcc& acc) {
  for (int64_t t = 0; t < kp; ++t) {
    const int16_t* bp = panel + t * 2 * kTileCols;
    for (int r = 0; r < kTileRows; ++r) {
      const int32_t a0 = a[r][2 * t], a1 = a[r][2 * t + 1];
      for (int m = 0; m < kTileCols; ++m) acc[r][m] += a0 * bp[2 * m] + a1 * bp[2 * m + 1];
    }
  }
}

#if NCUTFAST_X86_SIMD
/// tile_scalar with AVX2: vpmaddwd multiplies a broadcast pair of row r's channels with 8 columns x 2
/// channels of the panel and adds the pairs into 8 int32 lanes; twelve named accumulators hold the tile
/// (an array of vectors indexed in loops gets spilled to the stack by GCC).
__attribute__((target("avx2"))) void tile_avx2(const int16_t* const a[kTileRows], const int16_t* panel, int64_t kp,
                                               TileAcc& acc) {
#define NCUTFAST_LD(r, h) _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&acc[r][8 * (h)]))
  __m256i c00 = NCUTFAST_LD(0, 0), c01 = NCUTFAST_LD(0, 1), c10 = NCUTFAST_LD(1, 0), c11 = NCUTFAST_LD(1, 1),
          c20 = NCUTFAST_LD(2, 0), c21 = NCUTFAST_LD(2, 1), c30 = NCUTFAST_LD(3, 0), c31 = NCUTFAST_LD(3, 1),
          c40 = NCUTFAST_LD(4, 0), c41 = NCUTFAST_LD(4, 1), c50 = NCUTFAST_LD(5, 0), c51 = NCUTFAST_LD(5, 1);
#undef NCUTFAST_LD
  const int16_t *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
  for (int64_t t = 0; t < kp; ++t) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + t * 2 * kTileCols));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + t * 2 * kTileCols + 16));
#define NCUTFAST_ROW(ar, x0, x1)                          \
  {                                                       \
    int32_t pair;                                         \
    std::memcpy(&pair, (ar) + 2 * t, sizeof pair);        \
    const __m256i av = _mm256_set1_epi32(pair);           \
    x0 = _mm256_add_epi32(x0, _mm256_madd_epi16(av, b0)); \
    x1 = _mm256_add_epi32(x1, _mm256_madd_epi16(av, b1)); \
  }
    NCUTFAST_ROW(a0, c00, c01)
    NCUTFAST_ROW(a1, c10, c11)
    NCUTFAST_ROW(a2, c20, c21)
    NCUTFAST_ROW(a3, c30, c31)
    NCUTFAST_ROW(a4, c40, c41)
    NCUTFAST_ROW(a5, c50, c51)
#undef NCUTFAST_ROW
  }
#define NCUTFAST_ST(r, v0, v1)                                               \
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(&acc[r][0]), v0);           \
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(&acc[r][8]), v1);
  NCUTFAST_ST(0, c00, c01)
  NCUTFAST_ST(1, c10, c11)
  NCUTFAST_ST(2, c20, c21)
  NCUTFAST_ST(3, c30, c31)
  NCUTFAST_ST(4, c40, c41)
  NCUTFAST_ST(5, c50, c51)
#undef NCUTFAST_ST
}
#endif

template <typename T>
void exact_graph_impl(const int16_t* q, int64_t cq, const T* k, int64_t c, const double* norms, int64_t batch,
                      int64_t n_max, const int64_t* lengths, double tau, double bound, double dot_bound,
                      double dot2_bound, uint64_t* bits, int64_t* rechecked, bool simd) {
  const int64_t words = words_per_row(n_max);
  const int64_t kp = cq / 2;
  const int64_t panels = (n_max + kTileCols - 1) / kTileCols;
  const int64_t blocks = (n_max + kTileRows * kBlockTiles - 1) / (kTileRows * kBlockTiles);
  // Integer thresholds on acc = q_i . q_j = 2^30 s~_ij: acc > hi implies s~ > tau + bound, acc < lo implies
  // s~ < tau - bound (the doubles are rounded outwards, then scaled exactly by 2^30).
  const double up = std::ldexp(std::nextafter(tau + bound, HUGE_VAL), 30);
  const double down = std::ldexp(std::nextafter(tau - bound, -HUGE_VAL), 30);
  // Thresholds beyond the int32 range are clamped to it: |acc| < 2^31, so a clamped hi (lo) still never
  // calls an entry above (below) wrongly; at worst it is left to the recheck.
  auto to_int32 = [](double x) {
    return x >= 2147483647.0 ? INT32_MAX : x <= -2147483648.0 ? INT32_MIN : static_cast<int32_t>(x);
  };
  const int32_t hi = to_int32(std::floor(up)), lo = to_int32(std::ceil(down));
  auto tile = tile_scalar;
#if NCUTFAST_X86_SIMD
  if (simd && __builtin_cpu_supports("avx2")) tile = tile_avx2;
#else
  (void)simd;
#endif
  // The B operand: per problem, panels of 16 rows of q with channel pairs interleaved
  // (panel[t][m][0..1] = q[16 p + m][2 t .. 2 t + 1]), zero beyond n_max.
  std::vector<int16_t> packed(static_cast<size_t>(batch * panels * kTileCols * cq));
  const std::vector<int16_t> zero_row(static_cast<size_t>(cq), 0);
#pragma omp parallel
  {
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t p = 0; p < panels; ++p) {
        int16_t* dst = packed.data() + (b * panels + p) * kTileCols * cq;
        for (int m = 0; m < kTileCols; ++m) {
          const int64_t j = p * kTileCols + m;
          const int16_t* src = j < n_max ? q + (b * n_max + j) * cq : zero_row.data();
          for (int64_t t = 0; t < kp; ++t) {
            dst[(t * kTileCols + m) * 2] = src[2 * t];
            dst[(t * kTileCols + m) * 2 + 1] = src[2 * t + 1];
          }
        }
        for (int64_t i = p * kTileCols; i < n_max && i < (p + 1) * kTileCols; ++i)
          std::fill(bits + (b * n_max + i) * words, bits + (b * n_max + i + 1) * words, uint64_t{0});
      }
    std::vector<double> fi(static_cast<size_t>(c)), fj(static_cast<size_t>(c));
    TileAcc acc[kBlockTiles];
    // Tasks (problem, block of 48 rows) in order of decreasing work; every tile on or right of the diagonal.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < batch * blocks; ++task) {
      const int64_t blk = task % blocks, b = task / blocks;
      const int64_t n = lengths[b], row0 = blk * kTileRows * kBlockTiles;
      if (row0 >= n) continue;
      const ExactRows<T> src{k + b * n_max * c, norms + b * n_max, c};
      const int16_t* a[kBlockTiles][kTileRows];
      for (int tr = 0; tr < kBlockTiles; ++tr)
        for (int r = 0; r < kTileRows; ++r) {
          const int64_t i = row0 + tr * kTileRows + r;
          a[tr][r] = i < n ? q + (b * n_max + i) * cq : zero_row.data();
        }
      int64_t fi_row = -1, count = 0;
      for (int64_t p = row0 / kTileCols; p * kTileCols < n; ++p) {
        const int16_t* panel = packed.data() + (b * panels + p) * kTileCols * cq;
        const int64_t j0 = p * kTileCols;
        // tiles of the block within the problem and not left of the diagonal
        int tiles = 0;
        while (tiles < kBlockTiles && row0 + tiles * kTileRows < n && row0 + tiles * kTileRows < j0 + kTileCols)
          ++tiles;
        std::memset(acc, 0, sizeof(TileAcc) * static_cast<size_t>(tiles));
        for (int64_t t0 = 0; t0 < kp; t0 += kChunkPairs) {
          const int64_t len = kp - t0 < kChunkPairs ? kp - t0 : kChunkPairs;
          for (int tr = 0; tr < tiles; ++tr) {
            const int16_t* at[kTileRows];
            for (int r = 0; r < kTileRows; ++r) at[r] = a[tr][r] + 2 * t0;
            tile(at, panel + t0 * 2 * kTileCols, len, acc[tr]);
          }
        }
        for (int tr = 0; tr < tiles; ++tr) {
          for (int r = 0; r < kTileRows && row0 + tr * kTileRows + r < n; ++r) {
            const int64_t i = row0 + tr * kTileRows + r;
            uint32_t above = 0, unsure = 0;
            for (int m = 0; m < kTileCols; ++m) {
              const int32_t v = acc[tr][r][m];
              above |= static_cast<uint32_t>(v > hi) << m;
              unsure |= static_cast<uint32_t>(v >= lo && v <= hi) << m;
            }
            // columns j >= i within the problem (those left of the diagonal are mirrored below)
            uint32_t keep = n - j0 >= kTileCols ? 0xFFFFu : (1u << (n - j0)) - 1u;
            if (i > j0) keep &= ~((1u << (i - j0)) - 1u);
            above &= keep;
            unsure &= keep;
            count += __builtin_popcount(unsure);
            if (unsure && fi_row != i) {
              src.row(i, fi.data());
              fi_row = i;
            }
            for (; unsure; unsure &= unsure - 1) {
              const int m = __builtin_ctz(unsure);
              src.row(j0 + m, fj.data());
              above |= static_cast<uint32_t>(exact_edge(fi.data(), fj.data(), c, tau, dot_bound, dot2_bound)) << m;
            }
            bits[(b * n_max + i) * words + j0 / 64] |= static_cast<uint64_t>(above) << (j0 % 64);
          }
        }
      }
      if (count) {
#pragma omp atomic
        rechecked[b] += count;
      }
    }
  }
  mirror_block(bits, batch, n_max, 0, n_max);
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

void exact_quantize_cpu(const void* k, DType dtype, int64_t batch, int64_t n_max, int64_t c, const int64_t* lengths,
                        const double* norms, int16_t* q, int64_t cq, double* err) {
  NCUT_DISPATCH_FLOAT(dtype, [&] {
    exact_quantize_impl(static_cast<const scalar_t*>(k), batch, n_max, c, lengths, norms, q, cq, err);
  });
}

void exact_graph_cpu(const int16_t* q, int64_t cq, const void* k, DType dtype, int64_t c, const double* norms,
                     int64_t batch, int64_t n_max, const int64_t* lengths, double tau, double bound, double dot_bound,
                     double dot2_bound, uint64_t* bits, int64_t* rechecked, bool simd) {
  NCUT_DISPATCH_FLOAT(dtype, [&] {
    exact_graph_impl(q, cq, static_cast<const scalar_t*>(k), c, norms, batch, n_max, lengths, tau, bound, dot_bound,
                     dot2_bound, bits, rechecked, simd);
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
