"""Benchmarks behind tools/bench_*.py: each measures variants side by side in one run
(interleaved rounds, medians with their spread) and returns numbers; the tools print them.
May import anything below the tools (core, pipelines, train, analyses); nothing imports it.
"""
