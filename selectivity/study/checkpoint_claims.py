"""The claims the study tests on checkpoints, each measured by an analysis tool (analysis_runs) on
every seed of the unregularized condition: unit ablation and CKA linearity (paper 1), orientation
selectivity with its ablation and shift invariance (paper 3). Every difference is paired within a
seed and summarized over seeds (aggregate.summarize). Each claim returns its section of the
findings."""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict

# The analyses' record formats: the logits' name in a CKA record, a record's entry, and the
# layer groups orientation.jsonl reports by. Only these are read; the tools themselves run as
# subprocesses.
from selectivity.analyses.cka.cka import LOGITS
from selectivity.analyses.cka.run import entry
from selectivity.analyses.orientation.run import layer_groups
from selectivity.study import aggregate as agg
from selectivity.study.analysis_runs import failed_note, records, run_tool, tool_args
from selectivity.study.figures import plot_ablation, plot_cka, plot_orientation
from selectivity.study.verdicts import verdict_interval

LOW, HIGH = ("stem", "layer1"), ("layer3",)  # the layer groups paper 3's "low" and "high" mean here


def _v(x) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _ep(e) -> str:
    return "–" if e is None else f"{e:g}"


def _minus(a, b) -> float | None:
    return None if a is None or b is None else a - b


# ----- ablation (paper 1) ------------------------------------------------------------------------


