"""The training application behind ``tools/train.py``: the config (in sections), the trainer and
its callbacks (thin adapters over the library's tracker and regularizer), models, checkpoints,
the run directory (metrics log, lock, reading runs back), DDP set-up and fault injection.

May import the core library (``selectivity.*`` modules at the top) and ``selectivity.pipelines``;
never analyses, study, benchmarks or tools.
"""
