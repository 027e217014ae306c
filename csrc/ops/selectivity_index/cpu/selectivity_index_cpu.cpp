// CPU kernel of selectivity_index: one pass over sums[K, U], parallel over tiles of units.
#include "../../../common/checks.h"
#include "../../../common/cpu_clones.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace selectivity {
namespace {

// Elements a task should at least touch to be worth a thread (ATen's own GRAIN_SIZE).
constexpr int64_t kGrainElements = 32768;

// Units are tiled so the running max/argmax/total of a tile (24 KB) stay in L1/L2 while the present
// classes stream past; the tile loop is vectorized over units (sums rows are contiguous in u). A tile
// reads 8 KB of each row: with 2 KB (256 units) the hardware prefetcher restarts every 2 KB, which
// made the SI read of a ResNet-50 state markedly slower than a plain read (docs/extension.md).
constexpr int64_t kIndexTile = 1024;

// One tile of n units starting at u0: best/arg/total running over the present classes' rows.
SELECTIVITY_HOT void index_tile(const double* S, const int64_t* C, const std::vector<int64_t>& present, int64_t U,
                                int64_t u0, int64_t n, double eps, double* o_si, int64_t* o_pref, double* o_max,
                                double* o_rest) {
  const int64_t n_present = static_cast<int64_t>(present.size());
  double* best = o_max + u0;
  int64_t* arg = o_pref + u0;
  double* total = o_rest + u0;  // holds the sum of all class means until the last step
  if (n_present == 0) {
    for (int64_t i = 0; i < n; ++i) {
      best[i] = 0.0;
      arg[i] = -1;
      total[i] = 0.0;
      o_si[u0 + i] = 0.0;
    }
    return;
  }
  {
    const int64_t c = present[0];
    const double cnt = static_cast<double>(C[c]);
    const double* row = S + c * U + u0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      best[i] = row[i] / cnt;
      arg[i] = c;
      total[i] = best[i];
    }
  }
  // Four classes per sweep of the tile: the running best/arg/total (24 bytes a unit) are loaded and
  // stored once per four 8-byte sums, not once per sum; that traffic, not the arithmetic, bounded the
  // one-row loop. The four are folded in class order, so ties still keep the lowest class and the
  // total is summed in the same order as one class at a time.
  int64_t j = 1;
  for (; j + 4 <= n_present; j += 4) {
    const int64_t c0 = present[j], c1 = present[j + 1], c2 = present[j + 2], c3 = present[j + 3];
    const double n0 = static_cast<double>(C[c0]), n1 = static_cast<double>(C[c1]);
    const double n2 = static_cast<double>(C[c2]), n3 = static_cast<double>(C[c3]);
    const double* r0 = S + c0 * U + u0;
    const double* r1 = S + c1 * U + u0;
    const double* r2 = S + c2 * U + u0;
    const double* r3 = S + c3 * U + u0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const double m0 = r0[i] / n0, m1 = r1[i] / n1, m2 = r2[i] / n2, m3 = r3[i] / n3;
      double b = best[i];
      int64_t a = arg[i];
      a = m0 > b ? c0 : a;  // strict: ties keep the lower class index
      b = m0 > b ? m0 : b;
      a = m1 > b ? c1 : a;
      b = m1 > b ? m1 : b;
      a = m2 > b ? c2 : a;
      b = m2 > b ? m2 : b;
      a = m3 > b ? c3 : a;
      b = m3 > b ? m3 : b;
      best[i] = b;
      arg[i] = a;
      total[i] = (((total[i] + m0) + m1) + m2) + m3;
    }
  }
  for (; j < n_present; ++j) {
    const int64_t c = present[j];
    const double cnt = static_cast<double>(C[c]);
    const double* row = S + c * U + u0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const double m = row[i] / cnt;
      total[i] += m;
      const bool better = m > best[i];
      best[i] = better ? m : best[i];
      arg[i] = better ? c : arg[i];
    }
  }
  const double others = static_cast<double>(n_present - 1);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const double rest = n_present > 1 ? (total[i] - best[i]) / others : 0.0;
    const double den = best[i] + rest + eps;
    total[i] = rest;
    o_si[u0 + i] = den != 0.0 ? (best[i] - rest) / den : 0.0;  // all-zero unit -> 0, not NaN
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> selectivity_index_cpu(const at::Tensor& sums,
                                                                                  const at::Tensor& counts,
                                                                                  double eps) {
  check_index_args(sums, counts);
  auto [si, pref, mu_max, mu_rest] = empty_index_outputs(sums);
  const int64_t K = sums.size(0), U = sums.size(1);
  const double* S = sums.const_data_ptr<double>();
  const int64_t* C = counts.const_data_ptr<int64_t>();
  std::vector<int64_t> present;  // the same classes are present for every unit
  for (int64_t c = 0; c < K; ++c) {
    if (C[c] > 0) present.push_back(c);
  }
  const int64_t n_present = static_cast<int64_t>(present.size());
  double* o_si = si.mutable_data_ptr<double>();
  int64_t* o_pref = pref.mutable_data_ptr<int64_t>();
  double* o_max = mu_max.mutable_data_ptr<double>();
  double* o_rest = mu_rest.mutable_data_ptr<double>();
  const int64_t ntiles = (U + kIndexTile - 1) / kIndexTile;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, n_present * kIndexTile));

  at::parallel_for(0, ntiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t u0 = t * kIndexTile;
      index_tile(S, C, present, U, u0, std::min(U, u0 + kIndexTile) - u0, eps, o_si, o_pref, o_max, o_rest);
    }
  });
  return {si, pref, mu_max, mu_rest};
}

}  // namespace

TORCH_LIBRARY_IMPL(selectivity, CPU, m) {
  m.impl("selectivity_index", &selectivity_index_cpu);
}

}  // namespace selectivity
