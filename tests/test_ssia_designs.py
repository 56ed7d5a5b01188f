"""SSIA designs (attn_target, teacher, self_distill, cam) and the shuffled-target control: each loss against a hand
computation on small tensors, warm-up, zero inference cost on a trained resnet20, and the engine's support for
training-only modules (optimiser, checkpoint, exact resume)."""
import copy
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import attnlab
from attnlab.errors import AttnlabError
from attnlab.objectives.ssia import SSIA
from attnlab.objectives.ssia_designs import derangement
from attnlab.objectives.ssia_heads import AttnBlock, ClassHead

DESIGNS = ("maps", "attn_target", "teacher", "self_distill", "cam")
ROOT = Path(__file__).resolve().parents[1]


def sig(v):
    return 1 / (1 + math.exp(-v))


def ce(z, y):
    return -z[y] + math.log(sum(math.exp(v) for v in z))


def kl_soft(teacher, student, tau):
    """tau^2 sum_k p_k log(p_k / q_k) of one sample, by explicit sums."""
    et = [math.exp(v / tau) for v in teacher]
    es = [math.exp(v / tau) for v in student]
    p = [v / sum(et) for v in et]
    q = [v / sum(es) for v in es]
    return tau ** 2 * sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))


def cos_dist(a, b):
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    return 1 - float((a * b).sum() / (a.norm() * b.norm()))


def tiny_batch(n=4, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 10


# ---------------------------------------------------------------- the shuffled control

def test_derangement_is_a_permutation_without_fixed_points_and_a_function_of_the_step():
    for n in range(2, 9):
        for step in range(40):
            perm = derangement(n, step)
            assert sorted(perm.tolist()) == list(range(n))
            assert all(perm[i] != i for i in range(n))
    assert torch.equal(derangement(6, 3), derangement(6, 3))
    assert len({tuple(derangement(6, s).tolist()) for s in range(20)}) > 5  # not one fixed shuffle
    assert derangement(2, 0).tolist() == [1, 0]
    with pytest.raises(AttnlabError, match="at least 2 images"):
        derangement(1, 0)


def test_shuffled_target_gives_every_image_another_images_target():
    # Image b's lower map is the one-hot e_b and its own target is e_b too: distance 0 unshuffled. With targets of
    # other images every sample is at cosine distance exactly 1, so the mean is 1 only if no image kept its own.
    n = 5
    onehot = torch.eye(n).view(n, 1, 1, n)
    feats = {"stages": [onehot, onehot.clone()], "blocks": []}
    for step in range(10):
        kw = dict(features=feats, logits=torch.zeros(n, 3), epoch=0, step=step)
        own = SSIA(distance="cosine", p=1.0, weight=1.0)(**kw)["ssia"]
        other = SSIA(distance="cosine", p=1.0, weight=1.0, shuffle_target=True)(**kw)["ssia"]
        assert own.item() == pytest.approx(0.0, abs=1e-6)
        assert other.item() == pytest.approx(1.0)


def test_shuffled_cam_target_is_another_images_cam():
    # Two images, each with its CAM peaked at a different position; the lower maps equal their own CAM.
    fc = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0], [1.0]]))
    top = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]])  # CAM = the feature itself
    feats = {"stages": [top.clone(), top]}
    kw = dict(model=SimpleNamespace(fc=fc), features=feats, logits=torch.zeros(2, 2), targets=torch.tensor([0, 1]),
              epoch=0, step=0)
    assert SSIA(design="cam", distance="cosine", p=1.0, weight=1.0)(**kw)["ssia"].item() == pytest.approx(0, abs=1e-6)
    swapped = SSIA(design="cam", distance="cosine", p=1.0, weight=1.0, shuffle_target=True)(**kw)["ssia"]
    assert swapped.item() == pytest.approx(1.0)


# ---------------------------------------------------------------- each design's loss by hand

