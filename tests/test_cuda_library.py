"""The library on a GPU: tracker, regularizer and BatchNorm modes give the CPU's numbers.

These run where CUDA is available (tools/gpu_check.sh runs this file on the GPU machine); on a
machine without a GPU they are skipped, and the same code paths run on the CPU elsewhere.
"""
import pytest
import torch

from selectivity import SelectivityRegularizer, SelectivityTracker, bn_statistics
from selectivity.train.models import build_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def full_float32():
    """Compare float32 with float32: on Ampere and later GPUs cuDNN convolutions default to TF32
    (10-bit mantissa), which put the first GPU run's sums past these tolerances (docs/gpu.md)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def data(seed=0, n=96):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def run_tracker(device, channels_last, dtype):
    torch.manual_seed(0)
    model = build_model("resnet20", 10).to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = data()
    tracker = SelectivityTracker(model, 10, dataset_labels=y, null_permutations=4, seed=2)
    with torch.no_grad(), torch.autocast(device, dtype, enabled=dtype != torch.float32):
        for i in range(0, len(y), 32):
            xb = x[i:i + 32].to(device)
            if channels_last:
                xb = xb.to(memory_format=torch.channels_last)
            with tracker.track(y[i:i + 32].to(device), torch.arange(i, i + 32)):
                model(xb)
    return {n: r.cpu() for n, r in tracker.compute().items()}


@cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_tracker_on_cuda_equals_cpu(channels_last):
    a, b = run_tracker("cpu", channels_last, torch.float32), run_tracker("cuda", channels_last,
                                                                       torch.float32)
    for n in a:
        torch.testing.assert_close(b[n].sums, a[n].sums, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[n].si, a[n].si, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(b[n].null_si, a[n].null_si, rtol=1e-3, atol=1e-4)
        assert torch.equal(b[n].counts, a[n].counts)


@cuda
def test_tracker_under_cuda_autocast_is_finite_and_counts_every_image():
    r = run_tracker("cuda", True, torch.float16)
    assert all(torch.isfinite(x.si).all() and int(x.counts.sum()) == 96 for x in r.values())


@cuda
def test_regularizer_term_and_gradient_on_cuda_equal_cpu():
    x, y = data(n=32)
    out = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = build_model("resnet20", 10).to(device)
        reg = SelectivityRegularizer(model, 10)
        model(x.to(device))
        term = reg.term(y.to(device))
        term.backward()
        out[device] = (term.detach().cpu(), model.layer1[0].conv1.weight.grad.cpu())
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["cuda"][1], out["cpu"][1], rtol=1e-3, atol=1e-5)


@cuda
def test_bn_recalibration_on_cuda_restores_buffers_and_rng():
    model = build_model("resnet20", 10).to("cuda")
    before = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.cuda.get_rng_state()
    x, _ = data()
    with torch.no_grad(), bn_statistics(model, "recalibrate", [x[:48].cuda(), x[48:].cuda()]):
        model(x[:8].cuda())
    assert all(torch.equal(before[k], v) for k, v in model.named_buffers())
    assert torch.equal(rng, torch.cuda.get_rng_state())


@cuda
def test_tracker_on_cuda_sees_every_batch_and_keeps_its_inputs():
    """Each batch's output is freed and its memory filled with NaN right after the forward, yet
    every batch is counted with the values it had (the hooks copy the means into the tracker's
    feed), and ``compute()`` reads them all without an explicit sync."""
    import torch.nn as nn
    from selectivity import ops

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), nn.ReLU()).cuda()
    tracker = SelectivityTracker(model, 10, {"relu": model[1]})
    sums, counts = ops.new_state(10, 128, torch.device("cuda"))
    with torch.no_grad():
        for _ in range(6):
            x = torch.randn(64, 3, 96, 96, device="cuda")
            labels = torch.randint(0, 10, (64,), device="cuda")
            with tracker.track(labels):
                out = model(x)
            ops.accumulate_reference(out, labels, sums, counts)
            del out, x
            torch.full((64, 128, 96, 96), float("nan"), device="cuda")  # reuse freed memory
    result = tracker.compute()["relu"]
    torch.testing.assert_close(result.sums, sums, rtol=1e-6, atol=1e-9)
    assert torch.equal(result.counts, counts)


@cuda
def test_tracker_on_cuda_resumed_from_state_dict_equals_one_pass():
    """States loaded into a fresh tracker are added into on the device: 2 batches, save, load,
    2 more batches = the 4 batches in one tracker."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10).cuda().eval()
    x, y = data(n=128)
    x, y = x.cuda(), y.cuda()

    def track(tracker, lo, hi):
        with torch.no_grad():
            for i in range(lo, hi, 32):
                with tracker.track(y[i:i + 32]):
                    model(x[i:i + 32])

    whole = SelectivityTracker(model, 10)
    track(whole, 0, 128)
    expected = {n: r.sums.clone() for n, r in whole.compute().items()}
    whole.remove()
    first = SelectivityTracker(model, 10)
    track(first, 0, 64)
    saved = first.state_dict()
    first.remove()
    resumed = SelectivityTracker(model, 10)
    resumed.load_state_dict(saved)
    track(resumed, 64, 128)
    got = resumed.compute()
    for n in expected:
        torch.testing.assert_close(got[n].sums, expected[n], rtol=1e-12, atol=1e-12)
