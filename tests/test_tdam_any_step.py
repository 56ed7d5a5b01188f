"""TDAM's official "any step correct" top-1 (eval.tdam_any_step): a tiny TDAM ResNet on real CIFAR-10 images,
checked against a hand count of each step's prediction, plus the run files that report it beside plain top-1."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnlab.engine.config import load_config
from attnlab.engine.evaluate import evaluate
from attnlab.engine.train import train
from attnlab.errors import AttnlabError
from attnlab.models import create_model

pytestmark = pytest.mark.needs_data("cifar10")


class ListLoader:
    """The loader interface ``evaluate`` reads (one rank), over fixed tensors in batches."""

    def __init__(self, x, y, batch_size):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.n, self.rank, self.world_size = len(y), 0, 1

    def __iter__(self):
        for i in range(0, self.n, self.batch_size):
            yield self.x[i:i + self.batch_size], self.y[i:i + self.batch_size]


def real_images(cifar10_dir, count=16):
    files = sorted((cifar10_dir / "test").glob("*/*.jpg"))[::997][:count]
    arr = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in files])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return (x - 0.47) / 0.25


def tdam_net(steps=3):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, attention="tdam", attention_kwargs={"time_steps": steps})
    with torch.no_grad():  # spread the per-step BNs (they start at the identity) so the steps predict differently
        for name, p in model.named_parameters():
            if ".attn.bn" in name:
                p.copy_(torch.randn_like(p) * (2.0 if name.endswith("weight") else 1.0))
    return model.eval()


def step_predictions(model, x):
    """Each step's top-1, by setting the last stage's TDAM time_steps by hand (not through attnlab's helper)."""
    last = [b.attn for b in model.stages()[-1]]
    assert all(getattr(a, "registry_name", None) == "tdam" for a in last)
    preds = []
    with torch.no_grad():
        for t in range(1, last[0].time_steps + 1):
            for a in last:
                a.time_steps = t
            preds.append(model(x).argmax(1))
    for a in last:
        a.time_steps = 3
    return torch.stack(preds)  # (T, B)


def test_any_step_top1_matches_a_hand_count(cifar10_dir):
    model = tdam_net()
    x = real_images(cifar10_dir)
    preds = step_predictions(model, x)
    assert (preds[0] != preds[-1]).any(), "the steps must disagree somewhere for this test to mean anything"
    # Labels: image i takes step (i % 4)'s prediction (steps 1, 2, 3), or every 4th a class no step predicted.
    y = []
    for i in range(x.shape[0]):
        k = i % 4
        if k < 3:
            y.append(int(preds[k, i]))
        else:
            y.append(next(c for c in range(10) if c not in preds[:, i].tolist()))
    y = torch.tensor(y)
    hand_plain = 100.0 * sum(int(preds[-1, i]) == y[i] for i in range(len(y))) / len(y)
    hand_any = 100.0 * sum(int(y[i]) in preds[:, i].tolist() for i in range(len(y))) / len(y)
    assert hand_any > hand_plain

    res = evaluate(model, ListLoader(x, y, batch_size=5), torch.device("cpu"), tdam_any_step=True)
    assert res["top1"] == pytest.approx(hand_plain)
    assert res["top1_any_step"] == pytest.approx(hand_any)
    assert res["n"] == len(y)
    assert [b.attn.time_steps for b in model.stages()[-1]] == [3, 3, 3]  # restored
    plain = evaluate(model, ListLoader(x, y, batch_size=5), torch.device("cpu"))
    assert "top1_any_step" not in plain and plain["top1"] == pytest.approx(hand_plain)


def test_any_step_needs_tdam_in_the_last_stage(cifar10_dir, tmp_path):
    se = create_model("resnet20", num_classes=10, attention="se").eval()
    x = real_images(cifar10_dir, 4)
    with pytest.raises(AttnlabError, match="needs TDAM blocks in the last stage"):
        evaluate(se, ListLoader(x, torch.zeros(4, dtype=torch.long), 4), torch.device("cpu"), tdam_any_step=True)
    with pytest.raises(AttnlabError, match="needs TDAM blocks"):  # refused before training starts
        train(load_config(None, ["model.attention=se", "eval.tdam_any_step=true", "data.subset=2",
                                 "data.test_subset=1", f"data.cache_dir={tmp_path}", f"out_dir={tmp_path}",
                                 "train.batch_size=4"]))


def test_config_default_is_off_and_a_run_reports_both_numbers(tmp_path):
    assert load_config(None, []).eval.tdam_any_step is False
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=td", f"data.cache_dir={tmp_path}/cache", "data.subset=10",
                             "data.test_subset=5", "model.attention=tdam", "train.epochs=1", "train.batch_size=30",
                             "train.eval_batch_size=64", "eval.tdam_any_step=true"])
    res = train(cfg)
    assert 0 <= res["test_top1"] <= res["test_top1_any_step"] <= 100
    saved = json.loads((Path(tmp_path) / "td" / "results.json").read_text())
    assert saved["test_top1_any_step"] == res["test_top1_any_step"]
    with open(Path(tmp_path) / "td" / "metrics.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert float(row["val_top1"]) <= float(row["val_top1_any_step"]) <= 100
