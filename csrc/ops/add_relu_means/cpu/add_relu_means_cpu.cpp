// CPU kernels of the fused epilogue (add_relu_means.h has the definitions). One pass over the
// block output: read out and identity, write y, and sum y into the means while it is in registers.
//
// channels_last (the hot case): per image, P rows of U contiguous units. The units are the vector
// lanes; each thread keeps a private row of U running sums: runs of kRun rows are summed in the
// accumulation dtype and each run is added into a float64 row, so the means' error stays at a few
// float32 ulps whatever P is. NCHW: per (image, unit), a contiguous plane, summed the same way.
// Threads split images (channels_last) or planes (NCHW); nothing is shared, so no reduction and no
// atomics, and results do not depend on the thread count.
#include "../add_relu_means.h"
#include "elements.h"
#include "../../../common/cpu_clones.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace selectivity {
namespace {

using epilogue_cpu::Elem;

constexpr int64_t kRun = 8;         // rows (or pixels) summed in Acc before a float64 add
constexpr int64_t kChunk = 4096;    // NCHW: elements per chunk of planes (a chunk's y stays in L1/L2)

template <typename T, typename M>
SELECTIVITY_HOT void forward_units_inner(const T* out_, const T* id_, T* y_, M* means, int64_t b0, int64_t b1,
                                         int64_t U, int64_t P) {
  using E = Elem<T>;
  using Bits = typename E::Bits;
  using Acc = typename E::Acc;
  std::vector<Acc> run(U);
  std::vector<double> total(U);
  Acc* __restrict r = run.data();
  double* __restrict t = total.data();
  for (int64_t b = b0; b < b1; ++b) {
    const Bits* o = reinterpret_cast<const Bits*>(out_) + b * P * U;  // may be y (in place)
    const Bits* __restrict i = reinterpret_cast<const Bits*>(id_) + b * P * U;
    Bits* y = reinterpret_cast<Bits*>(y_) + b * P * U;
    const double inv_P = 1.0 / static_cast<double>(P);
    for (int64_t p0 = 0; p0 < P; p0 += kRun) {
      const int64_t p1 = std::min(P, p0 + kRun);
      const bool first_run = p0 == 0, last_run = p1 == P;
      // Every row but the image's last: its values into the run's sums.
      for (int64_t p = p0; p < (last_run ? P - 1 : p1); ++p) {
        const int64_t at = p * U;
        const bool first = p == p0;
#pragma omp simd
        for (int64_t u = 0; u < U; ++u) {
          const Bits v = E::relu(E::load(o[at + u]) + E::load(i[at + u]));
          y[at + u] = v;
          const Acc f = E::value(v);
          r[u] = first ? f : r[u] + f;
        }
      }
      if (!last_run) {
#pragma omp simd
        for (int64_t u = 0; u < U; ++u) t[u] = first_run ? double(r[u]) : t[u] + double(r[u]);
        continue;
      }
      // The last row ends the last run and the image: its values, the run's sum, the earlier runs'
      // total and the mean in one loop (the same additions in the same order as the rows and runs
      // above), instead of a pass over the run's sums and another over the totals.
      const int64_t at = (P - 1) * U;
      const bool first = P - 1 == p0;
#pragma omp simd
      for (int64_t u = 0; u < U; ++u) {
        const Bits v = E::relu(E::load(o[at + u]) + E::load(i[at + u]));
        y[at + u] = v;
        const Acc f = E::value(v);
        const Acc run_sum = first ? f : r[u] + f;
        const double sum = first_run ? double(run_sum) : t[u] + double(run_sum);
        means[b * U + u] = static_cast<M>(sum * inv_P);
      }
    }
  }
}

// NCHW, one pass per plane: y and the plane's sum while it is in registers.
template <typename T, typename M>
SELECTIVITY_HOT void forward_planes(const T* out_, const T* id_, T* y_, M* means, int64_t q0, int64_t q1,
                                    int64_t P) {
  using E = Elem<T>;
  using Bits = typename E::Bits;
  using Acc = typename E::Acc;
  const double inv_P = 1.0 / static_cast<double>(P);
  for (int64_t q = q0; q < q1; ++q) {  // q = b * U + u: one plane
    const Bits* o = reinterpret_cast<const Bits*>(out_) + q * P;  // may be y (in place)
    const Bits* __restrict i = reinterpret_cast<const Bits*>(id_) + q * P;
    Bits* y = reinterpret_cast<Bits*>(y_) + q * P;
    double total = 0.0;
    // Chunks of 8 * kRun pixels: the simd reduction gives each of up to 8 lanes at most kRun addends.
    for (int64_t p0 = 0; p0 < P; p0 += 8 * kRun) {
      const int64_t p1 = std::min(P, p0 + 8 * kRun);
      Acc s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t p = p0; p < p1; ++p) {
        const Bits v = E::relu(E::load(o[p]) + E::load(i[p]));
        y[p] = v;
        s += E::value(v);
      }
      total += double(s);
    }
    means[q] = static_cast<M>(total * inv_P);
  }
}

