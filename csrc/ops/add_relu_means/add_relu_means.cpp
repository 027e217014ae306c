// Schemas of the fused epilogue ops and the argument handling both backends share (cpu/, cuda/).
#include "add_relu_means.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

namespace selectivity {
namespace {

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

bool epilogue_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// The layout the kernels run in, decided by `like` (out, or y in the backward); the other tensors
// are brought to it. A [B, U, 1, 1] map counts as units_inner whatever its strides say.
EpilogueShape shape_and_layout(const at::Tensor& like, c10::MemoryFormat* format) {
  const int64_t B = like.size(0), U = like.size(1);
  const int64_t P = like.dim() == 4 ? like.size(2) * like.size(3) : 1;
  if (like.dim() == 2 || P == 1) {
    *format = at::MemoryFormat::Contiguous;
    return {B, U, P, true};
  }
  const bool cl = !like.is_contiguous() && like.is_contiguous(at::MemoryFormat::ChannelsLast);
  *format = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return {B, U, P, cl};
}

}  // namespace

EpilogueForward prepare_add_relu_means(const at::Tensor& out, const at::Tensor& identity, bool inplace) {
  TORCH_CHECK_TYPE(epilogue_dtype(out.scalar_type()),
                   "add_relu_means: out must be float32, float16, bfloat16 or float64, got ",
                   c10::toString(out.scalar_type()));
  TORCH_CHECK_TYPE(identity.scalar_type() == out.scalar_type(), "add_relu_means: identity must have out's dtype (",
                   c10::toString(out.scalar_type()), "), got ", c10::toString(identity.scalar_type()),
                   "; use selectivity.epilogue.add_relu_means, which falls back to torch for mixed dtypes");
  TORCH_CHECK_VALUE(out.dim() == 4 || out.dim() == 2, "add_relu_means: out must be [B, U, H, W] or [B, U], got ",
                    shape_of(out));
  TORCH_CHECK_VALUE(identity.sizes() == out.sizes(), "add_relu_means: identity must have out's shape ",
                    shape_of(out), ", got ", shape_of(identity));
  TORCH_CHECK_VALUE(identity.device() == out.device(), "add_relu_means: out and identity must be on one device, got ",
                    out.device(), " and ", identity.device());
  c10::MemoryFormat format;
  EpilogueForward f;
  f.shape = shape_and_layout(out, &format);
  if (inplace) {  // refused before anything is written (selectivity.epilogue.add_relu_means_ then falls back)
    TORCH_CHECK_VALUE(out.is_contiguous(format), "add_relu_means_: out must be dense (NCHW, channels_last "
                      "or [B, U]) to be written in place; use add_relu_means");
    TORCH_CHECK_VALUE(!out.is_view(), "add_relu_means_: out is a view, which is not written in place; use "
                      "add_relu_means");
    TORCH_CHECK_VALUE(!out.storage().is_alias_of(identity.storage()), "add_relu_means_: identity shares out's "
                      "memory, so out cannot be written in place; use add_relu_means");
  }
  f.out = out.contiguous(format);
  f.identity = identity.contiguous(format);
  f.y = inplace ? out : at::empty_like(f.out, f.out.options(), format);
  f.means = at::empty({f.shape.B, f.shape.U}, out.options().dtype(c10::promoteTypes(out.scalar_type(), at::kFloat)));
  return f;
}

EpilogueBackward prepare_add_relu_means_backward(const c10::optional<at::Tensor>& grad_y,
                                                 const c10::optional<at::Tensor>& grad_means,
                                                 const at::Tensor& y, bool into_grad_y) {
  TORCH_CHECK_TYPE(epilogue_dtype(y.scalar_type()),
                   "add_relu_means_backward: y must be float32, float16, bfloat16 or float64, got ",
                   c10::toString(y.scalar_type()));
  TORCH_CHECK_VALUE(y.dim() == 4 || y.dim() == 2, "add_relu_means_backward: y must be [B, U, H, W] or [B, U], got ",
                    shape_of(y));
  c10::MemoryFormat format;
  EpilogueBackward b;
  b.shape = shape_and_layout(y, &format);
  b.y = y.contiguous(format);
  const bool writable = grad_y.has_value() && grad_y->defined() && grad_y->scalar_type() == y.scalar_type() &&
                        grad_y->is_contiguous(format) && grad_y->device() == y.device();
  TORCH_CHECK_VALUE(!into_grad_y || writable, "add_relu_means_backward_: grad_y must be given, with y's dtype and "
                    "dense in y's layout, to be written in place; use add_relu_means_backward");
  if (grad_y.has_value() && grad_y->defined()) {
    TORCH_CHECK_VALUE(grad_y->sizes() == y.sizes(), "add_relu_means_backward: grad_y must have y's shape ",
                      shape_of(y), ", got ", shape_of(*grad_y));
    b.grad_y = grad_y->to(y.scalar_type()).contiguous(format);
  }
  if (grad_means.has_value() && grad_means->defined()) {
    TORCH_CHECK_VALUE(grad_means->dim() == 2 && grad_means->size(0) == b.shape.B && grad_means->size(1) == b.shape.U,
                      "add_relu_means_backward: grad_means must be [B, U] = [", std::to_string(b.shape.B), ", ",
                      std::to_string(b.shape.U), "], got ", shape_of(*grad_means));
    b.grad_means = grad_means->to(c10::promoteTypes(y.scalar_type(), at::kFloat)).contiguous();
  }
  b.grad = into_grad_y ? *grad_y : at::empty_like(b.y, b.y.options(), format);
  return b;
}

TORCH_LIBRARY_FRAGMENT(selectivity, m) {
  // Fake (meta) implementations live in selectivity.epilogue; the autograd in autograd.cpp.
  m.set_python_module("selectivity.epilogue");
  m.def("add_relu_means(Tensor out, Tensor identity) -> (Tensor y, Tensor means)");
  m.def("add_relu_means_backward(Tensor? grad_y, Tensor? grad_means, Tensor y) -> Tensor");
  // The same, written into grad_y (nothing returned: functionalization refuses an aliased output).
  m.def("add_relu_means_backward_(Tensor(a!) grad_y, Tensor? grad_means, Tensor y) -> ()");
  // The same, y written into out; returns the means.
  m.def("add_relu_means_(Tensor(a!) out, Tensor identity) -> Tensor means");
}

}  // namespace selectivity
