// Deflated Lanczos for the Fiedler vector of one ncut problem, written once for both launchers.
//
// With M = D^-1/2 W D^-1/2 and y = D^1/2 x, (D - W) x = lambda D x becomes M y = (1 - lambda) y. M's top
// eigenpair is (1, y0 = sqrt(d) / ||sqrt(d)||); keeping every Krylov vector orthogonal to y0 makes the wanted
// y the largest remaining eigenvector (shared/spec/numerics.md). This is the algorithm of
// ncutfast/_lanczos.py for a single problem: classical Gram-Schmidt applied twice against y0 and the whole
// basis, a fresh start vector (same integer hash) after a breakdown, the same residual tests of the top two
// Ritz pairs every `check_every` steps (see detail::ritz), and restarts from the Ritz vector when a cycle
// of `krylov_dim` steps ends unconverged (krylov_dim and the breakdown threshold kBreakdown are
// ncutfast/backends/contract.py's KRYLOV_DIM and BREAKDOWN).
//
// The code is generic in two policies, so the CPU tests run the algorithm the GPU runs:
//  - Exec: the team of threads solving the problem (an OpenMP team or a single thread on the CPU, a thread
//    block on the GPU). begin(n)/end(n)/stride() partition rows [0, n); a thread only writes its own rows of
//    a vector between syncs. sum(v) returns the team-wide sum to every thread; dots(n, rows, v, st, w, h)
//    writes h[t] = <v_t, w> for `rows` vectors v_t = v + t * st, visible to every thread on return (one
//    team reduction for a whole Gram-Schmidt pass); both reduce in a fixed order (deterministic).
//    sync() is a barrier; leader() is true for exactly one thread.
//  - Op: the graph. degrees(ex, d) writes d = W 1 and apply(ex, u, z) writes z = W u, both for rows [0, n);
//    any thread may write any row, so the caller syncs before and after.
#pragma once

#include <math.h>

#include "../common.h"
#include "tridiag.h"