// NCHW with small planes (kP <= 16 pixels: per-plane loops would be mostly overhead). Planes
// q0..q1 are one contiguous range: pass 1 computes y over it as one flat vector loop, pass 2 sums
// each plane of y, still in cache, vectorized across planes (kP is a compile-time constant, so
// the loads are interleaved groups, not gathers). At most 15 float additions of non-negative values
// per mean: relative error <= 15 * 2^-24.
template <int kP, typename T, typename M>
SELECTIVITY_HOT void forward_small_planes(const T* out_, const T* id_, T* y_, M* means, int64_t q0, int64_t q1) {
  using E = Elem<T>;
  using Bits = typename E::Bits;
  using Acc = typename E::Acc;
  const Bits* o = reinterpret_cast<const Bits*>(out_);  // may be y (in place)
  const Bits* __restrict i = reinterpret_cast<const Bits*>(id_);
  Bits* y = reinterpret_cast<Bits*>(y_);
#pragma omp simd
  for (int64_t k = q0 * kP; k < q1 * kP; ++k) y[k] = E::relu(E::load(o[k]) + E::load(i[k]));
#pragma omp simd
  for (int64_t q = q0; q < q1; ++q) {
    Acc s = 0;
    for (int p = 0; p < kP; ++p) s += E::value(y[q * kP + p]);
    means[q] = static_cast<M>(s / Acc(kP));
  }
}

template <typename T, typename M>
void forward_nchw(const T* o, const T* i, T* y, M* m, int64_t q0, int64_t q1, int64_t P) {
  switch (P) {
    case 2: return forward_small_planes<2>(o, i, y, m, q0, q1);
    case 4: return forward_small_planes<4>(o, i, y, m, q0, q1);
    case 8: return forward_small_planes<8>(o, i, y, m, q0, q1);
    case 16: return forward_small_planes<16>(o, i, y, m, q0, q1);
    default: return forward_planes(o, i, y, m, q0, q1, P);
  }
}

// grad = y <= 0 ? 0 : grad_y + grad_means / P, over rows of n contiguous elements (a pixel's U
// units, or an (image, unit) plane of P pixels). kGy / kGm: which gradients are present (at least
// one). Without grad_means it is a select, like stock threshold_backward: read y and grad_y, write grad.
template <bool kGy, bool kGm, bool kUnitsInner, typename T, typename M>
SELECTIVITY_HOT void backward_rows(const T* gy_, const M* gm, const T* y_, T* g_, int64_t r0, int64_t r1, int64_t n,
                                int64_t U, int64_t P) {
  using E = Elem<T>;
  using Bits = typename E::Bits;
  using Acc = typename E::Acc;
  // gy and g may be one buffer (add_relu_means_backward_): each element is read before it is written.
  const Bits* gy = reinterpret_cast<const Bits*>(gy_);
  const Bits* __restrict y = reinterpret_cast<const Bits*>(y_);
  Bits* g = reinterpret_cast<Bits*>(g_);
  const Bits zero = E::relu(Acc(0));
  const M inv_P = M(1) / M(P);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t at = row * n;
    // grad_means' share: a row of U values (units_inner: row = b * P + p) or one per plane (row = b * U + u).
    const M* __restrict m = kGm ? gm + (kUnitsInner ? (row / P) * U : row) : nullptr;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      Bits v;
      if constexpr (kGm) {
        Acc add = Acc((kUnitsInner ? m[k] : m[0]) * inv_P);
        if constexpr (kGy) add += E::load(gy[at + k]);
        v = E::round(add);
      } else {
        v = gy[at + k];
      }
      g[at + k] = E::value(y[at + k]) <= Acc(0) ? zero : v;
    }
  }
}

// NCHW with small planes (kP <= 16 pixels) and grad_means: backward_rows with a run-time row length
// this short was several times stock's time (the regularizer's backward at ResNet-50's last stages);
// with kP a compile-time constant each plane is one short vector op on its share, broadcast. A flat
// loop over the planes' elements taking gm[k / kP] was slower still (measured). kP is a power of two,
// so grad_means * (1/kP) is exact: the same bits as backward_rows.
template <int kP, bool kGy, typename T, typename M>
SELECTIVITY_HOT void backward_small_planes(const T* gy_, const M* gm, const T* y_, T* g_, int64_t q0, int64_t q1) {
  using E = Elem<T>;
  using Bits = typename E::Bits;
  using Acc = typename E::Acc;
  // gy and g may be one buffer (add_relu_means_backward_): each element is read before it is written.
  const Bits* gy = reinterpret_cast<const Bits*>(gy_);
  const Bits* __restrict y = reinterpret_cast<const Bits*>(y_);
  Bits* g = reinterpret_cast<Bits*>(g_);
  const Bits zero = E::relu(Acc(0));
  const M inv_P = M(1) / M(kP);
  for (int64_t q = q0; q < q1; ++q) {
    const Acc share = Acc(gm[q] * inv_P);
    const int64_t at = q * kP;
#pragma omp simd
    for (int p = 0; p < kP; ++p) {
      Acc add = share;
      if constexpr (kGy) add += E::load(gy[at + p]);
      g[at + p] = E::value(y[at + p]) <= Acc(0) ? zero : E::round(add);
    }
  }
}

