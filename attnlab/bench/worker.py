"""One matrix cell in its own process, started by the runner when ``--workers`` is above 1.

    python -m attnlab.bench.worker --matrix M.yaml --method se --seed 0 --runs-root runs/M --record out.json

Trains the cell (resuming it from its checkpoint if an earlier worker was killed) and writes its runs.jsonl record
to ``--record`` atomically; the runner appends it to runs.jsonl. No record means the worker died. With
``--parent-pid`` it stops, with the processes it forked, as soon as that bench is gone (killed with -9, the bench
could not stop its workers itself); a cell stopped so resumes from its last checkpoint like any interrupted one.
"""
import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnlab.bench.worker", description=__doc__.splitlines()[0])
    p.add_argument("--matrix", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--runs-root", required=True, help="runs/<matrix>/: the cell trains in <runs-root>/<cell>/")
    p.add_argument("--record", required=True, help="where the cell's record goes (JSON)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda or auto instead of the matrix's device")
    p.add_argument("--workers", type=int, default=1, help="how many cells run at once (recorded with the result)")
    p.add_argument("--parent-pid", type=int, default=None, help="the bench's pid: stop when it is gone")
    args = p.parse_args(argv)
    if args.parent_pid is not None:  # no orphan trains on beside the cell a restarted bench resumes
        from ..lifeline import stop_with_parent
        stop_with_parent(args.parent_pid)

    import torch

    from ..engine.config import load_config
    from ..files import atomic_write_text
    from ..engine.train import train
    from ..host import set_threads
    from .matrix import cells, load_matrix
    from .cell import run_cell, stamp

    set_threads(args.threads)
    matrix = load_matrix(args.matrix)
    (cell,) = cells(matrix, seeds=[args.seed], only=[args.method])
    record = stamp(run_cell(matrix, cell, args.runs_root, load_config=load_config, train=train,
                            device=args.device),
                   torch.get_num_threads(), args.workers)
    atomic_write_text(args.record, json.dumps(record, default=str) + "\n", "the cell's record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
