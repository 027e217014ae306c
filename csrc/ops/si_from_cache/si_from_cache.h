// The ATen implementation of layer_si_means (si_from_cache.cpp), which the CPU kernel falls back to
// for what its loop does not take (a shift, other dtypes).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace selectivity {

at::Tensor layer_si_means(const at::Tensor& cache, const at::Tensor& counts, double eps,
                          const std::optional<at::Tensor>& shift, at::IntArrayRef lengths);

}  // namespace selectivity
