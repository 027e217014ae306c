#!/usr/bin/env python
"""Convert a dataset split to an FFCV .beton file.

    python tools/build_ffcv.py --dataset imagefolder --data-dir /data/imagenet --split train \\
        -o betons/imagenet-train.beton --mode jpg --max-resolution 256 --jpeg-quality 90

Datasets: digits, synthetic, imagefolder (<data_dir>/<split>/<class>/*), cifar10 (the python
pickles). Every image is decoded once before writing; a corrupt or unreadable one is reported by
path and skipped, or with --strict the build fails (exit 2, one line) before writing anything.
The file is written under a temporary name and renamed only once its image count and labels have
been read back and checked. Train with it: ``tools/train.py --data-backend ffcv --ffcv-train X``.
"""
from __future__ import annotations

import argparse
import os


from selectivity.cli import run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", required=True,
                   choices=("digits", "synthetic", "imagefolder", "cifar10"))
    p.add_argument("--split", default="train", choices=("train", "val"))
    p.add_argument("--data-dir", default="", help="root of imagefolder / cifar10")
    p.add_argument("-o", "--output", required=True, help="the .beton file to write")
    p.add_argument("--mode", default="smart", choices=("jpg", "jpeg", "raw", "smart"),
                   help="jpg: JPEG-compress every image; raw: pixels (lossless); smart: raw, "
                        "but JPEG for images larger than --smart-threshold bytes (default)")
    p.add_argument("--max-resolution", type=int, default=None,
                   help="downscale so the longer side is at most this (default: keep)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--smart-threshold", type=int, default=3 * 64 * 64,
                   help="raw bytes above which smart mode stores JPEG (default: 64×64 RGB)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="writer processes (and image-check threads)")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first unreadable image instead of skipping it")
    p.add_argument("--image-size", type=int, default=32, help="digits/synthetic image size")
    p.add_argument("--synthetic-classes", type=int, default=10)
    p.add_argument("--synthetic-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="synthetic dataset seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from selectivity.pipelines.datasets import DataError, build_dataset
    from selectivity.pipelines.ffcv_write import write_beton

    a = parse_args(argv)
    if a.workers < 1:
        raise DataError(f"--workers must be >= 1, got {a.workers}")
    if os.path.isdir(a.output):
        raise DataError(f"--output {a.output} is a directory; give a file name (x.beton)")
    ds = build_dataset(a.dataset, a.split, a.data_dir, a.image_size, a.synthetic_classes,
                       a.synthetic_size, a.seed)
    s = write_beton(ds, a.output, mode=a.mode, max_resolution=a.max_resolution,
                    jpeg_quality=a.jpeg_quality, smart_threshold=a.smart_threshold,
                    workers=a.workers, strict=a.strict, progress=not a.no_progress)
    skipped = f", skipped {len(s['skipped'])} unreadable" if s["skipped"] else ""
    print(f"wrote {s['path']}: {s['images']} images{skipped}, {s['classes']} classes, "
          f"{s['bytes']:,} bytes ({s['jpeg_images']} jpeg, {s['raw_images']} raw, "
          f"max side {s['max_side']} px) in {s['seconds']:.1f} s")
    return s


if __name__ == "__main__":
    run_cli(main)
