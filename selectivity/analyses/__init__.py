"""The analyses of a trained run: one subpackage each — ablation, cka, orientation, curves (the
SI the run recorded) — holding its algorithm, its run-directory procedure (``run``), its figures
and its report (``report``: what its tool prints). ``common`` and ``features`` hold what they share.

May import: the core library (selectivity.units, tracker, ops, evaluation, io, errors, ...),
selectivity.pipelines and selectivity.train. Never selectivity.study, and no analysis imports
another: what two analyses need lives in ``common`` or ``features``.
"""
