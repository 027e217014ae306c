"""tools/gpu_check.sh, the prepared GPU check (docs/gpu.md): its dry run end to end on the CPU,
its refusals (one line, exit 2), its exit status when a CUDA test fails, and the toolkit finder.

The dry run is the only place the check's code runs before a GPU is lent, so the end-to-end test
reads every part of the report a real run would fill in.
"""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from selectivity.gpucheck import stages as gpu_check

SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")


def run_check(*args, out, env=None, timeout=1200):  # generous: 2 shared cores can be slow
    full = dict(os.environ, PYTHON=sys.executable, OUT=str(out), OMP_NUM_THREADS="1")
    full.update(env or {})
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry")
    return run_check("--dry-run", out=out), out


def test_dry_run_end_to_end(dry_run):
    proc, tmp_path = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.json", "gpu_check.log", "gpu_check.md", "junit.xml"]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    st = report["stages"]
    assert report["dry_run"] and report["exit"] == 0
    assert {n: s["status"] for n, s in st.items()} == dict.fromkeys(
        ("build", "tests", "trainer", "ffcv", "train", "ops"), "ok")
    assert st["build"]["loads"] and st["build"]["cpu_kernels"] and not st["build"]["compiled"]
    # The CUDA tests were found, and skipped for want of a GPU (the dry run hides every GPU).
    cuda = st["tests"]["cuda"]
    assert "tests/test_ops.py" in st["tests"]["files"]
    assert cuda["total"] > 0 and cuda["failed"] == 0 and st["tests"]["skipped_for_no_gpu"] == cuda["skipped"] > 0
    for amp in ("bf16", "fp16"):
        res = st["train"]["amps"][amp]
        assert res["status"] == "ok" and res["tracked_layers"] == 16 and res["tracked_units"] == 15104
        assert res["si_finite"] and 0 <= res["si_mean"] <= 1
        assert res["tracker_vs_reference"]["pass"] and res["tracker_vs_reference"]["layers"] == 16
        for v in ("off", "on", "si"):
            assert len(res["variants"][v]["step_ms"]) == st["train"]["config"]["rounds"]
            assert res["variants"][v]["images_per_s"] > 0
        assert res["ratio_on"]["value"] > 0 and res["ratio_si"]["value"] > 0
    for amp in ("fp16", "bf16"):  # the trainer itself, beside the bare loop
        res = st["trainer"]["amps"][amp]
        assert res["status"] == "ok" and set(res["precision"].values()) == {amp}
        for v in ("bare", "off", "on", "si"):
            assert len(res["variants"][v]["round_ms"]) == st["trainer"]["config"]["rounds"]
            assert res["variants"][v]["images_per_s"] > 0
        assert set(res["ratios"]) == {"trainer ÷ bare loop", "tracking on ÷ off", "SI every step ÷ off"}
        assert res["evaluation"]["bn_mode"] == "recalibrate" and 0 <= res["evaluation"]["acc1"] <= 1
        assert 0 <= res["evaluation"]["si_mean"] <= 1 and res["checkpoint"]["mib"] > 1
        assert res["profile"]["top"] and res["profile"]["top"][0]["ms"] > 0
    ff = st["ffcv"]  # the bundle checked with a Python 3.12; the pipeline with this one's FFCV
    assert ff["bundle"]["problems"] == [] and ff["bundle"]["libraries_loaded"] > 3
    assert ff["images"]["images"] == ff["config"]["train_images"] + ff["config"]["val_images"]
    assert ff["loader"]["images_per_s"] > 0 and ff["train"]["images_per_s"] > 0
    assert ff["train"]["precision"] == "fp16"
    cases = st["ops"]["cases"]
    assert len(cases) == 4 * 3 * 2 and all(c["correct"]["pass"] for c in cases)
    assert {(c["dtype"], c["layout"]) for c in cases} == {(d, layout) for d in ("fp16", "bf16", "fp32")
                                                          for layout in ("nchw", "channels_last")}
    assert all(c["accumulate_ms"] > 0 and c["sum_ms"] > 0 for c in cases)
    names = [v["name"] for v in report["verdicts"]]
    assert "every CUDA test passes" in names and "accumulate ÷ x.sum(), time, worst case" in names
    md = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "| ops | ok |" in md and "tracking on ÷ off (fp16)" in md
    assert "trainer ÷ bare loop (trainer, bf16)" in md and "| fp16 | evaluation, BN recalibrate |" in md
    assert "Profile of one bare bf16 step" in md and "| FFCV loader alone" in md
    assert "FFCV's extension works from it |" in md and "Data-loading bound:" in md
    assert md in proc.stdout  # the report is what the device tool's output tail shows


