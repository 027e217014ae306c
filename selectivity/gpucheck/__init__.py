"""The GPU check's stages and benchmarks (tools/gpu_check.sh runs them; docs/gpu.md), and the
FFCV bundle that travels to the GPU machine (``bundle``). May import the core library and the
training app, nothing above them.
"""
