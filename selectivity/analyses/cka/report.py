"""CKA across training as ``tools/cka.py`` reports it: ``report`` measures a run (or two),
draws the figures and hands every line it has to say to ``echo``: one line per checkpoint
(``record_line``), then the summary table (``summary_lines``)."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from selectivity.analyses.cka.run import cka_records, default_outputs, entry
from selectivity.analyses.common import run_label, set_threads
from selectivity.analyses.features import LOGITS
from selectivity.train.distributed import choose_device
from selectivity.train.runs import open_run

# The tool's --help after its synopsis: what is measured and what is written.
HELP = """
For every epoch_* checkpoint of RUN (with --steps, the step_* ones inside an epoch too; or the
epochs named by --epochs), on the run's val split in a fixed shuffled order (--seed):
  - within one network: the square CKA matrix among --layers (default: the stage outputs
    layer1..layerN, or the run's track_units for a model without stages; names or globs such
    as 'layer3.*') and the logits;
  - with RUN2: RUN's layers (rows) against RUN2's (columns) at every epoch both runs have;
  - the fraction of ReLU outputs > 0 inside each layer (every nn.ReLU, every call);
  - the same for the architecture freshly initialised from a seed derived from --seed (never
    the run's own initialisation; with RUN2: two fresh networks), on the same batches: the
    baseline, dashed in every figure.
BatchNorm statistics: --bn-mode (default: recomputed on the run's fixed training images).
Writes OUT/cka.jsonl (with RUN2: OUT/cka_vs_<RUN2 name>.jsonl; OUT defaults to RUN), one line
per checkpoint:
  {"epoch", "step", "checkpoint", "run", "run_b", "bn_mode", "val_order_seed", "rows", "cols",
   "matrix", "relu_active", "relu_active_b", "images", "batches",
   "random_init": {"seed", "seed_b", "matrix", "relu_active", "relu_active_b"}}  (NaN as null)
and into OUT/figures/: <prefix>_heatmaps.png, <prefix>_curves.png, <prefix>_relu_active.png.
Prints a summary table. The measurement is selectivity.analyses.cka.run.cka_records.
"""


def record_line(rec: dict, layers: list[str], between: bool) -> str:
    """One checkpoint: CKA(layer, logits), or between two runs CKA(A's layer, B's same layer)."""
    if between:
        cells = "  ".join(f"{n} {entry(rec, n, n):.3f}" for n in layers + [LOGITS])
        return f"epoch {rec['epoch']:.3g}: CKA(A, B) same layer: {cells}"
    cells = "  ".join(f"{n} {entry(rec, n, LOGITS):.3f}" for n in layers)
    return f"epoch {rec['epoch']:.3g}: CKA(·, logits): {cells}"


def summary_lines(records: list[dict], layers: list[str], between: bool) -> list[str]:
    """The summary table: a row per checkpoint and one for the random-init baseline."""
    r0 = records[0]
    what = (f"{r0['run']} (rows) vs {r0['run_b']} (cols), same layer" if between
            else f"{r0['run']}, CKA(layer, logits)")
    lines = [f"\nsummary: {what}; {r0['images']} val images in {r0['batches']} batch(es) per "
             f"checkpoint; BN {r0['bn_mode']}"]
    w = max(8, *(len(n) for n in layers))
    cols = layers + ([LOGITS] if between else [])
    head = "epoch    step  " + " ".join(f"{n:>{w}}" for n in cols)
    lines.append(head + "   | active ReLUs: " + " ".join(f"{n:>{w}}" for n in layers))

    def line(label, rec, key):
        cka = [entry(rec, n, n if between else LOGITS, key) for n in cols]
        relu_src = rec[key]["relu_active"] if key == "random_init" else rec["relu_active"]
        relu = [np.nan if relu_src[n] is None else relu_src[n] for n in layers]
        return (f"{label}  " + " ".join(f"{v:>{w}.3f}" for v in cka)
                + "   |               " + " ".join(f"{v:>{w}.3f}" for v in relu))

    lines += [line(f"{r['epoch']:<7.3g} {r['step']:>5}", r, "matrix") for r in records]
    lines.append(line(f"{'init':<13}", r0, "random_init"))
    return lines


def report(run: str, run_b: str | None = None, *, out: str | None = None, epochs=None,
           steps: bool = False, layers: Sequence[str] | None = None,
           max_batches: int | None = None, batch_size: int | None = None,
           heatmap_epochs=None, seed: int = 0, device: str = "auto", threads: int | None = None,
           bn_mode: str = "recalibrate", echo: Callable[[str], None] = print) -> list[dict]:
    """CKA of ``run`` (with ``run_b``: between the two) into ``out`` (default: the run's folder):
    the records (``cka_records``), the figures and the printed lines; returns the records."""
    from selectivity.analyses.cka.figures import write_figures

    device = choose_device(device)
    set_threads(threads, open_run(run))
    between = run_b is not None
    out_jsonl, fig_dir, prefix = default_outputs(run, run_b, out)
    shown = {}

    def on_record(rec):
        shown.setdefault("layers", rec["rows"][:-1])
        echo(record_line(rec, shown["layers"], between))

    records = cka_records(run, run_b, epochs=epochs, steps=steps, layers=layers,
                          max_batches=max_batches, batch_size=batch_size, device=device,
                          bn_mode=bn_mode, seed=seed, out_jsonl=out_jsonl, on_record=on_record)
    names = records[0]["rows"][:-1]
    title = (f"linear CKA: {run_label(run)} (rows) vs {run_label(run_b)} (cols)" if between
             else f"linear CKA within {run_label(run)}")
    written = write_figures(records, names, between, title, fig_dir, prefix, heatmap_epochs)
    for line in summary_lines(records, names, between):
        echo(line)
    echo(f"wrote {out_jsonl}, " + ", ".join(written))
    return records
