# The data-loading backends (selectivity/pipelines/ffcv.py + ffcv_write.py, selectivity/pipelines/dali.py). Included by
# the top-level Makefile, which defines VENV, PY, PIP and the `venv` target.
#
#   make data-deps      system libraries FFCV compiles against (apt-get, only when missing), then
#                       FFCV, numba, OpenCV and NVIDIA DALI into the venv (requirements-data.txt)
#   make data-syslibs   only the system-library check/install
#   make bench-loader   torch vs ffcv vs dali throughput on generated JPEGs (tools/bench_loader.py)
#
# FFCV has no wheel: pip builds its C++ extension against OpenCV and libjpeg-turbo found through
# pkg-config. When `pkg-config --exists opencv4 libturbojpeg` fails, data-syslibs installs them
# with apt-get (Debian; needs root) and says so; otherwise it does nothing, instantly. The venv
# part is a stamp file rebuilt only when requirements-data.txt changes, so a re-run is instant.

DATA_APT := pkg-config libturbojpeg0-dev libopencv-dev libgl1 libglib2.0-0
# Another apt process (unattended upgrades, a second make) holding the dpkg lock is waited for.
APT_WAIT := -o DPkg::Lock::Timeout=600
DATA_STAMP := $(VENV)/.data-installed

# The demo runs on the torch backend and installs none of this; the tests need every backend.
# Choosing ffcv or dali without them is a one-line error naming `make data-deps`.
TEST_DEPS += data-deps
.PHONY: data-deps data-syslibs bench-loader

data-deps: data-syslibs $(DATA_STAMP)

data-syslibs:
	@if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then exit 0; fi; \
	echo "mk/data.mk: FFCV builds against OpenCV + libjpeg-turbo; apt-get install $(DATA_APT)"; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "mk/data.mk: error: not root; as root run: apt-get install -y $(DATA_APT)" >&2; \
	  exit 1; \
	fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get $(APT_WAIT) update -qq && \
	apt-get $(APT_WAIT) install -y -qq --no-install-recommends $(DATA_APT) >/dev/null && \
	pkg-config --exists opencv4 libturbojpeg && echo "mk/data.mk: system libraries installed"

# pillow is listed explicitly: FFCV imports it without declaring it. FFCV's build needs no numpy
# or OpenCV Python package (its extension links the system libraries), so build isolation is kept.
$(DATA_STAMP): requirements-data.txt | venv data-syslibs
	$(PIP) install -q -r requirements-data.txt
	$(PY) -c "import ffcv, ffcv.libffcv, numba, cv2, nvidia.dali, nvidia.dali.plugin.pytorch; \
	print('data-deps: ffcv', __import__('importlib.metadata').metadata.version('ffcv'), \
	      '| numba', numba.__version__, '| dali', nvidia.dali.__version__)"
	@touch $@

bench-loader: venv data-deps
	$(PY) tools/bench_loader.py
