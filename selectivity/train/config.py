"""The run configuration: one flat, typed schema in sections; YAML file plus command-line overrides.

``Config`` lists every option with its section (run, data, model, optimization, tracking,
regularizer, evaluation), type, default and a one-line meaning (the field's ``metadata``: the one
list, which ``tools/train.py --help`` prints by section). A run hands the rest of the package
parts of it, not the whole: ``data_spec(cfg)`` is all that loaders see. ``load_config(path,
overrides)`` reads a YAML file and applies ``--key value`` overrides; an unknown key, a value of
the wrong type or out of range, a duplicated YAML key or an unreadable file is a ``ConfigError``
whose one line names the key, the problem and the fix, raised before anything is written. Like
timm's ``-c``: a file for the experiment, flags for what changes between runs.

YAML 1.1 (PyYAML) reads ``1e-3`` as a string; the loader here reads it as the float YAML 1.2 and
every user mean. Keys that may change when a run is resumed are ``RESUMABLE`` (see there).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field

import yaml

from selectivity.io import atomic_write_text
from selectivity.errors import ConfigError  # noqa: F401  (importable from here too)
from selectivity.pipelines.spec import FIELDS as DATA_FIELDS, DataSpec


SECTIONS = ("run", "data", "model", "optimization", "tracking", "regularizer", "evaluation")


def _opt(section: str, default, help: str):
    """A schema field: its section (``--help`` groups by it), default and one-line meaning."""
    meta = {"help": help, "section": section}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # run
    name: str = _opt("run", "run", "run directory name: the run lives in <out_dir>/<name>")
    out_dir: str = _opt("run", "runs", "parent directory of the run directories")
    seed: int = _opt("run", 0, "seed of the initialisation, the data order and every augmentation")
    deterministic: bool = _opt("run", False,
        "deterministic kernels (bit-exact reruns and resumes; slower on CUDA)")
    device: str = _opt("run", "auto", "auto (CUDA when visible) | cpu | cuda")
    threads: int = _opt("run", 0, "torch.set_num_threads; 0 = torch's default")
    # data
    dataset: str = _opt("data", "digits", "digits | digits_hard | synthetic | imagefolder | cifar10")
    data_dir: str = _opt("data", "",
        "imagefolder: <dir>/train/<class>/*, <dir>/val/<class>/*; cifar10: its python batches")
    data_backend: str = _opt("data", "torch",
        "torch (DataLoader) | ffcv (.beton, built on first use) | dali | device (synthetic "
        "batches made on the device: benchmarks)")
    image_size: int = _opt("data", 32, "side in pixels of the images the model sees")
    augment: str = _opt("data", "crop", "training augmentation: none | crop | crop_flip | rrc_flip")
    batch_size: int = _opt("data", 128, "training images per step, per process")
    eval_batch_size: int = _opt("data", 256, "validation images per batch, per process")
    workers: int = _opt("data", 0,
        "torch: DataLoader worker processes (0 = in the main process); ffcv, dali: threads (0 = "
        "one per CPU core)")
    synthetic_classes: int = _opt("data", 10, "synthetic: number of classes")
    synthetic_size: int = _opt("data", 1000, "synthetic: training images (val gets a fifth)")
    cache_dir: str = _opt("data", "",
        "ffcv/dali derived files (.beton, PNG exports, image checks); empty = $SELECTIVITY_CACHE "
        "or ~/.cache/selectivity")
    ffcv_order: str = _opt("data", "random", "ffcv training order: random | quasi_random")
    os_cache: bool = _opt("data", True, "ffcv: read the .beton through the OS page cache (mmap)")
    ffcv_train: str = _opt("data", "",
        "ffcv: a .beton for the train split (empty = build one in cache_dir)")
    ffcv_val: str = _opt("data", "", "ffcv: a .beton for the val split (empty = build one in cache_dir)")
    # model
    model: str = _opt("model", "resnet20",
        "resnet20 | resnet32 | resnet56 (CIFAR-style) | resnet18 | resnet50 (torchvision)")
    small_stem: bool = _opt("model", False,
        "torchvision ResNets: 3x3 stride-1 stem, no max-pool (for 32-64 px images)")
    channels_last: bool = _opt("model", True, "channels_last memory format for the model and the images")
    amp: bool = _opt("model", False, "mixed precision (native torch.amp autocast), dtype amp_dtype")
    amp_dtype: str = _opt("model", "auto",
        "auto (bf16 on CPU, fp16 on CUDA) | fp16 (with GradScaler) | bf16 (no scaler)")
    compile: bool = _opt("model", False, "torch.compile the model")
    # optimisation
    epochs: int = _opt("optimization", 10, "training epochs")
    lr: float = _opt("optimization", 0.1,
        "SGD learning rate after warmup (used as given: not scaled with batch size)")
    momentum: float = _opt("optimization", 0.9, "SGD momentum, in [0, 1)")
    nesterov: bool = _opt("optimization", False, "Nesterov momentum (needs momentum > 0)")
    weight_decay: float = _opt("optimization", 5e-4, "SGD weight decay (L2), >= 0")
    schedule: str = _opt("optimization", "cosine", "learning-rate schedule after warmup: cosine | step | constant")
    warmup_epochs: float = _opt("optimization", 0.0, "linear learning-rate warmup, per step, over this many epochs")
    step_epochs: list = _opt("optimization", [30, 60],
        "schedule step: the epochs at which the learning rate is multiplied by step_gamma")
    step_gamma: float = _opt("optimization", 0.1,
        "schedule step: the learning-rate factor at each of step_epochs, > 0")
    label_smoothing: float = _opt("optimization", 0.0, "cross-entropy label smoothing, in [0, 1)")
    nan_policy: str = _opt("optimization", "stop",
        "a non-finite loss: stop (the last good checkpoint is kept) | skip (the step is skipped "
        "and counted)")
    # selectivity tracking (selectivity/tracker.py)
    track: bool = _opt("tracking", True,
        "selectivity tracking: per-class unit statistics every step and at every evaluation")
    track_units: str = _opt("tracking", "blocks",
        "the units tracked: blocks (residual block outputs) | relu | bn")
    track_negative: str = _opt("tracking", "error",
        "negative responses (bn, GELU, ...): error (stop) | relu (their positive part) | shift "
        "(each unit's lowest class mean subtracted: not the papers' SI); tracking and regularizer")
    train_si_decay: float = _opt("tracking", 0.0,
        "train SI state: 0 = the current epoch's images; λ in (0, 1) = exponentially weighted "
        "by step (the recent network); its SI is logged every step")
    null_permutations: int = _opt("tracking", 10,
        "label permutations of the val null, accumulated in the same pass")
    bn_mode: str = _opt("tracking", "recalibrate",
        "recalibrate | running | batch: BatchNorm statistics at every measurement")
    bn_images: int = _opt("tracking", 1024, "training images (fixed, seeded) the statistics are recomputed on")
    eval_running_bn: bool = _opt("tracking", True,
        "recalibrate: also report acc1/loss with the running statistics")
    # regularizer (selectivity/regularizer.py): loss = CE − α · minibatch SI, α by epoch window,
    # e.g. [{alpha: -1.0, start: 0, end: 5}] (start inclusive, end exclusive/absent = forever)
    selectivity_reg: list = _opt("regularizer", [],
        "selectivity regularizer, loss = CE - alpha * minibatch SI, by epoch window: [{alpha: A, "
        "start: E0, end: E1}]")
    # evaluation, logging, checkpoints
    eval_every_epochs: int = _opt("evaluation", 1, "evaluate every N epochs (and after the last)")
    eval_every_steps: int = _opt("evaluation", 0,
        "also evaluate every N steps during the first eval_steps_epochs epochs; 0 = never")
    eval_steps_epochs: int = _opt("evaluation", 1, "the number of first epochs in which eval_every_steps applies")
    log_every_steps: int = _opt("evaluation", 20, "a train record (loss, acc1, lr, img/s) every N steps")
    tensorboard: bool = _opt("evaluation", True, "write TensorBoard events to <run>/tb")
    progress: bool = _opt("evaluation", True, "a progress bar and a line per epoch on rank 0")
    save_every_epochs: int = _opt("evaluation", 1, "checkpoint every N epochs (and after the last)")
    save_every_steps: int = _opt("evaluation", 0,
        "also checkpoint every N steps during the first save_steps_epochs epochs (step_<S>.pt); 0"
        " = never")
    save_steps_epochs: int = _opt("evaluation", 1, "the number of first epochs in which save_every_steps applies")


CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "dataset": ("digits", "digits_hard", "synthetic", "imagefolder", "cifar10"),
    "data_backend": ("torch", "ffcv", "dali", "device"),
    "amp_dtype": ("auto", "fp16", "bf16"),
    "augment": ("none", "crop", "crop_flip", "rrc_flip"),
    "schedule": ("cosine", "step", "constant"),
    "nan_policy": ("stop", "skip"),
    "track_units": ("blocks", "relu", "bn"),
    "track_negative": ("error", "relu", "shift"),
    "bn_mode": ("recalibrate", "running", "batch"),
    "ffcv_order": ("random", "quasi_random"),
}
POSITIVE = ("batch_size", "eval_batch_size", "image_size", "epochs", "eval_every_epochs",
            "log_every_steps", "save_every_epochs", "synthetic_classes", "bn_images")
# Ranges beyond the type: [0, ∞) here, [0, 1) in BELOW_ONE (a value the optimizer or the loss
# would reject only after the run directory was written, or would take without meaning anything).
NON_NEGATIVE = ("train_si_decay", "lr", "momentum", "weight_decay", "warmup_epochs",
                "label_smoothing", "workers", "threads", "eval_every_steps", "eval_steps_epochs",
                "save_every_steps", "save_steps_epochs")
BELOW_ONE = ("momentum", "label_smoothing", "train_si_decay")
# An image side the loaders would try to allocate without a second thought (100000 px: 30 GB
# per image); 4096 is 18x ImageNet's 224 and still fits a batch in memory.
MAX_IMAGE_SIZE = 4096
FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# Keys that may differ when a run is resumed: how long it runs, how often it evaluates, logs and
# saves, and how it is executed. None of them changes what a finished run's numbers mean (the
# cosine schedule is a function of epochs: a changed ``epochs`` stretches it from the resume point
# on). They are applied and recorded in metrics.jsonl ({"split": "config_change", ...}). Any other
# difference (the model, the data, the optimisation, the seed, ...) is refused unless
# ``--accept-config-change`` is given; then it is applied and recorded too.
RESUMABLE = ("epochs", "eval_every_epochs", "eval_every_steps", "eval_steps_epochs",
             "log_every_steps", "save_every_epochs", "save_every_steps", "save_steps_epochs",
             "tensorboard", "progress", "workers", "threads", "device", "cache_dir", "os_cache",
             "compile")
# Where the run directory is, not how the run runs: a moved or renamed run resumes as it was.
LOCATION = ("name", "out_dir")


def help_of(key: str) -> str:
    return FIELDS[key].metadata["help"]


def keys_of(section: str) -> list[str]:
    """The config keys of a section, in schema order."""
    return [k for k, f in FIELDS.items() if f.metadata["section"] == section]


def data_spec(cfg: Config) -> DataSpec:
    """The run's ``DataSpec``: what every loader, analysis and study step is given."""
    return DataSpec(**{k: getattr(cfg, k) for k in DATA_FIELDS})


