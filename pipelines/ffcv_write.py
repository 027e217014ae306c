"""Writing FFCV ``.beton`` files safely: ``write_beton`` (tools/build_ffcv.py) and
``ensure_beton`` (the backend's cache, built on first use). The FFCV ``Loader`` behind the
loader contract, which reads these files, is in ffcv.py.

``write_beton`` decodes every image once in this process first
(``export.check_images``), so a corrupt or truncated file is reported by path — and skipped, or
with ``strict`` refused before anything is written — instead of reaching FFCV's writer workers:
FFCV's ``DatasetWriter`` waits forever for a worker that raised. As a second guard, ``_SafeWriter``
watches its workers and turns a dead one into a ``DataError`` (naming the image), not a hang. The
file is written under a temporary name, its sample count and labels are read back and checked,
and only then is it renamed into place.

Shared with ffcv.py: ``_ffcv()`` (ffcv's import, without its costs), ``_column`` (a .beton
metadata column) and ``threads_for`` (the worker/thread count for a run).
"""
from __future__ import annotations

import ctypes
import functools
import math
import multiprocessing
import os
import time
import traceback

import numpy as np
import torch

from selectivity.pipelines.datasets import DataError
from selectivity.pipelines.export import (check_images, file_lock, note, resolve_cache_dir, cache_name)

WRITE_MODES = ("jpg", "raw", "smart")
MIN_PAGE = 1 << 21  # FFCV's smallest page size (2 MiB; its default is 8 MiB)


def _ffcv():
    """Import ffcv, undoing two costs of its import: it sets torch's thread count to 1, and its
    ``IMAGE_MODES = numba.typed.Dict()`` (a two-entry table only ever read from Python) costs
    5–10 s of numba compilation in every process — a plain dict is built instead."""
    import sys
    if "ffcv.fields.rgb_image" in sys.modules:
        return
    threads = torch.get_num_threads()
    try:
        import numba.typed
        typed_dict = numba.typed.Dict
        numba.typed.Dict = dict
        try:
            import ffcv.fields.rgb_image  # noqa: F401
        finally:
            numba.typed.Dict = typed_dict
        import ffcv.libffcv  # noqa: F401  (the compiled extension: fails without its system libs)
    except ImportError as e:
        raise DataError(f"data_backend 'ffcv' needs the ffcv package ({e}); install it with "
                        f"`make data-deps` (mk/data.mk)") from None
    finally:
        torch.set_num_threads(threads)


