"""The class selectivity a run recorded while it trained (``RUN/selectivity/*.pt``), as curves per
stage against epoch and per-unit heatmaps.

``run``: the records and their per-stage series; ``figures``; ``report``: what
tools/plot_selectivity.py prints. May import the core library, train and ``analyses.common``; no
other analysis.
"""
