"""The callbacks a config switches on (tracking, regularizer, …), in the order they run."""
from __future__ import annotations


def default_callbacks(cfg) -> list:
    return []
