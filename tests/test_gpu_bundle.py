"""The FFCV bundle for the GPU machine (selectivity.gpucheck.bundle, `make gpu-bundle`), checked on
the CPU: its contents and size, that every library FFCV's extension needs resolves inside it or to
the few system libraries the GPU machine has, and that the extension, loaded by a CPython 3.12
with LD_LIBRARY_PATH = the bundle's lib/ alone, resizes (OpenCV) and decodes a JPEG
(libjpeg-turbo) correctly, also with every other library of this system hidden.

The bundle is built once into the repo's ignored gpu_bundle/ (about 30 s and 3 MB of downloads:
FFCV's sources and four small wheels) and reused while the builder is unchanged.

Not proven here: `import ffcv` as a whole under 3.12, which needs torch, numpy and numba for 3.12
(the GPU machine has them; this machine's 3.12 has not). FFCV's Python code is the same 1.0.2 that
the project's own environment imports and tests; the GPU check's FFCV stage imports it there.
"""
import json
import os
import shutil
import subprocess

import pytest
from conftest import ROOT

from selectivity.gpucheck import bundle, bundle_probe

OUT = os.path.join(ROOT, bundle.DEFAULT_OUT)

@pytest.fixture(scope="module")
def built():
    """The bundle, built here when missing or made by another version of the builder."""
    if not bundle.is_current(OUT):
        assert bundle.main(["build", "--out", OUT]) == 0
    with open(os.path.join(OUT, "MANIFEST.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def python312():
    return bundle.find_python(None)


def test_contents_and_size(built):
    files = bundle._file_sizes(OUT)
    assert files == built["files"] and sum(files.values()) == built["total_bytes"] <= bundle.LIMIT_BYTES
    assert built["ffcv"] == "1.0.2" and built["python"].startswith("3.12.")
    assert "site/ffcv/_libffcv.cpython-312-x86_64-linux-gnu.so" in files
    for pkg in ("ffcv", "fastargs", "terminaltables", "assertpy", "pytorch_pfn_extras"):
        assert f"site/{pkg}/__init__.py" in files, pkg
    libs = {os.path.basename(lib["file"]) for lib in built["libraries"]}
    assert {"libopencv_core.so.406", "libopencv_imgproc.so.406", "libturbojpeg.so.0"} <= libs
    assert libs == {f[4:] for f in files if f.startswith("lib/")} and not libs & bundle.SYSTEM_LIBS
    assert all(lib["package"] for lib in built["libraries"])  # each traced to its Debian package
    with open(os.path.join(OUT, "lib", "libturbojpeg.so.0"), "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF" and head[4] == 2 and head[18] == 62  # ELF64, x86-64
    assert set(built["symbol_levels"]) >= {"GLIBC", "GLIBCXX"}


def test_every_dependency_resolves_in_the_bundle_or_the_system_set(built):
    assert bundle.verify(OUT) == []
    ext = os.path.join(OUT, "site", "ffcv", "_libffcv.cpython-312-x86_64-linux-gnu.so")
    lib_dir = os.path.abspath(os.path.join(OUT, "lib"))
    deps, complaints = bundle.ldd(ext, lib_dir)
    assert not complaints
    for name, path in deps.items():
        assert name in bundle.SYSTEM_LIBS or os.path.dirname(path) == lib_dir, name
    assert deps["libopencv_core.so.406"].startswith(os.path.abspath(OUT))


def test_verify_names_what_is_wrong(built, tmp_path):
    """A bundle with a library missing, or one resized, fails verify with a line for each."""
    copy = tmp_path / "b"
    shutil.copytree(OUT, copy)
    os.remove(copy / "lib" / "libturbojpeg.so.0")
    with open(copy / "lib" / "libtbb.so.12", "ab") as f:
        f.write(b"\0")
    problems = bundle.verify(str(copy))
    assert any(p.startswith("lib/libturbojpeg.so.0: missing") for p in problems)
    # Here the system has its own copy, so the linker finds that one: verify names it.
    assert any("libturbojpeg.so.0 resolves outside the bundle" in p for p in problems)
    assert any(p.startswith("lib/libtbb.so.12:") and "bytes" in p for p in problems)
    assert bundle.main(["verify", "--out", str(tmp_path / "none")]) == 1


def test_selftest_names_a_library_taken_from_outside(built, python312, tmp_path):
    """Without its libturbojpeg, the bundle's extension still loads here, from the system's copy:
    the self-test names that file (on the GPU machine, which has none, the load itself fails)."""
    copy = tmp_path / "b"
    shutil.copytree(OUT, copy)
    os.remove(copy / "lib" / "libturbojpeg.so.0")
    problems, _ = bundle_probe.selftest(str(copy), python312, str(tmp_path))
    assert len(problems) == 1 and "libturbojpeg.so.0" in problems[0] and "neither" in problems[0], problems


def test_extension_works_under_python312_from_the_bundle(built, python312, tmp_path):
    problems, res = bundle_probe.selftest(OUT, python312, str(tmp_path))
    assert problems == []
    assert res["resized"] == bundle_probe.RESIZED and res["decode_max_diff"] <= bundle_probe.DECODE_MAX


def test_extension_works_with_every_other_system_library_hidden(built, python312, tmp_path):
    """In a private mount namespace, the system's library folder is replaced by one holding only
    SYSTEM_LIBS and what the interpreter itself links (python3.12, its ctypes module): the
    extension must load and work from the bundle alone."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespaces here (unshare --mount): the ldd closure test stands alone")
    libdir = os.path.dirname(os.path.realpath("/lib64/ld-linux-x86-64.so.2"))
    ctypes_mod = subprocess.run([python312, "-c", "import _ctypes; print(_ctypes.__file__)"],
                                capture_output=True, text=True, check=True).stdout.strip()
    visible = tmp_path / "visible"
    visible.mkdir()
    for obj in (os.path.realpath(python312), ctypes_mod):
        for name, path in bundle.ldd(obj, None)[0].items():
            if path and os.path.dirname(os.path.realpath(path)) == libdir:
                shutil.copy2(os.path.realpath(path), visible / name)
    for name in bundle.SYSTEM_LIBS:
        if os.path.exists(os.path.join(libdir, name)):
            shutil.copy2(os.path.realpath(os.path.join(libdir, name)), visible / name)
    interp_only = {p.name for p in visible.iterdir()} - bundle.SYSTEM_LIBS  # e.g. libffi
    script = f'mount --bind "{visible}" "{libdir}" && exec "$@"'
    unshare = ("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh")
    problems, res = bundle_probe.selftest(OUT, python312, str(tmp_path), prefix=unshare)
    assert problems == []
    assert not {os.path.basename(f) for f in res["loaded"]} & interp_only
