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
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from selectivity.gpucheck import bundle

OUT = os.path.join(ROOT, bundle.DEFAULT_OUT)

# Run by CPython 3.12 (stdlib only): load the extension as CPython loads it and through ctypes as
# FFCV does, call both of its entry points, and list the files that loading it mapped.
PROBE = r"""
import ctypes, importlib.util, json, sys
ext, jpeg_path, h, w = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def mapped():
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if line.rstrip().split()[-1].startswith("/")}
before = mapped()
spec = importlib.util.spec_from_file_location("ffcv._libffcv", ext)
spec.loader.exec_module(importlib.util.module_from_spec(spec))  # PyInit__libffcv under 3.12
lib = ctypes.CDLL(ext)
loaded = sorted(mapped() - before)
src = (ctypes.c_uint8 * 48)(*[(10 if r < 2 else 90) + (0 if c < 2 else 40) + k
                              for r in range(4) for c in range(4) for k in range(3)])
dst = (ctypes.c_uint8 * 12)()
lib.resize.argtypes = 11 * [ctypes.c_int64]
lib.resize(0, ctypes.addressof(src), 4, 4, 0, 4, 0, 4, ctypes.addressof(dst), 2, 2)
data = open(jpeg_path, "rb").read()
out = (ctypes.c_uint8 * (h * w * 3))()
u32, ptr = ctypes.c_uint32, ctypes.c_void_p
lib.imdecode.argtypes = [ptr, ctypes.c_uint64, u32, u32, ptr] + 6 * [u32] + 2 * [ctypes.c_bool]
rc = lib.imdecode(data, len(data), h, w, out, h, w, 0, 0, 1, 1, False, False)
import assertpy, fastargs, terminaltables  # FFCV's pure-Python needs, from the bundle's site/
pure = [m.__file__ for m in (assertpy, fastargs, terminaltables)]
ppe = importlib.util.find_spec("pytorch_pfn_extras").origin  # it imports torch: found, not imported
print(json.dumps({"loaded": loaded, "resized": list(dst), "decode_rc": rc, "decoded": bytes(out).hex(),
                  "pure": pure + [ppe]}))
"""


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


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory):
    """A 24×40 JPEG with gradients in every channel, and PIL's decoding of it."""
    y, x = np.mgrid[0:24, 0:40]
    img = np.stack([x * 6, y * 10, (x + y) * 4], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    path = tmp_path_factory.mktemp("jpeg") / "g.jpg"
    path.write_bytes(buf.getvalue())
    return str(path), np.asarray(Image.open(path).convert("RGB"))


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


def _probe(cmd, jpeg):
    """PROBE run by `cmd` (ending in gpu_bundle/run python3.12, which sets both paths)."""
    path, ref = jpeg
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_LIBRARY_PATH")}
    ext = os.path.join(OUT, "site", "ffcv", "_libffcv.cpython-312-x86_64-linux-gnu.so")
    proc = subprocess.run([*cmd, "-c", PROBE, ext, path, str(ref.shape[0]), str(ref.shape[1])],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _check_probe(res, jpeg):
    # INTER_AREA 4×4 → 2×2 averages each 2×2 quadrant, which is constant: exact.
    assert res["resized"] == [v + k for v in (10, 50, 90, 130) for k in range(3)]
    assert res["decode_rc"] == 0
    decoded = np.frombuffer(bytes.fromhex(res["decoded"]), np.uint8).reshape(jpeg[1].shape)
    # libjpeg-turbo's fast DCT (FFCV's flag) against PIL's accurate one: a few grey levels.
    diff = np.abs(decoded.astype(int) - jpeg[1])
    assert diff.max() <= 8 and diff.mean() < 1.5, (diff.max(), diff.mean())
    real = os.path.realpath(os.path.join(OUT, "lib"))
    for f in res["loaded"]:
        if os.path.basename(f).startswith("_libffcv"):
            continue
        base = os.path.basename(f)
        assert os.path.realpath(os.path.dirname(f)) == real or any(base == s or base.startswith(s + ".")
                                                 for s in bundle.SYSTEM_LIBS), f
    assert any(os.path.basename(f) == "libopencv_core.so.406" for f in res["loaded"])
    site = os.path.realpath(os.path.join(OUT, "site"))
    assert len(res["pure"]) == 4 and all(os.path.realpath(f).startswith(site + os.sep) for f in res["pure"])


def test_extension_works_under_python312_from_the_bundle(built, python312, jpeg):
    _check_probe(_probe([os.path.join(OUT, "run"), python312], jpeg), jpeg)


def test_extension_works_with_every_other_system_library_hidden(built, python312, jpeg, tmp_path):
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
    unshare = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    res = _probe([*unshare, os.path.join(OUT, "run"), python312], jpeg)
    _check_probe(res, jpeg)
    assert not {os.path.basename(f) for f in res["loaded"]} & interp_only
