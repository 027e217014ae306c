// CUDA kernels of the fused epilogue (add_relu_means.h has the definitions). Deterministic: every
// mean is reduced by one thread block in a fixed order (no atomics).
//
// y mirrors torch's CUDA kernels exactly: the add in float32 (float64 for float64) rounded once to the
// dtype, then clamp_min's relu of the rounded value (`isnan(v) ? v : max(v, 0)`); the backward is
// threshold_backward's select (`y <= 0 ? 0 : grad`) with the means' share added before it.
#include "../add_relu_means.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

namespace selectivity {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ T relu_rounded(acc_t<T> s) {
  const acc_t<T> r = static_cast<acc_t<T>>(static_cast<T>(s));  // rounded once to T
  return static_cast<T>(isnan(r) ? r : max(r, acc_t<T>(0)));
}

// channels_last / [B, U]: block (32 units x kRows row groups) on one image's tile of 32 units;
// thread (x, r) walks rows r, r + kRows, ... of unit x (loads coalesced across the warp), then
// the row groups are summed in shared memory in a fixed order.
constexpr int kUnits = 32, kRows = 8;

template <typename T>
__global__ void forward_units_inner(const T* o, const T* __restrict__ id, T* y,  // o may be y (in place)
                                    acc_t<T>* __restrict__ means, int64_t U, int64_t P) {
  using A = acc_t<T>;
  __shared__ A partial[kRows][kUnits];
  const int64_t b = blockIdx.y, u = blockIdx.x * (int64_t)kUnits + threadIdx.x;
  A s = 0;
  if (u < U) {
    for (int64_t p = threadIdx.y; p < P; p += kRows) {
      const int64_t at = (b * P + p) * U + u;
      const T v = relu_rounded<T>(static_cast<A>(o[at]) + static_cast<A>(id[at]));
      y[at] = v;
      s += static_cast<A>(v);
    }
  }
  partial[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || u >= U) return;
  for (int r = 1; r < kRows; ++r) s += partial[r][threadIdx.x];
  means[b * U + u] = s / static_cast<A>(P);
}

// NCHW: a group of G lanes (a power of two <= 32, about the plane size) per (image, unit) plane;
// each lane walks every G-th pixel, then the group reduces with warp shuffles.
template <typename T, int G>
__global__ void forward_planes(const T* o, const T* __restrict__ id, T* y,  // o may be y (in place)
                               acc_t<T>* __restrict__ means, int64_t planes, int64_t P) {
  using A = acc_t<T>;
  const int64_t q = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / G;
  const int lane = threadIdx.x % G;
  A s = 0;
  if (q < planes) {
    for (int64_t p = lane; p < P; p += G) {
      const int64_t at = q * P + p;
      const T v = relu_rounded<T>(static_cast<A>(o[at]) + static_cast<A>(id[at]));
      y[at] = v;
      s += static_cast<A>(v);
    }
  }
  for (int off = G / 2; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off, G);
  if (lane == 0 && q < planes) means[q] = s / static_cast<A>(P);
}

template <typename T, int G>
void launch_planes(const EpilogueForward& f, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int threads = 256;
  const int64_t planes = f.shape.B * f.shape.U;
  const int64_t blocks = (planes * G + threads - 1) / threads;
  forward_planes<T, G><<<blocks, threads, 0, stream>>>(f.out.const_data_ptr<T>(), f.identity.const_data_ptr<T>(),
                                                      f.y.mutable_data_ptr<T>(), f.means.mutable_data_ptr<A>(),
                                                      planes, f.shape.P);
}

// grad = y <= 0 ? 0 : grad_y + grad_means / P, elementwise (grid-stride); a missing grad is 0.
// gy and g may be one buffer (add_relu_means_backward_): each element is read before it is written.
template <typename T>
__global__ void backward_kernel(const T* gy, const acc_t<T>* __restrict__ gm, const T* __restrict__ y, T* g, int64_t n,
                                int64_t U, int64_t P, bool units_inner) {
  using A = acc_t<T>;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
    T v;
    if (gm != nullptr) {
      // The unit's [b, u] index: channels_last k = (b * P + p) * U + u; NCHW k = (b * U + u) * P + p.
      const int64_t bu = units_inner ? (k / (P * U)) * U + k % U : k / P;
      A add = gm[bu] / static_cast<A>(P);
      if (gy != nullptr) add += static_cast<A>(gy[k]);
      v = static_cast<T>(add);
    } else {
      v = gy != nullptr ? gy[k] : T(0);
    }
    g[k] = static_cast<A>(y[k]) <= A(0) ? T(0) : v;
  }
}

