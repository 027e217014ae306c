"""The DALI backend: ``fn.readers.file`` over image files, sharded by rank, behind the contract.

Files. An ImageFolder is read in place (its own file list and labels, so classes and labels are
exactly the torch backend's). Every one of its images is first decoded once with PIL, as the ffcv
path does (``export.check_images``): DALI's decoders crash the process (SIGSEGV) on some corrupt
files and raise mid-epoch on truncated or empty ones, so a file that does not decode is reported
by path and left out before the pipeline is built, and so is a file PIL reads in a format DALI
does not decode (a GIF named .jpg). The verdict is cached in ``cache_dir`` under a
key of every file's path, size and modification time, so a later run re-checks nothing unless a
file changed. In-memory datasets (digits, synthetic, cifar10) are exported once to
a PNG tree in the cache (``export.image_files``): PNG is lossless, so DALI decodes the very pixels
the torch backend sees, and one reader/decoder graph serves every dataset with the reader's C++
prefetching. (``fn.external_source`` would skip the export but puts a Python callback, under the
GIL, on every sample — slower, and a second code path to keep equal to this one.)

Graph. ``fn.readers.file(shard_id=rank, num_shards=world_size)`` → decode (``mixed``: nvJPEG on
the GPU; ``cpu`` with ``device_id=None`` without one) → training: random-resized-crop decode
(``rrc_flip``) or pad-4-and-crop (``crop``/``crop_flip``), flip via ``crop_mirror_normalize``'s
mirror; validation: the torch backend's centre crop computed per image (an image already
size×size passes through; otherwise round(0.875 × shorter side), centred, resized with
antialiasing) → ``crop_mirror_normalize`` to float32 HWC, which viewed as NCHW is channels_last.

Epochs. Training shuffles the whole file list after every epoch (``shuffle_after_epoch``, same
seed on every rank, so shards stay disjoint; the list is permuted once up front so epoch 0 is
shuffled too). DALI's shards differ by at most one image, so every rank yields
``floor(n / world_size) // batch_size`` batches (the same step count on every rank, as DDP needs)
and the rest of its shard is drained unseen. Validation: each rank its fixed shard, unpadded, in
file order. The order is a function of the seed and the number of epochs run in this process, not
of ``set_epoch``'s argument; a mid-epoch start (``skip_batches > 0``) is not supported.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from selectivity.pipelines.contract import Batch
from selectivity.pipelines.datasets import DataError, ImageFolderDataset
from selectivity.pipelines.export import (MAX_SIDE, cache_name, check_images, file_lock, image_files, note,
                     resolve_cache_dir)


def _dali():
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as e:
        raise DataError(f"data_backend 'dali' needs the nvidia-dali-cuda130 package ({e}); "
                        f"install it with `make data-deps` (mk/data.mk)") from None


def _round_half_even(x):
    """Python's round() on a DALI float node (ties to even), as an int64 node."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath
    fl = dmath.floor(x)
    frac = x - fl
    fl_i = fn.cast(fl, dtype=types.INT64)
    up = (frac > 0.5) | ((frac == 0.5) & ((fl_i % 2) == 1))
    return fl_i + fn.cast(up, dtype=types.INT64)