def _se_attn_target():
    """attn_target with a hand-set SE block and head on 2-channel features (C // 16 -> one hidden unit)."""
    obj = SSIA(design="attn_target", attn_block="se", distance="cosine", weight=1.0, aux_weight=1.0)
    block, head = AttnBlock("se", 2), ClassHead(2, 2)
    with torch.no_grad():
        block.gate.fc1.weight.copy_(torch.tensor([[1.0, 1.0]]).view(1, 2, 1, 1))
        block.gate.fc1.bias.zero_()
        block.gate.fc2.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        block.gate.fc2.bias.zero_()
        head.fc.weight.copy_(torch.eye(2))
        head.fc.bias.zero_()
    obj.module = nn.ModuleDict({"blocks": nn.ModuleDict({"1": block}), "heads": nn.ModuleDict({"1": head})})
    return obj


def test_attn_target_with_se_weights_by_hand():
    obj = _se_attn_target()
    lower = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]]])     # channel profile (2, 1)
    higher = torch.tensor([[[[1.0]], [[0.5]]]])               # squeeze (1, .5)
    # SE: h = relu(1 + .5) = 1.5; weights (sigmoid(1.5), sigmoid(-1.5))
    w0, w1 = sig(1.5), sig(-1.5)
    guide = 1 - (2 * w0 + 1 * w1) / (math.sqrt(5) * math.sqrt(w0 ** 2 + w1 ** 2))
    # the block's own classifier on the gated higher feature: logits (1 * w0, .5 * w1), label 0
    aux = ce([w0, 0.5 * w1], 0)
    out = obj(features={"stages": [lower, higher]}, targets=torch.tensor([0]), logits=torch.zeros(1, 2), epoch=0)
    assert out["ssia"].item() == pytest.approx(guide, rel=1e-5)
    assert out["ssia_aux"].item() == pytest.approx(aux, rel=1e-5)


def test_attn_target_trains_the_block_from_its_classifier_and_the_backbone_from_the_target_only():
    obj = _se_attn_target()
    lower = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]]], requires_grad=True)
    higher = torch.tensor([[[[1.0]], [[0.5]]]], requires_grad=True)
    out = obj(features={"stages": [lower, higher]}, targets=torch.tensor([0]), logits=torch.zeros(1, 2), epoch=0)
    out["ssia_aux"].backward(retain_graph=True)
    assert higher.grad is None and lower.grad is None          # the block sees the higher feature detached
    assert obj.module["blocks"]["1"].gate.fc2.weight.grad.abs().sum() > 0
    obj.module.zero_grad()
    out["ssia"].backward()
    assert lower.grad.abs().sum() > 0 and higher.grad is None  # the weights are a constant target
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in obj.module.parameters())


def test_cbam_spatial_block_weights_by_hand():
    block = AttnBlock("cbam_spatial", 3).eval()  # eval: the gate's BN uses its initial statistics (0, 1)
    with torch.no_grad():
        block.gate.conv.weight.zero_()
        block.gate.conv.weight[0, 0, 3, 3] = 1.0   # centre tap of the channel-mean descriptor only
    x = torch.tensor([[[[3.0, 0.0]], [[0.0, 0.0]], [[0.0, -6.0]]]])  # channel means 1, -2
    w = block.weights(x)
    assert w.shape == (1, 1, 1, 2)
    bn = 1 / math.sqrt(1 + 1e-5)
    assert w.flatten().tolist() == pytest.approx([sig(1 * bn), sig(-2 * bn)], rel=1e-5)
    assert torch.allclose(block(x), x * w)


