"""``SelectivityCallback``: class selectivity in a Lightning ``Trainer``.

    from selectivity.integrations.lightning import SelectivityCallback, WithIndices
    val = DataLoader(WithIndices(val_set), batch_size=...)       # batches (x, y, dataset index)
    cb = SelectivityCallback(num_classes=10, units="blocks", null_permutations=10,
                             calibration=[x for x, *_ in calibration_batches],
                             regularizer=[{"alpha": -1.0, "start": 0, "end": 5}])
    Trainer(callbacks=[cb]).fit(module, train, val)

Every validation epoch the callback tracks the validation forward passes with the tracker (the
label-shuffled null needs each batch's dataset indices: ``WithIndices`` adds them, or pass
``fields=fn(batch) -> (labels, indices)``), with BatchNorm statistics chosen by ``bn_mode``
(``recalibrate`` on ``calibration``: image batches, default the first ``calibration_batches`` of
the training loader), and logs through the LightningModule (``pl_module.log``) per layer
``si/<layer>``, per stage ``si_stage/<stage>`` (a layer's stage: its name up to the last dot, or
``stage_of``), ``si/mean`` and, with a null, ``si_null/...`` and ``si_null_q95/...`` likewise and
``si_above_null/mean``. Values are logged as float64, so the CSV logger holds them exactly.
``negative`` (``units.NEGATIVE``: ``error``, ``relu``, ``shift``) is the tracker's and the
regularizer's rule for responses that go negative; a choice other than ``error`` names every logged
value as the trainer's TensorBoard tags do (``si_relu/...``, ``si_shift_stage/...``).

``regularizer``: α windows by epoch (``selectivity.regularizer.parse_windows``); in an epoch whose
α is not 0 the callback wraps the module's ``training_step`` so that its loss becomes
``loss - α * SI_reg`` (the regularizer's term of the same forward pass; labels from ``fields``).

The callback's state (its per-epoch history of logged values and its settings) is saved in
Lightning checkpoints; the null's permutations are fixed by ``seed``, so a fit resumed from a
checkpoint logs what an uninterrupted one does.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

try:
    import lightning.pytorch as pl
except ImportError as e:  # the optional extra
    raise ImportError("selectivity.integrations.lightning needs Lightning: "
                      "pip install selectivity-tracking[lightning]") from e
import numpy as np
import torch
from torch.utils.data import Dataset

from selectivity.evaluation import BN_MODES, bn_statistics
from selectivity.regularizer import SelectivityRegularizer, alpha_at, parse_windows
from selectivity.tracker import SelectivityTracker
from selectivity.units import check_negative


class WithIndices(Dataset):
    """``dataset``'s items as ``(x, y, index)``: the dataset index the null needs.
    ``labels``: the labels of the whole split by index (the tracker's ``dataset_labels``)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i][:2]
        return x, y, i

    @property
    def labels(self) -> np.ndarray:
        for attr in ("labels", "targets"):
            if hasattr(self.dataset, attr):
                return np.asarray(getattr(self.dataset, attr), dtype=np.int64)
        tensors = getattr(self.dataset, "tensors", None)  # a TensorDataset
        if tensors is not None and len(tensors) > 1:
            return tensors[1].cpu().numpy().astype(np.int64)
        return np.asarray([int(self.dataset[i][1]) for i in range(len(self.dataset))])


def default_fields(batch):
    """(labels, indices) of a ``(x, y, index)`` batch (``WithIndices``); indices None if absent."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[1], (batch[2] if len(batch) > 2 else None)
    raise ValueError(f"SelectivityCallback: a batch must be (x, y, index) as WithIndices gives, "
                     f"got {type(batch).__name__}; pass fields=fn(batch) -> (labels, indices)")


def default_stage(layer: str) -> str:
    return layer.rpartition(".")[0] or layer


class SelectivityCallback(pl.Callback):
    """Selectivity of ``units`` of the LightningModule over its validation loop (module doc)."""

    def __init__(self, num_classes: int, units="blocks", *, null_permutations: int = 0,
                 dataset_labels=None, seed: int = 0, bn_mode: str = "recalibrate",
                 calibration=None, calibration_batches: int = 8, regularizer=None,
                 fields: Callable = default_fields, stage_of: Callable[[str], str] = default_stage,
                 negative: str = "error"):
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {', '.join(BN_MODES)}, got {bn_mode!r}")
        self.num_classes, self.units, self.seed = num_classes, units, seed
        self.negative = check_negative(negative)  # the tracker's and the regularizer's rule
        # Logged names carry what was measured when it is not the responses as they are.
        self.tag = "si" if negative == "error" else f"si_{negative}"
        self.null_permutations, self.dataset_labels = null_permutations, dataset_labels
        self.bn_mode, self.calibration = bn_mode, calibration
        self.calibration_batches = calibration_batches
        self.windows = parse_windows(regularizer)
        self.fields, self.stage_of = fields, stage_of
        self.tracker: SelectivityTracker | None = None
        self.reg: SelectivityRegularizer | None = None
        self.history: list[dict] = []  # per validation epoch: {"epoch", "metrics"}
        self._bn = self._tracking = None
        self.alpha = 0.0

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.windows and self.reg is None:
            self.reg = SelectivityRegularizer(pl_module, self.num_classes, self.units,
                                              negative=self.negative)
            self.reg.enabled = False
            self._wrap_training_step(pl_module)

    def _wrap_training_step(self, pl_module) -> None:
        step = pl_module.training_step

        def training_step(batch, *args, **kwargs):
            out = step(batch, *args, **kwargs)
            if not self.reg.enabled:
                return out
            labels, _ = self.fields(batch)
            term = self.alpha * self.reg.term(labels)
            if isinstance(out, dict):
                return {**out, "loss": out["loss"] - term}
            return out - term
        pl_module.training_step = training_step

    # -- regularizer -----------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.alpha = alpha_at(self.windows, trainer.current_epoch)
        if self.reg is not None:  # an epoch with α = 0: the hooks do nothing at all
            self.reg.enabled = self.alpha != 0.0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.reg is not None:
            self.reg.enabled = False

    # -- measurement -----------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        if self.reg is not None:
            self.reg.enabled = False
        if self.tracker is None:  # the loaders exist from here on (not yet at setup)
            labels = self.dataset_labels
            if labels is None and self.null_permutations:
                labels = _val_labels(trainer)
            self.tracker = SelectivityTracker(pl_module, self.num_classes, self.units,
                                              dataset_labels=labels,
                                              null_permutations=self.null_permutations,
                                              seed=self.seed, negative=self.negative)
        self.tracker.reset()
        calibration = self.calibration
        if calibration is None and self.bn_mode == "recalibrate":
            calibration = _first_images(trainer.train_dataloader, self.calibration_batches)
        self._bn = bn_statistics(pl_module, self.bn_mode, calibration)
        self._bn.__enter__()  # on exit (epoch end): BatchNorm buffers, flags and RNG as before
        self.tracker.enabled = True

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx,
                                  dataloader_idx=0) -> None:
        if self._bn is None:
            return
        labels, indices = self.fields(batch)
        self._tracking = self.tracker.track(labels, indices)
        self._tracking.__enter__()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        if self._tracking is not None:
            self._tracking.__exit__(None, None, None)
            self._tracking = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._bn is None:
            return
        self.tracker.enabled = False
        self._bn.__exit__(None, None, None)
        self._bn = None
        metrics = self.metrics(self.tracker.compute())
        self.history.append({"epoch": trainer.current_epoch, "metrics": metrics})
        for name, value in metrics.items():
            pl_module.log(name, torch.tensor(value, dtype=torch.float64), on_step=False,
                          on_epoch=True, batch_size=1, sync_dist=False)

    def metrics(self, results) -> "OrderedDict[str, float]":
        """The logged scalars of ``tracker.compute()``'s results (module doc)."""
        out: "OrderedDict[str, float]" = OrderedDict()
        t = self.tag
        kinds = [(t, lambda r: r.mean)]
        if self.null_permutations:
            kinds += [(f"{t}_null", lambda r: r.null_mean), (f"{t}_null_q95", lambda r: r.null_q95)]
        for kind, value in kinds:
            per_layer = {n: value(r) for n, r in results.items()}
            stages: "OrderedDict[str, list]" = OrderedDict()
            for n, v in per_layer.items():
                out[f"{kind}/{n}"] = v
                stages.setdefault(self.stage_of(n), []).append(v)
            for s, vs in stages.items():
                out[f"{kind}_stage/{s}"] = float(np.mean(vs))
            out[f"{kind}/mean"] = float(np.mean(list(per_layer.values())))
        if self.null_permutations:
            out[f"{t}_above_null/mean"] = float(np.mean([r.frac_above_null
                                                       for r in results.values()]))
        return out

    # -- checkpoints -----------------------------------------------------------------------------
    def _settings(self) -> dict:
        return {"num_classes": self.num_classes, "units": repr(self.units), "seed": self.seed,
                "null_permutations": self.null_permutations, "bn_mode": self.bn_mode,
                "regularizer": [(w.alpha, w.start, w.end) for w in self.windows],
                "negative": self.negative}

    def state_dict(self) -> dict:
        return {"settings": self._settings(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        saved, now = state.get("settings", {}), self._settings()
        differ = [k for k in now if saved.get(k) != now[k]]
        if differ:
            k = differ[0]
            raise ValueError(f"SelectivityCallback: the checkpoint was written with {k} = "
                             f"{saved.get(k)!r}, this callback has {now[k]!r}; resume with the "
                             f"same settings")
        self.history = list(state.get("history", []))


def _first_images(loader, n: int) -> list:
    if loader is None:
        raise ValueError("SelectivityCallback: bn_mode recalibrate needs calibration batches "
                         "and there is no training loader; pass calibration=[images, ...]")
    out = []
    for batch in loader:
        out.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
        if len(out) == n:
            break
    return out


def _val_labels(trainer):
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    dataset = getattr(loader, "dataset", None)
    if not isinstance(dataset, WithIndices):
        raise ValueError("SelectivityCallback: a null needs the validation split's labels: wrap "
                         "the validation dataset in WithIndices or pass dataset_labels=")
    return dataset.labels
