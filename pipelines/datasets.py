"""Datasets behind every loader backend.

Every dataset here is a map-style ``torch.utils.data.Dataset`` whose items are
``(image, label)`` with ``image`` an ``uint8`` numpy array ``[H, W, 3]`` (RGB) and ``label`` an int
in ``[0, num_classes)``. Backends (torch / ffcv / dali) add augmentation, normalization and device
transfer; ``tools/build_ffcv.py`` writes these items into ``.beton`` files as they are.

Each dataset also carries ``classes`` (names), ``num_classes``, and the normalization ``mean`` /
``std`` (per channel, in [0, 1] units) its images should be fed with.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Dataset

from selectivity.errors import DataError  # noqa: F401  (importable from here too)

# Per-channel statistics, in [0, 1] units.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
DATASETS = ("digits", "digits_hard", "synthetic", "imagefolder", "cifar10")
SPLITS = ("train", "val")


def check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.max() if labels.max() >= num_classes else labels.min())
        raise DataError(f"label {bad} out of range [0, {num_classes}) in {source}; "
                        f"fix the labels or set num_classes to at least {int(labels.max()) + 1}")


@dataclass
class ArrayDataset(Dataset):
    """Images held in memory as one uint8 array [N, H, W, 3]."""
    images: np.ndarray
    labels: np.ndarray
    classes: list
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.25, 0.25, 0.25)
    source: str = "array"

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise DataError(f"{self.source}: images must be uint8 [N, H, W, 3], "
                            f"got {self.images.dtype} {self.images.shape}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        check_labels(self.labels, len(self.classes), self.source)

    num_classes = property(lambda self: len(self.classes))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def _upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a float batch [N, h, w] to [N, size, size] (torch does the maths)."""
    import torch
    t = torch.from_numpy(images).float()[:, None]
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t[:, 0].numpy()


def digits(split: str, image_size: int = 32) -> ArrayDataset:
    """scikit-learn's bundled handwritten digits (8x8, 16 grey levels), upsampled, 3 channels.

    The split is a fixed stratified 80/20 split (``random_state=0``), the same on every machine.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    idx_train, idx_val = train_test_split(np.arange(len(data.target)), test_size=0.2,
                                          stratify=data.target, random_state=0)
    idx = idx_train if split == "train" else idx_val
    imgs = _upsample(data.images[idx] / 16.0, image_size)
    imgs = np.clip(np.rint(imgs * 255.0), 0, 255).astype(np.uint8)
    imgs = np.repeat(imgs[..., None], 3, axis=-1)
    return ArrayDataset(np.ascontiguousarray(imgs), data.target[idx], [str(c) for c in range(10)],
                        mean=(0.25, 0.25, 0.25), std=(0.35, 0.35, 0.35), source=f"digits/{split}")


# digits_hard: the generator's constants. One fixed seed, so the dataset is the same on every
# machine and for every run seed (the run seed varies training, not the task). Values were chosen
# so that the demo ResNet-20 lands well inside 70-90 % val accuracy instead of at the ceiling
# (docs/study.md has the command that measures it).
DIGITS_HARD_SEED = 20260219
DIGITS_HARD_COPIES = 3          # distorted variants of every source image, per split
DIGITS_HARD_ROTATE = 30.0       # degrees, uniform ±
DIGITS_HARD_SCALE = (0.8, 1.15)
DIGITS_HARD_SHEAR = 0.3
DIGITS_HARD_SHIFT = 0.22        # fraction of the half-width, uniform ±
DIGITS_HARD_BLEND = (0.1, 0.5)  # weight of a second digit of another class (label: the first)
DIGITS_HARD_OCCLUDE = (0.15, 0.35)  # occluder side, fraction of the image; 1-2 per image
DIGITS_HARD_CLUTTER = 0.3        # amplitude of a low-frequency background
DIGITS_HARD_NOISE = 0.07         # pixel noise σ (image in [0, 1])


def _affine(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random rotation · scale · shear · shift of every image of a float batch [N, S, S]."""
    import torch
    n = len(images)
    ang = np.deg2rad(rng.uniform(-DIGITS_HARD_ROTATE, DIGITS_HARD_ROTATE, n))
    scale = rng.uniform(*DIGITS_HARD_SCALE, n)
    shear = rng.uniform(-DIGITS_HARD_SHEAR, DIGITS_HARD_SHEAR, n)
    shift = rng.uniform(-DIGITS_HARD_SHIFT, DIGITS_HARD_SHIFT, (n, 2))
    cos, sin = np.cos(ang), np.sin(ang)
    # output → input sampling matrix (affine_grid's convention): R(θ) · shear / scale
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 0, 1] = cos / scale, (cos * shear - sin) / scale
    theta[:, 1, 0], theta[:, 1, 1] = sin / scale, (sin * shear + cos) / scale
    theta[:, :, 2] = shift
    t = torch.from_numpy(images).float()[:, None]
    grid = torch.nn.functional.affine_grid(torch.from_numpy(theta).float(), list(t.shape),
                                           align_corners=False)
    out = torch.nn.functional.grid_sample(t, grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=False)
    return out[:, 0].numpy()