def test_cam_design_by_hand():
    fc = nn.Linear(2, 3)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
    top = torch.tensor([[[[2.0, 1.0]], [[1.0, 3.0]]]])       # (1, 2, 1, 2)
    lower = torch.tensor([[[[1.0, 1.0, 1.0, 1.0]]]])          # (1, 1, 1, 4): uniform map
    # class 2: CAM = relu(1 * [2, 1] - 1 * [1, 3]) = [1, 0]; bilinear x2 -> [1, .75, .25, 0]
    target = torch.tensor([1.0, 0.75, 0.25, 0.0])
    out = SSIA(design="cam", distance="cosine", p=1.0, weight=2.0)(
        model=SimpleNamespace(fc=fc), features={"stages": [lower, top]}, targets=torch.tensor([2]),
        logits=torch.zeros(1, 3), epoch=0)["ssia"]
    assert out.item() == pytest.approx(2 * cos_dist(torch.ones(4), target), rel=1e-5)


def test_teacher_design_by_hand_on_resnet20():
    torch.manual_seed(0)
    model = attnlab.create_model("resnet20", num_classes=10)
    obj = SSIA(design="teacher", distance="cosine", weight=1.0, kd_weight=1.0, aux_weight=1.0,
               kd_temperature=2.0).build(model)
    x, y = tiny_batch(3)
    logits, feats = model(x, features="stages")
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    out = obj(model=model, logits=logits, targets=y, features=feats, epoch=0, step=0, inputs=x)
    # The teacher pass leaves the model's BatchNorm statistics and forward as they were (hooks removed).
    assert all(torch.equal(model.state_dict()[k], v) for k, v in running.items())
    # By hand: the network with each stage's output gated, on a copy (train mode: batch statistics).
    ref = copy.deepcopy(model)
    gates = list(obj.module["gates"])
    with torch.no_grad():
        h = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        t_stages = []
        for stage, gate in zip(ref.stages(), gates):
            h = gate(stage(h))
            t_stages.append(h)
        t_logits = ref.fc(h.mean((2, 3)))
    maps = sum(sum(cos_dist((s[b] ** 2).mean(0), (t[b] ** 2).mean(0)) for b in range(3)) / 3
               for s, t in zip(feats["stages"], t_stages)) / 3
    kd = sum(kl_soft(t_logits[b].tolist(), logits[b].tolist(), 2.0) for b in range(3)) / 3
    aux = sum(ce(t_logits[b].tolist(), int(y[b])) for b in range(3)) / 3
    assert out["ssia"].item() == pytest.approx(maps, rel=1e-4)
    assert out["ssia_kd"].item() == pytest.approx(kd, rel=1e-4, abs=1e-7)
    assert out["ssia_aux"].item() == pytest.approx(aux, rel=1e-4)
    assert not model.layer1._forward_hooks and not model.layer3._forward_hooks


def test_self_distill_design_by_hand_on_resnet20():
    torch.manual_seed(0)
    model = attnlab.create_model("resnet20", num_classes=10)
    obj = SSIA(design="self_distill", weight=1.0, aux_weight=1.0, hint_weight=1.0, kd_temperature=3.0).build(model)
    x, y = tiny_batch(2)
    logits, feats = model(x, features="stages")
    out = obj(model=model, logits=logits, targets=y, features=feats, epoch=0, step=0, inputs=x)
    top = feats["stages"][-1].detach()
    ce_sum = kd_sum = hint_sum = 0.0
    with torch.no_grad():
        for head, f in zip(obj.module["heads"], feats["stages"][:-1]):
            h = torch.relu(head.bn(head.conv(f)))          # strides 4 and 2 bring 16x16 and 8x8 to 4x4
            assert h.shape == top.shape
            z = head.head.fc(h.mean((2, 3)))
            ce_sum += sum(ce(z[b].tolist(), int(y[b])) for b in range(2)) / 2
            kd_sum += sum(kl_soft(logits[b].tolist(), z[b].tolist(), 3.0) for b in range(2)) / 2
            hint_sum += float(((h - top) ** 2).mean())
    assert out["ssia"].item() == pytest.approx(kd_sum / 2, rel=1e-4)
    assert out["ssia_aux"].item() == pytest.approx(ce_sum / 2, rel=1e-4)
    assert out["ssia_hint"].item() == pytest.approx(hint_sum / 2, rel=1e-4)


