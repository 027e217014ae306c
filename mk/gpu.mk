# The prepared GPU check (tools/gpu_check.sh; docs/gpu.md). Included by the top-level Makefile,
# which defines PYTHON, PY and the `venv` target.
#
#   make gpu-check       on the GPU machine: build for its GPU, CUDA tests, ResNet-50 tracking
#                        overhead, accumulate vs x.sum(); writes $(GPU_CHECK_OUT)/gpu_check.{json,md}
#   make gpu-check-dry   the same script on the CPU at tiny sizes, with the venv's python (also run
#                        by `make test`, through tests/test_gpu_check.py)
#
# gpu-check depends on nothing here on purpose: the GPU machine has its own python3 with its own
# torch and no network, so the venv (pinned torch, pip installs) must not be built there.
# Run it with that python: `make gpu-check` (PYTHON defaults to python3) or tools/gpu_check.sh.

GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),gpu_check_out)
.PHONY: gpu-check gpu-check-dry

gpu-check:
	PYTHON=$(PYTHON) OUT=$(GPU_CHECK_OUT) bash tools/gpu_check.sh

gpu-check-dry: venv $(EXT_SO)
	PYTHON=$(PY) OUT=$(GPU_CHECK_OUT) bash tools/gpu_check.sh --dry-run