def digits_hard(split: str, image_size: int = 32) -> ArrayDataset:
    """A harder, fixed transform of scikit-learn's digits, without the 99 % ceiling of ``digits``.

    Nothing is downloaded: the images are generated in memory from the bundled 8x8 digits, the
    same on every machine (one fixed seed, ``DIGITS_HARD_SEED``). Train and val variants come from
    ``digits``' own stratified 80/20 split of the *source* images, so no source digit is in both.
    Each source image gives ``DIGITS_HARD_COPIES`` variants (val: 360 × 3 = 1080 images, so one
    image is 0.09 points), each built as:

    1. a random affine map of the digit (rotation, scale, shear, shift);
    2. a class-overlapping blend: a second digit of *another* class from the same split, under its
       own affine map, added at weight w ∈ DIGITS_HARD_BLEND (the label stays the first digit's;
       high w makes some images genuinely ambiguous, which is what removes the ceiling);
    3. a random per-image contrast, a low-frequency background clutter, 1–2 occluding rectangles
       of random grey, and Gaussian pixel noise;
    4. a per-channel random tint (the three channels differ, as in natural images).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    idx_train, idx_val = train_test_split(np.arange(len(data.target)), test_size=0.2,
                                          stratify=data.target, random_state=0)
    idx = np.tile(idx_train if split == "train" else idx_val, DIGITS_HARD_COPIES)
    rng = np.random.default_rng((DIGITS_HARD_SEED, SPLITS.index(split)))
    n, s = len(idx), image_size
    labels = data.target[idx]
    base = _upsample(data.images / 16.0, s)  # all sources once, [1797, S, S]
    first = _affine(base[idx], rng)
    # the distractor: a random image of another class, from this split's sources only
    pool = idx_train if split == "train" else idx_val
    other = rng.choice(pool, n)
    clash = data.target[other] == labels
    while clash.any():  # redraw until every distractor has another class (few rounds)
        other[clash] = rng.choice(pool, int(clash.sum()))
        clash = data.target[other] == labels
    second = _affine(base[other], rng)
    w = rng.uniform(*DIGITS_HARD_BLEND, n)[:, None, None]
    img = (1 - w) * first + w * second
    img = img * rng.uniform(0.5, 1.0, n)[:, None, None]
    clutter = _upsample(rng.random((n, 4, 4)), s) * rng.uniform(0, DIGITS_HARD_CLUTTER, n)[:, None,
                                                                                             None]
    img = img + clutter
    yy, xx = np.mgrid[0:s, 0:s]
    for k in range(2):
        present = rng.random(n) < (1.0 if k == 0 else 0.5)
        side = (rng.uniform(*DIGITS_HARD_OCCLUDE, (n, 2)) * s).astype(int)
        top = rng.integers(0, s, (n, 2))
        grey = rng.random(n)
        for i in np.flatnonzero(present):
            m = ((yy >= top[i, 0]) & (yy < top[i, 0] + side[i, 0]) &
                 (xx >= top[i, 1]) & (xx < top[i, 1] + side[i, 1]))
            img[i][m] = grey[i]
    tint = rng.uniform(0.6, 1.0, (n, 1, 1, 3))
    img = img[..., None] * tint + rng.normal(0, DIGITS_HARD_NOISE, (n, s, s, 3))
    imgs = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return ArrayDataset(np.ascontiguousarray(imgs), labels, [str(c) for c in range(10)],
                        mean=(0.35, 0.35, 0.35), std=(0.25, 0.25, 0.25),
                        source=f"digits_hard/{split}")


@dataclass
class SyntheticDataset(Dataset):
    """Procedural class-conditional images, generated on the fly from (seed, split, index).

    Class c is a sinusoidal grating with a class-specific orientation, frequency and colour, at a
    random phase and position jitter, plus pixel noise: learnable, but not trivially so, at any size
    and class count, and identical on every machine and in every worker.
    """
    num_classes: int = 10
    size: int = 1000
    image_size: int = 32
    split: str = "train"
    seed: int = 0
    noise: float = 0.25
    classes: list = field(default_factory=list)
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.25, 0.25, 0.25)

    def __post_init__(self):
        if self.num_classes < 1 or self.size < 0 or self.image_size < 4:
            raise DataError(f"synthetic: need num_classes >= 1, size >= 0, image_size >= 4; got "
                            f"{self.num_classes}, {self.size}, {self.image_size}")
        self.classes = [f"class{c}" for c in range(self.num_classes)]
        self.labels = np.arange(self.size, dtype=np.int64) % self.num_classes
        self.source = f"synthetic/{self.split}"

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        label = int(self.labels[i])
        rng = np.random.default_rng((self.seed, SPLITS.index(self.split), i))
        c = np.random.default_rng((self.seed, 999, label))  # class parameters: fixed per class
        theta = np.pi * label / self.num_classes + rng.normal(0, 0.05)
        freq = (2 + 4 * c.random()) * 2 * np.pi / self.image_size
        colour = 0.3 + 0.7 * c.random(3)
        yy, xx = np.mgrid[0:self.image_size, 0:self.image_size].astype(np.float32)
        wave = np.sin(freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
        img = 0.5 + 0.5 * wave[..., None] * colour[None, None, :]
        img = img + rng.normal(0, self.noise, img.shape)
        return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), label


def to_rgb(im):
    """Any PIL image → 8-bit RGB. 16/32-bit greyscale is scaled to 8 bits by its bit depth
    (PIL's own convert("RGB") would clip it to white); palette, grey, CMYK, alpha go through PIL."""
    from PIL import Image
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.int64)
        bits = 16 if im.mode.startswith("I;16") or arr.max(initial=0) < 65536 else 32
        grey = (np.clip(arr, 0, None) >> (bits - 8)).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return im.convert("RGB")


