"""Per-image augmentation for the torch backend, seeded by (seed, epoch, index).

Why not torchvision's random transforms: they draw from the global RNG, so what an image gets
depends on worker count, DDP world size and whether the run was resumed. Seeding every image from
(seed, epoch, index) makes an epoch's augmentations a pure function of those three numbers — the
basis of exact resume. The pixel work itself is PIL's (crop + resize in one call) or numpy slicing.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

AUGMENTS = ("none", "crop", "crop_flip", "rrc_flip")


def random_resized_crop_box(h: int, w: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """A crop box (x0, y0, x1, y1) drawn like torchvision's RandomResizedCrop.get_params."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return x0, y0, x0 + cw, y0 + ch
    # Fallback: the whole image clipped to the allowed aspect ratios, centred.
    r = w / h
    cw, ch = (w, int(round(w / ratio[1]))) if r > ratio[1] else \
        ((int(round(h * ratio[0])), h) if r < ratio[0] else (w, h))
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return x0, y0, x0 + cw, y0 + ch


def center_crop_box(h: int, w: int, crop_fraction: float):
    """The centred square box covering crop_fraction of the shorter side (Resize + CenterCrop)."""
    side = int(round(min(h, w) * crop_fraction))
    x0, y0 = (w - side) // 2, (h - side) // 2
    return x0, y0, x0 + side, y0 + side


def to_pil(img):
    return img if isinstance(img, Image.Image) else Image.fromarray(img)


def train_transform(img, size: int, augment: str, rng: np.random.Generator) -> np.ndarray:
    """Training view of one image (PIL or uint8 HWC array) → uint8 [size, size, 3]."""
    if augment == "rrc_flip":
        pil = to_pil(img)
        box = random_resized_crop_box(pil.height, pil.width, rng)
        out = np.array(pil.resize((size, size), Image.BILINEAR, box=box))
    else:
        out = val_transform(img, size, crop_fraction=1.0)
        if augment in ("crop", "crop_flip"):
            pad = max(size // 8, 1)  # CIFAR convention: 4 px at 32 px
            padded = np.pad(out, ((pad, pad), (pad, pad), (0, 0)))
            y, x = rng.integers(0, 2 * pad + 1, size=2)
            out = padded[y:y + size, x:x + size]
    if augment in ("crop_flip", "rrc_flip") and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def val_transform(img, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """Deterministic view: images already size×size pass through; others are centre-cropped
    (crop_fraction of the shorter side, i.e. Resize(size/0.875) + CenterCrop(size)) and resized."""
    if not isinstance(img, Image.Image) and img.shape[0] == size and img.shape[1] == size:
        return np.ascontiguousarray(img)
    pil = to_pil(img)
    box = center_crop_box(pil.height, pil.width, crop_fraction)
    # np.array, not np.asarray: an array viewing PIL's bytes is read-only, which torch's collate
    # warns about (a tensor sharing it could not be written)
    return np.array(pil.resize((size, size), Image.BILINEAR, box=box))
