"""Two-process DDP on CPU (gloo, through torchrun) against one process with the same global batch.

BatchNorm statistics are per rank under DDP: rank r normalises its 16 images (global positions r, r + 2, ... of
each 32-image batch, the loader's strided sharding), the single process all 32; after one step the weights of a
plain single-process run are already ~30% (of the update) away from DDP's. So the reference accounts for BN: it is
a single process whose "ghost" BatchNorm normalises the even and the odd positions of its batch separately, exactly
what the two ranks see. Its loss is the same function of the weights as DDP's rank-averaged loss, so the weights
agree to float rounding, which checks gradient averaging, global-batch sharding, schedule and augmentation plan
together. Only two steps (one per epoch) are compared (distance 1.6e-4 of the update, measured): rounding
differences grow up to ~100x per step after that (a tiny net at init with 16-image BN is chaotic: 3e-6 after two
steps, 4e-2 after ten, at lr 0.01, even between two single-process computations of the same maths). Evaluation is
sharded across ranks with the loader's wrap-around padding masked out, so the DDP run's validation accuracy equals
a single-process evaluation of the same checkpoint exactly (the validation split has an odd size to exercise that).
"""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnlab import create_model
from attnlab.models import _MODELS, register_model
from attnlab.engine.checkpoint import load_checkpoint
from attnlab.engine.config import load_config
from attnlab.engine.train import train

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
pytestmark = [pytest.mark.needs_data("cifar10"),
              pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")]


def overrides(tmp, name):
    return [f"name={name}", f"out_dir={tmp}", f"data.cache_dir={tmp}/cache", "data.subset=20", "data.val_size=21",
            "data.test_subset=10", "train.epochs=2", "train.batch_size=32", "train.eval_batch_size=8",
            "train.lr=0.02", "debug.max_steps_per_epoch=1", "device=cpu",
            # NCHW: fp32 gradients of some BN biases of this net at init are ill-conditioned (~1% from float64);
            # NCHW kernels give the same rounding with 1 or 2 threads, channels_last ones do not (measured 1.6%).
            "train.channels_last=false"]


class GhostBN(torch.nn.BatchNorm2d):
    """Training-mode BN over the even and the odd batch positions separately (what two DDP ranks compute)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        out = torch.empty_like(x)
        # Each half as a dense tensor, as a rank holds it (the strided view x[0::2] rounds differently).
        for half in (slice(0, None, 2), slice(1, None, 2)):
            out[half] = F.batch_norm(x[half].contiguous(), self.running_mean, self.running_var, self.weight,
                                     self.bias, True, self.momentum, self.eps)
        return out


def ghost_resnet20(**kwargs):
    model = create_model("resnet20", **kwargs)
    for module in model.modules():
        if type(module) is torch.nn.BatchNorm2d:
            module.__class__ = GhostBN  # same parameters, buffers and state_dict keys
    return model


@pytest.fixture
def ghost_model():
    register_model("ghost_resnet20", ghost_resnet20, 10, 32)
    yield
    _MODELS.pop("ghost_resnet20")


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_process_ddp_matches_one_process(tmp_path, capsys, ghost_model):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two processes share the two cores
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "attnlab", "train",
                           *overrides(tmp_path, "ddp")], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch   1/2") == 1  # only rank 0 prints
    ddp_dir = tmp_path / "ddp"
    assert len(list(ddp_dir.glob("events.out.tfevents.*"))) == 1  # only rank 0 writes
    results = json.loads((ddp_dir / "results.json").read_text())
    assert results["world_size"] == 2

    # Exact reference: one process, global batch 32, BN statistics per half-batch like the two ranks.
    train(load_config(None, overrides(tmp_path, "ghost") + ["model.name=ghost_resnet20"]))
    wd = load_checkpoint(ddp_dir / "checkpoint_last.pt")["model"]
    wg = load_checkpoint(tmp_path / "ghost" / "checkpoint_last.pt")["model"]
    torch.manual_seed(0)  # the engine seeds, then builds the model before drawing from the global RNG
    init = create_model("resnet20", num_classes=10).state_dict()
    params = [k for k, v in init.items() if v.is_floating_point() and "running" not in k]
    moved = torch.cat([(wg[k] - init[k]).flatten() for k in params]).norm()
    apart = torch.cat([(wd[k] - wg[k]).flatten() for k in params]).norm()
    assert moved > 0.01  # training did move the weights (and `init` is the runs' initialisation)
    assert apart / moved < 1e-3, f"DDP and the per-rank-BN reference differ by {float(apart / moved):.2e}"
    d, g = rows(ddp_dir / "metrics.csv"), rows(tmp_path / "ghost" / "metrics.csv")
    for rd, rg in zip(d, g):
        assert rd["lr"] == rg["lr"]
        assert float(rd["train_loss"]) == pytest.approx(float(rg["train_loss"]), rel=1e-4)  # reduced over ranks
        assert float(rd["train_top1"]) == pytest.approx(float(rg["train_top1"]), abs=1e-3)

    # Sharded validation with padding masked out == one process evaluating the same best checkpoint.
    from attnlab.cli import main
    with pytest.raises(SystemExit) as info:
        main(["eval", "--checkpoint", str(ddp_dir / "checkpoint_best.pt"), "--split", "val"])
    assert info.value.code == 0
    single_eval = json.loads((ddp_dir / "eval_val.json").read_text())
    assert single_eval["images"] == 21
    assert single_eval["top1"] == pytest.approx(results["best_val_top1"], abs=1e-6)
    best_row = d[results["best_epoch"] - 1]
    assert float(best_row["val_loss"]) == pytest.approx(single_eval["loss"], rel=1e-4)


SEARCH_CONFIG = ROOT / "configs" / "search" / "ean_resnet20_se.yaml"


def supernet_overrides(tmp, name):
    # p=0.2: most steps leave a whole stage unconnected, so that stage's shared SE gets no gradient on that step
    return overrides(tmp, name) + ["train.warmup_epochs=0", "supernet.p=0.2"]


def test_two_process_supernet_matches_one_process(tmp_path, ghost_model):
    """A supernet step whose mask leaves a stage's shared module unused is legal under DDP (the engine builds DDP
    with find_unused_parameters for such step hooks) and trains the weights a single process trains."""
    from attnlab.cli import main
    from attnlab.search.supernet import SupernetHook
    first_mask = SupernetHook(p=0.2, seed=0).mask(0, 9)  # the supernet run's seed is 0, ResNet-20 has 9 blocks
    assert any(not any(first_mask[i:i + 3]) for i in (0, 3, 6)), \
        "the first of the two steps must leave a stage unconnected for this test to mean anything"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "attnlab", "search", "--config",
                           str(SEARCH_CONFIG), "--phases", "supernet", *supernet_overrides(tmp_path, "ddp")],
                          env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("supernet: training") == 1  # only rank 0 prints
    with pytest.raises(SystemExit) as info:
        main(["search", "--config", str(SEARCH_CONFIG), "--phases", "supernet",
              *supernet_overrides(tmp_path, "ghost"), "model.name=ghost_resnet20"])
    assert info.value.code == 0
    wd = load_checkpoint(tmp_path / "ddp" / "supernet" / "checkpoint_last.pt")["model"]
    wg = load_checkpoint(tmp_path / "ghost" / "supernet" / "checkpoint_last.pt")["model"]
    torch.manual_seed(0)
    init = create_model("resnet20", num_classes=10, attention="se", share=True).state_dict()
    params = [k for k, v in init.items() if v.is_floating_point() and "running" not in k]
    moved = torch.cat([(wg[k] - init[k]).flatten() for k in params]).norm()
    apart = torch.cat([(wd[k] - wg[k]).flatten() for k in params]).norm()
    assert moved > 0.01
    assert apart / moved < 1e-3, f"DDP and the per-rank-BN reference differ by {float(apart / moved):.2e}"
    print(f"supernet DDP vs reference: {float(apart / moved):.2e} of the update")


def test_supernet_search_phase_refuses_torchrun(tmp_path, monkeypatch, capsys):
    """The search evaluates on one device: under torchrun only the training phases may run."""
    from attnlab.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as info:
        main(["search", "--config", str(SEARCH_CONFIG), "--phases", "supernet,search", *overrides(tmp_path, "x")])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "torchrun" in err and "--phases search,retrain" in err and len(err.strip().splitlines()) == 1
