// The TokenCut graph, written once for the CPU and CUDA launchers (spec: shared/spec/tokencut.md §2).
//
// Binary graph: W = eps * 1 1^T + (1 - eps) * B with B_ij = [S_ij > tau] (numerics.md), so one bit per
// entry carries the whole graph. Bits are packed row-major: row i of problem b is `words` uint64 words,
// bit (j % 64) of word (j / 64) is B_ij, and every bit at or beyond the problem's length is zero.
// Non-binary graph (TokenCut's --no-binary-graph ablation): W_ij = S_ij, except eps where S_ij < tau.
#pragma once

#include "../common.h"

namespace ncutfast {

/// Number of uint64 words of one packed row of n columns.
NCUT_HD int64_t words_per_row(int64_t n) { return (n + 63) / 64; }

/// Edge test of the binary graph: strictly greater than tau (spec §2 step 3).
template <typename T>
NCUT_HD bool is_edge(T s, double tau) { return static_cast<double>(s) > tau; }

/// Weight of the non-binary graph: the similarity, or eps where it is *below* tau (not <=).
template <typename T>
NCUT_HD double dense_weight(T s, double tau, double eps) {
  const double v = static_cast<double>(s);
  return v < tau ? eps : v;
}

/// Pack up to 64 threshold decisions: columns [j0, min(j0 + 64, n)) of one similarity row.
template <typename T>
NCUT_HD uint64_t pack_word(const T* row, int64_t j0, int64_t n, double tau) {
  uint64_t word = 0;
  const int64_t hi = (j0 + 64 < n) ? j0 + 64 : n;
  for (int64_t j = j0; j < hi; ++j) {
    word |= static_cast<uint64_t>(is_edge(row[j], tau)) << (j - j0);
  }
  return word;
}

NCUT_HD int popcount64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __popcll(x);
#else
  return __builtin_popcountll(x);
#endif
}

/// Degree of a binary-graph row with `edges` set bits in a problem of n tokens: eps * n + (1 - eps) * edges.
NCUT_HD double binary_degree(int64_t edges, int64_t n, double eps) {
  return eps * static_cast<double>(n) + (1.0 - eps) * static_cast<double>(edges);
}

/// (W u)_i of the binary graph from sum(u) and (B u)_i.
NCUT_HD double binary_apply(double sum_u, double bu, double eps) { return eps * sum_u + (1.0 - eps) * bu; }

/// sum_k bit_k(word) * u[k] over the set bits of one word; u points at the word's first column.
/// Bits beyond the problem's length are zero, so u may be read only where a bit is set.
NCUT_HD double word_dot(uint64_t word, const double* u) {
  double acc = 0.0;
  while (word) {
#if defined(__CUDA_ARCH__)
    const int k = __ffsll(static_cast<long long>(word)) - 1;
#else
    const int k = __builtin_ctzll(word);
#endif
    acc += u[k];
    word &= word - 1;
  }
  return acc;
}

}  // namespace ncutfast