def center_crop_resize(images, encoded, size: int, crop_fraction: float):
    """selectivity.pipelines.transforms.val_transform per sample, as DALI nodes (see the module docstring)."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath
    shape = fn.peek_image_shape(encoded)  # H, W, C of each encoded image, on the CPU
    h, w = shape[0], shape[1]
    exact = (h == size) & (w == size)
    fraction = crop_fraction + (1.0 - crop_fraction) * fn.cast(exact, dtype=types.FLOAT)
    side = _round_half_even(fn.cast(dmath.min(h, w), dtype=types.FLOAT) * fraction)
    y0, x0 = (h - side) // 2, (w - side) // 2
    start = fn.cast(fn.stack(y0, x0), dtype=types.FLOAT)
    end = fn.cast(fn.stack(y0 + side, x0 + side), dtype=types.FLOAT)
    return fn.resize(images, size=[size, size], roi_start=start, roi_end=end,
                     roi_relative=False, antialias=True, dtype=types.UINT8)


def make_pipeline(files, labels, *, batch_size: int, train: bool, augment: str, image_size: int,
                  mean, std, shard_id: int, num_shards: int, seed: int, threads: int,
                  device_id=None, reader_seed: int | None = None):
    """The DALI Pipeline (built) for one split on one rank; ``labels``: the integer the reader
    returns with each file (DALILoader passes the files' dataset indices)."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    size = image_size

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id,
                  seed=seed, prefetch_queue_depth=2)
    def pipe():
        encoded, label = fn.readers.file(
            files=list(files), labels=[int(y) for y in labels], name="Reader",
            shard_id=shard_id, num_shards=num_shards, random_shuffle=False,
            shuffle_after_epoch=train, stick_to_shard=not train, pad_last_batch=True,
            seed=reader_seed if reader_seed is not None else seed)
        decode = "mixed" if gpu else "cpu"
        mirror = 0
        if train and augment == "rrc_flip":
            images = fn.decoders.image_random_crop(
                encoded, device=decode, output_type=types.RGB, random_area=[0.08, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
            images = fn.resize(images, size=[size, size], antialias=True, dtype=types.UINT8)
        else:
            images = fn.decoders.image(encoded, device=decode, output_type=types.RGB)
            images = center_crop_resize(images, encoded, size, 1.0 if train else 0.875)
            if train and augment in ("crop", "crop_flip"):
                pad = max(size // 8, 1)
                start = fn.cast(fn.random.uniform(
                    values=[float(v) for v in range(-pad, pad + 1)], shape=[2]),
                    dtype=types.INT32)
                images = fn.slice(images, start=start, shape=[size, size], axes=[0, 1],
                                  out_of_bounds_policy="pad", fill_values=0)
        if train and augment in ("crop_flip", "rrc_flip"):
            mirror = fn.random.coin_flip(probability=0.5)
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="HWC", mirror=mirror,
            mean=[m * 255 for m in mean], std=[s * 255 for s in std])
        return images, label

    p = pipe()
    p.build()
    return p


class _Files:
    """``loader.dataset``: the files, labels, classes and statistics behind a DALI loader."""

    def __init__(self, files, labels, classes, mean, std):
        self.files, self.labels, self.classes = files, np.asarray(labels), classes
        self.mean, self.std, self.num_classes = mean, std, len(classes)

    def __len__(self):
        return len(self.files)


class DALILoader:
    """Loader contract (selectivity/pipelines/contract.py) over a DALI pipeline and DALIGenericIterator."""

    def __init__(self, files, labels, *, classes, mean, std, batch_size: int, train: bool,
                 augment: str, image_size: int, device: torch.device, rank: int = 0,
                 world_size: int = 1, seed: int = 0, threads: int = 1,
                 channels_last: bool = True):
        _dali()
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        n = len(files)
        if n == 0:
            raise DataError("dali: no images to read")
        self.dataset = _Files(list(files), list(labels), list(classes), tuple(mean), tuple(std))
        self._label_of = torch.as_tensor(self.dataset.labels, dtype=torch.int64)
        # The reader's "label" of a file is its dataset index: every batch then carries the
        # indices of its images (the tracker's null needs them), and the labels are looked up.
        ids = list(range(n))
        if train:  # epoch 0 shuffled too: DALI's shuffle_after_epoch starts in list order
            perm = np.random.default_rng((seed, 0xDA11)).permutation(n)
            files, ids = [files[i] for i in perm], [ids[i] for i in perm]
        self.batch_size, self.train, self.device = batch_size, train, device
        self.rank, self.world_size, self.channels_last = rank, world_size, channels_last
        self.num_classes = len(classes)
        self.epoch = 0
        shard = (rank + 1) * n // world_size - rank * n // world_size  # DALI's shard sizes
        self._batches = (n // world_size) // batch_size if train else -(-shard // batch_size)
        self._samples = self._batches * batch_size if train else shard
        if train and self._batches == 0:
            self._samples = 0
        device_id = device.index if device.type == "cuda" else None
        if device.type == "cuda" and device_id is None:
            device_id = torch.cuda.current_device()
        self._pipe = make_pipeline(
            files, ids, batch_size=batch_size, train=train, augment=augment,
            image_size=image_size, mean=mean, std=std, shard_id=rank, num_shards=world_size,
            seed=seed * 1009 + rank + 1, reader_seed=seed, threads=threads,
            device_id=device_id)
        try:  # the iterator runs the pipeline for its first batch already
            self._it = DALIGenericIterator(
                self._pipe, ["images", "labels"], reader_name="Reader", auto_reset=True,
                last_batch_policy=LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL)
        except RuntimeError as e:
            self._it = None
            self.close()
            raise _batch_error(e) from None
        self._mid_epoch = False

    @property
    def labels(self) -> np.ndarray:
        """Labels of the whole split, by dataset (file list) index."""
        return self.dataset.labels

    def indices(self) -> np.ndarray:
        """Validation: this rank's shard, in file order (DALI's contiguous shard). Training order
        is DALI's internal shuffle and cannot be known up front: NotImplementedError."""
        if self.train:
            raise NotImplementedError("the dali backend's training order is internal to DALI's "
                                      "reader; indices() is available for validation loaders")
        n = len(self.dataset)
        return np.arange(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    @property
    def num_samples(self) -> int:
        return self._samples

    def __len__(self) -> int:
        return self._batches

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if skip_batches:
            raise NotImplementedError(
                "the dali backend cannot start an epoch mid-way (its reader has no cheap skip); "
                "resume from an epoch-end checkpoint, or use data_backend torch or ffcv")
        self.epoch = epoch

    def _next(self):
        try:
            return next(self._it)
        except StopIteration:  # end of epoch: DALIGenericIterator has reset itself (auto_reset)
            return None
        except RuntimeError as e:  # a file DALI cannot read although PIL could: one line
            raise _batch_error(e) from None

    def _drain(self) -> None:
        while self._next() is not None:  # the rest of this epoch, unseen
            pass
        self._mid_epoch = False

    def __iter__(self):
        if self._it is None:
            raise RuntimeError("DALILoader used after close()")
        if self._mid_epoch:  # the previous epoch was left early
            self._drain()
        self._mid_epoch = True
        done = 0
        while (out := self._next()) is not None:
            if done == self._batches:  # this rank's share is done; drain the rest unseen
                continue
            x = out[0]["images"].permute(0, 3, 1, 2)  # NHWC storage viewed as NCHW: channels_last
            if not self.channels_last:
                x = x.contiguous()
            idx = out[0]["labels"].reshape(-1).to("cpu", torch.int64)
            y = self._label_of[idx]
            if x.device != self.device:
                x = x.to(self.device, non_blocking=True)
            yield Batch(x, y.to(self.device, non_blocking=True), idx)
            done += 1
        self._mid_epoch = False

    def close(self) -> None:
        self._it = None
        if self._pipe is not None:
            self._pipe._shutdown()
            self._pipe = None


def _batch_error(e: RuntimeError) -> DataError:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = next((line for line in lines if "rror" in line and "Critical" not in line),
                  lines[0] if lines else repr(e))
    return DataError(f"dali: cannot read a batch: {detail}; try data_backend torch, or convert "
                     f"the file")


# What DALI's image decoders read (its documentation); PIL reads more (GIF, ICO, ...).
DALI_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "PPM", "JPEG2000", "WEBP")


def _format_problem(path: str) -> str | None:
    from PIL import Image
    try:
        with Image.open(path) as im:
            fmt = im.format
    except Exception as e:  # noqa: BLE001 — decoded a moment ago; any failure now is a bad file
        return f"{type(e).__name__}: {e}"
    if fmt not in DALI_FORMATS:
        return f"{fmt} is not a format DALI decodes ({', '.join(DALI_FORMATS)})"
    return None


def threads_for(spec, world_size: int) -> int:
    return spec.workers if spec.workers > 0 else max(1, (os.cpu_count() or 1) // max(world_size, 1))


def unreadable_images(spec, split: str, dataset, threads: int = 1) -> list:
    """[(path, reason)] of an ImageFolder's images that PIL cannot fully decode, checked once and
    cached (see the module docstring); [] for the PNG exports of in-memory datasets."""
    if not isinstance(dataset, ImageFolderDataset):
        return []
    from selectivity.io import atomic_write_text
    path = os.path.join(resolve_cache_dir(spec),
                        cache_name(spec, split, dataset, {"check": "decode"}) + ".bad.json")
    with file_lock(path):
        try:
            with open(path, encoding="utf-8") as f:
                return [tuple(entry) for entry in json.load(f)]
        except (OSError, ValueError):  # not checked yet, or an unreadable cache entry
            pass
        note(f"dali: checking {len(dataset)} images of {dataset.source} (once)")
        # DALI has no .beton side limit: only decoding counts here
        good, bad, _ = check_images(dataset, workers=threads, progress=False,
                                    max_resolution=MAX_SIDE)
        for i in good:
            problem = _format_problem(dataset.samples[i][0])
            if problem:
                bad.append((dataset.samples[i][0], problem))
        atomic_write_text(path, json.dumps(bad))
    return bad


def build_dali_loader(spec, split: str, device, rank: int = 0, world_size: int = 1) -> DALILoader:
    _dali()
    train = split == "train"
    ds = spec.open(split)
    files, labels = image_files(spec, split, ds, resolve_cache_dir(spec))
    bad = unreadable_images(spec, split, ds, threads_for(spec, world_size))
    if bad:
        for p, reason in bad:
            note(f"dali: skipped unreadable image {p}: {reason}")
        skip = {p for p, _ in bad}
        kept = [(f, y) for f, y in zip(files, labels) if f not in skip]
        if not kept:
            raise DataError(f"dali: no readable images in {ds.source} ({len(bad)} unreadable; "
                            f"first: {bad[0][0]}: {bad[0][1]})")
        files, labels = [f for f, _ in kept], [y for _, y in kept]
    return DALILoader(files, labels, classes=ds.classes, mean=ds.mean, std=ds.std,
                      batch_size=spec.batch_size if train else spec.eval_batch_size, train=train,
                      augment=spec.augment, image_size=spec.image_size, device=device, rank=rank,
                      world_size=world_size, seed=spec.seed, threads=threads_for(spec, world_size),
                      channels_last=spec.channels_last)