def ablation_auc(path: str) -> dict:
    """{epoch: {condition: AUC}} from one ablation.jsonl: AUC = mean normalized accuracy over the
    grid (as tools/ablate.py reports it), then the mean over stages."""
    acc = defaultdict(list)
    with open(os.path.join(path, "ablation.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("norm_acc1") is not None and r.get("epoch") is not None:
                acc[(round(float(r["epoch"]), 6), r.get("stage"), r.get("condition"))].append(
                    r["norm_acc1"])
    by_stage = defaultdict(lambda: defaultdict(list))
    for (epoch, _stage, cond), vals in acc.items():
        by_stage[epoch][cond].append(sum(vals) / len(vals))
    return {e: {c: sum(v) / len(v) for c, v in conds.items()} for e, conds in by_stage.items()}


def claim_ablation(runs, base: str, out: str, figdir: str, jobs: int) -> str:
    if not runs:
        return "## Ablation: selective vs random units\n\nNo α = 0 runs: nothing to test.\n"
    done = run_tool("ablate", runs, out, jobs)
    failed = [v for v in done.values() if not os.path.isdir(v)]
    per_seed = [ablation_auc(v) for v in done.values() if os.path.isdir(v)]
    epochs = sorted({e for a in per_seed for e in a})
    rows, diffs = [], {}
    for e in epochs:
        def vals(cond):
            return [a[e].get(cond) for a in per_seed if e in a]
        d = agg.summarize([a[e]["random"] - a[e]["selective"] for a in per_seed
                           if e in a and {"random", "selective"} <= set(a[e])])
        diffs[e] = d
        rows.append([f"{e:g}", agg.summarize(vals("selective")).fmt(3),
                     agg.summarize(vals("random")).fmt(3), agg.summarize(vals("least")).fmt(3),
                     d.fmt(3)])
    trained = [e for e in epochs if e > 0]
    early = trained[0] if trained else None
    v = verdict_interval(diffs[early]) if early is not None else "inconclusive"
    fig = plot_ablation(per_seed, epochs, os.path.join(figdir, "ablation.png"), base) if epochs else None
    table = agg.markdown_table(["epoch", "AUC selective", "AUC random", "AUC least",
                                "random − selective"], rows)
    return f"""## Ablation: selective vs random units (paper 1)

Paper 1 (Ranadive et al.): early in training, ablating the most class-selective units hurts
accuracy more than ablating random ones.

`tools/ablate.py RUN` (its defaults) on every `{base}` seed; AUC = the normalized accuracy
(ablated / unablated) averaged over the grid of ablated fractions, then over the stages; lower =
the ablation hurts more. Every checkpoint of the runs; epoch 0 is the untrained network (chance).

{table}{failed_note(failed, "ablation")}

**Rule.** At the first trained checkpoint (epoch {_ep(early)}):
*supports* if the interval of (AUC random − AUC selective) lies above 0; *contradicts* if below 0;
else *inconclusive*.

| claim | verdict |
|---|---|
| early, selective units matter more than random ones | **{v}** |
""" + (f"\n![ablation]({fig})\n" if fig else "")


# ----- CKA linearity (paper 1) -------------------------------------------------------------------


def stage_logit_cka(rec: dict, key: str = "matrix") -> dict:
    """{stage: CKA(stage output, logits)} of one cka.jsonl record (``key="random_init"``: the
    freshly initialised network's)."""
    return {r: _v(entry(rec, r, LOGITS, key)) for r in rec["rows"] if r != LOGITS}


def claim_cka(runs, base: str, out: str, figdir: str, jobs: int) -> str:
    if not runs:
        return "## CKA linearity\n\nNo α = 0 runs: nothing to test.\n"
    per_seed, failed = records(run_tool("cka", runs, out, jobs), "cka.jsonl")
    epochs = sorted({e for s in per_seed for e in s})
    final = max(epochs) if epochs else None
    trained = [e for e in epochs if e > 0]
    early = trained[0] if trained else None
    stages = list(stage_logit_cka(per_seed[0][epochs[0]])) if per_seed and epochs else []

    def at(seed, e, stage, key="matrix"):
        rec = seed.get(e)
        if rec is None:
            return None
        vals = stage_logit_cka(rec, key)
        return _mean(vals.values()) if stage is None else vals.get(stage)

    rows, d_mean = [], agg.summarize([])
    for stage in stages + [None]:
        d = agg.summarize([_minus(at(s, early, stage), at(s, final, stage)) for s in per_seed])
        if stage is None:
            d_mean = d
        rows.append([stage or "mean over stages"]
                    + [agg.summarize([at(s, e, stage) for s in per_seed]).fmt(3)
                       for e in (0.0, early, final)]
                    + [d.fmt(3), agg.summarize([at(s, final, stage, "random_init")
                                                for s in per_seed]).fmt(3)])

    def relu(seed, e):
        rec = seed.get(e)
        return _mean((rec.get("relu_active") or {}).values()) if rec else None

    relu_row = [agg.summarize([relu(s, e) for s in per_seed]).fmt(3) for e in (0.0, early, final)]
    v = verdict_interval(d_mean)
    fig = plot_cka({st: agg.curve_from(epochs, lambda e, st=st: [at(s, e, st) for s in per_seed])
                    for st in stages},
                   {st: agg.curve_from(epochs, lambda e, st=st: [at(s, e, st, "random_init")
                                                                 for s in per_seed])
                    for st in stages},
                   agg.curve_from(epochs, lambda e: [relu(s, e) for s in per_seed]),
                   os.path.join(figdir, "cka_linearity.png"),
                   f"{base}: n = {len(per_seed)} seeds") if epochs else None
    table = agg.markdown_table(
        ["stage", "CKA with logits, epoch 0", f"epoch {_ep(early)}", f"epoch {_ep(final)}", "early − final",
         "fresh random init"], rows)
    return f"""## CKA linearity (paper 1)

Paper 1 (Ranadive et al.): early in training, when selectivity emerges, the network is close to
a linear regime. The paper does not say which statistic shows it; its code compares the stage
outputs with the logits by linear minibatch CKA, so we test that: CKA(stage output, logits) is
high early and falls with training.

`tools/cka.py RUN {' '.join(tool_args('cka', runs[0]))}` on every `{base}` seed (the run's val
split, BatchNorm statistics recomputed on its fixed training images); "fresh random init": the
same architecture newly initialised, measured on the same batches. Early = the first trained
checkpoint (epoch {_ep(early)}); early − final is paired within a seed.

{table}

Fraction of active ReLU outputs (mean over the stages): epoch 0 {relu_row[0]}, epoch
{_ep(early)} {relu_row[1]}, epoch {_ep(final)} {relu_row[2]}.{failed_note(failed, "CKA")}

**Rule.** *supports* if the interval of (early − final), the mean over stages, lies above 0;
*contradicts* if below 0; else *inconclusive*.

| claim | verdict |
|---|---|
| stage outputs are closer to the logits (CKA) early than at the end | **{v}** |
""" + (f"\n![CKA linearity]({fig})\n" if fig else "")


# ----- orientation selectivity (paper 3) ---------------------------------------------------------


def group_of(layers) -> dict:
    """{layer: its group (stem, layer1, …)}."""
    return {layer: g for g, members in layer_groups(list(layers)).items() for layer in members}


def _higher_shift(entry: dict) -> float | None:
    """The mean centred shift invariance over the stage outputs above the low layers."""
    sic = entry.get("shift_invariance_centered") or {}
    return _mean([_v(x) for layer, x in sic.items() if layer not in LOW])


def orientation_values(rec: dict) -> dict:
    """One orientation.jsonl record reduced to the study's per-seed numbers, each a mean over the
    layers of a group: gOSI of the live units and its permuted control, per group; and, after
    ablating each low layer's top or bottom half by gOSI, the val loss increase and the centred
    shift invariance of the higher stage outputs (those not in LOW: the ablated layers' own stage
    is damaged directly, not through its shift invariance)."""
    groups = group_of(rec["layers"])
    out = {"gosi": defaultdict(list), "control": defaultdict(list)}
    for layer, st in rec["layers"].items():
        out["gosi"][groups[layer]].append(_v(st.get("gosi_mean")))
        out["control"][groups[layer]].append(_v(st.get("control_gosi_mean")))
    res = {k: {g: _mean(v) for g, v in d.items()} for k, d in out.items()}
    abl = defaultdict(list)
    for row in rec.get("ablation") or []:
        if groups.get(row["layer"]) in LOW:
            abl[("loss", row["group"])].append(_v(row.get("loss_increase")))
            abl[("shift", row["group"])].append(_higher_shift(row))
    res["ablation"] = {k: _mean(v) for k, v in abl.items()}
    res["shift_base"] = _higher_shift(rec.get("baseline") or {})
    return res


def claim_orientation(runs, base: str, out: str, figdir: str, jobs: int) -> str:
    if not runs:
        return "## Orientation selectivity\n\nNo α = 0 runs: nothing to test.\n"
    per_seed, failed = records(run_tool("orientation", runs, out, jobs), "orientation.jsonl")
    vals = [{e: orientation_values(r) for e, r in s.items()} for s in per_seed]
    epochs = sorted({e for s in vals for e in s})
    final = max(epochs) if epochs else None
    group_names = list(dict.fromkeys(g for s in vals for r in s.values() for g in r["gosi"]))

    def grp(seed, e, key, names):
        r = seed.get(e)
        return _mean([r[key].get(g) for g in names]) if r else None

    def excess(seed, e, names):
        return _minus(grp(seed, e, "gosi", names), grp(seed, e, "control", names))

    rows = []
    for g in group_names:
        rows.append([g] + [agg.summarize([excess(s, e, [g]) for s in vals]).fmt(3) for e in epochs]
                    + [agg.summarize([grp(s, final, "gosi", [g]) for s in vals]).fmt(3),
                       agg.summarize([grp(s, final, "control", [g]) for s in vals]).fmt(3)])
    ex_low = agg.summarize([excess(s, final, LOW) for s in vals])
    ex_high = agg.summarize([excess(s, final, HIGH) for s in vals])
    rise = agg.summarize([_minus(grp(s, final, "gosi", LOW), grp(s, 0.0, "gosi", LOW))
                          for s in vals])

    def abl(seed, key, group):
        r = seed.get(final)
        return r["ablation"].get((key, group)) if r else None

    loss_top = agg.summarize([abl(s, "loss", "top") for s in vals])
    loss_bottom = agg.summarize([abl(s, "loss", "bottom") for s in vals])
    d_loss = agg.summarize([_minus(abl(s, "loss", "top"), abl(s, "loss", "bottom")) for s in vals])
    shift_base = agg.summarize([s[final]["shift_base"] for s in vals if final in s])
    shift_top = agg.summarize([abl(s, "shift", "top") for s in vals])
    shift_bottom = agg.summarize([abl(s, "shift", "bottom") for s in vals])
    d_shift = agg.summarize([_minus(abl(s, "shift", "bottom"), abl(s, "shift", "top"))
                             for s in vals])

    shift_px = next((r.get("baseline", {}).get("shift_px") for s in per_seed for r in s.values()),
                    None)
    higher = next(([k for k in r.get("baseline", {}).get("shift_invariance_centered", {})
                    if k not in LOW] for s in per_seed for r in s.values()), [])
    v_exist = verdict_interval(ex_low)
    v_high = verdict_interval(ex_high)
    v_both = ("supports" if v_exist == v_high == "supports" else
              "contradicts" if "contradicts" in (v_exist, v_high) else "inconclusive")
    fig = plot_orientation(
        {g: agg.curve_from(epochs, lambda e, g=g: [excess(s, e, [g]) for s in vals])
         for g in group_names},
        {"val loss increase, low-layer ablation": [("top half", loss_top),
                                                              ("bottom half", loss_bottom)],
         "shift invariance (centred), " + "+".join(higher): [("none", shift_base), ("top", shift_top),
                                                       ("bottom", shift_bottom)]},
        os.path.join(figdir, "orientation.png"),
        f"{base}: n = {len(per_seed)} seeds; bars at epoch {final:g}") if epochs else None
    table = agg.markdown_table(["layers"] + [f"gOSI − control, epoch {e:g}" for e in epochs]
                               + [f"gOSI, epoch {final:g}" if final is not None else "gOSI",
                                  "control"], rows)
    abl_table = agg.markdown_table(
        ["ablated half (low layers)", "val loss increase", "shift invariance (centred)"],
        [["none", "0", shift_base.fmt(3)], ["top by gOSI", loss_top.fmt(3), shift_top.fmt(3)],
         ["bottom by gOSI", loss_bottom.fmt(3), shift_bottom.fmt(3)],
         ["top − bottom (loss); bottom − top (shift)", d_loss.fmt(3), d_shift.fmt(3)]])
    return f"""## Orientation selectivity (paper 3)

Paper 3 (Ukita): orientation-selective units exist in low and high layers; their selectivity in
low layers rises with training; ablating the low layers' orientation-selective units hurts
generalization, at least partly by breaking the shift invariance of higher layers.

`tools/orientation.py RUN {' '.join(tool_args('orientation', runs[0]))}` on every `{base}` seed:
gOSI of each live unit to sinusoidal gratings, against a per-unit permuted control; the mean over
a group's layers (low: {', '.join(LOW)}; high: {', '.join(HIGH)}). At the final checkpoint, each
low layer's top and bottom halves by gOSI (dead units excluded) are zeroed in turn, and the val
loss increase and the centred shift invariance of the higher stage outputs ({', '.join(higher)}:
the correlation across units between an image and its {shift_px}-px circular shift, each unit's
mean removed) are averaged over the low layers. Every difference is paired within a seed.

{table}

{abl_table}{failed_note(failed, "orientation")}

**Rule.** Each row: *supports* if the interval of its statistic lies above 0, *contradicts* if
below 0, else *inconclusive*; the first row needs both the low and the high layers' (gOSI −
control) at the final checkpoint (low: {ex_low.fmt(3)}; high: {ex_high.fmt(3)}), *contradicts*
if either lies below 0. Rise: low layers' gOSI, final − epoch 0: {rise.fmt(3)}.

| claim | verdict |
|---|---|
| orientation-selective units (above the control) in low and high layers | **{v_both}** |
| low layers' orientation selectivity rises with training | **{verdict_interval(rise)}** |
| ablating low layers' selective half raises val loss more than the other half | **{verdict_interval(d_loss)}** |
| ... and lowers the higher layers' shift invariance more | **{verdict_interval(d_shift)}** |
""" + (f"\n![orientation selectivity]({fig})\n" if fig else "")
