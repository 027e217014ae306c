"""The selectivity regularizer (selectivity/regularizer.py): the differentiable minibatch SI
against autograd's numerical gradient and the tracker's SI, α windows and their validation, the
callback, DDP (2 gloo processes), and end to end: resume inside a window, and the sign of α.

The end-to-end tests (marked ``# SLOW``) train small ResNet-20s on digits as subprocesses.
"""
import json
import math
import os
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from conftest import ROOT

from selectivity import ops
from selectivity.train.callbacks import Regularizing, regularizer_callbacks
from selectivity.train.checkpoint import load_state
from selectivity.train.config import Config, ConfigError, load_config
from selectivity.train.models import build_model
from selectivity.regularizer import (NEAR_SILENT, SelectivityRegularizer, Window, alpha_at,
                                     class_sums, parse_windows, reduce_states, term_diagnostics,
                                     selectivity_reg)
from selectivity.units import resolve_units

K = 5


def load_tool(name):
    """tools/<name>.py as a module (to call its main in this process: no interpreter start-up)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch(seed=0, B=12, dtype=torch.float32):
    """Two layers (a channels_last conv map and a [B, U] output) and labels with class 2 absent
    and uneven class counts."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, 6, 3, 4, generator=g, dtype=dtype).to(memory_format=torch.channels_last)
    b = torch.rand(B, 4, generator=g, dtype=dtype)
    labels = torch.tensor([0, 0, 0, 1, 3, 3, 4, 1, 0, 3, 4, 0][:B])
    return [a, b], labels


# ----- the differentiable SI ---------------------------------------------------------------------


def test_library_term_in_a_plain_loop_equals_the_functional_form():
    """``loss = ce - alpha * reg.term(labels)`` in a user's own loop: the term is the minibatch
    SI_reg of the block outputs of the forward that just ran, with its gradient."""
    torch.manual_seed(0)
    model = build_model("resnet20", K)
    images, labels = torch.randn(12, 3, 16, 16), torch.randint(0, K, (12,))
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, o: seen.append(o)) for m in resolve_units(model).values()]
    reg = SelectivityRegularizer(model, K)
    model(images[:4])  # a forward without term(): only the last forward's layers count
    seen.clear()
    model(images)
    term = reg.term(labels)
    expected, _ = selectivity_reg(seen, labels, K)
    torch.testing.assert_close(term, expected)
    assert term.requires_grad and reg.last_layers.shape == (9,)
    with pytest.raises(RuntimeError, match="no regularized layer ran"):
        reg.term(labels)
    reg.enabled = False
    model(images)
    with pytest.raises(RuntimeError):
        reg.term(labels)
    for h in hooks:
        h.remove()


def test_gradcheck_double():
    (a, b), labels = batch(dtype=torch.float64)
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: selectivity_reg([a, b], labels, K)[0], (a, b))
    assert torch.autograd.gradcheck(lambda a: selectivity_reg([a], labels, K)[1], (a,))
    # One class present: μ_-max = 0, SI ≈ 1, still smooth.
    one = torch.zeros(12, dtype=torch.long)
    assert torch.autograd.gradcheck(lambda b: selectivity_reg([b], one, K)[0], (b,))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_tracker_si_of_the_same_minibatch(seed):
    acts, labels = batch(seed)
    si_reg, per_layer = selectivity_reg(acts, labels, K)
    states = OrderedDict()
    for i, act in enumerate(acts):
        sums, counts = ops.new_state(K, act.shape[1])
        ops.accumulate(act, labels, sums, counts)
        states[f"l{i}"] = (sums, counts)
    layers = {n: float(ops.selectivity_index(s, c, 1e-7).si.mean()) for n, (s, c) in states.items()}
    mean = sum(layers.values()) / len(layers)
    assert per_layer.dtype == torch.float32 and si_reg.dim() == 0
    expected = torch.tensor(list(layers.values()), dtype=torch.float64)
    torch.testing.assert_close(per_layer.double(), expected, rtol=1e-5, atol=1e-6)
    assert math.isclose(float(si_reg), mean, rel_tol=1e-5, abs_tol=1e-6)