def test_report_of_a_real_run_renders(dry_run, tmp_path):
    """The report's GPU-only fields (machine, arch, peak memory, GradScaler scales), fed from the dry
    run's records made to look like a real run's: a report that crashed there would lose the run."""
    report = json.loads((dry_run[1] / "gpu_check.json").read_text())
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    env = dict(report["env"], dry_run=False, nvidia_smi="580.159.04, 1980 MHz, 3201 MHz",
               gpu={"name": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8, "multiprocessors": 132})
    (work / "env.json").write_text(json.dumps(env))
    stages = report["stages"]
    stages["build"].update(arch="9.0", compiled=True, cuda_kernels=True)
    stages["tests"]["cuda"]["passed"], stages["tests"]["cuda"]["skipped"] = stages["tests"]["cuda"]["skipped"], 0
    for amp in ("bf16", "fp16"):
        stages["train"]["amps"][amp]["peak_memory_gib"] = 31.5
    stages["train"]["amps"]["fp16"]["grad_scale"] = {"off": 1024.0, "tracked": 512.0}
    for v in ("bare", "off", "on", "si"):
        stages["trainer"]["amps"]["bf16"]["variants"][v]["peak_memory_gib"] = 27.25
    for name, rec in stages.items():
        (work / f"{name}.json").write_text(json.dumps(rec))
        (work / f"{name}.rc").write_text("0")
        (work / f"{name}.sec").write_text("7")
    rc = gpu_check.main(["report", "--work", str(work), "--out", str(out)])
    md = (out / "gpu_check.md").read_text()
    assert rc == 0 and "DRY RUN" not in md and "NVIDIA H200 (sm 9.0, 140 GiB, 132 SMs" in md
    assert "built for sm_90 with CUDA kernels registered | PASS |" in md
    assert "| fp16 | final GradScaler scale | off 1024, tracked 512" in md and "31.5 GiB" in md
    assert "| bf16 | si |" in md and "| 27.2 |" in md
    assert "(dry run)" not in md


def test_real_mode_without_a_gpu_stops_at_once_with_one_line(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too.
    proc = run_check(out=tmp_path / "out", env={"CUDA_VISIBLE_DEVICES": ""}, timeout=180)
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--dry-run" in lines[0], lines
    assert not (tmp_path / "out").exists()  # stopped before building or writing anything


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--only", "tests,bogus"], "unknown stage 'bogus'"),
    (["--only"], "--only needs a list"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, args, message):
    proc = run_check(*args, out=tmp_path, timeout=120)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], lines


def test_missing_interpreter_is_one_line_and_exit_2(tmp_path):
    proc = run_check("--dry-run", out=tmp_path, env={"PYTHON": str(tmp_path / "no-python")}, timeout=120)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no interpreter" in lines[0], lines


