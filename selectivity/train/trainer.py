"""The training engine behind tools/train.py: the whole loop, readable top to bottom.

Order of a run: build data and model (bad input fails here, before anything is written) → lock
the run directory (selectivity/runlock.py: one run per directory) → on resume, check the stored
config against this one (``config.RESUMABLE``) → resume or evaluate/save epoch 0 → for each
epoch: train, evaluate, checkpoint. Ctrl-C ends the run with one line (``Interrupted``); every
file it was writing is either whole or untouched (atomic writes), so ``--resume`` goes on.
Experiment features (selectivity tracking, the regularizer, …) plug in as callbacks (see
``Callback``) so this loop stays one screen.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from selectivity.train import faults
from selectivity.train.callbacks import Callback  # noqa: F401  (re-exported: the extension points)
from selectivity.train.checkpoint import (check_fits, load_last_good, remove_stale_temp_files, rng_state, save_checkpoint,
                         set_rng_state)
from selectivity.train.config import (LOCATION, RESUMABLE, Config, amp_dtype, data_spec, save_config,
                                      to_dict, yaml_load)
from selectivity.train.distributed import DistInfo, all_reduce_sum, broadcast_object
from selectivity.evaluation import bn_statistics
from selectivity.errors import (CheckpointError, ConfigError, Interrupted, TrainingError,  # noqa: F401
                     WriteError)
from selectivity.train.models import build_model
from selectivity.train.runlog import RunLog, run_paths
from selectivity.train.runlock import RunLock
from selectivity.train.splits import calibration_batches


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
                 callbacks: list[Callback] | None = None, accept_config_change: bool = False):
        from selectivity.pipelines import build_loader

        self.cfg, self.dist, self.device = cfg, dist, dist.device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        set_determinism(cfg)
        self.run_dir = os.path.join(cfg.out_dir, cfg.name)
        self.paths = run_paths(self.run_dir)
        self._refuse_existing_run(resume)
        # Data and model first: bad input fails before the run directory is touched.
        self.data = data_spec(cfg)
        self.train_loader = build_loader(self.data, "train", self.device, dist.rank, dist.world_size)
        self.val_loader = build_loader(self.data, "val", self.device, dist.rank, dist.world_size)
        self.num_classes = self.train_loader.num_classes  # the one source: the dataset
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
        self.amp_dtype = amp_dtype(cfg, self.device.type)
        # Only fp16 needs loss scaling (its range underflows small gradients); bf16 has fp32's.
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=cfg.amp and self.amp_dtype == torch.float16)
        # What the numbers were computed in, in every record: fp32, or the autocast dtype.
        self.precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}[self.amp_dtype] \
            if cfg.amp else "fp32"
        self.callbacks = list(callbacks or [])
        self.epoch, self.step, self.batch_in_epoch, self.skipped_steps = 0, 0, 0, 0
        # The first write to the run directory is its lock; the check above is repeated under it,
        # so of two runs started together on one directory exactly one goes on.
        self._lock = RunLock(self.run_dir)
        self._take_lock()
        try:
            self._refuse_existing_run(resume)
            if resume and dist.is_main:  # leftovers of writes a killed run never renamed
                remove_stale_temp_files([self.run_dir, self.paths["checkpoints"],
                                         self.paths["selectivity"]])
            self.resume_state = load_last_good(self.paths["checkpoints"]) if resume else None
            changes = {}
            if self.resume_state is not None:
                changes = self._config_changes(self.resume_state, accept_config_change)
                self._check_checkpoint_fits(*self.resume_state)
            for cb in self.callbacks:
                cb.setup(self)
            if self.resume_state is not None:
                self._restore_changed(self.resume_state, changes)
            self.log = RunLog(self.run_dir, dist.is_main, cfg.tensorboard,
                              self.step if self.resume_state else None)
            if changes:
                self.log.write({"epoch": self.epoch, "step": self.step, "split": "config_change",
                                "changes": {k: {"old": o, "new": n}
                                            for k, (o, n) in changes.items()},
                                "accepted": sorted(k for k in changes if k not in RESUMABLE)})
            if dist.is_main:
                save_config(cfg, self.paths["config"])
        except BaseException:
            self._lock.release()
            raise

    # ---- the run directory: lock, resume checks ----------------------------------------------
    def _refuse_existing_run(self, resume: bool) -> None:
        ckpts = self.paths["checkpoints"]
        if not resume and os.path.isdir(ckpts) and os.listdir(ckpts):
            raise TrainingError(f"run directory {self.run_dir} already holds a run; pass --resume "
                                f"to continue it, or choose another --name")

    def _take_lock(self) -> None:
        """Rank 0 takes the lock (it alone writes); every rank learns the outcome, so on a
        refusal all of them stop instead of the others waiting in a collective."""
        refusal = None
        if self.dist.is_main:
            try:
                self._lock.acquire()
            except (TrainingError, WriteError) as e:
                refusal = (isinstance(e, WriteError), str(e))
        refusal = broadcast_object(refusal) if self.dist.enabled else refusal
        if refusal is not None:
            raise (WriteError if refusal[0] else TrainingError)(refusal[1])

    def _stored_config(self, state: dict) -> dict:
        """The config the checkpoint was trained with (else the run's config.yaml)."""
        if isinstance(state.get("config"), dict):
            return state["config"]
        try:
            with open(self.paths["config"], encoding="utf-8") as f:
                stored = yaml_load(f.read())
        except (OSError, ValueError):  # yaml.YAMLError and UnicodeDecodeError are ValueErrors
            return {}
        return stored if isinstance(stored, dict) else {}

    def _config_changes(self, resume_state, accept: bool) -> dict:
        """{key: (old, new)} for every key that differs from the run's stored config; a
        ConfigError listing them when some are not RESUMABLE and ``accept`` is not given."""
        state, path = resume_state
        stored, new = self._stored_config(state), to_dict(self.cfg)
        changes = {k: (stored[k], v) for k, v in new.items()
                   if k in stored and stored[k] != v and k not in LOCATION}
        refused = [k for k in changes if k not in RESUMABLE]
        if refused and not accept:
            listed = ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
            raise ConfigError(f"--resume: the config differs from the one {self.run_dir} was "
                              f"trained with: {listed}; these keys cannot change mid-run "
                              f"(RESUMABLE in selectivity/train/config.py lists those that can). Pass "
                              f"--accept-config-change to continue anyway (recorded in "
                              f"metrics.jsonl), or start a new run with another --name")
        return changes

    def _check_checkpoint_fits(self, state: dict, path: str) -> None:
        check_fits(self.model, state, path, f"model {self.cfg.model} with {self.num_classes} "
                   f"classes", "resume with the model and data it was trained with")

    def _restore_changed(self, resume_state, changes: dict) -> None:
        """``_restore``, then what a changed config changes: the optimizer's hyperparameters and
        the schedule (the checkpoint's would silently win), fresh state for changed callbacks
        or a newly enabled GradScaler."""
        state, path = resume_state
        state = dict(state)
        if not state.get("scaler") and self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        callbacks_changed = len(state.get("callbacks", [])) != len(self.callbacks) or any(
            k in changes for k in ("track", "track_units", "selectivity_reg"))
        if callbacks_changed:
            state["callbacks"] = [cb.state_dict() for cb in self.callbacks]
        try:
            self._restore(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path} cannot be restored into this run: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}"
                                  ) from None
        if not changes:
            return  # an exact resume: the restored optimizer and scheduler are the run's own
        cfg = self.cfg
        self.scheduler.base_lrs = [cfg.lr for _ in self.optimizer.param_groups]
        factor = lr_factor(cfg, self.scheduler.last_epoch, self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group.update(momentum=cfg.momentum, nesterov=cfg.nesterov,
                         weight_decay=cfg.weight_decay, initial_lr=cfg.lr, lr=cfg.lr * factor)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                "steps_per_epoch": self.steps_per_epoch, "num_classes": self.num_classes,
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
            self._calibration = calibration_batches(self.data, self.device, cfg.bn_images)
        amp = self.amp_dtype if cfg.amp else None
        with bn_statistics(self.net, cfg.bn_mode, self._calibration, amp):
            record = self._val_pass(track=True)
        if cfg.bn_mode != "running" and cfg.eval_running_bn:
            with bn_statistics(self.net, "running"):
                running = self._val_pass(track=False)
            record.update(acc1_running=running["acc1"], loss_running=running["loss"])
        record = {"epoch": self.epoch if epoch is None else epoch, "step": self.step,
                  "split": "val", **record, "bn_mode": cfg.bn_mode, "precision": self.precision,
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
        loss_sum, correct1, correct5, count = (torch.zeros((), device=self.device, dtype=torch.float64)
                                               for _ in range(4))
        for batch in self.val_loader:
            images, labels = batch
            # The dataset indices the batch carries: the null's permutation is a function of the
            # index, the same on every rank and at every evaluation.
            indices = batch.indices
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
                          "images_per_sec": n_images * self.dist.world_size / elapsed,
                          "precision": self.precision}
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
        try:
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
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted at epoch {self.epoch} step {self.step}; resume with "
                              f"--resume") from None
        finally:
            # On the way out of an error its report is the one that counts: a failure to flush
            # TensorBoard then (the disk that just filled up) is not raised over it.
            self.log.close(quiet=sys.exc_info()[0] is not None)
            self._lock.release()
        return last
