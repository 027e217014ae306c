// CPU kernel of accumulate: C++ threads from torch's OpenMP pool (at::parallel_for, so it follows
// torch.set_num_threads) and `omp simd` inner loops over the contiguous dim of either layout.
//
// Threads never race on sums and need no per-thread [K, U] partials (K*U*8 bytes each would be
// 120 MB for ResNet-50 at K=1000): phase 1 splits the IMAGES and writes per-image means into a
// [B, U] float64 buffer (P times smaller than act); phase 2 splits the UNITS and adds those rows
// into sums by label. Images of P <= kRun pixels (ResNet-50's 2x2 last stage at 64 px) skip phase 1:
// a buffer as large as act/2 would double the memory traffic, so phase 2 reads act itself.
//
// Precision: every float64 addend is the float32 sum of at most kRun = 8 input values; everything
// above that is float64 (the mean is a multiply by 1/P). So |error| <= 7 * 2^-24 * sum|x| (~4e-7
// relative for ReLU outputs) whatever the batch or image size, while the inner loops run at float32
// SIMD width (all-float64 sums are markedly slower: docs/extension.md); tests/test_ops.py checks the bound.
#include "../../../common/checks.h"
#include "../../../common/cpu_clones.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace selectivity {
namespace {

constexpr int kRun = 8;  // inputs summed in float32 before a float64 add

// ----- element -> float32, as plain bit arithmetic so that the loops around it vectorize
// (c10::Half's own conversion does not vectorize) -----

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

// What a run of rows does to out: start it, add to it, or add to it and finish it (times 1/P).
enum class Rows { kAssign, kAdd, kAddMean };

// The float32 sum of R <= kRun values x[0], x[s], ..., as a pairwise tree: its adds are at most 3
// deep instead of a chain of R - 1 dependent adds (3 cycles each on Zen 3), and its error is at most
// 3 * 2^-24 * sum|x|, inside the bound above (docs/extension.md has the A/B against the chain). A
// recursion on the halves, not a local array: the array kept the loop around it from vectorizing.
template <int R, typename T>
inline float tree_sum(const T* x, int64_t s) {
  if constexpr (R == 1) {
    return to_float(x[0]);
  } else {
    constexpr int half = R / 2;
    return tree_sum<half>(x, s) + tree_sum<R - half>(x + half * s, s);
  }
}

// out[i] (= += or finished as M says) the float32 sum of R rows x[i], x[i + s], ..., for i < n.
template <int R, Rows M, typename T>
inline void add_rows(double* __restrict out, const T* __restrict x, int64_t n, int64_t s, double inv_P) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(tree_sum<R>(x + i, s));
    if constexpr (M == Rows::kAssign) out[i] = d;
    if constexpr (M == Rows::kAdd) out[i] += d;
    if constexpr (M == Rows::kAddMean) out[i] = (out[i] + d) * inv_P;
  }
}

// The last R < kRun consecutive rows, finishing the mean.
template <typename T>
inline void add_last_rows(int rows, double* out, const T* x, int64_t n, int64_t sP, double inv_P) {
  switch (rows) {
    case 1: return add_rows<1, Rows::kAddMean>(out, x, n, sP, inv_P);
    case 2: return add_rows<2, Rows::kAddMean>(out, x, n, sP, inv_P);
    case 3: return add_rows<3, Rows::kAddMean>(out, x, n, sP, inv_P);
    case 4: return add_rows<4, Rows::kAddMean>(out, x, n, sP, inv_P);
    case 5: return add_rows<5, Rows::kAddMean>(out, x, n, sP, inv_P);
    case 6: return add_rows<6, Rows::kAddMean>(out, x, n, sP, inv_P);
    default: return add_rows<7, Rows::kAddMean>(out, x, n, sP, inv_P);
  }
}

// out[i] = mean over p < P of x[p * sP + i], for i < n; P > kRun.
//
// The image is read as kRun streams: stream k is rows [k L, (k + 1) L), L = P / kRun, and run j
// sums row j of every stream (rows j, j + L, ..., L apart), so each stream is read in address
// order, one row further per run. The hardware prefetchers follow such streams: when the tensor
// comes from DRAM, kRun consecutive rows per run (each stream only n units long before it jumps)
// read well below act.sum()'s speed, even with software prefetches of the next run; streams read at
// about its speed (docs/extension.md has the side-by-side measurements).
// The last P % kRun rows, left over, form one last run of consecutive rows.
template <typename T>
SELECTIVITY_HOT void pixel_row_means(double* __restrict out, const T* __restrict x, int64_t n, int64_t P,
                                     int64_t sP) {
  const double inv_P = 1.0 / static_cast<double>(P);
  const int64_t L = P / kRun, rest = P - kRun * L, stream = L * sP;
  add_rows<kRun, Rows::kAssign>(out, x, n, stream, inv_P);
  for (int64_t j = 1; j < L; ++j) {
    if (j + 1 < L || rest) {
      add_rows<kRun, Rows::kAdd>(out, x + j * sP, n, stream, inv_P);
    } else {
      add_rows<kRun, Rows::kAddMean>(out, x + j * sP, n, stream, inv_P);
    }
  }
  if (rest) add_last_rows(static_cast<int>(rest), out, x + kRun * L * sP, n, sP, inv_P);
}

