"""Benchmark matrices: methods x seeds trained through the engine, their results kept, compared and judged.

- ``matrix``: the matrix file (recipe, overrides, methods, seeds, latency settings, the papers' claims)
- ``runner``: runs the unfinished cells, K at a time (``worker``: one cell in its own process), within a budget
- ``runs``: runs.jsonl records (latest per cell, the cell lock); a run folder's files are engine.run_folder's
- ``latency``: inference latency per method, timed round-robin
- ``stats``, ``claims``, ``report``: intervals, verdicts per claim, report.md, plots and the README block
"""
from .matrix import cell_overrides, cells, fingerprint, format_value, load_matrix, slug
from .runner import run_matrix
from .runs import latest_by_cell

__all__ = ["cell_overrides", "cells", "fingerprint", "format_value", "latest_by_cell", "load_matrix", "run_matrix",
           "slug"]
