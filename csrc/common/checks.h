// Shared declarations of the selectivity ops: argument checks (checks.cpp) and the strided view of an
// activation that both backends of accumulate read (ops/accumulate/{cpu,cuda}).
//
// Definitions (docs/extension.md has the long form):
//   accumulate:        sums[labels[b], u] += mean over pixels p of act[b, u, p];  counts[labels[b]] += 1
//   selectivity_index: per unit, over classes with counts > 0: mu_max = max class mean (lowest class
//                      on ties), mu_rest = mean of the other classes' means,
//                      SI = (mu_max - mu_rest) / (mu_max + mu_rest + eps)
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <tuple>

// The activation dtypes both backends accept (checked by check_accumulate_args).
#define SELECTIVITY_DISPATCH_ACT_TYPES(TYPE, NAME, ...)    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                          \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace selectivity {

// An activation seen as [B, U, P] (P = H*W pixels, 1 for a [B, U] input) with element strides.
// Kernels read act.data_ptr() with these strides, so NCHW and channels_last are read in place.
struct ActView {
  at::Tensor act;  // the input itself, or a contiguous copy when no stride pattern below fits
  int64_t B, U, P;
  int64_t sB, sU, sP;
  // true:  the U values of one pixel are adjacent (channels_last, contiguous [B, U]);
  // false: the P pixels of one (image, unit) plane are adjacent (NCHW, or any plane layout).
  bool units_inner;
};

// Checks dtypes, shapes and devices (not the label values: that is per backend) and builds the
// view. Errors are ValueError/TypeError in Python with one line naming the problem.
ActView check_accumulate_args(const at::Tensor& act, const at::Tensor& labels,
                              const at::Tensor& sums, const at::Tensor& counts);

void check_index_args(const at::Tensor& sums, const at::Tensor& counts);

// Allocates the four selectivity_index outputs (si, pref_class, mu_max, mu_rest), shape [U].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_index_outputs(const at::Tensor& sums);

// The message for a label outside [0, K); `where` says which backend found it and when.
[[noreturn]] void throw_label_error(int64_t label, int64_t K, const char* where);

}  // namespace selectivity
