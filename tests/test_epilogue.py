"""The fused residual epilogue (selectivity/epilogue.py, csrc/ops/add_relu_means/): the same numbers
as stock add + ReLU, its autograd, its in-place variants and its refusals. The blocks that run it
(UnitHooks' means mode): tests/test_fused_blocks.py."""
import pytest
import torch

from selectivity import epilogue
from selectivity.units import unit_means

needs_op = pytest.mark.skipif(not epilogue._HAS_OP, reason="selectivity._C is not built with add_relu_means")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
LAYOUTS = ("nchw", "channels_last", "2d")


def pair(dtype, layout, B=3, U=37, H=16, W=16, seed=0, device="cpu"):
    """(out, identity) with exact zeros, -0 sums and ties: what a block epilogue meets."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, U) if layout == "2d" else (B, U, H, W)
    out, identity = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    out.view(-1)[::11] = -0.0
    identity.view(-1)[::11] = -0.0  # -0 + -0 = -0, which stock relu keeps
    identity.view(-1)[5::13] = -out.view(-1)[5::13]  # exact zero sums
    out.view(-1)[7::17] = -1e-30  # float32 underflow region: rounds to -0 in fp16/bf16
    out, identity = out.to(device=device, dtype=dtype), identity.to(device=device, dtype=dtype)
    if layout == "channels_last":
        out, identity = (t.contiguous(memory_format=torch.channels_last) for t in (out, identity))
    return out, identity


def bits(t):
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def check_forward(out, identity):
    y, means = torch.ops.selectivity.add_relu_means(out, identity)
    stock = torch.relu(out + identity)
    assert y.dtype == stock.dtype and y.stride() == stock.stride()
    assert torch.equal(bits(y), bits(stock))
    ref = unit_means(stock)
    assert means.dtype == ref.dtype
    torch.testing.assert_close(means, ref, rtol=1e-6, atol=1e-7 * ref.abs().max().item())


@needs_op
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_forward_is_stock_bit_for_bit_and_means_are_unit_means(dtype, layout):
    check_forward(*pair(dtype, layout))


@needs_op
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (4, 4), (3, 5), (8, 8)])
def test_forward_small_planes(hw, layout):
    """The NCHW kernel has its own paths for planes of 2, 4, 8 and 16 pixels."""
    for dtype in (torch.float32, torch.bfloat16):
        check_forward(*pair(dtype, layout, B=2, U=9, H=hw[0], W=hw[1]))


@needs_op
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_without_means_grad_is_stock_relu_backward(dtype, layout):
    out, identity = pair(dtype, layout)
    grad = torch.randn(out.shape).to(dtype).contiguous(memory_format=torch.channels_last
                                                       if layout == "channels_last" else torch.contiguous_format)
    a, b = (t.clone().requires_grad_() for t in (out, identity))
    y, _ = epilogue.add_relu_means(a, b)
    y.backward(grad)
    c, d = (t.clone().requires_grad_() for t in (out, identity))
    torch.relu(c + d).backward(grad)
    assert torch.equal(bits(a.grad), bits(c.grad)) and torch.equal(bits(b.grad), bits(d.grad))


@needs_op
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("hw", [(1, 1), (1, 2), (2, 2), (2, 4), (4, 4), (3, 5), (8, 8)])
def test_backward_with_means_grad_is_the_formula_bit_for_bit(hw, layout):
    """grad = y <= 0 ? +0 : round(grad_y + grad_means * (1/P)) (in float32), bit for bit where 1/P is
    exact, for the small-plane NCHW paths (2, 4, 8 and 16 pixels) and the general ones, with and
    without grad_y."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out, identity = pair(dtype, layout, B=2, U=9, H=hw[0], W=hw[1])
        y = torch.relu(out + identity)
        g = torch.Generator().manual_seed(3)
        gy = torch.randn(y.shape, generator=g).to(dtype).contiguous(memory_format=_fmt(layout))
        gm = torch.randn(2, 9, generator=g)
        share = (gm * (1.0 / (hw[0] * hw[1])))[:, :, None, None]
        for grad_y in (gy, None):
            want = share.expand(y.shape) if grad_y is None else grad_y.float() + share
            want = torch.where(y.float() <= 0, 0.0, want).to(dtype)
            got = torch.ops.selectivity.add_relu_means_backward(grad_y, gm, y)
            P = hw[0] * hw[1]
            if P & (P - 1) == 0 or dtype != torch.float32:
                assert torch.equal(bits(got), bits(want))
            else:  # grad_means * (1/P) is inexact: the compiler may fuse it with the add (one rounding)
                torch.testing.assert_close(got, want, rtol=0, atol=2**-22 * (gy.abs().max() + share.abs().max()).item())


