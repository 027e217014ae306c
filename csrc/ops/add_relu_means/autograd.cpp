// Autograd of the fused epilogue, registered for the Autograd dispatch key: a call of
// torch.ops.selectivity.add_relu_means or add_relu_means_ with inputs that require grad builds its
// graph node here, and the backward runs add_relu_means_backward from C++, so no Python runs on the
// path of either (a Python autograd.Function's apply, ctx and backward cost more per block than the
// kernel itself at the small block shapes; docs/extension.md has the figures).
//
// The formula is the header's: grad = y <= 0 ? 0 : grad_y + grad_means / P, one tensor for out and
// identity (as stock `out + identity` passes its gradient through to both). Gradients that did not
// come (the means unused by the loss, as the tracker reads them) arrive undefined, not as zeros
// (set_materialize_grads(false)): the backward is then the plain ReLU backward, one pass that reads y
// and grad_y and writes grad, like stock threshold_backward.
//
// torch.compile: AOTAutograd traces through these kernels; the forward and backward ops reach the
// graph as the ops themselves (their fake implementations are in selectivity/epilogue.py).
#include <ATen/CachedTensorUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <typeinfo>

namespace selectivity {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The ops below the Autograd key, looked up once (the dispatcher then picks CPU, CUDA or a tracer).
const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("selectivity::add_relu_means", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>();
  return op;
}

const auto& forward_inplace_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("selectivity::add_relu_means_", "")
                             .typed<at::Tensor(at::Tensor&, const at::Tensor&)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("selectivity::add_relu_means_backward", "")
          .typed<at::Tensor(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&)>();
  return op;
}

const auto& backward_inplace_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("selectivity::add_relu_means_backward_", "")
          .typed<void(at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&)>();
  return op;
}

// Whether the incoming gradient can take the result in place: the engine handed it over and nothing
// else refers to it (no other tensor, Python object or view: use_count 1 and an unshared storage;
// in a training step it is the next layer's fresh gradient), as torch's AccumulateGrad steals such a
// gradient (its is_tensor_stealable, which also allows a Python owner: not here, as this writes
// into it). A plain dense tensor only (not a fake, functional or batched one while tracing), with
// y's dtype and strides. The backward then allocates nothing, where threshold_backward allocates.
bool can_write_into(const at::Tensor& grad, const at::Tensor& y) {
  if (!grad.defined() || at::GradMode::is_enabled() || grad.use_count() != 1) return false;
  const c10::TensorImpl* impl = grad.unsafeGetTensorImpl();
  if (typeid(*impl) != typeid(c10::TensorImpl) || impl->is_python_dispatch() || grad.is_view() ||
      grad.layout() != at::kStrided || !grad.has_storage() || grad.storage().use_count() != 1 ||
      at::caching::is_cached_tensor(grad))
    return false;
  return grad.scalar_type() == y.scalar_type() && grad.device() == y.device() && grad.sizes() == y.sizes() &&
         grad.strides() == y.strides();
}

std::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The gradient of out and of identity (the same tensor), undefined where none is needed. grads: the
// node's own list of incoming gradients (by reference: CppNode passes its list, so an unshared
// gradient's use_count is 1 here).
variable_list backward_both(AutogradContext* ctx, variable_list& grads) {
  at::Tensor& grad_y = grads[0];
  const at::Tensor& grad_means = grads[1];
  const bool need_out = ctx->needs_input_grad(0), need_identity = ctx->needs_input_grad(1);
  if ((!grad_y.defined() && !grad_means.defined()) || !(need_out || need_identity)) return {at::Tensor(), at::Tensor()};
  const at::Tensor y = ctx->get_saved_variables()[0];
  at::Tensor grad;
  if (can_write_into(grad_y, y)) {
    backward_inplace_op().call(grad_y, present(grad_means), y);
    grad = grad_y;
  } else {
    grad = backward_op().call(present(grad_y), present(grad_means), y);
  }
  return {need_out ? grad : at::Tensor(), need_identity ? grad : at::Tensor()};
}

class AddReluMeans : public torch::autograd::Function<AddReluMeans> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& out, const at::Tensor& identity) {
    at::AutoDispatchBelowADInplaceOrView below;  // the kernel itself, not this function again
    auto [y, means] = forward_op().call(out, identity);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({y});
    return {y, means};
  }

  static variable_list backward(AutogradContext* ctx, variable_list& grads) { return backward_both(ctx, grads); }
};

// add_relu_means_: y written into out, which is marked dirty (its version is bumped and its history
// now ends at this node, as for any in-place op); the backward is the functional op's.
class AddReluMeansInplace : public torch::autograd::Function<AddReluMeansInplace> {
 public:
  static variable_list forward(AutogradContext* ctx, at::Tensor& out, const at::Tensor& identity) {
    at::Tensor means;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      means = forward_inplace_op().call(out, identity);
    }
    ctx->mark_dirty({out});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({out});
    return {out, means};
  }

  static variable_list backward(AutogradContext* ctx, variable_list& grads) { return backward_both(ctx, grads); }
};

bool needs_graph(const at::Tensor& out, const at::Tensor& identity) {
  return at::GradMode::is_enabled() && (out.requires_grad() || identity.requires_grad());
}

std::tuple<at::Tensor, at::Tensor> add_relu_means_autograd(const at::Tensor& out, const at::Tensor& identity) {
  if (!needs_graph(out, identity)) {  // no node to build: straight to the kernel
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_op().call(out, identity);
  }
  variable_list r = AddReluMeans::apply(out, identity);
  return {r[0], r[1]};
}

at::Tensor add_relu_means_inplace_autograd(at::Tensor& out, const at::Tensor& identity) {
  // What torch refuses for any in-place op, checked before the kernel writes out.
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && out.requires_grad() && out.is_leaf()),
                    "add_relu_means_: out is a leaf that requires grad, which cannot be written in place; "
                    "use add_relu_means");
  if (!needs_graph(out, identity)) {
    at::Tensor means;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      means = forward_inplace_op().call(out, identity);
    }
    torch::autograd::impl::bump_version(out);  // what an in-place op does without a graph too
    return means;
  }
  return AddReluMeansInplace::apply(out, identity)[1];
}

}  // namespace

TORCH_LIBRARY_IMPL(selectivity, Autograd, m) {
  m.impl("add_relu_means", &add_relu_means_autograd);
  m.impl("add_relu_means_", &add_relu_means_inplace_autograd);
}

}  // namespace selectivity
