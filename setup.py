"""Builds the selectivity-tracking package and its compiled ops, the module selectivity._C.

    make build                                   # in place; what the tests and tools use
    python setup.py build_ext --inplace          # the same, by hand
    pip install --no-build-isolation .           # the build needs the installed torch (pyproject.toml)

The CPU kernels are always built. The CUDA kernels are added when torch is a CUDA build and a CUDA
toolkit is found. Environment:

    CUDA_HOME=/path               toolkit root holding bin/nvcc (default: /usr/local/cuda if it has
                                  one; an nvcc found on PATH is NOT used: it may be a wrapper script
                                  whose directory is not the toolkit root)
    TORCH_CUDA_ARCH_LIST="9.0"    GPU architectures to compile for; needed when no GPU is visible
    SELECTIVITY_NO_CUDA=1         build the CPU kernels only
    SELECTIVITY_REQUIRE_CUDA=1    fail instead of falling back to a CPU-only build (CI)

Compiler flags are portable on purpose (-O3 and `omp simd`, no -march): the same build runs on CI,
on clusters and on laptops.
"""

import os
import sys
from pathlib import Path

import torch
from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
# Every C++ and CUDA file under csrc/ is compiled: adding an op is adding its folder.
CPU_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))
CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu"))
HEADERS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.h"))


def find_cuda_home():
    """Return (toolkit root, None) when the CUDA kernels should be built, else (None, reason)."""
    if os.environ.get("SELECTIVITY_NO_CUDA") == "1":
        return None, "SELECTIVITY_NO_CUDA=1"
    if not torch.version.cuda:
        return None, f"torch {torch.__version__} is a CPU-only build"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if not (Path(home) / "bin" / "nvcc").is_file():
        return None, f"no CUDA toolkit: {home}/bin/nvcc does not exist (set CUDA_HOME to the toolkit root)"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        return None, "TORCH_CUDA_ARCH_LIST is not set and no GPU is visible to detect it (e.g. TORCH_CUDA_ARCH_LIST=9.0)"
    return home, None


def extension():
    cuda_home, why_not = find_cuda_home()
    if why_not and os.environ.get("SELECTIVITY_REQUIRE_CUDA") == "1":
        sys.exit(f"error: SELECTIVITY_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
    if cuda_home:
        # cpp_extension reads CUDA_HOME when it is imported, so set it first.
        os.environ["CUDA_HOME"] = cuda_home
        print(f"selectivity: building CPU + CUDA kernels (CUDA_HOME={cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'detected')})", file=sys.stderr)
    else:
        print(f"selectivity: building CPU kernels only ({why_not})", file=sys.stderr)

    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    kwargs = dict(
        name="selectivity._C",
        depends=HEADERS,
        # The module only uses the stable Python ABI (see csrc/module.cpp): one .abi3.so for all Pythons.
        py_limited_api=True,
        # -Wno-psabi: the 32-byte vector types in csrc/ops/accumulate/cpu/accumulate_cpu.cpp live in inlined internal
        # functions, so the ABI note GCC prints for them does not apply.
        # -fno-trapping-math: no kernel relies on floating-point traps; without it GCC keeps a comparison
        # or division under a condition as a branch, which kept accumulate_means's update loop scalar.
        # Results are unchanged (rounding is not touched).
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-Wno-psabi", "-fno-trapping-math"], "nvcc": ["-O3"]},
        extra_link_args=["-fopenmp"],
    )
    if cuda_home:
        return CUDAExtension(sources=CPU_SOURCES + CUDA_SOURCES, **kwargs)
    return CppExtension(sources=CPU_SOURCES, **kwargs)


def build_ext_class():
    import shutil

    from torch.utils.cpp_extension import BuildExtension

    # Without ninja, cpp_extension falls back to setuptools' compiler (slower, same result).
    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


# Metadata, dependencies and console scripts are in pyproject.toml; this file adds what needs
# code: the compiled extension, and the two top-level folders installed inside the one package:
# pipelines/ as selectivity.pipelines (no top-level `pipelines` lands in a user's environment) and
# tools/ as selectivity.tools (the console scripts' modules; in a checkout they stay plain files,
# so `torchrun tools/train.py` works once the checkout is installed, editable: `make venv`).
setup(
    packages=find_packages(where=str(ROOT), include=["selectivity", "selectivity.*"])
    + ["selectivity.pipelines", "selectivity.tools"],
    package_dir={"selectivity.pipelines": "pipelines", "selectivity.tools": "tools"},
    ext_modules=[extension()],
    cmdclass={"build_ext": build_ext_class()},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
