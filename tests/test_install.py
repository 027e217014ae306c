"""The package installed outside the checkout, used from a user's own script and loop."""
import os
import subprocess
import sys
import textwrap

from conftest import ROOT, run_tool

SCRIPT = textwrap.dedent('''
    import sys
    import torch, torchvision
    import selectivity
    from selectivity.train.config import Config, data_spec
    from selectivity.pipelines import build_loader

    site, run = sys.argv[1], sys.argv[2]
    assert selectivity.__file__.startswith(site), selectivity.__file__
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(torch.load(run + "/checkpoints/epoch_1.pt", weights_only=False)["model"])
    model = model.to(memory_format=torch.channels_last).eval()
    val = build_loader(data_spec(Config(dataset="digits", eval_batch_size=360)), "val", "cpu")
    tracker = selectivity.SelectivityTracker(model, num_classes=10)
    with torch.no_grad():
        for images, labels in val:
            with tracker.track(labels):
                model(images)
    saved = torch.load(run + "/selectivity/epoch_1.pt", weights_only=False)["layers"]
    ours = tracker.compute()
    assert list(ours) == list(saved), (list(ours), list(saved))
    print(max(float((ours[n].si - saved[n]["si"]).abs().max()) for n in ours))
''')


def test_installed_package_in_a_plain_loop_gets_the_trainers_si(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, SELECTIVITY_NO_CUDA="1")  # the CPU kernels are what this test runs
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation",
                    "--no-deps", "--target", str(site), ROOT], check=True, env=env, timeout=900)
    run_tool("tools/train.py", "-c", "configs/demo.yaml", "--model", "resnet18", "--epochs", "1",
             "--batch-size", "128", "--eval-every-steps", "0", "--bn-mode", "running",
             "--null-permutations", "0", "--tensorboard", "false", "--progress", "false",
             "--out-dir", str(tmp_path / "runs"), "--name", "r18", check=True)
    script = tmp_path / "elsewhere" / "measure.py"
    script.parent.mkdir()
    script.write_text(SCRIPT)
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(script), str(site), str(tmp_path / "runs" / "r18")],
                         cwd=script.parent, env=dict(clean, PYTHONPATH=str(site),
                                                     OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-9


def test_examples_run(tmp_path):
    env = {"PYTHONPATH": ROOT}
    plain = run_tool("examples/plain_loop.py", "--steps", "6", env=env, check=True)
    lines = [l for l in plain.stdout.splitlines() if " SI " in l]
    assert [l.split()[0] for l in lines] == [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]
    timm = run_tool("examples/timm_model.py", "--images", "64", env=env, check=True)
    assert "8 residual blocks, 7680 units" in timm.stdout
