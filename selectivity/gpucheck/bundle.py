"""The FFCV bundle: one ignored folder that makes FFCV loadable on the GPU machine, which has its
own CPython 3.12 with torch, numba, numpy and opencv-python-headless, but no FFCV, no
libjpeg-turbo and no network (docs/gpu.md, "The FFCV bundle").

    python -m selectivity.gpucheck.bundle [build] [--out gpu_bundle] [--python PY] [--force]
    python -m selectivity.gpucheck.bundle verify [--out gpu_bundle]

What `build` writes (`make gpu-bundle`):
    site/          FFCV built here for CPython 3.12 x86-64, plus the pure-Python packages it
                   declares that the GPU machine lacks, installed from wheels: PYTHONPATH
    lib/           the shared libraries FFCV's extension loads, directly or through another,
                   named by their SONAME and copied from this system (FFCV was linked against
                   them here), except SYSTEM_LIBS: LD_LIBRARY_PATH
    run            `gpu_bundle/run CMD ...` runs CMD with both paths set, for that command only
    MANIFEST.json  versions, the Debian package of each library, every file and its size, the
                   glibc / libstdc++ symbol versions the bundle needs
`build` does nothing when the manifest says this builder made the folder and every file is still
there at its size, so `make test` builds it once. `verify` checks a folder (here, or on the GPU
machine before the FFCV stage uses it): every file present at its size, the size limit, and every
dependency of every bundled ELF file resolved by the dynamic linker (ldd, with LD_LIBRARY_PATH
the bundle's lib/ alone) inside the bundle or to one of SYSTEM_LIBS.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

FFCV_VERSION = "1.0.2"
# FFCV's declared requirements that the GPU machine's image does not hold (the device tool's
# package list has tqdm, psutil, numba, opencv-python-headless, but not these); the versions are
# the ones the project's own environment runs FFCV with.
PURE_DEPS = {"terminaltables": "3.1.10", "fastargs": "1.2.0", "assertpy": "1.1",
             "pytorch-pfn-extras": "0.9.0"}
# Libraries left to the GPU machine: the C library's own, and what torch and the interpreter
# there cannot run without (libstdc++, libgcc_s; libz for the interpreter's zlib module, which
# pip there uses). Bundling these would put older copies in front of the system's for the whole
# process, torch included.
SYSTEM_LIBS = frozenset({
    "linux-vdso.so.1", "ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6", "libpthread.so.0",
    "libdl.so.2", "librt.so.1", "libstdc++.so.6", "libgcc_s.so.1", "libz.so.1"})
# The newest symbol versions the GPU machine's libc and libstdc++ are taken to provide. Inferred,
# not read there: its python3 is 3.12.3, Ubuntu 24.04's system Python (glibc 2.39, libstdc++ of
# GCC 14). On that machine `verify` reads the real answer: ldd reports a missing version.
TARGET_LEVELS = {"GLIBC": (2, 39), "GLIBCXX": (3, 4, 33), "CXXABI": (1, 3, 15)}
LIMIT_BYTES = 40 * 2**20
DEFAULT_OUT = "gpu_bundle"
RUN_SCRIPT = """#!/bin/sh
# gpu_bundle/run CMD ...: CMD with this bundle's FFCV importable (selectivity.gpucheck.bundle).
# The paths are set for CMD alone: the bundle's older libraries never reach other commands.
B=$(cd "$(dirname "$0")" && pwd)
PYTHONPATH="$B/site${PYTHONPATH:+:$PYTHONPATH}" \\
LD_LIBRARY_PATH="$B/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$@"
"""


class BundleError(Exception):
    """A prerequisite is missing or a step failed: one line naming it and the fix."""


def _run(cmd: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise BundleError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}): {tail[0]}")
    return proc.stdout


def _builder_hash() -> str:
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def find_python(given: str | None) -> str:
    """A CPython 3.12 for x86-64: `given`, else python3.12 on PATH, else pyenv's."""
    candidates = [given] if given else ["python3.12"]
    if not given:
        root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
        candidates += sorted(glob.glob(os.path.join(root, "versions", "3.12*", "bin", "python3.12")))
    probe = "import sys, platform; print(sys.implementation.name, *sys.version_info[:2], platform.machine())"
    for cand in candidates:
        try:
            out = subprocess.run([cand, "-c", probe], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.split() == ["cpython", "3", "12", "x86_64"]:
            return shutil.which(cand) or cand
    raise BundleError(f"no CPython 3.12 for x86-64 found (tried {', '.join(candidates)}): "
                      "pass --python PATH, or install one (pyenv install 3.12)")


def ldd(path: str, lib_dir: str | None) -> tuple[dict[str, str | None], list[str]]:
    """{needed name: resolved path or None} over the whole closure, and ldd's complaints (a
    missing library or symbol version), with LD_LIBRARY_PATH = lib_dir alone."""
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    if lib_dir:
        env["LD_LIBRARY_PATH"] = lib_dir
    proc = subprocess.run(["ldd", path], capture_output=True, text=True, env=env)
    deps: dict[str, str | None] = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*(\S+) => (not found|\S+)", line)
        if m:
            deps[m.group(1)] = None if m.group(2) == "not found" else m.group(2)
        elif line.strip().startswith("/"):  # the dynamic linker itself
            deps[os.path.basename(line.split()[0])] = line.split()[0]
    complaints = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if "not found" in ln]
    if proc.returncode != 0 and not deps:
        complaints.append(f"ldd {path} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return deps, complaints


def symbol_levels(path: str) -> dict[str, str]:
    """The newest GLIBC_ / GLIBCXX_ / CXXABI_ version the file needs (its version-needs section)."""
    out = _run(["readelf", "-V", "--wide", path])
    needs = out.split("Version needs section", 1)[-1] if "Version needs section" in out else ""
    best: dict[str, tuple] = {}
    for name, ver in re.findall(r"Name: (GLIBC|GLIBCXX|CXXABI)_([\d.]+)", needs):
        best[name] = max(best.get(name, ()), tuple(int(p) for p in ver.split(".")))
    return {k: ".".join(map(str, v)) for k, v in best.items()}


def _debian_package(path: str) -> dict:
    try:
        pkg = _run(["dpkg", "-S", path]).split(":", 1)[0]
        return {"package": pkg, "version": _run(["dpkg-query", "-W", "-f=${Version}", pkg])}
    except (BundleError, OSError):
        return {"package": None, "version": None}


def _elf_files(out: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out, "site", "ffcv", "_libffcv*.so"))
                  + glob.glob(os.path.join(out, "lib", "*")))


