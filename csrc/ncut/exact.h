// The exact graph's float64 side (precision "exact"), written once for the CPU and CUDA launchers.
//
// A screening product in low precision decides every entry whose distance to tau exceeds its a-priori error
// bound; the rest come here. Rows are the float64 normalized features f (reference.normalize_rows, bit for
// bit); the edge test is on the exact real number f_i . f_j. The bounds are derived and computed in
// ncutfast/exact.py and passed in, so this file holds no constants.
#pragma once

#include <cmath>

#include "../common.h"

namespace ncutfast {

/// NumPy's pairwise summation (numpy/_core/src/umath/loops_utils.h.src, PW_BLOCKSIZE = 128) of a[0..n):
/// the same order, hence the same float64 rounding, as `x.sum(axis=-1)` on a contiguous row.
NCUT_HD double numpy_pairwise_sum(const double* a, int64_t n) {
  if (n < 8) {
    double res = 0.0;
    for (int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return numpy_pairwise_sum(a, n2) + numpy_pairwise_sum(a + n2, n - n2);
}

/// a . b in float64 with 8 interleaved partial sums. Any summation order obeys the same bound,
/// |result - a.b| <= gamma_c sum_k |a_k b_k| (ncutfast.exact.dot_bound), so the order is free to be fast.
NCUT_HD double dot_f64(const double* a, const double* b, int64_t c) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= c; k += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[k + j] * b[k + j];
  for (int j = 0; k < c; ++k, ++j) acc[j] += a[k] * b[k];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/// a . b - tau by Ogita, Rump and Oishi's Dot2 (SIAM J. Sci. Comput. 26(6), 2005, Alg. 5.3): error-free
/// products (fma) and sums (TwoSum) with the errors summed in a second float64, so the result is as if
/// computed in twice the precision: |result - (a.b - tau)| <= u |a.b - tau| + gamma_{c+1}^2 sum|terms|.
NCUT_HD double dot2_minus(const double* a, const double* b, int64_t c, double tau) {
  double p = -tau, s = 0.0;
  for (int64_t k = 0; k < c; ++k) {
    const double h = a[k] * b[k];
    const double r = fma(a[k], b[k], -h);  // h + r == a_k b_k exactly
    const double x = p + h;                // TwoSum(p, h): x + q == p + h exactly
    const double z = x - p;
    const double q = (p - (x - z)) + (h - z);
    p = x;
    s += q + r;
  }
  return p + s;
}

/// The exact edge test f_i . f_j > tau. A float64 dot decides when it lies farther than `dot_bound` from
/// tau; otherwise Dot2 decides when farther than `dot2_bound` from tau. Closer than that (only exact
/// ties f_i . f_j == tau get there in practice) the entry is treated as the tie it is within 2^-100: no edge.
NCUT_HD bool exact_edge(const double* a, const double* b, int64_t c, double tau, double dot_bound,
                        double dot2_bound) {
  const double d = dot_f64(a, b, c) - tau;
  if (d > dot_bound) return true;
  if (d < -dot_bound) return false;
  return dot2_minus(a, b, c, tau) > dot2_bound;
}

}  // namespace ncutfast
