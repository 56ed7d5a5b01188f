"""Regression pin: a short deterministic CPU run gives the same per-step losses and final weights as the committed
values, so a refactor of the engine cannot change a result unnoticed.

The values were generated from the engine before the issue-11 refactor (commit 3d14980) with
``ATTNLAB_REGRESSION_PRINT=1 .venv/bin/python -m pytest tests/test_regression.py -s``. Per-step losses are read
where every training step hands its loss to the grad scaler (a disabled scaler returns it unchanged), so recording
them changes nothing. One torch thread: a float sum over a different thread split rounds differently.
"""
import os
from pathlib import Path

import pytest
import torch

from attnlab.engine.checkpoint import load_checkpoint
from attnlab.engine.config import load_config
from attnlab.engine.train import train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="offline CIFAR-10 copy not found")

# 20 images per class, 10% held out (18 per class train): 180 images, 5 batches of 32, 2 epochs, first 4 steps each.
PINNED_LOSSES = [2.597155809402466, 2.3160414695739746, 2.4037938117980957, 2.677694797515869,
                 2.4640681743621826, 2.4446163177490234, 2.1984331607818604, 2.341043710708618]
PINNED_CHECKSUM = 1697.413433
PINNED_EMA_CHECKSUM = 1697.558641


def checksum(state: dict) -> float:
    """Sum of every tensor of a state_dict in float64 (integer buffers such as num_batches_tracked included)."""
    return float(sum(v.double().sum() for v in state.values()))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_short_deterministic_run_matches_the_pinned_numbers(tmp_path, monkeypatch, one_thread):
    losses = []
    real_scale = torch.amp.GradScaler.scale

    def recording_scale(self, outputs):
        losses.append(float(outputs.detach()))
        return real_scale(self, outputs)

    monkeypatch.setattr(torch.amp.GradScaler, "scale", recording_scale)
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=pin", f"data.cache_dir={tmp_path}/cache",
                             "model.name=resnet20", "data.subset=20", "data.val_size=0.1", "data.test_subset=10",
                             "train.epochs=2", "train.batch_size=32", "train.eval_batch_size=64", "train.lr=0.05",
                             "train.nesterov=true", "train.warmup_epochs=0.5", "train.label_smoothing=0.1",
                             "train.ema.enabled=true", "train.ema.decay=0.9", "train.deterministic=true",
                             "debug.max_steps_per_epoch=4", "device=cpu"])
    train(cfg)
    last = load_checkpoint(tmp_path / "pin" / "checkpoint_last.pt")
    got = (losses, round(checksum(last["model"]), 6), round(checksum(last["ema"]["module"]), 6))
    if os.environ.get("ATTNLAB_REGRESSION_PRINT"):
        print("\nPINNED_LOSSES =", losses, "\nPINNED_CHECKSUM =", got[1], "\nPINNED_EMA_CHECKSUM =", got[2])
    assert len(losses) == 8
    assert losses == pytest.approx(PINNED_LOSSES, rel=1e-6, abs=0)
    assert got[1] == pytest.approx(PINNED_CHECKSUM, rel=1e-9, abs=1e-6)
    assert got[2] == pytest.approx(PINNED_EMA_CHECKSUM, rel=1e-9, abs=1e-6)
