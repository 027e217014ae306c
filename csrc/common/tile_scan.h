// The one definition of the per-unit cache of a tiled state (tiled_state.h) and of its update.
//
// scan_tile: per unit, over the present classes (counts > 0) in ascending order, m = sums / counts;
// the maximum (strictly greater wins, so ties keep the lowest class), its class, the sum of the
// means and the runner-up (the largest mean of the other classes). The CPU and CUDA kernels of
// index_cache and the rescans of accumulate_means all call it, so an incrementally kept maximum
// equals a full reduction's bit for bit.
//
// update_unit: one touched class's old and new mean into a unit's cache. Between scans `second` is an
// upper bound of every class but the preferred one, so the preferred class may fall and stay the
// maximum while it is strictly above that bound; below it the unit is stale (rescan it).
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
                                     int64_t i1, double* best, double* arg, double* total, double* second) {
  for (int64_t i = i0; i < i1; ++i) {
    best[i] = -__builtin_huge_val();
    arg[i] = -1.0;
    total[i] = 0.0;
    second[i] = -__builtin_huge_val();
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
      second[i] = better ? best[i] : (m > second[i] ? m : second[i]);
      best[i] = better ? m : best[i];
      arg[i] = better ? cd : arg[i];
    }
  }
}

// Class `cd` of a unit went from mean `om` (0 if it was absent) to `nm`; classes come in ascending order.
SELECTIVITY_HD inline void update_unit(double om, double nm, double cd, double& best, double& arg, double& total,
                                       double& second, bool& stale) {
  const double b = best, a = arg, s = second;
  const bool pref = a == cd;
  const bool keep = pref && (nm >= b || nm > s);  // rose, or fell but stays above every other class
  const bool take = !pref && (nm > b || (nm == b && cd < a));
  total += nm - om;
  best = keep || take ? nm : b;  // a stale unit keeps its old maximum: a bound until its rescan
  arg = take ? cd : a;
  second = take ? (b > s ? b : s) : (!pref && nm > s ? nm : s);
  stale = !take && (stale || (pref && !keep));
}

}  // namespace selectivity
