"""The stages of the GPU check; tools/gpu_check.sh runs each under its own time limit (docs/gpu.md).

    python -m selectivity.gpucheck.stages STAGE --work DIR --out DIR --limit SECONDS [--dry-run]

STAGE: env (exits 2 with one line in $WORK/fatal when no GPU is usable), build, tests, train,
ops, report. Each stage writes $WORK/STAGE.json; `report` merges them into $OUT/gpu_check.json
and $OUT/gpu_check.md and sets the check's exit status:

    0  every stage ran, every correctness check passed (speed targets are verdicts, not failures)
    1  a correctness check failed: the build, a test, no CUDA test ran, accumulate's values, or
       the tracker's (its sums, the 16 blocks hooked, SI finite)
    3  correct so far, but a benchmark stage failed or ran out of time
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

from selectivity.gpucheck.common import ROOT, write_json

STAGES = ("build", "tests", "trainer", "ffcv", "train", "ops")
BENCHES = ("trainer", "ffcv", "train", "ops")
PER_TEST_TIMEOUT_S = 60
# Leave the stage time to write its record after a hung child is killed; the shell's `timeout`
# stays the backstop for a hang in the stage itself.
CHILD_MARGIN_S = 20


def die(work: str, line: str) -> None:
    """The one line the shell prints when the check cannot start (exit 2)."""
    with open(os.path.join(work, "fatal"), "w") as f:
        f.write(line + "\n")
    sys.exit(2)


def run_logged(cmd, log_path: str, timeout: float, env=None) -> int | None:
    """Run ``cmd`` with its output in ``log_path``; None when it ran past ``timeout`` (then killed,
    its whole process group: pytest's workers and ninja's compilers included)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
        finally:
            with open(log_path, errors="replace") as f:
                sys.stdout.write(f.read())  # into the check's log, which comes back from the device


def _tail(path: str, n: int = 30) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


# ----- env -----


def stage_env(a) -> int:
    import torch
    info = {"utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
            "executable": sys.executable, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "host": platform.node(), "cpus": os.cpu_count(), "dry_run": a.dry_run}
    if not a.dry_run:
        if not torch.cuda.is_available():
            die(a.work, f"gpu_check: no CUDA GPU visible to {sys.executable} (torch {torch.__version__}, "
                        f"CUDA {torch.version.cuda}); run it on the GPU machine, or pass --dry-run")
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": p.total_memory / 2**30,
                       "multiprocessors": p.multi_processor_count}
        smi = _run_quiet(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                          "--format=csv,noheader"])
        info["nvidia_smi"] = smi
    write_json(os.path.join(a.work, "env.json"), info)
    print(json.dumps(info, indent=1))
    return 0


def _run_quiet(cmd) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----- build -----


def find_cuda_home(environ=os.environ, which=shutil.which, torch_cuda: str | None = None,
                   prefix: str = "/usr/local"):
    """(toolkit root or None, how it was found, [roots tried]).

    A root must hold bin/nvcc AND include/cuda_runtime.h: the `nvcc` on PATH can be a wrapper
    script (it is on our CPU machines) whose directory is not a toolkit, and a root from it
    would fail the build late, not here. Order: $CUDA_HOME, $CUDA_PATH, PREFIX/cuda, the
    toolkit of nvcc's real path, then PREFIX/cuda-* (the one matching torch's CUDA first).
    """
    cands = [("$CUDA_HOME", environ.get("CUDA_HOME")), ("$CUDA_PATH", environ.get("CUDA_PATH")),
             (f"{prefix}/cuda", f"{prefix}/cuda")]
    nvcc = which("nvcc")
    if nvcc:
        cands.append(("nvcc on PATH", os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))))
    versioned = sorted(glob.glob(f"{prefix}/cuda-*"), key=lambda p: (not p.endswith(f"-{torch_cuda}"), p))
    cands += [(f"{prefix}/cuda-*", p) for p in versioned]
    tried = []
    for how, root in cands:
        if not root or root in tried:
            continue
        tried.append(root)
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root, how, tried
    return None, None, tried


def kernel_flags() -> list[str]:
    """'1'/'0': the module loads; accumulate and selectivity_index have CPU kernels; CUDA kernels."""
    import torch

    from selectivity import ops
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return [str(int(ops.has_extension()))] + [str(int(has(f"selectivity::{op}", key)))
                                              for key in ("CPU", "CUDA") for op in ("accumulate", "selectivity_index")]


