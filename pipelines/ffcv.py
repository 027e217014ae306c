"""The FFCV backend: ``.beton`` writing (safe) and an FFCV ``Loader`` behind the loader contract.

Writing. ``write_beton`` decodes every image once in this process first
(``export.check_images``), so a corrupt or truncated file is reported by path — and skipped, or
with ``strict`` refused before anything is written — instead of reaching FFCV's writer workers:
FFCV's ``DatasetWriter`` waits forever for a worker that raised. As a second guard, ``_SafeWriter``
watches its workers and turns a dead one into a ``DataError`` (naming the image), not a hang. The
file is written under a temporary name, its sample count and labels are read back and checked,
and only then is it renamed into place.

Loading (``FFCVLoader``). Training: random-resized-crop decode + flip (``augment: rrc_flip``) or
the CIFAR pad-and-crop (``crop`` / ``crop_flip``), RANDOM order (``distributed=True`` under DDP:
FFCV's DistributedSampler emulation) or QUASI_RANDOM. Validation: the torch backend's exact
centre crop (``TorchCenterCropDecoder``), sequential, each rank a disjoint strided shard with no
padding. Then normalize (FFCV's numba lookup table on the CPU; torch on a GPU), NCHW
channels_last views, labels int64, to the device. Each Loader compiles its pipeline with numba on
first use; the pad-crop and flip ops here are loop-written because FFCV's own take 5–10 s longer
to compile.

What is and is not reproduced: the sample order is a function of (seed, epoch) — ``set_epoch``
sets FFCV's epoch, and ``skip_batches`` is cheap (the epoch's order is sliced); the random crops
and flips are drawn by numba's per-thread RNG and are not.
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

from .contract import shard_indices
from .datasets import DataError, build_dataset
from .export import (check_images, file_lock, note, resolve_cache_dir, cache_name)

WRITE_MODES = ("jpg", "raw", "smart")
ORDERS = ("random", "quasi_random")
_COMPILED: list = []  # see FFCVLoader.close
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
    """Write ``dataset`` (pipelines.datasets) to ``path``; returns a summary dict.

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


def auto_write_settings(cfg, dataset) -> dict:
    """How the backend builds a missing .beton: in-memory images raw (lossless, fastest to
    decode); an ImageFolder 'smart' (raw up to 64×64 px, else JPEG q90), downscaled to at most
    max(512, 2 × image_size) px a side — most ImageNet-like photos are kept at full size, so
    validation crops match the torch backend's up to JPEG loss."""
    if hasattr(dataset, "samples"):
        return {"mode": "smart", "max_resolution": max(512, 2 * cfg.image_size),
                "jpeg_quality": 90}
    return {"mode": "raw", "max_resolution": None, "jpeg_quality": 90}


