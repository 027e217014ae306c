"""The GPU check's verdicts and its readable report, $OUT/gpu_check.md (selectivity.gpucheck.stages report)."""
from __future__ import annotations

from selectivity.gpucheck.common import finite

TRACKED_BLOCKS = 16  # ResNet-50's residual blocks: what units="blocks" must hook


def _verdict(name, value, ok, correctness, target=""):
    return {"name": name, "target": target, "value": value, "pass": ok, "correctness": correctness}


def _counts(c: dict) -> str:
    return f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"


def verdicts(stages: dict, dry_run: bool) -> list:
    """One entry per target; ``pass`` None where the stage did not produce the figure.

    ``correctness`` marks what makes the check fail (exit 1); the speed targets are read, not
    enforced, since a missed one is a finding to work on, not a broken build.
    """
    out = []
    b = stages["build"]
    if b["status"] != "not run":
        what = "CPU kernels of the module `make` built load (dry run: nothing compiled)" if dry_run \
            else f"built for sm_{str(b.get('arch', '?')).replace('.', '')} with CUDA kernels registered"
        out.append(_verdict("extension builds and loads", what if b["status"] == "ok" else b["status"],
                            b["status"] == "ok", True))
    t = stages["tests"]
    if t["status"] != "not run":
        value = t["status"] if "cuda" not in t else \
            f"CUDA: {_counts(t['cuda'])}; all selected: {_counts(t['all'])}; " \
            f"{t['skipped_for_no_gpu']} skipped for want of a GPU"
        out.append(_verdict("every CUDA test passes", value, t["status"] == "ok", True,
                            "all pass, none skipped for want of a GPU" +
                            (" (dry run: they skip)" if dry_run else "")))
    tr = stages["train"]
    for amp in ("bf16", "fp16"):
        res = tr.get("amps", {}).get(amp)
        if tr["status"] == "not run":
            break
        if not res or res.get("status") != "ok":
            status = res["status"] if res and res.get("status") != "running" else tr["status"]
            if res and res.get("variants"):  # cut off mid-way: say how far it got
                status += f"; {len(res['variants']['off']['step_ms'])} of {tr['config']['rounds']} rounds timed"
            out.append(_verdict(f"ResNet-50 {amp} step", status, None, False))
            continue
        ref = res["tracker_vs_reference"]
        out.append(_verdict(f"tracker's sums equal the float64 reference ({amp})",
                            f"{ref['layers']} layers, worst error {ref['max_rel_err']:.1e} of max|sums|",
                            ref["pass"], True, "≤ 1e-6, one batch"))
        layers_ok = res["tracked_layers"] == TRACKED_BLOCKS and res["si_finite"]
        out.append(_verdict(f"tracking hooks every block ({amp})",
                            f"{res['tracked_layers']} layers, {res['tracked_units']} units, SI finite: "
                            f"{res['si_finite']}", layers_ok, True, f"{TRACKED_BLOCKS} layers"))
        for v, label in (("on", "tracking on ÷ off"), ("si", "SI every step ÷ off")):
            r = res[f"ratio_{v}"]
            out.append(_verdict(f"{label} ({amp}), images/s", f"{r['value']:.3f} (rounds "
                                f"{r['per_round_min']:.3f}–{r['per_round_max']:.3f})",
                                r["pass"], False, f"≥ {r['target']}"))
    out += _trainer_verdicts(stages["trainer"]) + _ffcv_verdicts(stages["ffcv"])
    o = stages["ops"]
    if o["status"] != "not run":
        cases = o.get("cases", [])
        if cases:
            bad = [c for c in cases if not c["correct"]["pass"]]
            value = f"{len(cases) - len(bad)} of {len(cases)} cases"
            if bad:
                value += f"; worst error {max(c['correct']['max_rel_err'] for c in bad):.2e}"
            out.append(_verdict("accumulate equals the float64 reference", value, not bad, True, "every case"))
            w = max(cases, key=lambda c: c["ratio"])
            out.append(_verdict("accumulate ÷ x.sum(), time, worst case",
                                f"{w['ratio']:.3f} ({w['shape']} {w['dtype']} {w['layout']}); "
                                f"{sum(c['pass'] for c in cases)} of {len(cases)} within",
                                all(c["pass"] for c in cases) if o["status"] == "ok" else None, False, "≤ 1.2"))
        else:
            out.append(_verdict("accumulate ÷ x.sum()", o["status"], None, False, "≤ 1.2"))
    return out


def _trainer_verdicts(st: dict) -> list:
    out = []
    for amp, res in st.get("amps", {}).items():
        if res.get("status") != "ok":
            out.append(_verdict(f"the trainer trains ({amp})", res.get("status", st["status"]), None, False))
            continue
        for label, r in res["ratios"].items():
            if r["target"] is not None:
                out.append(_verdict(f"{label} (trainer, {amp}), images/s", f"{r['value']:.3f} (rounds "
                                    f"{r['per_round_min']:.3f}–{r['per_round_max']:.3f})", r["pass"], False,
                                    f"≥ {r['target']}"))
    return out


