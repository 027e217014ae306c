"""UnitHooks' means mode (selectivity/units/fused_blocks.py): residual blocks run through the fused
epilogue (tests/test_epilogue.py) give the model's own outputs and the hook path's means, for the
tracker, the regularizer and a compiled model."""
import pytest
import torch
import torchvision

from selectivity import epilogue, ops
from selectivity.errors import UnitsError
from selectivity.train.models import BasicBlock, build_model
from selectivity.regularizer import SelectivityRegularizer
from selectivity.units import UnitHooks
from selectivity.units.fused_blocks import _FusedBlock

needs_op = pytest.mark.skipif(not epilogue._HAS_OP, reason="selectivity._C is not built with add_relu_means")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def models():
    torch.manual_seed(0)
    return {"resnet18": (torchvision.models.resnet18(num_classes=10), 32),
            "resnet50": (torchvision.models.resnet50(num_classes=10), 32),
            "resnet20": (build_model("resnet20", 10), 16)}


def capture(model, x, fused, units="blocks"):
    seen = {}
    with UnitHooks(model, units, means_fn=lambda n, m: seen.__setitem__(n, m), fused=fused) as h:
        n_fused = sum(_FusedBlock.of(m) is not None for m in h.layers.values())
        y = model(x)
    return y, seen, n_fused


@needs_op
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_models_output_unchanged_and_means_equal_hooks(name, channels_last, monkeypatch):
    model, size = models()[name]
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(2, 3, size, size).contiguous(memory_format=fmt)
    calls = []
    real = epilogue.add_relu_means_
    monkeypatch.setattr(epilogue, "add_relu_means_", lambda o, i: calls.append(1) or real(o, i))
    with torch.no_grad():
        stock = model(x)
        y_fused, fused, n_fused = capture(model, x, True)
        y_hooks, hooked, n_hooked = capture(model, x, False)
    blocks = sum(type(m).__name__ in ("BasicBlock", "Bottleneck") for m in model.modules())
    assert n_fused == blocks == len(calls) and n_hooked == 0
    assert torch.equal(y_fused, stock) and torch.equal(y_hooks, stock)
    assert list(fused) == list(hooked)
    for n in fused:
        torch.testing.assert_close(fused[n], hooked[n], rtol=1e-6, atol=1e-7)
    assert all("forward" not in vars(m) for m in model.modules())  # restored on remove


@needs_op
def test_training_step_bit_identical_with_capture():
    """A tracked step (means detached, as the tracker keeps them) changes nothing: BN statistics,
    outputs and gradients are those of the untracked step, bit for bit."""
    def step(capture_on):
        torch.manual_seed(0)
        model = build_model("resnet20", 10).train()
        x = torch.randn(4, 3, 16, 16)
        with UnitHooks(model, means_fn=lambda n, m: m.detach(), enabled=capture_on):
            model(x).square().sum().backward()
        return [p.grad for p in model.parameters()] + list(model.state_dict().values())
    for a, b in zip(step(True), step(False)):
        assert torch.equal(a, b)


@needs_op
def test_stock_forward_when_the_final_relu_or_an_output_hook_needs_it(monkeypatch):
    calls = []
    real = epilogue.add_relu_means_
    monkeypatch.setattr(epilogue, "add_relu_means_", lambda o, i: calls.append(1) or real(o, i))
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    # The relu preset sees torchvision's one Bottleneck.relu three times: the block runs stock.
    relus = []
    with torch.no_grad(), UnitHooks(model, "relu", lambda n, out: relus.append(n)):
        _, fused, _ = capture(model, x, True)
    assert "layer1.0.relu#2" in relus and len(relus) == 1 + 3 * 16 and not calls
    # An output-replacing hook on a block (an ablation mask) registered first: the means describe
    # the output it leaves.
    block = model.layer2[0]
    with torch.no_grad(), UnitHooks(model, "layer2.0", lambda n, out: torch.zeros_like(out)):
        _, seen, _ = capture(model, x, True)
    assert torch.equal(seen["layer2.0"], torch.zeros_like(seen["layer2.0"]))
    assert len(calls) == 15 and "forward" not in vars(block)  # the other blocks ran fused


