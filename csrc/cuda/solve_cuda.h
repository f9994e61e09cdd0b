// CUDA launchers of the deflated Lanczos solver (algorithm: ncut/lanczos.h). One thread block solves one
// problem from start to end, so a batch is a single launch with no host synchronization.
// Same signatures as cpu/solve_cpu.h plus the device workspace, the device and the stream; every pointer
// is a device pointer. Each returns a cudaError_t value (0 on success).
#pragma once

#include "../common.h"
#include "../ncut/lanczos.h"

namespace ncutfast {

/// workspace: batch * workspace_doubles(n_max, params.krylov_dim) float64.
int solve_binary_cuda(const uint64_t* bits, int64_t batch, int64_t n_max, const int64_t* lengths, double eps,
                      const LanczosParams& params, double* workspace, const SolveOutputs& out, int device,
                      void* stream);

int solve_dense_cuda(const void* s, DType dtype, int64_t batch, int64_t n_max, const int64_t* lengths, double tau,
                     double eps, const LanczosParams& params, double* workspace, const SolveOutputs& out,
                     int device, void* stream);

}  // namespace ncutfast
