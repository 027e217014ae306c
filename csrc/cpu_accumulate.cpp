// CPU kernel of accumulate: C++ threads from torch's OpenMP pool (at::parallel_for, so it follows
// torch.set_num_threads) and `omp simd` inner loops over the contiguous dim of either layout.
//
// Threads never race on sums and need no per-thread [K, U] partials (K*U*8 bytes each would be
// 120 MB for ResNet-50 at K=1000): phase 1 splits the IMAGES and writes per-image means into a
// [B, U] float64 buffer (P times smaller than act); phase 2 splits the UNITS and adds those rows
// into sums by label.
//
// Precision: every float64 addend is the float32 sum of at most kRun = 8 input values; everything
// above that is float64 (the mean is a multiply by 1/P). So |error| <= 7 * 2^-24 * sum|x| (~4e-7
// relative for ReLU outputs) whatever the batch or image size, while the inner loops run at float32
// SIMD width. (All-float64 sums were ~1.5-2x slower than act.sum(); tests/test_ops.py checks the bound.)
#include "selectivity.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace selectivity {
namespace {

// One build for every x86-64 CPU: the hot loops are compiled twice, for baseline x86-64 (SSE2) and
// for x86-64-v3 (AVX2, FMA, F16C), and the dynamic loader picks one at startup (GNU ifunc). No
// -march flag, so the .so runs on any x86-64. Elsewhere (aarch64, macOS) the baseline is used.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define SELECTIVITY_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SELECTIVITY_HOT
#endif

constexpr int kRun = 8;  // inputs summed in float32 before a float64 add

// ----- element -> float32, as plain bit arithmetic so that the loops around it vectorize
// (c10::Half's own conversion does not, which made fp16 ~10x slower than fp32) -----

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

// ----- channels_last: per image, P pixel rows of n contiguous units -----

enum class Rows { kAssign, kAdd, kMean };

// out[i] (=, +=, = .../P) the float32 sum of R rows x[i], x[i + sP], ..., vectorized over i.
template <int R, Rows M, typename T>
inline void add_rows(double* __restrict out, const T* __restrict x, int64_t n, int64_t sP, double inv_P) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float f = to_float(x[i]);
    for (int k = 1; k < R; ++k) f += to_float(x[i + k * sP]);
    const double d = static_cast<double>(f);
    if constexpr (M == Rows::kAssign) out[i] = d;
    if constexpr (M == Rows::kAdd) out[i] += d;
    if constexpr (M == Rows::kMean) out[i] = d * inv_P;
  }
}

template <Rows M, typename T>
inline void add_rows(int rows, double* out, const T* x, int64_t n, int64_t sP, double inv_P) {
  switch (rows) {
    case 1: return add_rows<1, M>(out, x, n, sP, inv_P);
    case 2: return add_rows<2, M>(out, x, n, sP, inv_P);
    case 3: return add_rows<3, M>(out, x, n, sP, inv_P);
    case 4: return add_rows<4, M>(out, x, n, sP, inv_P);
    case 5: return add_rows<5, M>(out, x, n, sP, inv_P);
    case 6: return add_rows<6, M>(out, x, n, sP, inv_P);
    case 7: return add_rows<7, M>(out, x, n, sP, inv_P);
    default: return add_rows<8, M>(out, x, n, sP, inv_P);
  }
}

// out[i] = mean over p < P of x[p * sP + i], for i < n.
template <typename T>
SELECTIVITY_HOT void pixel_row_means(double* __restrict out, const T* __restrict x, int64_t n, int64_t P,
                                     int64_t sP) {
  const double inv_P = 1.0 / static_cast<double>(P);
  if (P <= kRun) return add_rows<Rows::kMean>(static_cast<int>(P), out, x, n, sP, inv_P);
  add_rows<kRun, Rows::kAssign>(out, x, n, sP, inv_P);
  int64_t p = kRun;
  for (; p + kRun <= P; p += kRun) add_rows<kRun, Rows::kAdd>(out, x + p * sP, n, sP, inv_P);
  if (p < P) add_rows<Rows::kAdd>(static_cast<int>(P - p), out, x + p * sP, n, sP, inv_P);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] *= inv_P;
}

// ----- NCHW: per image, n planes of P contiguous pixels, sU apart -----

// Planes of R <= kRun pixels packed back to back (sU == R): vectorized ACROSS planes, since one
// plane is too short to fill a vector.
template <int R, typename T>
inline void small_plane_means(double* __restrict out, const T* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t u = 0; u < n; ++u) {
    float f = to_float(x[u * R]);
    for (int k = 1; k < R; ++k) f += to_float(x[u * R + k]);
    out[u] = static_cast<double>(f) * (1.0 / R);
  }
}

// Longer planes: explicit 8-float vectors (GCC/Clang vector extensions; two per step so the adds
// of one step do not wait on each other). Each lane sums up to kRun values in float32, then adds
// them into float64 lanes.
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));

