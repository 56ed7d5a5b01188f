"""SSIA objective: every option checked on tiny tensors against values worked out by hand, then on real models."""
import math

import pytest
import torch
from omegaconf import OmegaConf

import attnlab
from attnlab.errors import AttnlabError
from attnlab.objectives import build_objectives, features_needed, objective_defaults
from attnlab.objectives.ssia import SSIA, channel_map, feature_pairs, map_distance, resize_map, spatial_map


def t(rows):
    """A (1, 1, H, W) map from nested lists."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def loss_of(stages, **opts):
    opts.setdefault("weight", 1.0)  # the hand-computed values are unweighted unless a test says otherwise
    return SSIA(**opts)(features={"stages": stages, "blocks": []}, logits=torch.zeros(1, 2), epoch=0)["ssia"]


# ---------------------------------------------------------------- maps

def test_spatial_map_mean_and_mean_max_by_hand():
    # channel 0 = [1, -2], channel 1 = [3, 0]  ->  |F|^2: [1, 4] and [9, 0]
    f = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])
    assert spatial_map(f, p=2).tolist() == [[[[5.0, 2.0]]]]          # (1+9)/2, (4+0)/2
    assert spatial_map(f, p=1).tolist() == [[[[2.0, 1.0]]]]          # (1+3)/2, (2+0)/2
    both = spatial_map(f, p=2, pool="mean_max")
    assert both.shape == (1, 2, 1, 2)
    assert both[0, 1].tolist() == [[9.0, 4.0]]                       # channel max of |F|^2


def test_default_map_has_the_exact_gradient():
    # p = 2 with the mean pool uses a hand-written backward (2 F g / C): check it against finite differences.
    f = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(spatial_map(f), (f * f).mean(1, keepdim=True))
    assert torch.autograd.gradcheck(spatial_map, (f,))
    assert torch.autograd.gradgradcheck(spatial_map, (f,))


def test_channel_map_is_the_global_average_profile():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 4.0]]]])
    assert channel_map(f).tolist() == [[[2.5, 1.0]]]


def test_resize_bilinear_by_hand():
    # align_corners=False, x2: source coordinate (i + 0.5) / 2 - 0.5, clamped at the border.
    # One row [0, 4] becomes [0, 1, 3, 4]; rows [0, 4] and [8, 12] interpolate the same way down the columns.
    out = resize_map(t([[0, 4], [8, 12]]), (4, 4), "bilinear")
    assert out[0, 0].tolist() == [[0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10], [8, 9, 11, 12]]


def test_resize_area_replicates_up_and_averages_down():
    up = resize_map(t([[0, 4], [8, 12]]), (4, 4), "area")
    assert up[0, 0].tolist() == [[0, 0, 4, 4], [0, 0, 4, 4], [8, 8, 12, 12], [8, 8, 12, 12]]
    down = resize_map(t([[1, 3, 0, 0], [5, 7, 0, 4], [2, 2, 1, 1], [2, 2, 1, 1]]), (2, 2), "area")
    assert down[0, 0].tolist() == [[4, 1], [2, 1]]


# ---------------------------------------------------------------- distances on (B, K, N) vectors

def test_mse_of_l2_normalised_maps_by_hand():
    s, t_ = torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[4.0, 3.0]]])
    # (0.6, 0.8) vs (0.8, 0.6): squared differences 0.04 and 0.04, mean 0.04
    assert map_distance(s, t_, "mse").item() == pytest.approx(0.04)
    # scale does not matter after L2 normalisation
    assert map_distance(10 * s, t_, "mse").item() == pytest.approx(0.04)


def test_cosine_distance_by_hand():
    s, t_ = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]]), torch.tensor([[[4.0, 3.0], [0.0, 1.0]]])
    d = map_distance(s, t_, "cosine")
    assert d.shape == (1, 2)
    assert d[0, 0].item() == pytest.approx(1 - 24 / 25)
    assert d[0, 1].item() == pytest.approx(1.0)


def test_kl_target_to_student_with_temperature_by_hand():
    s, t_ = torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[3.0, 1.0]]])
    # Unit-mean scaling first: s -> (1, 1), Q = (1/2, 1/2); t / mean 2 -> (1.5, 0.5), P = (e, 1) / (e + 1)
    p0 = math.e / (math.e + 1)
    expected = p0 * math.log(p0 / 0.5) + (1 - p0) * math.log((1 - p0) / 0.5)
    assert map_distance(s, t_, "kl", 1.0).item() == pytest.approx(expected)
    # tau = 2: t -> (0.75, 0.25), P0 = e^0.5 / (e^0.5 + 1), and the tau^2 = 4 factor
    p0 = math.exp(0.5) / (math.exp(0.5) + 1)
    expected2 = 4 * (p0 * math.log(p0 / 0.5) + (1 - p0) * math.log((1 - p0) / 0.5))
    assert map_distance(s, t_, "kl", 2.0).item() == pytest.approx(expected2, rel=1e-5)
    # the scaling makes it blind to a map's overall size
    assert map_distance(7 * s, 0.1 * t_, "kl", 2.0).item() == pytest.approx(expected2, rel=1e-5)
    # it is KL(target || student), not the reverse: swap the roles and the value changes
    assert map_distance(t_, s, "kl").item() != pytest.approx(expected)


def test_zero_map_gives_a_finite_distance():
    z = torch.zeros(1, 1, 4)
    for d in ("mse", "cosine", "kl"):
        assert torch.isfinite(map_distance(z, torch.ones(1, 1, 4), d)).all()


# ---------------------------------------------------------------- the whole objective

def test_stage_pairing_mse_weighted_by_hand():
    # S1 map (p=2) = [[1, 0], [0, 0]] -> normalised (1, 0, 0, 0)
    # S2 = [[2]] -> map [[4]] -> bilinear to 2x2: all 4 -> normalised (.5, .5, .5, .5)
    # squared differences .25 each, mean .25; weight 2 -> 0.5
    out = loss_of([t([[1, 0], [0, 0]]), t([[2]])], pairing="stage", distance="mse", weight=2.0)
    assert out.item() == pytest.approx(0.5)


def test_stage_and_last_pairings_choose_different_targets():
    s1, s2, s3 = t([[1, 0]]), t([[0, 1]]), t([[1, 0]])
    # cosine, p=1: maps equal the features here (one channel, non-negative).
    # stage: (S1, S2) -> 1 - 0 = 1, (S2, S3) -> 1; mean 1.   last: (S1, S3) -> 0, (S2, S3) -> 1; mean 0.5
    assert loss_of([s1, s2, s3], pairing="stage", distance="cosine", p=1.0).item() == pytest.approx(1.0)
    assert loss_of([s1, s2, s3], pairing="last", distance="cosine", p=1.0).item() == pytest.approx(0.5)
    assert [tuple(x.shape) for x, _ in feature_pairs({"stages": [s1, s2, s3]}, "last")] == [(1, 1, 1, 2)] * 2


def test_block_pairing_uses_each_block_input_and_output():
    x1, y1, y2 = t([[1, 0], [0, 0]]), t([[0, 0], [0, 1]]), t([[3]])
    blocks = [(x1, y1), (y1, y2)]  # a block's output is the next block's input (the same tensor)
    obj = SSIA(pairing="block", distance="cosine", p=1.0, weight=1.0)
    assert obj.features == "blocks"
    # (x1, y1): orthogonal -> 1.  (y1, y2): y2 = 3 everywhere after resizing -> cos = 1/2 -> 0.5.  mean 0.75
    out = obj(features={"stages": [y2], "blocks": blocks}, logits=torch.zeros(1), epoch=0)["ssia"]
    assert out.item() == pytest.approx(0.75)


def test_resize_option_changes_the_target():
    lo, hi = t([[1, 1, 1, 1]] * 4), t([[0, 4], [8, 12]])
    # Student map is uniform. Area target: 0,0,4,4 / ... ; bilinear: 0,1,3,4 / ... (see the resize tests).
    def cos_dist(target_rows):
        v = torch.tensor(target_rows, dtype=torch.float32).flatten()
        return 1 - (v.sum() / (v.norm() * 4)).item()
    area = [[0, 0, 4, 4], [0, 0, 4, 4], [8, 8, 12, 12], [8, 8, 12, 12]]
    bil = [[0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10], [8, 9, 11, 12]]
    assert loss_of([lo, hi], distance="cosine", p=1.0, resize="area").item() == pytest.approx(cos_dist(area), abs=1e-6)
    bilinear = loss_of([lo, hi], distance="cosine", p=1.0, resize="bilinear").item()
    assert bilinear == pytest.approx(cos_dist(bil), abs=1e-6)


def test_mean_max_averages_over_the_two_descriptors():
    # Two channels, p = 1.  lo: c0 = [1, 1], c1 = [1, 0]  ->  mean [1, .5], max [1, 1]
    #                       hi: c0 = [1, 0], c1 = [1, 0]  ->  mean [1, 0],  max [1, 0]
    # cosine distances: mean maps 1 - 1/sqrt(1.25); max maps 1 - 1/sqrt(2); mean_max averages the two.
    lo = torch.tensor([[[[1.0, 1.0]], [[1.0, 0.0]]]])
    hi = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])
    d_mean, d_max = 1 - 1 / math.sqrt(1.25), 1 - 1 / math.sqrt(2)
    assert loss_of([lo, hi], distance="cosine", p=1.0).item() == pytest.approx(d_mean)
    out = loss_of([lo, hi], distance="cosine", p=1.0, spatial_pool="mean_max")
    assert out.item() == pytest.approx((d_mean + d_max) / 2)


def test_channel_map_skips_pairs_whose_channels_differ():
    s1 = torch.ones(1, 1, 2, 2)
    s2 = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    s3 = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    # (S1, S2) is skipped (1 vs 2 channels); (S2, S3): profiles (1, 0) vs (0, 2) -> cosine distance 1
    assert loss_of([s1, s2, s3], map="channel", distance="cosine").item() == pytest.approx(1.0)
    with pytest.raises(AttnlabError, match="no .* pair with equal channel counts"):
        loss_of([s1, s2], map="channel")


def test_reduction_is_the_mean_over_batch():
    # Sample 0: identical maps (0); sample 1: orthogonal maps (1). Mean over the batch: 0.5.
    lo = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]]])
    hi = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]])
    assert loss_of([lo, hi], distance="cosine", p=1.0).item() == pytest.approx(0.5)


def test_detach_stops_the_gradient_into_the_higher_feature():
    for detach in (True, False):
        lo = t([[1.0, 2.0], [0.5, 0.0]]).requires_grad_()
        hi2 = t([[1.0, 0.0]]).requires_grad_()  # not constant, so its gradient is not zero by scale invariance
        loss_of([lo, hi2], detach=detach).backward()
        assert lo.grad is not None and lo.grad.abs().sum() > 0
        assert (hi2.grad is None) == detach


def test_gradient_descent_on_the_lower_feature_reduces_the_loss():
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(2, 4, 4, 4, generator=g).requires_grad_()
    hi = torch.rand(2, 8, 2, 2, generator=g)
    for distance in ("mse", "kl", "cosine"):
        x = lo.detach().clone().requires_grad_()
        lr = {"mse": 50.0, "kl": 20.0, "cosine": 2.0}[distance]
        first = loss_of([x, hi], distance=distance).item()
        for _ in range(10):  # plain gradient descent (no torch.optim: its first use imports torch._dynamo)
            loss = loss_of([x, hi], distance=distance)
            (grad,) = torch.autograd.grad(loss, x)
            x = (x - lr * grad).detach().requires_grad_()
        assert loss_of([x, hi], distance=distance).item() < 0.8 * first, distance


def test_warmup_returns_zero_without_computing_anything():
    obj = SSIA(warmup_epochs=2, weight=1.0, distance="mse")
    broken = {"stages": [], "blocks": []}  # would raise if the term were computed
    for epoch in (0, 1):
        out = obj(features=broken, logits=torch.zeros(3, 10), epoch=epoch)["ssia"]
        assert out.item() == 0 and out.dim() == 0
    with pytest.raises(AttnlabError, match="at least 2 stages"):
        obj(features=broken, logits=torch.zeros(3, 10), epoch=2)
    ok = {"stages": [t([[1, 0], [0, 0]]), t([[2]])], "blocks": []}
    assert obj(features=ok, logits=torch.zeros(1), epoch=2)["ssia"].item() == pytest.approx(0.25)


def test_weight_scales_linearly():
    stages = [t([[1, 0], [0, 0]]), t([[2]])]
    assert loss_of(stages, weight=0.0).item() == 0
    assert loss_of(stages, weight=3.0).item() == pytest.approx(3 * loss_of(stages, weight=1.0).item())


def test_half_precision_features_give_a_float32_loss():
    f = [torch.rand(2, 4, 8, 8).bfloat16(), torch.rand(2, 4, 4, 4).bfloat16()]
    out = loss_of(f, distance="kl")
    assert out.dtype == torch.float32 and torch.isfinite(out)


# ---------------------------------------------------------------- options and config

@pytest.mark.parametrize("opts, match", [
    (dict(pairing="blocks"), "unknown ssia pairing 'blocks' .*did you mean block"),
    (dict(map="spacial"), "unknown ssia map"),
    (dict(distance="l2"), "unknown ssia distance"),
    (dict(resize="nearest"), "unknown ssia resize"),
    (dict(spatial_pool="max"), "unknown ssia spatial_pool"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(weight=-1.0), "weight must be >= 0"),
    (dict(detach="yes"), "detach must be true or false"),
])
def test_bad_options_raise_one_line_errors(opts, match):
    with pytest.raises(AttnlabError, match=match) as err:
        SSIA(**opts)
    assert "\n" not in str(err.value)


def test_config_section_turns_it_on_and_holds_the_defaults():
    defaults = objective_defaults()["ssia"]
    assert defaults["enabled"] is False
    assert set(defaults) == {"enabled", "pairing", "map", "p", "spatial_pool", "resize", "distance",
                             "temperature", "weight", "warmup_epochs", "detach", "design", "shuffle_target",
                             "attn_block", "aux_weight", "kd_weight", "kd_temperature", "hint_weight"}
    assert defaults["design"] == "maps" and defaults["shuffle_target"] is False  # the old objective, unchanged
    model = attnlab.create_model("resnet20")
    off = OmegaConf.create({"ssia": defaults})
    assert build_objectives(off, model) == []
    on = OmegaConf.create({"ssia": {**defaults, "enabled": True, "pairing": "block"}})
    (obj,) = build_objectives(on, model)
    assert isinstance(obj, SSIA) and features_needed([obj]) == "blocks"
    with pytest.raises(AttnlabError, match="unknown ssia option 'wieght'"):
        SSIA.from_config({"enabled": True, "wieght": 1.0}, model)


# ---------------------------------------------------------------- on real models

def _step(model, obj, x, y):
    logits, feats = model(x, features=obj.features)
    terms = obj(model=model, logits=logits, targets=y, features=feats, epoch=0, step=0)
    loss = torch.nn.functional.cross_entropy(logits, y) + terms["ssia"]
    loss.backward()
    return terms["ssia"]


@pytest.mark.parametrize("attention", attnlab.attention.names())
def test_composes_with_every_attention_module(attention):
    torch.manual_seed(0)
    model = attnlab.create_model("resnet20", attention=attention)
    keys = set(model.state_dict())
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    logits, feats = model(x, features="blocks")  # "blocks" also fills "stages": one forward serves all pairings
    terms = [SSIA(pairing=p, weight=10.0)(features=feats, logits=logits, epoch=0)["ssia"]
             for p in ("block", "stage", "last")]
    assert all(term.item() > 0 and torch.isfinite(term) for term in terms)
    (torch.nn.functional.cross_entropy(logits, y) + sum(terms)).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert set(model.state_dict()) == keys  # the objective adds nothing to the model


def test_composes_with_other_backbones():
    # ImageNet layout (7x7 stem, max-pool, four stages), with a plug-in module, trained one step.
    model = attnlab.create_model("resnet18", num_classes=10, attention="se")
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    for obj in (SSIA(pairing="block", map="channel", distance="kl"), SSIA(pairing="last", spatial_pool="mean_max")):
        model.zero_grad()
        assert _step(model, obj, x, y).item() > 0
        assert model.conv1.weight.grad.abs().sum() > 0
    # Bottleneck blocks (their input and output widths differ inside a stage's first block): forward only.
    model = attnlab.create_model("resnet164", attention="eca").eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(1, 3, 8, 8), features="blocks")
    assert SSIA(pairing="block", map="channel")(features=feats, logits=logits, epoch=0)["ssia"].item() > 0


# ---------------------------------------------------------------- through the engine

def test_engine_run_logs_the_term_after_warmup_and_saves_a_plain_model(tmp_path):
    import csv

    from attnlab.engine.config import load_config
    from attnlab.engine.train import train
    from attnlab.engine.checkpoint import load_training_checkpoint

    cfg = load_config(overrides=[
        "device=cpu", f"out_dir={tmp_path / 'runs'}", "name=ssia", "model.name=resnet20", "model.attention=se",
        "data.subset=32", "data.val_size=16", "data.test_subset=16", f"data.cache_dir={tmp_path / 'cache'}",
        "train.epochs=2", "train.batch_size=16", "train.eval_batch_size=64", "debug.max_steps_per_epoch=2",
        "ssia.enabled=true", "ssia.pairing=block", "ssia.warmup_epochs=1", "ssia.weight=100"])
    train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "runs" / "ssia" / "metrics.csv")))
    assert [float(r["ssia"]) for r in rows][0] == 0.0  # epoch 1 is the warm-up
    assert float(rows[1]["ssia"]) > 0
    ckpt = load_training_checkpoint(tmp_path / "runs" / "ssia" / "checkpoint_last.pt")
    assert ckpt["config"]["ssia"]["enabled"] is True
    attnlab.create_model("resnet20", attention="se").load_state_dict(ckpt["model"], strict=True)


# ---------------------------------------------------------------- DDP

def _ddp_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model, x, y = _ddp_problem()
        ddp = DDP(model)
        half = slice(2 * rank, 2 * rank + 2)
        logits, feats = ddp(x[half], features="blocks")
        obj = SSIA(pairing="block", weight=100.0)
        loss = torch.nn.functional.cross_entropy(logits, y[half]) + obj(features=feats, logits=logits, epoch=0)["ssia"]
        loss.backward()
        torch.save({n: p.grad for n, p in model.named_parameters()}, f"{out_dir}/grads{rank}.pt")
    finally:
        dist.destroy_process_group()


def _ddp_problem():
    torch.manual_seed(0)
    model = attnlab.create_model("resnet20", attention="se").eval()  # eval BN: per-rank statistics cannot differ
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 3])


def test_ddp_averages_the_ssia_gradients_like_one_process_on_the_full_batch(tmp_path):
    import torch._dynamo
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    model, x, y = _ddp_problem()
    logits, feats = model(x, features="blocks")
    # Both terms are batch means, so the full-batch loss is the mean of the two equal halves' losses.
    loss = torch.nn.functional.cross_entropy(logits, y) + SSIA(pairing="block", weight=100.0)(
        features=feats, logits=logits, epoch=0)["ssia"]
    loss.backward()
    g0, g1 = (torch.load(tmp_path / f"grads{r}.pt") for r in (0, 1))
    for name, p in model.named_parameters():
        assert torch.allclose(g0[name], g1[name]), name  # synchronised
        assert torch.allclose(g0[name], p.grad, atol=1e-6, rtol=1e-4), name
