"""``attnlab bench``: run a benchmark matrix (methods x seeds) through the training engine."""
import argparse
import sys
from pathlib import Path

from .matrix import load_matrix
from .budget import parse_duration
from .runner import default_workers, run_matrix


def add_arguments(p):
    p.add_argument("--matrix", required=True, help="matrix YAML, e.g. benchmarks/matrices/cpu_proxy.yaml")
    p.add_argument("--seeds", type=_int_list, default=None, help="comma-separated seeds (default: the matrix's)")
    p.add_argument("--only", type=_str_list, default=None, help="comma-separated method names to run")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their overrides, run nothing")
    p.add_argument("--workers", type=_workers, default="auto",
                   help="cells trained at once, each in its own process (default auto: 2 on a CPU with 2+ cores, "
                        "measured 1.32x faster than one at a time on 2 cores; one per GPU on CUDA); 1 trains in "
                        "this process")
    p.add_argument("--budget", type=_duration, default=None,
                   help="start no cell that would not finish within this time (e.g. 150m, 2h30m), estimated from "
                        "the cells already run (scaled up when this run's cells train slower than they did); the "
                        "rest waits for the next run")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None,
                   help="train on this device instead of the matrix's (the cells' results stay comparable: the "
                        "device is recorded with each, not part of its settings)")
    p.add_argument("--results-root", default="results", help="where results/<matrix>/ goes (default: results)")
    p.add_argument("--runs-root", default="runs", help="where runs/<matrix>/<run>/ goes (default: runs)")
    p.add_argument("--no-latency", action="store_true", help="skip the per-method latency measurement")
    p.add_argument("--latency-only", action="store_true",
                   help="measure the missing latency.json entries and train nothing (delete the file to re-measure)")
    p.add_argument("--retry-failed", action="store_true", help="run cells recorded as failed again")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch CPU threads per cell (default: cores / workers with several workers, else torch's)")


def _int_list(text):
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got '{text}'") from None


def _str_list(text):
    return [x.strip() for x in text.split(",") if x.strip()]


def _positive(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'")
    return n


def _workers(text):
    if text == "auto":
        return text
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got '{text}'") from None


def _duration(text):
    from ..errors import AttnlabError
    try:
        return parse_duration(text)
    except AttnlabError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run(args):
    from ..host import set_threads

    matrix = load_matrix(args.matrix)
    log = lambda s: print(s, flush=True)
    if args.latency_only:
        from .latency import time_matrix
        set_threads(args.threads)
        time_matrix(matrix, Path(args.results_root) / matrix["name"], args.only, args.device, log)
        return 0
    workers = default_workers() if args.workers == "auto" else args.workers
    if workers == 1:
        set_threads(args.threads)  # the cells train in this process
    counts = run_matrix(matrix, seeds=args.seeds, only=args.only, dry_run=args.dry_run,
                        results_root=args.results_root, runs_root=args.runs_root, latency=not args.no_latency,
                        retry_failed=args.retry_failed, workers=workers, device=args.device, threads=args.threads,
                        budget_s=args.budget, log=log)
    sys.stdout.flush()
    return 1 if counts["failed"] or counts.get("interrupted") or counts.get("config_errors") else 0