def _fmt(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


@needs_op
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_both_outputs_float64(layout):
    out, identity = pair(torch.float64, layout, B=2, U=3, H=3, W=4)
    out, identity = out.requires_grad_(), identity.requires_grad_()
    # Away from the kink, the op's gradient is the true one, through y and through the means ...
    assert torch.autograd.gradcheck(torch.ops.selectivity.add_relu_means, (out + 0.01, identity))
    # ... and equal to autograd of the reference for any mix of the two output gradients.
    g = torch.Generator().manual_seed(1)
    for use_y, use_m in ((True, True), (False, True), (True, False)):
        got = torch.autograd.grad(_loss(torch.ops.selectivity.add_relu_means(out, identity), g, use_y, use_m),
                                  (out, identity))
        g.manual_seed(1)
        want = torch.autograd.grad(_loss(epilogue.add_relu_means_reference(out, identity), g, use_y, use_m),
                                   (out, identity))
        g.manual_seed(1)
        for x, w in zip(got, want):
            torch.testing.assert_close(x, w, rtol=1e-12, atol=1e-15)


@needs_op
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_ops_themselves_are_differentiable_in_cpp(layout):
    """The autograd is the C++ kernel for the Autograd key: torch.ops.selectivity.add_relu_means and
    add_relu_means_ called directly build a C++ node (no Python autograd.Function) whose gradients
    are autograd of the reference; the in-place op bumps out's version like any in-place op."""
    out, identity = pair(torch.float64, layout, B=2, U=3, H=3, W=4)
    out, identity = (out + 0.01).requires_grad_(), identity.requires_grad_()

    def inplace(o, i):
        o = o * 1  # a non-leaf, as a block's BN output
        means = torch.ops.selectivity.add_relu_means_(o, i)
        return o, means
    assert torch.autograd.gradcheck(inplace, (out, identity))
    for f in (torch.ops.selectivity.add_relu_means, inplace):
        y, means = f(out, identity)
        assert "CppNode" in y.grad_fn.name() and means.grad_fn is y.grad_fn
        g = torch.Generator().manual_seed(2)
        got = torch.autograd.grad(_loss((y, means), g, True, True), (out, identity))
        g.manual_seed(2)
        want = torch.autograd.grad(_loss(epilogue.add_relu_means_reference(out, identity), g, True, True),
                                   (out, identity))
        for x, w in zip(got, want):
            torch.testing.assert_close(x, w, rtol=1e-12, atol=1e-15)
    o = out.detach().clone()
    v = o._version
    with torch.no_grad():
        torch.ops.selectivity.add_relu_means_(o, identity)
    assert o._version > v and o.grad_fn is None
    before = out.detach().clone()
    with pytest.raises(ValueError, match="out is a leaf that requires grad, which cannot be written in place"):
        torch.ops.selectivity.add_relu_means_(out, identity)
    assert torch.equal(out.detach(), before)  # refused before the kernel wrote anything


@needs_op
def test_inplace_op_refuses_what_it_cannot_write_and_the_wrapper_falls_back():
    """What add_relu_means_ cannot take in place raises one line before anything is written, and
    epilogue.add_relu_means_ then gives the functional op's result with out untouched."""
    out, identity = pair(torch.float32, "nchw", B=2, U=4, H=3, W=3)
    base = torch.cat([out, out])
    leaf = out.clone().requires_grad_()
    cases = {"a view": (base[:2], identity, "out is a view"),
             "an alias": (out.clone(), None, "identity shares out's memory"),
             "not dense": (torch.empty_strided(out.shape, (72, 18, 6, 2)).copy_(out), identity, "out must be dense"),
             "a leaf": (leaf, identity, "out is a leaf that requires grad"),
             "mixed dtypes": (out.clone(), identity.double(), "identity must have out's dtype")}
    for name, (o, i, message) in cases.items():
        i = o if i is None else i
        before = o.detach().clone()
        with pytest.raises((ValueError, TypeError), match=message):
            torch.ops.selectivity.add_relu_means_(o, i)
        assert torch.equal(o.detach(), before), name
        got_y, got_means = epilogue.add_relu_means_(o, i)
        assert got_y is not o and torch.equal(o.detach(), before), name
        want = epilogue.add_relu_means_reference(o.detach(), i.detach())
        assert torch.equal(got_y, want[0]) and torch.allclose(got_means, want[1], rtol=1e-6), name


def _backward_ops(loss, inputs):
    """(gradients of loss w.r.t. inputs, the names of the epilogue's backward ops that ran)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        grads = torch.autograd.grad(loss, inputs)
    return grads, {e.name for e in prof.events() if e.name.startswith("selectivity::add_relu_means_backward")}


@needs_op
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("means_in_loss", [False, True])
def test_backward_writes_into_an_unshared_incoming_gradient(layout, means_in_loss):
    """A gradient the engine hands over unshared (here y * w's: a fresh tensor, as the next layer's
    in a training step) takes the result in place (add_relu_means_backward_, no new tensor); one that
    anything else holds (a hook that keeps it) is left intact and the result is a new tensor. Both give
    the same bits, and those of stock relu + add where the means are not in the loss."""
    check_written_into(layout, means_in_loss, "cpu")


def check_written_into(layout, means_in_loss, device):
    out, identity = pair(torch.float32, layout, B=3, U=8, H=4, W=4, device=device)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(out.shape, generator=g).to(device).contiguous(memory_format=epilogue._layout(out))
    wm = torch.randn(3, 8, generator=g).to(device)
    runs = {}
    for shared in (False, True):
        a, b = (t.clone().requires_grad_() for t in (out, identity))
        y, means = epilogue.add_relu_means_(a * 1, b)
        kept = []
        if shared:
            y.register_hook(kept.append)
        loss = (y * w).sum() + (means * wm).sum() * means_in_loss
        runs[shared] = _backward_ops(loss, (a, b))
        if shared:
            assert torch.equal(kept[0], w)  # the incoming gradient, untouched
    (grads, ran), (grads_shared, ran_shared) = runs[False], runs[True]
    assert ran == {"selectivity::add_relu_means_backward_"}
    assert ran_shared == {"selectivity::add_relu_means_backward"}
    for x, z in zip(grads, grads_shared):
        assert torch.equal(x, z)
    if not means_in_loss:
        a, b = (t.clone().requires_grad_() for t in (out, identity))
        want = torch.autograd.grad((torch.relu(a * 1 + b) * w).sum(), (a, b))
        assert torch.equal(grads[0], want[0]) and torch.equal(grads[1], want[1])


def _loss(outputs, g, use_y, use_m):
    y, means = outputs
    wy, wm = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(means.shape, generator=g, dtype=y.dtype)
    return (y * wy).sum() * use_y + (means * wm).sum() * use_m


@needs_op
@pytest.mark.parametrize("layout", LAYOUTS)
def test_inplace_variant_equals_the_functional_op(layout):
    out, identity = pair(torch.float32, layout)
    y, means = torch.ops.selectivity.add_relu_means(out, identity)
    a, b = (t.clone().requires_grad_() for t in (out, identity))
    pre_a, pre_b = a * 1, b * 1  # non-leaf, as a block's BN output
    y2, means2 = epilogue.add_relu_means_(pre_a, pre_b)
    assert y2 is pre_a and torch.equal(y2, y) and torch.equal(means2, means)
    (y2.sum() + means2.sum()).backward()
    c, d = (t.clone().requires_grad_() for t in (out, identity))
    y3, m3 = torch.ops.selectivity.add_relu_means(c, d)
    (y3.sum() + m3.sum()).backward()
    assert torch.equal(a.grad, c.grad) and torch.equal(b.grad, d.grad)
    torch.library.opcheck(torch.ops.selectivity.add_relu_means_, (out.clone(), identity))


@needs_op
def test_opcheck():
    for layout in LAYOUTS:
        out, identity = pair(torch.float32, layout, B=2, U=5, H=3, W=3)
        torch.library.opcheck(torch.ops.selectivity.add_relu_means,
                              (out.requires_grad_(), identity.requires_grad_()))
        y = torch.relu(out + identity).detach()
        gm = torch.randn(2, 5)
        for gy, m in ((torch.randn_like(y), None), (None, gm), (torch.randn_like(y), gm)):
            torch.library.opcheck(torch.ops.selectivity.add_relu_means_backward, (gy, m, y))
        for m in (None, gm):
            torch.library.opcheck(torch.ops.selectivity.add_relu_means_backward_, (torch.randn_like(y), m, y))


def test_wrapper_falls_back_to_the_reference(monkeypatch):
    out, identity = pair(torch.float32, "nchw")
    want = epilogue.add_relu_means_reference(out, identity)
    mixed = epilogue.add_relu_means(out, identity.double())  # mixed dtypes: torch's promotion, as stock
    assert mixed[0].dtype == torch.float64 and torch.equal(mixed[0], torch.relu(out + identity.double()))
    monkeypatch.setenv("SELECTIVITY_FORCE_REFERENCE", "1")
    got = epilogue.add_relu_means(out, identity)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_op
def test_bad_input_is_one_line():
    out = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="identity must have out's shape"):
        torch.ops.selectivity.add_relu_means(out, torch.zeros(2, 3, 4, 5))
    with pytest.raises(TypeError, match="identity must have out's dtype"):
        torch.ops.selectivity.add_relu_means(out, out.half())


# ----- CUDA (tools/gpu_check.py runs these on the GPU machine) -----------------------------------


@cuda
@needs_op
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_forward_is_stock_bit_for_bit(dtype, layout):
    check_forward(*pair(dtype, layout, B=4, U=70, H=9, W=9, device="cuda"))


@cuda
@needs_op
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_backward_equals_reference(dtype, layout):
    out, identity = pair(dtype, layout, B=4, U=70, H=9, W=9, device="cuda")
    g = torch.Generator().manual_seed(1)
    grads = []
    for f in (epilogue.add_relu_means, epilogue.add_relu_means_reference):
        a, b = (t.clone().requires_grad_() for t in (out, identity))
        y, m = f(a, b)
        wy = torch.randn(y.shape, generator=g).to(device="cuda", dtype=dtype)
        wm = torch.randn(m.shape, generator=g).to("cuda")
        g.manual_seed(1)
        y.backward(wy, retain_graph=True)
        grads.append(a.grad.clone())
        (m * wm).sum().backward()
        grads.append(a.grad.clone())
    assert torch.equal(bits(grads[0]), bits(grads[2]))  # grad_y alone: stock relu backward
    torch.testing.assert_close(grads[1].float(), grads[3].float(), rtol=1e-2 if dtype != torch.float32 else 1e-6,
                               atol=1e-6)


@cuda
@needs_op
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("means_in_loss", [False, True])
def test_cuda_backward_writes_into_an_unshared_incoming_gradient(layout, means_in_loss):
    check_written_into(layout, means_in_loss, "cuda")
