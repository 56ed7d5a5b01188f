"""Nothing lost, nothing silent (issue 11): kills inside checkpoint writes, existing run dirs, changed and finished
resumes, leftover temp files and permissions, read-only destinations. Tiny real CIFAR-10 runs (3 steps an epoch)."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnlab.cli import main
from attnlab.engine.checkpoint import load_checkpoint
from attnlab.engine.config import load_config
from attnlab.engine.optim import lr_factor
from attnlab.engine.train import RESUMABLE_CHANGES, resume_config, train
from attnlab.errors import AttnlabError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.needs_data("cifar10")
STEPS = 3
# Left out of the approximate comparison: timings and names, and epochs_by_precision (a nested dict, compared exactly).
TIMING = {"wall_time_s", "train_images_per_s", "train_images_per_s_median_epoch", "device", "epochs_by_device", "name",
          "git_commit", "epochs_by_precision"}


def args(tmp, name, epochs=3):
    return [f"name={name}", f"out_dir={tmp}", f"data.cache_dir={tmp}/cache", "data.subset=20", "data.test_subset=10",
            f"train.epochs={epochs}", "train.batch_size=32", "train.eval_batch_size=64", "train.lr=0.1",
            "train.warmup_epochs=0.5", "train.deterministic=true", f"debug.max_steps_per_epoch={STEPS}"]


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under ``folder`` (the decode cache left out)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "cache" not in p.parts}


def cli(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def child(argv, env_extra):
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), **env_extra)
    return subprocess.run([sys.executable, "-m", "attnlab", *argv], env=env, capture_output=True, text=True,
                          timeout=300)


def comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in TIMING}


# ---- 1: a kill while checkpoint_best.pt is written ----------------------------------------------------------------

def test_kill_while_the_best_checkpoint_is_written_never_reports_an_older_best(tmp_path):
    # Without a validation split every epoch is the new best, so the last epoch writes checkpoint_best.pt too: a kill
    # inside that write leaves checkpoint_last.pt saying "best: epoch 3" beside a checkpoint_best.pt of epoch 2, the
    # state in which resume used to report epoch 2's model.
    no_val = ["data.val_size=0"]
    whole = train(load_config(None, args(tmp_path, "whole") + no_val))
    assert whole["best_epoch"] == 3
    proc = child(["train", *args(tmp_path, "cut"), *no_val], {"ATTNLAB_KILL_IN_WRITE": "checkpoint_best.pt:3"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    cut = tmp_path / "cut"
    assert load_checkpoint(cut / "checkpoint_best.pt")["epoch"] == 2
    assert load_checkpoint(cut / "checkpoint_last.pt")["best_epoch"] == 3
    assert list(cut.glob(".checkpoint_best.pt.*.tmp"))  # killed mid-write: the temp file is there
    resumed = train(resume_config(cut), resume=cut)
    assert comparable(resumed) == pytest.approx(comparable(whole))
    assert resumed["epochs_by_precision"] == whole["epochs_by_precision"] == {"fp32": 3}
    assert resumed["best_epoch"] == 3 and load_checkpoint(cut / "checkpoint_best.pt")["epoch"] == 3
    assert not list(cut.glob(".*.tmp"))  # item 5: the kill's temp file is cleaned up on resume


# ---- 2: an existing run dir ---------------------------------------------------------------------------------------

def test_training_into_an_existing_run_refuses_and_changes_nothing(tmp_path, capsys):
    train(load_config(None, args(tmp_path, "quick", epochs=1)))
    before = snapshot(tmp_path / "quick")
    code, _, err = cli(["train", *args(tmp_path, "quick", epochs=1), "model.attention=eca"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "already holds a run" in err and f"--resume {tmp_path / 'quick'}" in err and "name=" in err \
        and "--overwrite" in err
    assert snapshot(tmp_path / "quick") == before
    # --overwrite with a run that cannot start (its data folder is missing; the batch is larger than the data):
    # the error is said and the old run is still whole.
    for bad in (f"data.data_dir={tmp_path / 'nowhere'}", "train.batch_size=5000"):
        code, _, err = cli(["train", *args(tmp_path, "quick", epochs=1), bad, "--overwrite"], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert snapshot(tmp_path / "quick") == before, bad
    # --overwrite replaces it: one fresh metrics row, one TensorBoard file, the new attention in the checkpoint.
    code, _, _ = cli(["train", *args(tmp_path, "quick", epochs=1), "model.attention=eca", "--overwrite"], capsys)
    assert code == 0
    assert len(list((tmp_path / "quick").glob("events.out.tfevents.*"))) == 1
    assert load_checkpoint(tmp_path / "quick" / "checkpoint_last.pt")["config"]["model"]["attention"] == "eca"


def test_a_dir_holding_only_the_callers_kept_files_counts_as_empty(tmp_path):
    # bench writes its cell marker before it calls train(): the engine leaves the files the caller names alone.
    run_dir = tmp_path / "cell"
    run_dir.mkdir()
    (run_dir / "bench_cell.json").write_text('{"fingerprint": "x"}\n')
    with pytest.raises(AttnlabError, match="already holds a run"):  # not named: another run's file
        train(load_config(None, args(tmp_path, "cell", epochs=1)))
    train(load_config(None, args(tmp_path, "cell", epochs=1)), keep=("bench_cell.json",))
    assert (run_dir / "results.json").is_file()
    assert (run_dir / "bench_cell.json").read_text() == '{"fingerprint": "x"}\n'


# ---- 3 and 4: resume with overrides, resume of a finished run --------------------------------------------------

def test_resume_applies_epochs_and_lr_and_records_them(tmp_path, capsys):
    train(load_config(None, args(tmp_path, "r", epochs=2)))
    run_dir = tmp_path / "r"
    code, out, _ = cli(["train", "--resume", str(run_dir), "train.epochs=3", "train.lr=0.02"], capsys)
    assert code == 0 and "train.lr=0.02 (was 0.1)" in out
    last = load_checkpoint(run_dir / "checkpoint_last.pt")
    assert last["epoch"] == 3
    # Epoch 3's first step ran at 0.02 x the 3-epoch schedule's factor at step 6; the next lr continues from there.
    t = load_config(None, args(tmp_path, "r", epochs=3) + ["train.lr=0.02"]).train
    import csv
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert float(rows[2]["lr"]) == pytest.approx(0.02 * lr_factor(3 * STEPS - 1, STEPS, t), rel=1e-4)
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.02 * lr_factor(3 * STEPS, STEPS, t))
    saved = (run_dir / "config.yaml").read_text()
    assert saved.startswith("# resumed after epoch 2 with train.epochs=3 (was 2), train.lr=0.02 (was 0.1)")
    assert "lr: 0.02" in saved and "epochs: 3" in saved
    assert json.loads((run_dir / "results.json").read_text())["epochs"] == 3


def test_a_finished_run_trained_on_and_killed_is_not_reported_done_with_its_old_results(tmp_path, capsys):
    train(load_config(None, args(tmp_path, "r", epochs=1)))
    run_dir = tmp_path / "r"
    killed = child(["train", "--resume", str(run_dir), "train.epochs=2", f"debug.kill_at_step={STEPS + 1}"], {})
    assert killed.returncode == -9
    assert not (run_dir / "results.json").exists()  # it described the 1-epoch run, whose best may be overtaken
    assert load_checkpoint(run_dir / "checkpoint_last.pt")["epoch"] == 1
    code, _, _ = cli(["train", "--resume", str(run_dir), "train.epochs=2"], capsys)
    assert code == 0 and json.loads((run_dir / "results.json").read_text())["epochs"] == 2


def test_a_run_resumed_with_another_thread_count_names_both_in_its_results(tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train(load_config(None, args(tmp_path, "t", epochs=2)))
        torch.set_num_threads(1)
        results = train(resume_config(tmp_path / "t", ["train.epochs=3"]), resume=tmp_path / "t")
    finally:
        torch.set_num_threads(before)
    assert results["device"].endswith("1 threads)")  # the process that finished it
    assert {k.rsplit(", ", 1)[1]: n for k, n in results["epochs_by_device"].items()} == {"2 threads)": 2,
                                                                                        "1 threads)": 1}


def test_resume_refuses_keys_that_define_the_run_and_changes_nothing(tmp_path, capsys):
    train(load_config(None, args(tmp_path, "r", epochs=1)))
    run_dir = tmp_path / "r"
    (run_dir / "results.json").unlink()  # not finished: it would resume
    before = snapshot(run_dir)
    code, _, err = cli(["train", "--resume", str(run_dir), "model.attention=se", "seed=3", "train.epochs=2"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "cannot change on resume: model.attention (none -> se), seed (0 -> 3)" in err
    assert "train.epochs" not in err.split(";")[0]
    offered = err.split("resume may change ", 1)[1].split(")", 1)[0].split(", ")
    assert offered == [k for k in RESUMABLE_CHANGES if k not in ("name", "out_dir")]  # all it accepts
    assert snapshot(run_dir) == before
    # Without checkpoint_last.pt but with a best epoch: not "killed in epoch 1", so it is not retrained over.
    (run_dir / "checkpoint_last.pt").unlink()
    before = snapshot(run_dir)
    code, _, err = cli(["train", "--resume", str(run_dir)], capsys)
    assert code == 2 and err.count("\n") == 1 and "has checkpoint_best.pt but no checkpoint_last.pt" in err
    assert snapshot(run_dir) == before


def test_resume_says_it_takes_a_run_folder_that_stays_put_and_reads_its_config_as_a_recipe(tmp_path, capsys):
    train(load_config(None, args(tmp_path, "r", epochs=1)))
    run = tmp_path / "r"
    before = snapshot(tmp_path)
    for target, extra, message in (
            (run / "checkpoint_last.pt", [], "is a file; --resume takes the run folder attnlab train wrote"),
            (tmp_path / "nope", [], "does not exist; --resume takes the run folder attnlab train wrote"),
            (run, ["name=other"], "name and out_dir come from the run folder on resume"),
            (run, [f"out_dir={tmp_path / 'elsewhere'}"], "name and out_dir come from the run folder on resume")):
        code, _, err = cli(["train", "--resume", str(target), *extra], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err
    assert snapshot(tmp_path) == before
    (run / "config.yaml").write_text(f"!!python/object/apply:os.system ['touch {tmp_path / 'ran'}']\n")
    code, _, err = cli(["train", "--resume", str(run)], capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot read config" in err and not (tmp_path / "ran").exists()


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    train(load_config(None, args(tmp_path, "done", epochs=2)))
    capsys.readouterr()
    run_dir = tmp_path / "done"
    before = snapshot(run_dir)
    code, out, _ = cli(["train", "--resume", str(run_dir)], capsys)
    assert code == 0 and "is complete" in out and "train.epochs=" in out
    assert snapshot(run_dir) == before  # no new TensorBoard file, results.json untouched
    # Overrides that would apply to no epoch, or fewer epochs than trained, are refused rather than recorded.
    for override, words in (("train.lr=0.01", "would apply to none"), ("train.epochs=1", "fewer than the 2")):
        code, _, err = cli(["train", "--resume", str(run_dir), override], capsys)
        assert code == 2 and words in err and err.count("\n") == 1
    assert snapshot(run_dir) == before


# ---- 5: temp files and permissions --------------------------------------------------------------------------------

def test_leftover_temps_are_removed_and_files_get_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run_dir = tmp_path / "p"
        train(load_config(None, args(tmp_path, "p", epochs=1)))
        (run_dir / "results.json").unlink()
        stale = run_dir / ".checkpoint_last.pt.dead.tmp"
        stale.write_bytes(b"half")
        train(resume_config(run_dir), resume=run_dir)
        assert not stale.exists()
        for name in ("checkpoint_last.pt", "checkpoint_best.pt", "results.json", "config.yaml"):
            assert (run_dir / name).stat().st_mode & 0o777 == 0o644, name
        from attnlab.export import export_onnx, load_checkpoint_model
        model, _ = load_checkpoint_model(run_dir)
        out = export_onnx(model, tmp_path / "m.onnx", 32)
        assert out.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


# ---- 9: read-only destinations ------------------------------------------------------------------------------------

def read_only(monkeypatch, root: Path):
    """The OS answers EROFS to creating or deleting anything under ``root`` (we run as root, so chmod would not stop
    us). As on a real read-only mount, deleting answers EROFS even for a file that is not there."""
    real_open, real_mkdir, real_unlink = os.open, os.mkdir, os.unlink
    inside = lambda p: Path(os.path.abspath(p)).is_relative_to(root)

    def ro_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    def ro_mkdir(path, *a, **k):
        if inside(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *a, **k)

    def ro_unlink(path, *a, **k):
        if inside(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_unlink(path, *a, **k)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)
    monkeypatch.setattr(os, "unlink", ro_unlink)


def test_read_only_destinations_are_one_line_errors(tmp_path, capsys, monkeypatch):
    train(load_config(None, args(tmp_path, "src", epochs=1)))
    ckpt = tmp_path / "src" / "checkpoint_best.pt"
    ro = tmp_path / "ro"
    ro.mkdir()
    before = snapshot(tmp_path)
    read_only(monkeypatch, ro)
    code, _, err = cli(["train", *args(tmp_path, "x", epochs=1), f"out_dir={ro}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "read-only file system" in err and str(ro / "x") in err
    code, _, err = cli(["export", "--checkpoint", str(ckpt), "--onnx", str(ro / "m.onnx")], capsys)
    assert code == 2 and err.count("\n") == 1 and "read-only file system" in err and str(ro / "m.onnx") in err
    monkeypatch.undo()
    read_only(monkeypatch, tmp_path / "src")
    code, _, err = cli(["eval", "--checkpoint", str(ckpt)], capsys)
    assert code == 2 and err.count("\n") == 1 and "read-only file system" in err and "--out" in err
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


def test_outputs_never_replace_the_runs_files_a_device_or_a_link(tmp_path, capsys):
    train(load_config(None, args(tmp_path, "src", epochs=1)))
    run = tmp_path / "src"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    before = snapshot(tmp_path)
    for argv in (["eval", "--checkpoint", str(run), "--out", str(run / "checkpoint_best.pt")],
                 ["eval", "--checkpoint", str(run / "checkpoint_best.pt"), "--out", str(run / "results.json")],
                 ["export", "--checkpoint", str(run), "--onnx", str(run / "checkpoint_best.pt")]):
        code, _, err = cli(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "writing there would replace it; give another path" in err
    code, _, err = cli(["eval", "--checkpoint", str(run), "--out", str(fifo)], capsys)
    assert code == 2 and err.count("\n") == 1 and "it is a device, FIFO or socket, not a regular file" in err
    assert fifo.is_fifo() and snapshot(tmp_path) == before
    target, link = tmp_path / "real.json", tmp_path / "link.json"  # a link is written through, and stays a link
    link.symlink_to(target)
    code, _, _ = cli(["eval", "--checkpoint", str(run), "--out", str(link)], capsys)
    assert code == 0 and link.is_symlink() and "top1" in json.loads(target.read_text())


def test_a_trained_runs_missing_data_is_advised_in_the_commands_own_option(tmp_path, capsys):
    train(load_config(None, args(tmp_path, "src", epochs=1)))
    ckpt = tmp_path / "src" / "checkpoint_best.pt"
    state = torch.load(ckpt, weights_only=True)
    state["config"]["data"]["data_dir"] = str(tmp_path / "gone")  # the folder it trained on was moved away
    moved = tmp_path / "moved.pt"
    torch.save(state, moved)
    code, _, err = cli(["eval", "--checkpoint", str(moved)], capsys)
    assert code == 2 and err.count("\n") == 1 and "dataset 'cifar10' not found" in err
    assert "pass --data-dir <folder>" in err and "data.data_dir=" not in err


def _hold_then_mark(path, mark):
    from attnlab.files import held_lock
    with held_lock(path):
        Path(mark).write_text("got it")


def test_held_lock_makes_a_second_process_wait_and_survives_the_files_replacement(tmp_path):
    import multiprocessing
    import time

    from attnlab.files import atomic_write_json, held_lock
    path, mark = tmp_path / "latency.json", tmp_path / "mark"
    with held_lock(path):
        atomic_write_json(path, {"methods": {}})  # replaced under the lock: the sidecar still holds it
        other = multiprocessing.get_context("fork").Process(target=_hold_then_mark, args=(path, mark))
        other.start()
        time.sleep(0.5)
        assert not mark.exists() and other.is_alive()
    other.join(10)
    assert mark.read_text() == "got it" and other.exitcode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".latency.json.lock", "latency.json", "mark"]
