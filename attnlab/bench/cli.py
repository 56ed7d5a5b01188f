"""``attnlab bench``: run a benchmark matrix (methods x seeds) through the training engine."""
import argparse
import sys
from pathlib import Path

from ..errors import AttnlabError, positive_int
from .matrix import cells, load_matrix
from .budget import parse_duration
from .runner import default_workers, run_matrix
from .scheduler import EXECUTORS, ClusterOptions, check_available


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
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads per cell (default: cores / workers with several workers, else torch's)")
    g = p.add_argument_group("scheduler (docs/cluster.md; needs pip install 'attnlab[cluster]')")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: worker processes here (default); slurm: each cell one SLURM job through submitit; "
                        "submitit-local: the same jobs as local processes (how the SLURM path is tested)")
    g.add_argument("--partition", default=None, help="SLURM partition of the cells' jobs")
    g.add_argument("--gpus-per-cell", type=_gpus, default=0, help="GPUs per cell's job: 0 or 1 (default 0)")
    g.add_argument("--cpus-per-cell", type=positive_int, default=None,
                   help="CPU cores per cell's job on SLURM (default: --threads, else 1); also its torch threads")
    g.add_argument("--time-limit", type=_duration, default=None,
                   help="wall-time limit of each job (e.g. 4h; default 24h): a longer cell is requeued at the limit "
                        "and resumes from its last epoch checkpoint")
    g.add_argument("--mem", type=positive_int, default=None, help="memory per cell's job on SLURM, in GB")
    g.add_argument("--slurm-arg", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="a further sbatch option for every job, e.g. account=myproject or qos=high (repeatable)")


def _int_list(text):
    items = _str_list(text, "integers")
    try:
        values = [int(x) for x in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got '{text}'") from None
    if min(values) < 0:  # a run's seed is >= 0: said now, not as a failed cell per seed
        raise argparse.ArgumentTypeError(f"seeds are integers >= 0, got '{text}'")
    return _no_repeats(values, text)  # as integers: '1,01' repeats 1


def _str_list(text, what="names"):
    """'a,b' -> ['a', 'b']; an empty item or a repeated one is a typo (e.g. '1,,2'), refused rather than guessed."""
    items = [x.strip() for x in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"must be comma-separated {what} with none empty, got '{text}'")
    return _no_repeats(items, text)


def _no_repeats(items: list, text: str) -> list:
    if len(set(items)) < len(items):
        raise argparse.ArgumentTypeError(f"'{next(x for x in items if items.count(x) > 1)}' is given twice in '{text}'")
    return items


def _workers(text):
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got '{text}'") from None


def _gpus(text):
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"must be 0 or 1 (a cell trains on one device), got '{text}'")
    return int(text)


def _key_value(text):
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE, e.g. account=myproject, got '{text}'")
    return key.strip().replace("-", "_"), value


def cluster_options(args, threads):
    """The --executor options as a ClusterOptions (None for local workers); a one-line error for options that
    mean nothing without a scheduler."""
    if args.executor == "local":
        given = [flag for flag, value in (("--partition", args.partition), ("--gpus-per-cell", args.gpus_per_cell),
                                          ("--cpus-per-cell", args.cpus_per_cell), ("--time-limit", args.time_limit),
                                          ("--mem", args.mem), ("--slurm-arg", args.slurm_arg)) if value]
        if given:
            raise AttnlabError(f"{', '.join(given)} need --executor slurm (or submitit-local)")
        return None
    check_available(args.executor)
    options = ClusterOptions(executor=args.executor, partition=args.partition, gpus_per_cell=args.gpus_per_cell,
                             cpus_per_cell=args.cpus_per_cell or threads, mem_gb=args.mem,
                             slurm_args=dict(args.slurm_arg))
    if args.time_limit is not None:
        options.time_limit_min = max(1, round(args.time_limit / 60))
    return options


def _duration(text):
    try:
        return parse_duration(text)
    except AttnlabError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run(args):
    from ..host import set_threads

    if args.latency_only and (args.no_latency or args.dry_run):
        raise AttnlabError(f"--latency-only times latency and trains nothing: it conflicts with "
                           f"{'--no-latency' if args.no_latency else '--dry-run'}")
    matrix = load_matrix(args.matrix)
    log = lambda s: print(s, flush=True)
    if args.latency_only:
        from .latency import time_matrix
        set_threads(args.threads)
        time_matrix(matrix, Path(args.results_root) / matrix["name"], args.only, args.device, log)
        return 0
    cluster = cluster_options(args, args.threads)
    if args.workers != "auto":
        workers = args.workers
    elif cluster is not None and cluster.executor == "slurm":
        workers = max(1, len(cells(matrix, args.seeds, args.only)))  # every cell at once: the scheduler queues them
    else:
        workers = default_workers()
    if workers == 1 and cluster is None:
        set_threads(args.threads)  # the cells train in this process
    counts = run_matrix(matrix, seeds=args.seeds, only=args.only, dry_run=args.dry_run,
                        results_root=args.results_root, runs_root=args.runs_root, latency=not args.no_latency,
                        retry_failed=args.retry_failed, workers=workers, device=args.device,
                        threads=args.threads or (cluster and cluster.cpus_per_cell),
                        budget_s=args.budget, cluster=cluster, log=log)
    sys.stdout.flush()
    return 1 if counts["failed"] or counts.get("interrupted") or counts.get("config_errors") else 0
