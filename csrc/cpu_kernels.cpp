// CPU kernels: C++ with OpenMP threads (through at::parallel_for, which runs on torch's OpenMP pool
// and so follows torch.set_num_threads) and `omp simd` inner loops over the contiguous dim.
//
// No races on sums without locks or per-thread [K, U] partials (K*U*8 bytes per thread would be
// 120 MB for ResNet-50 at K=1000): threads split the images to compute per-image means, then split
// the units to add those into sums (accumulate_impl). Every value is summed in float64, so fp32
// inputs match the float64 reference to ~1e-15, not merely to fp32 rounding.
#include "selectivity.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace selectivity {
namespace {

// One build for every x86-64 CPU: the hot loops are compiled twice, for baseline x86-64 (SSE2) and
// for x86-64-v3 (AVX2, FMA, F16C), and the dynamic loader picks one at startup (GNU ifunc). Elsewhere
// (aarch64, macOS) the compiler's baseline is used.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define SELECTIVITY_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SELECTIVITY_HOT
#endif

// Element -> float conversions written as plain bit arithmetic, so that the loops around them
// vectorize (c10::Half's own conversion does not, which made fp16 ~10x slower than fp32).
inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}
inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.x) << 16); }
// IEEE half -> single, exact for normals, subnormals, inf and NaN (the method of c10's
// fp16_ieee_to_fp32_value: rebias the exponent with one multiply, subnormals with one subtract).
inline float to_float(c10::Half v) {
  const uint32_t w = static_cast<uint32_t>(v.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t is_sub = 0u - static_cast<uint32_t>(two_w < (1u << 27));  // a mask, not a branch: vectorizes
  return bits_to_float(sign | (float_to_bits(subnormal) & is_sub) | (float_to_bits(normalized) & ~is_sub));
}

inline double to_double(double v) { return v; }
inline double to_double(float v) { return static_cast<double>(v); }
inline double to_double(c10::BFloat16 v) { return static_cast<double>(to_float(v)); }
inline double to_double(c10::Half v) { return static_cast<double>(to_float(v)); }

// out[i] = mean over p < P of x[p * sP + i], for i < n: one image, units contiguous (channels_last).
// Four pixel rows per pass halve the loads and stores of `out`.
template <typename T>
SELECTIVITY_HOT void pixel_row_means(double* __restrict out, const T* __restrict x, int64_t n, int64_t P,
                                     int64_t sP) {
  for (int64_t i = 0; i < n; ++i) out[i] = 0.0;
  int64_t p = 0;
  for (; p + 4 <= P; p += 4) {
    const T *x0 = x + p * sP, *x1 = x0 + sP, *x2 = x1 + sP, *x3 = x2 + sP;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] += (to_double(x0[i]) + to_double(x1[i])) + (to_double(x2[i]) + to_double(x3[i]));
  }
  for (; p < P; ++p) {
    const T* xp = x + p * sP;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] += to_double(xp[i]);
  }
  const double dP = static_cast<double>(P);
  for (int64_t i = 0; i < n; ++i) out[i] /= dP;
}

// out[u] = mean of the P contiguous values at x + u * sU, for u < n: one image, planes contiguous (NCHW).
template <typename T>
SELECTIVITY_HOT void plane_means(double* __restrict out, const T* __restrict x, int64_t n, int64_t sU, int64_t P) {
  constexpr int64_t L = 16;  // 16 independent partial sums hide the latency of the adds
  const double dP = static_cast<double>(P);
  for (int64_t u = 0; u < n; ++u) {
    const T* xp = x + u * sU;
    double s = 0.0;
    int64_t p = 0;
    if (P >= L) {
      double part[L];  // started from the first L values: no memset per plane
#pragma omp simd
      for (int64_t j = 0; j < L; ++j) part[j] = to_double(xp[j]);
      for (p = L; p + L <= P; p += L) {
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) part[j] += to_double(xp[p + j]);
      }
      for (int64_t j = 0; j < L; ++j) s += part[j];
    }
    for (; p < P; ++p) s += to_double(xp[p]);
    out[u] = s / dP;
  }
}

// Units per block: 16 doubles = two cache lines of sums, so threads that own different blocks never
// write one cache line.
constexpr int64_t kUnitBlock = 16;

// Elements a task should at least touch to be worth a thread (ATen's own GRAIN_SIZE); smaller
// inputs run on the calling thread.
constexpr int64_t kGrainElements = 32768;

