#include "solve_cpu.h"

#include <omp.h>

#include <memory>
#include <vector>

#include "../ncut/graph.h"

namespace ncutfast {

namespace {

/// An OpenMP team (or one thread) solving one problem; rows are split into contiguous blocks.
struct CpuExec {
  int tid;
  int nthreads;
  double* slots;  // nthreads * (krylov_dim + 2) partial sums, shared by the team
  int parity = 0;

  int64_t begin(int64_t n) const {
    const int64_t chunk = (n + nthreads - 1) / nthreads;
    return tid * chunk < n ? tid * chunk : n;
  }
  int64_t end(int64_t n) const {
    const int64_t chunk = (n + nthreads - 1) / nthreads;
    return (tid + 1) * chunk < n ? (tid + 1) * chunk : n;
  }
  int64_t stride() const { return 1; }
  bool leader() const { return tid == 0; }
  void sync() const {
    if (nthreads > 1) {
#pragma omp barrier
    }
  }
  // Double-buffered slots: the next call writes the other half, so one barrier per sum suffices.
  double sum(double v) {
    if (nthreads == 1) return v;
    double* half = slots + parity * nthreads;
    half[tid] = v;
    sync();
    double total = 0.0;
    for (int t = 0; t < nthreads; ++t) total += half[t];
    parity ^= 1;
    return total;
  }
  // Each thread reduces its row block for every vector, then finalizes the vectors of its own block of t.
  void dots(int64_t n, int rows, const double* v, int64_t st, const double* w, double* h) {
    const int64_t lo = begin(n), hi = end(n);
    if (nthreads == 1) {
      for (int t = 0; t < rows; ++t) h[t] = dot_range(v + t * st, w, lo, hi);
      return;
    }
    sync();  // every thread has finished reading h and the slots from the previous call
    for (int t = 0; t < rows; ++t) slots[tid * rows + t] = dot_range(v + t * st, w, lo, hi);
    sync();
    for (int64_t t = begin(rows); t < end(rows); ++t) {
      double total = 0.0;
      for (int r = 0; r < nthreads; ++r) total += slots[r * rows + t];
      h[t] = total;
    }
    sync();
  }
  static double dot_range(const double* a, const double* b, int64_t lo, int64_t hi) {
    double acc = 0.0;
    for (int64_t i = lo; i < hi; ++i) acc += a[i] * b[i];
    return acc;
  }
};

/// Automatic team size: one thread per problem (no barriers) unless a batch smaller than the thread count
/// holds problems this large. Measured at N = 3600 on 2 cores: one thread 2.5 ms per solve, a team of 2
/// 1.3 ms on an idle machine, but on a loaded one a team's barriers cost far more than they save (21 ms with
/// passive waits, 460 ms with spinning ones, against 14 ms for one thread with the older mat-vec).
constexpr int64_t kTeamMinTokens = 16384;

/// Binary graph, plain loop over the set bits of each row (the GPU's per-word math).
struct BitOp {
  const uint64_t* bits;
  int64_t n;
  int64_t words;
  double eps;

  void degrees(CpuExec& ex, double* d) const {
    for (int64_t i = ex.begin(n); i < ex.end(n); ++i) {
      int64_t edges = 0;
      for (int64_t w = 0; w < words; ++w) edges += popcount64(bits[i * words + w]);
      d[i] = binary_degree(edges, n, eps);
    }
  }
  void apply(CpuExec& ex, const double* u, double* z) const {
    double part = 0.0;
    for (int64_t i = ex.begin(n); i < ex.end(n); ++i) part += u[i];
    const double su = ex.sum(part);
    for (int64_t i = ex.begin(n); i < ex.end(n); ++i) {
      double bu = 0.0;
      for (int64_t w = 0; w < words; ++w) bu += word_dot(bits[i * words + w], u + 64 * w);
      z[i] = binary_apply(su, bu, eps);
    }
  }
};

/// Binary graph with "four Russians" tables: for every 8-column chunk c the 256 subset sums of u's 8
/// entries, so a row costs n / 8 lookups instead of one add per edge (numerics.md).
struct BitTableOp {
  BitOp plain;
  double* table;  // ceil(n / 8) * 256, shared by the team

  void degrees(CpuExec& ex, double* d) const { plain.degrees(ex, d); }
  void apply(CpuExec& ex, const double* u, double* z) const {
    const int64_t n = plain.n, words = plain.words;
    const int64_t chunks = (n + 7) / 8;
    double part = 0.0;
    for (int64_t i = ex.begin(n); i < ex.end(n); ++i) part += u[i];
    const double su = ex.sum(part);
    // Entries for columns >= n are never looked up (their bits are zero); u is padded to a multiple of 64.
    for (int64_t c = ex.begin(chunks); c < ex.end(chunks); ++c) {
      double* t = table + c * 256;
      const double* uc = u + 8 * c;
      t[0] = 0.0;
      for (int mask = 1; mask < 256; ++mask) t[mask] = t[mask & (mask - 1)] + uc[__builtin_ctz(mask)];
    }
    ex.sync();
    // Byte c of a little-endian row is its chunk c. The table (2 KB per chunk, 0.9 MB at N = 3600) does not
    // fit in L1, and a row visits all of it: so the rows are swept once per group of kGroup words, whose
    // 16 KB-per-word slice of the table stays in L1 (3.5x faster than row by row at N = 3600). Sums run in a
    // fixed order: deterministic.
    static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "packed rows are read as bytes");
    constexpr int64_t kGroup = 2;
    const int64_t lo = ex.begin(n), hi = ex.end(n);
    for (int64_t i = lo; i < hi; ++i) z[i] = 0.0;
    for (int64_t c0 = 0; c0 < chunks; c0 += 8 * kGroup) {
      const int64_t nc = chunks - c0 < 8 * kGroup ? chunks - c0 : 8 * kGroup;
      const double* t = table + c0 * 256;
      for (int64_t i = lo; i < hi; ++i) {
        const uint8_t* row = reinterpret_cast<const uint8_t*>(plain.bits + i * words) + c0;
        double a0 = 0.0, a1 = 0.0;
        int64_t c = 0;
        for (; c + 2 <= nc; c += 2) {
          a0 += t[c * 256 + row[c]];
          a1 += t[(c + 1) * 256 + row[c + 1]];
        }
        if (c < nc) a0 += t[c * 256 + row[c]];
        z[i] += a0 + a1;
      }
    }
    for (int64_t i = lo; i < hi; ++i) z[i] = binary_apply(su, z[i], plain.eps);
  }
};

/// Non-binary graph read from the similarity matrix (row stride n_max).
template <typename T>
struct DenseOp {
  const T* s;
  int64_t n;
  int64_t n_max;
  double tau;
  double eps;

