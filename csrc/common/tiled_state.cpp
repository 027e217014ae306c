// Argument checks of the tiled-state ops; the wording matches selectivity/ops.py.
#include "tiled_state.h"

#include "tile_scan.h"

#include <c10/util/Exception.h>

#include <string>

namespace selectivity {
namespace {

std::string num(int64_t v) { return std::to_string(v); }  // not through an ostream: see checks.cpp

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + num(t.size(d));
  return s + "]";
}

constexpr const char* kFix = "; make the state with selectivity.ops.new_tiled_state()";

}  // namespace

TiledState check_tiled_state(const at::Tensor& sums, const at::Tensor& counts, const at::Tensor& cache,
                             const at::Tensor& rescans, int64_t N) {
  TORCH_CHECK_TYPE(sums.scalar_type() == at::kDouble && counts.scalar_type() == at::kDouble,
                   "sums and counts must be float64", kFix);
  TORCH_CHECK_VALUE(sums.dim() == 4, "sums must be [R, tiles, K, T], got shape ", shape_of(sums), kFix);
  TiledState s{sums.size(0), sums.size(1), sums.size(2), sums.size(3), N < 0 ? sums.size(1) * sums.size(3) : N, 0,
               false};
  TORCH_CHECK_VALUE(counts.dim() == 2 && counts.size(0) == s.R && counts.size(1) == s.K,
                    "counts must be [R, K] = [", num(s.R), ", ", num(s.K), "], got shape ", shape_of(counts), kFix);
  TORCH_CHECK_VALUE(s.N <= s.nt * s.T && s.N > (s.nt - 1) * s.T,
                    "the state holds ", num(s.nt), " tiles of ", num(s.T), " units, which does not fit ", num(s.N),
                    " units", kFix);
  TORCH_CHECK_VALUE(sums.device() == counts.device() && sums.is_contiguous() && counts.is_contiguous(),
                    "sums and counts must be contiguous and on one device", kFix);
  if (cache.defined()) {
    TORCH_CHECK_VALUE(cache.scalar_type() == at::kDouble && cache.dim() == 2 &&
                          (cache.size(0) == 3 || (cache.size(0) >= 5 && cache.size(0) <= 4 + kMaxGroups)) &&
                          cache.size(1) == s.nt * s.T && cache.is_contiguous() && cache.device() == sums.device(),
                      "cache must be contiguous float64 [4 + G, ", num(s.nt * s.T), "] with 1 <= G <= 64 (or [3, ",
                      num(s.nt * s.T), "] without bounds) on the state's device, got ", shape_of(cache),
                      "; make it with selectivity.ops.new_index_cache()");
    s.bounds = cache.size(0) >= 5;
    s.G = s.bounds ? cache.size(0) - 4 : 0;
  }
  if (rescans.defined()) {
    TORCH_CHECK_VALUE(rescans.scalar_type() == at::kLong && rescans.numel() == 2 && rescans.is_contiguous() &&
                          rescans.device() == sums.device(),
                      "rescans must be a contiguous int64 [2] on the state's device");
  }
  return s;
}

void check_means_args(const at::Tensor& means, const at::Tensor& labels, const at::Tensor& sums) {
  TORCH_CHECK_TYPE(means.scalar_type() == at::kFloat, "means must be float32; use means.float()");
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64; use labels.long()");
  TORCH_CHECK_VALUE(means.dim() == 2 && means.is_contiguous(), "means must be a contiguous [B, N], got shape ",
                    shape_of(means));
  TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == sums.size(0) && labels.size(1) == means.size(0),
                    "labels must be [R, B] = [", num(sums.size(0)), ", ", num(means.size(0)),
                    "] (a row per state row, a column per image), got shape ", shape_of(labels));
  TORCH_CHECK_VALUE(means.device() == sums.device() && labels.device() == sums.device(),
                    "means, labels and the state must be on one device");
}

}  // namespace selectivity
