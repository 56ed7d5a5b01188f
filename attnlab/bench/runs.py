"""``results/<matrix>/runs.jsonl``: what the runner and the report read and write (a cell's run folder is the
engine's ``RunFolder``).

runs.jsonl holds one JSON line per finished cell, read and appended through :mod:`attnlab.jsonl` (locked appends,
so several writers never interleave; a torn line is skipped, and its cell counts as not run and runs again).
"""
import fcntl
from contextlib import contextmanager
from pathlib import Path

from ..errors import AttnlabError


def check_records(records, path) -> list:
    """``records`` of ``path`` (a runs.jsonl), each checked to be a cell's record: a ``method`` name, an integer
    ``seed`` >= 0, a ``status``, and numbers for the accuracies of a finished cell. A line edited by hand or
    merged from elsewhere is a one-line error naming it, not a TypeError deep in a report."""
    for r in records:
        seed, problem = r.get("seed"), None
        if not isinstance(r.get("method"), str) or not r["method"]:
            problem = "no method name"
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            problem = f"a seed ({seed!r}) that is not an integer >= 0"
        elif not isinstance(r.get("status"), str):
            problem = "no status"
        elif r["status"] == "ok":
            bad = [k for k in ("val_top1", "test_top1") if r.get(k) is not None
                   and (isinstance(r[k], bool) or not isinstance(r[k], (int, float)))]
            problem = f"a {' and '.join(bad)} that is not a number" if bad else None
        if problem:
            raise AttnlabError(f"{path}: the record of method {r.get('method')!r}, seed {seed!r} has {problem}; fix or "
                               "delete that line")
    return records


def latest_by_cell(records) -> dict:
    """{(method, seed): the last line recorded for that cell}."""
    out = {}
    for r in records:
        out[(r.get("method"), r.get("seed"))] = r
    return out


def is_done(prev: dict | None, matrix: dict, cell: dict, retry_failed: bool) -> bool:
    """Whether ``cell`` of ``matrix``, whose last record is ``prev``, is finished: it has a result, or it failed
    with the settings and recipe the matrix gives now and failures are not being retried. A failure under other
    settings or another version of the recipe (a typo since fixed) holds no result to keep: the cell trains anew."""
    from .matrix import fingerprint, same_recipe, same_settings
    if prev is None:
        return False
    if prev.get("status") == "ok":
        return True
    return not retry_failed and same_settings(prev.get("fingerprint"), fingerprint(matrix, cell)) \
        and same_recipe(prev, matrix)


def merge_runs(source, dest) -> dict:
    """Append to runs.jsonl ``dest`` the cells that runs.jsonl ``source`` finished and ``dest`` has not, e.g. a GPU
    slot's file (seeded from the committed one) into a checkout whose CPU benches went on meanwhile, which copying
    it over would lose. Per cell (``source``'s last record): one ``dest`` already holds, or any record of a cell
    ``dest`` finished (ok), is kept as it is. A record of another matrix, or of a method run with other settings
    than ``dest``'s runs of it, stops the merge before anything is written. Returns {'added', 'same', 'kept'}
    (kept: both ran it; ``dest``'s record stays)."""
    from ..jsonl import read_jsonl, update_jsonl
    from .matrix import same_digest, settings_of

    if not Path(source).is_file():
        raise AttnlabError(f"{source}: no such runs.jsonl to merge")
    incoming = latest_by_cell(check_records(read_jsonl(source), source))  # checked before any line is appended
    counts = {"added": 0, "same": 0, "kept": 0}

    def choose(records):  # runs under dest's lock: a bench appending to dest waits until the merge is written
        have = latest_by_cell(records)
        matrices = {r.get("matrix") for r in have.values()}
        settings = {method: settings_of(r.get("fingerprint")) for (method, _), r in have.items()}
        digests = {method: r["recipe_digest"] for (method, _), r in have.items() if r.get("recipe_digest")}
        new = []
        for cell, rec in incoming.items():
            if matrices and rec.get("matrix") not in matrices:
                raise AttnlabError(f"{source} holds matrix '{rec.get('matrix')}', {dest} matrix "
                                   f"'{', '.join(map(str, sorted(matrices, key=str)))}'; nothing merged")
            if cell[0] in settings and settings[cell[0]] != settings_of(rec.get("fingerprint")):
                raise AttnlabError(f"{source}: {cell[0]} seed {cell[1]} was run with other settings than {cell[0]} "
                                   f"in {dest}; nothing merged")
            if not same_digest(digests.get(cell[0]), rec.get("recipe_digest")):
                raise AttnlabError(f"{source}: {cell[0]} seed {cell[1]} was trained with another version of the "
                                   f"recipe than {cell[0]} in {dest}; nothing merged")
            old = have.get(cell)
            if old == rec:
                counts["same"] += 1
            elif old is None or (old.get("status") != "ok" and rec.get("status") == "ok"):
                new.append(rec)  # a cell that failed here takes the other's result
            else:
                counts["kept"] += 1
        return new

    counts["added"] = len(update_jsonl(dest, choose))
    return counts


@contextmanager
def cell_lock(path):
    """Hold an exclusive lock on ``path`` while a cell runs: yields the open lock file (a child process given its
    descriptor holds the lock with it), or False (holding nothing) when another process has it. The kernel drops
    the lock when the last process holding it dies, so a killed run never leaves its cell locked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield f
    finally:
        f.close()


def one_line(err: BaseException) -> str:
    msg = " ".join(str(err).split())
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def precision_of(record: dict) -> str:
    """The precision a cell trained in; records from before it was recorded trained in fp32 on a CPU and in bf16
    autocast on CUDA (the engine's only behaviours then)."""
    if record.get("precision"):
        return record["precision"]
    devices = record.get("epochs_by_device") or {record.get("device") or "": 1}
    return "fp32" if all(str(d).startswith("cpu") for d in devices) else "bf16"