def test_autocast_bf16_computes_in_float32():
    acts, labels = batch(3)
    ref, _ = selectivity_reg(acts, labels, K)
    with torch.autocast("cpu", torch.bfloat16):
        got, per_layer = selectivity_reg([a.bfloat16() for a in acts], labels, K)
    assert got.dtype == per_layer.dtype == torch.float32
    assert abs(float(got) - float(ref)) < 1e-2  # bf16 inputs, float32 arithmetic


def test_class_means_not_sums():
    """Every class has the same mean but class 0 has 5× the images: SI from means is 0 (sums, as in
    paper 1's code, would call the unit selective for the most frequent class)."""
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 2])
    acts = torch.ones(7, 3)
    si, _ = selectivity_reg([acts], labels, K)  # classes 3 and 4 absent: excluded
    assert abs(float(si)) < 1e-6


# ----- windows -----------------------------------------------------------------------------------


def test_windows_parse_and_lookup():
    w = parse_windows([{"alpha": 0.0, "start": 5}, {"alpha": -1, "start": 0, "end": 5}])
    assert w == [Window(-1.0, 0.0, 5.0), Window(0.0, 5.0, math.inf)]
    assert alpha_at(w, 0.0) == -1.0 and alpha_at(w, 4.999) == -1.0 and alpha_at(w, 5.0) == 0.0
    w = parse_windows([{"alpha": 2.5, "start": 0.5, "end": 1.25}])
    assert [alpha_at(w, e) for e in (0.0, 0.49, 0.5, 1.2, 1.25, 9)] == [0, 0, 2.5, 2.5, 0, 0]
    assert parse_windows([]) == [] and parse_windows({"alpha": 3}) == [Window(3.0)]


@pytest.mark.parametrize("spec, message", [
    ([{"alpha": -1, "start": 0, "end": 5}, {"alpha": 1, "start": 4}], "overlap"),
    ([{"alpha": -1}, {"alpha": 1, "start": 3}], "overlap"),
    ([{"start": 0}], "needs an alpha"),
    ([{"alpha": "big"}], "must be a finite number"),
    ([{"alpha": True}], "must be a finite number"),
    ([{"alpha": 1, "start": 3, "end": 2}], "0 <= start < end"),
    ([{"alpha": 1, "begin": 3}], "unknown key 'begin'"),
    ([-1.0], "must be a mapping"),
    ("-1", "must be a list"),
])
def test_bad_windows_are_one_line_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_windows(spec)
    assert "\n" not in str(e.value) and "selectivity_reg" in str(e.value)


def test_windows_from_yaml_and_cli_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("selectivity_reg: [{alpha: -1.0, start: 0, end: 5}, {alpha: 0.5, start: 5}]\n")
    cfg = load_config(str(path))
    assert parse_windows(cfg.selectivity_reg)[1] == Window(0.5, 5.0)
    from selectivity.train.config import parse_override
    cfg = load_config(None, {"selectivity_reg": parse_override("selectivity_reg",
                                                               "[{alpha: -3, start: 2.5}]")})
    assert parse_windows(cfg.selectivity_reg) == [Window(-3.0, 2.5)]
    assert regularizer_callbacks(Config()) == []  # default: no regularizer, no callback
    (cb,) = regularizer_callbacks(Config(), alpha=-1.0)  # tools/bench_train.py's constant α
    assert cb.windows == [Window(-1.0)]


