// CUDA kernel of index_cache: one thread per unit runs scan_tile over its own unit; the 32 threads of a
// warp read 32 / T tiles' adjacent values of one class at a time.
#include "../../../common/cuda/label_error.h"
#include "../../../common/tile_scan.h"
#include "../../../common/tiled_state.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace selectivity {
namespace {

template <bool kBounds>
__global__ void index_cache_kernel(const double* S, const double* C, int64_t K, int64_t T, int64_t U, int64_t G,
                                   double* out) {
  const int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (u >= U) return;
  const int64_t t = u / T, i = u % T;
  scan_tile<kBounds>(S + t * K * T, C, K, T, i, i + 1, tile_cache(out, U, G, K, t, T));
}

void index_cache_cuda(const at::Tensor& sums, const at::Tensor& counts, const at::Tensor& cache) {
  TORCH_CHECK_VALUE(sums.dim() == 3 && counts.dim() == 1,
                    "index_cache takes one row of a tiled state: sums [tiles, K, T] and counts [K]");
  const TiledState s = check_tiled_state(sums.unsqueeze(0), counts.unsqueeze(0), cache, at::Tensor(), -1);
  const c10::cuda::CUDAGuard guard(sums.device());
  raise_pending_label_error();
  const int64_t U = s.nt * s.T;
  if (U == 0) return;
  const auto kernel = s.bounds ? index_cache_kernel<true> : index_cache_kernel<false>;
  kernel<<<(U + 255) / 256, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      sums.const_data_ptr<double>(), counts.const_data_ptr<double>(), s.K, s.T, U, s.G, cache.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(selectivity, CUDA, m) {
  m.impl("index_cache", &index_cache_cuda);
}

}  // namespace selectivity