// ----- NCHW: per image, n planes of P contiguous pixels, sU apart -----

// Planes of P > kRun pixels: explicit 8-float vectors (GCC/Clang vector extensions; two per step
// so the adds of one step do not wait on each other). Each lane sums up to kRun values in float32,
// then adds them into float64 lanes.
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

// The sum of R pixels x[0], x[s], ..., x[(R-1)s]: in float32 for activations (R <= kRun), in
// float64 for the float64 means of phase 1 (R = 1). R = 1 is exact either way.
template <int R, typename T>
inline double pixel_sum(const T* x, int64_t s) {
  if constexpr (std::is_same_v<T, double>) {
    double d = x[0];
    for (int k = 1; k < R; ++k) d += x[k * s];
    return d;
  } else {
    return static_cast<double>(tree_sum<R>(x, s));
  }
}

// sums[labels[b], u] += mean over p < R of x[b * sB + u * sU + p * sP], for units u0 <= u < u1.
template <int R, typename T>
inline void add_block_by_label(const T* x, int64_t sB, int64_t sU, int64_t sP, int64_t B, int64_t U, int64_t u0,
                               int64_t u1, const int64_t* labels, double* sums) {
  constexpr double inv_R = 1.0 / R;
  for (int64_t b = 0; b < B; ++b) {
    double* row = sums + labels[b] * U;
    const T* xb = x + b * sB;
#pragma omp simd
    for (int64_t u = u0; u < u1; ++u) row[u] += pixel_sum<R>(xb + u * sU, sP) * inv_R;
  }
}

template <typename T>
SELECTIVITY_HOT void add_block_by_label(int R, const T* x, int64_t sB, int64_t sU, int64_t sP, int64_t B, int64_t U,
                                        int64_t u0, int64_t u1, const int64_t* labels, double* sums) {
  switch (R) {
    case 1: return add_block_by_label<1>(x, sB, sU, sP, B, U, u0, u1, labels, sums);
    case 2: return add_block_by_label<2>(x, sB, sU, sP, B, U, u0, u1, labels, sums);
    case 3: return add_block_by_label<3>(x, sB, sU, sP, B, U, u0, u1, labels, sums);
    case 4: return add_block_by_label<4>(x, sB, sU, sP, B, U, u0, u1, labels, sums);
    case 5: return add_block_by_label<5>(x, sB, sU, sP, B, U, u0, u1, labels, sums);
    case 6: return add_block_by_label<6>(x, sB, sU, sP, B, U, u0, u1, labels, sums);
    case 7: return add_block_by_label<7>(x, sB, sU, sP, B, U, u0, u1, labels, sums);
    default: return add_block_by_label<8>(x, sB, sU, sP, B, U, u0, u1, labels, sums);
  }
}

// sums[labels[b], u] += mean over p < R of x[b * sB + u * sU + p * sP], R <= kRun. Threads own
// blocks of units and walk all images, so no two write one element of sums.
template <typename T>
void add_by_label(const T* x, int64_t sB, int64_t sU, int64_t sP, int R, int64_t B, int64_t U,
                  const int64_t* labels, double* sums) {
  const int64_t nblocks = (U + kUnitBlock - 1) / kUnitBlock;
  at::parallel_for(0, nblocks, grain(B * kUnitBlock * R), [&](int64_t blk0, int64_t blk1) {
    const int64_t u0 = blk0 * kUnitBlock, u1 = std::min(U, blk1 * kUnitBlock);
    add_block_by_label<T>(R, x, sB, sU, sP, B, U, u0, u1, labels, sums);
  });
}

template <typename scalar_t>
void accumulate_impl(const ActView& v, const int64_t* labels, double* sums) {
  const scalar_t* x = v.act.const_data_ptr<scalar_t>();
  const int64_t B = v.B, U = v.U, P = v.P;
  if (B == 0 || U == 0) return;
  if (P <= kRun) {  // few pixels: one pass adds their means straight into sums (no phase 1)
    add_by_label(x, v.sB, v.sU, v.sP, static_cast<int>(P), B, U, labels, sums);
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
  add_by_label(means, U, int64_t{1}, int64_t{1}, 1, B, U, labels, sums);
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
