// The tiled class-means state of accumulate_means and index_cache (selectivity/ops.py has the long form).
//
//   sums   [R, nt, K, T] float64  row r of the label matrix, tile t of T units, class k: the (decayed)
//                                 sum of the per-image means of units t*T .. t*T + T - 1
//   counts [R, K]        float64  the (decayed) number of images per class; a class is present where > 0
//   cache  [4 + G, nt*T] float64  per unit of row 0: mu_max (-inf while no class is present), the
//                                 preferred class (-1 then), the sum of the present classes' means,
//                                 a bound of the other classes' means and one bound per group of
//                                 ceil(K / G) classes, 1 <= G <= 64 (common/tile_scan.h); or [3, nt*T],
//                                 the first three rows only (index_cache without bounds: what SI needs)
//
// A tile's K x T block is contiguous, so a unit's rescan over all classes reads one contiguous run
// of memory (its T - 1 neighbours come with it), and a step's scatter writes T adjacent values per
// (class, tile). docs/extension.md has the measurements behind T.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace selectivity {

struct TiledState {
  int64_t R, nt, K, T, N;  // N: units in the means (<= nt * T; the rest of the last tile is padding)
  int64_t G;               // class groups of the cache (0 without one, or for a cache without bounds)
  bool bounds;             // a cache with second and the group bounds (4 + G rows), as accumulate_means needs
};

// Checks the state (and the cache and rescans counter when defined); `N` is the unit count the
// caller feeds (means.size(1)) or -1 for "any". Errors name the problem and the fix in one line.
TiledState check_tiled_state(const at::Tensor& sums, const at::Tensor& counts, const at::Tensor& cache,
                             const at::Tensor& rescans, int64_t N);

// accumulate_means keeps a cache with bounds only.
constexpr const char* kCacheWithBounds =
    "accumulate_means needs a cache with bounds ([4 + G, units]); make it with selectivity.ops.new_index_cache(sums)";

// Checks means [B, N] float32 and labels [R, B] int64 against the state (not the label values).
void check_means_args(const at::Tensor& means, const at::Tensor& labels, const at::Tensor& sums);

}  // namespace selectivity
