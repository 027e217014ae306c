"""The fused residual-block epilogue: ``y = relu(out + identity)`` and the per-image unit means of y.

``add_relu_means(out, identity) -> (y, means)`` is what a residual block does last (the add of the
shortcut and the final ReLU) plus the block's unit activations, ``means[b, u]`` = the spatial mean of
``y[b, u]`` (``units.unit_means`` of y), taken in the same pass over the block output (the compiled op
``selectivity::add_relu_means``, csrc/ops/add_relu_means/). ``units.UnitHooks(means_fn=...)`` runs
the blocks it recognises through it, so a tracked or regularized step reads each block output no
more often than an untracked one.

Contract (tests/test_epilogue.py):

* ``y`` is bit-identical to stock ``torch.relu(out + identity)``: same dtype, same memory format
  (NCHW or channels_last; also ``[B, U]``), the add computed in float32 and rounded once to the
  dtype, then the ReLU of the rounded value (``-0`` and NaN pass through as in ``clamp_min``);
* ``means`` is ``[B, U]`` float32 (float64 for float64 inputs), the mean of y **as rounded**, summed
  in float32 runs of at most 8 values and float64 above;
* autograd for both outputs: ``grad = (grad_y + grad_means[b, u] / (H*W)) * (y > 0)`` (exactly
  ``threshold_backward(grad, y, 0)`` plus the means' share), the same tensor for ``out`` and
  ``identity``; a missing ``grad_means`` (means not used by the loss) costs nothing extra. It is
  registered in C++ for the Autograd dispatch key (csrc/ops/add_relu_means/autograd.cpp), for both
  ``add_relu_means`` and ``add_relu_means_``: calling ``torch.ops.selectivity.*`` is differentiable
  and no Python runs in the forward's graph building or in the backward. A backward whose
  incoming gradient nothing else holds (the next layer's fresh gradient, in a training step)
  writes its result into that tensor (``add_relu_means_backward_``) instead of a new one;
* ``add_relu_means_(out, identity)``: the same, y written into ``out`` where it can be (what the
  fused block forwards use; stock torchvision blocks also overwrite ``out``);
* fake implementations for ``torch.compile`` (here; AOTAutograd traces the C++ autograd kernel, so
  the forward and backward ops reach the graph): the op is one opaque node to inductor, so inductor
  cannot fuse the add + ReLU into the BatchNorm before it (it can in an untracked compiled model).

Inputs of different dtypes, devices without the kernel, or an unbuilt extension take the reference
(``add_relu_means_reference``, torch ops, the same numbers), with one warning per process when the
extension is missing (``ops._use_extension``); ``SELECTIVITY_FORCE_REFERENCE=1`` forces it.
"""
from __future__ import annotations

import torch

from selectivity.ops import _use_extension, has_extension
from selectivity.units.layouts import unit_means

OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HAS_OP = has_extension() and hasattr(torch.ops.selectivity, "add_relu_means")


def add_relu_means_reference(out: torch.Tensor, identity: torch.Tensor):
    """``(torch.relu(out + identity), unit_means of it)``: the stock computation, differentiable."""
    y = torch.relu(out + identity)
    return y, unit_means(y)


def _has_kernel(key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("selectivity::add_relu_means", key)


# Fixed once selectivity._C is loaded (it registers every kernel as it loads). The checks below run
# in every fused block's forward, so each is the cheapest test of its condition: per call they cost
# about as much as the op's own dispatch (docs/extension.md).
_HAS_CUDA_KERNEL = _HAS_OP and _has_kernel("CUDA")


def _fusable(out: torch.Tensor, identity: torch.Tensor) -> bool:
    dtype = out.dtype
    return (_HAS_OP and dtype in OP_DTYPES and identity.dtype == dtype and out.dim() in (2, 4)
            and identity.shape == out.shape and identity.device == out.device
            and (out.is_cpu or (out.is_cuda and _HAS_CUDA_KERNEL)))


def add_relu_means(out: torch.Tensor, identity: torch.Tensor):
    """``(y, means)``: ``y = relu(out + identity)``, ``means`` [B, U] its per-image unit means."""
    if _fusable(out, identity) and _use_extension():
        y, means = torch.ops.selectivity.add_relu_means(out, identity)
        return y, means
    return add_relu_means_reference(out, identity)


def add_relu_means_(out: torch.Tensor, identity: torch.Tensor):
    """``add_relu_means`` that may write y into ``out`` (returned as y), as torchvision's blocks do
    with ``out += identity; relu_(out)``; for a block's forward, where ``out`` (the last BN's
    output) is dead after the epilogue. Writing into a buffer that was just written is faster on
    the CPU than filling a new one (docs/extension.md). Where writing in place is not possible it
    is ``add_relu_means``: the op itself refuses, before writing anything, what it cannot take in
    place (not a dense layout, a view, a leaf requiring grad, ``identity`` sharing ``out``'s memory,
    mixed dtypes, a device without its kernel), and under ``torch.compile`` the functional op is
    used. Asking the op, rather than checking each condition here first, keeps this Python off a
    fused block's hot path (it runs once per block per step); a block's BN output is always
    accepted, so the refusal's exception is the rare case."""
    if _HAS_OP and not torch.compiler.is_compiling() and _use_extension():
        try:
            return out, _ADD_RELU_MEANS_INPLACE(out, identity)
        except (ValueError, TypeError, NotImplementedError):
            pass
    return add_relu_means(out, identity)


# ----- the ops' fake implementations (their autograd: csrc/ops/add_relu_means/autograd.cpp) -----


def _layout(t: torch.Tensor) -> torch.memory_format:
    # As the kernels decide (csrc/ops/add_relu_means/add_relu_means.cpp, shape_and_layout).
    if t.dim() == 4 and t.shape[2] * t.shape[3] > 1 and not t.is_contiguous() \
            and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


if _HAS_OP:
    _ADD_RELU_MEANS_INPLACE = torch.ops.selectivity.add_relu_means_.default

    @torch.library.register_fake("selectivity::add_relu_means_")
    def _add_relu_means_inplace_fake(out, identity):
        return out.new_empty((out.shape[0], out.shape[1]),
                             dtype=torch.promote_types(out.dtype, torch.float32))

    @torch.library.register_fake("selectivity::add_relu_means")
    def _add_relu_means_fake(out, identity):
        torch._check(identity.shape == out.shape and identity.dtype == out.dtype,
                     lambda: "add_relu_means: identity must have out's shape and dtype")
        y = torch.empty_like(out, memory_format=_layout(out))
        means = out.new_empty((out.shape[0], out.shape[1]),
                              dtype=torch.promote_types(out.dtype, torch.float32))
        return y, means

    @torch.library.register_fake("selectivity::add_relu_means_backward")
    def _add_relu_means_backward_fake(grad_y, grad_means, y):
        return torch.empty_like(y, memory_format=_layout(y))

    @torch.library.register_fake("selectivity::add_relu_means_backward_")
    def _add_relu_means_backward_inplace_fake(grad_y, grad_means, y):
        return None
