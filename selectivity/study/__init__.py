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
  design         the small-scale study's conditions and its tiny mode
  verdicts       the interval rule most verdicts use
  training_claims, analysis_runs, checkpoint_claims   the claims of the findings
  findings, figures, reproduce   docs/findings.md and its figures (tools/reproduce.py)
  regularization_report   figures and table of regularizer runs (tools/plot_regularization.py)
"""
