"""Does the FFCV bundle's extension work under a given CPython 3.12, from the bundle alone?
(selectivity.gpucheck.bundle builds the bundle; tests/test_gpu_bundle.py and the check's FFCV
stage call ``selftest``.)

The probe needs nothing but the standard library, so any CPython 3.12 can run it, also one
without torch or numpy: it loads the extension as CPython loads a module (its PyInit under
3.12) and through ctypes as FFCV does, calls both of its entry points — ``resize`` (OpenCV
INTER_AREA) and ``imdecode`` (libjpeg-turbo) — imports FFCV's pure-Python needs from the
bundle's site/, and lists every file that loading the extension mapped.
"""
from __future__ import annotations

import io
import json
import os
import subprocess

from selectivity.gpucheck import bundle

EXTENSION = "site/ffcv/_libffcv.cpython-312-x86_64-linux-gnu.so"
PROBE = r"""
import ctypes, importlib.util, json, sys
ext, jpeg_path, h, w = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def mapped():
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if line.rstrip().split()[-1].startswith("/")}
before = mapped()
spec = importlib.util.spec_from_file_location("ffcv._libffcv", ext)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
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
import assertpy, fastargs, terminaltables
pure = [m.__file__ for m in (assertpy, fastargs, terminaltables)]
pure.append(importlib.util.find_spec("pytorch_pfn_extras").origin)  # imports torch: found only
print(json.dumps({"loaded": loaded, "resized": list(dst), "decode_rc": rc,
                  "decoded": bytes(out).hex(), "pure": pure}))
"""
# 4×4 → 2×2 INTER_AREA averages each 2×2 quadrant, which is constant: exact.
RESIZED = [v + k for v in (10, 50, 90, 130) for k in range(3)]
# FFCV decodes with libjpeg-turbo's fast DCT, PIL with the accurate one: a few grey levels apart.
DECODE_MAX, DECODE_MEAN = 8, 1.5


def _gradient_jpeg(path: str):
    """A 24×40 JPEG with a different gradient in each channel (so a swap or a shift shows), and
    PIL's decoding of it."""
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:24, 0:40]
    img = np.stack([x * 6, y * 10, (x + y) * 4], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return np.asarray(Image.open(path).convert("RGB"))


def selftest(out: str, python: str, work: str, prefix: tuple = ()) -> tuple[list[str], dict]:
    """(problems, the probe's record): the probe run as ``*prefix, out/run, python`` (so with the
    bundle's paths alone: the caller's PYTHONPATH and LD_LIBRARY_PATH are dropped)."""
    import numpy as np
    ref = _gradient_jpeg(os.path.join(work, "probe.jpg"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_LIBRARY_PATH")}
    cmd = [*prefix, os.path.join(out, "run"), python, "-c", PROBE, os.path.join(out, EXTENSION),
           os.path.join(work, "probe.jpg"), str(ref.shape[0]), str(ref.shape[1])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return [f"the probe failed under {python} (exit {proc.returncode}): {last}"], {}
    res = json.loads(proc.stdout)
    problems = []
    if res["resized"] != RESIZED:
        problems.append(f"resize (OpenCV) gave {res['resized']}, not {RESIZED}")
    if res["decode_rc"] != 0:
        problems.append(f"imdecode (libjpeg-turbo) returned {res['decode_rc']}")
    diff = np.abs(np.frombuffer(bytes.fromhex(res["decoded"]), np.uint8).reshape(ref.shape).astype(int) - ref)
    res["decode_max_diff"], res["decode_mean_diff"] = int(diff.max()), float(diff.mean())
    if diff.max() > DECODE_MAX or diff.mean() >= DECODE_MEAN:
        problems.append(f"the decoded JPEG differs from PIL's by up to {diff.max()} (mean "
                        f"{diff.mean():.2f}); allowed {DECODE_MAX} ({DECODE_MEAN})")
    lib_dir, site = (os.path.realpath(os.path.join(out, d)) for d in ("lib", "site"))
    for f in res["loaded"]:
        base = os.path.basename(f)
        if f == os.path.join(out, EXTENSION) or base.startswith("_libffcv"):
            continue
        if os.path.realpath(os.path.dirname(f)) != lib_dir and not any(
                base == s or base.startswith(s + ".") for s in bundle.SYSTEM_LIBS):
            problems.append(f"loading the extension mapped {f}, from neither the bundle nor the system set")
    if not any(os.path.basename(f) == "libopencv_core.so.406" for f in res["loaded"]):
        problems.append("loading the extension did not map the bundle's libopencv_core.so.406")
    outside = [f for f in res["pure"] if not os.path.realpath(f).startswith(site + os.sep)]
    if len(res["pure"]) != 4 or outside:
        problems.append(f"FFCV's pure-Python packages were not all found in site/: {outside}")
    return problems, res
