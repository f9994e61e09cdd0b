// ncutfast._C: the only Python module of the compiled extension. Argument checks and dispatch only.
//
// Arrays travel as raw addresses (torch `data_ptr()`, CuPy `.data.ptr`, NumPy `ctypes.data`) with their
// sizes, so the module needs neither torch nor a CUDA build of it. Every array must be C-contiguous with
// the documented dtype; the Python backends guarantee that. The GIL is released during the work.
// Bad arguments raise ValueError naming the argument (pybind11 maps std::invalid_argument); CUDA failures
// raise RuntimeError.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>

#include "common.h"
#include "cpu/graph_cpu.h"
#include "cpu/solve_cpu.h"
#include "ncut/graph.h"
#include "ncut/lanczos.h"
#include "ncut/tridiag.h"
#ifdef NCUTFAST_WITH_CUDA
#include "cuda/graph_cuda.h"
#include "cuda/solve_cuda.h"
#endif

namespace py = pybind11;
using ncutfast::DType;
using ncutfast::LanczosParams;
using ncutfast::SolveOutputs;

namespace {

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

/// Sizes far beyond any image (and whose index arithmetic could overflow int64) are refused outright.
constexpr int64_t kMaxTokens = int64_t{1} << 24;
constexpr int64_t kMaxBatch = int64_t{1} << 24;
constexpr int kMaxKrylov = 4096;
/// A CPU team plays a CUDA thread block (at most 1024 threads); far larger OpenMP teams abort in libgomp
/// (32768) or crash (100000).
constexpr int kMaxTeam = 1024;

void check_sizes(int64_t batch, int64_t n_max) {
  NCUT_CHECK(batch >= 1 && batch <= kMaxBatch, "batch", "must be in [1, " << kMaxBatch << "], got " << batch);
  NCUT_CHECK(n_max >= 1 && n_max <= kMaxTokens, "n_max", "must be in [1, " << kMaxTokens << "], got " << n_max);
}

/// NaN similarities come from NaN or infinite features: their bits would silently be 0.
void check_no_nan(int64_t nan) {
  NCUT_CHECK(nan == 0, "s", "contains NaN within the lengths (NaN or infinite features?)");
}

/// eps is the weight of every non-edge: it must be positive for the degrees (and D^-1/2) to exist.
void check_eps(double eps) {
  NCUT_CHECK(std::isfinite(eps) && eps > 0, "eps", "must be finite and > 0, got " << eps);
}

/// The solver flags problems with a degree <= 0 (or not finite) by iterations = -1.
void check_degrees(const int64_t* iterations, int64_t batch) {
  for (int64_t b = 0; b < batch; ++b)
    NCUT_CHECK(iterations[b] >= 0, "s", "problem " << b << " has a degree <= 0 or not finite (W = s where s >= "
                                                          "tau: tau <= 0 with zero or negative similarities?)");
}

/// A NaN lambda2 for n >= 2 means the tridiagonal QL failed (never seen for Lanczos matrices): say so rather
/// than return NaN.
void check_solved(const SolveOutputs& out, const int64_t* lengths, int64_t batch) {
  for (int64_t b = 0; b < batch; ++b)
    if (lengths[b] >= 2 && std::isnan(out.lambda2[b]))
      throw std::runtime_error("solver: the tridiagonal eigensolver did not converge for problem " +
                               std::to_string(b));
}

/// Inverse row norms must be positive (or, with `zero_rows`, zero: a zero row) and finite where they are read
/// (within the lengths).
template <typename T>
void check_inv_norms(const T* inv, const int64_t* lengths, int64_t batch, int64_t n_max, bool zero_rows = false) {
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < lengths[b]; ++i) {
      const T v = inv[b * n_max + i];
      NCUT_CHECK((v > 0 || (zero_rows && v == 0)) && std::isfinite(v), "inv_norms",
                 "entry [" << b << ", " << i << "] is " << v << ", must be " << (zero_rows ? ">= 0" : "positive")
                           << " and finite");
    }
}

/// Host lengths can be checked here; device lengths are the caller's responsibility.
void check_host_lengths(const int64_t* lengths, int64_t batch, int64_t n_max) {
  for (int64_t b = 0; b < batch; ++b)
    NCUT_CHECK(lengths[b] >= 1 && lengths[b] <= n_max, "lengths",
               "lengths[" << b << "] = " << lengths[b] << " is outside [1, n_max = " << n_max << "]");
}

