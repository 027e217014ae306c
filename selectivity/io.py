"""The one way to write analysis outputs: JSON-lines files and figures, atomically.

Both go through ``checkpoint.atomic_write_bytes``-style writes (a temp file in the same directory,
fsync, rename), so a failure leaves the earlier file intact and no temp file, and is reported as
the one ``cannot write <path>: ...`` error whatever the library underneath raised.
"""
from __future__ import annotations

import io
import json
import math
import os

from .checkpoint import atomic_write_text


def json_ready(value):
    """Nested dicts / lists of numbers with NaN and inf as null (JSON has neither)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_jsonl(path: str, records) -> None:
    """Rewrite ``path`` with one JSON object per record, atomically."""
    atomic_write_text(path, "".join(json.dumps(json_ready(r)) + "\n" for r in records))


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file (a torn last line from a killed writer is ignored)."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return records


def save_figure(fig, path: str, dpi: int = 120) -> str:
    """Render a matplotlib figure to PNG in memory, then write it atomically; closes the figure."""
    import matplotlib.pyplot as plt
    from .checkpoint import atomic_write_bytes, makedirs

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    makedirs(os.path.dirname(os.path.abspath(path)))
    atomic_write_bytes(path, buf.getvalue())
    return path
