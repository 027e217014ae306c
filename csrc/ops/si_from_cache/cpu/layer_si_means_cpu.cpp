// CPU kernel of layer_si_means: si_from_cache's formula per unit and each layer's sum in one loop
// over the cache's rows 0 and 2 (the same operations in the same order as the ATen version, so each
// unit's SI is the same double; a layer's mean sums in another order than at::mean, within 1e-15).
#include "../si_from_cache.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

namespace selectivity {
namespace {

at::Tensor layer_si_means_cpu(const at::Tensor& cache, const at::Tensor& counts, double eps,
                              const std::optional<at::Tensor>& shift, at::IntArrayRef lengths) {
  if (shift.has_value() || cache.scalar_type() != at::kDouble || counts.scalar_type() != at::kDouble ||
      cache.dim() != 2 || cache.size(0) < 3 || !cache.is_contiguous() || !counts.is_contiguous()) {
    return layer_si_means(cache, counts, eps, shift, lengths);
  }
  const int64_t U = cache.size(1), K = counts.numel();
  int64_t units = 0;
  for (const int64_t n : lengths) units += n;
  TORCH_CHECK_VALUE(units <= U, "layer_si_means: the layers have ", units, " units, the cache ", U);
  const double* C = counts.const_data_ptr<double>();
  double present = 0.0;
  for (int64_t k = 0; k < K; ++k) present += C[k] > 0.0 ? 1.0 : 0.0;
  const bool any = present > 0.0, several = present > 1.0;
  const double others = std::max(present - 1.0, 1.0);
  const double* best = cache.const_data_ptr<double>();
  const double* total = best + 2 * U;
  at::Tensor out = at::empty({static_cast<int64_t>(lengths.size())}, cache.options());
  double* o = out.mutable_data_ptr<double>();
  int64_t u = 0;
  for (size_t l = 0; l < lengths.size(); ++l) {
    double sum = 0.0;
    const int64_t stop = u + lengths[l];
#pragma omp simd reduction(+ : sum)
    for (int64_t i = u; i < stop; ++i) {
      const double mu_max = any ? best[i] : 0.0;
      const double rest = any && several ? (total[i] - best[i]) / others : 0.0;
      const double den = mu_max + rest + eps;
      sum += den != 0.0 ? (mu_max - rest) / (den != 0.0 ? den : 1.0) : 0.0;
    }
    o[l] = sum / static_cast<double>(lengths[l]);
    u = stop;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(selectivity, CPU, m) {
  m.impl("layer_si_means", &layer_si_means_cpu);
}

}  // namespace selectivity
