// The bilateral solver on the CPU (see bilateral_cpu.h): one image per OpenMP iteration; each image's vertices
// found by a hash table over its pixel keys (O(P)), then only the V distinct keys are sorted.
#include "bilateral_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace ncutfast {
namespace {

/// Open-addressing (linear probing) map from a vertex key to its id, grown at half load. One uint64 per slot
/// for int32 keys (key in the high half, id + 1 in the low half, 0 = empty): half the memory traffic.
template <typename K>
class KeyTable;

template <>
class KeyTable<int32_t> {
 public:
  KeyTable() { reset(12); }

  /// The id of `key`, inserting it as `next_id` when absent (then `inserted` is set).
  int32_t find_or_insert(int32_t key, int32_t next_id, bool& inserted) {
    const uint64_t tag = static_cast<uint64_t>(static_cast<uint32_t>(key)) << 32;
    for (uint64_t i = home(key);; i = (i + 1) & mask_) {
      const uint64_t e = slots_[i];
      if (e == 0) {
        slots_[i] = tag | static_cast<uint32_t>(next_id + 1);
        inserted = true;
        if (2 * (++size_) > slots_.size()) grow();
        return next_id;
      }
      if ((e & kHigh) == tag) {
        inserted = false;
        return static_cast<int32_t>(e & ~kHigh) - 1;
      }
    }
  }

  /// The id of `key`, or -1.
  int32_t find(int64_t key) const {
    if (key < 0 || key > INT32_MAX) return -1;
    const uint64_t tag = static_cast<uint64_t>(key) << 32;
    for (uint64_t i = home(static_cast<int32_t>(key));; i = (i + 1) & mask_) {
      const uint64_t e = slots_[i];
      if (e == 0) return -1;
      if ((e & kHigh) == tag) return static_cast<int32_t>(e & ~kHigh) - 1;
    }
  }

 private:
  static constexpr uint64_t kHigh = ~uint64_t{0} << 32;

  uint64_t home(int32_t key) const {
    return (static_cast<uint64_t>(static_cast<uint32_t>(key)) * 0x9E3779B97F4A7C15ull) >> shift_;
  }

  void reset(int bits) {
    slots_.assign(size_t{1} << bits, 0);
    mask_ = (uint64_t{1} << bits) - 1;
    shift_ = 64 - bits;
    size_ = 0;
  }

  void grow() {
    const std::vector<uint64_t> old = std::move(slots_);
    reset(64 - shift_ + 1);
    for (const uint64_t e : old) {
      if (e == 0) continue;
      uint64_t i = home(static_cast<int32_t>(e >> 32));
      while (slots_[i] != 0) i = (i + 1) & mask_;
      slots_[i] = e;
      ++size_;
    }
  }

  std::vector<uint64_t> slots_;
  uint64_t mask_ = 0;
  int shift_ = 0;
  size_t size_ = 0;
};

template <>
class KeyTable<int64_t> {
 public:
  KeyTable() { reset(12); }

  /// The id of `key`, inserting it as `next_id` when absent (then `inserted` is set).
  int32_t find_or_insert(int64_t key, int32_t next_id, bool& inserted) {
    for (uint64_t i = home(key);; i = (i + 1) & mask_) {
      if (ids_[i] < 0) {
        keys_[i] = key;
        ids_[i] = next_id;
        inserted = true;
        if (2 * (++size_) > ids_.size()) grow();
        return next_id;
      }
      if (keys_[i] == key) {
        inserted = false;
        return ids_[i];
      }
    }
  }

  /// The id of `key`, or -1.
  int32_t find(int64_t key) const {
    for (uint64_t i = home(key);; i = (i + 1) & mask_) {
      if (ids_[i] < 0 || keys_[i] == key) return ids_[i];
    }
  }

 private:
  uint64_t home(int64_t key) const { return (static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull) >> shift_; }

  void reset(int bits) {
    keys_.assign(size_t{1} << bits, 0);
    ids_.assign(size_t{1} << bits, -1);
    mask_ = (uint64_t{1} << bits) - 1;
    shift_ = 64 - bits;
    size_ = 0;
  }