namespace ncutfast {

/// A new Lanczos vector of norm <= kBreakdown is rounding noise: the space continues with a fresh vector.
/// ||M|| <= 1, so this is relative too; a coupling of 1e-11 still matters when the eigengap, and with it the
/// tolerance tol * gap, is 1e-6, and CGS2 keeps even a tiny vector orthogonal. The same number as
/// ncutfast/backends/contract.py's BREAKDOWN (exported as ncutfast._C.BREAKDOWN; a test compares them).
constexpr double kBreakdown = 1e-14;

/// Stopping and memory parameters of the solver (the Python backends' tol / max_iter, _lanczos defaults).
struct LanczosParams {
  double tol;        ///< stop when the residual estimate of the top Ritz pair is <= tol / 2
  int max_iter;      ///< Lanczos steps over all restart cycles
  int krylov_dim;    ///< basis size of one cycle
  int check_every;   ///< steps between convergence checks
};

/// Where one problem's results go (x has n_max entries; entries at or beyond n are set to zero).
struct LanczosOut {
  double* lambda2;
  double* lambda3;
  double* x;
  double* residual;
  int64_t* iterations;
};

/// Outputs of a batched solve, each with a leading batch dimension.
struct SolveOutputs {
  double* lambda2;      ///< (batch,)
  double* lambda3;      ///< (batch,)
  double* x;            ///< (batch, n_max), zero beyond each length
  double* residual;     ///< (batch,)
  int64_t* iterations;  ///< (batch,)
};

/// Problem b's view of batched outputs.
NCUT_HD LanczosOut item_out(const SolveOutputs& out, int64_t b, int64_t n_max) {
  return LanczosOut{out.lambda2 + b, out.lambda3 + b, out.x + b * n_max, out.residual + b, out.iterations + b};
}

/// Row stride of every workspace vector: n_max rounded up to 64 so bit-chunked reads stay in bounds.
NCUT_HD int64_t vector_stride(int64_t n_max) { return (n_max + 63) / 64 * 64; }

/// Float64 workspace of one problem: 5 vectors, the (krylov_dim + 1)-vector basis, tridiagonal scratch.
NCUT_HD int64_t workspace_doubles(int64_t n_max, int krylov_dim) {
  const int64_t kd = krylov_dim;
  return (6 + kd) * vector_stride(n_max) + 6 * kd + kd * kd + 9;
}

/// Views into one problem's workspace (all float64).
struct Workspace {
  double* sd;      ///< d, then sqrt(d)
  double* isd;     ///< 1 / sqrt(d)
  double* u;       ///< operator input / current Ritz vector
  double* w;       ///< operator output / new Lanczos vector
  double* y0;      ///< deflated direction, stored right before q so that [y0, q_0, ...] is one block
  double* q;       ///< basis, krylov_dim + 1 rows of vector_stride(n_max)
  double* alpha;   ///< krylov_dim
  double* beta;    ///< krylov_dim
  double* td;      ///< tridiagonal diagonal scratch, krylov_dim
  double* te;      ///< tridiagonal off-diagonal scratch, krylov_dim
  double* tz;      ///< eigenvector scratch, krylov_dim^2
  double* s;       ///< coefficients of the Ritz vector, krylov_dim
  double* h;       ///< Gram-Schmidt coefficients, krylov_dim + 1
  double* shared;  ///< 8 scalars the leader broadcasts
};

NCUT_HD Workspace carve_workspace(double* base, int64_t n_max, int krylov_dim) {
  const int64_t st = vector_stride(n_max);
  const int64_t kd = krylov_dim;
  Workspace ws;
  ws.sd = base;
  ws.isd = base + st;
  ws.u = base + 2 * st;
  ws.w = base + 3 * st;
  ws.y0 = base + 4 * st;
  ws.q = base + 5 * st;
  double* t = base + (6 + kd) * st;
  ws.alpha = t;
  ws.beta = t + kd;
  ws.td = t + 2 * kd;
  ws.te = t + 3 * kd;
  ws.s = t + 4 * kd;
  ws.tz = t + 5 * kd;
  ws.shared = t + 5 * kd + kd * kd;
  ws.h = ws.shared + 8;
  return ws;
}

/// Entry j of start vector `salt`, in [-0.5, 0.5); bit-identical to ncutfast._lanczos.start_vectors.
NCUT_HD double start_value(int64_t j, int64_t salt) {
  const uint64_t mask = 0xFFFFFFFFull;
  uint64_t h = (static_cast<uint64_t>(j) * 2654435761ull + static_cast<uint64_t>(salt + 1) * 40503ull) & mask;
  h ^= h >> 16;
  h = (h * 0x45D9F3Bull) & mask;
  h ^= h >> 16;
  return static_cast<double>(h) / 4294967296.0 - 0.5;
}

namespace detail {

/// Remove from w its components along the `rows` vectors basis + t * st (y0, then the Lanczos vectors):
/// classical Gram-Schmidt applied twice ("twice is enough"). Returns w's total coefficient on the last row.
template <class Exec>
NCUT_HD double project_out(Exec& ex, int64_t n, double* w, const double* basis, int64_t st, int rows,
                           double* h) {
  const int64_t lo = ex.begin(n), hi = ex.end(n), step = ex.stride();
  double last = 0.0;
  for (int pass = 0; pass < 2; ++pass) {
    ex.dots(n, rows, basis, st, w, h);
    for (int64_t i = lo; i < hi; i += step) {
      double acc = 0.0;
      for (int t = 0; t < rows; ++t) acc += h[t] * basis[t * st + i];
      w[i] -= acc;
    }
    last += h[rows - 1];
  }
  return last;
}

template <class Exec>
NCUT_HD double norm(Exec& ex, int64_t n, const double* v) {
  double part = 0.0;
  for (int64_t i = ex.begin(n); i < ex.end(n); i += ex.stride()) part += v[i] * v[i];
  return ::sqrt(ex.sum(part));
}

/// w = M v for rows [0, n) (u is scratch for D^-1/2 v). Ends synced.
template <class Exec, class Op>
NCUT_HD void apply_m(Exec& ex, const Op& op, int64_t n, const Workspace& ws, const double* v, double* u,
                     double* w) {
  const int64_t lo = ex.begin(n), hi = ex.end(n), step = ex.stride();
  for (int64_t i = lo; i < hi; i += step) u[i] = ws.isd[i] * v[i];
  ex.sync();
  op.apply(ex, u, w);
  ex.sync();
  for (int64_t i = lo; i < hi; i += step) w[i] *= ws.isd[i];
}

/// Leader only: decompose T_k (alpha, beta); ws.td gets its eigenvalues, *top / *second (-1 if k < 2)
/// index the two largest. With `full`, ws.tz holds all eigenvectors (columns); otherwise only their last
/// components (row 0). Returns whether both residual estimates |beta_k s_k| pass (_lanczos.py's test):
/// top <= tol * min(1, theta1 - theta2) / 2 (residual / gap bounds the vector's angle error, and ncut
/// spectra have tiny absolute gaps); second <= sqrt(tol) * min(1, theta1 - theta2) (it only supplies
/// lambda3, whose error, about residual^2 / gap, is then below tol * gap).
NCUT_HD bool ritz(const Workspace& ws, int k, bool full, double tol, int* top, int* second, bool* ok) {
  for (int t = 0; t < k; ++t) {
    ws.td[t] = ws.alpha[t];
    ws.te[t] = ws.beta[t];
  }
  const int rows = full ? k : 1;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < k; ++c) ws.tz[r * k + c] = (full ? r == c : c == k - 1) ? 1.0 : 0.0;
  *ok = tridiag_eig(ws.td, ws.te, k, ws.tz, rows);
  top_two(ws.td, k, top, second);
  const double* last = ws.tz + (full ? static_cast<int64_t>(k - 1) * k : 0);
  const double b = ::fabs(ws.beta[k - 1]);
  double gap = 1.0;
  if (*second >= 0 && ws.td[*top] - ws.td[*second] < 1.0) gap = ws.td[*top] - ws.td[*second];
  const bool first_ok = b * ::fabs(last[*top]) <= 0.5 * tol * gap;
  const bool second_ok = *second < 0 || b * ::fabs(last[*second]) <= ::sqrt(tol) * gap;
  return *ok && first_ok && second_ok;
}

}  // namespace detail

