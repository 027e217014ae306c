"""Linear minibatch CKA between a network's layers (or two networks'), and its ReLUs' activity.

``cka``: the estimator and its hooks; ``run``: a run directory's checkpoints to ``cka.jsonl``
records with a random-init baseline; ``figures``; ``report``: what tools/cka.py prints. May import
the core library, pipelines, train and ``analyses.common`` / ``analyses.features``; no other
analysis.
"""
