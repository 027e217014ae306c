// The fused residual-block epilogue: y = relu(out + identity) and the per-image channel means of y,
// in one pass (selectivity/epilogue.py has the Python face and the reference; docs/extension.md the
// contract and the measurements).
//
//   forward:  y[b,u,p] = relu(round(out + identity))        (the add computed in float32 and rounded
//                                                            once to the dtype, then relu of that value,
//                                                            exactly as stock `relu(out + identity)`)
//             means[b,u] = (1/P) * sum_p y[b,u,p]           (y as rounded; float32, float64 for float64)
//   add_relu_means_ (in place): the same, y written into out (what torchvision's `out += identity;
//             relu_(out)` does): no new buffer whose first write has to fetch its cache lines.
//   backward: grad[b,u,p] = y <= 0 ? 0 : grad_y[b,u,p] + grad_means[b,u] / P
//             (either grad may be absent; the same tensor is the gradient of out and of identity)
//   add_relu_means_backward_: the same, written into grad_y (which must be present): what the
//             autograd runs when the incoming gradient is not shared (autograd.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace selectivity {

// Both layouts are one loop nest over [B, U, P] (P = H*W, 1 for a [B, U] input):
// units_inner: per image, P rows of U contiguous units (channels_last, or [B, U]);
// otherwise:   per (image, unit), a plane of P contiguous pixels (NCHW).
struct EpilogueShape {
  int64_t B, U, P;
  bool units_inner;
};

struct EpilogueForward {
  at::Tensor out, identity;  // dense in the one layout below (copies only when the inputs were not)
  at::Tensor y, means;       // allocated outputs: y like out, means [B, U]
  EpilogueShape shape;
};

struct EpilogueBackward {
  at::Tensor grad_y;      // undefined when absent; else dense in y's layout
  at::Tensor grad_means;  // undefined when absent; else contiguous [B, U], y's accumulation dtype
  at::Tensor y, grad;     // grad: allocated like y
  EpilogueShape shape;
};

// Argument checks (one-line ValueError/TypeError) and the layout both backends run in.
// inplace: y is out itself (add_relu_means_), which must then be dense in its layout.
EpilogueForward prepare_add_relu_means(const at::Tensor& out, const at::Tensor& identity, bool inplace = false);
// into_grad_y: grad is grad_y itself (add_relu_means_backward_), which must then be y's dtype and
// dense in y's layout.
EpilogueBackward prepare_add_relu_means_backward(const c10::optional<at::Tensor>& grad_y,
                                                 const c10::optional<at::Tensor>& grad_means,
                                                 const at::Tensor& y, bool into_grad_y = false);

}  // namespace selectivity
