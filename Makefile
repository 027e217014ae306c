# Two commands set up everything on a fresh machine (Python 3.11):
#   make demo   venv + pinned deps + the checkout installed editable (which builds the extension),
#               then the main job on `digits` (torch backend: no system library, no root)
#   make test   the same, plus FFCV and DALI with their system libraries (apt-get: root; or
#               `make data-deps`), then the test suite (every backend is tested)
# Every step is a file target or a stamp, so a re-run with nothing changed takes seconds.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export SELECTIVITY_EXPECT_EXTENSION ?= 1

# Fragments add their set-up steps to DEPS (what the demo needs: mk/ext.mk, the extension and the
# editable install) and TEST_DEPS (what only the tests need: mk/data.mk, FFCV and DALI).
DEPS :=
TEST_DEPS :=
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

# --durations: the ten slowest tests, printed at the end (CI should stay under 30 minutes).
test: venv $(DEPS) $(TEST_DEPS)
	$(PY) -m pytest -q --durations=10 tests

clean:
	rm -rf build runs selectivity/_C*.so *.egg-info .pytest_cache