def _file_sizes(out: str) -> dict[str, int]:
    sizes = {}
    for d, _, names in os.walk(out):
        for n in names:
            p = os.path.join(d, n)
            sizes[os.path.relpath(p, out)] = os.path.getsize(p)
    sizes.pop("MANIFEST.json", None)
    return dict(sorted(sizes.items()))


def is_current(out: str) -> bool:
    try:
        with open(os.path.join(out, "MANIFEST.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return manifest.get("builder") == _builder_hash() and _file_sizes(out) == manifest.get("files")


def build(out: str, python: str | None = None, force: bool = False) -> dict:
    if not force and is_current(out):
        print(f"gpu-bundle: {out} is up to date (MANIFEST.json)")
        with open(os.path.join(out, "MANIFEST.json")) as f:
            return json.load(f)
    py = find_python(python)
    if subprocess.run(["pkg-config", "--exists", "opencv4", "libturbojpeg"]).returncode != 0:
        raise BundleError("FFCV builds against OpenCV and libjpeg-turbo, which pkg-config does not "
                          "find: apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev")
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    wheels, site, lib = (os.path.join(tmp, d) for d in ("wheels", "site", "lib"))
    os.makedirs(lib)
    # pkg-config names every OpenCV library; --as-needed keeps the two FFCV's code calls.
    # --no-cache-dir: a wheel cached from a build without it would be reused silently.
    env = dict(os.environ, LDFLAGS="-Wl,--as-needed", PIP_DISABLE_PIP_VERSION_CHECK="1")
    print(f"gpu-bundle: building ffcv {FFCV_VERSION} with {py} (downloads the sources)", flush=True)
    _run([py, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", "--no-binary", "ffcv",
          "-w", wheels, f"ffcv=={FFCV_VERSION}", *(f"{n}=={v}" for n, v in PURE_DEPS.items())], env)
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile", "--target",
          site, *sorted(glob.glob(os.path.join(wheels, "*.whl")))], env)
    shutil.rmtree(wheels)
    shutil.rmtree(os.path.join(site, "bin"), ignore_errors=True)
    ext = glob.glob(os.path.join(site, "ffcv", "_libffcv.cpython-312-*.so"))
    if len(ext) != 1:
        raise BundleError(f"the ffcv wheel holds no CPython 3.12 extension in {site}/ffcv")
    libraries = []
    deps, complaints = ldd(ext[0], None)
    if complaints:
        raise BundleError(f"FFCV's extension does not load here: {complaints[0]}")
    for name, path in sorted(deps.items()):
        if name in SYSTEM_LIBS:
            continue
        real = os.path.realpath(path)
        shutil.copy2(real, os.path.join(lib, name))
        libraries.append({"file": f"lib/{name}", "from": real, **_debian_package(real)})
    for f in [ext[0], *glob.glob(os.path.join(lib, "*"))]:
        _run(["strip", "--strip-unneeded", f])  # Debian's are stripped already; the wheel's is not
    with open(os.path.join(tmp, "run"), "w") as f:
        f.write(RUN_SCRIPT)
    os.chmod(os.path.join(tmp, "run"), 0o755)
    levels: dict[str, str] = {}
    for f in _elf_files(tmp):
        for k, v in symbol_levels(f).items():
            levels[k] = max(levels.get(k, v), v, key=lambda s: tuple(map(int, s.split("."))))
    files = _file_sizes(tmp)
    manifest = {
        "builder": _builder_hash(), "ffcv": FFCV_VERSION, "python_packages": PURE_DEPS,
        "python": _run([py, "-c", "import platform; print(platform.python_version())"]).strip(),
        "abi": "cpython-312-x86_64-linux-gnu", "libraries": libraries,
        "system_libraries": sorted(SYSTEM_LIBS), "symbol_levels": levels,
        "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "total_bytes": sum(files.values()), "files": files}
    if manifest["total_bytes"] > LIMIT_BYTES:
        raise BundleError(f"the bundle is {manifest['total_bytes']} bytes, over its limit of "
                          f"{LIMIT_BYTES} (40 MiB): see the largest files in {tmp}")
    with open(os.path.join(tmp, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return manifest


def verify(out: str) -> list[str]:
    """Every problem with the folder `out`, one line each; [] when it is whole and loadable."""
    try:
        with open(os.path.join(out, "MANIFEST.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        return [f"{out}: no readable MANIFEST.json ({e}): build it with `make gpu-bundle`"]
    problems = []
    files = _file_sizes(out)
    for rel, size in manifest["files"].items():
        if files.get(rel) != size:
            problems.append(f"{rel}: {'missing' if rel not in files else f'{files[rel]} bytes'}, "
                            f"the manifest says {size} bytes")
    if sum(files.values()) > LIMIT_BYTES:
        problems.append(f"{sum(files.values())} bytes, over the limit of {LIMIT_BYTES} (40 MiB)")
    lib_dir = os.path.abspath(os.path.join(out, "lib"))
    elfs = _elf_files(out)
    if not any(os.path.basename(f).startswith("_libffcv") for f in elfs):
        problems.append("no FFCV extension (site/ffcv/_libffcv*.so)")
    for f in elfs:
        deps, complaints = ldd(f, lib_dir)
        problems += [f"{os.path.relpath(f, out)}: {c}" for c in complaints]
        for name, path in deps.items():
            inside = path is not None and os.path.dirname(os.path.realpath(path)) == lib_dir
            if path is not None and not inside and name not in SYSTEM_LIBS:
                problems.append(f"{os.path.relpath(f, out)}: {name} resolves outside the bundle, to "
                                f"{path}, and is not among the system libraries the GPU machine has")
    for name, have in manifest.get("symbol_levels", {}).items():
        target = TARGET_LEVELS.get(name)
        if target and tuple(map(int, have.split("."))) > target:
            problems.append(f"needs {name}_{have}, newer than the GPU machine's "
                            f"{name}_{'.'.join(map(str, target))}: build on an older system")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m selectivity.gpucheck.bundle",
                                 description="Build or verify the FFCV bundle for the GPU machine.")
    ap.add_argument("action", nargs="?", choices=("build", "verify"), default="build")
    ap.add_argument("--out", default=DEFAULT_OUT, help="the bundle folder (default: gpu_bundle)")
    ap.add_argument("--python", help="CPython 3.12 to build with (default: python3.12, then pyenv's)")
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = ap.parse_args(argv)
    try:
        if args.action == "build":
            m = build(args.out, args.python, args.force)
            print(f"gpu-bundle: {args.out}: ffcv {m['ffcv']} for CPython {m['python']}, "
                  f"{len(m['libraries'])} libraries, {m['total_bytes'] / 2**20:.1f} MiB")
    except BundleError as e:
        print(f"gpu-bundle: {e}", file=sys.stderr)
        return 2
    problems = verify(args.out)
    for p in problems:
        print(f"gpu-bundle: {p}", file=sys.stderr)
    if not problems and args.action == "verify":
        print(f"gpu-bundle: {args.out} is whole and every dependency resolves")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
