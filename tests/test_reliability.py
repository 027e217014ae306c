"""Real faults, not injected ones: a full disk (a small tmpfs), two runs on one directory, a
changed config on resume, the error classes' layering, the analysis tools on bad input.

The tmpfs tests mount as root (CI runs as root) and skip only where mounting is refused.
"""
import ast
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_tool
from selectivity.train.checkpoint import (WriteError, atomic_torch_save, atomic_write_text,
                                    load_state, save_checkpoint)
from selectivity.errors import CheckpointError
from selectivity.train.runlock import RunLock

DEMO = ["-c", "configs/demo.yaml", "--progress", "false", "--eval-every-steps", "0"]
# A run of a few seconds: 4 steps of 64 synthetic 16-px images, ResNet-20.
TINY = ["--dataset", "synthetic", "--synthetic-size", "256", "--image-size", "16",
        "--batch-size", "64", "--eval-batch-size", "64", "--epochs", "1", "--progress", "false",
        "--log-every-steps", "1", "--eval-every-steps", "0", "--deterministic", "true"]


def one_error_line(proc, *needles):
    """The process failed with exit 2 and its stderr's last line is the one error line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert not any("Traceback" in line for line in lines), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def temp_files(root):
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files
            if f.startswith(".tmp")]


# ---- a real full disk ---------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A factory of tmpfs mounts of a given size, unmounted afterwards."""
    mounted = []

    def mount(size: str):
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not root'})")
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in mounted:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(directory):
    """Fill the filesystem of ``directory`` to the last byte."""
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 16, 1 << 9, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("size, kept", [
    ("1m", []),                 # the first checkpoint (1.1 MB) already does not fit
    ("2m", ["epoch_0.pt"]),     # epoch 0's fits; epoch 1's (2.3 MB: + momentum) does not
])
def test_training_on_a_full_disk(small_disk, size, kept):
    disk = small_disk(size)
    proc = run_tool("tools/train.py", *DEMO, "--epochs", "1", "--batch-size", "128",
                    "--out-dir", str(disk), "--name", "full", timeout=500)
    run = disk / "full"
    line = one_error_line(proc, "error: cannot write ", "No space left on device",
                          "(earlier files are intact)")
    assert str(run) in line
    assert temp_files(disk) == []
    ckpts = run / "checkpoints"
    assert sorted(f for f in os.listdir(ckpts) if f != "last.pt") == kept
    for name in kept + (["last.pt"] if kept else []):
        assert load_state(str(ckpts / name))["step"] == 0  # whole, and loads


def test_every_writer_on_a_full_disk(small_disk):
    """Each write path, on a filesystem with no byte left: the one WriteError, the earlier file
    untouched, no temp file. Also a metrics append on /dev/full (a device that is always full)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from selectivity.io import save_figure
    from selectivity.train.runlog import RunLog

    disk = small_disk("256k")
    old = disk / "old.txt"
    old.write_text("earlier")
    log = RunLog(str(disk / "run"), True, tensorboard=True, resume_step=None)
    fill(disk)
    writers = {
        "text": lambda: atomic_write_text(str(old), "new " * 100_000),
        "torch": lambda: atomic_torch_save(str(disk / "t.pt"), torch.zeros(100_000)),
        "checkpoint": lambda: save_checkpoint({"w": torch.zeros(100_000)}, str(disk / "ck"),
                                              "epoch_1.pt"),
        "figure": lambda: save_figure(plt.figure(), str(disk / "f.png")),
        "metrics": lambda: [log.write({"split": "train", "step": i, "loss": 1.0, "pad": "x" * 4096})
                            for i in range(100)],
        "tensorboard": lambda: [log.tb.add_histogram("h", torch.rand(10_000), i) or log.tb.flush()
                                for i in range(100)],
    }
    for name, write in writers.items():
        with pytest.raises(WriteError, match="cannot write .*: No space left on device") as e:
            write()
        assert "\n" not in str(e.value), name
    assert old.read_text() == "earlier"
    assert temp_files(disk) == []
    lines = (disk / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # no torn last line
    log.close(quiet=True)

    from selectivity.train.runlog import _LineAppender
    appender = _LineAppender("/dev/full")  # the append path alone, onto a device always full
    with pytest.raises(WriteError, match="cannot write /dev/full: No space left on device"):
        appender.append('{"a": 1}\n')
    appender.close()


def test_torch_save_failure_of_any_type_is_the_one_error(tmp_path, monkeypatch):
    """torch.save reports a failed write as a RuntimeError; any exception is the one line."""
    target = tmp_path / "x.pt"
    atomic_torch_save(str(target), {"a": 1})

    def broken(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(WriteError, match=r"cannot write .*x\.pt: RuntimeError: \[enforce fail"):
        atomic_torch_save(str(target), {"a": 2})
    monkeypatch.undo()
    assert load_state(str(target)) == {"a": 1} and temp_files(tmp_path) == []
    assert issubclass(WriteError, CheckpointError)


# ---- one run per directory ---------------------------------------------------------------------
def _hold_until_killed(run_dir, ready):
    RunLock(run_dir).acquire()
    ready.set()
    time.sleep(120)  # killed long before; no Event to wait on (a dead waiter would hang notify)


@pytest.mark.timeout(300)
def test_run_lock_dies_with_its_holder(tmp_path):
    """A holder killed with SIGKILL leaves the lock file but no lock."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_hold_until_killed, args=(str(tmp_path), ready))
    child.start()
    try:
        assert ready.wait(120)
        with pytest.raises(Exception, match=f"is in use by pid {child.pid}"):
            RunLock(str(tmp_path)).acquire()
        os.kill(child.pid, signal.SIGKILL)
        child.join(60)
        with RunLock(str(tmp_path)) as lock:
            assert lock.held
            assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    finally:
        if child.is_alive():
            child.kill()
            child.join(60)