def _ffcv_verdicts(st: dict) -> list:
    b = st.get("bundle")
    if st["status"] == "not run" or b is None:
        return [] if st["status"] == "not run" else [_verdict("FFCV bundle", st["status"], None, True)]
    value = "; ".join(b["problems"]) if b["problems"] else \
        f"verified (ldd closure, size), loads under {b.get('python')}: resize exact, JPEG within " \
        f"{b.get('decode_max_diff')} levels"
    return [_verdict("FFCV bundle is whole and FFCV's extension works from it", value, not b["problems"], True,
                     "every library from the bundle or the system set")]


def _trainer_markdown(tr: dict) -> list:
    c = tr["config"]
    lines = ["", f"## The trainer (tools/train.py's `Trainer`; ResNet-50, batch {c['batch']}, {c['size']} px, "
             f"K = {c['classes']}, channels_last, {c['data']}; {c['rounds']} rounds × {c['steps']} steps per "
             "variant after one warm-up round, interleaved)", "",
             "| AMP | variant | images/s | ms per round (min–max) | peak memory GiB |", "|---|---|---|---|---|"]
    for amp, res in tr["amps"].items():
        for v, d in res.get("variants", {}).items():
            if d.get("round_ms"):
                lines.append(f"| {amp} | {v} | {_f(d.get('images_per_s'), '{:.0f}')} | {min(d['round_ms']):.1f}–"
                             f"{max(d['round_ms']):.1f} | {_f(d.get('peak_memory_gib'))} |")
        for label, r in res.get("ratios", {}).items():
            lines.append(f"| {amp} | {label} | {r['value']:.3f} | rounds {r['per_round_min']:.3f}–"
                         f"{r['per_round_max']:.3f} | target {'–' if r['target'] is None else r['target']} |")
        ev = res.get("evaluation")
        if ev:
            lines.append(f"| {amp} | evaluation, BN {ev['bn_mode']} | acc1 {_f(ev['acc1'], '{:.3f}')} (running BN "
                         f"{_f(ev.get('acc1_running'), '{:.3f}')}), SI mean {_f(ev.get('si_mean'), '{:.3f}')} | "
                         f"{ev['seconds']} s | |")
        if res.get("checkpoint"):
            lines.append(f"| {amp} | checkpoint | {res['checkpoint']['mib']:.0f} MiB | {res['checkpoint']['seconds']} s | |")
    for amp, res in tr["amps"].items():
        p = res.get("profile")
        if res.get("profile_error"):
            lines += ["", f"Profile of one bare {amp} step: failed ({res['profile_error']})."]
        if p:
            lines += ["", f"Profile of one bare {amp} step ({p['clock']} time, {p['total_ms']:.1f} ms in all; "
                      f"top {len(p['top'])}):", "", "| kernel / op | calls | ms | share |", "|---|---|---|---|"]
            lines += [f"| `{e['name'].replace('|', '/')}` | {e['calls']} | {e['ms']:.2f} | {e['share']:.1%} |"
                      for e in p["top"]]
    return lines


def _ffcv_markdown(ff: dict, trainer: dict) -> list:
    c = ff["config"]
    lines = ["", f"## FFCV's GPU pipeline (the trainer with `--data-backend ffcv`, {c['amp']}, tracking off, "
             f"{c['augment']} to {c['size']} px, batch {c['batch']})", ""]
    b = ff.get("bundle", {})
    lines.append(f"Bundle: {'; '.join(b['problems']) if b.get('problems') else 'verified'}; FFCV from "
                 f"`{ff.get('ffcv_file', '–')}`.")
    im = ff.get("images")
    if im:
        lines.append(f"Data: {im['images']} generated JPEGs, mean {im['mean_kib']:.0f} KiB and "
                     f"{im['mean_pixels'] / 1e3:.0f} kpixels, made in {im['seconds']} s; trainer set-up with "
                     f"both .betons written: {_f(ff.get('trainer_setup_s'))} s; the loader's first epoch "
                     f"(numba compiling): {_f((ff.get('loader_warmup_ms') or 0) / 1e3)} s.")
    synth = trainer.get("amps", {}).get(c["amp"], {}).get("variants", {}).get("off", {}).get("images_per_s")
    lines += ["", "| what | images/s | ÷ synthetic |", "|---|---|---|",
              f"| trainer on synthetic batches made on the GPU (trainer stage, {c['amp']}, off) | {_f(synth, '{:.0f}')} | 1 |"]
    for key, label in (("loader", "FFCV loader alone (decode, crop, to the GPU)"), ("train", "trainer through FFCV")):
        r = ff.get(key)
        if r:
            ratio = r["images_per_s"] / synth if finite(synth) and synth else None
            lines.append(f"| {label} | {r['images_per_s']:.0f} | {_f(ratio, '{:.3f}')} |")
    if ff.get("loader") and finite(synth):
        bound = ff["loader"]["images_per_s"] < synth
        lines.append("")
        lines.append("Data-loading bound: " + ("yes: the loader alone is slower than the synthetic step" if bound
                                               else "no: the loader alone is faster than the synthetic step") + ".")
    return lines


