// CUDA kernels of accumulate_means, on the current stream, without a host sync:
//   1. counts: one thread per (row, image) adds w into counts[r, label] (atomicAdd) and flags a bad
//      label (common/cuda/label_error.h: reported one call late; the image is skipped);
//   2. the rows without a cache: one thread per (row, image, unit) adds w * mean into its state
//      element (atomicAdd: the order of the adds, so the last bits, can differ from run to run);
//   3. row 0 with a cache: one thread per unit walks the images sorted by label (at::sort, on the
//      device), adds each class's sum into its state element, updates the unit's cache (update_unit, as
//      the CPU kernel), and rescans it (rescan_unit) when its preferred class fell below the others' bound.
#include "../../../common/cuda/label_error.h"
#include "../../../common/tile_scan.h"
#include "../../../common/tiled_state.h"

#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

namespace selectivity {
namespace {

__global__ void counts_kernel(const int64_t* labels, int64_t R, int64_t B, int64_t K, double w, double* counts,
                              LabelError* err) {
  const int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (k >= R * B) return;
  const int64_t label = labels[k];
  if (label < 0 || label >= K) {
    report_bad_label(err, label, K);
    return;
  }
  atomicAdd(counts + (k / B) * K + label, w);
}

__global__ void scatter_kernel(const float* M, const int64_t* labels, int64_t r0, int64_t R, int64_t B, int64_t N,
                               int64_t nt, int64_t K, int64_t T, double w, double* S) {
  const int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (k >= (R - r0) * B * N) return;
  const int64_t u = k % N, b = (k / N) % B, r = r0 + k / (N * B);
  const int64_t label = labels[r * B + b];
  if (label < 0 || label >= K) return;
  atomicAdd(S + ((r * nt + u / T) * K + label) * T + u % T, w * static_cast<double>(M[b * N + u]));
}

__global__ void cached_row_kernel(const float* M, const int64_t* sorted, const int64_t* order, int64_t B, int64_t N,
                                  int64_t nt, int64_t K, int64_t T, int64_t G, double w, double* S, const double* old_counts,
                                  const double* counts, double* cache, unsigned long long* rescans) {
  const int64_t U = nt * T;
  const int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (u >= U) return;
  const int64_t t = u / T, i = u % T;
  const TileCache o = tile_cache(cache, U, G, K, t, T);
  bool stale = false;
  double acc = 0.0;
  for (int64_t k = 0; k < B; ++k) {
    const int64_t c = sorted[k];
    if (c < 0 || c >= K) continue;
    if (u < N) acc += static_cast<double>(M[order[k] * N + u]);
    if (k + 1 < B && sorted[k + 1] == c) continue;
    double* x = S + (t * K + c) * T + i;
    const double oc = old_counts[c], nc = counts[c], cd = static_cast<double>(c);
    // As the CPU kernel: total's terms are products with 1 / count, the group bound a bound.
    const double inv_old = oc > 0.0 ? 1.0 / oc : 0.0;
    const double old_term = *x * inv_old;
    *x += w * acc;
    acc = 0.0;
    const double v = *x * (1.0 / nc);
    o.total[i] += v - old_term;
    raise_bound(o.group(c / o.gs)[i], mean_bound(v));
    update_unit(*x / nc, cd, o.best[i], o.arg[i], o.second[i], stale);
  }
  if (!stale) return;
  rescan_unit(S + t * K * T, counts, K, T, o, i);
  if (rescans != nullptr) atomicAdd(rescans, 1ULL);
}

constexpr int kThreads = 256;

int64_t blocks(int64_t n) { return (n + kThreads - 1) / kThreads; }

void accumulate_means_cuda(const at::Tensor& means, const at::Tensor& labels, double weight, const at::Tensor& sums,
                           const at::Tensor& counts, const std::optional<at::Tensor>& cache,
                           const std::optional<at::Tensor>& rescans) {
  check_means_args(means, labels, sums);
  const at::Tensor none;
  const TiledState s = check_tiled_state(sums, counts, cache.value_or(none), rescans.value_or(none), means.size(1));
  TORCH_CHECK_VALUE(weight > 0.0, "weight must be > 0");
  TORCH_CHECK_VALUE(!cache.has_value() || s.bounds, kCacheWithBounds);
  const c10::cuda::CUDAGuard guard(means.device());
  raise_pending_label_error();
  const int64_t B = means.size(0), N = s.N;
  if (B == 0 || s.R == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor lab = labels.contiguous();
  const int64_t* l = lab.const_data_ptr<int64_t>();
  const at::Tensor old0 = cache.has_value() ? counts.select(0, 0).clone() : at::Tensor();
  double* S = sums.mutable_data_ptr<double>();
  counts_kernel<<<blocks(s.R * B), kThreads, 0, stream>>>(l, s.R, B, s.K, weight, counts.mutable_data_ptr<double>(),
                                                          label_error_flag());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t r0 = cache.has_value() ? 1 : 0;
  if (s.R > r0 && N > 0) {
    scatter_kernel<<<blocks((s.R - r0) * B * N), kThreads, 0, stream>>>(means.const_data_ptr<float>(), l, r0, s.R, B,
                                                                        N, s.nt, s.K, s.T, weight, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!cache.has_value()) return;
  if (rescans.has_value()) rescans->select(0, 1).add_(1);  // calls
  const auto sorted = at::sort(lab.select(0, 0), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor keys = std::get<0>(sorted).contiguous(), order = std::get<1>(sorted).contiguous();
  cached_row_kernel<<<blocks(s.nt * s.T), kThreads, 0, stream>>>(
      means.const_data_ptr<float>(), keys.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(), B, N, s.nt,
      s.K, s.T, s.G, weight, S, old0.const_data_ptr<double>(), counts.const_data_ptr<double>(),
      cache->mutable_data_ptr<double>(),
      rescans.has_value() ? reinterpret_cast<unsigned long long*>(rescans->mutable_data_ptr<int64_t>()) : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(selectivity, CUDA, m) {
  m.impl("accumulate_means", &accumulate_means_cuda);
}

}  // namespace selectivity
