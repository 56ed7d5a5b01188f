"""attnlab.jsonl: the append-only record files (bench's runs.jsonl, EAN's evaluation cache and search log)."""
import multiprocessing

from attnlab.jsonl import append_jsonl, read_jsonl


def test_a_torn_line_is_skipped_kept_and_never_swallows_the_next(tmp_path, capsys):
    path = tmp_path / "r" / "runs.jsonl"
    append_jsonl(path, {"method": "a", "seed": 0})
    with open(path, "a") as f:
        f.write('{"method": "b", "se')  # the process died mid-write
    assert read_jsonl(path) == [{"method": "a", "seed": 0}]
    assert "line 2 is not a JSON record" in capsys.readouterr().err
    before = path.read_bytes()
    append_jsonl(path, {"method": "c", "seed": 0})
    assert path.read_bytes().startswith(before)  # nothing already written is rewritten
    assert [r["method"] for r in read_jsonl(path)] == ["a", "c"]


def test_lines_that_are_not_records_are_skipped_with_their_line_numbers(tmp_path, capsys):
    path = tmp_path / "cache.jsonl"
    path.write_bytes(b'{"a": 1}\nnot json\n[1, 2]\n\xff\xfe\n\n{"b": 2}\n')
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]
    err = capsys.readouterr().err
    assert all(f"line {n} is not a JSON record" in err for n in (2, 3, 4)) and "line 5" not in err
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_sort_keys_and_numpy_like_scalars(tmp_path):
    import torch
    path = tmp_path / "x.jsonl"
    append_jsonl(path, {"z": 1, "a": torch.tensor(2.5)}, sort_keys=True)
    assert path.read_text() == '{"a": 2.5, "z": 1}\n'


def _append_many(args):
    path, writer, n = args
    for k in range(n):
        append_jsonl(path, {"method": f"w{writer}", "seed": k, "pad": "x" * 30000})  # far above one pipe write


def test_concurrent_writers_never_tear_or_interleave_lines(tmp_path):
    path = tmp_path / "runs.jsonl"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_append_many, [(path, w, 40) for w in range(4)])
    lines = path.read_text().splitlines()
    assert len(lines) == 160 and len(read_jsonl(path)) == 160
    assert sorted((r["method"], r["seed"]) for r in read_jsonl(path)) == [(f"w{w}", k) for w in range(4)
                                                                         for k in range(40)]


def _append_late(path, blocked):
    import fcntl
    with open(path, "a+b") as probe:  # is the file locked when this writer comes?
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(probe, fcntl.LOCK_UN)
        except BlockingIOError:
            blocked.value = 1
    append_jsonl(path, {"method": "late", "seed": 0})


def test_update_reads_and_appends_under_one_lock_so_no_writer_slips_in_between(tmp_path):
    import time

    from attnlab.jsonl import update_jsonl
    path = tmp_path / "runs.jsonl"
    append_jsonl(path, {"method": "a", "seed": 0})
    ctx = multiprocessing.get_context("fork")
    blocked = ctx.Value("i", 0)
    seen = {}

    def choose(records):
        seen["records"] = [r["method"] for r in records]
        writer = ctx.Process(target=_append_late, args=(path, blocked))
        writer.start()
        end = time.time() + 20
        while not blocked.value and time.time() < end:
            time.sleep(0.05)
        time.sleep(0.3)  # the other writer is now waiting on the lock
        seen["writer"] = writer
        return [{"method": "b", "seed": 0}, {"method": "c", "seed": 0}]

    assert update_jsonl(path, choose) == [{"method": "b", "seed": 0}, {"method": "c", "seed": 0}]
    seen["writer"].join(10)
    assert seen["records"] == ["a"] and blocked.value == 1
    assert [r["method"] for r in read_jsonl(path)] == ["a", "b", "c", "late"]


def test_update_whose_choice_fails_writes_nothing(tmp_path):
    import pytest

    from attnlab.jsonl import update_jsonl
    path = tmp_path / "runs.jsonl"
    append_jsonl(path, {"method": "a", "seed": 0})
    before = path.read_bytes()

    def refuse(_records):
        raise ValueError("another matrix")

    with pytest.raises(ValueError, match="another matrix"):
        update_jsonl(path, refuse)
    assert path.read_bytes() == before
    assert update_jsonl(path, lambda _records: []) == [] and path.read_bytes() == before
