"""The callbacks a config switches on (tracking, regularizer, …), in the order they run."""
from __future__ import annotations


class Callback:
    """Extension points of the loop; every method is optional."""

    def setup(self, trainer) -> None: ...
    def before_batch(self, trainer, images, labels, train: bool) -> None: ...
    def after_batch(self, trainer) -> None: ...
    def loss_terms(self, trainer, images, labels, logits) -> dict: return {}
    def after_step(self, trainer, images, labels, logits) -> None: ...
    def train_log(self, trainer) -> dict: return {}
    def eval_begin(self, trainer) -> None: ...
    def eval_batch(self, trainer, images, labels, logits) -> None: ...
    def eval_end(self, trainer, record: dict) -> dict: return {}
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: ...


def tracking_callbacks(cfg) -> list:
    from .tracker import Tracker
    return [Tracker(cfg.track_units, cfg.seed)]


def regularizer_callbacks(cfg, alpha: float | None = None) -> list:
    """The selectivity regularizer for cfg.selectivity_reg; ``alpha``: a constant α instead."""
    from .regularizer import regularizer_callbacks as build
    return build(cfg, alpha)


def default_callbacks(cfg) -> list:
    callbacks = []
    if cfg.track:
        callbacks += tracking_callbacks(cfg)
    callbacks += regularizer_callbacks(cfg)  # validates the windows; none configured → []
    return callbacks