@needs_op
def test_two_consumers_share_one_fused_forward_and_switches():
    model = build_model("resnet20", 10).eval()
    a, b = [], []
    ha = UnitHooks(model, "layer1.0", means_fn=lambda n, m: a.append(n))
    hb = UnitHooks(model, "layer1.0", means_fn=lambda n, m: b.append(n))
    block = model.layer1[0]
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8))
        ha.remove()
        assert _FusedBlock.of(block) is not None
        model(torch.randn(1, 3, 8, 8))
        hb.remove()
    assert a == ["layer1.0"] and b == ["layer1.0", "layer1.0"] and "forward" not in vars(block)
    with pytest.raises(UnitsError, match="not both"):
        UnitHooks(model, means_fn=print, fn=print)


def test_env_switch_forces_the_hook_path(monkeypatch):
    monkeypatch.setenv("SELECTIVITY_NO_FUSED", "1")
    model = build_model("resnet20", 10)
    with UnitHooks(model, means_fn=lambda n, m: None) as h:
        assert not h.fused and all(_FusedBlock.of(m) is None for m in h.layers.values())


def reg_step(fused, amp=False):
    torch.manual_seed(0)
    model = build_model("resnet20", 10).train()
    x, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    reg = SelectivityRegularizer(model, 10)
    reg.hooks.fused = fused
    if not fused:  # a regularizer built while the fused path was on: take the blocks off it
        for hnd in list(reg.hooks.handles):
            if hasattr(hnd, "fused"):
                hnd.remove()
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        logits = model(x)
    term = reg.term(labels)
    (logits.float().square().mean() - term).backward()
    reg.remove()
    return term.detach(), reg.last_layers, [p.grad.clone() for p in model.parameters()]


@needs_op
@pytest.mark.parametrize("amp", [False, True])
def test_regularizer_value_and_gradient_fused_equal_hooks(amp):
    (t1, l1, g1), (t2, l2, g2) = reg_step(True, amp), reg_step(False, amp)
    torch.testing.assert_close(t1, t2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-7)
    for a, b in zip(g1, g2):
        if amp:
            # bf16 gradients: the hook path rounds the means' share to bf16 before adding it to
            # grad_y (autograd of mean(dtype=float32) then the add), the op rounds the sum once;
            # the difference is bf16 rounding (2^-8) carried through the network.
            assert (a - b).norm() <= 3e-2 * b.norm()
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_op
def test_tracker_contract_accumulating_the_means_gives_the_hook_path_si():
    """What the tracker does with means_fn (accumulate the [B, U] means per layer, then SI) equals
    accumulating the block outputs seen by hooks."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    states_m, states_h = {}, {}

    def add(states, name, t, labels):
        if name not in states:
            states[name] = ops.new_state(10, t.shape[1])
        ops.accumulate(t, labels, *states[name])

    for step in range(3):
        x, labels = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
        with torch.no_grad():
            with UnitHooks(model, means_fn=lambda n, m: add(states_m, n, m, labels)):
                model(x)
            with UnitHooks(model, fn=lambda n, out: add(states_h, n, out, labels)):
                model(x)
    assert list(states_m) == list(states_h)
    for n in states_m:
        a, b = ops.selectivity_index(*states_m[n]), ops.selectivity_index(*states_h[n])
        torch.testing.assert_close(a.si, b.si, rtol=1e-6, atol=1e-7)
        assert torch.equal(states_m[n][1], states_h[n][1])


@needs_op
def test_compiled_model_gives_the_eager_means():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), BasicBlock(4, 8, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    eager, compiled = {}, {}
    with torch.no_grad():
        with UnitHooks(model, "1", means_fn=lambda n, m: eager.__setitem__(n, m)):
            y_eager = model(x)
        with UnitHooks(model, "1", means_fn=lambda n, m: compiled.__setitem__(n, m)):
            y_comp = torch.compile(model, backend="inductor")(x)
    assert list(compiled) == ["1"]
    torch.testing.assert_close(compiled["1"], eager["1"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-6, atol=1e-6)



# ----- CUDA (tools/gpu_check.py runs these on the GPU machine) -----------------------------------


@cuda
@needs_op
def test_cuda_models_means_fused_equal_hooks():
    model, size = models()["resnet50"]
    model = model.cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", torch.float16):
        y1, fused, n = capture(model, x, True)
        y2, hooked, _ = capture(model, x, False)
    assert n == 16 and torch.equal(y1, y2)
    for name in fused:
        torch.testing.assert_close(fused[name], hooked[name], rtol=1e-5, atol=1e-6)
