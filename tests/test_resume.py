"""Resume: a run SIGKILLed mid-epoch and resumed ends with the same weights as an uninterrupted run (CPU,
deterministic), because model, optimizer, scheduler, EMA and RNG states are checkpointed and the data order is a
pure function of (seed, epoch)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnlab.engine.checkpoint import load_checkpoint
from attnlab.engine.config import load_config
from attnlab.engine.metrics import RunLog
from attnlab.engine.run_folder import RunFolder
from attnlab.engine.train import resume_config, train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.needs_data("cifar10")

STEPS = 5


def overrides(tmp, name):
    return [f"name={name}", f"out_dir={tmp}", f"data.cache_dir={tmp}/cache", "data.subset=20", "data.test_subset=10",
            "train.epochs=2", "train.batch_size=32", "train.eval_batch_size=64", "train.lr=0.05", "train.nesterov=true",
            "train.warmup_epochs=0.5", "train.label_smoothing=0.1", "train.ema.enabled=true", "train.ema.decay=0.9",
            "train.deterministic=true"]


def read_rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "images_per_s")} for r in csv.DictReader(f)]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].is_floating_point()
               else float(not torch.equal(a[k], b[k])) for k in a)


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, capsys):
    train(load_config(None, overrides(tmp_path, "whole")))

    # Same run in a child process that SIGKILLs itself at the third step of epoch 2 (same thread count as here).
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    kill_at = STEPS + 2
    proc = subprocess.run([sys.executable, "-m", "attnlab", "train", *overrides(tmp_path, "cut"),
                           f"debug.kill_at_step={kill_at}"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    cut = tmp_path / "cut"
    assert load_checkpoint(cut / "checkpoint_last.pt")["epoch"] == 1
    assert not (cut / "results.json").exists()

    from attnlab.cli import main
    with pytest.raises(SystemExit) as info:
        main(["train", "--resume", str(cut)])
    assert info.value.code == 0
    assert "resuming" in capsys.readouterr().out

    a, b = load_checkpoint(tmp_path / "whole" / "checkpoint_last.pt"), load_checkpoint(cut / "checkpoint_last.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert max_diff(a["model"], b["model"]) <= 1e-6
    assert max_diff(a["ema"]["module"], b["ema"]["module"]) <= 1e-6
    momentum_a = {str(k): v["momentum_buffer"] for k, v in a["optimizer"]["state"].items()}
    momentum_b = {str(k): v["momentum_buffer"] for k, v in b["optimizer"]["state"].items()}
    assert max_diff(momentum_a, momentum_b) <= 1e-6
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 2 * STEPS
    # One row per epoch, the replayed epoch once, with the uninterrupted run's values.
    assert read_rows(tmp_path / "whole" / "metrics.csv") == read_rows(cut / "metrics.csv")
    # The kill was a first-attempt debugging option: the resumed run's config no longer has it.
    assert load_config(None, base=__import__("omegaconf").OmegaConf.load(cut / "config.yaml")).debug.kill_at_step \
        is None


def test_resume_config_points_at_the_run_and_takes_overrides(tmp_path):
    run_dir = tmp_path / "moved" / "myrun"
    run_dir.mkdir(parents=True)
    saved = load_config(None, ["name=old", "out_dir=elsewhere", "train.epochs=3", "debug.kill_at_step=4"])
    (run_dir / "config.yaml").write_text(__import__("omegaconf").OmegaConf.to_yaml(saved))
    cfg = resume_config(run_dir, ["train.epochs=5"])
    assert (cfg.out_dir, cfg.name) == (str(run_dir.parent), "myrun")
    assert cfg.train.epochs == 5 and cfg.debug.kill_at_step is None
    assert resume_config(run_dir, ["debug.kill_at_step=9"]).debug.kill_at_step == 9  # a kill asked for this attempt
    from attnlab.errors import AttnlabError
    with pytest.raises(AttnlabError, match="config.yaml"):
        resume_config(tmp_path / "nothing-here")


def test_metrics_rows_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    # A run killed after writing epoch 3's row but before its checkpoint replays epoch 3: that row is rewritten once.
    cols = "epoch,lr,train_loss,train_top1,val_loss,val_top1,val_top5,epoch_time_s,images_per_s\n"
    (tmp_path / "metrics.csv").write_text(cols + "".join(f"{e},0.1,1,2,3,4,5,6,7\n" for e in (1, 2, 3)))
    log = RunLog(RunFolder(tmp_path), done=2)
    log.write({"epoch": 3, "lr": 0.05, "train_loss": 0.5, "train_top1": 9.0, "val_loss": 0.4, "val_top1": 8.0,
               "val_top5": 9.5, "epoch_time_s": 1.0, "images_per_s": 2.0}, [])
    log.close()
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["lr"]) for r in rows] == [("1", "0.1"), ("2", "0.1"), ("3", "0.05")]


def test_a_metrics_row_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    # Killed while appending epoch 12's row, before its checkpoint: only "1" of "12,..." reached the file.
    cols = "epoch,lr,train_loss,train_top1,val_loss,val_top1,val_top5,epoch_time_s,images_per_s\n"
    (tmp_path / "metrics.csv").write_text(cols + "".join(f"{e},0.1,1,2,3,4,5,6,7\n" for e in range(1, 12)) + "1")
    log = RunLog(RunFolder(tmp_path), done=11)
    for epoch in (12, 13):
        log.write({"epoch": epoch, "lr": 0.05, "train_loss": 0.5, "train_top1": 9.0, "val_loss": 0.4,
                   "val_top1": 8.0, "val_top5": 9.5, "epoch_time_s": 1.0, "images_per_s": 2.0}, [])
    log.close()
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == [str(e) for e in range(1, 14)]
    assert rows[10]["lr"] == "0.1" and rows[11]["lr"] == "0.05" and None not in rows[11].values()


HOOK_CHILD = """
import json, sys
from attnlab.engine.config import load_config
from attnlab.engine.train import train
log = open(sys.argv[1], "a")
def hook(trainer, epoch, step):
    log.write(json.dumps([epoch, step, type(trainer.model).__name__]) + "\\n"); log.flush()
