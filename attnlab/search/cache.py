"""An append-only JSONL file of records, one per line, that survives crashes and restarts.

Each record is written as one line, flushed and fsync'ed before the call returns, so a record either is complete on
disk or (after a crash mid-write) is a partial last line. Reading skips a partial last line, and the next append
first cuts it off, so the file never holds a line glued onto half of another.
"""
import json
import os
from pathlib import Path

from ..errors import AttnlabError


def read_jsonl(path) -> list[dict]:
    """All complete records of ``path`` (none if it does not exist). A bad line other than the last is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the partial line of a write cut off by a crash
                break
            raise AttnlabError(f"{path}: line {i + 1} is not JSON; the file was edited or corrupted") from None
    return records


class JsonlLog:
    """Append records to a JSONL file, one fsync'ed line each."""

    def __init__(self, path, truncate: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate:
            self.path.write_bytes(b"")
        self._cut_partial_line()

    def _cut_partial_line(self):
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def append(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
