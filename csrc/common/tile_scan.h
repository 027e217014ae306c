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
// A class mean has three forms here, one definition for CPU and CUDA (both IEEE double):
//   x / n           exact: μ_max and its class, bit for bit as any full reduction;
//   x * (1 / n)     the term of `total` in a cache that steps keep: every path adds and removes this
//                   same value, so a class's term cancels exactly when it is replaced (it is within
//                   1 ulp of x / n; a cache without bounds sums x / n, see scan_tile);
//   mean_bound      an upper bound of x / n from the product: between scans, second and the group
//                   bounds only need to be bounds, so a step divides only where an exact mean can
//                   matter (a full scan keeps them exact).
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
#define SELECTIVITY_SIMD_OR(flag)
#else
#define SELECTIVITY_HD
#define SELECTIVITY_SIMD _Pragma("omp simd")
#define SELECTIVITY_PRAGMA(x) _Pragma(#x)  // a pragma with a macro argument
#define SELECTIVITY_SIMD_OR(flag) SELECTIVITY_PRAGMA(omp simd reduction(| : flag))
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

// cache [4 + G, U] (U = tiles * T) seen from tile t; G = 0: a cache [3, U] without bounds (second and
// groups null).
SELECTIVITY_HD inline TileCache tile_cache(double* cache, int64_t U, int64_t G, int64_t K, int64_t t, int64_t T) {
  double* c = cache + t * T;
  if (G == 0) return {c, c + U, c + 2 * U, nullptr, nullptr, 0, K, T};
  return {c, c + U, c + 2 * U, c + 3 * U, cache + 4 * U + t * T * G, G, (K + G - 1) / G, T};
}

// An upper bound of fl(x / n) from the product v = fl(x * fl(1 / n)): v is within ~2^-52 relative of
// x / n, so v + |v| * 2^-49 is above x / n's rounding; exact for x = 0, so dead units keep their exact
// ties.
SELECTIVITY_HD inline double mean_bound(double v) { return v + (v < 0.0 ? -v : v) * 0x1p-49; }

// Units [i0, i1) of a tile whose K x T block starts at `tile`, from scratch. The class loop is
// outside, so on the CPU the block is read once, in address order. (Measured slower here: four
// classes folded per sweep, and dividing only where a class can reach a unit's best with bounds
// for the rest; docs/extension.md.) kBounds false: best, arg and total only (a cache without
// bounds, for SI from scratch), two fewer stores per class and unit, and total the sum of the exact
// means in class order, not of the products: no step keeps this cache, and a sum of non-negative
// terms that includes best is >= best exactly, so μ_-max = (total - best) / (n - 1) is never a
// rounding below 0 where every class mean is >= 0 (compute()'s sign check relies on that).
template <bool kBounds = true>
SELECTIVITY_HD inline void scan_tile(const double* tile, const double* counts, int64_t K, int64_t T, int64_t i0,
                                     int64_t i1, const TileCache& o) {
  const double ninf = -__builtin_huge_val();
  for (int64_t i = i0; i < i1; ++i) {
    o.best[i] = ninf;
    o.arg[i] = -1.0;
    o.total[i] = 0.0;
    if (!kBounds) continue;
    o.second[i] = ninf;
    for (int64_t g = 0; g < o.G; ++g) o.group(g)[i] = ninf;
  }
  for (int64_t c = 0; c < K; ++c) {
    const double n = counts[c];
    if (!(n > 0.0)) continue;
    const double inv = 1.0 / n;
    const double* row = tile + c * T;
    const double cd = static_cast<double>(c);
    if (!kBounds) {
      SELECTIVITY_SIMD
      for (int64_t i = i0; i < i1; ++i) {
        const double m = row[i] / n;
        o.total[i] += m;
        const bool better = m > o.best[i];
        o.best[i] = better ? m : o.best[i];
        o.arg[i] = better ? cd : o.arg[i];
      }
      continue;
    }
    double* group = o.group(c / o.gs);
    SELECTIVITY_SIMD
    for (int64_t i = i0; i < i1; ++i) {
      const double m = row[i] / n;
      o.total[i] += row[i] * inv;
      const bool better = m > o.best[i];
      o.second[i] = better ? o.best[i] : (m > o.second[i] ? m : o.second[i]);
      o.best[i] = better ? m : o.best[i];
      o.arg[i] = better ? cd : o.arg[i];
      group[i] = m > group[i] ? m : group[i];
    }
  }
}