def stage_build(a) -> int:
    import torch
    rec = {"status": "running"}
    path = os.path.join(a.work, "build.json")
    home, how, tried = find_cuda_home(torch_cuda=torch.version.cuda)
    rec.update(cuda_home=home, found_by=how, tried=tried)
    if home:
        out = _run_quiet([os.path.join(home, "bin", "nvcc"), "--version"]) or ""
        m = re.search(r"release (\d+\.\d+)", out)
        rec["nvcc"] = m.group(1) if m else out[-80:]
    if a.dry_run:
        # Compiling here would replace the in-place module that `make` built and everyone's
        # tests load (and take minutes on 2 cores): show the command, check what is loaded.
        rec["command"] = f"CUDA_HOME={home} TORCH_CUDA_ARCH_LIST=9.0 SELECTIVITY_REQUIRE_CUDA=1 " \
                         f"{sys.executable} setup.py build_ext --inplace"
        rec["compiled"] = False
    else:
        if not home:
            rec["status"] = f"failed: no CUDA toolkit (tried {', '.join(tried)}); set CUDA_HOME"
            write_json(path, rec)
            return 1
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or "{}.{}".format(*torch.cuda.get_device_capability(0))
        env = dict(os.environ, CUDA_HOME=home, TORCH_CUDA_ARCH_LIST=arch, SELECTIVITY_REQUIRE_CUDA="1",
                   MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
        rec.update(arch=arch, command=f"{sys.executable} setup.py build_ext --inplace", compiled=True)
        t0 = time.perf_counter()
        log = os.path.join(a.work, "build.log")
        rc = run_logged([sys.executable, "setup.py", "build_ext", "--inplace"], log, a.limit - CHILD_MARGIN_S, env)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        if rc != 0:
            rec["status"] = "timed out" if rc is None else f"failed (setup.py exit {rc})"
            rec["log_tail"] = _tail(log)
            write_json(path, rec)
            return 1
    if a.dry_run:  # nothing was built: this interpreter can look (saves a start of torch)
        flags = kernel_flags()
    else:  # a fresh interpreter: this one imported torch before the module existed
        probe = "from selectivity.gpucheck.stages import kernel_flags; print(*kernel_flags())"
        out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
        flags = out.stdout.split()
        if out.returncode != 0 or len(flags) != 5:
            rec["status"] = f"failed: the built module does not load: {out.stderr.strip()[-300:]}"
            write_json(path, rec)
            return 1
    rec["loads"] = flags[0] == "1"
    rec["cpu_kernels"] = flags[1:3] == ["1", "1"]
    rec["cuda_kernels"] = flags[3:5] == ["1", "1"]
    ok = rec["loads"] and rec["cpu_kernels"] and (a.dry_run or rec["cuda_kernels"])
    rec["status"] = "ok" if ok else "failed: the module loaded but its kernels did not all register"
    write_json(path, rec)
    print(json.dumps(rec, indent=1))
    return 0 if ok else 1


# ----- tests -----


# A test file with CUDA tests puts tensors on the GPU; a mere mention of "cuda" (a CLI test of
# `--device cuda` without a GPU, say) does not make one.
ON_GPU = re.compile(r"""device\s*=\s*["']cuda|\.cuda\(|torch\.device\(\s*["']cuda|\.to\(\s*["']cuda""")
# A skip for want of a GPU (or of the built module) is a failure where a GPU is: the test did not run.
NO_GPU_SKIP = re.compile(r"no cuda|cuda (is )?not available|(needs?|requires?) (a )?(cuda|gpu)|no gpu|not built",
                         re.IGNORECASE)


def cuda_test_files() -> list[str]:
    """The test files that run tensors on the GPU."""
    names = os.environ.get("GPU_CHECK_TEST_FILES")  # tests/test_gpu_check.py plants a failing test
    if names:
        return names.split()
    files = []
    for p in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        with open(p) as f:
            if ON_GPU.search(f.read()):
                files.append(os.path.relpath(p, ROOT))
    return files


def summarize_junit(path: str) -> dict:
    """Counts over every test case, and over the CUDA ones (a 'cuda' in the test's name)."""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "total")}
    cuda = dict(counts)
    failed, skip_reasons = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        tid = f"{case.get('classname', '')}::{case.get('name', '')}"
        kids = {c.tag for c in case}
        outcome = "failed" if kids & {"failure", "error"} else "skipped" if "skipped" in kids else "passed"
        for c in (counts, cuda) if "cuda" in case.get("name", "").lower() else (counts,):
            c[outcome] += 1
            c["total"] += 1
        if outcome == "failed":
            failed.append(tid)
        elif outcome == "skipped":
            msg = (case.find("skipped").get("message") or "")[:120]
            skip_reasons[msg] = skip_reasons.get(msg, 0) + 1
    no_gpu = sum(n for msg, n in skip_reasons.items() if NO_GPU_SKIP.search(msg))
    return {"all": counts, "cuda": cuda, "skipped_for_no_gpu": no_gpu, "failed_ids": failed[:30],
            "skip_reasons": skip_reasons}