def test_train_rejects_overlapping_windows_before_writing(tmp_path, capsys):
    """tools/train.py (in this process: its CLI wrapper, exit status and message) stops with one
    line before anything is written."""
    from selectivity.cli import run_cli
    train = load_tool("train")
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, ["-c", os.path.join(ROOT, "configs", "demo.yaml"), "--out-dir",
                             str(tmp_path), "--selectivity_reg",
                             "[{alpha: -1, end: 3}, {alpha: 1, start: 2}]"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: config key 'selectivity_reg'") and "overlap" in err
    assert not os.listdir(tmp_path)


# ----- the callback ------------------------------------------------------------------------------


def fake_trainer(model, epoch=0, batch_in_epoch=0, steps_per_epoch=10):
    return SimpleNamespace(model=model, num_classes=K, device=torch.device("cpu"), epoch=epoch,
                           batch_in_epoch=batch_in_epoch, steps_per_epoch=steps_per_epoch)


def test_callback_term_alpha_zero_and_channels_last_autocast():
    torch.manual_seed(0)
    model = build_model("resnet20", K).to(memory_format=torch.channels_last)
    images = torch.randn(10, 3, 16, 16).to(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 1, 3, 4, 0, 0, 1, 3, 3])
    cb = Regularizing(parse_windows([{"alpha": -2.0, "start": 0, "end": 0.5}]))
    tr = fake_trainer(model)
    cb.setup(tr)
    blocks = resolve_units(model)
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, o: seen.append(o)) for m in blocks.values()]
    # In the window: the term is -α · SI_reg of the block outputs, computed in float32.
    for step, amp in enumerate((False, True)):
        seen.clear()
        tr.batch_in_epoch = step
        cb.before_batch(tr, images, labels, True)
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            logits = model(images)
            terms = cb.loss_terms(tr, images, labels, logits)
        cb.after_batch(tr)
        assert set(terms) == {"selectivity_reg"} and terms["selectivity_reg"].requires_grad
        assert terms["selectivity_reg"].dtype == torch.float32 and len(seen) == 9
        expected, _ = selectivity_reg(seen, labels, K)
        torch.testing.assert_close(terms["selectivity_reg"], 2.0 * expected)
    terms["selectivity_reg"].backward()
    assert model.layer1[0].conv1.weight.grad.abs().sum() > 0
    # A checkpoint inside a log interval keeps its partial si_reg average; one at a log step
    # (written before that step's log, which empties the interval) keeps none.
    tr.cfg, tr.step = SimpleNamespace(log_every_steps=3), 7
    assert cb.state_dict()["si_n"] == 2
    tr.step = 9
    assert cb.state_dict() == {"si_sum": 0.0, "si_n": 0, "grad_max": 0.0, "silent_max": 0.0}
    log = cb.train_log(tr)
    assert log["alpha"] == -2.0 and 0 < log["si_reg"] < 1
    assert log["reg_grad_norm"] > 0 and 0 <= log["reg_silent_frac"] <= 1
    # Outside the window (epoch 0.5 = batch 5 of 10): α = 0, hooks off, nothing computed.
    tr.batch_in_epoch = 5
    cb.before_batch(tr, images, labels, True)
    assert not cb.reg.enabled
    model(images)
    assert cb.reg._acts == [] and cb.loss_terms(tr, images, labels, None) == {}
    assert cb.train_log(tr) == {"alpha": 0.0}  # no si_reg when no step was regularized
    # Evaluation never regularizes.
    tr.batch_in_epoch = 0
    cb.before_batch(tr, images, labels, False)
    assert not cb.reg.enabled
    for h in hooks:
        h.remove()


# ----- DDP: class means over all ranks -----------------------------------------------------------


