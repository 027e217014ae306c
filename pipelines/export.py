"""What the ffcv and dali backends share: the data cache, its keys and locks, image checks, and the
one-time export of in-memory datasets to an ImageFolder tree of PNG files.

The cache (``cache_dir`` in the config; default ``$SELECTIVITY_CACHE``, else
``$XDG_CACHE_HOME/selectivity``, else ``~/.cache/selectivity``) holds files *derived* from a
dataset: ``.beton`` files for ffcv and PNG trees for dali. It lives outside ``runs/`` on purpose:
what is cached depends only on the dataset, not on a run, so every run (and every ``--out-dir``)
reuses it, and ``make clean`` (which removes ``runs/``) does not throw away a conversion that took
minutes. Each entry is named ``<dataset>-<split>-<size>-<key>``, where ``key`` hashes everything the
entry depends on (the dataset's parameters, its files' names, sizes and modification times, the
write settings, a format version), so a changed dataset is rebuilt and never silently reused.
Entries are built under an exclusive file lock (every DDP rank or concurrent run waits for the
one that builds) into a temporary name, then renamed into place.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from selectivity.pipelines.datasets import DataError, ImageFolderDataset

CACHE_FORMAT = 1  # bump when what is written to the cache changes
MAX_SIDE = 65535  # .beton stores widths and heights as uint16


def default_cache_dir() -> str:
    if os.environ.get("SELECTIVITY_CACHE"):
        return os.environ["SELECTIVITY_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "selectivity")


def resolve_cache_dir(spec) -> str:
    return os.path.abspath(os.path.expanduser(getattr(spec, "cache_dir", "") or
                                              default_cache_dir()))


def _files_digest(paths) -> str:
    """A digest of the files' names, sizes and modification times (one stat per file)."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def dataset_fingerprint(spec, split: str, dataset) -> dict:
    """Everything a derived file depends on, as a JSON-able dict."""
    fp = {"format": CACHE_FORMAT, "dataset": spec.dataset, "split": split,
          "image_size": spec.image_size, "n": len(dataset)}
    if spec.dataset == "synthetic":
        fp.update(classes=spec.synthetic_classes, size=spec.synthetic_size, seed=spec.seed)
    if isinstance(dataset, ImageFolderDataset):
        fp["files"] = _files_digest(p for p, _ in dataset.samples)
        fp["classes"] = dataset.classes
    elif spec.dataset == "cifar10":
        root = os.path.abspath(spec.data_dir)
        names = [os.path.join(d, f) for d in (root, os.path.join(root, "cifar-10-batches-py"))
                 if os.path.isdir(d) for f in sorted(os.listdir(d)) if "batch" in f]
        fp["files"] = _files_digest(names)
    return fp


def cache_name(spec, split: str, dataset, extra: dict) -> str:
    """``<dataset>-<split>-<size>-<key>``: the key hashes the fingerprint plus ``extra``."""
    blob = json.dumps([dataset_fingerprint(spec, split, dataset), extra], sort_keys=True,
                      default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return f"{spec.dataset}-{split}-{spec.image_size}-{key}"


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive lock held on ``path + '.lock'`` (blocks until the holder releases it)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- image checks ------------------------------------------------------------------------------
def _check_one(dataset, i: int, max_resolution: int | None):
    """(None, (w, h)) if image i decodes fully and fits a .beton; else (the reason, None)."""
    try:
        pil = dataset.load(i)  # full decode: truncated files fail here, not in a writer worker
        w, h = pil.size
    except DataError as e:
        return str(e).split(": ", 1)[-1].split("; remove")[0], None
    except Exception as e:  # noqa: BLE001 — any failure to read is a bad image
        return f"{type(e).__name__}: {e}", None
    if w < 1 or h < 1:
        return f"empty image ({w}x{h})", None
    if max(w, h) > MAX_SIDE and not (max_resolution and max_resolution <= MAX_SIDE):
        return f"{w}x{h} exceeds {MAX_SIDE} px per side; set a max resolution", None
    return None, (w, h)


def check_images(dataset, workers: int = 1, progress: bool = True,
                 max_resolution: int | None = None):
    """Decode every image once in this process: (good indices, [(path, reason), ...], sizes).

    ``sizes`` is an int array [n, 2] of (width, height), -1 for bad images. In-memory datasets
    (digits, synthetic, cifar10) are valid by construction: not decoded, ``sizes`` is None.
    """
    n = len(dataset)
    if not isinstance(dataset, ImageFolderDataset):
        return np.arange(n), [], None
    from tqdm import tqdm
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL releases the GIL while decoding
        results = list(tqdm(pool.map(lambda i: _check_one(dataset, i, max_resolution), range(n)),
                            total=n, desc="checking images", unit="img",
                            disable=None if progress else True, leave=False))
    bad = [(dataset.samples[i][0], r) for i, (r, _) in enumerate(results) if r is not None]
    good = np.array([i for i, (r, _) in enumerate(results) if r is None], dtype=np.int64)
    sizes = np.array([wh if wh else (-1, -1) for _, wh in results], dtype=np.int64).reshape(-1, 2)
    return good, bad, sizes


# ---- PNG export (dali over in-memory datasets) -------------------------------------------------
def image_files(spec, split: str, dataset, cache_dir: str) -> tuple[list, list]:
    """(paths, labels) of encoded image files holding ``dataset``'s images, in dataset order.

    An ImageFolder is its own files. In-memory datasets are exported once, losslessly, to
    ``<cache_dir>/<name>/<class index>/<index>.png`` (PNG: the decoded pixels equal the arrays,
    so dali sees exactly what the torch backend sees).
    """
    if isinstance(dataset, ImageFolderDataset):
        return [p for p, _ in dataset.samples], [int(y) for y in dataset.labels]
    name = cache_name(spec, split, dataset, {"export": "png"})
    root = os.path.join(cache_dir, name)
    index = os.path.join(root, "index.json")
    with file_lock(root):
        if not os.path.isfile(index):
            export_png_tree(dataset, root)
    with open(index) as f:
        entries = json.load(f)
    return [os.path.join(root, p) for p, _ in entries], [int(y) for _, y in entries]


def export_png_tree(dataset, root: str, progress: bool | None = None) -> None:
    """Write every image of ``dataset`` as PNG under ``root`` (atomically: tmp dir + rename)."""
    from PIL import Image
    from tqdm import tqdm

    tmp = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    labels = np.asarray(dataset.labels)
    for c in np.unique(labels):
        os.makedirs(os.path.join(tmp, str(int(c))), exist_ok=True)
    note(f"exporting {len(dataset)} images to {root} (PNG, once)")
    entries = []
    width = len(str(max(len(dataset) - 1, 0)))
    for i in tqdm(range(len(dataset)), desc="exporting", unit="img", leave=False,
                  disable=progress if progress is not None else None):
        img, label = dataset[i]
        rel = os.path.join(str(int(label)), f"{i:0{width}d}.png")
        Image.fromarray(np.ascontiguousarray(img)).save(os.path.join(tmp, rel), compress_level=1)
        entries.append((rel, int(label)))
    with open(os.path.join(tmp, "index.json"), "w") as f:
        json.dump(entries, f)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