def amp_dtype(cfg: Config, device_type: str):
    """The autocast dtype of a run on ``device_type``: ``amp_dtype``, or for ``auto`` bf16 on the
    CPU and fp16 on CUDA. fp16 is the dtype that needs a GradScaler."""
    import torch
    name = cfg.amp_dtype if cfg.amp_dtype != "auto" else ("fp16" if device_type == "cuda" else "bf16")
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[name]


# ---- YAML --------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a duplicated key (PyYAML keeps the last value silently) and
    reads YAML 1.2 floats such as ``1e-3`` (YAML 1.1 needs a dot: ``1.0e-3``)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges; explicit keys may override merged ones
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicated key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"))


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: the problem and where (PyYAML's own text spans several lines)."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem:
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return f"{problem}{where}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def yaml_load(text: str):
    """``text`` parsed with this module's loader (duplicates refused, 1e-3 a float)."""
    return yaml.load(text, Loader=_Loader)


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
    if not isinstance(key, str):
        raise ConfigError(f"config keys are names; got {type(key).__name__} {key!r}")
    if key not in FIELDS:
        near = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"unknown config key {key!r}{hint}; valid keys are listed in "
                          f"selectivity/train/config.py (tools/train.py --help lists them)")


def validate(cfg: Config) -> Config:
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"config key {key!r}: unknown value {getattr(cfg, key)!r}; "
                              f"choose one of {', '.join(choices)}")
    for key in POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {getattr(cfg, key)}")
    for key in NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {getattr(cfg, key)}")
    for key in BELOW_ONE:
        if getattr(cfg, key) >= 1:
            raise ConfigError(f"config key {key!r} must be in [0, 1), got {getattr(cfg, key)}")
    if cfg.image_size > MAX_IMAGE_SIZE:
        raise ConfigError(f"config key 'image_size' must be <= {MAX_IMAGE_SIZE}, got "
                          f"{cfg.image_size}")
    if cfg.nesterov and cfg.momentum == 0:
        raise ConfigError("config key 'nesterov': Nesterov momentum needs momentum > 0 "
                          "(momentum is 0); set momentum or nesterov: false")
    if cfg.step_gamma <= 0:
        raise ConfigError(f"config key 'step_gamma' must be > 0, got {cfg.step_gamma}")
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e)
               and e >= 0 for e in cfg.step_epochs):
        raise ConfigError(f"config key 'step_epochs' must be a list of epochs (numbers >= 0), "
                          f"got {cfg.step_epochs!r}")
    if cfg.name in ("", ".", "..") or "/" in cfg.name or "\0" in cfg.name:
        raise ConfigError(f"config key 'name' must be one directory name (no '/'), got "
                          f"{cfg.name!r}")
    from selectivity.train.models import MODELS
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
        return yaml_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"config key {key!r}: cannot parse {text!r} as {typ.__name__}") from None


def parse_sets(items: list[str]) -> dict:
    """``["epochs=4", "lr=0.05"]`` (the tools' ``--set`` flags) → {"epochs": 4, "lr": 0.05}, each
    value typed and checked as a flag of tools/train.py would be."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key] = parse_override(key, value)
    return out


def check_machine(cfg: Config) -> None:
    """What only this machine can tell: ``device: cuda`` needs a visible GPU. Kept out of
    ``validate`` so a run trained on a GPU can still be analysed on a machine without one."""
    if cfg.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("config key 'device' is cuda, but no CUDA device is visible; use "
                              "device: cpu (or auto)")


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; name a YAML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                          f"offset {e.start}); save it as UTF-8") from None


def load_config(path: str | None, overrides: dict | None = None) -> Config:
    """Config from a YAML file (or defaults when ``path`` is None) plus overrides."""
    values = {}
    if path:
        text = _read_text(path)
        try:
            values = yaml_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
        except RecursionError:
            raise ConfigError(f"config file {path} nests too deeply to be a config") from None
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of key: value")
    values.update(overrides or {})
    return from_dict(values)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
