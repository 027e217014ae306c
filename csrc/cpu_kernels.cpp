// CPU kernels: C++ with OpenMP threads (through at::parallel_for, which runs on torch's OpenMP pool
// and so follows torch.set_num_threads) and `omp simd` inner loops over the contiguous dim.
//
// Both kernels split the UNITS among threads: a thread owns sums[:, u0:u1) outright, so there is
// no race on sums and no per-thread [K, U] partial buffer (K*U*8 bytes per thread would be 120 MB
// for ResNet-50 at K=1000). Every value is summed in float64, so fp32 inputs match the float64
// reference to ~1e-15, not merely to fp32 rounding.
#include "selectivity.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace selectivity {
namespace {

// Units per work item: 16 fp32 = one 64-byte cache line of act; 16 doubles = two lines of sums.
// Splitting on block boundaries keeps two threads from writing one cache line of sums.
constexpr int64_t kUnitBlock = 16;

// Blocks per task so a task reads at least GRAIN_SIZE elements; smaller inputs run on one thread.
int64_t grain_blocks(const ActView& v) {
  const int64_t per_block = std::max<int64_t>(1, v.B * v.P * kUnitBlock);
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / per_block);
}

// channels_last / [B, U]: for each image, add its P pixel rows of U contiguous values into a
// float64 row `acc` (vectorized over units), then add acc / P into sums[label].
template <typename scalar_t>
void accumulate_units_inner(const ActView& v, const int64_t* labels, double* sums) {
  const scalar_t* x = v.act.const_data_ptr<scalar_t>();
  const int64_t U = v.U, P = v.P, nblocks = (U + kUnitBlock - 1) / kUnitBlock;
  const double dP = static_cast<double>(P);
  at::parallel_for(0, nblocks, grain_blocks(v), [&](int64_t blk0, int64_t blk1) {
    const int64_t u0 = blk0 * kUnitBlock, n = std::min(U, blk1 * kUnitBlock) - u0;
    std::vector<double> acc(n);
    double* a = acc.data();
    for (int64_t b = 0; b < v.B; ++b) {
      std::fill(acc.begin(), acc.end(), 0.0);
      const scalar_t* xb = x + b * v.sB + u0;
      for (int64_t p = 0; p < P; ++p) {
        const scalar_t* xp = xb + p * v.sP;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) a[i] += static_cast<double>(static_cast<float>(xp[i]));
      }
      double* row = sums + labels[b] * U + u0;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) row[i] += a[i] / dP;
    }
  });
}

// NCHW: for each (image, unit) reduce the contiguous plane of P pixels.
template <typename scalar_t>
void accumulate_planes(const ActView& v, const int64_t* labels, double* sums) {
  const scalar_t* x = v.act.const_data_ptr<scalar_t>();
  const int64_t U = v.U, P = v.P, nblocks = (U + kUnitBlock - 1) / kUnitBlock;
  const double dP = static_cast<double>(P);
  at::parallel_for(0, nblocks, grain_blocks(v), [&](int64_t blk0, int64_t blk1) {
    const int64_t u0 = blk0 * kUnitBlock, u1 = std::min(U, blk1 * kUnitBlock);
    for (int64_t b = 0; b < v.B; ++b) {
      double* row = sums + labels[b] * U;
      for (int64_t u = u0; u < u1; ++u) {
        const scalar_t* xp = x + b * v.sB + u * v.sU;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t p = 0; p < P; ++p) s += static_cast<double>(static_cast<float>(xp[p]));
        row[u] += s / dP;
      }
    }
  });
}

void accumulate_cpu(const at::Tensor& act, const at::Tensor& labels, const at::Tensor& sums,
                    const at::Tensor& counts) {
  const ActView v = check_accumulate_args(act, labels, sums, counts);
  const at::Tensor lab = labels.contiguous();
  const int64_t* l = lab.const_data_ptr<int64_t>();
  const int64_t K = sums.size(0);
  // Check every label before touching the state, so a bad batch leaves sums/counts unchanged.
  for (int64_t b = 0; b < v.B; ++b) {
    if (l[b] < 0 || l[b] >= K) throw_label_error(l[b], K, "");
  }
  double* s = sums.mutable_data_ptr<double>();
  SELECTIVITY_DISPATCH_ACT_TYPES(v.act.scalar_type(), "selectivity_accumulate", [&] {
    if (v.units_inner) {
      accumulate_units_inner<scalar_t>(v, l, s);
    } else {
      accumulate_planes<scalar_t>(v, l, s);
    }
  });
  int64_t* c = counts.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < v.B; ++b) c[l[b]] += 1;
}

// Units are tiled so the running max/argmax/total of a tile stay in L1 while the present
// classes stream past; the tile loop is vectorized over units (sums rows are contiguous in u).
constexpr int64_t kIndexTile = 256;

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
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, n_present * kIndexTile));

  at::parallel_for(0, ntiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t u0 = t * kIndexTile, n = std::min(U, u0 + kIndexTile) - u0;
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
        continue;
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
      for (int64_t j = 1; j < n_present; ++j) {
        const int64_t c = present[j];
        const double cnt = static_cast<double>(C[c]);
        const double* row = S + c * U + u0;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const double m = row[i] / cnt;
          total[i] += m;
          const bool better = m > best[i];  // strict: ties keep the lower class index
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
  });
  return {si, pref, mu_max, mu_rest};
}

}  // namespace

TORCH_LIBRARY_IMPL(selectivity, CPU, m) {
  m.impl("accumulate", &accumulate_cpu);
  m.impl("selectivity_index", &selectivity_index_cpu);
}

}  // namespace selectivity
