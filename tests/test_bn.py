"""BatchNorm statistics at evaluation: recalibrated, running or per batch; training untouched."""
import torch
from torch.optim.swa_utils import update_bn

from conftest import run_tool
from selectivity.train.checkpoint import load_state
from selectivity.evaluation import bn_statistics
from selectivity.train.models import build_model


def model_and_batches():
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    batches = [torch.randn(16, 3, 16, 16) * 3 + 1 for _ in range(4)]
    return model, batches


def buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def test_recalibrate_equals_update_bn_and_restores_everything():
    model, batches = model_and_batches()
    with torch.no_grad():
        for x in batches[:2]:  # some training: running statistics that lag
            model(x * 0.1)
    before, rng = buffers(model), torch.get_rng_state()
    model.train()
    with bn_statistics(model, "recalibrate", batches) as m:
        assert not m.training
        inside = buffers(model)
        out = model(batches[0])
    reference, _ = model_and_batches()
    reference.load_state_dict({**model.state_dict(), **before})
    update_bn(batches, reference)  # torch's own helper: the cumulative average over the batches
    for k, v in reference.named_buffers():
        if "running" in k:
            torch.testing.assert_close(inside[k], v, rtol=1e-5, atol=1e-6)
    reference.eval()
    torch.testing.assert_close(out, reference(batches[0]), rtol=1e-4, atol=1e-5)
    after = buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng, torch.get_rng_state()) and model.training


def test_running_and_batch_modes():
    model, batches = model_and_batches()
    before = buffers(model)
    with torch.no_grad():
        with bn_statistics(model, "running"):
            running = model(batches[0])
        with bn_statistics(model, "batch"):
            batch = model(batches[0])
    model.train()
    with torch.no_grad():
        train_mode = model(batches[0])
    for k, v in before.items():
        model.get_buffer(k).copy_(v)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(running, model(batches[0]))
    torch.testing.assert_close(batch, train_mode)
    assert not torch.allclose(running, batch)


def test_recalibration_leaves_the_training_trajectory_bit_identical(tmp_path):
    """Same final weights with and without recalibrated (and running-statistics) evaluations."""
    common = ["-c", "configs/demo.yaml", "--epochs", "1", "--image-size", "16",
              "--batch-size", "128", "--eval-every-steps", "3", "--deterministic", "true",
              "--threads", "1", "--progress", "false", "--tensorboard", "false",
              "--out-dir", str(tmp_path)]
    run_tool("tools/train.py", *common, "--name", "recal", "--bn-mode", "recalibrate",
             "--eval-running-bn", "true", check=True)
    run_tool("tools/train.py", *common, "--name", "plain", "--bn-mode", "running", check=True)
    a = load_state(str(tmp_path / "recal" / "checkpoints" / "epoch_1.pt"))["model"]
    b = load_state(str(tmp_path / "plain" / "checkpoints" / "epoch_1.pt"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
