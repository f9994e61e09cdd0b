// OpenMP launchers that build the packed binary graph (math: ncut/graph.h).
#pragma once

#include "../common.h"

namespace ncutfast {

/// Threshold a padded batch of similarity matrices into packed bit rows.
///   s: (batch, n_max, n_max) float32/float64, row-major; rows/columns at or beyond lengths[b] are ignored.
///   lengths: (batch,) int64 in [1, n_max].
///   bits: (batch, n_max, words_per_row(n_max)) uint64, fully written (zero beyond each length).
/// Returns the number of NaN similarities met within the lengths (their bits are 0; callers raise).
int64_t pack_graph_cpu(const void* s, DType dtype, int64_t batch, int64_t n_max, const int64_t* lengths,
                       double tau, uint64_t* bits);

/// Pack rows [row0, row0 + rows) of the graph from the upper part of the similarity only, mirroring it, so
/// that a caller can form half of S (blocks of rows against the columns from row0 on) and still get every
/// bit. Only S_ij with i <= j is read: the packed graph is exactly symmetric whatever the GEMM's rounding.
///   s: (batch, rows, n_max - row0) with s[b][i - row0][j - row0] = S_ij (j >= row0).
///   inv_norms: null, or (batch, n_max) of the similarity's dtype: then s holds raw dot products k_i . k_j
///     and the edge test is s_ij * inv_j > tau / inv_i (the cosine s_ij inv_i inv_j > tau, rounded once in
///     the similarity's dtype), so no normalized copy of the features is needed. inv_i = 0 marks a zero row
///     (MaskCut's painted token): cosine 0 with every row, whatever its (finite) products in s.
///   row0: a multiple of 64; row0 + rows: a multiple of 64 or n_max.
/// Writes rows [row0, row0 + rows) at columns >= row0 and rows >= row0 + rows at columns
/// [row0, row0 + rows); blocks that tile [0, n_max) in order write every word of bits (same layout as
/// pack_graph_cpu). Returns the number of NaN entries met (as pack_graph_cpu).
int64_t pack_graph_block_cpu(const void* s, DType dtype, int64_t batch, int64_t n_max, int64_t row0, int64_t rows,
                             const void* inv_norms, const int64_t* lengths, double tau, uint64_t* bits);

/// Precision "exact", step 1: the denominators of reference.normalize_rows, bit for bit:
/// norms[b, i] = max(sqrt(sum_q k_q^2), 1e-12) in float64 with NumPy's pairwise summation (k float32 or
/// float64, converted exactly). k: (batch, n_max, c); norms: (batch, n_max) float64, 1 beyond lengths[b].
/// Returns the number of NaN or infinite entries of k within the lengths (callers raise).
int64_t exact_row_norms_cpu(const void* k, DType dtype, int64_t batch, int64_t n_max, int64_t c,
                            const int64_t* lengths, double* norms);

/// Precision "exact", step 2: the int16 screen's operand q = clamp(rint(f * 2^15), -32767, 32767) of the
/// float64 rows f_i = k_i / norms_i (reference.normalize_rows), and err_i, an upper bound on the 2-norm of
/// the quantization error f_i - q_i 2^-15 (ncutfast.exact, step 2).
///   k: (batch, n_max, c) float32/float64; norms from exact_row_norms_cpu; q: (batch, n_max, cq) int16 with
///   cq >= c even (channels beyond c and rows beyond lengths[b] are 0); err: (batch, n_max) float64 (0
///   beyond the lengths).
void exact_quantize_cpu(const void* k, DType dtype, int64_t batch, int64_t n_max, int64_t c, const int64_t* lengths,
                        const double* norms, int16_t* q, int64_t cq, double* err);

/// Precision "exact", step 3: the packed graph B_ij = [f_i . f_j > tau] (layout of pack_graph_cpu, every
/// word written). The exact integer products q_i . q_j (int16 x int16 summed in int32, register tiles of
/// the upper triangle only) decide every entry farther than `bound` (ncutfast.exact.int16_screen_bound)
/// from tau; the others are decided by ncut/exact.h's exact_edge on f (dot_bound, dot2_bound) and counted
/// (i <= j) into rechecked (batch,) int64. q, cq from exact_quantize_cpu; k, norms as there. simd = false
/// takes the portable tile kernel even where AVX2 is available (tests compare both).
void exact_graph_cpu(const int16_t* q, int64_t cq, const void* k, DType dtype, int64_t c, const double* norms,
                     int64_t batch, int64_t n_max, const int64_t* lengths, double tau, double bound, double dot_bound,
                     double dot2_bound, uint64_t* bits, int64_t* rechecked, bool simd);

/// First problem whose packed rows break the layout (a set bit at or beyond its length), or -1.
int64_t find_stray_bits(const uint64_t* bits, int64_t batch, int64_t n_max, const int64_t* lengths);

}  // namespace ncutfast