  void grow() {
    const std::vector<int64_t> old_keys = std::move(keys_);
    const std::vector<int32_t> old_ids = std::move(ids_);
    reset(64 - shift_ + 1);
    for (size_t j = 0; j < old_ids.size(); ++j) {
      if (old_ids[j] < 0) continue;
      uint64_t i = home(old_keys[j]);
      while (ids_[i] >= 0) i = (i + 1) & mask_;
      keys_[i] = old_keys[j];
      ids_[i] = old_ids[j];
      ++size_;
    }
  }

  std::vector<int64_t> keys_;
  std::vector<int32_t> ids_;  // -1: empty slot
  uint64_t mask_ = 0;
  int shift_ = 0;
  size_t size_ = 0;
};

/// One image's grid: vertices in ascending key order.
struct Grid {
  std::vector<int64_t> keys;     // (V,)
  std::vector<int64_t> counts;   // (V,) pixels per vertex
  std::vector<int32_t> inverse;  // (P,) vertex of every pixel
  std::vector<int32_t> taps;     // (V, 10) neighbour vertex or -1
};

template <typename K>
void build_grid(const K* key, int64_t npix, const int64_t* strides, Grid& g) {
  KeyTable<K> table;
  std::vector<std::pair<int64_t, int32_t>> firsts;  // (key, id) in order of first appearance
  g.inverse.resize(npix);
  K last = 0;
  int32_t last_id = -1;
  for (int64_t p = 0; p < npix; ++p) {  // neighbouring pixels often share a vertex: skip the lookup
    const K k = key[p];
    if (last_id < 0 || k != last) {
      bool inserted;
      last_id = table.find_or_insert(k, static_cast<int32_t>(firsts.size()), inserted);
      if (inserted) firsts.emplace_back(k, last_id);
      last = k;
    }
    g.inverse[p] = last_id;
  }
  const int32_t nv = static_cast<int32_t>(firsts.size());
  std::sort(firsts.begin(), firsts.end());  // only the V distinct keys are sorted
  std::vector<int32_t> rank(nv);
  g.keys.resize(nv);
  for (int32_t v = 0; v < nv; ++v) {
    rank[firsts[v].second] = v;
    g.keys[v] = firsts[v].first;
  }
  g.counts.assign(nv, 0);
  for (int64_t p = 0; p < npix; ++p) {
    const int32_t v = rank[g.inverse[p]];
    g.inverse[p] = v;
    ++g.counts[v];
  }
  // Absent neighbours point at index nv, one past the vertices, where every vector the taps read holds 0.
  // u is v's neighbour above in dimension d exactly when v is u's below: only the above ones are looked up.
  g.taps.assign(static_cast<size_t>(nv) * kBsTaps, nv);
  for (int32_t v = 0; v < nv; ++v) {
    for (int d = 0; d < kBsDims; ++d) {
      int32_t above;
      if (d == 0 && strides[0] == 1)  // sorted distinct keys: key + 1, if present, is the next vertex
        above = v + 1 < nv && g.keys[v + 1] == g.keys[v] + 1 ? v + 1 : -1;
      else
        above = table.find(g.keys[v] + strides[d]);
      if (above < 0) continue;
      if (!(d == 0 && strides[0] == 1)) above = rank[above];
      g.taps[static_cast<size_t>(v) * kBsTaps + kBsDims + d] = above;
      g.taps[static_cast<size_t>(above) * kBsTaps + kBsDims - 1 - d] = v;
    }
  }
}

void build_grid(const void* keys, bool keys64, int64_t offset, int64_t npix, const int64_t* strides, Grid& g) {
  if (keys64)
    build_grid(static_cast<const int64_t*>(keys) + offset, npix, strides, g);
  else
    build_grid(static_cast<const int32_t*>(keys) + offset, npix, strides, g);
}

std::vector<int64_t> pixel_offsets(int64_t n_images, const int64_t* npix) {
  std::vector<int64_t> off(n_images + 1, 0);
  for (int64_t i = 0; i < n_images; ++i) off[i + 1] = off[i] + npix[i];
  return off;
}

/// [1 2 1] in every dimension, as the reference sums it: 2 * 5 * x, then + (x below + x above) per dimension
/// (an absent neighbour reads x[nv] = 0).
void blur(const Grid& g, const double* x, double* out) {
  const size_t nv = g.keys.size();
  for (size_t v = 0; v < nv; ++v) {
    const int32_t* t = &g.taps[v * kBsTaps];
    double acc = 2.0 * kBsDims * x[v];
    for (int d = 0; d < kBsDims; ++d) acc += x[t[kBsDims - 1 - d]] + x[t[kBsDims + d]];
    out[v] = acc;
  }
}

/// One image: reference.bilateral_solve from its grid; returns the CG iterations. Vectors the taps read have
/// nv + 1 entries, the last 0.
int64_t solve_image(const Grid& g, const double* target, double confidence, double lam, int bistochastic_iters,
                    double a_diag_min, double tol, int max_iter, double* out) {
  const size_t nv = g.keys.size();
  const size_t npix = g.inverse.size();
  // Bistochastization: m = splat(1); n = 1; n = sqrt(n * m / blur(n)) repeatedly; m = n * blur(n).
  std::vector<double> m(nv), n(nv + 1, 1.0), blurred(nv);
  n[nv] = 0.0;
  for (size_t v = 0; v < nv; ++v) m[v] = static_cast<double>(g.counts[v]);
  for (int it = 0; it < bistochastic_iters; ++it) {
    blur(g, n.data(), blurred.data());
    for (size_t v = 0; v < nv; ++v) n[v] = std::sqrt(n[v] * m[v] / blurred[v]);
  }
  blur(g, n.data(), blurred.data());
  // c_splat = splat(c), b = splat(t c), summed over pixels in order as the reference's CSR products.
  std::vector<double> c_splat(nv, 0.0), b(nv, 0.0);
  for (size_t p = 0; p < npix; ++p) {
    const int32_t v = g.inverse[p];
    c_splat[v] += confidence;
    b[v] += target[p] * confidence;
  }
  // A = lam (Dm - Dn B Dn) + diag(c_splat): diagonal lam (m - n (10 n)) + c_splat, off-diagonal -lam n_u n_v.
  std::vector<double> diag(nv), lam_n(nv), precond(nv);
  for (size_t v = 0; v < nv; ++v) {
    const double mv = n[v] * blurred[v];
    diag[v] = lam * (mv - n[v] * (2.0 * kBsDims * n[v])) + c_splat[v];
    lam_n[v] = lam * n[v];
    precond[v] = 1.0 / std::max(diag[v], a_diag_min);
  }
  std::vector<double> scaled(nv + 1, 0.0);  // n y, read through the taps
  // q = A y; returns y . q.
  auto matvec = [&](const double* y, double* q) {
    for (size_t v = 0; v < nv; ++v) scaled[v] = n[v] * y[v];
    double yq = 0.0;
    for (size_t v = 0; v < nv; ++v) {
      const int32_t* t = &g.taps[v * kBsTaps];
      double acc = 0.0;
      for (int j = 0; j < kBsTaps; ++j) acc += scaled[t[j]];
      q[v] = diag[v] * y[v] - lam_n[v] * acc;
      yq += y[v] * q[v];
    }
    return yq;
  };
  // SciPy's cg: stop when ||r|| < max(tol ||b||, 0); ||b|| = 0 returns b.
  std::vector<double> x(nv), r(nv), z(nv), p(nv), q(nv);
  double bb = 0.0;
  for (size_t v = 0; v < nv; ++v) bb += b[v] * b[v];
  const double bnorm = std::sqrt(bb);
  int64_t iterations = 0;
  if (bnorm == 0.0) {
    x = b;
  } else {
    for (size_t v = 0; v < nv; ++v) x[v] = b[v] / c_splat[v];
    matvec(x.data(), q.data());
    double rr = 0.0, rho = 0.0;  // r . r and r . z of the current r
    for (size_t v = 0; v < nv; ++v) {
      r[v] = b[v] - q[v];
      z[v] = precond[v] * r[v];
      rr += r[v] * r[v];
      rho += r[v] * z[v];
    }
    const double atol = tol * bnorm;
    double rho_prev = 1.0;
    for (int it = 0; it < max_iter && !(std::sqrt(rr) < atol); ++it) {
      if (it == 0) {
        p = z;
      } else {
        const double beta = rho / rho_prev;
        for (size_t v = 0; v < nv; ++v) p[v] = p[v] * beta + z[v];
      }
      const double alpha = rho / matvec(p.data(), q.data());
      rho_prev = rho;
      rr = rho = 0.0;
      for (size_t v = 0; v < nv; ++v) {
        x[v] += alpha * p[v];
        r[v] -= alpha * q[v];
        z[v] = precond[v] * r[v];
        rr += r[v] * r[v];
        rho += r[v] * z[v];
      }
      iterations = it + 1;
    }
  }
  for (size_t px = 0; px < npix; ++px) out[px] = x[g.inverse[px]];
  return iterations;
}

// The YUV arithmetic must round every product and sum as NumPy does: no contraction into fused multiply-adds
// (GCC contracts across statements in C++ whenever the target has FMA, e.g. with -march=native).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename K>
void image_keys(const uint8_t* image, int64_t h, int64_t w, const double* sigmas, const double* coef,
                const double* offset, const int64_t* strides, K* key) {
  std::vector<int64_t> cols(w);
  for (int64_t x = 0; x < w; ++x) cols[x] = static_cast<int64_t>(static_cast<double>(x) / sigmas[0]) * strides[0];
  const double sigma[3] = {sigmas[1], sigmas[2], sigmas[2]};
  for (int64_t y = 0; y < h; ++y) {
    const int64_t row = static_cast<int64_t>(static_cast<double>(y) / sigmas[0]) * strides[1];
    const uint8_t* px = image + 3 * y * w;
    K* out = key + y * w;
    for (int64_t x = 0; x < w; ++x, px += 3) {
      const double r = px[0], g = px[1], b = px[2];
      int64_t k = row + cols[x];
      for (int c = 0; c < 3; ++c) {
        double v = r * coef[3 * c];
        v += g * coef[3 * c + 1];
        v += b * coef[3 * c + 2];
        v += offset[c];
        k += static_cast<int64_t>(v / sigma[c]) * strides[2 + c];
      }
      out[x] = static_cast<K>(k);
    }
  }
}
#pragma GCC pop_options

}  // namespace

