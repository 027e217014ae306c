"""Benchmarks: measured side by side in one run (interleaved rounds), what the tools/bench_*.py
and the GPU check print. They may import the core library, pipelines, train and the analyses they
time; nothing imports them."""