class ImageFolderDataset(Dataset):
    """``root/<split>/<class>/<image>``: the ImageNet layout. Classes come from ``root/train``."""

    def __init__(self, root: str, split: str):
        split_dir = os.path.join(root, split)
        train_dir = os.path.join(root, "train")
        for d in (root, split_dir, train_dir):
            if not os.path.isdir(d):
                raise DataError(f"data directory not found: {d} (imagefolder expects "
                                f"<data_dir>/train/<class>/* and <data_dir>/val/<class>/*)")
        self.classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
        if not self.classes:
            raise DataError(f"no class folders in {train_dir}")
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = []
        for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            if entry.name not in index:
                raise DataError(f"class folder {entry.path} has no counterpart in {train_dir}; "
                                f"every split must use the training split's classes")
            for dirpath, _, files in sorted(os.walk(entry.path)):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), index[entry.name]))
        if not self.samples:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}")
        self.labels = np.array([s[1] for s in self.samples], dtype=np.int64)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.source = f"imagefolder:{split_dir}"

    num_classes = property(lambda self: len(self.classes))

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        """The decoded PIL image of sample i (RGB). Unreadable files raise DataError naming them."""
        from PIL import Image
        path = self.samples[i][0]
        try:
            with Image.open(path) as im:
                return to_rgb(im)
        except Exception as e:  # PIL raises many types for corrupt/truncated files
            raise DataError(f"cannot decode image {path}: {e}; remove or replace the file "
                            f"(tools/build_ffcv.py lists every unreadable image)") from None

    def __getitem__(self, i):
        return np.array(self.load(i)), int(self.labels[i])  # writable (see transforms.val_transform)


def cifar10(root: str, split: str) -> ArrayDataset:
    """The CIFAR-10 python-pickle batches (``data_batch_1..5``, ``test_batch``) from a local dir."""
    for d in (root, os.path.join(root, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(d, "test_batch")):
            root = d
            break
    else:
        raise DataError(f"CIFAR-10 batches not found in {root!r}: expected data_batch_1..5 and "
                        f"test_batch (the python version) there or in its cifar-10-batches-py/")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for n in names:
        path = os.path.join(root, n)
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch["labels"])
        except FileNotFoundError:
            raise DataError(f"CIFAR-10 batch missing: {path}") from None
        except Exception as e:
            raise DataError(f"cannot read CIFAR-10 batch {path}: {e}") from None
    classes = ["airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck"]
    imgs = np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1))
    return ArrayDataset(imgs, np.array(labels), classes, CIFAR10_MEAN, CIFAR10_STD,
                        source=f"cifar10:{root}/{split}")


def build_dataset(name: str, split: str, data_dir: str = "", image_size: int = 32,
                  synthetic_classes: int = 10, synthetic_size: int = 1000, seed: int = 0):
    """The one entry point: a dataset by name and split ("train" or "val")."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {SPLITS}")
    if name == "digits":
        return digits(split, image_size)
    if name == "digits_hard":
        return digits_hard(split, image_size)
    if name == "synthetic":
        return SyntheticDataset(synthetic_classes, synthetic_size if split == "train"
                                else max(synthetic_size // 5, synthetic_classes),
                                image_size, split, seed)
    if name in ("imagefolder", "cifar10") and not data_dir:
        raise DataError(f"dataset {name!r} needs data_dir (set data_dir: /path in the config "
                        f"or --data-dir)")
    if name == "imagefolder":
        return ImageFolderDataset(data_dir, split)
    if name == "cifar10":
        return cifar10(data_dir, split)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
