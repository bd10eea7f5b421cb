"""Benchmarks: each prints its figures as ratios measured side by side in one run and
records them in ``benchmarks/results.json``."""