int64_t grain(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

// sums[labels[b], u] += m[b * smB + u * smU] for all b, u. Threads own blocks of units (so no two
// write one element of sums) and walk all images.
template <typename T>
void add_rows_by_label(const T* m, int64_t smB, int64_t smU, int64_t B, int64_t U, const int64_t* labels,
                       double* sums) {
  const int64_t nblocks = (U + kUnitBlock - 1) / kUnitBlock;
  at::parallel_for(0, nblocks, grain(B * kUnitBlock), [&](int64_t blk0, int64_t blk1) {
    const int64_t u0 = blk0 * kUnitBlock, u1 = std::min(U, blk1 * kUnitBlock);
    for (int64_t b = 0; b < B; ++b) {
      double* row = sums + labels[b] * U;
      const T* mb = m + b * smB;
#pragma omp simd
      for (int64_t u = u0; u < u1; ++u) row[u] += to_double(mb[u * smU]);
    }
  });
}

// Two phases: (1) per-image means into a [B, U] float64 buffer, threads splitting the images (each
// thread streams whole images: the best access pattern for both layouts); (2) add the buffer rows
// into sums by label. The buffer is P times smaller than act in elements. With one pixel there is
// nothing to average: phase 2 reads act directly.
template <typename scalar_t>
void accumulate_impl(const ActView& v, const int64_t* labels, double* sums) {
  const scalar_t* x = v.act.const_data_ptr<scalar_t>();
  const int64_t B = v.B, U = v.U, P = v.P;
  if (B == 0 || U == 0) return;
  if (P == 1) {
    add_rows_by_label(x, v.sB, v.sU, B, U, labels, sums);
    return;
  }
  std::unique_ptr<double[]> means(new double[B * U]);
  // Split images into unit chunks only when there are too few images to keep every thread busy.
  const int64_t nblocks = (U + kUnitBlock - 1) / kUnitBlock;
  const int64_t chunks = std::clamp<int64_t>((4 * at::get_num_threads() + B - 1) / B, 1, nblocks);
  const int64_t chunk = (nblocks + chunks - 1) / chunks * kUnitBlock;
  at::parallel_for(0, B * chunks, grain(chunk * P), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / chunks, u0 = (i % chunks) * chunk, n = std::min(U, u0 + chunk) - u0;
      if (n <= 0) continue;
      const scalar_t* xb = x + b * v.sB + u0 * v.sU;
      if (v.units_inner) {
        pixel_row_means<scalar_t>(means.get() + b * U + u0, xb, n, P, v.sP);
      } else {
        plane_means<scalar_t>(means.get() + b * U + u0, xb, n, v.sU, P);
      }
    }
  });
  add_rows_by_label(means.get(), U, int64_t{1}, B, U, labels, sums);
}

void accumulate_cpu(const at::Tensor& act, const at::Tensor& labels, const at::Tensor& sums,
                    const at::Tensor& counts) {
  const ActView v = check_accumulate_args(act, labels, sums, counts);
  const at::Tensor lab = labels.contiguous();
  const int64_t* l = lab.const_data_ptr<int64_t>();
  const int64_t K = sums.size(0);
  // Check every label before touching the state, so a bad batch leaves sums/counts unchanged.
  for (int64_t b = 0; b < v.B; ++b) {
    if (l[b] < 0 || l[b] >= K) throw_label_error(l[b], K, "");
  }
  double* s = sums.mutable_data_ptr<double>();
  SELECTIVITY_DISPATCH_ACT_TYPES(v.act.scalar_type(), "selectivity_accumulate", [&] {
    accumulate_impl<scalar_t>(v, l, s);
  });
  int64_t* c = counts.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < v.B; ++b) c[l[b]] += 1;
}

// Units are tiled so the running max/argmax/total of a tile stay in L1 while the present
// classes stream past; the tile loop is vectorized over units (sums rows are contiguous in u).
constexpr int64_t kIndexTile = 256;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> selectivity_index_cpu(const at::Tensor& sums,
                                                                                  const at::Tensor& counts,
                                                                                  double eps) {
  check_index_args(sums, counts);
  auto [si, pref, mu_max, mu_rest] = empty_index_outputs(sums);
  const int64_t K = sums.size(0), U = sums.size(1);
  const double* S = sums.const_data_ptr<double>();
  const int64_t* C = counts.const_data_ptr<int64_t>();
  std::vector<int64_t> present;  // the same classes are present for every unit
  for (int64_t c = 0; c < K; ++c) {
    if (C[c] > 0) present.push_back(c);
  }
  const int64_t n_present = static_cast<int64_t>(present.size());
  double* o_si = si.mutable_data_ptr<double>();
  int64_t* o_pref = pref.mutable_data_ptr<int64_t>();
  double* o_max = mu_max.mutable_data_ptr<double>();
  double* o_rest = mu_rest.mutable_data_ptr<double>();
  const int64_t ntiles = (U + kIndexTile - 1) / kIndexTile;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, n_present * kIndexTile));

  at::parallel_for(0, ntiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t u0 = t * kIndexTile, n = std::min(U, u0 + kIndexTile) - u0;
      double* best = o_max + u0;
      int64_t* arg = o_pref + u0;
      double* total = o_rest + u0;  // holds the sum of all class means until the last step
      if (n_present == 0) {
        for (int64_t i = 0; i < n; ++i) {
          best[i] = 0.0;
          arg[i] = -1;
          total[i] = 0.0;
          o_si[u0 + i] = 0.0;
        }
        continue;
      }
      {
        const int64_t c = present[0];
        const double cnt = static_cast<double>(C[c]);
        const double* row = S + c * U + u0;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          best[i] = row[i] / cnt;
          arg[i] = c;
          total[i] = best[i];
        }
      }
      for (int64_t j = 1; j < n_present; ++j) {
        const int64_t c = present[j];
        const double cnt = static_cast<double>(C[c]);
        const double* row = S + c * U + u0;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const double m = row[i] / cnt;
          total[i] += m;
          const bool better = m > best[i];  // strict: ties keep the lower class index
          best[i] = better ? m : best[i];
          arg[i] = better ? c : arg[i];
        }
      }
      const double others = static_cast<double>(n_present - 1);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const double rest = n_present > 1 ? (total[i] - best[i]) / others : 0.0;
        const double den = best[i] + rest + eps;
        total[i] = rest;
        o_si[u0 + i] = den != 0.0 ? (best[i] - rest) / den : 0.0;  // all-zero unit -> 0, not NaN
      }
    }
  });
  return {si, pref, mu_max, mu_rest};
}

}  // namespace

TORCH_LIBRARY_IMPL(selectivity, CPU, m) {
  m.impl("accumulate", &accumulate_cpu);
  m.impl("selectivity_index", &selectivity_index_cpu);
}

}  // namespace selectivity
