"""Config schema: unknown keys, wrong types and out-of-range values are one-line errors raised
before anything is written; CLI bad input exits cleanly; --help lists every key."""
import dataclasses
import os
import re
import typing

import pytest

from selectivity.train.config import FIELDS, Config, ConfigError, load_config, parse_override


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "epochs: 3\nlr: 1\n"), {"batch_size": 32})
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (3, 1.0, 32)
    assert isinstance(cfg.lr, float)


@pytest.mark.parametrize("text, message", [
    ("epoch: 3\n", "unknown config key 'epoch' (did you mean 'epochs'?)"),
    ("epochs: ten\n", "config key 'epochs' expects int, got str 'ten'"),
    ("lr: true\n", "config key 'lr' expects float, got bool"),
    ("model: resnet7\n", "unknown model 'resnet7'"),
    ("dataset: mnist\n", "unknown value 'mnist'"),
    ("batch_size: 0\n", "'batch_size' must be > 0"),
    ("step_gamma: .nan\n", "config key 'step_gamma' must be a finite number, got nan"),
    ("lr: .inf\n", "config key 'lr' must be a finite number, got inf"),
    ("lr: 1" + "0" * 400 + "\n", "config key 'lr' must be a finite number, got 1000"),
    ("- 1\n", "must hold a mapping"),
    ("lr: -0.1\n", "config key 'lr' must be >= 0, got -0.1"),
    ("momentum: -0.5\n", "config key 'momentum' must be >= 0, got -0.5"),
    ("momentum: 1.5\n", "config key 'momentum' must be in [0, 1), got 1.5"),
    ("weight_decay: -1e-4\n", "config key 'weight_decay' must be >= 0, got -0.0001"),
    ("nesterov: true\nmomentum: 0\n", "'nesterov': Nesterov momentum needs momentum > 0"),
    ("workers: -1\n", "config key 'workers' must be >= 0, got -1"),
    ("threads: -4\n", "config key 'threads' must be >= 0, got -4"),
    ("label_smoothing: 2\n", "config key 'label_smoothing' must be in [0, 1), got 2.0"),
    ("label_smoothing: -0.1\n", "config key 'label_smoothing' must be >= 0"),
    ("step_epochs: [a, b]\n", "config key 'step_epochs' must be a list of epochs (numbers >= 0)"),
    ("step_epochs: [10, -1]\n", "config key 'step_epochs' must be a list of epochs"),
    ("step_epochs: [true]\n", "config key 'step_epochs' must be a list of epochs"),
    ("step_gamma: 0\n", "config key 'step_gamma' must be > 0"),
    ("eval_every_steps: -1\n", "config key 'eval_every_steps' must be >= 0, got -1"),
    ("save_every_steps: -5\n", "config key 'save_every_steps' must be >= 0, got -5"),
    ("warmup_epochs: -1\n", "config key 'warmup_epochs' must be >= 0"),
    ("image_size: 100000\n", "config key 'image_size' must be <= 4096, got 100000"),
    ("name: ../escape\n", "config key 'name' must be one directory name"),
    ("lr: 0.1\nepochs: 2\nlr: 0.2\n", "is not valid YAML: duplicated key 'lr' (line 3, column 1)"),
    ("1: 2\n", "config keys are names; got int 1"),
    ("lr: [\n", "is not valid YAML: "),
])
def test_bad_config_values(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, text))


def test_exponent_floats_without_a_dot():
    """YAML 1.1 reads 1e-3 as a string; here it is the float everyone means, in a file and as
    a flag, while a str key keeps its text."""
    assert load_config(None, {"lr": parse_override("lr", "1e-3")}).lr == 0.001
    cfg = load_config(None, {"weight_decay": parse_override("weight_decay", "5E-4"),
                             "name": parse_override("name", "1e3")})
    assert cfg.weight_decay == 0.0005 and cfg.name == "1e3"


