"""The package installed outside the checkout, used from a user's own script and loop."""
import os
import subprocess
import sys
import sysconfig
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


def fresh_venv(path) -> str:
    """A new virtual environment at ``path`` (outside the checkout) that sees this interpreter's
    installed packages through a ``.pth`` file, after its own: pip then finds torch, Lightning and
    the rest already satisfied and installs only the checkout, and what it installs comes first
    on ``sys.path``. (Installing torch itself into it would take minutes: docs/library.md.)
    Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True,
                   timeout=120)
    python = os.path.join(path, "bin", "python")
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    shared = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    with open(os.path.join(own, "_outer_packages.pth"), "w") as f:
        f.write("".join(p + "\n" for p in shared))
    return python


def test_pip_install_with_the_lightning_extra_in_a_fresh_venv_runs_the_examples(tmp_path):
    """``pip install "<checkout>[lightning]"`` into a fresh venv outside the checkout (pip resolves
    the extra: no --no-deps; --no-index: every requirement must already be there, nothing is
    fetched), then, from another directory with that venv's python: a plain loop gets the trainer's
    SI, and the Lightning example runs, both on the installed (not the checkout's) package."""
    venv = tmp_path / "venv"
    python = fresh_venv(venv)
    env = dict(os.environ, SELECTIVITY_NO_CUDA="1")  # the CPU kernels are what this test runs
    env.pop("PYTHONPATH", None)
    pip = subprocess.run([python, "-m", "pip", "install", "--no-build-isolation", "--no-index",
                          f"{ROOT}[lightning]"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=1500)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert "Requirement already satisfied: lightning>=2.6" in pip.stdout, pip.stdout
    assert "Successfully installed selectivity-tracking-" in pip.stdout, pip.stdout
    run_tool("tools/train.py", "-c", "configs/demo.yaml", "--model", "resnet18", "--epochs", "1",
             "--batch-size", "128", "--eval-every-steps", "0", "--bn-mode", "running",
             "--null-permutations", "0", "--tensorboard", "false", "--progress", "false",
             "--out-dir", str(tmp_path / "runs"), "--name", "r18", check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = elsewhere / "measure.py"
    script.write_text(SCRIPT)
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([python, "-c", "import selectivity.integrations.lightning as m, "
                            "selectivity._C as c; print(m.__file__); print(c.__file__)"],
                           cwd=elsewhere, env=clean, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr
    for path in where.stdout.split():
        assert path.startswith(str(venv)), where.stdout  # the installed package, not the checkout
    out = subprocess.run([python, str(script), str(venv), str(tmp_path / "runs" / "r18")],
                         cwd=elsewhere, env=dict(clean, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-9
    # the Lightning example, from another directory, on the installed package (its own folder,
    # examples/, is the only part of the checkout on its sys.path, and holds no package)
    lit = subprocess.run([python, os.path.join(ROOT, "examples", "lightning_loop.py"),
                          "--epochs", "1", "--image-size", "8", "--out", "lightning"],
                         cwd=elsewhere, env=clean, capture_output=True, text=True, timeout=600)
    assert lit.returncode == 0, lit.stderr
    assert lit.stdout.strip().splitlines()[-1].startswith("epoch 0: net.layer1 SI "), lit.stdout
    assert (elsewhere / "lightning" / "csv" / "version_0" / "metrics.csv").is_file()


def test_examples_run(tmp_path):
    env = {"PYTHONPATH": ROOT}
    plain = run_tool("examples/plain_loop.py", "--steps", "6", env=env, check=True)
    lines = [l for l in plain.stdout.splitlines() if " SI " in l]
    assert [l.split()[0] for l in lines] == [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]
    timm = run_tool("examples/timm_model.py", "--images", "64", env=env, check=True)
    assert "8 residual blocks, 7680 units" in timm.stdout
