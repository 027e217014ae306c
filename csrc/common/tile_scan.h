// The one definition of the class-means reduction of a tiled state (tiled_state.h): per unit, over
// the present classes (counts > 0) in ascending order, m = sums / counts; the maximum (strictly
// greater wins, so ties keep the lowest class), its class, and the sum of the means. The CPU and CUDA
// kernels of index_cache and the rescans of accumulate_means all call it, so an incrementally kept
// maximum equals a full reduction's bit for bit.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SELECTIVITY_HD __host__ __device__
#define SELECTIVITY_SIMD
#else
#define SELECTIVITY_HD
#define SELECTIVITY_SIMD _Pragma("omp simd")
#endif

namespace selectivity {

// Units [i0, i1) of a tile whose K x T block starts at `tile`; writes best[i], arg[i], total[i]
// (-inf, -1, 0 where no class is present). The class loop is outside, so on the CPU the tile's
// block is read once, in address order.
SELECTIVITY_HD inline void scan_tile(const double* tile, const double* counts, int64_t K, int64_t T, int64_t i0,
                                     int64_t i1, double* best, double* arg, double* total) {
  for (int64_t i = i0; i < i1; ++i) {
    best[i] = -__builtin_huge_val();
    arg[i] = -1.0;
    total[i] = 0.0;
  }
  for (int64_t c = 0; c < K; ++c) {
    const double n = counts[c];
    if (!(n > 0.0)) continue;
    const double* row = tile + c * T;
    const double cd = static_cast<double>(c);
    SELECTIVITY_SIMD
    for (int64_t i = i0; i < i1; ++i) {
      const double m = row[i] / n;
      total[i] += m;
      const bool better = m > best[i];
      best[i] = better ? m : best[i];
      arg[i] = better ? cd : arg[i];
    }
  }
}

}  // namespace selectivity
