"""Benchmark matrices: methods x seeds trained through the engine, their results kept, compared and judged.

- ``matrix``: the matrix file (recipe, overrides, methods, seeds, latency settings, the papers' claims)
- ``runner``: runs the unfinished cells, K at a time (``worker``: one cell in its own process), within a budget
- ``runs``: runs.jsonl, the one results file, appended under a lock
- ``latency``: inference latency per method, timed round-robin
- ``stats``, ``claims``, ``report``: intervals, verdicts per claim, report.md, plots and the README block
"""
from .matrix import cell_overrides, cells, fingerprint, format_value, load_matrix, slug
from .runner import run_matrix
from .runs import append_line, latest_by_cell, read_curve, read_runs

__all__ = ["append_line", "cell_overrides", "cells", "fingerprint", "format_value", "latest_by_cell", "load_matrix",
           "read_curve", "read_runs", "run_matrix", "slug"]
