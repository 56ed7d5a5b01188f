"""``attnlab report results/<matrix>``: report.md and plots from a benchmark matrix's runs.jsonl.

The summary (bench/summary.py) holds the numbers, bench/render.py turns it into report.md and the README block,
bench/plots.py draws the PNGs and bench/readme.py replaces the README's block. ``--readme README.md`` replaces the
block between ``<!-- results:<matrix>:begin -->`` and ``<!-- results:<matrix>:end -->`` (else, when the README
has no such block, the one between ``<!-- results:begin -->`` and ``<!-- results:end -->``).
"""
from pathlib import Path

from ..files import atomic_write_text
from .plots import PLOTS, write_plots
from .readme import BEGIN, END, update_readme
from .render import readme_block, render_markdown
from .summary import MatrixSummary, summarize

def write_report(results_dir, baseline="none", readme=None, matrix_file=None) -> MatrixSummary:
    summary = summarize(results_dir, baseline=baseline, matrix_file=matrix_file)
    out_dir = Path(results_dir)
    atomic_write_text(out_dir / "report.md", render_markdown(summary), "report")
    write_plots(summary, out_dir)
    if readme:
        update_readme(readme, readme_block(summary), summary.matrix)
    return summary


def add_arguments(p):
    p.add_argument("results_dir", help="a results/<matrix>/ folder holding runs.jsonl (and latency.json)")
    p.add_argument("--baseline", default="none", help="method the others are compared with (default: none)")
    p.add_argument("--matrix", default=None,
                   help="the matrix YAML (method order, claims); default: the file the runs recorded, if it exists")
    p.add_argument("--readme", default=None,
                   help="also replace this README's block for the matrix "
                        "(<!-- results:<matrix>:begin --> ... :end -->), "
                        f"else its default {BEGIN} ... {END} block, with a results table")
    p.add_argument("--merge", action="append", default=[], metavar="RUNS_JSONL",
                   help="first append the cells this runs.jsonl finished and results_dir's has not (e.g. a GPU "
                        "slot's); cells both finished keep results_dir's record; repeatable")


def run(args):
    from .runs import merge_runs
    for source in args.merge:
        n = merge_runs(source, Path(args.results_dir) / "runs.jsonl")
        print(f"merged {source}: {n['added']} cells added, {n['same']} already here, "
              f"{n['kept']} also run here (this folder's record kept)")
    summary = write_report(args.results_dir, baseline=args.baseline, readme=args.readme, matrix_file=args.matrix)
    print(f"wrote {Path(args.results_dir) / 'report.md'} and {', '.join(PLOTS)} "
          f"({summary.n_ok} runs, {len(summary.methods)} methods)")
    return 0