template <typename T>
inline f32x8 load8(const T* x) {
  f32x8 v;
  for (int j = 0; j < 8; ++j) v[j] = to_float(x[j]);
  return v;
}
inline f32x8 load8(const float* x) {
  f32x8 v;
  std::memcpy(&v, x, sizeof v);
  return v;
}
inline f64x4 low_half(f32x8 v) { return __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), f64x4); }
inline f64x4 high_half(f32x8 v) { return __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), f64x4); }

template <typename T>
SELECTIVITY_HOT void plane_means(double* __restrict out, const T* __restrict x, int64_t n, int64_t sU,
                                 int64_t P) {
  if (sU == P && P <= kRun) {
    switch (P) {
      case 1: return small_plane_means<1>(out, x, n);
      case 2: return small_plane_means<2>(out, x, n);
      case 3: return small_plane_means<3>(out, x, n);
      case 4: return small_plane_means<4>(out, x, n);
      case 5: return small_plane_means<5>(out, x, n);
      case 6: return small_plane_means<6>(out, x, n);
      case 7: return small_plane_means<7>(out, x, n);
      default: return small_plane_means<8>(out, x, n);
    }
  }
  const double inv_P = 1.0 / static_cast<double>(P);
  for (int64_t u = 0; u < n; ++u) {
    const T* xp = x + u * sU;
    f64x4 d0 = {}, d1 = {}, d2 = {}, d3 = {};
    int64_t p = 0;
    while (p + 16 <= P) {
      const int64_t stop = std::min(P - 15, p + 16 * kRun);  // each lane takes at most kRun values
      f32x8 f0 = load8(xp + p), f1 = load8(xp + p + 8);
      __builtin_prefetch(xp + p + 512);  // planes are short streams: help the hardware prefetcher
      for (p += 16; p < stop; p += 16) {
        f0 += load8(xp + p);
        f1 += load8(xp + p + 8);
        __builtin_prefetch(xp + p + 512);
      }
      d0 += low_half(f0);
      d1 += high_half(f0);
      d2 += low_half(f1);
      d3 += high_half(f1);
    }
    const f64x4 d = (d0 + d1) + (d2 + d3);
    double s = (d[0] + d[1]) + (d[2] + d[3]);
    for (; p < P; ++p) s += static_cast<double>(to_float(xp[p]));
    out[u] = s * inv_P;
  }
}

// ----- the two phases -----

// Units per block in phase 2: 16 doubles = two cache lines of sums, so threads that own different
// blocks never write one cache line.
constexpr int64_t kUnitBlock = 16;

// Elements a task should at least touch to be worth a thread (ATen's own GRAIN_SIZE); smaller
// inputs run on the calling thread.
constexpr int64_t kGrainElements = 32768;

int64_t grain(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

inline double to_double(double v) { return v; }
template <typename T>
inline double to_double(T v) {
  return static_cast<double>(to_float(v));
}

// Phase 2: sums[labels[b], u] += m[b * smB + u * smU]. Threads own blocks of units and walk all images.
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

template <typename scalar_t>
void accumulate_impl(const ActView& v, const int64_t* labels, double* sums) {
  const scalar_t* x = v.act.const_data_ptr<scalar_t>();
  const int64_t B = v.B, U = v.U, P = v.P;
  if (B == 0 || U == 0) return;
  if (P == 1) {  // nothing to average: phase 2 reads act itself (exact: no float32 sums at all)
    add_rows_by_label(x, v.sB, v.sU, B, U, labels, sums);
    return;
  }
  // Reused across calls: a fresh 1 MB buffer per call (ResNet-50's last stage) came from mmap and
  // cost more in page faults than reading the activation.
  static thread_local std::vector<double> buffer;
  if (buffer.size() < static_cast<size_t>(B * U)) buffer.resize(B * U);
  double* means = buffer.data();
  // Phase 1 work items are whole images, or image chunks when there are too few images for the threads.
  const int64_t nblocks = (U + kUnitBlock - 1) / kUnitBlock;
  const int64_t chunks = std::clamp<int64_t>((4 * at::get_num_threads() + B - 1) / B, 1, nblocks);
  const int64_t chunk = (nblocks + chunks - 1) / chunks * kUnitBlock;
  at::parallel_for(0, B * chunks, grain(chunk * P), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / chunks, u0 = (i % chunks) * chunk, n = std::min(U, u0 + chunk) - u0;
      if (n <= 0) continue;
      const scalar_t* xb = x + b * v.sB + u0 * v.sU;
      double* out = means + b * U + u0;
      if (v.units_inner) {
        pixel_row_means<scalar_t>(out, xb, n, P, v.sP);
      } else {
        plane_means<scalar_t>(out, xb, n, v.sU, P);
      }
    }
  });
  add_rows_by_label(means, U, int64_t{1}, B, U, labels, sums);
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

}  // namespace

TORCH_LIBRARY_IMPL(selectivity, CPU, m) {
  m.impl("accumulate", &accumulate_cpu);
}

}  // namespace selectivity