def _mark(ok) -> str:
    return "not measured" if ok is None else "PASS" if ok else "FAIL"


def _f(x, fmt="{:.1f}"):
    return fmt.format(x) if finite(x) else "–"


def write_markdown(report: dict, path: str) -> None:
    env, st = report["env"], report["stages"]
    gpu = env.get("gpu") or {}
    lines = [f"# GPU check, {env['utc']}" + (" — DRY RUN" if report["dry_run"] else ""), ""]
    if report["dry_run"]:
        lines += ["**Dry run: the CPU at tiny sizes, no CUDA call. Every figure below only shows that the "
                  "check runs; none is a measurement.**", ""]
    where = f"{gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']:.0f} GiB, {gpu['multiprocessors']} SMs; " \
            f"nvidia-smi: {env.get('nvidia_smi')})" if gpu else "CPU"
    lines += [f"Machine: {where}; {env['cpus']} CPUs; Python {env['python']} ({env['executable']}); "
              f"torch {env['torch']} (CUDA {env['torch_cuda']}); nvcc {st['build'].get('nvcc', '–')}.", "",
              f"Exit status: {report['exit']} (0 all correct, 1 a correctness check failed, 3 a benchmark "
              "stage failed).", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {n} | {s['status']} | {s.get('stage_seconds', '–')} |" for n, s in st.items()]
    lines += ["", "## Verdicts", "", "| check | target | value | verdict |", "|---|---|---|---|"]
    dry = " (dry run)" if report["dry_run"] else ""
    lines += [f"| {v['name']} | {v['target']} | {v['value']} | {_mark(v['pass'])}{'' if v['correctness'] else dry} |"
              for v in report["verdicts"]]
    t = st["tests"]
    if t.get("failed_ids"):
        lines += ["", "Failed tests:", ""] + [f"- `{i}`" for i in t["failed_ids"]]
    if st["build"].get("log_tail"):
        lines += ["", "Build log, last lines:", "", "```", st["build"]["log_tail"].rstrip(), "```"]
    tr = st["train"]
    if tr.get("amps"):
        c = tr["config"]
        lines += ["", f"## ResNet-50 training step (batch {c['batch']}, {c['size']} px, K = {c['classes']}, "
                  f"channels_last, {c['rounds']} rounds × {c['steps']} steps per variant after "
                  f"{c['warmup']} warm-up steps; `SelectivityTracker(model, {c['classes']}, units=\"blocks\")`; "
                  f"extension loaded: {tr.get('has_extension')})", "",
                  "| AMP | variant | images/s | ms/step (median round) | ÷ off |", "|---|---|---|---|---|"]
        for amp, res in tr["amps"].items():
            for v, d in res.get("variants", {}).items():
                if not d.get("step_ms"):
                    continue
                ms = sorted(d["step_ms"])[len(d["step_ms"]) // 2]
                ratio = res.get(f"ratio_{v}", {}).get("value", 1.0 if v == "off" else None)
                lines.append(f"| {amp} | {v} | {_f(d.get('images_per_s'), '{:.0f}')} | {_f(ms, '{:.2f}')} | "
                             f"{_f(ratio, '{:.3f}')} |")
            if "grad_scale" in res:
                lines.append(f"| {amp} | final GradScaler scale | off {res['grad_scale']['off']:g}, "
                             f"tracked {res['grad_scale']['tracked']:g} (from 1024; each halving: a skipped step) | | |")
            if "peak_memory_gib" in res:
                lines.append(f"| {amp} | peak memory | {res['peak_memory_gib']:.1f} GiB | | |")
    if st["trainer"].get("amps"):
        lines += _trainer_markdown(st["trainer"])
    if st["ffcv"].get("config"):
        lines += _ffcv_markdown(st["ffcv"], st["trainer"])
    o = st["ops"]
    if o.get("cases"):
        cp = o["copy"]
        lines += ["", f"## accumulate vs x.sum() (batch {o['batch']}, K = {o['classes']}, median of {o['reps']} "
                  f"calls each after an L2 flush; extension loaded: {o['has_extension']})", "",
                  f"Copy bandwidth: {cp['gb_per_s_read_plus_written']:.0f} GB/s (read + written, "
                  f"{cp['bytes'] / 2**20:.0f} MiB copied).", "",
                  "| shape | dtype | layout | accumulate ms | sum ms | ratio | acc GB/s | sum GB/s | acc ÷ copy bw | "
                  "correct |", "|---|---|---|---|---|---|---|---|---|---|"]
        for c in o["cases"]:
            lines.append(f"| {c['shape']} | {c['dtype']} | {c['layout']} | {c['accumulate_ms']:.3f} | "
                         f"{c['sum_ms']:.3f} | {c['ratio']:.2f} | {c['accumulate_gb_per_s']:.0f} | "
                         f"{c['sum_gb_per_s']:.0f} | {c['accumulate_of_copy_bw']:.2f} | "
                         f"{'yes' if c['correct']['pass'] else 'NO (%.1e)' % c['correct']['max_rel_err']} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
