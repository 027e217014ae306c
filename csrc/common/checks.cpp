// Argument checks shared by the CPU and CUDA kernels. The wording matches the Python reference
// in selectivity/ops.py (tests/test_ops.py asserts both give the same message fragments).
#include "checks.h"

#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>

namespace selectivity {
namespace {

// "torch.float64", as Python prints a dtype, so both backends name dtypes the same way.
std::string dtype_name(c10::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

// Integers in messages are formatted with std::to_string, never through an ostream: on the GPU
// machine the extension is compiled by a newer g++ than torch was, and an int64 written through
// c10::str's ostringstream from this library crashed the process (docs/gpu.md, first run).
std::string num(int64_t v) { return std::to_string(v); }

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + num(t.size(d));
  return s + "]";
}

}  // namespace

void check_index_args(const at::Tensor& sums, const at::Tensor& counts) {
  TORCH_CHECK_TYPE(sums.scalar_type() == at::kDouble, "sums must be float64, got ",
                   dtype_name(sums.scalar_type()), "; make the state with selectivity.ops.new_state()");
  TORCH_CHECK_TYPE(counts.scalar_type() == at::kLong, "counts must be int64, got ",
                   dtype_name(counts.scalar_type()), "; make the state with selectivity.ops.new_state()");
  TORCH_CHECK_VALUE(sums.dim() == 2, "sums must be 2-D [K, U], got shape ", shape_of(sums));
  TORCH_CHECK_VALUE(counts.dim() == 1 && counts.size(0) == sums.size(0), "counts must be [K] with K = ",
                    num(sums.size(0)), " (sums.size(0)), got shape ", shape_of(counts));
  TORCH_CHECK_VALUE(sums.device() == counts.device(), "sums and counts must be on one device, got sums on ",
                    sums.device(), " and counts on ", counts.device());
  // The kernels index the state as a dense row-major array (and write it in place).
  TORCH_CHECK_VALUE(sums.is_contiguous() && counts.is_contiguous(),
                    "sums and counts must be contiguous; make the state with selectivity.ops.new_state()");
}

ActView check_accumulate_args(const at::Tensor& act, const at::Tensor& labels, const at::Tensor& sums,
                              const at::Tensor& counts) {
  const auto t = act.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
                   "act must be float32, float16 or bfloat16, got ", dtype_name(t), "; cast it with act.float()");
  TORCH_CHECK_VALUE(act.dim() == 4 || act.dim() == 2, "act must be [B, U, H, W] or [B, U], got shape ",
                    shape_of(act));
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ",
                   dtype_name(labels.scalar_type()), "; use labels.long()");
  check_index_args(sums, counts);
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == act.size(0), "labels must be 1-D with B = ",
                    num(act.size(0)), " entries (act.size(0)), got shape ", shape_of(labels));
  TORCH_CHECK_VALUE(sums.size(1) == act.size(1), "sums must be [K, U] with U = ", num(act.size(1)),
                    " (act.size(1)), got shape ", shape_of(sums));
  TORCH_CHECK_VALUE(act.device() == labels.device() && act.device() == sums.device(),
                    "act, labels, sums and counts must be on one device, got act on ", act.device(),
                    ", labels on ", labels.device(), ", sums and counts on ", sums.device());

  ActView v;
  v.act = act;
  v.B = act.size(0);
  v.U = act.size(1);
  v.sB = act.stride(0);
  v.sU = act.stride(1);
  v.P = 1;
  v.sP = 1;
  bool folds = true;  // can H and W be read as one strided pixel axis?
  if (act.dim() == 4) {
    const int64_t H = act.size(2), W = act.size(3);
    TORCH_CHECK_VALUE(H * W > 0, "act has no pixels (shape ", shape_of(act),
                      "); a spatial mean needs H*W >= 1");
    v.P = H * W;
    if (W == 1) {
      v.sP = act.stride(2);
    } else if (H == 1 || act.stride(2) == W * act.stride(3)) {
      v.sP = act.stride(3);  // NCHW and channels_last both fold
    } else {
      folds = false;
    }
  }
  // Strides of size-1 dims are arbitrary in torch; normalize so they do not block a fast path.
  if (v.U == 1) v.sU = 1;
  if (v.P == 1) v.sP = 1;

  if (folds && v.sP == 1 && (v.P > 1 || v.sU != 1)) {
    v.units_inner = false;  // NCHW: each (image, unit) plane is contiguous
  } else if (folds && v.sU == 1) {
    v.units_inner = true;  // channels_last or [B, U]: each pixel's units are contiguous
  } else {
    // Neither the pixels nor the units are adjacent (e.g. H and W transposed): read an NCHW copy.
    v.act = act.contiguous();
    v.sB = v.act.stride(0);
    v.sU = v.act.stride(1);
    v.sP = 1;
    v.units_inner = false;
  }
  return v;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_index_outputs(const at::Tensor& sums) {
  const int64_t U = sums.size(1);
  auto f64 = sums.options();
  return {at::empty({U}, f64), at::empty({U}, f64.dtype(at::kLong)), at::empty({U}, f64), at::empty({U}, f64)};
}

void throw_label_error(int64_t label, int64_t K, const char* where) {
  TORCH_CHECK_VALUE(false, "labels out of range: label ", num(label), " is not in [0, K) with K = ", num(K),
                    " (K = sums.size(0), the number of classes)", where);
}

}  // namespace selectivity
