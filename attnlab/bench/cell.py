"""One cell of a matrix: train it through the engine into its run folder and make its runs.jsonl record.

The harness owns runs/<matrix>/<cell>/: ``prepare_run_dir`` continues a folder only when its bench_cell.json says it
was started with the same settings and recipe, and clears anything else, so metrics.csv and TensorBoard start
clean. ``stamp`` adds how and where the cell ran. ``refuse_another_precision`` stops a cell before it trains
where it would train in another precision than the finished cells configured like it (the bench calls it for
its own machine, a scheduler's job for the machine that trains).
"""
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from ..engine.run_folder import RunFolder
from ..errors import AttnlabError
from ..files import atomic_write_text, git_commit, portable_path
from .matrix import cell_overrides, fingerprint, format_value, same_digest, same_settings
from ..host import host_info
from .runs import latest_by_cell, one_line, precision_of

# Written into a fresh run folder before the engine trains there: the settings and recipe digest the cell started
# with. The engine is told to keep it (train's ``keep``) and never needs to know its name.
CELL_MARKER = "bench_cell.json"


def run_cell(matrix, cell, runs_root, *, load_config, train, device=None) -> dict:
    """Train one cell and return its runs.jsonl record (status 'ok' or 'failed')."""
    run_dir = Path(runs_root) / cell["run_name"]
    record = {"matrix": matrix["name"], "matrix_file": portable_path(matrix["path"]), "method": cell["method"],
              "seed": cell["seed"], "run_dir": portable_path(run_dir), "overrides": cell["overrides"],
              "recipe": matrix["recipe"],
              "fingerprint": fingerprint(matrix, cell), "recipe_digest": matrix.get("recipe_digest")}
    start = time.time()
    try:
        cfg = load_config(matrix["recipe_path"], overrides=cell_overrides(matrix, cell, runs_root, device))
        resume = prepare_run_dir(run_dir, record["fingerprint"], record["recipe_digest"])
        results = train(cfg, resume=resume, keep=(CELL_MARKER,))
    except BrokenPipeError:  # our output is gone (`attnlab bench ... | head`): stop; the cell resumes next time
        raise
    except Exception as err:  # one bad cell must not stop the matrix: record it and move on
        record.update(status="failed", error=one_line(err), wall_time_s=round(time.time() - start, 2))
        return record
    results = dict(results or {})
    record.update(
        status="ok",
        val_top1=results.get("best_val_top1"),
        val_top5=results.get("best_val_top5"),
        test_top1=results.get("test_top1"),
        test_top5=results.get("test_top5"),
        params=results.get("params"),
        flops=results.get("flops"),
        train_images_per_s=results.get("train_images_per_s"),
        wall_time_s=results.get("wall_time_s", round(time.time() - start, 2)),
        device=results.get("device"),
        precision=results.get("precision"),
        epochs_by_device=results.get("epochs_by_device"),
        git_commit=results.get("git_commit"),
        epochs=_get(cfg, "train.epochs"),
        val_curve=RunFolder(run_dir).curve(),
    )
    return record


def stamp(record: dict, threads: int, workers: int) -> dict:
    """What the harness adds to a cell's record: how it ran, on what, by which code, and when."""
    record.update(threads=threads, workers=workers, host=host_info(), harness_commit=git_commit(short=True),
                  finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return record


def prepare_run_dir(run_dir: Path, fp: str, digest: str | None = None):
    """The run dir to resume from (this cell was interrupted mid-training), or None after clearing a stale one.

    The harness owns runs/<matrix>/<cell>/: bench_cell.json records the settings (and the recipe's digest) the run
    was started with, so only a run of the same settings and recipe is continued. A finished run of other settings
    (results.json written) is moved aside to ``<cell>.replaced-<UTC time>``, said in one line, since another
    runs.jsonl may still point at it; anything else there is removed so metrics.csv and TensorBoard start clean.
    """
    import shutil
    marker = run_dir / CELL_MARKER
    if RunFolder(run_dir).has_checkpoint() and marker.is_file():
        try:
            started = json.loads(marker.read_text())
            if same_settings(started.get("fingerprint"), fp) and same_digest(started.get("recipe_digest"), digest):
                return run_dir
        except (OSError, json.JSONDecodeError, AttributeError):
            pass
    if RunFolder(run_dir).is_complete():
        aside = run_dir.with_name(f"{run_dir.name}.replaced-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}")
        run_dir.rename(aside)
        print(f"{run_dir} held a finished run of other settings: moved to {aside.name}, this cell starts afresh",
              flush=True)
    elif run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    atomic_write_text(marker, json.dumps({"fingerprint": fp, "recipe_digest": digest}) + "\n", "cell marker")
    return None


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return None
    return node


def refuse_another_precision(matrix, pending, records, runs_dir, runs_path, load_config, device=None) -> None:
    """Stop before training when this machine would train a cell in another precision than the finished cells
    configured like it (same train.amp): a report refuses to compare them, so the hours would be lost. E.g. a bf16
    matrix started on a CPU with native bf16 and continued on one without, which would train in fp32."""
    from ..engine.distributed import resolve_device
    from ..engine.precision import resolve_precision

    loaded = {}  # a cell's device and train.amp come from the recipe and its device and train.* overrides only:
    # each such set is loaded once (a matrix of 30 finished cells needs one or two loads, not 30)

    def device_and_amp(overrides: list[str]) -> tuple[str, str]:
        key = tuple(sorted(o for o in overrides if o.startswith(("train.", "device="))))
        if key not in loaded:
            cfg = load_config(matrix["recipe_path"], overrides=list(key))
            loaded[key] = (cfg.device, cfg.train.amp)
        return loaded[key]
    finished = {}  # train.amp -> {precision: a cell}
    for r in latest_by_cell(records).values():
        if r.get("status") == "ok" and isinstance(r.get("overrides"), dict):
            _, amp = device_and_amp([f"{k}={format_value(v)}" for k, v in r["overrides"].items()])
            finished.setdefault(amp, {}).setdefault(precision_of(r), f"{r['method']} seed {r['seed']}")
    for c, prev in pending:
        if prev is not None:
            continue
        cell_device, amp = device_and_amp(cell_overrides(matrix, c, runs_dir, device))
        here, why = resolve_precision(resolve_device(cell_device), amp)
        others = {p: cell for p, cell in finished.get(amp, {}).items() if p != here}
        if others:
            precision, cell = next(iter(others.items()))
            raise AttnlabError(f"{runs_path}: {cell} trained in {precision}, but here {c['method']} seed {c['seed']} "
                               f"would train in {here}{f' ({why})' if why else ''}; a report refuses to compare "
                               "them, so run this matrix where the precision is the same")
