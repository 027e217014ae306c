"""CKA across training, for a run directory (what ``tools/cka.py`` prints and plots).

``cka_records(run)`` measures, for every chosen checkpoint, on the run's val split:

- within one network: the square linear-CKA matrix among ``layers`` (default: the stage outputs
  ``layer*``, i.e. layer1..layerN; for a model without stages, the run's ``track_units``) and
  the logits; with ``run_b``: the run's layers (rows)
  against ``run_b``'s (columns) at every epoch both runs have;
- the fraction of ReLU outputs > 0 inside each layer (every ``nn.ReLU`` module, every call), a
  direct proxy for how linear the network still is;
- the random-initialisation baseline: the same measurement of the same architecture freshly
  initialised from seed ``INIT_SEED_OFFSET + seed`` (between two runs: two fresh networks, that
  seed and the next), on the same batches. It is what CKA reads from the architecture and the input
  alone, before any learning, and is stored in every record under ``"random_init"``.

Every measurement runs inside ``evaluation.bn_statistics(model, bn_mode, calibration)``
(``bn_mode`` recalibrate by default: the BatchNorm statistics recomputed on the run's fixed set
of training images, the model's buffers restored afterwards), and every record states its
``bn_mode``. The val batches come in a fixed shuffled order (``common.val_loader``, seeded by
``seed``), so a class-sorted split does not give batches of one class.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Sequence

import numpy as np

from selectivity.analyses.common import (calibration_for, eval_no_grad, keep_or_replay,
                                         keep_record, measuring, random_init_model, run_label,
                                         val_loader)
from selectivity.analyses.cka.cka import (MIN_BATCH, MinibatchCKA, count_relu_activity,
                                          gram)
from selectivity.analyses.features import LOGITS, collect_features, refuse_logits, stage_names
from selectivity.errors import CheckpointError, ConfigError, UnitsError
from selectivity.train.checkpoint import makedirs
from selectivity.train.runs import choose_checkpoints, load_model, open_run
from selectivity.units import resolve_units

# The baseline network's seed is offset from --seed so that it is never the run's own
# initialisation (a run trained with seed 0 starts from exactly the seed-0 network).
INIT_SEED_OFFSET = 1_000_003
SAME_DATA = ("dataset", "data_dir", "image_size", "synthetic_size", "synthetic_classes")


def default_layers(model, cfg=None) -> list[str]:
    """The stage outputs (``layer*``); for a model without stages (a VGG, a plain CNN), the
    units the run tracked (``cfg.track_units``, e.g. every ReLU)."""
    try:
        return stage_names(model)
    except UnitsError:
        if cfg is None:
            raise
        return list(resolve_units(model, cfg.track_units))


def chosen_layers(model, layers: Sequence[str] | None, cfg=None) -> list[str]:
    """``layers`` (names or globs, as listed) resolved on ``model``, or ``default_layers``."""
    if not layers:
        return default_layers(model, cfg)
    refuse_logits(layers)
    return list(resolve_units(model, list(layers), order="given", names_first=True))


def measure(model, batches, layers: Sequence[str], max_batches: int | None = None,
            model_b=None, layers_b: Sequence[str] | None = None) -> dict:
    """One pass over ``batches`` of ``(images, labels)``: the CKA matrix (``layers`` + logits;
    with ``model_b`` against its ``layers_b``, default the same names) and each model's ReLU
    activity. The models are measured as they are set up (see ``common.eval_no_grad``)."""
    rows = list(layers) + [LOGITS]
    cols = (list(layers if layers_b is None else layers_b) + [LOGITS]) if model_b is not None \
        else rows
    cka = MinibatchCKA(rows, cols if model_b is not None else None)
    images = 0
    models = (model,) if model_b is None else (model, model_b)
    with eval_no_grad(*models), contextlib.ExitStack() as stack:
        run_a = stack.enter_context(collect_features(model, layers, True, gram))
        relu_a = stack.enter_context(count_relu_activity(model, layers))
        run_b = relu_b = None
        if model_b is not None:
            run_b = stack.enter_context(collect_features(model_b, cols[:-1], True, gram))
            relu_b = stack.enter_context(count_relu_activity(model_b, cols[:-1]))
        for i, (x, _labels) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            if x.shape[0] < MIN_BATCH:  # the unbiased HSIC needs n ≥ 4: skip a short last batch
                continue
            cka.update_grams(run_a(x), None if run_b is None else run_b(x))
            images += x.shape[0]
    if not cka.batches:
        raise ConfigError(f"no val batch of at least {MIN_BATCH} images; raise the batch size")
    return {"rows": rows, "cols": cols, "matrix": cka.compute().tolist(),
            "relu_active": relu_a.fractions(),
            "relu_active_b": relu_b.fractions() if relu_b is not None else None,
            "images": images, "batches": cka.batches}


def _measure_under(bn_mode, pairs, batches, layers, max_batches, layers_b=None) -> dict:
    """``measure`` with each model in ``pairs`` ([(model, calibration), ...]) inside its own
    ``measuring`` context."""
    with contextlib.ExitStack() as stack:
        for model, calibration in pairs:
            stack.enter_context(measuring(model, bn_mode, calibration))
        model_b = pairs[1][0] if len(pairs) > 1 else None
        return measure(pairs[0][0], batches, layers, max_batches, model_b, layers_b)


def entry(record: dict, row: str, col: str, key: str = "matrix") -> float:
    """One CKA value of a record (``key="random_init"``: the baseline's); NaN where undefined."""
    source = record[key]["matrix"] if key == "random_init" else record[key]
    v = source[record["rows"].index(row)][record["cols"].index(col)]
    return np.nan if v is None else v


def cka_records(run: str, run_b: str | None = None, *, epochs=None, steps: bool = False,
                layers: Sequence[str] | None = None, max_batches: int | None = None,
                batch_size: int | None = None, device="cpu", bn_mode: str = "recalibrate",
                seed: int = 0, out_jsonl: str | None = None,
                on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """The CKA records of ``run`` (module doc), one per checkpoint. ``out_jsonl``: rewritten
    after every checkpoint, so an interrupted measurement keeps its lines. ``on_record``: called
    with each record as it is made (the tool prints a line)."""
    overrides = {"workers": 0}
    if batch_size:
        if batch_size < MIN_BATCH:
            raise ConfigError(f"the batch size must be ≥ {MIN_BATCH} "
                              f"(the unbiased HSIC needs 4 images)")
        overrides["eval_batch_size"] = batch_size
    cfg = open_run(run, **overrides)
    ckpts = choose_checkpoints(run, epochs, steps)
    cfg_b = at = None
    if run_b is not None:
        cfg_b = open_run(run_b, **overrides)
        for key in SAME_DATA:
            if getattr(cfg, key) != getattr(cfg_b, key):
                raise ConfigError(f"the runs differ in {key} ({getattr(cfg, key)!r} vs "
                                  f"{getattr(cfg_b, key)!r}): CKA needs the same val images")
        at = {round(c.epoch, 9): c for c in choose_checkpoints(run_b, epochs, steps)}
        ckpts = [c for c in ckpts if round(c.epoch, 9) in at]
        if not ckpts:
            raise CheckpointError(f"{run} and {run_b} have no checkpoint epoch in common")
    # Names are checked on the first checkpoint's model, before any data is read.
    model = load_model(cfg, ckpts[0], device)
    names = chosen_layers(model, layers, cfg)
    num_classes = model.fc.out_features if hasattr(model, "fc") else None
    if run_b is not None:
        model_b = load_model(cfg_b, at[round(ckpts[0].epoch, 9)], device)
        chosen_layers(model_b, names)
    loader = val_loader(cfg, device, seed=seed,
                        max_images=None if max_batches is None
                        else max_batches * cfg.eval_batch_size)
    batches = keep_or_replay(loader, cfg.image_size)
    calib = calibration_for(cfg, device, bn_mode)
    calib_b = calibration_for(cfg_b, device, bn_mode) if run_b is not None else None
    num_classes = num_classes or loader.num_classes

    # The baseline does not depend on the checkpoint: measured once, stored in every record.
    init_seed = INIT_SEED_OFFSET + seed
    fresh = [(random_init_model(cfg, num_classes, init_seed, device), calib)]
    if run_b is not None:
        fresh.append((random_init_model(cfg_b, num_classes, init_seed + 1, device), calib_b))
    base = _measure_under(bn_mode, fresh, batches, names, max_batches)
    baseline = {"seed": init_seed, "seed_b": init_seed + 1 if run_b is not None else None,
                "matrix": base["matrix"], "relu_active": base["relu_active"],
                "relu_active_b": base["relu_active_b"]}

    name_a, name_b = run_label(run), run_label(run_b) if run_b is not None else None
    if out_jsonl:
        makedirs(os.path.dirname(os.path.abspath(out_jsonl)))
    records = []
    for c in ckpts:
        model = load_model(cfg, c, device)
        pairs = [(model, calib)]
        if run_b is not None:
            pairs.append((load_model(cfg_b, at[round(c.epoch, 9)], device), calib_b))
        rec = {"epoch": c.epoch, "step": c.step, "checkpoint": os.path.basename(c.path),
               "run": name_a, "run_b": name_b, "bn_mode": bn_mode, "val_order_seed": seed}
        rec.update(_measure_under(bn_mode, pairs, batches, names, max_batches))
        rec["random_init"] = baseline
        keep_record(records, rec, out_jsonl, on_record)
    return records


def default_outputs(run: str, run_b: str | None, out: str | None) -> tuple[str, str, str]:
    """(jsonl path, figure directory, file prefix): under ``out`` (default: ``run``'s folder;
    the comparison with ``run_b`` is ``run``'s rows against ``run_b``'s, named cka_vs_<run_b>)."""
    prefix = f"cka_vs_{run_label(run_b)}" if run_b is not None else "cka"
    base = out or run
    return os.path.join(base, f"{prefix}.jsonl"), os.path.join(base, "figures"), prefix


def order_spread(cfg, model, layers: Sequence[str] | None = None, seeds: Sequence[int] = range(10),
                 batch_size: int | None = None, bn_mode: str = "recalibrate", device="cpu",
                 max_batches: int | None = None) -> dict:
    """How much the val order moves minibatch CKA: the matrix over the split sorted by class
    (as an ImageFolder lists it), over its own order, and over each of ``seeds``' shuffled
    orders (their spread is the estimator's noise at this batch size). ``model`` as loaded
    from a checkpoint of a run with config ``cfg``; all under ``bn_mode``.
    Returns {"rows", "by_class", "dataset", "shuffled": [matrix per seed]} (numpy arrays)."""
    names = chosen_layers(model, layers, cfg)
    calib = calibration_for(cfg, device, bn_mode)

    def one(order, seed=0):
        loader = val_loader(cfg, device, seed=seed, batch_size=batch_size, order=order)
        r = _measure_under(bn_mode, [(model, calib)], keep_or_replay(loader, cfg.image_size),
                           names, max_batches)
        return r["rows"], np.array(r["matrix"], float)

    rows, by_class = one("by_class")
    return {"rows": rows, "by_class": by_class, "dataset": one("dataset")[1],
            "shuffled": [one("shuffled", s)[1] for s in seeds]}