def stage_tests(a) -> int:
    import importlib.util
    files = cuda_test_files()
    junit = os.path.join(a.out, "junit.xml")
    # Real mode: all of test_ops.py too: the CPU kernels under that machine's torch are news as well.
    keyword = "cuda" if a.dry_run else "cuda or test_ops.py"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "-k", keyword, *files]
    has_timeout = importlib.util.find_spec("pytest_timeout") is not None
    if has_timeout:
        cmd.append(f"--timeout={PER_TEST_TIMEOUT_S}")
    env = dict(os.environ, SELECTIVITY_EXPECT_EXTENSION="0" if a.dry_run else "1")
    rec = {"status": "running", "files": files, "keyword": keyword,
           "per_test_timeout_s": PER_TEST_TIMEOUT_S if has_timeout else None}
    t0 = time.perf_counter()
    rc = run_logged(cmd, os.path.join(a.work, "pytest.log"), a.limit - CHILD_MARGIN_S, env)
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    rec["pytest_exit"] = rc
    if os.path.isfile(junit):
        rec.update(summarize_junit(junit))
    c = rec.get("all")
    if rc is None:
        rec["status"] = "timed out"
    elif c is None or c["total"] == 0:
        rec["status"] = f"failed: no test ran (pytest exit {rc})"
    elif c["failed"]:
        rec["status"] = f"failed: {c['failed']} test(s)"
    elif not a.dry_run and rec["skipped_for_no_gpu"]:
        rec["status"] = f"failed: {rec['skipped_for_no_gpu']} tests skipped for want of a GPU or of the module"
    elif not a.dry_run and rec["cuda"]["passed"] == 0:
        rec["status"] = "failed: no CUDA test ran"
    else:
        rec["status"] = "ok"
    write_json(os.path.join(a.work, "tests.json"), rec)
    print(json.dumps(rec, indent=1))
    return 0 if rec["status"] == "ok" else 1


# ----- the benchmarks -----


def stage_bench(a, name: str) -> int:
    import importlib

    from selectivity.gpucheck.common import Bench
    module = importlib.import_module(f"selectivity.gpucheck.bench_{name}")
    return module.run(Bench(a.dry_run), os.path.join(a.work, f"{name}.json"))


# ----- report -----


def load_stage(work: str, name: str) -> dict:
    """The stage's record, with what the shell saw of it (exit status, seconds)."""
    rec = {}
    p = os.path.join(work, f"{name}.json")
    if os.path.isfile(p):
        with open(p) as f:
            rec = json.load(f)
    rc_path = os.path.join(work, f"{name}.rc")
    if not os.path.isfile(rc_path):
        rec["status"] = "not run"
        return rec
    with open(rc_path) as f:
        rc = int(f.read().strip() or -1)
    with open(os.path.join(work, f"{name}.sec")) as f:
        rec["stage_seconds"] = int(f.read().strip() or 0)
    rec["exit"] = rc
    if rc in (124, 137):
        rec["status"] = f"timed out after {rec['stage_seconds']} s (results so far kept)"
    elif rc != 0 and rec.get("status", "running") in ("ok", "running"):
        rec["status"] = f"crashed (exit {rc})"
    rec.setdefault("status", f"no record (exit {rc})")
    return rec


def stage_report(a) -> int:
    from selectivity.gpucheck.report import verdicts, write_markdown
    with open(os.path.join(a.work, "env.json")) as f:
        env = json.load(f)
    stages = {name: load_stage(a.work, name) for name in STAGES}
    checks = verdicts(stages, a.dry_run)
    report = {"env": env, "dry_run": a.dry_run, "stages": stages, "verdicts": checks}
    correctness_failed = any(v["correctness"] and v["pass"] is False for v in checks)
    bench_failed = any(stages[s]["status"] not in ("ok", "not run") for s in BENCHES)
    report["exit"] = 1 if correctness_failed else 3 if bench_failed else 0
    write_json(os.path.join(a.out, "gpu_check.json"), report)
    write_markdown(report, os.path.join(a.out, "gpu_check.md"))
    return report["exit"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=("env", *STAGES, "report"))
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=float, default=300, help="the stage's time limit (seconds)")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    if a.stage in BENCHES:
        return stage_bench(a, a.stage)
    return globals()[f"stage_{a.stage}"](a)


if __name__ == "__main__":
    sys.exit(main())