template <bool kGy, typename T, typename M>
void backward_with_means(const T* gy, const M* gm, const T* y, T* g, int64_t r0, int64_t r1, int64_t n, int64_t U,
                         int64_t P, bool units_inner) {
  if (units_inner) return backward_rows<kGy, true, true>(gy, gm, y, g, r0, r1, n, U, P);
  switch (P) {  // rows are planes here
    case 2: return backward_small_planes<2, kGy>(gy, gm, y, g, r0, r1);
    case 4: return backward_small_planes<4, kGy>(gy, gm, y, g, r0, r1);
    case 8: return backward_small_planes<8, kGy>(gy, gm, y, g, r0, r1);
    case 16: return backward_small_planes<16, kGy>(gy, gm, y, g, r0, r1);
    default: return backward_rows<kGy, true, false>(gy, gm, y, g, r0, r1, n, U, P);
  }
}

void run_forward(EpilogueForward& f) {
  const auto [B, U, P, units_inner] = f.shape;
  if (B * U * P == 0) {
    f.means.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.out.scalar_type(), "add_relu_means_cpu", [&] {
    using M = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* o = f.out.const_data_ptr<scalar_t>();
    const scalar_t* i = f.identity.const_data_ptr<scalar_t>();
    scalar_t* y = f.y.mutable_data_ptr<scalar_t>();
    M* m = f.means.mutable_data_ptr<M>();
    if (units_inner) {
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) { forward_units_inner(o, i, y, m, b0, b1, U, P); });
    } else {
      // Chunks of whole planes, ~kChunk elements each (forward_small_planes' pass 2 reads y from cache).
      const int64_t per_chunk = std::max<int64_t>(1, kChunk / P);
      at::parallel_for(0, B * U, per_chunk, [&](int64_t q0, int64_t q1) {
        for (int64_t c0 = q0; c0 < q1; c0 += per_chunk) forward_nchw(o, i, y, m, c0, std::min(q1, c0 + per_chunk), P);
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> add_relu_means_cpu(const at::Tensor& out, const at::Tensor& identity) {
  EpilogueForward f = prepare_add_relu_means(out, identity);
  run_forward(f);
  return {f.y, f.means};
}

at::Tensor add_relu_means_inplace_cpu(at::Tensor& out, const at::Tensor& identity) {
  EpilogueForward f = prepare_add_relu_means(out, identity, /*inplace=*/true);
  run_forward(f);
  return f.means;
}

void run_backward(EpilogueBackward& bw) {
  const auto [B, U, P, units_inner] = bw.shape;
  if (B * U * P == 0) return;
  const int64_t n = units_inner ? U : P, rows = B * U * P / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bw.y.scalar_type(), "add_relu_means_backward_cpu", [&] {
    using M = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* gy = bw.grad_y.defined() ? bw.grad_y.const_data_ptr<scalar_t>() : nullptr;
    const M* gm = bw.grad_means.defined() ? bw.grad_means.const_data_ptr<M>() : nullptr;
    const scalar_t* yp = bw.y.const_data_ptr<scalar_t>();
    scalar_t* g = bw.grad.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / n);
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      if (gm == nullptr && gy == nullptr) {
        std::fill_n(g + r0 * n, (r1 - r0) * n, scalar_t(0));
      } else if (gm == nullptr) {  // elementwise: the rows of n are irrelevant, one flat range
        backward_rows<true, false, true>(gy + r0 * n, gm, yp + r0 * n, g + r0 * n, 0, 1, (r1 - r0) * n, U, P);
      } else if (gy == nullptr) {
        backward_with_means<false>(gy, gm, yp, g, r0, r1, n, U, P, units_inner);
      } else {
        backward_with_means<true>(gy, gm, yp, g, r0, r1, n, U, P, units_inner);
      }
    });
  });
}

at::Tensor add_relu_means_backward_cpu(const c10::optional<at::Tensor>& grad_y,
                                       const c10::optional<at::Tensor>& grad_means, const at::Tensor& y) {
  EpilogueBackward bw = prepare_add_relu_means_backward(grad_y, grad_means, y);
  run_backward(bw);
  return bw.grad;
}

void add_relu_means_backward_inplace_cpu(at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_means,
                                         const at::Tensor& y) {
  EpilogueBackward bw = prepare_add_relu_means_backward(grad_y, grad_means, y, /*into_grad_y=*/true);
  run_backward(bw);
}

}  // namespace

TORCH_LIBRARY_IMPL(selectivity, CPU, m) {
  m.impl("add_relu_means", &add_relu_means_cpu);
  m.impl("add_relu_means_backward", &add_relu_means_backward_cpu);
  m.impl("add_relu_means_", &add_relu_means_inplace_cpu);
  m.impl("add_relu_means_backward_", &add_relu_means_backward_inplace_cpu);
}

}  // namespace selectivity
