#!/usr/bin/env python
"""Does a host sync in every step expose the tracker's cost? (selectivity.gpucheck.probe_sync,
docs/gpu.md). On the GPU machine, from the repo root: `python3 -m selectivity.gpucheck.probe_sync`.

    python tools/gpu_probe_sync.py [--dry-run] --out DIR
"""
import sys

from selectivity.gpucheck.probe_sync import main

if __name__ == "__main__":
    sys.exit(main())