# ---- writing -----------------------------------------------------------------------------------
class _Items:
    """What a writer worker indexes: (uint8 HWC contiguous RGB, int label); errors name the file."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def describe(self, i) -> str:
        samples = getattr(self.dataset, "samples", None)
        return samples[i][0] if samples is not None else f"{self.dataset.source}[{i}]"

    def __getitem__(self, i):
        try:
            img, label = self.dataset[i]
            img = np.ascontiguousarray(img, dtype=np.uint8)
            if img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"expected an RGB image [H, W, 3], got shape {img.shape}")
            return img, int(label)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{self.describe(i)}: {e}") from None


def _worker(errfile, work_fn, *args):
    """Run an FFCV writer worker; on any error record it and exit non-zero (never hang)."""
    try:
        work_fn(*args)
    except BaseException as e:  # noqa: BLE001
        with open(errfile, "a") as f:
            f.write(f"{type(e).__name__}: {e}\n" if isinstance(e, DataError) else
                    traceback.format_exc().strip().splitlines()[-1] + "\n")
        os._exit(1)


def _safe_writer_class():
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    class _SafeWriter(DatasetWriter):
        """FFCV's DatasetWriter whose wait loop notices dead workers (FFCV's spins forever)."""
        progress = True

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            ctx = multiprocessing.get_context("fork")  # workers inherit the dataset, no pickling
            self.num_samples = num_samples
            self.prepare()
            errfile = self.fname + ".err"
            if os.path.exists(errfile):
                os.unlink(errfile)
            workqueue, allocations_queue = ctx.Queue(), ctx.Queue()
            for todo in queue_content:
                workqueue.put(todo)
            for _ in range(self.num_workers):
                workqueue.put(None)
            done_number = ctx.Value(ctypes.c_uint64, 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            args = (workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator,
                    done_number, allocations_queue, *extra_worker_args)
            procs = [ctx.Process(target=functools.partial(_worker, errfile, work_fn), args=args,
                                 daemon=True) for _ in range(self.num_workers)]
            for p in procs:
                p.start()

            def failed():
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if not dead and all(p.exitcode == 0 for p in procs) and \
                        len(allocations) < len(procs) and allocations_queue.empty():
                    dead = ["exited early"]
                return dead

            allocations: list = []
            try:
                bar = tqdm(total=num_samples, desc="writing", unit="img", leave=False,
                           disable=None if self.progress else True)
                previous = 0
                while previous < num_samples:
                    val = done_number.value
                    if val > previous:
                        bar.update(val - previous)
                        previous = val
                    elif failed():
                        raise self._failure(errfile, failed())
                    else:
                        time.sleep(0.05)
                bar.close()
                while len(allocations) < len(procs):
                    try:
                        allocations.append(allocations_queue.get(timeout=0.2))
                    except Exception:  # queue.Empty
                        if failed():
                            raise self._failure(errfile, failed()) from None
                for p in procs:
                    p.join()
                self.finalize([a for content in allocations for a in content])
            finally:
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                        p.join(5)
                self.metadata_sm.close()
                self.metadata_sm.unlink()
                if os.path.exists(errfile):
                    os.unlink(errfile)

        @staticmethod
        def _failure(errfile, codes):
            msg = ""
            if os.path.exists(errfile):
                with open(errfile) as f:
                    msg = f.readline().strip()
            return DataError(f"an FFCV writer worker failed ({msg or f'exit code {codes[0]}'}); "
                             f"nothing was written")

    return _SafeWriter


def _column(reader, field: str):
    """A field's metadata column (FFCV names them f0, f1, … in field order)."""
    return reader.metadata[reader.metadata.dtype.names[list(reader.handlers).index(field)]]


def _page_size(max_bytes: int) -> int:
    """A power of two that holds the largest image (raw), at least 2 MiB."""
    size = max(MIN_PAGE, 1 << math.ceil(math.log2(max(max_bytes, 1) + 4096)))
    if size >= 1 << 32:
        raise DataError(f"an image of {max_bytes} bytes is too large for a .beton page; set a "
                        f"max resolution")
    return size


def _max_image_bytes(dataset, good, sizes, max_resolution) -> int:
    """Raw bytes of the largest image as it will be stored (after the max-resolution resize)."""
    if sizes is not None:
        wh = sizes[good].astype(np.float64)
        if max_resolution:
            wh *= np.minimum(1.0, max_resolution / wh.max(axis=1, keepdims=True))
        return int((wh.astype(np.int64).prod(axis=1) * 3).max()) if len(wh) else 3
    img = dataset[0][0] if len(dataset) else np.zeros((1, 1, 3), np.uint8)
    return int(np.prod(img.shape))