// Class `cd` of a unit has the new exact mean `nm`: the unit's best, arg and second in place; classes
// come in ascending order. Bitwise logic, no branches, so that the CPU loop over a tile's units
// vectorizes. The caller keeps `total` (the products above) and raises the class's group bound
// (raise_bound); where may_change is false for every unit this call would change nothing, so the
// caller may skip it and the division for nm.
// Flag: the stale flag's type (int64_t on the CPU: a vector lane as wide as the doubles beside it).
template <typename Flag>
SELECTIVITY_HD inline void update_unit(double nm, double cd, double& best, double& arg, double& second, Flag& stale) {
  const double b = best, a = arg, s = second;
  const bool pref = a == cd;
  const bool keep = pref & ((nm >= b) | (nm > s));  // rose, or fell but stays above every other class
  const bool take = (!pref) & ((nm > b) | ((nm == b) & (cd < a)));
  best = keep | take ? nm : b;  // a stale unit keeps its old maximum: a bound until its rescan
  arg = take ? cd : a;
  second = take ? (b > s ? b : s) : ((!pref) & (nm > s) ? nm : s);
  stale = static_cast<Flag>((!take) & (static_cast<bool>(stale) | (pref & !keep)));
}

SELECTIVITY_HD inline void raise_bound(double& bound, double m) { bound = m > bound ? m : bound; }

// Whether update_unit can change anything for a class whose new mean is at most `hi`: it is the
// preferred class, or it may pass second, or reach best (a tie at best counts from a lower class only).
SELECTIVITY_HD inline bool may_change(double hi, double cd, double best, double arg, double second) {
  return (arg == cd) | (hi > second) | (hi > best) | ((hi == best) & (cd < arg));
}

// The exact maximum and class of stale unit i: groups in decreasing bound order (the lowest group on
// equal bounds) until the next bound is below the best mean found, or equal to it with only higher
// classes in the group. Visited groups get their exact maximum as bound; `second` becomes the largest
// of the visited runner-up and the unvisited bounds. `total` is kept by the step and not rescanned.
//
// inv (the CPU; null on the GPU, where each unit is its own thread): 1 / counts per class. A visit
// loads whole cache lines, so the kLine units sharing unit i's line get, for free in memory traffic,
// an upper bound of the visited group's means (mean_bound: a product instead of a division), which
// replaces theirs where it is lower. Their next rescan then skips groups whose bounds had gone
// stale-high; every bound stays >= its exact group maximum.
constexpr int64_t kLine = 8;  // doubles per 64-byte cache line

SELECTIVITY_HD inline void rescan_unit(const double* tile, const double* counts, int64_t K, int64_t T,
                                       const TileCache& o, int64_t i, const double* inv = nullptr) {
  const double ninf = -__builtin_huge_val();
  double best = ninf, second = ninf, arg = -1.0;
  uint64_t visited = 0;
  const int64_t line0 = i - i % kLine;
  const bool whole_line = inv != nullptr && line0 + kLine <= T;
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
    double line_max[kLine];
    for (int64_t l = 0; l < kLine; ++l) line_max[l] = ninf;
    const int64_t c1 = (g + 1) * o.gs < K ? (g + 1) * o.gs : K;
    for (int64_t c0 = g * o.gs; c0 < c1; c0 += kGather) {
      // A run of the group's values first, in a loop of independent loads: a stale unit's classes
      // were mostly not touched this step and are out of cache, so their misses overlap.
      const int64_t n_run = c1 - c0 < kGather ? c1 - c0 : kGather;
      double x[kGather];
      for (int64_t k = 0; k < n_run; ++k) x[k] = tile[(c0 + k) * T + i];
      if (whole_line) {
        for (int64_t k = 0; k < n_run; ++k) {
          const double* line = tile + (c0 + k) * T + line0;
          const double q = inv[c0 + k];
          const bool present = counts[c0 + k] > 0.0;
          SELECTIVITY_SIMD
          for (int64_t l = 0; l < kLine; ++l) {
            const double b = mean_bound(line[l] * q);
            line_max[l] = present & (b > line_max[l]) ? b : line_max[l];
          }
        }
      }
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
    if (whole_line) {
      double* bound = o.group(g) + line0;
      SELECTIVITY_SIMD
      for (int64_t l = 0; l < kLine; ++l) bound[l] = line_max[l] < bound[l] ? line_max[l] : bound[l];
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
