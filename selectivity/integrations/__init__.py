"""Adapters from the library to other training loops (Lightning: ``integrations.lightning``).

Each adapter is a thin layer over the public core — ``SelectivityTracker``, ``SelectivityRegularizer``
with its α windows, ``bn_statistics``, ``summarize`` — and may import nothing else of the package
(not ``selectivity.train``): a loop of someone else's drives the measurement, this package's
trainer does not. The loop's own package is an optional extra; importing an adapter without it is
one ImportError that names the extra to install.
"""