  void degrees(CpuExec& ex, double* d) const {
    for (int64_t i = ex.begin(n); i < ex.end(n); ++i) {
      double acc = 0.0;
      for (int64_t j = 0; j < n; ++j) acc += dense_weight(s[i * n_max + j], tau, eps);
      d[i] = acc;
    }
  }
  void apply(CpuExec& ex, const double* u, double* z) const {
    for (int64_t i = ex.begin(n); i < ex.end(n); ++i) {
      double acc = 0.0;
      for (int64_t j = 0; j < n; ++j) acc += dense_weight(s[i * n_max + j], tau, eps) * u[j];
      z[i] = acc;
    }
  }
};

/// Per-thread scratch: the solver workspace (zeroed, so padding reads are zero) and the chunk tables.
struct Scratch {
  std::vector<double> ws;
  std::vector<double> table;
  Scratch(int64_t n_max, int krylov_dim, bool with_table)
      : ws(static_cast<size_t>(workspace_doubles(n_max, krylov_dim)), 0.0),
        table(with_table ? static_cast<size_t>((n_max + 7) / 8 * 256) : 0, 0.0) {}
};

/// Run make_op(b, scratch) -> Op and solve every problem: whole problems per thread (team == 1), or one
/// problem at a time by a team of `team` threads (0: automatic, see kTeamMinTokens).
template <class MakeOp>
void run_batch(int64_t batch, int64_t n_max, const int64_t* lengths, const LanczosParams& params, bool with_table,
               int team, const SolveOutputs& out, MakeOp make_op) {
  const int threads = omp_get_max_threads();
  if (team <= 0) team = (batch < threads && n_max >= kTeamMinTokens) ? threads : 1;
  if (team == 1) {
    // Scratch is allocated by the threads that get a problem, on their first one: a single image costs one
    // workspace, not one per thread.
#pragma omp parallel num_threads(threads)
    {
      std::unique_ptr<Scratch> scratch;
      Workspace ws{};
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < batch; ++b) {
        if (!scratch) {
          scratch = std::make_unique<Scratch>(n_max, params.krylov_dim, with_table);
          ws = carve_workspace(scratch->ws.data(), n_max, params.krylov_dim);
        }
        CpuExec ex{0, 1, nullptr};
        lanczos_solve(ex, make_op(b, *scratch), lengths[b], n_max, params, ws, item_out(out, b, n_max));
      }
    }
    return;
  }
  Scratch scratch(n_max, params.krylov_dim, with_table);
  const Workspace ws = carve_workspace(scratch.ws.data(), n_max, params.krylov_dim);
  const int per_thread = params.krylov_dim + 2;  // >= 2 for sum(), >= krylov_dim + 1 rows for dots()
  std::vector<double> slots(static_cast<size_t>(team) * per_thread, 0.0);
  for (int64_t b = 0; b < batch; ++b) {
    const auto op = make_op(b, scratch);
#pragma omp parallel num_threads(team)
    {
      CpuExec ex{omp_get_thread_num(), omp_get_num_threads(), slots.data()};
      lanczos_solve(ex, op, lengths[b], n_max, params, ws, item_out(out, b, n_max));
    }
  }
}

}  // namespace

void solve_binary_cpu(const uint64_t* bits, int64_t batch, int64_t n_max, const int64_t* lengths, double eps,
                      const LanczosParams& params, bool table, int team, const SolveOutputs& out) {
  const int64_t words = words_per_row(n_max);
  if (table) {
    run_batch(batch, n_max, lengths, params, true, team, out, [&](int64_t b, Scratch& sc) {
      return BitTableOp{BitOp{bits + b * n_max * words, lengths[b], words, eps}, sc.table.data()};
    });
  } else {
    run_batch(batch, n_max, lengths, params, false, team, out, [&](int64_t b, Scratch&) {
      return BitOp{bits + b * n_max * words, lengths[b], words, eps};
    });
  }
}

void solve_dense_cpu(const void* s, DType dtype, int64_t batch, int64_t n_max, const int64_t* lengths, double tau,
                     double eps, const LanczosParams& params, int team, const SolveOutputs& out) {
  NCUT_DISPATCH_FLOAT(dtype, [&] {
    const scalar_t* sp = static_cast<const scalar_t*>(s);
    run_batch(batch, n_max, lengths, params, false, team, out, [&](int64_t b, Scratch&) {
      return DenseOp<scalar_t>{sp + b * n_max * n_max, lengths[b], n_max, tau, eps};
    });
  });
}

int cpu_threads() { return omp_get_max_threads(); }

}  // namespace ncutfast