void bilateral_keys_cpu(const uint8_t* const* images, const int64_t* heights, const int64_t* widths,
                        int64_t n_images, const double* sigmas, const double* coef, const double* offset,
                        const int64_t* strides, bool keys64, void* keys) {
  std::vector<int64_t> off(n_images + 1, 0);
  for (int64_t i = 0; i < n_images; ++i) off[i + 1] = off[i] + heights[i] * widths[i];
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n_images; ++i) {
    if (keys64)
      image_keys(images[i], heights[i], widths[i], sigmas, coef, offset, strides,
                 static_cast<int64_t*>(keys) + off[i]);
    else
      image_keys(images[i], heights[i], widths[i], sigmas, coef, offset, strides,
                 static_cast<int32_t*>(keys) + off[i]);
  }
}

void bilateral_grid_cpu(const void* keys, bool keys64, int64_t n_images, const int64_t* npix,
                        const int64_t* strides, int64_t* inverse, int64_t* n_vertices, int64_t* vertex_keys,
                        int64_t* counts, int32_t* taps) {
  const std::vector<int64_t> off = pixel_offsets(n_images, npix);
#pragma omp parallel
  {
    Grid g;  // reused by the thread's images: fresh pixel-sized buffers would cost page faults
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_images; ++i) {
      build_grid(keys, keys64, off[i], npix[i], strides, g);
      const int32_t nv = static_cast<int32_t>(g.keys.size());
      n_vertices[i] = nv;
      std::copy(g.keys.begin(), g.keys.end(), vertex_keys + off[i]);
      std::copy(g.counts.begin(), g.counts.end(), counts + off[i]);
      std::transform(g.taps.begin(), g.taps.end(), taps + kBsTaps * off[i],
                     [nv](int32_t t) { return t == nv ? -1 : t; });
      std::copy(g.inverse.begin(), g.inverse.end(), inverse + off[i]);
    }
  }
}

void bilateral_solve_cpu(const void* keys, bool keys64, int64_t n_images, const int64_t* npix,
                         const int64_t* strides, const double* const* targets, double confidence, double lam,
                         int bistochastic_iters, double a_diag_min, double tol, int max_iter, double* const* out,
                         int64_t* iterations) {
  const std::vector<int64_t> off = pixel_offsets(n_images, npix);
#pragma omp parallel
  {
    Grid g;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_images; ++i) {
      build_grid(keys, keys64, off[i], npix[i], strides, g);
      iterations[i] = solve_image(g, targets[i], confidence, lam, bistochastic_iters, a_diag_min, tol, max_iter,
                                  out[i]);
    }
  }
}

}  // namespace ncutfast
