"""Unit ablation (paper 1's protocol): mask the most / least selective or random units of a run's
residual blocks and measure accuracy, many conditions per forward pass.

``ablation``: conditions, masks and their evaluation; ``run``: a run directory's checkpoints to
``ablation.jsonl`` rows; ``figures``; ``report``: what tools/ablate.py prints. May import the core
library, pipelines, train and ``analyses.common`` / ``analyses.features``; no other analysis.
"""
