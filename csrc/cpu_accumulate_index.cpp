// CPU kernel of accumulate_index: accumulate a batch, then give the selectivity index of the updated
// state, reading only the rows of the classes the batch touched (<= B of K) instead of the whole state.
//
// Why: selectivity_index must read all of sums[K, U]; for ResNet-50 at K = 1000 that is 121 MB, more
// than the activations accumulate reads, so SI at every step would double the tracking cost. A batch
// changes only the means of its own classes, so the per-unit results can be kept up to date from those.
//
// The cache [4 + G, U] (float64), per unit u:
//   row 0  best[u]    the largest class mean (mu_max)
//   row 1  arg[u]     its class (lowest on ties), -1 while no class is present, kStale when unknown
//   row 2  total[u]   the sum of the present classes' means
//   row 3  second[u]  an upper bound of the means of every present class but arg
//   row 4 + g  ub[g][u]  an upper bound of the means of the classes in group g (classes
//                        [g * gs, (g + 1) * gs), gs = ceil(K / G)); -inf while none of them is present
// A batch subtracts its classes' old means from total and adds their new ones; a touched class that
// beats best takes its place; if the best class itself falls below `second`, the unit is stale and
// is rescanned. The rescan visits groups in decreasing ub order and stops at the first group whose
// bound is below the best mean found, so it usually reads one or two groups (~2 * sqrt(K) means),
// not K. Bounds only grow between rescans (a touched class raises its group's and `second`), and a
// rescan tightens those it visits.
//
// Exactness: best and arg are those of selectivity_index on the same state, bit for bit (the same
// divisions, the same tie rule). total is updated by differences, so mu_rest and si agree with
// selectivity_index to rounding (~1e-16 relative per update; tests hold it to 1e-9).
// Non-finite means (a NaN or inf activation) end the incremental path: the cache is rebuilt from the
// whole state, whose rules for NaN (those of selectivity_index) the updates do not reproduce.
#include "cpu_clones.h"
#include "selectivity.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

namespace selectivity {
namespace {

constexpr double kNone = -1.0;   // arg while no class is present
constexpr double kStale = -2.0;  // arg when the best class fell: rescan
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Units per task: a tile's best/arg/total (3 x 2 KB) stay in L1 while the touched rows stream past.
constexpr int64_t kTile = 256;
constexpr int64_t kGrainElements = 32768;  // ATen's GRAIN_SIZE

struct Layout {
  int64_t K, U, G, gs;
  const double* S;
  const int64_t* C;
  double* best;
  double* arg;
  double* total;
  double* second;
  double* ub;  // [G, U]
};

Layout layout_of(const at::Tensor& sums, const at::Tensor& counts, const at::Tensor& cache) {
  Layout L;
  L.K = sums.size(0);
  L.U = sums.size(1);
  L.G = cache.size(0) - 4;
  L.gs = std::max<int64_t>(1, (L.K + L.G - 1) / L.G);
  L.S = sums.const_data_ptr<double>();
  L.C = counts.const_data_ptr<int64_t>();
  double* t = cache.mutable_data_ptr<double>();
  L.best = t;
  L.arg = t + L.U;
  L.total = t + 2 * L.U;
  L.second = t + 3 * L.U;
  L.ub = t + 4 * L.U;
  return L;
}

int64_t grain_tiles(int64_t rows) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, rows * kTile)); }

// The whole cache of units [u0, u1) from the state, in selectivity_index's order of operations
// (ascending classes, the first present class starts best, strict > after), so that right after a
// rebuild every output equals selectivity_index's bit for bit.
SELECTIVITY_HOT void rebuild_tile(const Layout& L, const std::vector<int64_t>& present, int64_t u0, int64_t u1) {
  for (int64_t g = 0; g < L.G; ++g) {
    double* ub = L.ub + g * L.U;
    for (int64_t u = u0; u < u1; ++u) ub[u] = kNegInf;
  }
  for (int64_t u = u0; u < u1; ++u) {
    L.best[u] = kNegInf;  // so that the first present class of a later batch always takes its place
    L.arg[u] = kNone;
    L.total[u] = 0.0;
    L.second[u] = kNegInf;
  }
  bool first = true;
  for (const int64_t c : present) {
    const double n = static_cast<double>(L.C[c]), cd = static_cast<double>(c);
    const double* row = L.S + c * L.U;
    double* ub = L.ub + (c / L.gs) * L.U;
#pragma omp simd
    for (int64_t u = u0; u < u1; ++u) {
      const double m = row[u] / n;
      L.total[u] += m;
      const bool better = first || m > L.best[u];
      L.second[u] = first ? kNegInf : (better ? L.best[u] : (m > L.second[u] ? m : L.second[u]));
      L.best[u] = better ? m : L.best[u];
      L.arg[u] = better ? cd : L.arg[u];
      ub[u] = (m > ub[u] || m != m) ? m : ub[u];
    }
    first = false;
  }
}