def test_exponent_floats_in_a_file(tmp_path):
    cfg = load_config(write(tmp_path, "lr: 1e-3\nweight_decay: 5e-4\nstep_epochs: [1e1, 20]\n"))
    assert (cfg.lr, cfg.weight_decay, cfg.step_epochs) == (0.001, 0.0005, [10.0, 20])
    assert isinstance(cfg.lr, float)


def test_a_merge_key_may_be_overridden_but_a_key_not_repeated():
    import yaml
    from selectivity.train.config import yaml_load
    assert yaml_load("b: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n")["d"] == {"x": 3, "y": 2}
    with pytest.raises(yaml.YAMLError, match="duplicated key 'x'"):
        yaml_load("d:\n  x: 1\n  x: 2\n")


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a directory"):
        load_config(str(tmp_path))
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_config(str(bad))
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffepochs: 3\n".encode("utf-8"))
    assert load_config(str(bom)).epochs == 3


def test_every_key_has_a_one_line_meaning():
    for f in dataclasses.fields(Config):
        text = f.metadata.get("help", "")
        assert text and "\n" not in text and len(text) < 200, f.name


def test_help_lists_every_key_with_type_default_and_meaning(tool):
    proc = tool("tools/train.py", "--help", check=True)
    text = " ".join(proc.stdout.split())  # argparse wraps: compare with whitespace collapsed
    hints = typing.get_type_hints(Config)
    for key, f in FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = f"--{key.replace('_', '-')} {hints[key].__name__.upper()}"
        assert flag in text, key
        entry = f"{hints[key].__name__}, default {default!r}: {' '.join(f.metadata['help'].split())}"
        assert entry in text, key
    assert "--accept-config-change" in text
    assert "scaled linearly" not in text and "not scaled with batch size" in text


@pytest.mark.parametrize("args, message", [
    (["--epochs", "two"], "error: config key 'epochs' expects int, got str 'two'"),
    (["--bogus-key", "1"], "unrecognized arguments: --bogus-key"),
    (["--model", "vgg99"], "error: config key 'model': unknown model 'vgg99'"),
    (["--dataset", "imagenet"], "error: config key 'dataset': unknown value 'imagenet'"),
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent/x"],
     "error: data directory not found: /nonexistent/x"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/y"],
     "error: CIFAR-10 batches not found in '/nonexistent/y'"),
    (["-c", "configs/missing.yaml"], "error: config file not found: configs/missing.yaml"),
    (["-c", "configs"], "error: config file configs is a directory"),
    (["--label-smoothing", "2"], "error: config key 'label_smoothing' must be in [0, 1), got 2.0"),
    (["--step-epochs", "[a]"], "error: config key 'step_epochs' must be a list of epochs"),
])
def test_cli_bad_input_one_line_nothing_written(tool, tmp_path, args, message):
    proc = tool("tools/train.py", "-c", "configs/demo.yaml", "--out-dir", str(tmp_path),
                "--name", "bad", *args)
    assert proc.returncode == 2
    err_lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert message in err_lines[-1], proc.stderr
    assert not any(l.startswith("Traceback") for l in err_lines)
    assert not os.path.exists(tmp_path / "bad")


def test_cli_device_cuda_without_a_gpu_is_one_line(tool, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: device cuda is valid here")
    proc = tool("tools/train.py", "-c", "configs/demo.yaml", "--out-dir", str(tmp_path),
                "--name", "bad", "--device", "cuda")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == ("error: config key 'device' is cuda, but no CUDA "
                                            "device is visible; use device: cpu (or auto)")
    assert not os.path.exists(tmp_path / "bad")


def test_cli_non_utf8_config_is_one_line(tool, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"epochs: 2\nname: \xff\xfe\n")
    proc = tool("tools/train.py", "-c", str(bad), "--out-dir", str(tmp_path), "--name", "bad")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith(f"error: config file {bad} is not UTF-8 text")
    assert not os.path.exists(tmp_path / "bad")
