"""Orientation selectivity across training, for a run directory (Ukita 2020; what
``tools/orientation.py`` prints and plots).

``orientation_records(run)`` measures, per chosen checkpoint:

- gratings at the model's input size (12 orientations, 4 phases, Ukita's SF ladder), normalised
  like the dataset; R[unit, SF, orientation] per layer (default: the stem ReLU and every
  residual block output; without residual blocks, the run's ``track_units``); OSI, gOSI, and
  the permuted control (per-unit shuffle);
- on the val images (the first ``max_images`` of a fixed shuffled order): val loss, accuracy and
  shift invariance at ``shift_layers`` (default: the stage outputs; without stages, the last
  three layers), raw and centred (see
  ``orientation.shift_correlation``);
- at ``ablate_at`` (default: every measured epoch), for each layer: the top half of its live
  units by gOSI zeroed, then the bottom half (dead units excluded), and the same measured again.
  Ukita's metric is the mean per-image increase in cross-entropy (± SEM).

Every measurement of a checkpoint runs inside ``evaluation.bn_statistics(model, bn_mode,
calibration)`` (default recalibrate, buffers restored afterwards); each record states ``bn_mode``.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

from selectivity.analyses.common import (calibration_for, keep_record, measured_epochs,
                                         measuring, run_label, val_loader)
from selectivity.analyses.features import refuse_logits, stage_names
from selectivity.analyses.orientation.orientation import (
    ablation_groups, channel_normalize, loss_and_shift_invariance, make_gratings,
    orientation_indices, orientation_responses, permuted_control, zero_channels)
from selectivity.errors import ConfigError, UnitsError
from selectivity.train.checkpoint import makedirs
from selectivity.train.runs import choose_checkpoints, load_model, open_run
from selectivity.units import resolve_units

TUNED = 0.33  # Ukita's threshold for an orientation-tuned unit (gOSI > 0.33)
CENTRED = "shift_invariance_centered"  # the primary shift-invariance measure in figures/summary


def default_layers(model: nn.Module, cfg=None) -> list[str]:
    """The stem ReLU (a top-level ``nn.ReLU`` named ``relu``) and every residual block output;
    for a model without residual blocks (Ukita's plain CNN, a VGG), the units the run tracked
    (``cfg.track_units``, e.g. every ReLU)."""
    stem = ["relu"] if isinstance(getattr(model, "relu", None), nn.ReLU) else []
    try:
        return stem + list(resolve_units(model, "blocks"))
    except UnitsError:
        if cfg is None:
            raise
        return list(resolve_units(model, cfg.track_units))


def default_shift_layers(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """The stage outputs (``layer*``); for a model without stages, the last three ``layers``."""
    try:
        return stage_names(model)
    except UnitsError:
        return list(layers[-3:])


def _listed(model: nn.Module, layers: Sequence[str]) -> list[str]:
    return list(resolve_units(model, list(layers), order="given", names_first=True))


def val_batches(loader, max_images: int) -> list:
    """The first ``max_images`` val images and labels, kept on the device for repeated passes."""
    out, n = [], 0
    loader.set_epoch(0)
    for images, labels in loader:
        take = min(images.shape[0], max_images - n)
        out.append((images[:take], labels[:take]))
        n += take
        if n >= max_images:
            break
    if not out:
        raise ConfigError("the val split is empty")
    return out


def layer_stats(R: torch.Tensor, generator: torch.Generator):
    """The indices of one layer's responses and the record's per-layer summary."""
    idx = orientation_indices(R)
    ctl = permuted_control(R, generator)
    live = ~idx.dead
    g, c = idx.gosi[live], ctl.gosi[live]
    mean = lambda t: float(t.mean()) if t.numel() else float("nan")  # noqa: E731
    stats = {"units": int(R.shape[0]), "dead": int(idx.dead.sum()),
             "gosi_mean": mean(g), "gosi_median": float(g.median()) if g.numel() else float("nan"),
             "osi_mean": mean(idx.osi[live]), "tuned_frac": mean((g > TUNED).double()),
             "control_gosi_mean": mean(c), "control_tuned_frac": mean((c > TUNED).double()),
             "gosi": [round(float(v), 5) for v in idx.gosi],
             "control_gosi": [round(float(v), 5) for v in ctl.gosi],
             "dead_units": torch.nonzero(idx.dead).flatten().tolist()}
    return idx, stats


def ablate(model, layers, indices, batches, shift_layers, shift, base) -> list[dict]:
    """Top and bottom halves by gOSI for every layer; the rows of the record's "ablation" list.
    The model is measured as it is set up (the caller's ``measuring`` context)."""
    rows = []
    for name in layers:
        top, bottom = ablation_groups(indices[name])
        for group, units in (("top", top), ("bottom", bottom)):
            row = {"layer": name, "group": group, "units": int(units.numel()),
                   "of_live": int((~indices[name].dead).sum()),
                   "gosi_mean": float(indices[name].gosi[units].mean()) if units.numel()
                   else float("nan")}
            if units.numel():
                with zero_channels(model, name, units):
                    res = loss_and_shift_invariance(model, batches, shift_layers, shift)
                diff = res.loss - base.loss
                row.update(loss=float(res.loss.mean()), acc1=float(res.correct.double().mean()),
                           loss_increase=float(diff.mean()),
                           loss_increase_sem=float(diff.std() / diff.numel() ** 0.5)
                           if diff.numel() > 1 else float("nan"),
                           acc_drop=float(base.correct.double().mean()
                                          - res.correct.double().mean()),
                           shift_invariance=res.shift_invariance,
                           shift_invariance_centered=res.shift_invariance_centered)
            else:  # nothing alive to ablate: no change by definition
                row.update(loss=float(base.loss.mean()), acc1=float(base.correct.double().mean()),
                           loss_increase=0.0, loss_increase_sem=0.0, acc_drop=0.0,
                           shift_invariance=base.shift_invariance,
                           shift_invariance_centered=base.shift_invariance_centered)
            rows.append(row)
    return rows


def measure_checkpoint(model, layers, shift_layers, gratings, normalize, batches, shift,
                       seed: int, ablation: bool, batch_size: int) -> dict:
    """One checkpoint's "layers", "baseline" and "ablation" entries (model already set up)."""
    R = orientation_responses(model, layers, gratings.images, normalize, batch_size=batch_size)
    gen = torch.Generator().manual_seed(seed)
    indices, stats = {}, OrderedDict()
    for layer in layers:
        indices[layer], stats[layer] = layer_stats(R[layer], gen)
    base = loss_and_shift_invariance(model, batches, shift_layers, shift)
    n_images = sum(b[1].numel() for b in batches)
    return {"layers": stats,
            "baseline": {"loss": float(base.loss.mean()),
                         "acc1": float(base.correct.double().mean()), "images": n_images,
                         "shift_px": shift, "shift_invariance": base.shift_invariance,
                         "shift_invariance_centered": base.shift_invariance_centered},
            "ablation": ablate(model, layers, indices, batches, shift_layers, shift, base)
            if ablation else []}


class Plan:
    """What ``orientation_records`` will measure, resolved and checked before any measurement
    (the tool prints it first)."""

    def __init__(self, run, *, epochs=None, steps=False, layers=None, shift_layers=None,
                 ablate_epochs=None, no_ablation=False, shift=None, max_images=10000,
                 batch_size=None, plot_epochs=None, device="cpu", bn_mode="recalibrate",
                 seed=0):
        if max_images < 1:
            raise ConfigError("--max-images must be >= 1")
        overrides = {"workers": 0}
        if batch_size:
            overrides["eval_batch_size"] = batch_size
        self.run, self.device, self.bn_mode, self.seed = run, device, bn_mode, seed
        self.cfg = cfg = open_run(run, **overrides)
        self.ckpts = choose_checkpoints(run, epochs, steps)
        probe = load_model(cfg, self.ckpts[0], "cpu")
        for given in (layers, shift_layers):
            refuse_logits(given)
        self.layers = _listed(probe, layers) if layers else default_layers(probe, cfg)
        self.shift_layers = _listed(probe, shift_layers) if shift_layers else \
            default_shift_layers(probe, self.layers)
        measured = [c.epoch for c in self.ckpts]
        if no_ablation:
            self.ablate_at = set()
        elif ablate_epochs:
            self.ablate_at = set(measured_epochs(ablate_epochs, measured, "--ablate-epochs"))
        else:
            self.ablate_at = set(measured)
        if plot_epochs:
            measured_epochs(plot_epochs, measured, "--plot-epochs")
        self.gratings = make_gratings(cfg.image_size)
        self.shift = shift if shift is not None else max(1, cfg.image_size // 8)
        self.max_images = max_images
        self.name = run_label(run)


def orientation_records(plan: Plan, out_jsonl: str | None = None,
                        on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """The records of ``plan`` (module doc), one per checkpoint; ``out_jsonl`` rewritten after
    each (an interrupted measurement keeps its lines); ``on_record`` called with each."""
    cfg, device = plan.cfg, plan.device
    loader = val_loader(cfg, device, seed=plan.seed, max_images=plan.max_images)
    normalize = channel_normalize(loader.dataset.mean, loader.dataset.std)
    batches = val_batches(loader, plan.max_images)
    calib = calibration_for(cfg, device, plan.bn_mode)
    if out_jsonl:
        makedirs(os.path.dirname(os.path.abspath(out_jsonl)))
    g = plan.gratings
    n_sf, n_orient, n_phase = g.images.shape[:3]
    records = []
    for c in plan.ckpts:
        model = load_model(cfg, c, device)
        rec = {"epoch": c.epoch, "step": c.step, "checkpoint": os.path.basename(c.path),
               "run": plan.name, "bn_mode": plan.bn_mode, "val_order_seed": plan.seed,
               "gratings": {"size": cfg.image_size, "n_sf": n_sf, "n_orient": n_orient,
                            "n_phase": n_phase, "sf": [round(float(v), 6) for v in g.sf]}}
        with measuring(model, plan.bn_mode, calib):
            rec.update(measure_checkpoint(model, plan.layers, plan.shift_layers, g, normalize,
                                          batches, plan.shift, plan.seed, c.epoch in plan.ablate_at,
                                          cfg.eval_batch_size))
        keep_record(records, rec, out_jsonl, on_record)
    return records


def layer_groups(layers: Sequence[str]) -> "OrderedDict[str, list[str]]":
    """The layers by stage (``layer2.1`` → ``layer2``); top-level non-stage layers as ``stem``."""
    from selectivity.train.models import stage_of
    out: "OrderedDict[str, list[str]]" = OrderedDict()
    for name in layers:
        out.setdefault("stem" if "." not in name and not name.startswith("layer")
                       else stage_of(name), []).append(name)
    return out