// Exact best/arg of unit u from the group bounds (all present means finite): groups in decreasing
// bound order until the next bound is below the best mean found (or equal to it with only higher
// classes left). Visited groups get their exact maximum as their new bound; second becomes the
// larger of the runner-up among the visited classes and the bounds of the groups not visited.
void rescan_unit(const Layout& L, int64_t u, std::vector<char>& visited) {
  std::fill(visited.begin(), visited.end(), 0);
  double best = kNegInf, second = kNegInf;
  int64_t arg = -1;
  for (;;) {
    int64_t g = -1;
    double bound = kNegInf;
    for (int64_t h = 0; h < L.G; ++h) {
      const double b = L.ub[h * L.U + u];
      if (!visited[h] && (g < 0 || b > bound)) {
        g = h;
        bound = b;
      }
    }
    if (g < 0 || bound == kNegInf || bound < best || (bound == best && g * L.gs > arg)) break;
    visited[g] = 1;
    double group_max = kNegInf;
    const int64_t c1 = std::min(L.K, (g + 1) * L.gs);
    for (int64_t c = g * L.gs; c < c1; ++c) {
      if (L.C[c] <= 0) continue;
      const double m = L.S[c * L.U + u] / static_cast<double>(L.C[c]);
      group_max = m > group_max ? m : group_max;
      if (m > best || (m == best && c < arg)) {
        second = best;
        best = m;
        arg = c;
      } else {
        second = m > second ? m : second;
      }
    }
    L.ub[g * L.U + u] = group_max;
  }
  for (int64_t h = 0; h < L.G; ++h) {
    const double b = L.ub[h * L.U + u];
    if (!visited[h]) second = b > second ? b : second;
  }
  L.second[u] = second;
  L.best[u] = best;
  L.arg[u] = static_cast<double>(arg);
}

// total -= the old means of the touched classes that were present (before the batch is added).
SELECTIVITY_HOT void remove_old_means(const Layout& L, const std::vector<int64_t>& touched, int64_t u0, int64_t u1) {
  for (const int64_t c : touched) {
    if (L.C[c] <= 0) continue;
    const double n = static_cast<double>(L.C[c]);
    const double* row = L.S + c * L.U;
#pragma omp simd
    for (int64_t u = u0; u < u1; ++u) L.total[u] -= row[u] / n;
  }
}

// After the batch is added: the touched classes' new means into total, bounds and best; rescans for the
// units whose best class fell. Returns false if a total is not finite (the caller rebuilds).
SELECTIVITY_HOT bool add_new_means(const Layout& L, const std::vector<int64_t>& touched, int64_t u0, int64_t u1,
                                   std::vector<char>& visited) {
  for (const int64_t c : touched) {  // ascending: ties between touched classes keep the lower one
    const double n = static_cast<double>(L.C[c]), cd = static_cast<double>(c);
    const double* row = L.S + c * L.U;
    double* ub = L.ub + (c / L.gs) * L.U;
#pragma omp simd
    for (int64_t u = u0; u < u1; ++u) {
      const double m = row[u] / n;
      L.total[u] += m;
      ub[u] = (m > ub[u] || m != m) ? m : ub[u];
      const double b = L.best[u], a = L.arg[u], s2 = L.second[u];
      const bool is_best = a == cd, other = !is_best && a != kStale;
      const bool keep = is_best && (m >= b || m > s2);  // rose, or fell but stays above all others
      const bool better = other && (m > b || (m == b && cd < a));
      L.second[u] = better ? (b > s2 ? b : s2) : (other && m > s2 ? m : s2);
      L.best[u] = (better || keep) ? m : b;
      L.arg[u] = (is_best && !keep) ? kStale : (better ? cd : a);
    }
  }
  bool finite = true;
  for (int64_t u = u0; u < u1; ++u) {
    finite = finite && (L.total[u] - L.total[u] == 0.0);  // false for inf and NaN
  }
  if (!finite) return false;
  for (int64_t u = u0; u < u1; ++u) {
    if (L.arg[u] == kStale) rescan_unit(L, u, visited);
  }
  return true;
}

