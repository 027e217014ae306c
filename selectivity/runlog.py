"""The run directory's logs: ``metrics.jsonl`` (one JSON object per line) and TensorBoard.

Only rank 0 writes. On resume from a checkpoint taken at global step S, lines logged after S by the
killed run are dropped (the file is rewritten atomically) and TensorBoard purges events after S,
so a resumed run's logs read exactly like an uninterrupted run's.
"""
from __future__ import annotations

import json
import math
import os

from .checkpoint import atomic_write_text


def run_paths(run_dir: str) -> dict:
    return {k: os.path.join(run_dir, v) for k, v in {
        "config": "config.yaml", "metrics": "metrics.jsonl", "checkpoints": "checkpoints",
        "selectivity": "selectivity", "tb": "tb", "figures": "figures"}.items()}


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics.jsonl (a torn last line from a killed run is ignored)."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return records


def _clean(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class RunLog:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.paths = run_paths(run_dir)
        self.tb = None
        if not enabled:
            return
        for key in ("checkpoints", "selectivity", "figures"):
            os.makedirs(self.paths[key], exist_ok=True)
        keep = [] if resume_step is None else \
            [r for r in read_metrics(self.paths["metrics"]) if r.get("step", 0) <= resume_step]
        atomic_write_text(self.paths["metrics"], "".join(json.dumps(r) + "\n" for r in keep))
        self._file = open(self.paths["metrics"], "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(self.paths["tb"], purge_step=resume_step)

    def write(self, record: dict) -> None:
        """Append one record; its numeric top-level values also go to TensorBoard as split/key."""
        if not self.enabled:
            return
        record = _clean(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            split, step = record.get("split", "train"), record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and key not in ("step", "epoch"):
                    self.tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self.tb is not None:
                self.tb.close()
