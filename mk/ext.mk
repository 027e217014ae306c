# The compiled selectivity ops (csrc/ -> selectivity/_C.abi3.so). Included by the top-level Makefile,
# which defines VENV, PY and the `venv` target.
#
#   make build        install the checkout editable, which builds the extension in place (CPU kernels;
#                     + CUDA kernels when a GPU is visible and a toolkit is found)
#   make cuda-check   compile the CUDA kernels into build/cuda-check (not the in-place module) and fail
#                     loudly if they cannot be built or do not register; needs no GPU
#
# Settings (environment or make variables): CUDA_HOME, TORCH_CUDA_ARCH_LIST, SELECTIVITY_NO_CUDA=1.
# See setup.py for what each one does.

# This machine's toolkit matches the cu130 torch; the `nvcc` on PATH is a wrapper whose directory is not
# the toolkit root, so name the root. Elsewhere setup.py looks in $CUDA_HOME, then /usr/local/cuda.
ifneq ($(wildcard /usr/local/cuda-13.0/bin/nvcc),)
CUDA_HOME ?= /usr/local/cuda-13.0
endif
# With no GPU here, the in-place build (what the demo, the tests and the tools load) has the CPU
# kernels only: CUDA kernels could not run, and compiling them costs a minute or two of every fresh
# set-up. `make cuda-check` still compiles them, for Hopper (H100/H200) unless TORCH_CUDA_ARCH_LIST
# says otherwise. On a GPU machine torch detects the local GPU and both are built.
ifeq ($(shell nvidia-smi -L 2>/dev/null),)
SELECTIVITY_NO_CUDA ?= 1
ifeq ($(TORCH_CUDA_ARCH_LIST),)
TORCH_CUDA_ARCH_LIST := 9.0
endif
endif
export CUDA_HOME TORCH_CUDA_ARCH_LIST SELECTIVITY_NO_CUDA

EXT_SO := selectivity/_C.abi3.so
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h') setup.py
# The settings that change what gets built; the .so is rebuilt when they change (build/ext-config.txt).
EXT_CONFIG := cuda_home=$(CUDA_HOME) arch=$(TORCH_CUDA_ARCH_LIST) no_cuda=$(SELECTIVITY_NO_CUDA)
EXT_STAMP := build/ext-config.txt

DEPS += $(EXT_SO)
.PHONY: build cuda-check ext-config

build: $(EXT_SO)

# The torch headers it compiles against come from the venv: rebuild when the venv is reinstalled.
# The checkout is installed into the venv editable (one build: pip builds the extension in place),
# so tools, tests and `python -m selectivity...` import it without sys.path edits, and the
# top-level pipelines/ and tools/ are selectivity.pipelines and selectivity.tools (setup.py).
$(EXT_SO): $(EXT_SOURCES) $(EXT_STAMP) $(wildcard $(VENV)/.installed) | venv
	$(PIP) install -q -e . --no-build-isolation --no-deps
	@touch $@

# Rewritten only when the settings differ from the last build, so an unchanged re-run is instant.
$(EXT_STAMP): ext-config
	@true
ext-config:
	@mkdir -p build
	@echo '$(EXT_CONFIG)' | cmp -s - $(EXT_STAMP) || echo '$(EXT_CONFIG)' > $(EXT_STAMP)

CUDA_CHECK_DIR := build/cuda-check
cuda-check: $(CUDA_CHECK_DIR)/ok
$(CUDA_CHECK_DIR)/ok: $(EXT_SOURCES) $(EXT_STAMP) | venv
	rm -rf $(CUDA_CHECK_DIR)
	SELECTIVITY_NO_CUDA=0 SELECTIVITY_REQUIRE_CUDA=1 $(PY) setup.py build_ext --build-lib $(CUDA_CHECK_DIR)/lib --build-temp $(CUDA_CHECK_DIR)/temp
	$(PY) -c "import glob, importlib.util, torch; \
	path = glob.glob('$(CUDA_CHECK_DIR)/lib/selectivity/_C*.so')[0]; \
	spec = importlib.util.spec_from_file_location('_C', path); spec.loader.exec_module(importlib.util.module_from_spec(spec)); \
	has = torch._C._dispatch_has_kernel_for_dispatch_key; \
	ok = all(has('selectivity::' + op, 'CUDA') for op in ('accumulate', 'selectivity_index', 'accumulate_means', 'index_cache', 'add_relu_means', 'add_relu_means_backward', 'add_relu_means_', \
	      'add_relu_means_backward_')); \
	assert ok, 'the CUDA kernels of ' + path + ' did not register'; \
	print('cuda-check: CUDA kernels built and registered from', path)"
	@touch $@