class Tiny(nn.Module):
    """Two 'tracked layers' returned beside the logits: a conv map and a [B, U] layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Linear(6, 5)
        self.head = nn.Linear(5, K)

    def forward(self, x):
        a = torch.relu(self.conv(x))
        b = torch.relu(self.fc1(a.mean((2, 3))))
        return self.head(b), [a, b]


ALPHA = -2.0


def ddp_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, 5, 5, generator=g, dtype=torch.float64)
    return x, torch.tensor([0, 1, 1, 3, 0, 4, 3, 3, 1, 0, 4, 1])


def ddp_model():
    torch.manual_seed(3)
    return Tiny().double()


def reg_loss(model, x, labels):
    logits, acts = model(x)
    si, per_layer = selectivity_reg(acts, labels, K)
    return F.cross_entropy(logits, labels) - ALPHA * si, si, per_layer, acts


def ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        x, labels = ddp_data()
        # 1) DDP training step, even split 6 + 6: loss = CE − α·SI_reg(global batch).
        net = nn.parallel.DistributedDataParallel(ddp_model())
        mine = slice(6 * rank, 6 * rank + 6)
        loss, si, per_layer, _ = reg_loss(net, x[mine], labels[mine])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in net.module.named_parameters()}
        # 2) Uneven split 7 + 5, no DDP: the value, and the gradient reaching this rank's inputs.
        uneven = slice(0, 7) if rank == 0 else slice(7, 12)
        acts = [a.detach()[uneven].requires_grad_() for a in ddp_model()(x)[1]]
        si2, _ = selectivity_reg(acts, labels[uneven], K)
        si2.backward()
        torch.save({"si": si.detach(), "per_layer": per_layer.detach(), "grads": grads,
                    "si2": si2.detach(), "act_grads": [a.grad for a in acts]},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_ddp_global_class_means_equal_single_process(tmp_path):
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2,
             join=True)
    x, labels = ddp_data()
    model = ddp_model()
    loss, si, per_layer, _ = reg_loss(model, x, labels)
    loss.backward()
    acts = [a.detach().requires_grad_() for a in ddp_model()(x)[1]]
    si_full, _ = selectivity_reg(acts, labels, K)
    si_full.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        # The term is the SI of the concatenated batch on every rank ...
        torch.testing.assert_close(got["si"], si.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got["per_layer"], per_layer.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got["si2"], si_full.detach(), rtol=1e-12, atol=1e-14)
        # ... and DDP's averaged update is the single-process update of CE − α·SI_reg.
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-10, atol=1e-12)
        # The backward sums over ranks: rank r's inputs get world × ∂SI/∂(its slice).
        part = slice(0, 7) if rank == 0 else slice(7, 12)
        for g, a in zip(got["act_grads"], acts):
            torch.testing.assert_close(g / 2, a.grad[part], rtol=1e-10, atol=1e-12)


# ----- end to end (subprocesses) -----------------------------------------------------------------

# digits at 16 px (4× fewer pixels than the demo's 32: same code paths, quicker), 11 steps/epoch.
E2E = ["-c", "configs/demo.yaml", "--image-size", "16", "--batch-size", "128",
       "--deterministic", "true", "--progress", "false", "--tensorboard", "false",
       "--eval-every-steps", "0", "--threads", "1"]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


# Three windows, the second boundary inside epoch 1 at batch 6 of 11 (1 + 6/11 ≥ 1.5).
WINDOWS = "[{alpha: -1.0, end: 0.5}, {alpha: 2.0, start: 0.5, end: 1.5}, {alpha: -3.0, start: 1.5}]"


@pytest.mark.timeout(400)
def test_SLOW_resume_inside_a_window_applies_the_same_alpha(tool, tmp_path):
    """Killed at step 16 and resumed from the mid-epoch checkpoint at step 14 (epoch 1, batch 3):
    the per-step α sequence, every train record and the final weights equal an uninterrupted
    run's."""
    out = str(tmp_path)
    args = [*E2E, "--epochs", "2", "--track", "false", "--log-every-steps", "1",
            "--save-every-steps", "7", "--save-steps-epochs", "2", "--selectivity_reg", WINDOWS,
            "--out-dir", out]
    tool("tools/train.py", *args, "--name", "ref", check=True)
    killed = tool("tools/train.py", *args, "--name", "k",
                  env={"SELECTIVITY_FAULT": "train_step:16"})
    assert killed.returncode == -9, killed.stderr
    assert "step_14.pt" in os.listdir(os.path.join(out, "k", "checkpoints"))
    tool("tools/train.py", *args, "--name", "k", "--resume", check=True)

    windows = parse_windows([{"alpha": -1.0, "end": 0.5}, {"alpha": 2.0, "start": 0.5, "end": 1.5},
                             {"alpha": -3.0, "start": 1.5}])
    expected = [alpha_at(windows, s // 11 + (s % 11) / 11) for s in range(22)]
    assert expected[5:7] == [-1.0, 2.0] and expected[16:18] == [2.0, -3.0]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rs]
    ref, res = metrics(os.path.join(out, "ref")), metrics(os.path.join(out, "k"))
    ref_train = [r for r in ref if r["split"] == "train"]
    assert [r["alpha"] for r in ref_train] == expected
    assert all(0 < r["si_reg"] < 1 for r in ref_train)
    assert strip(ref) == strip(res)
    a, b = (load_state(os.path.join(out, n, "checkpoints", "last.pt")) for n in ("ref", "k"))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


# The sign of α on the demo setup, shortened (see docs/regularizer.md for the full 8-epoch sweep).
SIGN_EPOCHS = "3"
SIGN_ALPHAS = {"zero": 0.0, "neg": -30.0, "pos": 10.0}


@pytest.mark.timeout(600)
def test_SLOW_alpha_sign_moves_val_selectivity(tool, tmp_path):
    out = str(tmp_path)
    final = {}
    for name, alpha in SIGN_ALPHAS.items():
        tool("tools/train.py", *E2E, "--epochs", SIGN_EPOCHS, "--out-dir", out, "--name", name,
             "--selectivity_reg", f"[{{alpha: {alpha}}}]", check=True, timeout=600)
        final[name] = [r for r in metrics(os.path.join(out, name)) if r["split"] == "val"][-1]
    si = {n: r["si_mean"] for n, r in final.items()}
    assert si["neg"] <= 0.5 * si["zero"], si
    assert si["pos"] > si["zero"], si


# ----- tools: sweep plan and figures (no training) -----------------------------------------------


def fake_run(run_dir, alpha_spec, final_epoch, si, acc, ckpt=True):
    """A run directory as training leaves it: config.yaml, metrics.jsonl, a checkpoint."""
    import yaml
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    if ckpt:
        open(os.path.join(run_dir, "checkpoints", "last.pt"), "w").close()
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump({"epochs": 2, "selectivity_reg": alpha_spec}, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for e in range(final_epoch + 1):
            f.write(json.dumps({"epoch": e, "step": 10 * e, "split": "train", "alpha": -1.0,
                                "si_reg": si}) + "\n")
            f.write(json.dumps({"epoch": e, "step": 10 * e, "split": "val", "acc1": acc,
                                "si_mean": si, "si_null": 0.04}) + "\n")


def test_sweep_plan_skips_finished_and_resumes_unfinished(tmp_path, capsys):
    import importlib
    from selectivity.study import launch, sweep
    # the tool's module (selectivity.tools.sweep is also the name of its console-script runner)
    sweep_tool = importlib.import_module("selectivity.tools.sweep")
    out = tmp_path / "sweep"
    fake_run(str(out / "done"), [{"alpha": -1.0}], 2, 0.1, 0.9)
    fake_run(str(out / "half"), [{"alpha": -1.0}], 1, 0.1, 0.9)
    assert launch.run_status(str(out / "done"), 2) == "done"
    assert launch.run_status(str(out / "done"), 3) == "resume"  # more epochs asked
    assert launch.run_status(str(out / "half"), 2) == "resume"
    assert launch.run_status(str(out / "none"), 2) == "new"
    cmd = sweep.train_command("c/x.yaml", str(out), "x", ["lr=-0.1"], resume=True)
    assert cmd[-2:] == ["--lr=-0.1", "--resume"] and "--name" in cmd
    cfgs = []
    for name in ("done", "half", "none"):
        cfgs.append(str(tmp_path / f"{name}.yaml"))
        with open(cfgs[-1], "w") as f:
            f.write("epochs: 2\nselectivity_reg: [{alpha: -1.0}]\n")
    sweep_tool.main([*cfgs, "--out-dir", str(out), "--dry-run"])
    plan = capsys.readouterr().out.split()
    assert plan[plan.index("done") + 1] == "done" and plan[plan.index("half") + 1] == "resume"
    assert plan[plan.index("none") + 1] == "new"
    with pytest.raises(ConfigError, match="overlap"):  # every config is checked before any run
        with open(cfgs[0], "w") as f:
            f.write("selectivity_reg: [{alpha: -1.0}, {alpha: 1.0, start: 1}]\n")
        sweep_tool.main([*cfgs, "--out-dir", str(out), "--dry-run"])


def test_plot_regularization_figures_and_table(tmp_path, capsys):
    import importlib
    plot = importlib.import_module("selectivity.tools.plot_regularization")
    runs = []
    for name, spec, si, acc in [("a0", [], 0.2, 0.95), ("am1", [{"alpha": -1.0}], 0.08, 0.96),
                                ("ap1", [{"alpha": 1.0}], 0.3, 0.9),
                                ("late", [{"alpha": -1.0, "start": 1}], 0.12, 0.95)]:
        runs.append(str(tmp_path / "runs" / name))
        fake_run(runs[-1], spec, 2, si, acc)
    plot.main(runs)
    out = capsys.readouterr().out
    for f in ("reg_alpha.png", "reg_curves.png"):
        assert os.path.getsize(tmp_path / "runs" / "figures" / f) > 10_000
    rows = [l for l in out.splitlines() if l.startswith("| a") or l.startswith("| late")]
    assert [r.split("|")[1].strip() for r in rows] == ["am1", "a0", "ap1", "late"]
    assert "α=-1 [1, ∞)" in out and "| 0.0800 |" in out


def test_term_diagnostics_gradient_norm_and_near_silent_units():
    """‖∂SI_reg/∂A‖ equals autograd's gradient of the same term, and the near-silent fraction
    counts exactly the units whose μ_max + μ_-max is below NEAR_SILENT."""
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    a1 = torch.rand(6, 4, dtype=torch.float64)
    a1[:, 0] = 1e-5  # silent in every class: μ_max + μ_-max = 2e-5
    a2 = torch.rand(6, 3, dtype=torch.float64)
    acts = [a1.clone().requires_grad_(), a2.clone().requires_grad_()]
    si, _ = reduce_states([class_sums(a, labels, 3) for a in acts])
    norm, silent = term_diagnostics(si, acts, labels, 3)
    ref = torch.autograd.grad(si, acts)
    assert math.isclose(float(norm), float(torch.cat([g.flatten() for g in ref]).norm()),
                        rel_tol=1e-6)
    assert float(silent) == pytest.approx(1 / 7)
    assert float(norm) > 0 and NEAR_SILENT > 2e-5


def test_trainer_logs_the_terms_gradient_and_silent_units(tmp_path):
    from conftest import run_tool
    run_tool("tools/train.py", "-c", "configs/demo.yaml", "--epochs", "1", "--image-size", "8",
             "--model", "resnet20", "--selectivity-reg", "[{alpha: -1}]", "--log-every-steps", "5",
             "--eval-every-steps", "0", "--tensorboard", "false", "--progress", "false",
             "--out-dir", str(tmp_path), "--name", "r", check=True)
    train = [json.loads(l) for l in open(tmp_path / "r" / "metrics.jsonl")]
    train = [r for r in train if r.get("split") == "train"]
    assert train and all(r["reg_grad_norm"] > 0 and 0 <= r["reg_silent_frac"] <= 1 for r in train)
