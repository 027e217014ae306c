"""Config schema: unknown keys and wrong types are one-line errors; CLI bad input exits cleanly."""
import os
import re

import pytest

from selectivity.config import ConfigError, load_config


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
])
def test_bad_config_values(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, text))


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
])
def test_cli_bad_input_one_line_nothing_written(tool, tmp_path, args, message):
    proc = tool("tools/train.py", "-c", "configs/demo.yaml", "--out-dir", str(tmp_path),
                "--name", "bad", *args)
    assert proc.returncode == 2
    err_lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert message in err_lines[-1], proc.stderr
    assert not any(l.startswith("Traceback") for l in err_lines)
    assert not os.path.exists(tmp_path / "bad")
