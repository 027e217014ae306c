# The prepared GPU check (tools/gpu_check.sh; docs/gpu.md). Included by the top-level Makefile,
# which defines PYTHON, PY and the `venv` target.
#
#   make gpu-check       on the GPU machine: build for its GPU, CUDA tests, the trainer (fp16,
#                        bf16) beside a bare loop, FFCV's GPU pipeline (needs gpu_bundle/), ResNet-50
#                        tracking overhead, accumulate vs x.sum(); writes $(GPU_CHECK_OUT)/gpu_check.{json,md}
#   make gpu-check-dry   the same script on the CPU at tiny sizes, with the venv's python (also run
#                        by `make test`, through tests/test_gpu_check.py)
#   make gpu-bundle      gpu_bundle/ (ignored, <= 40 MiB): FFCV for the GPU machine's CPython 3.12
#                        with the libraries and packages it lacks; carried there by the device
#                        tool (carry: gpu_bundle). Rebuilt only when the builder changed; also built
#                        by tests/test_gpu_bundle.py when missing (docs/gpu.md, "The FFCV bundle")
#
# gpu-check depends on nothing here on purpose: the GPU machine has its own python3 with its own
# torch and no network, so the venv (pinned torch, pip installs) must not be built there.
# Run it with that python: `make gpu-check` (PYTHON defaults to python3) or tools/gpu_check.sh.

GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),gpu_check_out)
GPU_BUNDLE ?= gpu_bundle
.PHONY: gpu-check gpu-check-dry gpu-bundle

gpu-check:
	PYTHON=$(PYTHON) OUT=$(GPU_CHECK_OUT) bash tools/gpu_check.sh

gpu-check-dry: venv $(EXT_SO)
	PYTHON=$(PY) OUT=$(GPU_CHECK_OUT) bash tools/gpu_check.sh --dry-run

# data-syslibs: the OpenCV and libjpeg-turbo that FFCV is built against and whose libraries it takes.
gpu-bundle: venv data-syslibs
	$(PY) -m selectivity.gpucheck.bundle build --out $(GPU_BUNDLE)
