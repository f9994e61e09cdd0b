#include "graph_cpu.h"

#include "../ncut/graph.h"

namespace ncutfast {

namespace {

template <typename T>
void pack_graph_impl(const T* s, int64_t batch, int64_t n_max, const int64_t* lengths, double tau,
                     uint64_t* bits) {
  const int64_t words = words_per_row(n_max);
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < n_max; ++i) {
      const int64_t n = lengths[b];
      const T* row = s + (b * n_max + i) * n_max;
      uint64_t* out = bits + (b * n_max + i) * words;
      for (int64_t w = 0; w < words; ++w) out[w] = i < n ? pack_word(row, 64 * w, n, tau) : 0;
    }
  }
}

template <typename T>
void pack_block_impl(const T* s, int64_t batch, int64_t n_max, int64_t row0, int64_t rows, const int64_t* lengths,
                     double tau, uint64_t* bits) {
  const int64_t words = words_per_row(n_max);
  const int64_t cols = n_max - row0;
  const int64_t row1 = row0 + rows;
  // The block's own rows, columns from row0 on: S_ij from row i where j >= i, from row j (also in the
  // block) where row0 <= j < i.
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = lengths[b], i = row0 + r;
      const T* sb = s + b * rows * cols;
      uint64_t* out = bits + (b * n_max + i) * words;
      for (int64_t w = row0 / 64; w < words; ++w) {
        uint64_t word = 0;
        const int64_t hi = 64 * w + 64 < n ? 64 * w + 64 : n;
        for (int64_t j = 64 * w; i < n && j < hi; ++j) {
          const T v = j >= i ? sb[r * cols + (j - row0)] : sb[(j - row0) * cols + r];
          word |= static_cast<uint64_t>(is_edge(v, tau)) << (j - 64 * w);
        }
        out[w] = word;
      }
    }
  }
  // The mirror: rows j >= row1 at the block's columns, by tiles of 64 x 64 so that the column reads of s
  // stay in L1. row1 is a multiple of 64 whenever such rows exist.
  const int64_t tiles = (n_max - row1 + 63) / 64;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n = lengths[b];
      const T* sb = s + b * rows * cols;
      const int64_t j0 = row1 + 64 * t, j1 = j0 + 64 < n_max ? j0 + 64 : n_max;
      for (int64_t w = row0 / 64; w < row1 / 64; ++w) {
        for (int64_t j = j0; j < j1; ++j) {
          uint64_t word = 0;
          for (int64_t ii = 0; j < n && ii < 64 && 64 * w + ii < n; ++ii)
            word |= static_cast<uint64_t>(is_edge(sb[(64 * w + ii - row0) * cols + (j - row0)], tau)) << ii;
          bits[(b * n_max + j) * words + w] = word;
        }
      }
    }
  }
}

}  // namespace

void pack_graph_block_cpu(const void* s, DType dtype, int64_t batch, int64_t n_max, int64_t row0, int64_t rows,
                          const int64_t* lengths, double tau, uint64_t* bits) {
  NCUT_DISPATCH_FLOAT(dtype, [&] {
    pack_block_impl(static_cast<const scalar_t*>(s), batch, n_max, row0, rows, lengths, tau, bits);
  });
}

void pack_graph_cpu(const void* s, DType dtype, int64_t batch, int64_t n_max, const int64_t* lengths, double tau,
                    uint64_t* bits) {
  NCUT_DISPATCH_FLOAT(dtype, [&] {
    pack_graph_impl(static_cast<const scalar_t*>(s), batch, n_max, lengths, tau, bits);
  });
}

}  // namespace ncutfast
