// CUDA kernels for the selectivity ops. Sums are float64 and added with atomicAdd (many images of
// one class add into one row), so results can differ from run to run in the last bits.
//
// Label check without a device sync: the counts kernel skips an image whose label is outside
// [0, K) and writes the label and K into a flag in mapped (zero-copy) pinned host memory. The host
// reads that flag at the start of every later CUDA accumulate/selectivity_index call and raises
// the same ValueError as the CPU path. So a bad label is reported one call late (or later: the
// flag is read without waiting for running kernels), and the batch that had it was accumulated
// without its out-of-range images. A device-side assert was the other choice; it would kill the
// CUDA context, which is worse for a training run than a late error.
#include "selectivity.h"

// Only c10/cuda headers: ATen/cuda/CUDAContext.h would also need the cuBLAS/cuSPARSE headers,
// which a minimal CUDA toolkit does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <mutex>

namespace selectivity {
namespace {

constexpr int64_t kNoError = INT64_MIN;

struct LabelError {
  int64_t label;  // kNoError, or an out-of-range label seen by a kernel
  int64_t K;
};

// One flag for the process: mapped pinned memory has one address on the host and on every device
// (unified virtual addressing), and is read by the host without a copy or a sync.
LabelError* label_error_flag() {
  static LabelError* flag = [] {
    LabelError* f = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&f), sizeof(LabelError),
                                 cudaHostAllocMapped | cudaHostAllocPortable));
    f->label = kNoError;
    f->K = 0;
    return f;
  }();
  return flag;
}

void raise_pending_label_error() {
  static std::mutex mutex;
  volatile LabelError* f = label_error_flag();
  if (f->label == kNoError) return;  // the common case: one read of host memory
  std::lock_guard<std::mutex> lock(mutex);
  const int64_t label = f->label, K = f->K;
  if (label == kNoError) return;
  f->label = kNoError;
  throw_label_error(label, K,
                    "; found on CUDA by an earlier accumulate call, which skipped the images with that "
                    "label: the accumulated state is incomplete, rebuild it");
}

// Counts images per class; also the one place that checks labels (every image visited once).
__global__ void count_kernel(const int64_t* labels, int64_t B, int64_t K, unsigned long long* counts,
                             LabelError* err) {
  for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < B; b += (int64_t)gridDim.x * blockDim.x) {
    const int64_t label = labels[b];
    if (label < 0 || label >= K) {
      // Racing plain stores are fine: any one bad label makes the message. K is made visible
      // to the host before the label, which is what the host polls.
      err->K = K;
      __threadfence_system();
      err->label = label;
      continue;
    }
    atomicAdd(counts + label, 1ULL);  // int64 two's complement: adding 1 as unsigned is the same
  }
}

// channels_last / [B, U]: block (32 units x 8 pixel rows); one block row reads 32 adjacent units
// (coalesced), the 8 rows split the pixels, shared memory sums the rows, one atomicAdd per unit.
constexpr int kUnitsPerBlock = 32, kPixelRows = 8;

template <typename scalar_t>
__global__ void accumulate_units_inner_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels,
                                              double* sums, int64_t U, int64_t P, int64_t K, int64_t sB,
                                              int64_t sP) {
  __shared__ double partial[kPixelRows][kUnitsPerBlock];
  const int64_t b = blockIdx.x;
  const int64_t label = labels[b];
  if (label < 0 || label >= K) return;  // uniform for the block; count_kernel reports it
  const int64_t nublk = (U + kUnitsPerBlock - 1) / kUnitsPerBlock;
  for (int64_t ublk = blockIdx.y; ublk < nublk; ublk += gridDim.y) {
    const int64_t u = ublk * kUnitsPerBlock + threadIdx.x;
    double acc = 0.0;
    if (u < U) {
      const scalar_t* xb = x + b * sB + u;
      for (int64_t p = threadIdx.y; p < P; p += kPixelRows) acc += static_cast<double>(static_cast<float>(xb[p * sP]));
    }
    partial[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && u < U) {
      double s = 0.0;
      for (int r = 0; r < kPixelRows; ++r) s += partial[r][threadIdx.x];
      atomicAdd(sums + label * U + u, s / static_cast<double>(P));
    }
    __syncthreads();
  }
}

// NCHW: a group of G lanes (a power of two <= 32, about P) reduces one contiguous (image, unit)
// plane with warp shuffles; consecutive groups take consecutive units, so a warp reads a run of
// adjacent planes.
template <typename scalar_t, int G>
__global__ void accumulate_planes_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels,
                                         double* sums, int64_t B, int64_t U, int64_t P, int64_t K, int64_t sB,
                                         int64_t sU) {
  const int64_t tid = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t g = tid / G;
  const int lane = threadIdx.x % G;
  const bool active = g < B * U;  // inactive lanes still join the shuffles below
  const int64_t b = active ? g / U : 0, u = active ? g % U : 0;
  const int64_t label = active ? labels[b] : -1;
  const bool ok = active && label >= 0 && label < K;
  double acc = 0.0;
  if (ok) {
    const scalar_t* xp = x + b * sB + u * sU;
    for (int64_t p = lane; p < P; p += G) acc += static_cast<double>(static_cast<float>(xp[p]));
  }
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset, G);
  if (ok && lane == 0) atomicAdd(sums + label * U + u, acc / static_cast<double>(P));
}

