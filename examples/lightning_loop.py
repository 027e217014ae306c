"""Class selectivity in a Lightning loop: a CIFAR ResNet-20 on the digits data, on the CPU.

    python examples/lightning_loop.py [--epochs 2] [--out lightning_run] [--resume]

A ``LightningModule`` of the user's own; ``SelectivityCallback`` measures the residual blocks'
SI over the validation loop with a label-shuffled null and recalibrated BatchNorm statistics,
logs per-layer and per-stage SI and null to TensorBoard and CSV, and regularizes selectivity
from epoch ``--alpha-from`` on. ``--resume`` continues from ``<out>/ckpt/last.ckpt``.
"""
import argparse
import itertools
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset

from selectivity.integrations.lightning import SelectivityCallback, WithIndices
from selectivity.pipelines.datasets import build_dataset
from selectivity.train.models import build_model

NUM_CLASSES, NULL_PERMUTATIONS, CALIBRATION_BATCHES = 10, 10, 8


def digits(split: str, image_size: int) -> WithIndices:
    """The digits split as normalized float tensors, items (x, y, dataset index)."""
    ds = build_dataset("digits", split, image_size=image_size)
    images = torch.from_numpy(np.ascontiguousarray(ds.images)).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(ds.mean)[:, None, None], torch.tensor(ds.std)[:, None, None]
    return WithIndices(TensorDataset((images - mean) / std, torch.from_numpy(ds.labels)))


class EpochShuffle(Sampler):
    """A permutation fixed by (seed, epoch): Lightning calls set_epoch, so a resumed fit draws
    the batches an uninterrupted one does (the global RNG is not in a checkpoint)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


class DigitsModule(pl.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.net, self.lr = build_model("resnet20", NUM_CLASSES), lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_acc", (self(x).argmax(1) == y).double().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loaders(image_size: int, batch_size: int):
    train, val = digits("train", image_size), digits("val", image_size)
    calibration = [x for x, _, _ in itertools.islice(DataLoader(train, batch_size),
                                                      CALIBRATION_BATCHES)]
    return (DataLoader(train, batch_size, sampler=EpochShuffle(len(train))),
            DataLoader(val, 120), calibration)


def callback(calibration, alpha: float, alpha_from: int) -> SelectivityCallback:
    return SelectivityCallback(NUM_CLASSES, units="blocks", null_permutations=NULL_PERMUTATIONS,
                               bn_mode="recalibrate", calibration=calibration,
                               regularizer=[{"alpha": alpha, "start": alpha_from}])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default="lightning_run")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt/last.ckpt")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--alpha", type=float, default=-1.0, help="regularizer α (< 0: less selectivity)")
    p.add_argument("--alpha-from", type=int, default=1, help="first regularized epoch")
    args = p.parse_args(argv)
    out = Path(args.out)
    pl.seed_everything(0, verbose=False)
    train, val, calibration = loaders(args.image_size, args.batch_size)
    cb = callback(calibration, args.alpha, args.alpha_from)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, num_sanity_val_steps=0,
        logger=[pl.loggers.CSVLogger(out, name="csv", version=0),
                pl.loggers.TensorBoardLogger(out, name="tb", version=0)],
        callbacks=[cb, pl.callbacks.ModelCheckpoint(out / "ckpt", save_last=True)],
        enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(DigitsModule(), train, val,
                ckpt_path=str(out / "ckpt" / "last.ckpt") if args.resume else None)
    for entry in cb.history:
        stages = {k.split("/", 1)[1]: v for k, v in entry["metrics"].items()
                  if k.startswith("si_stage/")}
        nulls = {k.split("/", 1)[1]: v for k, v in entry["metrics"].items()
                 if k.startswith("si_null_stage/")}
        print(f"epoch {entry['epoch']}: " + "   ".join(
            f"{s} SI {v:.3f} (null {nulls[s]:.3f})" for s, v in stages.items()))
    return trainer, cb


if __name__ == "__main__":
    main()
