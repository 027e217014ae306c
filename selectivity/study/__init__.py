"""The study: configs trained as conditions × seeds (resumably), runs combined into means with 95 %
intervals, the papers' claims tested on them with stated rules, and the findings and figures that
report it. The command lines in tools/ (study, sweep, reproduce, plot_regularization) are each one
call into this package.

It may import the core (``selectivity.*`` modules at the top), ``selectivity.pipelines``,
``selectivity.train`` and ``selectivity.analyses``; no other part of the package imports it.
Training and the analyses run as subprocesses through their command lines (what a user would
type); the study reads the files they write (the analyses' records through their readers).

  launch         where a run stands (done / resume / new) and the checkout's training command
  conditions     a condition's config; configs and α grids as conditions
  runner         conditions × seeds: the plan and the runs (tools/study.py)
  sweep          a list of configs one after another (tools/sweep.py)
  aggregate      runs → conditions, means with intervals, curves, tables
  design         the small-scale study's conditions, comparisons, seeds and its tiny mode
  stats          paired intervals and tests, exact rates, Fisher's test, power → n
  rules          the verdict rules and the effects they name (fixed before the main runs)
  analysis_runs, analysis_values   the analysis tools run on checkpoints, and what is read back
  claims         each claim's per-seed statistics and its verdict
  pilot          the pilot: peak epoch and each condition's n, pinned with the rules
  findings, sections, figures, reproduce   docs/findings.md and its figures (tools/reproduce.py)
  regularization_report   figures and table of regularizer runs (tools/plot_regularization.py)
"""