void run_forward(EpilogueForward& f) {
  const auto [B, U, P, units_inner] = f.shape;
  if (B * U * P == 0) {
    f.means.zero_();
    return;
  }
  const c10::cuda::CUDAGuard guard(f.out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.out.scalar_type(), "add_relu_means_cuda", [&] {
    using A = acc_t<scalar_t>;
    if (units_inner) {
      const dim3 grid((U + kUnits - 1) / kUnits, B);
      forward_units_inner<scalar_t><<<grid, dim3(kUnits, kRows), 0, stream>>>(
          f.out.const_data_ptr<scalar_t>(), f.identity.const_data_ptr<scalar_t>(), f.y.mutable_data_ptr<scalar_t>(),
          f.means.mutable_data_ptr<A>(), U, P);
    } else if (P >= 32) {
      launch_planes<scalar_t, 32>(f, stream);
    } else if (P >= 16) {
      launch_planes<scalar_t, 16>(f, stream);
    } else if (P >= 8) {
      launch_planes<scalar_t, 8>(f, stream);
    } else if (P >= 4) {
      launch_planes<scalar_t, 4>(f, stream);
    } else {
      launch_planes<scalar_t, 2>(f, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> add_relu_means_cuda(const at::Tensor& out, const at::Tensor& identity) {
  EpilogueForward f = prepare_add_relu_means(out, identity);
  run_forward(f);
  return {f.y, f.means};
}

at::Tensor add_relu_means_inplace_cuda(at::Tensor& out, const at::Tensor& identity) {
  EpilogueForward f = prepare_add_relu_means(out, identity, /*inplace=*/true);
  run_forward(f);
  return f.means;
}

void run_backward(EpilogueBackward& bw) {
  const auto [B, U, P, units_inner] = bw.shape;
  const int64_t n = B * U * P;
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(bw.y.device());
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, int64_t(1) << 20);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bw.y.scalar_type(), "add_relu_means_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    backward_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        bw.grad_y.defined() ? bw.grad_y.const_data_ptr<scalar_t>() : nullptr,
        bw.grad_means.defined() ? bw.grad_means.const_data_ptr<A>() : nullptr, bw.y.const_data_ptr<scalar_t>(),
        bw.grad.mutable_data_ptr<scalar_t>(), n, U, P, units_inner);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor add_relu_means_backward_cuda(const c10::optional<at::Tensor>& grad_y,
                                        const c10::optional<at::Tensor>& grad_means, const at::Tensor& y) {
  EpilogueBackward bw = prepare_add_relu_means_backward(grad_y, grad_means, y);
  run_backward(bw);
  return bw.grad;
}

void add_relu_means_backward_inplace_cuda(at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_means,
                                          const at::Tensor& y) {
  EpilogueBackward bw = prepare_add_relu_means_backward(grad_y, grad_means, y, /*into_grad_y=*/true);
  run_backward(bw);
}

}  // namespace

TORCH_LIBRARY_IMPL(selectivity, CUDA, m) {
  m.impl("add_relu_means", &add_relu_means_cuda);
  m.impl("add_relu_means_backward", &add_relu_means_backward_cuda);
  m.impl("add_relu_means_", &add_relu_means_inplace_cuda);
  m.impl("add_relu_means_backward_", &add_relu_means_backward_inplace_cuda);
}

}  // namespace selectivity
