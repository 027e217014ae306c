// CUDA kernel of selectivity_index.
#include "../../../common/checks.h"
#include "../../../common/cuda/label_error.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace selectivity {
namespace {

// Block (32 units x 16 class rows): each thread walks every 16th class of its unit (reads of
// sums[c, u] coalesced across the warp), then row 0 merges the rows. One thread walking all K
// classes was latency-bound (docs/gpu.md). The maximum is the CPU's (ties go to the lowest
// class); the sum of means is added in another order, so mu_rest and SI can differ from the
// CPU's in the last bits.
constexpr int kSIUnits = 32, kSIRows = 16;

__global__ void selectivity_index_kernel(const double* __restrict__ S, const int64_t* __restrict__ C, int64_t K,
                                         int64_t U, double eps, double* si, int64_t* pref, double* mu_max,
                                         double* mu_rest) {
  __shared__ double s_best[kSIRows][kSIUnits], s_total[kSIRows][kSIUnits];
  __shared__ int64_t s_arg[kSIRows][kSIUnits], s_n[kSIRows][kSIUnits];
  const int64_t u = blockIdx.x * (int64_t)kSIUnits + threadIdx.x;
  int64_t n_present = 0, arg = -1;
  double best = 0.0, total = 0.0;
  if (u < U) {
    for (int64_t c = threadIdx.y; c < K; c += kSIRows) {
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
  }
  s_best[threadIdx.y][threadIdx.x] = best;
  s_total[threadIdx.y][threadIdx.x] = total;
  s_arg[threadIdx.y][threadIdx.x] = arg;
  s_n[threadIdx.y][threadIdx.x] = n_present;
  __syncthreads();
  if (threadIdx.y != 0 || u >= U) return;
  for (int r = 1; r < kSIRows; ++r) {
    const int64_t n = s_n[r][threadIdx.x];
    if (n == 0) continue;
    const double b = s_best[r][threadIdx.x];
    const int64_t a = s_arg[r][threadIdx.x];
    if (n_present == 0 || b > best || (b == best && a < arg)) {
      best = b;
      arg = a;
    }
    total += s_total[r][threadIdx.x];
    n_present += n;
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
  selectivity_index_kernel<<<(U + kSIUnits - 1) / kSIUnits, dim3(kSIUnits, kSIRows), 0,
                             c10::cuda::getCurrentCUDAStream()>>>(
      sums.const_data_ptr<double>(), counts.const_data_ptr<int64_t>(), K, U, eps, si.mutable_data_ptr<double>(),
      pref.mutable_data_ptr<int64_t>(), mu_max.mutable_data_ptr<double>(), mu_rest.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {si, pref, mu_max, mu_rest};
}

}  // namespace

TORCH_LIBRARY_IMPL(selectivity, CUDA, m) {
  m.impl("selectivity_index", &selectivity_index_cuda);
}

}  // namespace selectivity