@pytest.mark.timeout(300)
def test_a_second_run_on_a_locked_directory_is_refused(tmp_path):
    with RunLock(str(tmp_path / "busy")):
        proc = run_tool("tools/train.py", *TINY, "--out-dir", str(tmp_path), "--name", "busy",
                        timeout=240)
    one_error_line(proc, f"run directory {tmp_path / 'busy'} is in use by pid {os.getpid()}")
    assert os.listdir(tmp_path / "busy") == [".lock"]  # nothing written besides the lock


@pytest.mark.timeout(400)
def test_two_runs_started_together_on_one_directory(tmp_path):
    """Whatever the timing, one run finishes and the other is refused with one line; the
    survivor's metrics hold every evaluation exactly once."""
    cmd = [sys.executable, "tools/train.py", *TINY, "--out-dir", str(tmp_path), "--name", "r"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=360)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [r.stderr[-2000:] for r in results]
    loser = next(r for r in results if r.returncode == 2)
    line = one_error_line(loser)
    assert "is in use by pid" in line or "already holds a run" in line
    with open(tmp_path / "r" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records if r["split"] == "val"] == [0, 1]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]


# ---- resume with a changed config --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    run_tool("tools/train.py", *TINY, "--out-dir", str(out), "--name", "t", check=True)
    return out


def copy_run(tiny_run, tmp_path):
    import shutil
    shutil.copytree(tiny_run / "t", tmp_path / "t")
    return tmp_path


def config_changes(run):
    with open(run / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["split"] == "config_change"]


@pytest.mark.timeout(300)
def test_resume_refuses_a_changed_config_listing_old_and_new(tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path)
    before = (out / "t" / "config.yaml").read_text()
    proc = run_tool("tools/train.py", *TINY, "--out-dir", str(out), "--name", "t", "--resume",
                    "--lr", "0.05", "--seed", "7", "--batch-size", "32", timeout=240)
    line = one_error_line(proc, "error: --resume: the config differs", "lr 0.1 -> 0.05",
                          "seed 0 -> 7", "batch_size 64 -> 32", "--accept-config-change")
    assert "epochs" not in line
    assert (out / "t" / "config.yaml").read_text() == before  # not overwritten
    assert config_changes(out / "t") == []


@pytest.mark.timeout(300)
def test_resume_applies_and_records_resumable_and_accepted_changes(tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path)
    proc = run_tool("tools/train.py", *TINY, "--out-dir", str(out), "--name", "t", "--resume",
                    "--epochs", "2", "--lr", "0.05", "--schedule", "constant",
                    "--accept-config-change", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    change, = config_changes(out / "t")
    assert change["step"] == 4 and change["epoch"] == 1
    assert change["changes"] == {"epochs": {"old": 1, "new": 2}, "lr": {"old": 0.1, "new": 0.05},
                                 "schedule": {"old": "cosine", "new": "constant"}}
    assert change["accepted"] == ["lr", "schedule"]
    with open(out / "t" / "metrics.jsonl") as f:
        train = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["lr"] for r in train[4:]] == [0.05] * 4  # the new lr and schedule, not the stored
    state = load_state(str(out / "t" / "checkpoints" / "last.pt"))
    assert state["config"]["lr"] == 0.05 and state["epoch"] == 2


