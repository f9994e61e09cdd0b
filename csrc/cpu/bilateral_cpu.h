// The bilateral solver's grid and solve on the CPU (OpenMP over images): TokenCut's algorithm (spec §3) as
// ncutfast.reference.bilateral_solve computes it, from the pixels' vertex keys that ncutfast.refine computes.
#pragma once

#include <cstdint>

namespace ncutfast {

/// Grid dimensions (x, y, Y, U, V) and blur taps per vertex (below in dim 4, ..., 0, above in dim 0, ..., 4).
constexpr int kBsDims = 5;
constexpr int kBsTaps = 2 * kBsDims;

/// The vertex key sum_d coord_d * strides[d] of every pixel of uint8 (heights[i], widths[i], 3) RGB images
/// (images: n_images addresses) into keys (int32 if !keys64, else int64; the images' pixels one after the
/// other): coordinates x / sigmas[0], y / sigmas[0], then per YUV channel c ((coef[3c] R + coef[3c + 1] G) +
/// coef[3c + 2] B) + offset[c], divided by sigmas[1] (Y) or sigmas[2] (U, V), truncated toward zero; every
/// float64 operation rounded as NumPy rounds it (no fused multiply-add), so the keys are the reference's.
void bilateral_keys_cpu(const uint8_t* const* images, const int64_t* heights, const int64_t* widths,
                        int64_t n_images, const double* sigmas, const double* coef, const double* offset,
                        const int64_t* strides, bool keys64, void* keys);

/// The grids of a batch. Image i owns pixels [o_i, o_i + npix[i]) of `keys` (int32 if !keys64, else int64;
/// o_i = npix[0] + ... + npix[i - 1]). Per image: n_vertices[i] = V_i distinct keys; vertex_keys[o_i + v]
/// (v < V_i, ascending), counts[o_i + v] (pixels per vertex), taps[10 o_i + 10 v + j] (the vertex whose key is
/// key_v -+ strides[d], as a local index, or -1) and inverse[o_i + p] (every pixel's vertex). Entries of the
/// vertex outputs beyond V_i are not written.
void bilateral_grid_cpu(const void* keys, bool keys64, int64_t n_images, const int64_t* npix,
                        const int64_t* strides, int64_t* inverse, int64_t* n_vertices, int64_t* vertex_keys,
                        int64_t* counts, int32_t* taps);

/// The solve of every image (bistochastization, A, b, Jacobi-preconditioned CG exactly as SciPy's `cg` with
/// rtol `tol`, atol 0, at most `max_iter` iterations, slice) from the same keys: targets[i] and out[i] are
/// image i's float64 (npix[i],) pixels. Returns the CG iterations of each image in iterations (n_images,).
void bilateral_solve_cpu(const void* keys, bool keys64, int64_t n_images, const int64_t* npix,
                         const int64_t* strides, const double* const* targets, double confidence, double lam,
                         int bistochastic_iters, double a_diag_min, double tol, int max_iter, double* const* out,
                         int64_t* iterations);

}  // namespace ncutfast
