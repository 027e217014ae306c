"""The tracker and the regularizer on ``torch.compile(model)`` give what they give in eager mode.

Backend ``aot_eager``: Dynamo traces the model with the hooks and AOTAutograd builds the forward
and backward graphs, which is where hooks and compile meet; inductor would only change the kernels
(its fused convolutions move SI by ~1e-5 on this model, and it takes a minute to compile here).
"""
import pytest
import torch
import torchvision
from torch._dynamo.utils import counters

import selectivity as sel

B, K = 4, 4


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=K)
    x = torch.randn(2, B, 3, 32, 32)
    return model, x, torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])


def _si(model, x, labels, graphs=None):
    tracker = sel.SelectivityTracker(model, K)
    with torch.no_grad():
        for xb, yb in zip(x, labels):
            with tracker.track(yb):
                model(xb)
        model(x[0])  # a forward outside track(): update() path, accumulated next
        tracker.update(labels[0])
        if graphs is not None:  # warm now: more batches of either kind compile nothing new
            graphs.append((counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())))
            with tracker.track(labels[1]):
                model(x[1])
            model(x[0])
            tracker.update(labels[0])
            graphs.append((counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())))
    out = tracker.compute()
    tracker.remove()
    return out


def test_tracker_under_compile_gives_the_eager_si_and_compiles_nothing_new_once_warm(data):
    model, x, labels = data
    model.eval()
    eager = _si(model, x, labels, [])
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    compiled = _si(torch.compile(model, backend="aot_eager"), x, labels, graphs)
    assert list(compiled) == list(eager)
    for n in eager:
        torch.testing.assert_close(compiled[n].sums, eager[n].sums, rtol=0, atol=1e-9)
        torch.testing.assert_close(compiled[n].si, eager[n].si, rtol=0, atol=1e-9)
    # The hooks break the graph (docs/library.md says where), but only while warming up: later
    # batches of either kind compile no new graph and break nothing new.
    assert graphs[0] == graphs[1], graphs


def test_regularizer_under_compile_gives_the_eager_term_and_gradient(data):
    model, x, labels = data
    model.train()

    def term_and_grad(m):
        reg = sel.SelectivityRegularizer(m, K)
        model.zero_grad()
        m(x[0])
        term = reg.term(labels[0])
        term.backward()
        reg.remove()
        return term.detach(), model.conv1.weight.grad.clone()

    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager = term_and_grad(model)
    model.load_state_dict(state)  # BatchNorm running stats as before
    torch._dynamo.reset()
    compiled = term_and_grad(torch.compile(model, backend="aot_eager"))
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-7)
