#include <cuda_runtime.h>

#include "../ncut/graph.h"
#include "graph_cuda.h"

namespace ncutfast {

namespace {

constexpr int kPackWarps = 8;

/// One warp per row: lane l decides columns 64 w + l and 64 w + 32 + l, and two ballots make the word.
template <typename T>
__global__ void pack_graph_kernel(const T* __restrict__ s, int64_t batch, int64_t n_max,
                                  const int64_t* __restrict__ lengths, double tau, uint64_t* __restrict__ bits) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kPackWarps + (threadIdx.x >> 5);
  if (row >= batch * n_max) return;  // whole warps exit together: the ballots below stay full-warp
  const int64_t b = row / n_max, i = row % n_max;
  const int64_t n = lengths[b];
  const int64_t words = words_per_row(n_max);
  const T* srow = s + row * n_max;
  uint64_t* out = bits + row * words;
  for (int64_t w = 0; w < words; ++w) {
    const int64_t c0 = 64 * w + lane, c1 = c0 + 32;
    // Columns at or beyond n (and every column of a padding row) are not edges.
    const bool e0 = i < n && c0 < n && is_edge(srow[c0], tau);
    const bool e1 = i < n && c1 < n && is_edge(srow[c1], tau);
    const uint32_t lo = __ballot_sync(0xffffffffu, e0);
    const uint32_t hi = __ballot_sync(0xffffffffu, e1);
    if (lane == 0) out[w] = static_cast<uint64_t>(lo) | (static_cast<uint64_t>(hi) << 32);
  }
}

}  // namespace

int pack_graph_cuda(const void* s, DType dtype, int64_t batch, int64_t n_max, const int64_t* lengths, double tau,
                    uint64_t* bits, int device, void* stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  const int64_t rows = batch * n_max;
  const dim3 grid(static_cast<unsigned>((rows + kPackWarps - 1) / kPackWarps));
  const dim3 block(32 * kPackWarps);
  auto st = static_cast<cudaStream_t>(stream);
  NCUT_DISPATCH_FLOAT(dtype, [&] {
    pack_graph_kernel<scalar_t><<<grid, block, 0, st>>>(static_cast<const scalar_t*>(s), batch, n_max, lengths,
                                                        tau, bits);
  });
  return cudaGetLastError();
}

int cuda_device_count(int* count) {
  *count = 0;
  const cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    *count = 0;
    cudaGetLastError();  // clear the error so later runtime calls do not report it
  }
  return err;
}

const char* cuda_error_message(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace ncutfast
