"""Benchmarks whose logic is importable (the thin scripts in tools/ parse arguments and print)."""