def write_beton(dataset, path: str, *, mode: str = "smart", max_resolution: int | None = None,
                jpeg_quality: int = 90, smart_threshold: int | None = None, workers: int = 2,
                strict: bool = False, progress: bool = True, chunk_size: int = 100) -> dict:
    """Write ``dataset`` (selectivity.pipelines.datasets) to ``path``; returns a summary dict.

    ``mode``: ``jpg`` (JPEG at ``jpeg_quality``), ``raw`` (pixels, lossless) or ``smart`` (raw,
    except images of more than ``smart_threshold`` bytes raw — default 3·64·64 — are JPEG).
    Unreadable images are listed in ``summary['skipped']`` ([(path, reason)]) and left out; with
    ``strict`` they raise DataError before anything is written.
    """
    _ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    if mode == "jpeg":
        mode = "jpg"
    if mode not in WRITE_MODES:
        raise DataError(f"unknown write mode {mode!r}; choose one of {', '.join(WRITE_MODES)}")
    if not 1 <= jpeg_quality <= 100:
        raise DataError(f"jpeg quality must be in [1, 100], got {jpeg_quality}")
    if max_resolution is not None and max_resolution < 1:
        max_resolution = None
    t0 = time.perf_counter()
    good, bad, sizes = check_images(dataset, workers=workers, progress=progress,
                                    max_resolution=max_resolution)
    if bad and strict:
        first = f"{bad[0][0]}: {bad[0][1]}"
        raise DataError(f"{len(bad)} unreadable image(s) (first: {first}); nothing was written. "
                        f"Fix or remove them, or drop --strict to skip them")
    for p, reason in bad:
        note(f"skipped unreadable image {p}: {reason}")
    if len(good) == 0:
        raise DataError(f"no readable images in {getattr(dataset, 'source', 'the dataset')}")
    if smart_threshold is None:
        smart_threshold = 3 * 64 * 64
    field = RGBImageField(write_mode=mode, max_resolution=max_resolution,
                          jpeg_quality=jpeg_quality, smart_threshold=smart_threshold)
    fields = {"image": field, "label": IntField()}
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    Writer = _safe_writer_class()
    writer = Writer(tmp, fields, num_workers=max(1, workers),
                    page_size=_page_size(_max_image_bytes(dataset, good, sizes, max_resolution)))
    writer.progress = progress
    try:
        writer.from_indexed_dataset(_Items(dataset), indices=good, chunksize=chunk_size)
        reader = Reader(tmp)
        expected = np.asarray(dataset.labels)[good]
        if int(reader.num_samples) != len(good):
            raise DataError(f"{tmp}: holds {reader.num_samples} images, {len(good)} were written")
        if not np.array_equal(_column(reader, "label"), expected):
            raise DataError(f"{tmp}: labels read back differ from those written")
        written = _column(reader, "image")
        nbytes = os.path.getsize(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    jpg = int((written["mode"] == 0).sum())
    return {"path": path, "images": len(good), "skipped": bad,
            "classes": int(getattr(dataset, "num_classes", len(np.unique(expected)))),
            "bytes": nbytes, "seconds": time.perf_counter() - t0, "jpeg_images": jpg,
            "raw_images": len(good) - jpg, "mode": mode,
            "max_side": int(max(written["width"].max(), written["height"].max()))}


def auto_write_settings(spec, dataset) -> dict:
    """How the backend builds a missing .beton: in-memory images raw (lossless, fastest to
    decode); an ImageFolder 'smart' (raw up to 64×64 px, else JPEG q90), downscaled to at most
    max(512, 2 × image_size) px a side — most ImageNet-like photos are kept at full size, so
    validation crops match the torch backend's up to JPEG loss."""
    if hasattr(dataset, "samples"):
        return {"mode": "smart", "max_resolution": max(512, 2 * spec.image_size),
                "jpeg_quality": 90}
    return {"mode": "raw", "max_resolution": None, "jpeg_quality": 90}


def threads_for(spec, world_size: int) -> int:
    return spec.workers if spec.workers > 0 else max(1, (os.cpu_count() or 1) // max(world_size, 1))


def ensure_beton(spec, split: str, dataset, world_size: int = 1) -> str:
    """The .beton for (spec, split): ``spec.ffcv_train``/``ffcv_val`` if set, else the cache entry,
    built on first use (one process builds under a lock; the others wait and reuse it)."""
    explicit = spec.ffcv_train if split == "train" else spec.ffcv_val
    if explicit:
        if not os.path.isfile(explicit):
            raise DataError(f"ffcv_{split} file not found: {explicit} (build it with "
                            f"tools/build_ffcv.py, or unset ffcv_{split} to build it in the cache)")
        return explicit
    settings = auto_write_settings(spec, dataset)
    name = cache_name(spec, split, dataset, settings) + ".beton"
    path = os.path.join(resolve_cache_dir(spec), name)
    with file_lock(path):
        if not os.path.isfile(path):
            note(f"ffcv: building {path} ({len(dataset)} images, {settings['mode']}); once")
            s = write_beton(dataset, path, workers=threads_for(spec, world_size), progress=False,
                            **settings)
            skipped = f", skipped {len(s['skipped'])}" if s["skipped"] else ""
            note(f"ffcv: wrote {s['images']} images, {s['bytes'] / 2**20:.1f} MiB in "
                 f"{s['seconds']:.1f} s{skipped}")
    return path
