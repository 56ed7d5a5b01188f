"""The training engine on tiny real CIFAR-10 runs: files and columns, the objectives hook, best/last checkpoints,
atomic writes, NaN handling, the eval command, and the schedule/optimizer/EMA pieces."""
import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch

from attnlab.engine import checkpoint as ckpt_mod
from attnlab.engine.checkpoint import atomic_save, load_checkpoint
from attnlab.engine.config import load_config
from attnlab.engine.ema import EMA
from attnlab.engine.optim import build_optimizer, lr_factor
from attnlab.engine.train import train
from attnlab.errors import AttnlabError
from attnlab.measure import fmt_duration
from attnlab.objectives import Objective, _OBJECTIVES, register_objective

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.needs_data("cifar10")

STEPS = 5  # 180 training images (20 per class less a 10% hold-out) in batches of 32, last one dropped


class TinyProbe(Objective):
    """A test objective: weight * mean square of the last stage's output; NaN at one chosen step."""
    features = "stages"
    calls: list = []

    def __init__(self, weight, nan_at_step):
        self.weight, self.nan_at_step = weight, nan_at_step

    def __call__(self, *, model, logits, targets, features, epoch, step):
        last = features["stages"][-1]
        value = self.weight * last.float().pow(2).mean()
        if step == self.nan_at_step:
            value = value * float("nan")
        TinyProbe.calls.append({"epoch": epoch, "step": step, "value": float(value.detach()),
                                "shape": tuple(last.shape), "logits": tuple(logits.shape),
                                "model": type(model).__name__})
        return {"tiny_probe": value}


@pytest.fixture(scope="module", autouse=True)
def probe_objective():
    register_objective("tiny_probe", defaults={"enabled": False, "weight": 0.01, "nan_at_step": -1})(TinyProbe)
    yield
    _OBJECTIVES.pop("tiny_probe", None)