template <typename scalar_t, int G>
void launch_planes(const ActView& v, const int64_t* labels, double* sums, int64_t K, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = (v.B * v.U * G + kThreads - 1) / kThreads;
  accumulate_planes_kernel<scalar_t, G><<<blocks, kThreads, 0, stream>>>(
      v.act.const_data_ptr<scalar_t>(), labels, sums, v.B, v.U, v.P, K, v.sB, v.sU);
}

void accumulate_cuda(const at::Tensor& act, const at::Tensor& labels, const at::Tensor& sums,
                     const at::Tensor& counts) {
  const ActView v = check_accumulate_args(act, labels, sums, counts);
  const c10::cuda::CUDAGuard guard(act.device());
  raise_pending_label_error();
  if (v.B == 0) return;
  const at::Tensor lab = labels.contiguous();
  const int64_t* l = lab.const_data_ptr<int64_t>();
  const int64_t K = sums.size(0);
  double* s = sums.mutable_data_ptr<double>();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  count_kernel<<<std::min<int64_t>((v.B + 255) / 256, 1024), 256, 0, stream>>>(
      l, v.B, K, reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()), label_error_flag());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (v.U == 0) return;

  SELECTIVITY_DISPATCH_ACT_TYPES(v.act.scalar_type(), "selectivity_accumulate_cuda", [&] {
    if (v.units_inner) {
      const int64_t nublk = (v.U + kUnitsPerBlock - 1) / kUnitsPerBlock;
      const dim3 grid(static_cast<unsigned>(v.B), static_cast<unsigned>(std::min<int64_t>(nublk, 65535)));
      const dim3 block(kUnitsPerBlock, kPixelRows);
      accumulate_units_inner_kernel<scalar_t><<<grid, block, 0, stream>>>(v.act.const_data_ptr<scalar_t>(), l, s,
                                                                          v.U, v.P, K, v.sB, v.sP);
    } else if (v.P >= 32) {
      launch_planes<scalar_t, 32>(v, l, s, K, stream);
    } else if (v.P >= 16) {
      launch_planes<scalar_t, 16>(v, l, s, K, stream);
    } else if (v.P >= 8) {
      launch_planes<scalar_t, 8>(v, l, s, K, stream);
    } else if (v.P >= 4) {
      launch_planes<scalar_t, 4>(v, l, s, K, stream);
    } else if (v.P >= 2) {
      launch_planes<scalar_t, 2>(v, l, s, K, stream);
    } else {
      launch_planes<scalar_t, 1>(v, l, s, K, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One thread per unit walks the K classes; reads of sums[c, u] are coalesced across the warp.
// Same order of operations as the CPU kernel (ascending classes, strict > for ties).
__global__ void selectivity_index_kernel(const double* __restrict__ S, const int64_t* __restrict__ C, int64_t K,
                                         int64_t U, double eps, double* si, int64_t* pref, double* mu_max,
                                         double* mu_rest) {
  const int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (u >= U) return;
  int64_t n_present = 0, arg = -1;
  double best = 0.0, total = 0.0;
  for (int64_t c = 0; c < K; ++c) {
    const int64_t cnt = C[c];
    if (cnt <= 0) continue;
    const double m = S[c * U + u] / static_cast<double>(cnt);
    total += m;
    if (n_present == 0 || m > best) {
      best = m;
      arg = c;
    }
    ++n_present;
  }
  const double rest = n_present > 1 ? (total - best) / static_cast<double>(n_present - 1) : 0.0;
  const double den = best + rest + eps;
  si[u] = den != 0.0 ? (best - rest) / den : 0.0;
  pref[u] = arg;
  mu_max[u] = best;
  mu_rest[u] = rest;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> selectivity_index_cuda(const at::Tensor& sums,
                                                                                   const at::Tensor& counts,
                                                                                   double eps) {
  check_index_args(sums, counts);
  const c10::cuda::CUDAGuard guard(sums.device());
  raise_pending_label_error();
  auto [si, pref, mu_max, mu_rest] = empty_index_outputs(sums);
  const int64_t K = sums.size(0), U = sums.size(1);
  if (U == 0) return {si, pref, mu_max, mu_rest};
  selectivity_index_kernel<<<(U + 255) / 256, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      sums.const_data_ptr<double>(), counts.const_data_ptr<int64_t>(), K, U, eps, si.mutable_data_ptr<double>(),
      pref.mutable_data_ptr<int64_t>(), mu_max.mutable_data_ptr<double>(), mu_rest.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {si, pref, mu_max, mu_rest};
}

}  // namespace

TORCH_LIBRARY_IMPL(selectivity, CUDA, m) {
  m.impl("accumulate", &accumulate_cuda);
  m.impl("selectivity_index", &selectivity_index_cuda);
}

}  // namespace selectivity
