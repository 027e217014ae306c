#!/usr/bin/env python
"""One stage of the prepared GPU check (tools/gpu_check.sh runs each; docs/gpu.md): the stages
live in selectivity.gpucheck.stages. On the GPU machine, where the checkout is not installed,
the shell script runs them as `python3 -m selectivity.gpucheck.stages` from the repo root.

    python tools/gpu_check.py STAGE --work DIR --out DIR --limit SECONDS [--dry-run]
"""
import sys

from selectivity.gpucheck.stages import main

if __name__ == "__main__":
    sys.exit(main())
