// The one definition of the per-unit cache of a tiled state (tiled_state.h), of its update and of a
// unit's rescan; the CPU and CUDA kernels of index_cache and accumulate_means all call these, so an
// incrementally kept maximum equals a full reduction's bit for bit.
//
// Per unit (cache rows 0-3, each [tiles * T]): best = μ_max, arg = its class (ties: the lowest),
// total = the sum of the present classes' means, second = an upper bound of the other classes' means
// (the exact runner-up after a full scan); then the cache's last G rows, read as [tiles, G, T]: per
// unit and group g of classes [g * gs, (g + 1) * gs) an upper bound of its classes' means (-inf while
// none is present; exact after a full scan). A tile's bounds of one group are T adjacent values, so a
// step raises a touched class's group bound for the whole tile in one vectorized pass; a rescan reads
// a unit's G bounds at stride T from the tile's block, which the step has just brought into cache.
//
// Between scans a step's touched classes update every unit (update_unit); the preferred class may
// fall and stay the maximum while it is strictly above `second`. Below it the unit is stale and
// rescan_unit finds its maximum by visiting the class groups in decreasing bound order, stopping at
// the first group whose bound cannot win: usually one or two groups, not all K classes.
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

constexpr int64_t kMaxGroups = 64;  // a rescan marks visited groups in one 64-bit mask
constexpr int64_t kGather = 32;     // a rescan loads a group's values this many at a time

// The cache of one tile: unit i of the tile is element i of rows 0-3; group g's bounds are the T
// values from group(g).
struct TileCache {
  double *best, *arg, *total, *second, *groups;
  int64_t G, gs, T;
  SELECTIVITY_HD double* group(int64_t g) const { return groups + g * T; }
};

// cache [4 + G, U] (U = tiles * T) seen from tile t.
SELECTIVITY_HD inline TileCache tile_cache(double* cache, int64_t U, int64_t G, int64_t K, int64_t t, int64_t T) {
  double* c = cache + t * T;
  return {c, c + U, c + 2 * U, c + 3 * U, cache + 4 * U + t * T * G, G, (K + G - 1) / G, T};
}

// Units [i0, i1) of a tile whose K x T block starts at `tile`, from scratch. The class loop is
// outside, so on the CPU the block is read once, in address order.
SELECTIVITY_HD inline void scan_tile(const double* tile, const double* counts, int64_t K, int64_t T, int64_t i0,
                                     int64_t i1, const TileCache& o) {
  const double ninf = -__builtin_huge_val();
  for (int64_t i = i0; i < i1; ++i) {
    o.best[i] = ninf;
    o.arg[i] = -1.0;
    o.total[i] = 0.0;
    o.second[i] = ninf;
    for (int64_t g = 0; g < o.G; ++g) o.group(g)[i] = ninf;
  }
  for (int64_t c = 0; c < K; ++c) {
    const double n = counts[c];
    if (!(n > 0.0)) continue;
    const double* row = tile + c * T;
    const double cd = static_cast<double>(c);
    double* group = o.group(c / o.gs);
    SELECTIVITY_SIMD
    for (int64_t i = i0; i < i1; ++i) {
      const double m = row[i] / n;
      o.total[i] += m;
      const bool better = m > o.best[i];
      o.second[i] = better ? o.best[i] : (m > o.second[i] ? m : o.second[i]);
      o.best[i] = better ? m : o.best[i];
      o.arg[i] = better ? cd : o.arg[i];
      group[i] = m > group[i] ? m : group[i];
    }
  }
}

// Class `cd` of a unit went from mean `om` (0 if it was absent) to `nm`: the unit's best, arg, total
// and second in place; classes come in ascending order. Bitwise logic, no branches, so that the CPU
// loop over a tile's units vectorizes. The class's group bound is raised by the caller (raise_bound).
// Flag: the stale flag's type (int64_t on the CPU: a vector lane as wide as the doubles beside it).
template <typename Flag>
SELECTIVITY_HD inline void update_unit(double om, double nm, double cd, double& best, double& arg, double& total,
                                       double& second, Flag& stale) {
  const double b = best, a = arg, s = second;
  const bool pref = a == cd;
  const bool keep = pref & ((nm >= b) | (nm > s));  // rose, or fell but stays above every other class
  const bool take = !pref & ((nm > b) | ((nm == b) & (cd < a)));
  total += nm - om;
  best = keep | take ? nm : b;  // a stale unit keeps its old maximum: a bound until its rescan
  arg = take ? cd : a;
  second = take ? (b > s ? b : s) : (!pref & (nm > s) ? nm : s);
  stale = static_cast<Flag>(!take & (static_cast<bool>(stale) | (pref & !keep)));
}

SELECTIVITY_HD inline void raise_bound(double& bound, double m) { bound = m > bound ? m : bound; }

// The exact maximum and class of stale unit i: groups in decreasing bound order (the lowest group on
// equal bounds) until the next bound is below the best mean found, or equal to it with only higher
// classes in the group. Visited groups get their exact maximum as bound; `second` becomes the largest
// of the visited runner-up and the unvisited bounds. `total` is kept by update_unit and not rescanned.
SELECTIVITY_HD inline void rescan_unit(const double* tile, const double* counts, int64_t K, int64_t T,
                                       const TileCache& o, int64_t i) {
  const double ninf = -__builtin_huge_val();
  double best = ninf, second = ninf, arg = -1.0;
  uint64_t visited = 0;
  for (;;) {
    int64_t g = -1;
    double bound = ninf;
    for (int64_t h = 0; h < o.G; ++h) {
      const double x = o.group(h)[i];
      if (!((visited >> h) & 1) && (g < 0 || x > bound)) {
        g = h;
        bound = x;
      }
    }
    if (g < 0 || bound == ninf || bound < best ||
        (bound == best && static_cast<double>(g * o.gs) > arg)) {
      break;
    }
    visited |= uint64_t{1} << g;
    double group_max = ninf;
    const int64_t c1 = (g + 1) * o.gs < K ? (g + 1) * o.gs : K;
    for (int64_t c0 = g * o.gs; c0 < c1; c0 += kGather) {
      // A run of the group's values first, in a loop of independent loads: a stale unit's classes
      // were mostly not touched this step and are out of cache, so their misses overlap.
      const int64_t n_run = c1 - c0 < kGather ? c1 - c0 : kGather;
      double x[kGather];
      for (int64_t k = 0; k < n_run; ++k) x[k] = tile[(c0 + k) * T + i];
      for (int64_t k = 0; k < n_run; ++k) {
        const int64_t c = c0 + k;
        const double n = counts[c];
        if (!(n > 0.0)) continue;
        const double m = x[k] / n;
        group_max = m > group_max ? m : group_max;
        const double cd = static_cast<double>(c);
        if (m > best || (m == best && cd < arg)) {
          second = best;
          best = m;
          arg = cd;
        } else {
          second = m > second ? m : second;
        }
      }
    }
    o.group(g)[i] = group_max;
  }
  for (int64_t h = 0; h < o.G; ++h) {
    const double x = o.group(h)[i];
    if (!((visited >> h) & 1) && x > second) second = x;
  }
  o.best[i] = best;
  o.arg[i] = arg;
  o.second[i] = second;
}

}  // namespace selectivity