# ---------------------------------------------------------------- warm-up

def _terms(design, epoch, model, warmup=1, **opts):
    obj = SSIA(design=design, warmup_epochs=warmup, **opts).build(model)
    x, y = tiny_batch(4)
    logits, feats = model(x, features=obj.features)
    return obj, obj(model=model, logits=logits, targets=y, features=feats, epoch=epoch, step=0, inputs=x)


@pytest.mark.parametrize("design", DESIGNS)
def test_warmup_keeps_the_term_and_its_gradient_at_zero(design):
    torch.manual_seed(0)
    model = attnlab.create_model("resnet20", num_classes=10)
    obj, terms = _terms(design, 0, model, warmup=1)
    assert terms["ssia"].item() == 0
    touching = sum(v for v in terms.values() if v.requires_grad)
    if torch.is_tensor(touching):
        touching.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())
    if design == "attn_target":  # its block keeps learning from its own classifier during the warm-up
        assert terms["ssia_aux"].item() > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.module.parameters())
    else:
        assert all(v.item() == 0 for v in terms.values())
    model.zero_grad()
    _, after = _terms(design, 1, model, warmup=1)
    assert after["ssia"].item() > 0
    after["ssia"].backward()
    assert model.conv1.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- zero inference cost

def _train_two_steps(design, attention="none"):
    torch.manual_seed(0)
    model = attnlab.create_model("resnet20", num_classes=10, attention=attention)
    obj = SSIA(design=design, shuffle_target=design == "maps").build(model)
    params = list(model.parameters()) + (list(obj.module.parameters()) if obj.module is not None else [])
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    before = copy.deepcopy(obj.module)
    for step in range(2):
        x, y = tiny_batch(4, seed=step)
        logits, feats = model(x, features=obj.features)
        terms = obj(model=model, logits=logits, targets=y, features=feats, epoch=0, step=step, inputs=x)
        loss = nn.functional.cross_entropy(logits, y) + sum(terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, obj, before


@pytest.mark.parametrize("design", DESIGNS)
def test_trained_model_is_the_plain_network(design):
    model, obj, before = _train_two_steps(design)
    plain = attnlab.create_model("resnet20", num_classes=10)
    assert set(model.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    x, _ = tiny_batch(3, size=32, seed=9)
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    if obj.module is not None:  # the training-only modules did train
        moved = [not torch.equal(a, b) for a, b in zip(obj.module.state_dict().values(), before.state_dict().values())]
        assert any(moved)


def test_teacher_trained_model_exports_the_plain_onnx_graph(tmp_path):
    onnx = pytest.importorskip("onnx")
    from collections import Counter

    from attnlab.export import export_onnx
    model, _, _ = _train_two_steps("teacher")
    plain = attnlab.create_model("resnet20", num_classes=10)  # trained the same two steps without SSIA (a fresh
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)  # model's equal BN constants export differently)
    for step in range(2):
        x, y = tiny_batch(4, seed=step)
        opt.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        opt.step()
    ops = lambda p: Counter(n.op_type for n in onnx.load(str(p)).graph.node)
    ours = export_onnx(model.eval(), tmp_path / "t.onnx", 32)
    assert ops(ours) == ops(export_onnx(plain.eval(), tmp_path / "p.onnx", 32))


# ---------------------------------------------------------------- options

@pytest.mark.parametrize("opts, match", [
    (dict(design="byot"), "unknown ssia design 'byot'"),
    (dict(attn_block="eca"), "unknown ssia attn_block 'eca'"),
    (dict(shuffle_target="yes"), "shuffle_target must be true or false"),
    (dict(kd_temperature=0.0), "kd_temperature must be > 0"),
    (dict(aux_weight=-1.0), "aux_weight must be >= 0"),
    (dict(design="cam", map="channel"), "design=cam needs map=spatial"),
])
def test_bad_design_options_raise_one_line_errors(opts, match):
    with pytest.raises(AttnlabError, match=match) as err:
        SSIA(**opts)
    assert "\n" not in str(err.value)


def test_channel_weights_need_equal_widths_and_attn_target_needs_stage_pairs():
    model = attnlab.create_model("resnet20", num_classes=10)
    with pytest.raises(AttnlabError, match="pairing=stage or last"):
        SSIA(design="attn_target", pairing="block").build(model)
    obj = SSIA(design="attn_target", attn_block="se").build(model)
    x, y = tiny_batch(2)
    logits, feats = model(x, features="stages")
    with pytest.raises(AttnlabError, match="use attn_block=cbam_spatial"):
        obj(model=model, logits=logits, targets=y, features=feats, epoch=0, step=0)


def test_old_run_configs_without_the_new_keys_resume_unchanged():
    from attnlab.engine.config import load_config, to_dict
    from attnlab.engine.train import _config_changes
    now = to_dict(load_config(None, ["ssia.enabled=true"]))
    saved = copy.deepcopy(now)
    for key in ("design", "shuffle_target", "attn_block", "aux_weight", "kd_weight", "kd_temperature", "hint_weight"):
        del saved["ssia"][key]
    assert _config_changes(saved, now) == {}
    changed = copy.deepcopy(now)
    changed["ssia"]["design"] = "cam"
    with pytest.raises(AttnlabError, match="ssia.design"):
        _config_changes(saved, changed)


# ---------------------------------------------------------------- through the engine

def _overrides(tmp, name):
    return [f"name={name}", f"out_dir={tmp}", f"data.cache_dir={tmp}/cache", "data.subset=10", "data.val_size=20",
            "data.test_subset=5", "train.epochs=2", "train.batch_size=16", "train.eval_batch_size=64", "train.lr=0.05",
            "train.deterministic=true", "debug.max_steps_per_epoch=3", "model.name=resnet20",
            "ssia.enabled=true", "ssia.design=self_distill", "ssia.shuffle_target=true"]


@pytest.mark.needs_data("cifar10")
def test_engine_trains_checkpoints_and_resumes_training_only_modules_exactly(tmp_path, capsys):
    import csv

    from attnlab.engine.checkpoint import load_checkpoint
    from attnlab.engine.config import load_config
    from attnlab.engine.run_folder import open_run
    from attnlab.engine.train import resume_config, train

    train(load_config(None, _overrides(tmp_path, "whole")))
    whole = tmp_path / "whole"
    rows = list(csv.DictReader(open(whole / "metrics.csv")))
    assert all(float(r[k]) > 0 for r in rows for k in ("ssia", "ssia_aux", "ssia_hint"))
    a = load_checkpoint(whole / "checkpoint_last.pt")
    assert set(a["objective_modules"]) and not any(k.startswith("ssia") for k in a["model"])
    plain = attnlab.create_model("resnet20", num_classes=10)
    plain.load_state_dict(load_checkpoint(whole / "checkpoint_best.pt")["model"], strict=True)
    open_run(whole, "cpu")  # evaluation and export build the plain model, strictly

    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-m", "attnlab", "train", *_overrides(tmp_path, "cut"),
                           "debug.kill_at_step=4"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert load_checkpoint(tmp_path / "cut" / "checkpoint_last.pt")["epoch"] == 1  # killed in epoch 2
    train(resume_config(tmp_path / "cut"), resume=tmp_path / "cut")
    b = load_checkpoint(tmp_path / "cut" / "checkpoint_last.pt")
    for key in ("model", "objective_modules"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    mom = lambda ck: [v["momentum_buffer"] for _, v in sorted(ck["optimizer"]["state"].items())]
    assert len(mom(a)) > len(list(plain.parameters()))  # the heads are in the optimiser
    assert all(torch.equal(u, v) for u, v in zip(mom(a), mom(b)))
