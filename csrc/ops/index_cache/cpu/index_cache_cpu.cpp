// CPU kernel of index_cache: scan_tile over every tile, tiles split over threads (without the bounds
// for a cache of 3 rows).
#include "../../../common/cpu_clones.h"
#include "../../../common/tile_scan.h"
#include "../../../common/tiled_state.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace selectivity {
namespace {

SELECTIVITY_HOT void scan_tiles(const double* S, const double* C, int64_t K, int64_t T, int64_t t0, int64_t t1,
                                double* out, int64_t U, int64_t G, bool bounds) {
  for (int64_t t = t0; t < t1; ++t) {
    const TileCache o = tile_cache(out, U, G, K, t, T);
    if (bounds) {
      scan_tile<true>(S + t * K * T, C, K, T, 0, T, o);
    } else {
      scan_tile<false>(S + t * K * T, C, K, T, 0, T, o);
    }
  }
}

void index_cache_cpu(const at::Tensor& sums, const at::Tensor& counts, const at::Tensor& cache) {
  TORCH_CHECK_VALUE(sums.dim() == 3 && counts.dim() == 1,
                    "index_cache takes one row of a tiled state: sums [tiles, K, T] and counts [K]");
  const TiledState s = check_tiled_state(sums.unsqueeze(0), counts.unsqueeze(0), cache, at::Tensor(), -1);
  const double* S = sums.const_data_ptr<double>();
  const double* C = counts.const_data_ptr<double>();
  double* out = cache.mutable_data_ptr<double>();
  const int64_t U = s.nt * s.T;
  at::parallel_for(0, s.nt, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s.K * s.T)), [&](int64_t t0, int64_t t1) {
    scan_tiles(S, C, s.K, s.T, t0, t1, out, U, s.G, s.bounds);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(selectivity, CPU, m) {
  m.impl("index_cache", &index_cache_cpu);
}

}  // namespace selectivity
