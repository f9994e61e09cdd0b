// Eigen-decomposition of the small symmetric tridiagonal matrices of Lanczos (both launchers).
#pragma once

#include <math.h>

#include "../common.h"

namespace ncutfast {

namespace detail {

/// Implicit QL with Wilkinson shifts (tridiag_eig's arguments, after its scaling).
NCUT_HD bool tridiag_ql(double* d, double* e, int m, double* z, int zrows) {
  for (int l = 0; l < m; ++l) {
    int iter = 0;
    for (;;) {
      int mm = l;
      for (; mm < m - 1; ++mm) {
        const double dd = ::fabs(d[mm]) + ::fabs(d[mm + 1]);
        if (::fabs(e[mm]) <= 2.220446049250313e-16 * dd) break;
      }
      if (mm == l) break;
      if (++iter > 60) return false;
      double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
      double r = ::hypot(g, 1.0);
      g = d[mm] - d[l] + e[l] / (g + ::copysign(r, g));
      double s = 1.0, c = 1.0, p = 0.0;
      bool deflated = false;
      for (int i = mm - 1; i >= l; --i) {
        double f = s * e[i];
        const double b = c * e[i];
        r = ::hypot(f, g);
        e[i + 1] = r;
        if (r == 0.0) {  // underflow: the matrix split at i + 1; restart the sweep on the smaller block
          d[i + 1] -= p;
          e[mm] = 0.0;
          deflated = true;
          break;
        }
        s = f / r;
        c = g / r;
        g = d[i + 1] - p;
        r = (d[i] - g) * s + 2.0 * c * b;
        p = s * r;
        d[i + 1] = g + p;
        g = c * r - b;
        for (int k = 0; k < zrows; ++k) {
          double* zk = z + static_cast<int64_t>(k) * m;
          f = zk[i + 1];
          zk[i + 1] = s * zk[i] + c * f;
          zk[i] = c * zk[i] - s * f;
        }
      }
      if (deflated) continue;
      d[l] -= p;
      e[l] = g;
      e[mm] = 0.0;
    }
  }
  return true;
}

}  // namespace detail

/// Implicit QL with Wilkinson shifts on a symmetric tridiagonal matrix of order m.
///
/// d[0..m): diagonal, overwritten by the (unsorted) eigenvalues. e[0..m): e[i] couples rows i and i+1
/// (e[m-1] is ignored), destroyed. z: `zrows` x m row-major; the rotations are applied to its rows, so
/// starting from the identity gives the eigenvectors as columns, and starting from the single row
/// e_{m-1}^T gives only their last components (what Lanczos' residual estimate needs) in O(m^2).
/// The matrix is first scaled by the power of two that brings its largest |entry| into [0.5, 1): exact, so
/// results do not change otherwise, while entries near DBL_MAX would overflow the split test
/// |e| <= eps (|d_i| + |d_i+1|) to "split everywhere" and return the diagonal unchanged. The eigenvalues are
/// scaled back. Returns false if an eigenvalue needed more than 60 sweeps (never seen for Lanczos matrices)
/// or does not fit in a double once scaled back (|lambda| > DBL_MAX: that d is then infinite).
NCUT_HD bool tridiag_eig(double* d, double* e, int m, double* z, int zrows) {
  if (m > 0) e[m - 1] = 0.0;
  double big = 0.0;
  for (int i = 0; i < m; ++i) big = ::fmax(big, ::fmax(::fabs(d[i]), ::fabs(e[i])));
  int ex = 0;
  if (big > 0.0) ::frexp(big, &ex);  // big = f 2^ex with f in [0.5, 1)
  for (int i = 0; i < m; ++i) {
    d[i] = ::ldexp(d[i], -ex);
    e[i] = ::ldexp(e[i], -ex);
  }
  bool ok = detail::tridiag_ql(d, e, m, z, zrows);
  for (int i = 0; i < m; ++i) {
    d[i] = ::ldexp(d[i], ex);
    ok = ok && ::fabs(d[i]) <= 1.7976931348623157e308;  // DBL_MAX: false for inf (and NaN)
  }
  return ok;
}

/// Indices of the largest and second largest of v[0..m) (second = -1 when m < 2); first index wins ties.
NCUT_HD void top_two(const double* v, int m, int* first, int* second) {
  int a = -1, b = -1;
  for (int k = 0; k < m; ++k) {
    if (a < 0 || v[k] > v[a]) {
      b = a;
      a = k;
    } else if (b < 0 || v[k] > v[b]) {
      b = k;
    }
  }
  *first = a;
  *second = b;
}

}  // namespace ncutfast
