"""One home for append-only JSONL files: bench's runs.jsonl, the EAN evaluation cache and search log.

Every record is one line, appended in one ``write`` under an exclusive ``flock`` and fsynced before the call
returns, so concurrent writers (bench's workers, two processes on one matrix) never interleave and a record that
was reported written is on disk. A process killed mid-write leaves a torn line. Nothing ever rewrites what is
already in the file ("a crash never changes a result"): the next append starts on a fresh line, so the torn line
stays alone, and readers skip it with a warning naming the file and line. A skipped line only means its work is
done again (a bench cell re-runs, a search scheme is re-evaluated).
"""
import fcntl
import json
import os
import sys
from pathlib import Path


def read_jsonl(path) -> list[dict]:
    """Every record of ``path`` in order ([] if it does not exist), skipping lines that are not JSON objects."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_bytes().split(b"\n")):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict):
            out.append(record)
        else:
            print(f"attnlab: warning: {path} line {i + 1} is not a JSON record (a torn write?); ignored",
                  file=sys.stderr)
    return out


def append_jsonl(path, record: dict, sort_keys: bool = False) -> None:
    """Append ``record`` as one line of ``path`` (created with its folder), under an exclusive lock, fsynced."""
    _locked_append(path, lambda: [record], sort_keys)


def update_jsonl(path, choose, sort_keys: bool = False) -> list[dict]:
    """Append to ``path`` the records ``choose(records now in path)`` returns, all under one exclusive lock, so
    no other writer appends between the read and the appends (a merge never adds a cell a bench just wrote).
    Returns what was appended."""
    return _locked_append(path, lambda: choose(read_jsonl(path)), sort_keys)


def _locked_append(path, records, sort_keys: bool) -> list[dict]:
    """Append ``records()`` (called once the lock is held) in one write, fsynced; returns them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:  # appends always go to the end; reading the last byte needs the "+"
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            new = list(records())
            data = b"".join(json.dumps(r, sort_keys=sort_keys, default=_json_default).encode() + b"\n" for r in new)
            if not data:
                return []
            prefix = b""
            if f.seek(0, os.SEEK_END):  # a torn previous line must not swallow this one
                f.seek(-1, os.SEEK_END)
                prefix = b"" if f.read(1) == b"\n" else b"\n"
            f.write(prefix + data)
            f.flush()
            os.fsync(f.fileno())
            return new
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy and torch scalars
        return obj.item()
    return str(obj)
