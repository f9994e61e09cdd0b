#include <cuda_runtime.h>

#include "../ncut/graph.h"
#include "../ncut/lanczos.h"
#include "solve_cuda.h"

namespace ncutfast {

namespace {

constexpr int kSolveThreads = 512;

__device__ __forceinline__ double warp_sum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

/// A thread block solving one problem: rows are strided over the threads (coalesced vector loops).
struct BlockExec {
  double* red;  // shared, 2 x 32 warp partials
  int parity;

  __device__ int64_t begin(int64_t) const { return threadIdx.x; }
  __device__ int64_t end(int64_t n) const { return n; }
  __device__ int64_t stride() const { return blockDim.x; }
  __device__ bool leader() const { return threadIdx.x == 0; }
  __device__ void sync() const { __syncthreads(); }
  // Butterfly within each warp, then every thread adds the warp partials in order; double-buffered so a
  // single barrier per sum is enough (the next call writes the other half).
  __device__ double sum(double v) {
    v = warp_sum(v);
    double* half = red + parity * 32;
    if ((threadIdx.x & 31) == 0) half[threadIdx.x >> 5] = v;
    __syncthreads();
    double total = 0.0;
    for (int k = 0; k < static_cast<int>(blockDim.x >> 5); ++k) total += half[k];
    parity ^= 1;
    return total;
  }
  // One warp per vector, lanes over rows (coalesced); h lives in the problem's workspace.
  __device__ void dots(int64_t n, int rows, const double* v, int64_t st, const double* w, double* h) {
    __syncthreads();  // every thread has finished reading h from the previous call
    const int lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    for (int t = threadIdx.x >> 5; t < rows; t += nwarps) {
      const double* vt = v + t * st;
      double acc = 0.0;
      for (int64_t i = lane; i < n; i += 32) acc += vt[i] * w[i];
      acc = warp_sum(acc);
      if (lane == 0) h[t] = acc;
    }
    __syncthreads();
  }
};

/// Binary graph: one warp per row, lanes over the row's words (ncut/graph.h's per-word math).
struct WarpBitOp {
  const uint64_t* bits;
  int64_t n;
  int64_t words;
  double eps;

  __device__ void degrees(BlockExec&, double* d) const {
    const int lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    for (int64_t i = threadIdx.x >> 5; i < n; i += nwarps) {
      double edges = 0.0;
      for (int64_t w = lane; w < words; w += 32) edges += popcount64(bits[i * words + w]);
      edges = warp_sum(edges);
      if (lane == 0) d[i] = binary_degree(static_cast<int64_t>(edges), n, eps);
    }
  }
  __device__ void apply(BlockExec& ex, const double* u, double* z) const {
    double part = 0.0;
    for (int64_t i = ex.begin(n); i < ex.end(n); i += ex.stride()) part += u[i];
    const double su = ex.sum(part);
    const int lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    for (int64_t i = threadIdx.x >> 5; i < n; i += nwarps) {
      double bu = 0.0;
      for (int64_t w = lane; w < words; w += 32) bu += word_dot(bits[i * words + w], u + 64 * w);
      bu = warp_sum(bu);
      if (lane == 0) z[i] = binary_apply(su, bu, eps);
    }
  }
};

/// Non-binary graph: one warp per row of the similarity matrix, lanes over columns (coalesced).
template <typename T>
struct WarpDenseOp {
  const T* s;
  int64_t n;
  int64_t n_max;
  double tau;
  double eps;

  __device__ void degrees(BlockExec&, double* d) const {
    const int lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    for (int64_t i = threadIdx.x >> 5; i < n; i += nwarps) {
      double acc = 0.0;
      for (int64_t j = lane; j < n; j += 32) acc += dense_weight(s[i * n_max + j], tau, eps);
      acc = warp_sum(acc);
      if (lane == 0) d[i] = acc;
    }
  }
  __device__ void apply(BlockExec&, const double* u, double* z) const {
    const int lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    for (int64_t i = threadIdx.x >> 5; i < n; i += nwarps) {
      double acc = 0.0;
      for (int64_t j = lane; j < n; j += 32) acc += dense_weight(s[i * n_max + j], tau, eps) * u[j];
      acc = warp_sum(acc);
      if (lane == 0) z[i] = acc;
    }
  }
};

__global__ void __launch_bounds__(kSolveThreads)
    solve_binary_kernel(const uint64_t* __restrict__ bits, int64_t n_max, const int64_t* __restrict__ lengths,
                        double eps, LanczosParams params, double* workspace, SolveOutputs out) {
  __shared__ double red[64];
  const int64_t b = blockIdx.x;
  const int64_t words = words_per_row(n_max);
  BlockExec ex{red, 0};
  const WarpBitOp op{bits + b * n_max * words, lengths[b], words, eps};
  const Workspace ws =
      carve_workspace(workspace + b * workspace_doubles(n_max, params.krylov_dim), n_max, params.krylov_dim);
  lanczos_solve(ex, op, lengths[b], n_max, params, ws, item_out(out, b, n_max));
}

template <typename T>
__global__ void __launch_bounds__(kSolveThreads)
    solve_dense_kernel(const T* __restrict__ s, int64_t n_max, const int64_t* __restrict__ lengths, double tau,
                       double eps, LanczosParams params, double* workspace, SolveOutputs out) {
  __shared__ double red[64];
  const int64_t b = blockIdx.x;
  BlockExec ex{red, 0};
  const WarpDenseOp<T> op{s + b * n_max * n_max, lengths[b], n_max, tau, eps};
  const Workspace ws =
      carve_workspace(workspace + b * workspace_doubles(n_max, params.krylov_dim), n_max, params.krylov_dim);
  lanczos_solve(ex, op, lengths[b], n_max, params, ws, item_out(out, b, n_max));
}

}  // namespace

int solve_binary_cuda(const uint64_t* bits, int64_t batch, int64_t n_max, const int64_t* lengths, double eps,
                      const LanczosParams& params, double* workspace, const SolveOutputs& out, int device,
                      void* stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  solve_binary_kernel<<<static_cast<unsigned>(batch), kSolveThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      bits, n_max, lengths, eps, params, workspace, out);
  return cudaGetLastError();
}

int solve_dense_cuda(const void* s, DType dtype, int64_t batch, int64_t n_max, const int64_t* lengths, double tau,
                     double eps, const LanczosParams& params, double* workspace, const SolveOutputs& out,
                     int device, void* stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  NCUT_DISPATCH_FLOAT(dtype, [&] {
    solve_dense_kernel<scalar_t><<<static_cast<unsigned>(batch), kSolveThreads, 0,
                                   static_cast<cudaStream_t>(stream)>>>(static_cast<const scalar_t*>(s), n_max,
                                                                        lengths, tau, eps, params, workspace, out);
  });
  return cudaGetLastError();
}

}  // namespace ncutfast
