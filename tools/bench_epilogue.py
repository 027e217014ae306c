"""The fused residual epilogue vs stock add + ReLU, forward + backward: a shim for
selectivity/benchmarks/epilogue.py, which holds the measurement, the arguments and the table.

    .venv/bin/python -m tools.bench_epilogue [--rounds 7] [--threads N]
"""
import sys

from selectivity.benchmarks.epilogue import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