def tiny(tmp, name, *extra):
    return load_config(None, [f"name={name}", f"out_dir={tmp}", f"data.cache_dir={tmp}/cache", "data.subset=20",
                              "data.test_subset=10", "train.batch_size=32", "train.eval_batch_size=64",
                              "train.lr=0.05", "train.warmup_epochs=1", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 3-epoch run with the probe objective on; several tests read its files."""
    tmp = tmp_path_factory.mktemp("engine")
    TinyProbe.calls.clear()
    results = train(tiny(tmp, "base", "train.epochs=3", "tiny_probe.enabled=true"))
    return tmp / "base", results, list(TinyProbe.calls)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_writes_every_file(run):
    run_dir, results, _ = run
    for name in ("config.yaml", "metrics.csv", "checkpoint_last.pt", "checkpoint_best.pt", "results.json"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert not list(run_dir.glob(".*.tmp"))  # no temp checkpoint left behind
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for key in ("best_val_top1", "test_top1", "test_top5", "params", "flops", "wall_time_s", "train_images_per_s",
                "device", "git_commit"):
        assert key in saved, key
    from attnlab import create_model
    assert saved["params"] == sum(p.numel() for p in create_model("resnet20").parameters())
    assert saved["flops"] > 10_000_000  # resnet20 at 32x32 is ~41 M MACs
    assert 0 <= saved["test_top1"] <= saved["test_top5"] <= 100
    cfg = load_config(None, base=__import__("omegaconf").OmegaConf.load(run_dir / "config.yaml"))
    assert cfg.model.num_classes == 10  # resolved from the dataset


def test_metrics_rows_and_columns(run):
    run_dir, _, calls = run
    rows = read_csv(run_dir / "metrics.csv")
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                             "tiny_probe", "epoch_time_s", "images_per_s"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for r in rows:
        assert float(r["images_per_s"]) > 0 and float(r["epoch_time_s"]) > 0
        assert 0 <= float(r["val_top1"]) <= float(r["val_top5"]) <= 100
    # The logged term is the epoch mean of what the objective returned (equal batches, so a plain mean).
    for epoch, r in enumerate(rows):
        values = [c["value"] for c in calls if c["epoch"] == epoch]
        assert len(values) == STEPS
        assert float(r["tiny_probe"]) == pytest.approx(sum(values) / len(values), rel=1e-4)
    # The hook got the stage features, the logits and the plain model, with global step numbers.
    assert [c["step"] for c in calls] == list(range(3 * STEPS))
    assert calls[0]["shape"] == (32, 64, 8, 8) and calls[0]["logits"] == (32, 10) and calls[0]["model"] == "ResNet"
    # Warm-up over epoch 1 reaches the base lr at its last step, then cosine decay.
    assert float(rows[0]["lr"]) == pytest.approx(0.05)
    assert float(rows[2]["lr"]) < float(rows[1]["lr"]) < 0.05


def test_tensorboard_has_the_epoch_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir, _, _ = run
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("train/train_loss", "val/val_top1", "train/tiny_probe", "misc/lr"):
        assert tag in tags, tags
    assert [e.step for e in acc.Scalars("val/val_top1")] == [1, 2, 3]


def test_best_checkpoint_is_the_best_val_epoch(run):
    run_dir, results, _ = run
    rows = read_csv(run_dir / "metrics.csv")
    val = [float(r["val_top1"]) for r in rows]
    best_epoch = val.index(max(val)) + 1  # the first epoch reaching the maximum
    best, last = load_checkpoint(run_dir / "checkpoint_best.pt"), load_checkpoint(run_dir / "checkpoint_last.pt")
    assert best["epoch"] == best_epoch and last["epoch"] == 3
    assert best["best_val_top1"] == pytest.approx(max(val), abs=1e-3)
    assert results["best_epoch"] == best_epoch and results["best_val_top1"] == pytest.approx(max(val), abs=1e-3)
    # top-5 is reported at the epoch chosen by top-1, not maximised on its own
    assert results["best_val_top5"] == pytest.approx(float(rows[best_epoch - 1]["val_top5"]), abs=1e-3)
    same = all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])
    assert same == (best_epoch == 3)
    assert set(last) >= {"model", "optimizer", "scheduler", "scaler", "ema", "epoch", "best_val_top1", "rng", "config"}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in last["model"])


def test_eval_command_matches_the_run(run, capsys, monkeypatch):
    from attnlab.cli import main
    from attnlab.data import cache
    monkeypatch.setattr(cache, "PROGRESS_MIN_IMAGES", 50)  # progress from 1,000 images on; these splits are small
    run_dir, results, _ = run
    best = run_dir / "checkpoint_best.pt"
    for split, expected in (("test", results["test_top1"]), ("val", results["best_val_top1"])):
        with pytest.raises(SystemExit) as info:
            main(["eval", "--checkpoint", str(best), "--split", split])
        assert info.value.code == 0
        out, err = capsys.readouterr()
        assert f"{split}: top-1" in out
        saved = json.loads((run_dir / f"eval_{split}.json").read_text())
        assert saved["split"] == split and saved["images"] == (100 if split == "test" else 20)
        assert saved["top1"] == pytest.approx(expected, abs=1e-6)  # same weights, same images, same answer
        assert f"{saved['top1']:.2f}%" in out
        # Progress in plain lines (stderr is not a terminal here): batches of 64 over the 100 test images; the 20
        # val images are under the threshold.
        assert err.splitlines() == (["eval test: evaluated 64/100 images", "eval test: evaluated 100/100 images"]
                                    if split == "test" else [])
    with pytest.raises(SystemExit) as info:  # --out naming a folder: said so, not "the previous one is kept"
        main(["eval", "--checkpoint", str(best), "--out", str(run_dir)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"{run_dir}: it is a folder; give a file path" in err and "kept" not in err
    with pytest.raises(SystemExit) as info:  # asked of a run without TDAM: what to drop is the flag itself
        main(["eval", "--checkpoint", str(best), "--tdam-any-step"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--tdam-any-step needs TDAM blocks" in err and "(drop --tdam-any-step)" in err


def test_each_epoch_line_says_the_time_left_but_the_last(tmp_path, capsys):
    train(tiny(tmp_path, "eta", "train.epochs=2"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2
    assert re.search(r"img/s  \d+m\d\ds left$", lines[0]), lines[0]  # one epoch left at the first epoch's pace
    assert lines[1].endswith("img/s")


@pytest.mark.parametrize("seconds, text", [(0, "0m00s"), (59.6, "1m00s"), (247, "4m07s"), (3599, "59m59s"),
                                           (3600, "1h00m"), (3900, "1h05m"), (90061, "25h01m")])
def test_durations_read_as_hours_and_minutes_or_minutes_and_seconds(seconds, text):
    assert fmt_duration(seconds) == text


def test_atomic_save_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pt"
    atomic_save({"w": torch.arange(5)}, path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(AttnlabError, match="no space left on device writing .*checkpoint_last.pt; the previous "
                                           "checkpoint is kept"):
        atomic_save({"w": torch.zeros(5)}, path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # the partial temp file is gone


def test_a_full_disk_under_torch_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    # The OS refuses a write with ENOSPC half-way through a real torch.save (torch itself then raises its own
    # "enforce fail ... unexpected pos" RuntimeError): the message is about the disk, the old file stays.
    import errno
    from attnlab import files
    path = tmp_path / "checkpoint_last.pt"
    atomic_save({"w": torch.arange(5)}, path)
    before = path.read_bytes()
    real_write, calls = files._write_bytes, []

    def disk_full_after_a_while(fd, data):
        calls.append(len(data))
        if sum(calls) > 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(files, "_write_bytes", disk_full_after_a_while)
    with pytest.raises(AttnlabError) as info:
        atomic_save({"w": torch.randn(3_000_000)}, path)
    assert str(info.value) == f"no space left on device writing {path}; the previous checkpoint is kept"
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_a_failed_checkpoint_write_stops_training_and_keeps_the_previous_one(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def save_once_then_fail(obj, f):
        calls.append(1)
        if len(calls) > 2:  # epoch 1 writes last and best; epoch 2's first write fails half-way
            f.write(b"garbage")
            raise OSError(5, "Input/output error")
        real_save(obj, f)

    monkeypatch.setattr(ckpt_mod.torch, "save", save_once_then_fail)
    with pytest.raises(AttnlabError, match="could not write checkpoint"):
        train(tiny(tmp_path, "fails", "train.epochs=2", "debug.max_steps_per_epoch=2"))
    monkeypatch.undo()
    last = load_checkpoint(tmp_path / "fails" / "checkpoint_last.pt")
    assert last["epoch"] == 1
    assert not list((tmp_path / "fails").glob(".*.tmp"))


def test_nan_loss_stops_with_the_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    bad = STEPS + 2  # the third step of epoch 2
    with pytest.raises(AttnlabError) as info:
        train(tiny(tmp_path, "nan", "train.epochs=3", "tiny_probe.enabled=true", f"tiny_probe.nan_at_step={bad}"))
    msg = str(info.value)
    assert "nan" in msg and "epoch 2" in msg and f"step {bad}" in msg and "\n" not in msg
    run_dir = tmp_path / "nan"
    last = load_checkpoint(run_dir / "checkpoint_last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in read_csv(run_dir / "metrics.csv")] == ["1"]
    assert not (run_dir / "results.json").exists()


def test_missing_dataset_is_the_data_layers_error(tmp_path):
    with pytest.raises(AttnlabError, match="nowhere"):
        train(tiny(tmp_path, "nodata", "data.data_dir=" + str(tmp_path / "nowhere")))


def test_lr_schedules():
    t = load_config(None, ["train.epochs=10", "train.warmup_epochs=2"]).train
    assert [lr_factor(s, 10, t) for s in (0, 9, 19)] == pytest.approx([0.05, 0.5, 1.0])
    assert lr_factor(20, 10, t) == pytest.approx(1.0)  # cosine starts where the warm-up ends
    assert lr_factor(60, 10, t) == pytest.approx(0.5)  # half-way through the cosine part
    assert lr_factor(99, 10, t) < 1e-3
    m = load_config(None, ["train.epochs=10", "train.schedule=multistep", "train.milestones=[3,6]",
                           "train.gamma=0.2"]).train
    assert [lr_factor(s, 10, m) for s in (29, 30, 59, 60, 99)] == pytest.approx([1, 0.2, 0.2, 0.04, 0.04])


def test_weight_decay_can_skip_bn_and_bias():
    from attnlab import create_model
    model = create_model("resnet20", attention="se")
    t = load_config(None, ["train.wd_on_bn_bias=false", "train.weight_decay=0.001", "train.nesterov=true"]).train
    opt = build_optimizer(model, t)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.001 and no_decay["weight_decay"] == 0.0 and decay["nesterov"]
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    t = load_config(None, []).train
    assert len(build_optimizer(model, t).param_groups) == 1


def test_ema_follows_the_weights():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(net, decay=0.5)
    start = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(3.0)
    ema.update(net)  # decay warms up: min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module[0].weight, d * start + (1 - d) * net[0].weight)
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean)
    assert not math.isnan(float(ema.module[0].weight.sum()))