// si, pref_class, mu_max, mu_rest of units [u0, u1) from the cache, as selectivity_index forms them.
void outputs_tile(const Layout& L, int64_t n_present, double eps, int64_t u0, int64_t u1, double* o_si,
                  int64_t* o_pref, double* o_max, double* o_rest) {
  if (n_present == 0) {
    for (int64_t u = u0; u < u1; ++u) {
      o_si[u] = 0.0;
      o_pref[u] = -1;
      o_max[u] = 0.0;
      o_rest[u] = 0.0;
    }
    return;
  }
  const double others = static_cast<double>(n_present - 1);
  for (int64_t u = u0; u < u1; ++u) {
    const double best = L.best[u];
    const double rest = n_present > 1 ? (L.total[u] - best) / others : 0.0;
    const double den = best + rest + eps;
    o_si[u] = den != 0.0 ? (best - rest) / den : 0.0;
    o_pref[u] = static_cast<int64_t>(L.arg[u]);
    o_max[u] = best;
    o_rest[u] = rest;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> accumulate_index_cpu(
    const at::Tensor& act, const at::Tensor& labels, const at::Tensor& sums, const at::Tensor& counts,
    const at::Tensor& cache, double eps, bool rebuild) {
  const ActView v = check_accumulate_args(act, labels, sums, counts);
  check_index_cache(sums, cache);
  const at::Tensor lab = labels.contiguous();
  const int64_t* l = lab.const_data_ptr<int64_t>();
  const int64_t K = sums.size(0), U = sums.size(1);
  check_labels_cpu(l, v.B, K);  // before anything is touched: a bad batch changes nothing
  const Layout L = layout_of(sums, counts, cache);
  const int64_t ntiles = (U + kTile - 1) / kTile;

  std::vector<int64_t> touched(l, l + v.B);  // the batch's classes, ascending, once each
  std::sort(touched.begin(), touched.end());
  touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
  const int64_t n_touched = static_cast<int64_t>(touched.size());

  std::function<void()> before_sums;
  if (!rebuild) {  // after the activation is read and just before the rows change: they stay in cache
    before_sums = [&] {
      at::parallel_for(0, ntiles, grain_tiles(n_touched), [&](int64_t t0, int64_t t1) {
        remove_old_means(L, touched, t0 * kTile, std::min(U, t1 * kTile));
      });
    };
  }
  accumulate_cpu_checked(v, l, sums, counts, before_sums);
  std::vector<int64_t> present;
  for (int64_t c = 0; c < K; ++c) {
    if (L.C[c] > 0) present.push_back(c);
  }
  const int64_t n_present = static_cast<int64_t>(present.size());

  if (!rebuild) {
    std::atomic<bool> finite{true};
    at::parallel_for(0, ntiles, grain_tiles(n_touched), [&](int64_t t0, int64_t t1) {
      std::vector<char> visited(L.G);
      for (int64_t t = t0; t < t1; ++t) {
        if (!add_new_means(L, touched, t * kTile, std::min(U, (t + 1) * kTile), visited)) finite = false;
      }
    });
    rebuild = !finite;
  }
  if (rebuild) {
    at::parallel_for(0, ntiles, grain_tiles(n_present), [&](int64_t t0, int64_t t1) {
      rebuild_tile(L, present, t0 * kTile, std::min(U, t1 * kTile));
    });
  }

  auto [si, pref, mu_max, mu_rest] = empty_index_outputs(sums);
  double* o_si = si.mutable_data_ptr<double>();
  int64_t* o_pref = pref.mutable_data_ptr<int64_t>();
  double* o_max = mu_max.mutable_data_ptr<double>();
  double* o_rest = mu_rest.mutable_data_ptr<double>();
  outputs_tile(L, n_present, eps, 0, U, o_si, o_pref, o_max, o_rest);
  return {si, pref, mu_max, mu_rest};
}

}  // namespace

TORCH_LIBRARY_IMPL(selectivity, CPU, m) {
  m.impl("accumulate_index", &accumulate_index_cpu);
}

}  // namespace selectivity
