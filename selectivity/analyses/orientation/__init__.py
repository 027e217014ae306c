"""Orientation selectivity of units to sinusoidal gratings, its ablation and shift invariance
(Ukita 2020).

``orientation``: gratings, responses, indices, the gOSI ablation; ``run``: a run directory's
checkpoints to ``orientation.jsonl`` records; ``figures``; ``report``: what tools/orientation.py
prints. May import the core library, pipelines, train and ``analyses.common`` /
``analyses.features``; no other analysis.
"""