/// Solve one problem of n tokens. Every thread of the team calls this with the same arguments.
template <class Exec, class Op>
NCUT_HD void lanczos_solve(Exec& ex, const Op& op, int64_t n, int64_t n_max, const LanczosParams& p,
                           const Workspace& ws, const LanczosOut& out) {
  const int64_t st = vector_stride(n_max);
  const int64_t lo = ex.begin(n), hi = ex.end(n), step = ex.stride();
  for (int64_t i = n + ex.begin(n_max - n); i < n + ex.end(n_max - n); i += step) out.x[i] = 0.0;
  if (n == 1) {  // no deflated space: no 2nd eigenpair (reference.fiedler's convention)
    if (ex.leader()) {
      *out.lambda2 = ::nan("");
      *out.lambda3 = ::nan("");
      out.x[0] = 0.0;
      *out.residual = 0.0;
      *out.iterations = 0;
    }
    return;
  }

  // Degrees, D^1/2, D^-1/2 and the deflated direction y0.
  op.degrees(ex, ws.sd);
  ex.sync();
  double part = 0.0;
  for (int64_t i = lo; i < hi; i += step) {
    const double d = ws.sd[i];
    part += d;
    ws.sd[i] = ::sqrt(d);
    ws.isd[i] = 1.0 / ws.sd[i];
  }
  // A degree <= 0 (a non-binary graph with tau < 0 and negative similarities) or NaN has no D^-1/2: report
  // it as iterations = -1 with NaN results, which the launchers' callers turn into an error.
  double bad = 0.0;
  for (int64_t i = lo; i < hi; i += step) bad += ws.sd[i] > 0.0 && ws.sd[i] <= 1.7976931348623157e308 ? 0.0 : 1.0;
  if (ex.sum(bad) != 0.0) {
    if (ex.leader()) {
      *out.lambda2 = ::nan("");
      *out.lambda3 = ::nan("");
      *out.residual = ::nan("");
      *out.iterations = -1;
    }
    for (int64_t i = lo; i < hi; i += step) out.x[i] = ::nan("");
    return;
  }
  const double norm0 = ::sqrt(ex.sum(part));
  for (int64_t i = lo; i < hi; i += step) {
    ws.y0[i] = ws.sd[i] / norm0;
    ws.u[i] = start_value(i, 0);
  }

  int spent = 0;
  double theta2 = ::nan("");
  bool healthy = true;
  for (int cycle = 0;; ++cycle) {
    int m = p.krylov_dim;
    if (p.max_iter - spent < m) m = p.max_iter - spent;
    if (n - 1 < m) m = static_cast<int>(n - 1);

    // q_0: the cycle's start vector (hash or previous Ritz vector in ws.u), deflated and normalized.
    detail::project_out(ex, n, ws.u, ws.y0, st, 1, ws.h);
    const double nu = detail::norm(ex, n, ws.u);
    for (int64_t i = lo; i < hi; i += step) ws.q[i] = ws.u[i] / nu;

    int k = 0;
    bool exhausted = false;
    for (int j = 0; j < m; ++j) {
      const double* qj = ws.q + j * st;
      detail::apply_m(ex, op, n, ws, qj, ws.u, ws.w);
      // Full reorthogonalization against y0 and q_0..q_j; the coefficient on q_j is alpha_j (this also
      // removes beta_{j-1} q_{j-1}, the three-term recurrence's other term).
      const double alpha = detail::project_out(ex, n, ws.w, ws.y0, st, j + 2, ws.h);
      double bj = detail::norm(ex, n, ws.w);
      k = j + 1;
      if (k >= n - 1) exhausted = true;  // the deflated space has n - 1 dimensions
      if (k < m && !exhausted) {
        double wn = bj;
        if (bj <= kBreakdown) {  // invariant subspace: continue with a fresh direction (beta = 0 splits T)
          for (int64_t i = lo; i < hi; i += step) ws.w[i] = start_value(i, cycle * 1000 + j + 1);
          detail::project_out(ex, n, ws.w, ws.y0, st, j + 2, ws.h);
          wn = detail::norm(ex, n, ws.w);
          bj = 0.0;
          if (wn <= 1e-8) exhausted = true;
        }
        double* qn = ws.q + (j + 1) * st;
        if (!exhausted)
          for (int64_t i = lo; i < hi; i += step) qn[i] = ws.w[i] / wn;
      }
      if (ex.leader()) {
        ws.alpha[j] = alpha;
        ws.beta[j] = bj;
      }
      if (exhausted) break;
      // Right after a breakdown beta = 0 and the Ritz pairs so far are exact (as in _lanczos.py).
      if (k % p.check_every == 0 || k == m) {
        if (ex.leader()) {
          bool ok;
          int top, second;
          ws.shared[0] = detail::ritz(ws, k, false, p.tol, &top, &second, &ok) ? 1.0 : 0.0;
        }
        ex.sync();
        if (ws.shared[0] != 0.0) break;
      }
    }

    // Ritz pair of the cycle: y = Q s (into ws.u, the next cycle's start vector).
    if (ex.leader()) {
      bool ok;
      int top, second;
      const bool passed = detail::ritz(ws, k, true, p.tol, &top, &second, &ok);
      for (int t = 0; t < k; ++t) ws.s[t] = ws.tz[t * k + top];
      ws.shared[1] = second >= 0 ? ws.td[second] : ::nan("");
      ws.shared[2] = (exhausted || passed) ? 1.0 : 0.0;
      ws.shared[3] = ok ? 1.0 : 0.0;
    }
    ex.sync();
    theta2 = ws.shared[1];
    const bool converged = ws.shared[2] != 0.0;
    healthy = healthy && ws.shared[3] != 0.0;
    for (int64_t i = lo; i < hi; i += step) {
      double acc = 0.0;
      for (int t = 0; t < k; ++t) acc += ws.s[t] * ws.q[t * st + i];
      ws.u[i] = acc;
    }
    const double ny = detail::norm(ex, n, ws.u);
    for (int64_t i = lo; i < hi; i += step) ws.u[i] /= ny;
    spent += k;
    if (converged || spent >= p.max_iter) break;
  }

  // Rayleigh quotient and true residual of y (ws.u); x = D^-1/2 y so that x^T D x = y^T y = 1.
  detail::apply_m(ex, op, n, ws, ws.u, ws.q, ws.w);
  part = 0.0;
  for (int64_t i = lo; i < hi; i += step) part += ws.u[i] * ws.w[i];
  const double rq = ex.sum(part);
  part = 0.0;
  for (int64_t i = lo; i < hi; i += step) {
    const double r = ws.w[i] - rq * ws.u[i];
    part += r * r;
    out.x[i] = ws.isd[i] * ws.u[i];
  }
  const double res = ::sqrt(ex.sum(part));
  if (ex.leader()) {
    *out.lambda2 = healthy ? 1.0 - rq : ::nan("");
    *out.lambda3 = healthy ? 1.0 - theta2 : ::nan("");
    *out.residual = healthy ? res : ::nan("");
    *out.iterations = spent;
  }
}

}  // namespace ncutfast