void check_scalar(double v, const char* arg) { NCUT_CHECK(std::isfinite(v), arg, "must be finite, got " << v); }

LanczosParams make_params(double tol, int max_iter, int krylov_dim, int check_every) {
  NCUT_CHECK(std::isfinite(tol) && tol > 0, "tol", "must be a positive finite number, got " << tol);
  NCUT_CHECK(max_iter >= 1, "max_iter", "must be >= 1, got " << max_iter);
  NCUT_CHECK(krylov_dim >= 1 && krylov_dim <= kMaxKrylov, "krylov_dim",
             "must be in [1, " << kMaxKrylov << "], got " << krylov_dim);
  NCUT_CHECK(check_every >= 1, "check_every", "must be >= 1, got " << check_every);
  return LanczosParams{tol, max_iter, krylov_dim, check_every};
}

SolveOutputs make_outputs(uintptr_t lambda2, uintptr_t lambda3, uintptr_t x, uintptr_t residual,
                          uintptr_t iterations) {
  NCUT_CHECK_PTR(lambda2, "lambda2");
  NCUT_CHECK_PTR(lambda3, "lambda3");
  NCUT_CHECK_PTR(x, "x");
  NCUT_CHECK_PTR(residual, "residual");
  NCUT_CHECK_PTR(iterations, "iterations");
  return SolveOutputs{as_ptr<double>(lambda2), as_ptr<double>(lambda3), as_ptr<double>(x),
                      as_ptr<double>(residual), as_ptr<int64_t>(iterations)};
}

