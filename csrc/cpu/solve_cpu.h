// OpenMP launchers of the deflated Lanczos solver (algorithm: ncut/lanczos.h).
#pragma once

#include "../common.h"
#include "../ncut/lanczos.h"

namespace ncutfast {

/// Binary graph from packed bits (batch, n_max, words_per_row(n_max)); eps is the non-edge weight.
/// `table` selects the CPU's subset-sum-table mat-vec; false runs the plain set-bit loop the GPU uses.
/// `team`: threads per problem; 1 = one problem per thread, 0 = automatic. Teams synchronize exactly like
/// the GPU's thread blocks, so tests run teams to check the solver's synchronization on the CPU.
void solve_binary_cpu(const uint64_t* bits, int64_t batch, int64_t n_max, const int64_t* lengths, double eps,
                      const LanczosParams& params, bool table, int team, const SolveOutputs& out);

/// Non-binary graph from the similarities s (batch, n_max, n_max): W = s, eps where s < tau.
void solve_dense_cpu(const void* s, DType dtype, int64_t batch, int64_t n_max, const int64_t* lengths, double tau,
                     double eps, const LanczosParams& params, int team, const SolveOutputs& out);

/// Threads the CPU launchers use (OpenMP's current maximum).
int cpu_threads();

}  // namespace ncutfast
