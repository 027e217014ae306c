// CPU kernel of accumulate_means: threads own tiles of units (at::parallel_for), so no two write one
// element of the state. Per tile and row, the images are taken class by class (sorted once per call):
// the class's images' means are summed in float64, then its T sums are updated once. For row 0 with a
// cache, the same pass brings each unit's cache up to date with each touched class's new mean
// (update_unit, common/tile_scan.h; classes ascending, so ties go to the lowest class as in the full
// reduction), and a unit whose preferred class fell below the bound of the others is rescanned
// (rescan_unit) while its tile is still in cache.
#include "../../../common/cpu_clones.h"
#include "../../../common/tile_scan.h"
#include "../../../common/tiled_state.h"
#include "../../../common/checks.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <optional>
#include <vector>

namespace selectivity {
namespace {

constexpr int64_t kMaxTile = 64;  // units per tile the kernel's stack buffers hold

// One row's images grouped by label: group j is class cls[j] with images order[start[j] .. start[j+1]).
struct Groups {
  std::vector<int64_t> order, cls, start;
};

Groups group_by_label(const int64_t* labels, int64_t B) {
  Groups g;
  g.order.resize(B);
  std::iota(g.order.begin(), g.order.end(), int64_t{0});
  std::stable_sort(g.order.begin(), g.order.end(), [&](int64_t a, int64_t b) { return labels[a] < labels[b]; });
  for (int64_t k = 0; k < B; ++k) {
    if (k == 0 || labels[g.order[k]] != labels[g.order[k - 1]]) {
      g.cls.push_back(labels[g.order[k]]);
      g.start.push_back(k);
    }
  }
  g.start.push_back(B);
  return g;
}

struct Step {
  TiledState s;
  const float* M;
  double* S;
  const double* C;
  double w;
  std::vector<Groups> rows;
  std::vector<double> old0, new0;  // row 0's touched classes' counts before / after the step
  std::vector<double> inv;         // 1 / row 0's counts after the step (rescan_unit's line bounds)
  double* cache = nullptr;  // [4 + G, tiles * T], or null
};

// acc[i] = the sum of group j's images' means of units t*T + i (0 for the padding past N).
inline void group_sums(const Step& st, const Groups& g, int64_t j, int64_t t, int64_t n, double* acc) {
  for (int64_t i = 0; i < st.s.T; ++i) acc[i] = 0.0;
  for (int64_t k = g.start[j]; k < g.start[j + 1]; ++k) {
    const float* m = st.M + g.order[k] * st.s.N + t * st.s.T;
    SELECTIVITY_SIMD
    for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<double>(m[i]);
  }
}

// Tile t of every row; returns the number of row-0 units that went stale (and were rescanned).
SELECTIVITY_HOT int64_t step_tile(const Step& st, int64_t t) {
  const int64_t T = st.s.T, K = st.s.K, nt = st.s.nt;
  const int64_t n = std::min(T, st.s.N - t * T);
  double acc[kMaxTile];
  int64_t stale[kMaxTile] = {};
  const TileCache o = st.cache ? tile_cache(st.cache, nt * T, st.s.G, K, t, T) : TileCache{};  // G = 0: none
  for (int64_t r = 0; r < st.s.R; ++r) {
    const Groups& g = st.rows[r];
    // Class rows, and the tile's means of the class's images, are fetched two classes ahead of
    // their use: their misses overlap the work before them (each image's means are B rows apart).
    const auto prefetch = [&](size_t j) {
      const double* row = st.S + ((r * nt + t) * K + g.cls[j]) * T;
      for (int64_t i = 0; i < T; i += 8) __builtin_prefetch(row + i, 1);
      for (int64_t k = g.start[j]; k < g.start[j + 1]; ++k) {
        const float* m = st.M + g.order[k] * st.s.N + t * T;
        for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(m + i, 0);
      }
    };
    for (size_t j = 0; j < 2 && j < g.cls.size(); ++j) prefetch(j);
    const bool cached = r == 0 && st.cache != nullptr;
    for (int64_t j = 0; j + 1 < static_cast<int64_t>(g.start.size()); ++j) {
      if (j + 2 < static_cast<int64_t>(g.cls.size())) prefetch(j + 2);
      group_sums(st, g, j, t, n, acc);
      double* row = st.S + ((r * nt + t) * K + g.cls[j]) * T;
      if (!cached) {
        SELECTIVITY_SIMD
        for (int64_t i = 0; i < T; ++i) row[i] += st.w * acc[i];
        continue;
      }
      const double oc = st.old0[j], nc = st.new0[j], cd = static_cast<double>(g.cls[j]);
      // total: the class's old term out (none if it was absent), the new one in (tile_scan.h). The
      // group bound is raised by a bound of the new mean; the exact mean, a division, is needed only
      // where update_unit may change something, mostly nowhere in the tile.
      const double inv_old = oc > 0.0 ? 1.0 / oc : 0.0, inv_new = 1.0 / nc;
      double* group = o.group(g.cls[j] / o.gs);
      int64_t changes = 0;
      SELECTIVITY_SIMD_OR(changes)
      for (int64_t i = 0; i < T; ++i) {
        const double x = row[i] + st.w * acc[i];
        const double v = x * inv_new;
        o.total[i] += v - row[i] * inv_old;
        row[i] = x;
        const double hi = mean_bound(v);
        raise_bound(group[i], hi);
        changes |= static_cast<int64_t>(may_change(hi, cd, o.best[i], o.arg[i], o.second[i]));
      }
      if (!changes) continue;
      SELECTIVITY_SIMD
      for (int64_t i = 0; i < T; ++i) update_unit(row[i] / nc, cd, o.best[i], o.arg[i], o.second[i], stale[i]);
    }
  }
  if (st.cache == nullptr) return 0;
  const double* tile = st.S + t * K * T;
  int64_t n_stale = 0;
  for (int64_t i = 0; i < T; ++i) {
    if (!stale[i]) continue;
    rescan_unit(tile, st.C, K, T, o, i, st.inv.data());
    ++n_stale;
  }
  return n_stale;
}

void accumulate_means_cpu(const at::Tensor& means, const at::Tensor& labels, double weight, const at::Tensor& sums,
                          const at::Tensor& counts, const std::optional<at::Tensor>& cache,
                          const std::optional<at::Tensor>& rescans) {
  check_means_args(means, labels, sums);
  const at::Tensor none;
  Step st;
  st.s = check_tiled_state(sums, counts, cache.value_or(none), rescans.value_or(none), means.size(1));
  TORCH_CHECK_VALUE(st.s.T <= kMaxTile, "tiles of at most ", kMaxTile, " units, got ", st.s.T);
  TORCH_CHECK_VALUE(!cache.has_value() || st.s.bounds, kCacheWithBounds);
  TORCH_CHECK_VALUE(weight > 0.0, "weight must be > 0");
  const int64_t R = st.s.R, K = st.s.K, B = means.size(0);
  const at::Tensor lab = labels.contiguous();
  const int64_t* l = lab.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < R * B; ++k) {  // before anything is touched: a bad batch changes nothing
    if (l[k] < 0 || l[k] >= K) throw_label_error(l[k], K, "");
  }
  st.M = means.const_data_ptr<float>();
  st.S = sums.mutable_data_ptr<double>();
  st.w = weight;
  double* C = counts.mutable_data_ptr<double>();
  st.C = C;  // row 0: the rescans read the counts after the step
  for (int64_t r = 0; r < R; ++r) {
    st.rows.push_back(group_by_label(l + r * B, B));
    const Groups& g = st.rows.back();
    for (size_t j = 0; j < g.cls.size(); ++j) {
      double& c = C[r * K + g.cls[j]];
      if (r == 0) st.old0.push_back(c);
      c += weight * static_cast<double>(g.start[j + 1] - g.start[j]);
      if (r == 0) st.new0.push_back(c);
    }
  }
  if (cache.has_value()) {
    st.cache = cache->mutable_data_ptr<double>();
    st.inv.resize(K);
    for (int64_t k = 0; k < K; ++k) st.inv[k] = 1.0 / C[k];
  }
  if (B == 0) return;
  std::vector<int64_t> stale_units(at::get_num_threads() + 1, 0);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, R * B * st.s.T));
  at::parallel_for(0, st.s.nt, grain, [&](int64_t t0, int64_t t1) {
    int64_t units = 0;
    for (int64_t t = t0; t < t1; ++t) units += step_tile(st, t);
    stale_units[at::get_thread_num()] += units;
  });
  if (rescans.has_value()) {
    int64_t* out = rescans->mutable_data_ptr<int64_t>();
    for (const int64_t n : stale_units) out[0] += n;
    out[1] += 1;  // calls
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(selectivity, CPU, m) {
  m.impl("accumulate_means", &accumulate_means_cpu);
}

}  // namespace selectivity