def test_a_failing_cuda_test_fails_the_check(tmp_path, tmp_path_factory):
    # Not under tmp_path: its name holds "cuda", which pytest's -k would match on every test.
    planted = tmp_path_factory.mktemp("planted") / "test_planted.py"
    planted.write_text("def test_cuda_passes():\n    pass\n\n\ndef test_cuda_fails():\n    assert False\n\n\n"
                       "def test_not_selected():\n    assert False\n")
    out = tmp_path / "out"
    proc = run_check("--dry-run", "--only", "tests", out=out, env={"GPU_CHECK_TEST_FILES": str(planted)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    tests = report["stages"]["tests"]
    assert tests["cuda"] == {"passed": 1, "failed": 1, "skipped": 0, "total": 2}  # -k cuda: 2 of 3
    # junit names a file outside the rootdir by its path: only the tail is the test's own.
    assert len(tests["failed_ids"]) == 1
    assert tests["failed_ids"][0].endswith("test_planted::test_cuda_fails")
    assert report["stages"]["train"]["status"] == report["stages"]["ffcv"]["status"] == "not run"
    assert "| every CUDA test passes |" in proc.stdout and "| FAIL |" in proc.stdout


def test_a_stage_past_the_checks_total_time_is_out_of_time(tmp_path):
    """GPU_CHECK_TOTAL bounds the whole check: a stage with under 10 s of it left does not start and
    counts as timed out (the dry run multiplies the total by 4: 28 s, 20 kept for the report)."""
    proc = run_check("--dry-run", "--only", "ops", out=tmp_path, env={"GPU_CHECK_TOTAL": "7"}, timeout=300)
    assert "ops: not run, the check's 28 s are spent" in proc.stdout, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["stages"]["ops"]["status"].startswith("timed out") and proc.returncode == report["exit"] == 3


def test_junit_counts_and_skips_for_want_of_a_gpu(tmp_path):
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_ops" name="test_cuda_a[fp16]"/>'
        '<testcase classname="tests.test_ops" name="test_cuda_b"><skipped message="no CUDA device"/></testcase>'
        '<testcase classname="tests.test_ops" name="test_cuda_c"><error message="boom"/></testcase>'
        '<testcase classname="tests.test_x" name="test_d"><failure message="no"/></testcase>'
        '<testcase classname="tests.test_x" name="test_e[cpu]"><skipped message="a GPU is visible"/></testcase>'
        '<testcase classname="tests.test_x" name="test_f"><skipped message="selectivity._C is not built"/></testcase>'
        '</testsuite></testsuites>')
    s = gpu_check.summarize_junit(str(tmp_path / "j.xml"))
    assert s["all"] == {"passed": 1, "failed": 2, "skipped": 3, "total": 6}
    assert s["cuda"] == {"passed": 1, "failed": 1, "skipped": 1, "total": 3}
    assert s["failed_ids"] == ["tests.test_ops::test_cuda_c", "tests.test_x::test_d"]
    assert s["skipped_for_no_gpu"] == 2  # not the test that skips because a GPU is visible


@pytest.mark.parametrize("line, on_gpu", [
    ('x = torch.rand(3, device="cuda")', True), ("y = x.cuda()", True), ("torch.device('cuda:0')", True),
    ('m.to("cuda")', True), ('tool("train.py", "--device", "cuda")', False), ("# cuda is optional", False),
])
def test_which_test_files_count_as_cuda_tests(line, on_gpu):
    assert bool(gpu_check.ON_GPU.search(line)) is on_gpu


def _toolkit(root):
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_find_cuda_home_order_and_wrappers(tmp_path):
    kit = _toolkit(tmp_path / "kit")
    wrapper_dir = tmp_path / "wrappers" / "bin"
    wrapper_dir.mkdir(parents=True)
    (wrapper_dir / "nvcc").write_text("#!/bin/sh\nexec /elsewhere/nvcc \"$@\"\n")
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    (link_dir / "nvcc").symlink_to(kit / "bin" / "nvcc")
    prefix = tmp_path / "usr_local"  # stands for /usr/local, so this machine's toolkit plays no part
    prefix.mkdir()

    def find(env, nvcc, torch_cuda=None):
        return gpu_check.find_cuda_home(env, which=lambda _: nvcc and str(nvcc), torch_cuda=torch_cuda,
                                        prefix=str(prefix))[:2]

    assert find({"CUDA_HOME": str(kit)}, wrapper_dir / "nvcc") == (str(kit), "$CUDA_HOME")
    # A $CUDA_HOME with no toolkit in it is passed over; nvcc's real path leads to the toolkit.
    assert find({"CUDA_HOME": str(tmp_path / "empty")}, link_dir / "nvcc") == (str(kit), "nvcc on PATH")
    # A wrapper script's directory is no toolkit; then nothing is found, and what was tried is said.
    root, how, tried = gpu_check.find_cuda_home({}, which=lambda _: str(wrapper_dir / "nvcc"), prefix=str(prefix))
    assert root is None and str(tmp_path / "wrappers") in tried
    # Versioned toolkits: the one matching torch's CUDA first, whatever the sort order says.
    _toolkit(prefix / "cuda-12.8"), _toolkit(prefix / "cuda-13.0")
    assert find({}, None, torch_cuda="13.0") == (str(prefix / "cuda-13.0"), f"{prefix}/cuda-*")
    assert find({}, None, torch_cuda="12.8") == (str(prefix / "cuda-12.8"), f"{prefix}/cuda-*")
    _toolkit(prefix / "cuda")
    assert find({}, None, torch_cuda="12.8") == (str(prefix / "cuda"), f"{prefix}/cuda")


def test_host_sync_probe_dry_run_times_every_loop(tmp_path):
    """selectivity.gpucheck.probe_sync (docs/gpu.md) on the CPU at tiny sizes, every GPU hidden: each of
    its four loops is timed with tracking off and on, and the tracker's hooks ran."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "selectivity.gpucheck.probe_sync",
                           "--dry-run", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    loops = json.loads((tmp_path / "gpu_probe_sync.json").read_text())["loops"]
    assert list(loops) == ["bf16", "bf16+sync", "fp16+scaler", "fp16"]
    for r in loops.values():
        assert r["ms_off"] > 0 and r["ms_on"] > 0 and r["hook_host_ms_per_step"] > 0
    assert "| fp16+scaler |" in (tmp_path / "gpu_probe_sync.md").read_text()
