"""The run configuration: one flat, typed schema; YAML file plus command-line overrides.

``Config`` lists every option with its type and default. ``load_config(path, overrides)`` reads a
YAML file and applies ``--key value`` overrides; an unknown key or a value of the wrong type is a
``ConfigError`` whose one line names the key, the problem and the fix. Like timm's ``-c``: a file
for the experiment, flags for what changes between runs.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field

import yaml

from .errors import ConfigError  # noqa: F401  (importable from here too)


@dataclass
class Config:
    # run
    name: str = "run"                 # run directory: <out_dir>/<name>
    out_dir: str = "runs"
    seed: int = 0
    deterministic: bool = False       # deterministic kernels (exact resume, reproducibility)
    device: str = "auto"              # auto | cpu | cuda
    threads: int = 0                  # torch.set_num_threads; 0 = torch's default
    # data
    dataset: str = "digits"           # digits | synthetic | imagefolder | cifar10
    data_dir: str = ""
    data_backend: str = "torch"       # torch | ffcv | dali
    image_size: int = 32
    augment: str = "crop"             # none | crop | crop_flip | rrc_flip
    batch_size: int = 128             # per process
    eval_batch_size: int = 256
    workers: int = 0
    synthetic_classes: int = 10
    synthetic_size: int = 1000        # training images (val gets a fifth)
    cache_dir: str = ""               # ffcv/dali derived files; "" = ~/.cache/selectivity
    ffcv_order: str = "random"        # random | quasi_random  (ffcv training order)
    os_cache: bool = True             # ffcv: read the .beton through the OS page cache (mmap)
    ffcv_train: str = ""              # ffcv: a .beton for the train split ("" = build in cache)
    ffcv_val: str = ""                # ffcv: an existing .beton for the val split
    # model
    model: str = "resnet20"
    small_stem: bool = False          # torchvision ResNets: 3×3 stride-1 stem, no max-pool
    channels_last: bool = True
    amp: bool = False                 # bf16 autocast on CPU; fp16 + GradScaler on CUDA
    compile: bool = False             # torch.compile the model
    # optimisation
    epochs: int = 10
    lr: float = 0.1                   # for batch_size × world_size = 256; scaled linearly
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"          # cosine | step | constant
    warmup_epochs: float = 0.0
    step_epochs: list = field(default_factory=lambda: [30, 60])
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    nan_policy: str = "stop"          # stop | skip  (a non-finite loss)
    # selectivity tracking (selectivity/tracker.py)
    track: bool = True                # per-class unit statistics every step and at every eval
    track_units: str = "blocks"       # blocks | relu | bn
    null_permutations: int = 10       # label permutations of the val null, accumulated in the same pass
    bn_mode: str = "recalibrate"      # recalibrate | running | batch: BatchNorm statistics at every measurement
    bn_images: int = 1024             # training images (fixed, seeded) the statistics are recomputed on
    eval_running_bn: bool = True      # recalibrate: also report acc1/loss with the running statistics
    # regularizer (selectivity/regularizer.py): loss = CE − α · minibatch SI, α by epoch window,
    # e.g. [{alpha: -1.0, start: 0, end: 5}] (start inclusive, end exclusive/absent = forever)
    selectivity_reg: list = field(default_factory=list)
    # evaluation, logging, checkpoints
    eval_every_epochs: int = 1
    eval_every_steps: int = 0         # also evaluate every N steps during the first epochs ...
    eval_steps_epochs: int = 1        # ... of this many epochs (paper 1: inside epoch 1)
    log_every_steps: int = 20
    tensorboard: bool = True
    progress: bool = True             # tqdm bar on rank 0
    save_every_epochs: int = 1
    save_every_steps: int = 0         # also checkpoint every N steps during the first epochs ...
    save_steps_epochs: int = 1        # ... of this many epochs (step_<global step>.pt)


CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "dataset": ("digits", "digits_hard", "synthetic", "imagefolder", "cifar10"),
    "data_backend": ("torch", "ffcv", "dali"),
    "augment": ("none", "crop", "crop_flip", "rrc_flip"),
    "schedule": ("cosine", "step", "constant"),
    "nan_policy": ("stop", "skip"),
    "track_units": ("blocks", "relu", "bn"),
    "bn_mode": ("recalibrate", "running", "batch"),
    "ffcv_order": ("random", "quasi_random"),
}
POSITIVE = ("batch_size", "eval_batch_size", "image_size", "epochs", "eval_every_epochs",
            "log_every_steps", "save_every_epochs", "synthetic_classes", "bn_images")
FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(key: str, value):
    """Check ``value`` against the declared type of ``key`` (ints are accepted for floats)."""
    typ = typing.get_type_hints(Config)[key]
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str),
          list: isinstance(value, list)}[typ]
    if not ok:
        raise ConfigError(f"config key {key!r} expects {typ.__name__}, got "
                          f"{type(value).__name__} {value!r}")
    if typ is not float:
        return value
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        number = math.inf
    if not math.isfinite(number):  # YAML's .nan and .inf: no setting means either
        raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
    return number


def _check_key(key: str) -> None:
    if key not in FIELDS:
        near = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"unknown config key {key!r}{hint}; valid keys are listed in "
                          f"selectivity/config.py")


def validate(cfg: Config) -> Config:
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"config key {key!r}: unknown value {getattr(cfg, key)!r}; "
                              f"choose one of {', '.join(choices)}")
    for key in POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {getattr(cfg, key)}")
    from .models import MODELS
    if cfg.model not in MODELS:
        raise ConfigError(f"config key 'model': unknown model {cfg.model!r}; "
                          f"choose one of {', '.join(MODELS)}")
    return cfg


def from_dict(values: dict, base: Config | None = None) -> Config:
    cfg = dataclasses.replace(base) if base else Config()
    for key, value in values.items():
        _check_key(key)
        setattr(cfg, key, _coerce(key, value))
    return validate(cfg)


def parse_override(key: str, text: str):
    """A command-line string → a value of the key's type (YAML syntax: 1e-3, true, [1, 2])."""
    _check_key(key)
    typ = typing.get_type_hints(Config)[key]
    if typ is str:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"config key {key!r}: cannot parse {text!r} as {typ.__name__}") from None


def load_config(path: str | None, overrides: dict | None = None) -> Config:
    """Config from a YAML file (or defaults when ``path`` is None) plus overrides."""
    values = {}
    if path:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: "
                              f"{str(e).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of key: value")
    values.update(overrides or {})
    return from_dict(values)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    from .checkpoint import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