train(load_config(None, sys.argv[2:]), step_hooks=[hook])
"""


def test_step_hooks_see_every_step_once_per_attempt_with_the_same_numbers_after_resume(tmp_path):
    short = ["train.epochs=3", "debug.max_steps_per_epoch=3"]
    whole = []
    train(load_config(None, overrides(tmp_path, "whole") + short),
          step_hooks=[lambda tr, epoch, step: whole.append((epoch, step, type(tr.model).__name__))])
    assert whole == [(e, e * 3 + i, "ResNet") for e in range(3) for i in range(3)]

    # A child run killed at the second step of epoch 2, then resumed here: epoch 2 replays from its first step.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    log = tmp_path / "hooks.jsonl"
    proc = subprocess.run([sys.executable, "-c", HOOK_CHILD, str(log), *overrides(tmp_path, "cut"), *short,
                           "debug.kill_at_step=4"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    first = [tuple(__import__("json").loads(line)) for line in log.read_text().splitlines()]
    assert first == whole[:4]  # the kill comes before step 4's hook
    resumed = []
    train(resume_config(tmp_path / "cut"), resume=tmp_path / "cut",
          step_hooks=[lambda tr, epoch, step: resumed.append((epoch, step, type(tr.model).__name__))])
    assert resumed == whole[3:]


def test_a_hook_that_changes_the_model_changes_training(tmp_path):
    short = ["train.epochs=1", "debug.max_steps_per_epoch=3"]

    def zero_first_conv(trainer, epoch, step):
        if step == 1:
            with torch.no_grad():
                trainer.model.conv1.weight.zero_()

    train(load_config(None, overrides(tmp_path, "plain") + short))
    train(load_config(None, overrides(tmp_path, "hooked") + short), step_hooks=[zero_first_conv])
    a = load_checkpoint(tmp_path / "plain" / "checkpoint_last.pt")["model"]
    b = load_checkpoint(tmp_path / "hooked" / "checkpoint_last.pt")["model"]
    assert max_diff(a, b) > 1e-3
    assert not torch.allclose(a["conv1.weight"], b["conv1.weight"])
