"""EAN on ResNet-50 (configs/search/ean_resnet50_dia.yaml: supernet -> search -> retrain, and
configs/imagenet_resnet50_ean_dia.yaml: the paper's DIA scheme): each loads, lists its departures at the top, builds
the official model and optimiser (read back from the built objects), and every phase runs on a tiny generated image
folder through the streaming pipeline."""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from attnlab.engine.checkpoint import load_checkpoint
from attnlab.engine.config import load_config
from attnlab.engine.optim import build_optimizer, lr_factor
from attnlab.models import create_model
from attnlab.models.connections import get_connections, scheme_bits
from attnlab.search import pipeline
from attnlab.search.searchers import make_searcher
from test_streaming import make_folder

ROOT = Path(__file__).resolve().parents[1]
SEARCH = ROOT / "configs" / "search" / "ean_resnet50_dia.yaml"
RETRAIN = ROOT / "configs" / "imagenet_resnet50_ean_dia.yaml"
EAN_DIA = "110-0011-110010-011"  # official run_codes_train_from_scratch.py: configs (6, 3, 50, 3)
# DIA units with r = 20, one per stage: 2 x [Linear(C, C//20) + Linear(C//20, 4C)], biases (ean_spenet.md 1.1)
DIA_PARAMS = sum(2 * ((c * (c // 20) + c // 20) + (c // 20 * 4 * c + 4 * c)) for c in (256, 512, 1024, 2048))


def _model(cfg):
    m = cfg.model
    return create_model(m.name, num_classes=1000, attention=m.attention,
                        attention_kwargs=OmegaConf.to_container(m.attention_kwargs), blocks=m.blocks, share=m.share)


def _departures_at_top(path):
    head = path.read_text().split("\nmodel:")[0]
    assert "# Departures from the official" in head and head.count("#   * ") >= 3


def test_supernet_search_and_retrain_keys_build_the_official_pieces(tmp_path):
    _departures_at_top(SEARCH)
    cfg, sec = pipeline.load_pipeline(SEARCH)
    model = _model(cfg)
    assert model.depths == [3, 4, 6, 3] and sum(model.depths) == 16
    units = [{id(b.attn) for b in stage} for stage in model.stages()]
    assert [len(u) for u in units] == [1, 1, 1, 1]  # one shared unit per stage
    dia = [stage[0].attn for stage in model.stages()]
    assert [d.w_ih[0].out_features for d in dia] == [12, 25, 51, 102]  # C // 20
    assert sum(p.numel() for d in dia for p in d.parameters()) == DIA_PARAMS == 2_801_020
    assert scheme_bits(get_connections(model)) == (1,) * 16
    opt = build_optimizer(model, cfg.train).param_groups
    assert {(g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) for g in opt} == {(0.1, 0.9, False, 1e-4)}
    assert cfg.train.batch_size == 256 and cfg.train.epochs == 40
    assert [lr_factor(s, 10, cfg.train) for s in (0, 399)] == [1.0, 1.0]  # constant lr for the 40 epochs read
    assert cfg.data.val_size == 100_000 and cfg.data.pipeline == "stream" and cfg.data.image_size == 224
    assert (sec.supernet.p, sec.supernet.eval_mask) == (0.5, "none")
    s = sec.search
    assert (s.searcher, s.budget, s.select, s.recal_batches, s.table, s.reward.alpha) == \
        ("reinforce", None, "best_sampled", 0, False, 2.0)
    searcher = make_searcher(s.searcher, **OmegaConf.to_container(s.options))
    c = searcher.cfg
    assert (c.steps, c.samples, c.temperature, c.lr, c.rnd, c.replay) == (300, 3, 5.0, 5e-2, True, True)
    r = pipeline.retrain_config(cfg, sec, tmp_path, EAN_DIA.replace("-", ""), 0)
    assert r.model.blocks == EAN_DIA and r.train.epochs == 120 and list(r.train.milestones) == [30, 60, 90]
    assert [lr_factor(e * 10, 10, r.train) for e in (29, 30, 60, 90)] == pytest.approx([0.1 ** k for k in range(4)])


def test_the_paper_scheme_recipe_connects_nine_of_sixteen_blocks():
    _departures_at_top(RETRAIN)
    cfg = load_config(RETRAIN)
    model = _model(cfg)
    bits = scheme_bits(get_connections(model))
    assert "".join(map(str, bits)) == EAN_DIA.replace("-", "") and sum(bits) == 9
    units = {id(b.attn): b.attn for stage in model.stages() for b in stage if b.attn is not None}
    units = [u for u in units.values() if getattr(u, "registry_name", None) == "dia"]
    assert len(units) == 4 and sum(p.numel() for u in units for p in u.parameters()) == DIA_PARAMS
    t = cfg.train
    assert (t.epochs, t.batch_size, t.lr, list(t.milestones), t.weight_decay) == (120, 256, 0.1, [30, 60, 90], 1e-4)


def test_every_phase_runs_on_a_tiny_streamed_folder(tmp_path):
    data = make_folder(tmp_path / "folder", classes=2, train=6, val=2, size=40)
    over = [f"data.data_dir={data}", f"out_dir={tmp_path / 'runs'}", "data.image_size=32", "data.val_size=4",
            "data.workers=0", "train.batch_size=4", "train.eval_batch_size=8", "train.epochs=1",
            "debug.max_steps_per_epoch=1", "train.amp=off", "device=cpu", "train.channels_last=false",
            "search.budget=3", "search.derive_samples=2", "search.eval_batch_size=8", "retrain.seeds=[0]"]
    cfg, sec = pipeline.load_pipeline(SEARCH, over)
    sec.retrain.overrides = {"train.epochs": 1}  # the recipe's 120 epochs, for one step
    root = Path(cfg.out_dir) / cfg.name
    pipeline.run_supernet(cfg, sec, root)
    ck = load_checkpoint(root / "supernet" / "checkpoint_last.pt")
    assert ck["config"]["model"]["attention_kwargs"] == {"reduction": 20} and ck["epoch"] == 1
    group = ck["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, False, 1e-4)

    res = pipeline.run_search_phase(cfg, sec, root)
    assert res["distinct_evaluations"] == 3 and res["depths"] == [3, 4, 6, 3]
    assert res["evaluation_split"].startswith("val (4 images")  # the streamed hold-out, not the test split
    evals = [json.loads(line) for line in (root / "search" / "evaluations.jsonl").read_text().splitlines()]
    assert all(e["n"] == 4 for e in evals) and len(evals) == res["real_evaluations"]

    pipeline.run_retrain(cfg, sec, root, res["chosen_blocks"])
    saved = load_config(None, base=OmegaConf.load(root / "retrain-s0" / "config.yaml"))
    assert saved.model.blocks == res["chosen_blocks"] and saved.model.share is True
    assert json.loads((root / "retrain-s0" / "results.json").read_text())["epochs"] == 1
    assert torch.isfinite(torch.tensor(json.loads((root / "retrain-s0" / "results.json").read_text())["test_loss"]))