@pytest.mark.timeout(300)
@pytest.mark.parametrize("change, needle", [
    (["--model", "resnet32"], "does not fit model resnet32 with 10 classes"),
    (["--synthetic-classes", "4"], "does not fit model resnet20 with 4 classes: fc.weight"),
])
def test_resume_into_another_model_is_one_line_even_when_accepted(tiny_run, tmp_path, change,
                                                                  needle):
    out = copy_run(tiny_run, tmp_path)
    proc = run_tool("tools/train.py", *TINY, "--out-dir", str(out), "--name", "t", "--resume",
                    *change, "--accept-config-change", timeout=240)
    one_error_line(proc, needle)


# ---- Ctrl-C anywhere outside the loop, and the analysis tools on runs they do not expect --------
@pytest.mark.parametrize("args, needle", [
    (["/nonexistent/run"], "error: run directory not found: /nonexistent/run"),
    (["{empty}"], "error: no selectivity records in"),
    (["{corrupt}"], "error: cannot read selectivity record"),
    (["{foreign}"], "error: not a selectivity record"),
])
def test_plot_selectivity_bad_input_exits_2(tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt" / "selectivity").mkdir(parents=True)
    (tmp_path / "corrupt" / "selectivity" / "epoch_0.pt").write_bytes(b"not a torch file")
    (tmp_path / "foreign" / "selectivity").mkdir(parents=True)
    torch.save({"hello": 1}, tmp_path / "foreign" / "selectivity" / "epoch_0.pt")
    args = [a.format(empty=tmp_path / "empty", corrupt=tmp_path / "corrupt",
                     foreign=tmp_path / "foreign") for a in args]
    proc = run_tool("tools/plot_selectivity.py", *args, "--out", str(tmp_path / "figs"),
                    timeout=120)
    one_error_line(proc, needle)


# ---- error classes at the bottom of the layering -----------------------------------------------
def test_errors_module_imports_nothing_of_the_project():
    path = os.path.join(ROOT, "selectivity", "errors.py")
    tree = ast.parse(open(path).read())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + \
        [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("selectivity") or m == ""], imported
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]


def test_error_classes_are_one_set_importable_from_their_old_modules():
    import selectivity.train.checkpoint as checkpoint
    import selectivity.train.config as config
    import selectivity.pipelines.datasets as datasets
    import selectivity.errors as errors
    import selectivity.train.models as models
    import selectivity.train.trainer as trainer
    import selectivity.unit_ranking as unit_ranking
    assert config.ConfigError is errors.ConfigError
    assert datasets.DataError is errors.DataError
    assert models.ModelError is errors.ModelError
    assert checkpoint.CheckpointError is errors.CheckpointError
    assert trainer.TrainingError is errors.TrainingError
    assert unit_ranking.AblationError is errors.AblationError
    for cls in (errors.ConfigError, errors.DataError, errors.ModelError, errors.CheckpointError,
                errors.WriteError, errors.TrainingError, errors.AblationError):
        assert cls in errors.user_errors() or issubclass(cls, errors.user_errors())


@pytest.mark.timeout(300)
def test_a_bad_image_read_in_a_loader_worker_is_one_line(tmp_path):
    """torch re-raises a worker's error with the worker's traceback in the message; the tools
    print only the error itself."""
    from test_ffcv import make_image_folder
    root = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    bad = os.path.join(root, "train", "c0", "corrupt.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not a jpeg")
    proc = run_tool("tools/train.py", "--dataset", "imagefolder", "--data-dir", root,
                    "--image-size", "16", "--batch-size", "4", "--eval-batch-size", "4",
                    "--epochs", "1", "--workers", "1", "--progress", "false",
                    "--out-dir", str(tmp_path / "runs"), timeout=240)
    one_error_line(proc, f"error: cannot decode image {bad}: ")


def test_analysis_tools_skip_a_torn_checkpoint_with_a_warning(tmp_path):
    """selectivity/runs.py lists a run's checkpoints for ablate/cka/orientation: a torn file is
    skipped with a warning (as the trainer's resume does), not a traceback."""
    import warnings as w

    import torch

    from selectivity.train.runs import list_checkpoints
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    torch.save({"epoch": 1, "batch_in_epoch": 0, "steps_per_epoch": 5, "step": 5},
               ckpts / "epoch_1.pt")
    (ckpts / "epoch_2.pt").write_bytes(b"PK\x03\x04 torn")
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        found = list_checkpoints(str(tmp_path / "run"))
    assert [c.step for c in found] == [5]
    assert any("skipping unreadable checkpoint" in str(c.message) and "epoch_2.pt" in str(c.message)
               for c in caught)
