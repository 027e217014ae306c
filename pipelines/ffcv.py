"""The FFCV backend: an FFCV ``Loader`` behind the loader contract, reading a ``.beton`` that
ffcv_write.py wrote (safely) and ``ensure_beton`` built or found.

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

import functools

import numpy as np
import torch

from selectivity.pipelines.contract import Batch, shard_indices
from selectivity.pipelines.datasets import DataError
from selectivity.pipelines.ffcv_write import _column, _ffcv, ensure_beton, threads_for

ORDERS = ("random", "quasi_random")
_COMPILED: list = []  # see FFCVLoader.close


# ---- loading -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _decoders():
    from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder

    class TorchCenterCropDecoder(ResizedCropRGBImageDecoder):
        """selectivity.pipelines.transforms.val_transform in FFCV: an image already size×size passes through
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
    """Loader contract (selectivity/pipelines/contract.py) over an FFCV Loader reading one .beton."""

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
        # FFCV yields no indices: its traversal order for this epoch tells which images batch b holds.
        order = torch.from_numpy(self.indices()[self.skip_batches * self.batch_size:])
        it = self._epoch_it = iter(self._loader)
        try:
            for b, (images, labels) in enumerate(it):
                if b == 0:  # the epoch thread has set torch's thread count by now: restore it
                    torch.set_num_threads(torch_threads)
                if self._gpu:
                    images = (images.float() - self._mean) * self._inv_std
                    if not self.channels_last:
                        images = images.contiguous()
                yield Batch(images, labels, order[b * self.batch_size:(b + 1) * self.batch_size])
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


def build_ffcv_loader(spec, split: str, device, rank: int = 0, world_size: int = 1) -> FFCVLoader:
    _ffcv()
    train = split == "train"
    ds = spec.open(split)
    path = ensure_beton(spec, split, ds, world_size)
    return FFCVLoader(path, classes=ds.classes, mean=ds.mean, std=ds.std,
                      batch_size=spec.batch_size if train else spec.eval_batch_size, train=train,
                      augment=spec.augment, image_size=spec.image_size, device=device, rank=rank,
                      world_size=world_size, seed=spec.seed, threads=threads_for(spec, world_size),
                      channels_last=spec.channels_last, order=spec.ffcv_order,
                      os_cache=spec.os_cache)
