# Two commands set up everything on a fresh machine (Python 3.11; root for apt-get on Debian):
#   make demo   venv + pinned deps + system libs + the extension, then the main job on `digits`
#   make test   the same set-up, then the test suite
# Every step is a file target or a stamp, so a re-run with nothing changed takes seconds.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export SELECTIVITY_EXPECT_EXTENSION ?= 1

# Fragments add their set-up steps to DEPS (mk/ext.mk: the extension; mk/data.mk: FFCV, DALI).
DEPS :=
.PHONY: all venv demo test clean
all: demo

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.txt
	@touch $@

include $(sort $(wildcard mk/*.mk))

demo: venv $(DEPS)
	rm -rf runs/demo
	$(PY) tools/train.py -c configs/demo.yaml
	$(PY) tools/plot_selectivity.py runs/demo

test: venv $(DEPS)
	$(PY) -m pytest -q tests

clean:
	rm -rf build runs selectivity/_C*.so *.egg-info .pytest_cache
