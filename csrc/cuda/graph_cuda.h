// CUDA launchers that build the packed binary graph (math: ncut/graph.h). Same layout as cpu/graph_cpu.h;
// all pointers are device pointers, and the work is queued on `stream` of `device`.
#pragma once

#include "../common.h"

namespace ncutfast {

/// Returns a cudaError_t value (0 on success).
int pack_graph_cuda(const void* s, DType dtype, int64_t batch, int64_t n_max, const int64_t* lengths, double tau,
                    uint64_t* bits, int device, void* stream);

/// Number of visible CUDA devices in *count; returns the cudaError_t of the query and never throws.
/// A failed query (no driver: error 35) reports 0 devices and clears the error.
int cuda_device_count(int* count);

/// Message of a cudaError_t value.
const char* cuda_error_message(int err);

}  // namespace ncutfast
