// si_from_cache and layer_si_means: per-unit SI from a cache (common/tile_scan.h) and its row's
// counts, and the mean SI of consecutive runs of units (the tracked layers). Written once with ATen
// ops for every device (CompositeExplicitAutograd: also what fake tensors and torch.compile run);
// the Python reference (selectivity/ops.py, si_from_cache_reference) is the same sequence of ops,
// bit for bit. layer_si_means is the tracker's per-step SI, inside the training step: here its ~40
// small kernels (the formula, a slice and a mean per layer) are launched from C++, with no Python
// between them, and on the CPU, where each such op on [units] costs tens of microseconds in a
// training step, it has a kernel of its own (cpu/layer_si_means_cpu.cpp: one loop).
#include "si_from_cache.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace selectivity {

using at::Tensor;

static std::tuple<Tensor, Tensor, Tensor, Tensor> si_from_cache(const Tensor& cache, const Tensor& counts, double eps,
                                                        const std::optional<Tensor>& shift) {
  TORCH_CHECK_VALUE(cache.dim() == 2 && cache.size(0) >= 3 && counts.dim() == 1,
                    "si_from_cache takes a cache [4 + G, units] or [3, units] and its row's counts [K]; make the cache "
                    "with selectivity.ops.new_index_cache() or index_cache()");
  const Tensor present = counts.gt(0).sum().to(cache.scalar_type());
  const Tensor any = present.gt(0), several = present.gt(1);
  const Tensor best = cache.select(0, 0);
  Tensor mu_max = at::where(any, best, 0.0);
  Tensor rest = at::where(several, (cache.select(0, 2) - best) / (present - 1).clamp_min(1), 0.0);
  rest = at::where(any, rest, 0.0);
  if (shift.has_value()) {
    mu_max = at::where(any, mu_max - *shift, 0.0).clamp_min(0.0);
    rest = at::where(several, rest - *shift, 0.0).clamp_min(0.0);
  }
  const Tensor den = mu_max + rest + eps;
  const Tensor nonzero = den.ne(0);
  Tensor si = at::where(nonzero, (mu_max - rest) / at::where(nonzero, den, 1.0), 0.0);
  return {si, cache.select(0, 1).to(at::kLong), mu_max, rest};
}

// The mean SI of each run of `lengths` units from unit 0 (the tracked layers, in order), as [L].
Tensor layer_si_means(const Tensor& cache, const Tensor& counts, double eps, const std::optional<Tensor>& shift,
                      at::IntArrayRef lengths) {
  const Tensor si = std::get<0>(si_from_cache(cache, counts, eps, shift));
  int64_t units = 0;
  for (const int64_t n : lengths) units += n;
  TORCH_CHECK_VALUE(units <= si.size(0), "layer_si_means: the layers have ", units, " units, the cache ", si.size(0));
  std::vector<Tensor> means;
  for (const Tensor& layer : si.narrow(0, 0, units).split_with_sizes(lengths)) means.push_back(layer.mean());
  return at::stack(means);
}

TORCH_LIBRARY_FRAGMENT(selectivity, m) {
  m.def("si_from_cache(Tensor cache, Tensor counts, float eps, Tensor? shift) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_si_means(Tensor cache, Tensor counts, float eps, Tensor? shift, int[] lengths) -> Tensor");
}

TORCH_LIBRARY_IMPL(selectivity, CompositeExplicitAutograd, m) {
  m.impl("si_from_cache", &si_from_cache);
  m.impl("layer_si_means", &layer_si_means);
}

}  // namespace selectivity
