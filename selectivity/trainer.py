"""The training engine behind tools/train.py: the whole loop, readable top to bottom.

Order of a run: build data and model (bad input fails here, before anything is written) → create
the run directory → resume or evaluate/save epoch 0 → for each epoch: train, evaluate, checkpoint.
Experiment features (selectivity tracking, the regularizer, …) plug in as callbacks (see
``Callback``) so this loop stays one screen.
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from . import faults
from .callbacks import Callback  # noqa: F401  (re-exported: the extension points)
from .checkpoint import (load_last_good, remove_stale_temp_files, rng_state, save_checkpoint,
                         set_rng_state)
from .config import Config, save_config, to_dict
from .distributed import DistInfo, all_reduce_sum
from .evaluation import bn_statistics, calibration_batches
from .errors import TrainingError  # noqa: F401  (importable from here too)
from .models import build_model
from .runlog import RunLog, run_paths


def lr_factor(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """Multiplier of cfg.lr at a global step: linear warmup, then cosine / step / constant."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    if cfg.schedule == "step":
        epoch = step / steps_per_epoch
        return cfg.step_gamma ** sum(epoch >= e for e in cfg.step_epochs)
    return 1.0


def set_determinism(cfg: Config) -> None:
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


class Trainer:
    _calibration: list | None = None  # the BatchNorm recalibration images, loaded at the first evaluation
    def __init__(self, cfg: Config, dist: DistInfo, resume: bool = False,
                 callbacks: list[Callback] | None = None):
        from selectivity.data import build_loader

        self.cfg, self.dist, self.device = cfg, dist, dist.device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        set_determinism(cfg)
        self.run_dir = os.path.join(cfg.out_dir, cfg.name)
        self.paths = run_paths(self.run_dir)
        if os.path.isdir(self.paths["checkpoints"]) and os.listdir(self.paths["checkpoints"]) \
                and not resume:
            raise TrainingError(f"run directory {self.run_dir} already holds a run; pass --resume "
                                f"to continue it, or choose another --name")
        # Data and model first: bad input fails before the run directory is touched.
        self.train_loader = build_loader(cfg, "train", self.device, dist.rank, dist.world_size)
        self.val_loader = build_loader(cfg, "val", self.device, dist.rank, dist.world_size)
        self.num_classes = self.train_loader.num_classes
        self.model = build_model(cfg.model, self.num_classes, cfg.small_stem).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = DDP(self.model, device_ids=[dist.local_rank] if self.device.type == "cuda"
                       else None) if dist.enabled else self.model
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise TrainingError(f"batch_size {cfg.batch_size} × {dist.world_size} process(es) "
                                f"exceeds the {len(self.train_loader.dataset)} training images; "
                                f"lower batch_size")
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr,
                                         momentum=cfg.momentum, nesterov=cfg.nesterov,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg, s, self.steps_per_epoch))
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and self.device.type == "cuda")
        self.callbacks = list(callbacks or [])
        self.epoch, self.step, self.batch_in_epoch, self.skipped_steps = 0, 0, 0, 0
        if resume and dist.is_main:  # leftovers of writes a killed run never renamed
            remove_stale_temp_files([self.run_dir, self.paths["checkpoints"],
                                     self.paths["selectivity"]])
        self.resume_state = load_last_good(self.paths["checkpoints"]) if resume else None
        for cb in self.callbacks:
            cb.setup(self)
        if self.resume_state is not None:
            self._restore(self.resume_state[0])
        self.log = RunLog(self.run_dir, dist.is_main, cfg.tensorboard,
                          self.step if self.resume_state else None)
        if dist.is_main:
            save_config(cfg, self.paths["config"])

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "skipped_steps": self.skipped_steps, "rng": rng_state(),
                "config": to_dict(self.cfg),
                "callbacks": [cb.state_dict() for cb in self.callbacks]}

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.batch_in_epoch, self.skipped_steps = state["batch_in_epoch"], state["skipped_steps"]
        set_rng_state(state["rng"])
        for cb, cb_state in zip(self.callbacks, state["callbacks"]):
            cb.load_state_dict(cb_state)

    def save(self, filename: str) -> None:
        if self.dist.is_main:
            save_checkpoint(self.state_dict(), self.paths["checkpoints"], filename)

    # ---- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, train_images_per_sec: float | None, epoch: float | None = None) -> dict:
        """One pass over the validation split with the BatchNorm statistics of ``cfg.bn_mode``
        (selectivity/evaluation.py: the model's buffers are restored afterwards, so training is
        untouched); with ``eval_running_bn`` the accuracy with the running statistics is reported
        beside it. ``epoch`` is the (fractional) epoch to log."""
        cfg = self.cfg
        if cfg.bn_mode == "recalibrate" and self._calibration is None:
            self._calibration = calibration_batches(cfg, self.device)
        amp = self.amp_dtype if cfg.amp else None
        with bn_statistics(self.net, cfg.bn_mode, self._calibration, amp):
            record = self._val_pass(track=True)
        if cfg.bn_mode != "running" and cfg.eval_running_bn:
            with bn_statistics(self.net, "running"):
                running = self._val_pass(track=False)
            record.update(acc1_running=running["acc1"], loss_running=running["loss"])
        record = {"epoch": self.epoch if epoch is None else epoch, "step": self.step,
                  "split": "val", **record, "bn_mode": cfg.bn_mode,
                  "images_per_sec": train_images_per_sec, "skipped_steps": self.skipped_steps}
        for cb in self.callbacks:
            record.update(cb.eval_end(self, record))
        self.net.train()
        return record

    def _val_pass(self, track: bool) -> dict:
        self.val_loader.set_epoch(0)
        callbacks = self.callbacks if track else []
        for cb in callbacks:
            cb.eval_begin(self)
        # The dataset indices of every val image in loader order: the null's permutation is a
        # function of the index, the same on every rank and at every evaluation.
        order = torch.as_tensor(self.val_loader.indices())
        pos = 0
        loss_sum, correct1, correct5, count = (torch.zeros((), device=self.device, dtype=torch.float64)
                                               for _ in range(4))
        for images, labels in self.val_loader:
            indices = order[pos:pos + labels.shape[0]]
            pos += labels.shape[0]
            for cb in callbacks:
                cb.before_batch(self, images, labels, False, indices=indices)
            with torch.autocast(self.device.type, self.amp_dtype, enabled=self.cfg.amp):
                logits = self.net(images)
            for cb in callbacks:
                cb.after_batch(self)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += (top[:, 0] == labels).sum()
            correct5 += (top == labels[:, None]).any(dim=1).sum()
            count += labels.numel()
            for cb in callbacks:
                cb.eval_batch(self, images, labels, logits)
            faults.maybe_fault("eval_batch")
        loss_sum, correct1, correct5, count = all_reduce_sum(
            [loss_sum.item(), correct1.item(), correct5.item(), count.item()], self.device)
        return {"loss": loss_sum / count, "acc1": correct1 / count, "acc5": correct5 / count,
                "images": int(count)}

    # ---- training ----------------------------------------------------------------------------
    def train_step(self, images, labels):
        cfg = self.cfg
        for cb in self.callbacks:
            cb.before_batch(self, images, labels, True)
        with torch.autocast(self.device.type, self.amp_dtype, enabled=cfg.amp):
            logits = self.net(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            for cb in self.callbacks:
                for term in cb.loss_terms(self, images, labels, logits).values():
                    loss = loss + term
            if faults.maybe_fault("nan_loss"):
                loss = loss * float("nan")
        for cb in self.callbacks:
            cb.after_batch(self)
        # A non-finite loss is checked every step on the CPU (free) or with nan_policy: skip;
        # on CUDA with "stop" it is checked at log steps and at epoch end (no per-step sync).
        if self.device.type == "cpu" or cfg.nan_policy == "skip":
            finite = bool(torch.isfinite(loss))
            if self.dist.enabled and cfg.nan_policy == "skip":
                # Every rank must skip together, or DDP's gradient all_reduce would hang.
                finite = all_reduce_sum([float(not finite)], self.device)[0] == 0
            if not finite:
                if cfg.nan_policy == "stop":
                    self._nonfinite(loss)
                self.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                return logits.detach(), None
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return logits.detach(), loss.detach()

    def _nonfinite(self, loss) -> None:
        raise TrainingError(f"non-finite loss ({loss.item()}) at epoch {self.epoch} step "
                            f"{self.step}; the last good checkpoint is kept in "
                            f"{self.paths['checkpoints']}. Lower lr, check the data, or set "
                            f"nan_policy: skip")

    def train_epoch(self) -> float:
        """One epoch (from self.batch_in_epoch on a mid-epoch resume); returns img/s."""
        from tqdm import tqdm

        cfg = self.cfg
        self.net.train()
        self.train_loader.set_epoch(self.epoch, skip_batches=self.batch_in_epoch)
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False,
                   # None: tqdm shows the bar only on a terminal (logs stay clean)
                   disable=None if (self.dist.is_main and cfg.progress) else True,
                   dynamic_ncols=True)
        run_loss = torch.zeros((), device=self.device)
        run_correct = torch.zeros((), device=self.device)
        run_n, n_images, t0 = 0, 0, time.perf_counter()
        for images, labels in bar:
            logits, loss = self.train_step(images, labels)
            for cb in self.callbacks:
                cb.after_step(self, images, labels, logits)
            self.step += 1
            self.batch_in_epoch += 1
            n_images += labels.numel()
            if loss is not None:  # None: a skipped non-finite step (nan_policy: skip)
                run_loss += loss.float() * labels.numel()
                run_correct += (logits.argmax(1) == labels).sum()
                run_n += labels.numel()
            faults.maybe_fault("train_step")
            if cfg.save_every_steps and self.epoch < cfg.save_steps_epochs \
                    and self.step % cfg.save_every_steps == 0 \
                    and self.batch_in_epoch < self.steps_per_epoch:
                # Sub-epoch checkpoints (paper 1's cadence inside the first epoch); resumable.
                self.save(f"step_{self.step}.pt")
            if cfg.eval_every_steps and self.epoch < cfg.eval_steps_epochs \
                    and self.step % cfg.eval_every_steps == 0 \
                    and self.batch_in_epoch < self.steps_per_epoch:
                # Sub-epoch evaluation (paper 1 measured inside the first epoch).
                self.log.write(self.evaluate(None, epoch=self.epoch + self.batch_in_epoch /
                                             self.steps_per_epoch))
            if self.step % cfg.log_every_steps == 0:
                if not torch.isfinite(run_loss):
                    self._nonfinite(run_loss)
                elapsed = time.perf_counter() - t0
                record = {"epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
                          "step": self.step, "split": "train",
                          "loss": run_loss.item() / max(run_n, 1),
                          "acc1": run_correct.item() / max(run_n, 1), "lr": self.scheduler.get_last_lr()[0],
                          "images_per_sec": n_images * self.dist.world_size / elapsed}
                for cb in self.callbacks:
                    record.update(cb.train_log(self))
                self.log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc1']:.3f}")
                run_loss.zero_(), run_correct.zero_()
                run_n = 0
        if not torch.isfinite(run_loss):
            self._nonfinite(run_loss)
        elapsed = time.perf_counter() - t0
        self.epoch += 1
        self.batch_in_epoch = 0
        return n_images * self.dist.world_size / max(elapsed, 1e-9)

    def fit(self) -> dict | None:
        cfg, last = self.cfg, None
        if self.resume_state is None:
            last = self.evaluate(None)
            self.log.write(last)
            self.save("epoch_0.pt")
        while self.epoch < cfg.epochs:
            ips = self.train_epoch()
            if self.epoch % cfg.eval_every_epochs == 0 or self.epoch == cfg.epochs:
                last = self.evaluate(ips)
                self.log.write(last)
                if self.dist.is_main and cfg.progress:
                    print(f"epoch {self.epoch}/{cfg.epochs}  val acc1 {last['acc1']:.4f}  "
                          f"loss {last['loss']:.4f}  train {ips:.0f} img/s", flush=True)
            if self.epoch % cfg.save_every_epochs == 0 or self.epoch == cfg.epochs:
                self.save(f"epoch_{self.epoch}.pt")
        self.log.close()
        return last