#ifdef NCUTFAST_WITH_CUDA
void check_cuda(int err, const char* what) {
  if (err != 0) throw std::runtime_error(std::string(what) + ": CUDA error " + std::to_string(err) + ": " +
                                         ncutfast::cuda_error_message(err));
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ncutfast compiled kernels: packed binary graphs and the deflated Lanczos Fiedler solver.";
#ifdef NCUTFAST_WITH_CUDA
  m.attr("HAS_CUDA") = true;
#else
  m.attr("HAS_CUDA") = false;
#endif
  m.attr("BREAKDOWN") = ncutfast::kBreakdown;

  m.def(
      "words_per_row",
      [](int64_t n_max) {
        check_sizes(1, n_max);
        return ncutfast::words_per_row(n_max);
      },
      py::arg("n_max"),
        "uint64 words of one packed row of n_max columns.");
  m.def(
      "workspace_doubles", [](int64_t n_max, int krylov_dim) {
        check_sizes(1, n_max);
        NCUT_CHECK(krylov_dim >= 1 && krylov_dim <= kMaxKrylov, "krylov_dim",
                   "must be in [1, " << kMaxKrylov << "], got " << krylov_dim);
        return ncutfast::workspace_doubles(n_max, krylov_dim);
      },
      py::arg("n_max"), py::arg("krylov_dim"), "float64 workspace entries one problem of the GPU solver needs.");
  m.def("cpu_threads", &ncutfast::cpu_threads, "OpenMP threads the CPU launchers use.");
  m.attr("MAX_TEAM") = kMaxTeam;

  m.def(
      "tridiagonal_eigh",
      [](uintptr_t diag, uintptr_t off, int m, uintptr_t vectors) {
        NCUT_CHECK(m >= 1 && m <= kMaxKrylov, "m", "must be in [1, " << kMaxKrylov << "], got " << m);
        NCUT_CHECK_PTR(diag, "diag");
        NCUT_CHECK_PTR(off, "off");
        NCUT_CHECK_PTR(vectors, "vectors");
        for (int i = 0; i < m; ++i) {
          NCUT_CHECK(std::isfinite(as_ptr<const double>(diag)[i]), "diag", "entry " << i << " is not finite");
          NCUT_CHECK(i == m - 1 || std::isfinite(as_ptr<const double>(off)[i]), "off", "entry " << i
                                                                                       << " is not finite");
        }
        double* z = as_ptr<double>(vectors);
        for (int r = 0; r < m; ++r)
          for (int c = 0; c < m; ++c) z[r * m + c] = r == c ? 1.0 : 0.0;
        double* d = as_ptr<double>(diag);
        const bool ok = ncutfast::tridiag_eig(d, as_ptr<double>(off), m, z, m);
        for (int i = 0; i < m; ++i)
          NCUT_CHECK(std::isfinite(d[i]), "diag", "eigenvalue " << i << " overflows float64 (entries too large)");
        return ok;
      },
      py::arg("diag"), py::arg("off"), py::arg("m"), py::arg("vectors"),
      "Eigen-decompose a float64 tridiagonal matrix in place (the solver's Ritz step): diag (m,) becomes the\n"
      "unsorted eigenvalues, off (m,) (off[i] couples i and i+1) is destroyed, vectors (m, m) receives the\n"
      "eigenvectors as columns. Any finite entries (scaled internally); eigenvalues beyond float64's range\n"
      "raise ValueError. Returns False if QL did not converge.");

  m.def(
      "pack_graph_cpu",
      [](uintptr_t s, const std::string& dtype, int64_t batch, int64_t n_max, uintptr_t lengths, double tau,
         uintptr_t bits) {
        const DType dt = ncutfast::parse_dtype(dtype, "dtype");
        check_sizes(batch, n_max);
        NCUT_CHECK_PTR(s, "s");
        NCUT_CHECK_PTR(lengths, "lengths");
        NCUT_CHECK_PTR(bits, "bits");
        check_scalar(tau, "tau");
        check_host_lengths(as_ptr<const int64_t>(lengths), batch, n_max);
        int64_t nan;
        {
          py::gil_scoped_release nogil;
          nan = ncutfast::pack_graph_cpu(as_ptr<const void>(s), dt, batch, n_max, as_ptr<const int64_t>(lengths),
                                         tau, as_ptr<uint64_t>(bits));
        }
        check_no_nan(nan);
      },
      py::arg("s"), py::arg("dtype"), py::arg("batch"), py::arg("n_max"), py::arg("lengths"), py::arg("tau"),
      py::arg("bits"),
      "Threshold similarities s (batch, n_max, n_max) at tau (strict >) into bits (batch, n_max,\n"
      "words_per_row(n_max)) uint64; lengths (batch,) int64. Host pointers. NaN similarities raise ValueError\n"
      "(after bits were written).");

  m.def(
      "pack_graph_block_cpu",
      [](uintptr_t s, const std::string& dtype, int64_t batch, int64_t n_max, int64_t row0, int64_t rows,
         uintptr_t lengths, double tau, uintptr_t bits, uintptr_t inv_norms) {
        const DType dt = ncutfast::parse_dtype(dtype, "dtype");
        check_sizes(batch, n_max);
        NCUT_CHECK(row0 >= 0 && row0 < n_max && row0 % 64 == 0, "row0",
                   "must be a multiple of 64 in [0, n_max = " << n_max << "), got " << row0);
        NCUT_CHECK(rows >= 1 && row0 + rows <= n_max && ((row0 + rows) % 64 == 0 || row0 + rows == n_max), "rows",
                   "row0 + rows must be a multiple of 64 or n_max, within n_max = " << n_max << ", got " << rows);
        NCUT_CHECK_PTR(s, "s");
        NCUT_CHECK_PTR(lengths, "lengths");
        NCUT_CHECK_PTR(bits, "bits");
        check_scalar(tau, "tau");
        check_host_lengths(as_ptr<const int64_t>(lengths), batch, n_max);
        if (inv_norms != 0) {
          NCUT_DISPATCH_FLOAT(dt, [&] {
            check_inv_norms(as_ptr<const scalar_t>(inv_norms), as_ptr<const int64_t>(lengths), batch, n_max, true);
          });
        }
        int64_t nan;
        {
          py::gil_scoped_release nogil;
          nan = ncutfast::pack_graph_block_cpu(as_ptr<const void>(s), dt, batch, n_max, row0, rows,
                                               as_ptr<const void>(inv_norms), as_ptr<const int64_t>(lengths), tau,
                                               as_ptr<uint64_t>(bits));
        }
        check_no_nan(nan);
      },
      py::arg("s"), py::arg("dtype"), py::arg("batch"), py::arg("n_max"), py::arg("row0"), py::arg("rows"),
      py::arg("lengths"), py::arg("tau"), py::arg("bits"), py::arg("inv_norms") = 0,
      "pack_graph_cpu from the upper part of S only, one block of rows at a time: s (batch, rows, n_max - row0)\n"
      "holds S[row0:row0+rows, row0:]; blocks tiling [0, n_max) in order fill bits. Entries S_ij with i > j\n"
      "are never read (the graph is exactly symmetric). inv_norms: 0, or the address of (batch, n_max) finite\n"
      "inverse row norms >= 0 in `dtype`; then s holds raw dot products and the edge test is the cosine's,\n"
      "s_ij * inv_j > tau / inv_i; an inverse norm 0 marks a zero row (cosine 0 with every row; its products\n"
      "in s must be finite). Host pointers.");

  m.def(
      "exact_row_norms_cpu",
      [](uintptr_t k, const std::string& dtype, int64_t batch, int64_t n_max, int64_t c, uintptr_t lengths,
         uintptr_t norms) {
        const DType dt = ncutfast::parse_dtype(dtype, "dtype");
        check_sizes(batch, n_max);
        NCUT_CHECK(c >= 1 && c <= kMaxTokens, "c", "must be in [1, " << kMaxTokens << "], got " << c);
        NCUT_CHECK_PTR(k, "k");
        NCUT_CHECK_PTR(lengths, "lengths");
        NCUT_CHECK_PTR(norms, "norms");
        check_host_lengths(as_ptr<const int64_t>(lengths), batch, n_max);
        int64_t bad;
        {
          py::gil_scoped_release nogil;
          bad = ncutfast::exact_row_norms_cpu(as_ptr<const void>(k), dt, batch, n_max, c,
                                              as_ptr<const int64_t>(lengths), as_ptr<double>(norms));
        }
        NCUT_CHECK(bad == 0, "k", "contains NaN or inf within the lengths");
      },
      py::arg("k"), py::arg("dtype"), py::arg("batch"), py::arg("n_max"), py::arg("c"), py::arg("lengths"),
      py::arg("norms"),
      "Precision 'exact': reference.normalize_rows's denominators max(||k_i||, 1e-12), bit for bit, of k\n"
      "(batch, n_max, c) float32/float64 into norms (batch, n_max) float64 (1 beyond lengths (batch,) int64).\n"
      "NaN or infinite entries within the lengths raise ValueError. Host pointers.");

  m.def(
      "exact_quantize_cpu",
      [](uintptr_t k, const std::string& dtype, int64_t batch, int64_t n_max, int64_t c, uintptr_t lengths,
         uintptr_t norms, uintptr_t q, int64_t cq, uintptr_t err) {
        const DType dt = ncutfast::parse_dtype(dtype, "dtype");
        check_sizes(batch, n_max);
        NCUT_CHECK(c >= 1 && c <= kMaxTokens, "c", "must be in [1, " << kMaxTokens << "], got " << c);
        NCUT_CHECK(cq >= c && cq % 2 == 0 && cq <= c + 2, "cq", "must be c or c + 1 rounded to even, got " << cq);
        NCUT_CHECK_PTR(k, "k");
        NCUT_CHECK_PTR(lengths, "lengths");
        NCUT_CHECK_PTR(norms, "norms");
        NCUT_CHECK_PTR(q, "q");
        NCUT_CHECK_PTR(err, "err");
        check_host_lengths(as_ptr<const int64_t>(lengths), batch, n_max);
        check_inv_norms(as_ptr<const double>(norms), as_ptr<const int64_t>(lengths), batch, n_max);
        py::gil_scoped_release nogil;
        ncutfast::exact_quantize_cpu(as_ptr<const void>(k), dt, batch, n_max, c, as_ptr<const int64_t>(lengths),
                                     as_ptr<const double>(norms), as_ptr<int16_t>(q), cq, as_ptr<double>(err));
      },
      py::arg("k"), py::arg("dtype"), py::arg("batch"), py::arg("n_max"), py::arg("c"), py::arg("lengths"),
      py::arg("norms"), py::arg("q"), py::arg("cq"), py::arg("err"),
      "Precision 'exact': the int16 screen's rows q (batch, n_max, cq) int16 = clamp(rint(f * 2^15), +-32767)\n"
      "of f = k / norms (k (batch, n_max, c) in `dtype`, norms from exact_row_norms_cpu; cq = c rounded up to\n"
      "even) and err (batch, n_max) float64 >= ||f_i - q_i 2^-15||. Zero beyond the lengths. Host pointers.");

  m.def(
      "exact_graph_cpu",
      [](uintptr_t q, int64_t cq, uintptr_t k, const std::string& dtype, int64_t c, uintptr_t norms, int64_t batch,
         int64_t n_max, uintptr_t lengths, double tau, double bound, double dot_bound, double dot2_bound,
         uintptr_t bits, uintptr_t rechecked, bool simd) {
        const DType dt = ncutfast::parse_dtype(dtype, "dtype");
        check_sizes(batch, n_max);
        NCUT_CHECK(c >= 1 && c <= kMaxTokens, "c", "must be in [1, " << kMaxTokens << "], got " << c);
        NCUT_CHECK(cq >= c && cq % 2 == 0 && cq <= c + 2, "cq", "must be c or c + 1 rounded to even, got " << cq);
        NCUT_CHECK_PTR(q, "q");
        NCUT_CHECK_PTR(k, "k");
        NCUT_CHECK_PTR(norms, "norms");
        NCUT_CHECK_PTR(lengths, "lengths");
        NCUT_CHECK_PTR(bits, "bits");
        NCUT_CHECK_PTR(rechecked, "rechecked");
        check_scalar(tau, "tau");
        for (const auto& [v, arg] : {std::pair{bound, "bound"}, {dot_bound, "dot_bound"}, {dot2_bound, "dot2_bound"}})
          NCUT_CHECK(std::isfinite(v) && v >= 0, arg, "must be finite and >= 0, got " << v);
        check_host_lengths(as_ptr<const int64_t>(lengths), batch, n_max);
        check_inv_norms(as_ptr<const double>(norms), as_ptr<const int64_t>(lengths), batch, n_max);
        py::gil_scoped_release nogil;
        ncutfast::exact_graph_cpu(as_ptr<const int16_t>(q), cq, as_ptr<const void>(k), dt, c,
                                  as_ptr<const double>(norms), batch, n_max, as_ptr<const int64_t>(lengths), tau, bound,
                                  dot_bound, dot2_bound, as_ptr<uint64_t>(bits), as_ptr<int64_t>(rechecked), simd);
      },
      py::arg("q"), py::arg("cq"), py::arg("k"), py::arg("dtype"), py::arg("c"), py::arg("norms"), py::arg("batch"),
      py::arg("n_max"), py::arg("lengths"), py::arg("tau"), py::arg("bound"), py::arg("dot_bound"),
      py::arg("dot2_bound"), py::arg("bits"), py::arg("rechecked"), py::arg("simd") = true,
      "Precision 'exact': the packed graph [f_i . f_j > tau] (f = k / norms, the float64 rows of\n"
      "reference.normalize_rows) into bits (batch, n_max, words_per_row(n_max)) uint64, every word written. The\n"
      "exact int32 products of q (exact_quantize_cpu) decide entries farther than `bound` from tau; the rest\n"
      "are recomputed in float64 (dot_bound, dot2_bound: ncutfast.exact) and counted into rechecked (batch,)\n"
      "int64 (entries i <= j). simd=False: the portable kernel even where AVX2 exists. Host pointers.");

  m.def(
      "solve_binary_cpu",
      [](uintptr_t bits, int64_t batch, int64_t n_max, uintptr_t lengths, double eps, double tol, int max_iter,
         int krylov_dim, int check_every, bool table, int team, uintptr_t lambda2, uintptr_t lambda3, uintptr_t x,
         uintptr_t residual, uintptr_t iterations) {
        check_sizes(batch, n_max);
        NCUT_CHECK(team >= 0 && team <= kMaxTeam, "team", "must be in [0, " << kMaxTeam << "], got " << team);
        NCUT_CHECK_PTR(bits, "bits");
        NCUT_CHECK_PTR(lengths, "lengths");
        check_eps(eps);
        check_host_lengths(as_ptr<const int64_t>(lengths), batch, n_max);
        const LanczosParams params = make_params(tol, max_iter, krylov_dim, check_every);
        const SolveOutputs out = make_outputs(lambda2, lambda3, x, residual, iterations);
        const int64_t stray = ncutfast::find_stray_bits(as_ptr<const uint64_t>(bits), batch, n_max,
                                                        as_ptr<const int64_t>(lengths));
        NCUT_CHECK(stray < 0, "bits", "problem " << stray << " has a set bit at or beyond its length");
        {
          py::gil_scoped_release nogil;
          ncutfast::solve_binary_cpu(as_ptr<const uint64_t>(bits), batch, n_max, as_ptr<const int64_t>(lengths),
                                     eps, params, table, team, out);
        }
        check_solved(out, as_ptr<const int64_t>(lengths), batch);
      },
      py::arg("bits"), py::arg("batch"), py::arg("n_max"), py::arg("lengths"), py::arg("eps"), py::arg("tol"),
      py::arg("max_iter"), py::arg("krylov_dim"), py::arg("check_every"), py::arg("table"), py::arg("team"),
      py::arg("lambda2"), py::arg("lambda3"), py::arg("x"), py::arg("residual"), py::arg("iterations"),
      "Fiedler pairs of binary graphs given as packed bits. Outputs: lambda2, lambda3, residual (batch,)\n"
      "float64, x (batch, n_max) float64, iterations (batch,) int64. table: subset-sum-table mat-vec (else\n"
      "the GPU's set-bit loop); team: threads per problem (0 = automatic, at most MAX_TEAM). Host pointers.");

  m.def(
      "solve_dense_cpu",
      [](uintptr_t s, const std::string& dtype, int64_t batch, int64_t n_max, uintptr_t lengths, double tau,
         double eps, double tol, int max_iter, int krylov_dim, int check_every, int team, uintptr_t lambda2,
         uintptr_t lambda3, uintptr_t x, uintptr_t residual, uintptr_t iterations) {
        const DType dt = ncutfast::parse_dtype(dtype, "dtype");
        check_sizes(batch, n_max);
        NCUT_CHECK(team >= 0 && team <= kMaxTeam, "team", "must be in [0, " << kMaxTeam << "], got " << team);
        NCUT_CHECK_PTR(s, "s");
        NCUT_CHECK_PTR(lengths, "lengths");
        check_scalar(tau, "tau");
        check_eps(eps);
        check_host_lengths(as_ptr<const int64_t>(lengths), batch, n_max);
        const LanczosParams params = make_params(tol, max_iter, krylov_dim, check_every);
        const SolveOutputs out = make_outputs(lambda2, lambda3, x, residual, iterations);
        {
          py::gil_scoped_release nogil;
          ncutfast::solve_dense_cpu(as_ptr<const void>(s), dt, batch, n_max, as_ptr<const int64_t>(lengths), tau,
                                    eps, params, team, out);
        }
        check_degrees(out.iterations, batch);
        check_solved(out, as_ptr<const int64_t>(lengths), batch);
      },
      py::arg("s"), py::arg("dtype"), py::arg("batch"), py::arg("n_max"), py::arg("lengths"), py::arg("tau"),
      py::arg("eps"), py::arg("tol"), py::arg("max_iter"), py::arg("krylov_dim"), py::arg("check_every"),
      py::arg("team"), py::arg("lambda2"), py::arg("lambda3"), py::arg("x"), py::arg("residual"),
      py::arg("iterations"),
      "Fiedler pairs of non-binary graphs W = s (eps where s < tau), s (batch, n_max, n_max). Host pointers.\n"
      "A NaN similarity or a degree <= 0 (tau < 0) raises ValueError.");

#ifdef NCUTFAST_WITH_CUDA
  m.def(
      "cuda_device_count",
      []() {
        int count = 0;
        const int err = ncutfast::cuda_device_count(&count);
        return std::make_tuple(count, err, std::string(err ? ncutfast::cuda_error_message(err) : ""));
      },
      "(count, cudaError_t, message) of cudaGetDeviceCount; never raises (no driver: (0, 35, ...)).");

  m.def(
      "pack_graph_cuda",
      [](uintptr_t s, const std::string& dtype, int64_t batch, int64_t n_max, uintptr_t lengths, double tau,
         uintptr_t bits, int device, uintptr_t stream) {
        const DType dt = ncutfast::parse_dtype(dtype, "dtype");
        check_sizes(batch, n_max);
        NCUT_CHECK_PTR(s, "s");
        NCUT_CHECK_PTR(lengths, "lengths");
        NCUT_CHECK_PTR(bits, "bits");
        check_scalar(tau, "tau");
        NCUT_CHECK(device >= 0, "device", "must be >= 0, got " << device);
        int err;
        {
          py::gil_scoped_release nogil;
          err = ncutfast::pack_graph_cuda(as_ptr<const void>(s), dt, batch, n_max, as_ptr<const int64_t>(lengths),
                                          tau, as_ptr<uint64_t>(bits), device, as_ptr<void>(stream));
        }
        check_cuda(err, "pack_graph_cuda");
      },
      py::arg("s"), py::arg("dtype"), py::arg("batch"), py::arg("n_max"), py::arg("lengths"), py::arg("tau"),
      py::arg("bits"), py::arg("device"), py::arg("stream"),
      "pack_graph_cpu on device pointers, queued on `stream` (a cudaStream_t address; 0 = legacy default).");

  m.def(
      "solve_binary_cuda",
      [](uintptr_t bits, int64_t batch, int64_t n_max, uintptr_t lengths, double eps, double tol, int max_iter,
         int krylov_dim, int check_every, uintptr_t workspace, uintptr_t lambda2, uintptr_t lambda3, uintptr_t x,
         uintptr_t residual, uintptr_t iterations, int device, uintptr_t stream) {
        check_sizes(batch, n_max);
        NCUT_CHECK_PTR(bits, "bits");
        NCUT_CHECK_PTR(lengths, "lengths");
        NCUT_CHECK_PTR(workspace, "workspace");
        check_eps(eps);
        NCUT_CHECK(device >= 0, "device", "must be >= 0, got " << device);
        const LanczosParams params = make_params(tol, max_iter, krylov_dim, check_every);
        const SolveOutputs out = make_outputs(lambda2, lambda3, x, residual, iterations);
        int err;
        {
          py::gil_scoped_release nogil;
          err = ncutfast::solve_binary_cuda(as_ptr<const uint64_t>(bits), batch, n_max,
                                            as_ptr<const int64_t>(lengths), eps, params, as_ptr<double>(workspace),
                                            out, device, as_ptr<void>(stream));
        }
        check_cuda(err, "solve_binary_cuda");
      },
      py::arg("bits"), py::arg("batch"), py::arg("n_max"), py::arg("lengths"), py::arg("eps"), py::arg("tol"),
      py::arg("max_iter"), py::arg("krylov_dim"), py::arg("check_every"), py::arg("workspace"),
      py::arg("lambda2"), py::arg("lambda3"), py::arg("x"), py::arg("residual"), py::arg("iterations"),
      py::arg("device"), py::arg("stream"),
      "solve_binary_cpu on device pointers; workspace: batch * workspace_doubles(n_max, krylov_dim) float64.");

  m.def(
      "solve_dense_cuda",
      [](uintptr_t s, const std::string& dtype, int64_t batch, int64_t n_max, uintptr_t lengths, double tau,
         double eps, double tol, int max_iter, int krylov_dim, int check_every, uintptr_t workspace,
         uintptr_t lambda2, uintptr_t lambda3, uintptr_t x, uintptr_t residual, uintptr_t iterations, int device,
         uintptr_t stream) {
        const DType dt = ncutfast::parse_dtype(dtype, "dtype");
        check_sizes(batch, n_max);
        NCUT_CHECK_PTR(s, "s");
        NCUT_CHECK_PTR(lengths, "lengths");
        NCUT_CHECK_PTR(workspace, "workspace");
        check_scalar(tau, "tau");
        check_eps(eps);
        NCUT_CHECK(device >= 0, "device", "must be >= 0, got " << device);
        const LanczosParams params = make_params(tol, max_iter, krylov_dim, check_every);
        const SolveOutputs out = make_outputs(lambda2, lambda3, x, residual, iterations);
        int err;
        {
          py::gil_scoped_release nogil;
          err = ncutfast::solve_dense_cuda(as_ptr<const void>(s), dt, batch, n_max, as_ptr<const int64_t>(lengths),
                                           tau, eps, params, as_ptr<double>(workspace), out, device,
                                           as_ptr<void>(stream));
        }
        check_cuda(err, "solve_dense_cuda");
      },
      py::arg("s"), py::arg("dtype"), py::arg("batch"), py::arg("n_max"), py::arg("lengths"), py::arg("tau"),
      py::arg("eps"), py::arg("tol"), py::arg("max_iter"), py::arg("krylov_dim"), py::arg("check_every"),
      py::arg("workspace"), py::arg("lambda2"), py::arg("lambda3"), py::arg("x"), py::arg("residual"),
      py::arg("iterations"), py::arg("device"), py::arg("stream"), "solve_dense_cpu on device pointers.");
#endif
}