def threads_for(cfg, world_size: int) -> int:
    return cfg.workers if cfg.workers > 0 else max(1, (os.cpu_count() or 1) // max(world_size, 1))


def ensure_beton(cfg, split: str, dataset, world_size: int = 1) -> str:
    """The .beton for (cfg, split): ``cfg.ffcv_train``/``ffcv_val`` if set, else the cache entry,
    built on first use (one process builds under a lock; the others wait and reuse it)."""
    explicit = cfg.ffcv_train if split == "train" else cfg.ffcv_val
    if explicit:
        if not os.path.isfile(explicit):
            raise DataError(f"ffcv_{split} file not found: {explicit} (build it with "
                            f"tools/build_ffcv.py, or unset ffcv_{split} to build it in the cache)")
        return explicit
    settings = auto_write_settings(cfg, dataset)
    name = cache_name(cfg, split, dataset, settings) + ".beton"
    path = os.path.join(resolve_cache_dir(cfg), name)
    with file_lock(path):
        if not os.path.isfile(path):
            note(f"ffcv: building {path} ({len(dataset)} images, {settings['mode']}); once")
            s = write_beton(dataset, path, workers=threads_for(cfg, world_size), progress=False,
                            **settings)
            skipped = f", skipped {len(s['skipped'])}" if s["skipped"] else ""
            note(f"ffcv: wrote {s['images']} images, {s['bytes'] / 2**20:.1f} MiB in "
                 f"{s['seconds']:.1f} s{skipped}")
    return path


# ---- loading -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _decoders():
    from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder

    class TorchCenterCropDecoder(ResizedCropRGBImageDecoder):
        """pipelines.transforms.val_transform in FFCV: an image already size×size passes through
        unchanged; any other is centre-cropped to round(crop_fraction × shorter side) (ties to
        even, like Python's round) and resized to size×size (OpenCV INTER_AREA; torch: PIL
        bilinear with antialiasing — the one difference, within a grey level or two)."""

        def __init__(self, size: int, crop_fraction: float):
            super().__init__((size, size))
            self.scale, self.ratio = None, float(crop_fraction)

        @property
        def get_crop_generator(self):
            size = int(self.output_size[0])

            def crop(height, width, _scale, fraction):
                if height == size and width == size:
                    return 0, 0, size, size
                side = int(np.round(min(height, width) * fraction))
                return (np.int64(height) - side) // 2, (np.int64(width) - side) // 2, side, side

            return crop

    return TorchCenterCropDecoder


@functools.lru_cache(maxsize=None)
def _ops():
    from dataclasses import replace

    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class RandomPadCrop(Operation):
        """The CIFAR augmentation (zero-pad ``padding`` px, crop back at a random offset), as
        FFCV's RandomTranslate computes it, written as plain loops: numba compiles this in well
        under a second, RandomTranslate's array expressions take ~5 s in every process."""

        def __init__(self, padding: int):
            super().__init__()
            self.padding = int(padding)

        def generate_code(self):
            my_range = Compiler.get_iterator()
            pad = self.padding

            def pad_crop(images, dst):
                n, h, w, c = images.shape
                for i in my_range(n):
                    dy = np.random.randint(-pad, pad + 1)
                    dx = np.random.randint(-pad, pad + 1)
                    for y in range(h):
                        sy = y + dy
                        for x in range(w):
                            sx = x + dx
                            inside = 0 <= sy < h and 0 <= sx < w
                            for k in range(c):
                                dst[i, y, x, k] = images[i, sy, sx, k] if inside else 0
                return dst

            pad_crop.is_parallel = True
            return pad_crop

        def declare_state_and_memory(self, previous_state):
            return (replace(previous_state, jit_mode=True),
                    AllocationQuery(previous_state.shape, previous_state.dtype))

    class RandomFlip(Operation):
        """Horizontal flip with probability 1/2, in place, as plain loops (FFCV's
        RandomHorizontalFlip does the same with array expressions: ~10 s more compilation)."""

        def generate_code(self):
            my_range = Compiler.get_iterator()

            def flip(images, _dst):
                n, h, w, c = images.shape
                for i in my_range(n):
                    if np.random.random() < 0.5:
                        for y in range(h):
                            for x in range(w // 2):
                                for k in range(c):
                                    t = images[i, y, x, k]
                                    images[i, y, x, k] = images[i, y, w - 1 - x, k]
                                    images[i, y, w - 1 - x, k] = t
                return images

            flip.is_parallel = True
            return flip

        def declare_state_and_memory(self, previous_state):
            return replace(previous_state, jit_mode=True), None

    return RandomPadCrop, RandomFlip


class _BetonInfo:
    """``loader.dataset``: the size, labels, classes and statistics behind a .beton."""

    def __init__(self, path, labels, classes, mean, std):
        self.path, self.labels, self.classes = path, labels, classes
        self.mean, self.std = mean, std
        self.num_classes = len(classes)
        self.source = path

    def __len__(self):
        return len(self.labels)


class FFCVLoader:
    """Loader contract (pipelines/contract.py) over an FFCV Loader reading one .beton."""

    def __init__(self, path: str, *, classes, mean, std, batch_size: int, train: bool,
                 augment: str, image_size: int, device: torch.device, rank: int = 0,
                 world_size: int = 1, seed: int = 0, threads: int = 1,
                 channels_last: bool = True, order: str = "random", os_cache: bool = True,
                 batches_ahead: int = 3):
        _ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import OrderOption
        from ffcv.reader import Reader
        from ffcv.transforms import NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage

        if order not in ORDERS:
            raise DataError(f"unknown ffcv_order {order!r}; choose one of {', '.join(ORDERS)}")
        try:
            reader = Reader(path)
        except Exception as e:  # noqa: BLE001 — a truncated or foreign file
            raise DataError(f"cannot read .beton {path}: {e}; rebuild it with "
                            f"tools/build_ffcv.py") from None
        if set(reader.handlers) != {"image", "label"}:
            raise DataError(f"{path}: expected the fields image and label (tools/build_ffcv.py), "
                            f"found {sorted(reader.handlers)}")
        labels = np.asarray(_column(reader, "label"), dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(f"{path}: label {labels.max()} out of range for {len(classes)} "
                            f"classes; was it built from another dataset?")
        self.path, self.batch_size, self.train = path, batch_size, train
        self.device, self.rank, self.world_size = device, rank, world_size
        self.num_classes = len(classes)
        self.dataset = _BetonInfo(path, labels, list(classes), tuple(mean), tuple(std))
        self.epoch, self.skip_batches, self._epoch_it = 0, 0, None
        n = len(labels)

        size = image_size
        CenterCrop = _decoders()
        RandomPadCrop, RandomFlip = _ops()
        if train and augment == "rrc_flip":
            image = [RandomResizedCropRGBImageDecoder((size, size)), RandomFlip()]
        else:  # crop / crop_flip / none: the whole image (fraction 1.0), as the torch backend
            image = [CenterCrop(size, 0.875 if not train else 1.0)]
            if train and augment in ("crop", "crop_flip"):
                image.append(RandomPadCrop(max(size // 8, 1)))
            if train and augment == "crop_flip":
                image.append(RandomFlip())
        mean255 = np.array(mean, dtype=np.float64) * 255
        std255 = np.array(std, dtype=np.float64) * 255
        self._gpu = device.type == "cuda"
        if self._gpu:  # FFCV's GPU normalize needs cupy: move uint8, normalize in torch
            image += [ToTensor(), ToDevice(device, non_blocking=True),
                      ToTorchImage(channels_last=True, convert_back_int16=False)]
            self._mean = torch.tensor(mean255, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self._inv_std = 1.0 / torch.tensor(std255, dtype=torch.float32,
                                               device=device).view(1, 3, 1, 1)
        else:
            image += [NormalizeImage(mean255, std255, np.float32), ToTensor(),
                      ToTorchImage(channels_last=channels_last, convert_back_int16=False)]
        self.channels_last = channels_last
        label = [IntDecoder(), ToTensor(), Squeeze(-1)]
        if device.type != "cpu":
            label.append(ToDevice(device, non_blocking=True))

        kwargs = dict(batch_size=batch_size, num_workers=threads, os_cache=os_cache,
                      seed=seed, pipelines={"image": image, "label": label},
                      drop_last=train, batches_ahead=batches_ahead)
        if not train:  # this rank's strided shard, in order, unpadded (no image counted twice)
            kwargs.update(order=OrderOption.SEQUENTIAL, distributed=False,
                          indices=shard_indices(n, rank, world_size, shuffle=False, seed=seed,
                                                epoch=0, pad=False))
        elif order == "random":
            kwargs.update(order=OrderOption.RANDOM, distributed=world_size > 1)
        else:  # QUASI_RANDOM has no DDP mode in FFCV: a fixed, padded shard per rank
            kwargs.update(order=OrderOption.QUASI_RANDOM, distributed=False)
            if world_size > 1:
                kwargs["indices"] = shard_indices(n, rank, world_size, shuffle=True, seed=seed,
                                                  epoch=0, pad=True)
        torch_threads = torch.get_num_threads()
        try:
            self._loader = _loader_class()(path, **kwargs)
        finally:
            torch.set_num_threads(torch_threads)  # FFCV's Compiler sets torch's thread count too
        if kwargs["order"] == OrderOption.QUASI_RANDOM:
            _pure_quasi_random(self._loader.traversal_order)

    # ---- contract --------------------------------------------------------------------------
    @property
    def labels(self) -> np.ndarray:
        """Labels of the whole .beton, by sample index (what ``indices()`` index into)."""
        return self.dataset.labels

    def indices(self) -> np.ndarray:
        """The sample indices this rank yields in the current epoch, in order (FFCV's traversal
        order for ``self.epoch``, cut to whole batches when training)."""
        ld = self._loader
        if ld is None:
            raise RuntimeError("FFCVLoader used after close()")
        order = np.asarray(ld.traversal_order.sample_order(self.epoch), dtype=np.int64)
        return order[:len(ld) * self.batch_size]

    @property
    def num_samples(self) -> int:
        n = len(self._loader.first_traversal_order)
        return n // self.batch_size * self.batch_size if self.train else n

    def __len__(self) -> int:
        return len(self._loader) - self.skip_batches

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, max(0, skip_batches)

    def __iter__(self):
        if self._loader is None:
            raise RuntimeError("FFCVLoader used after close()")
        self._end_epoch()
        self._loader.next_epoch = self.epoch
        self._loader.skip_batches = self.skip_batches
        torch_threads = torch.get_num_threads()
        it = self._epoch_it = iter(self._loader)
        try:
            for b, (images, labels) in enumerate(it):
                if b == 0:  # the epoch thread has set torch's thread count by now: restore it
                    torch.set_num_threads(torch_threads)
                if self._gpu:
                    images = (images.float() - self._mean) * self._inv_std
                    if not self.channels_last:
                        images = images.contiguous()
                yield images, labels
        finally:
            self._end_epoch()
            torch.set_num_threads(torch_threads)

    def _end_epoch(self) -> None:
        """Stop and join this epoch's FFCV thread (FFCV leaks it when an epoch is left early)."""
        it, self._epoch_it = self._epoch_it, None
        if it is None:
            return
        it.terminate_event.set()
        it.join(timeout=30)
        if not it.closed:
            it.close()
            it.closed = True

    def close(self) -> None:
        self._end_epoch()
        if self._loader is not None:
            # numba's dispatcher finalizer raises (and prints) a KeyError when FFCV's compiled
            # pipeline is garbage-collected; keep the compiled code alive until exit instead.
            _COMPILED.append((self._loader.code, self._loader.graph))
        self._loader = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 — interpreter shutdown
            pass


def _pure_quasi_random(order) -> None:
    """FFCV's QuasiRandom shuffles its page table in place on every call, so the order of epoch
    e depends on how often it was asked before; reset the table first: a function of (seed, e)."""
    table = order.page_to_samples_array.copy()
    sample = order.sample_order

    def sample_order(epoch):
        order.page_to_samples_array[:] = table
        return sample(epoch)

    order.sample_order = sample_order


@functools.lru_cache(maxsize=None)
def _loader_class():
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator

    class _Loader(Loader):
        """FFCV's Loader with a cheap mid-epoch start: the epoch's order is sliced."""
        skip_batches = 0

        def __iter__(self):
            from ffcv.pipeline.compiler import Compiler
            Compiler.set_num_threads(self.num_workers)
            order = self.next_traversal_order()
            order = order[:len(self) * self.batch_size][self.skip_batches * self.batch_size:]
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            return EpochIterator(self, order)

    return _Loader


def build_ffcv_loader(cfg, split: str, device, rank: int = 0, world_size: int = 1) -> FFCVLoader:
    _ffcv()
    train = split == "train"
    ds = build_dataset(cfg.dataset, split, cfg.data_dir, cfg.image_size, cfg.synthetic_classes,
                       cfg.synthetic_size, cfg.seed)
    path = ensure_beton(cfg, split, ds, world_size)
    return FFCVLoader(path, classes=ds.classes, mean=ds.mean, std=ds.std,
                      batch_size=cfg.batch_size if train else cfg.eval_batch_size, train=train,
                      augment=cfg.augment, image_size=cfg.image_size, device=device, rank=rank,
                      world_size=world_size, seed=cfg.seed, threads=threads_for(cfg, world_size),
                      channels_last=cfg.channels_last, order=cfg.ffcv_order,
                      os_cache=cfg.os_cache)
