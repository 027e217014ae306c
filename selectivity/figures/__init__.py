"""Figures of the analyses (ablation, CKA, orientation), drawn from their jsonl records and
written with ``selectivity.io.save_figure`` (atomic PNG writes). matplotlib is imported only
here, so the measuring code does not need it."""
