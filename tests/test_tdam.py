"""TDAM ('tdam'): modulation maths by hand, the re-run wiring for every m, placement, counts, training."""
import math

import pytest
import torch
import torch.nn.functional as F

from attn_helpers import (attention_params_with_gradients, backbone_cases, check_output_shape, check_short_run_learns,
                          n_params)
from attnlab import attention
from attnlab.errors import AttnlabError
from attnlab.models import BasicBlock, Bottleneck, create_model
from attnlab.measure import count_flops


def sig(z):
    return 1 / (1 + math.exp(-z))


def attached(block_cls, inplanes, planes, stride=1, **kwargs):
    tdam = attention.create("tdam", planes * block_cls.expansion, **kwargs)
    block = block_cls(inplanes, planes, stride, tdam)
    tdam.attach(block)
    return block, tdam


def test_modulation_by_hand_joint():
    # BasicBlock(2, 2): C_top = 2, m=1 -> bottom = conv2's input (2 channels), r = max(1, 2 // 16) = 1
    _, tdam = attached(BasicBlock, 2, 2)
    assert tdam.w_top.weight.shape == (1, 2, 1, 1) and tdam.w_bottom.weight.shape == (1, 2, 1, 1)
    assert tdam.w_s.weight.shape == (2, 2, 1, 1)
    with torch.no_grad():
        tdam.w_top.weight.copy_(torch.tensor([1.0, 1.0]).view(1, 2, 1, 1))
        tdam.w_bottom.weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
        tdam.w_s.weight.copy_(torch.tensor([[0.5, 3.0], [-1.0, 2.0]]).view(2, 2, 1, 1))
    bottom = torch.tensor([[[[1.0, -1.0]], [[2.0, 0.5]]]])   # (1, 2, 1, 2): GAP = (0, 1.25)
    top = torch.tensor([[[[0.5, 1.5]], [[-1.0, 3.0]]]])      # GAP = (1, 1)
    # hidden: top ReLU(1 + 1) = 2, bottom ReLU(0 - 1.25) = 0; S = W_s [2; 0] = (1, -2), used raw
    s0, s1 = 0.5 * 2 + 3.0 * 0, -1.0 * 2 + 2.0 * 0
    ch0 = [1.0 * sig(s0), -1.0 * sig(s0)]                     # channel gate sigmoid(S)
    ch1 = [2.0 * sig(s1), 0.5 * sig(s1)]
    a = [s0 * ch0[w] + s1 * ch1[w] for w in range(2)]        # spatial map with the raw searchlight
    expected = torch.tensor([[[[ch0[w] * sig(a[w]) for w in range(2)]],
                              [[ch1[w] * sig(a[w]) for w in range(2)]]]])
    torch.testing.assert_close(tdam.modulate(bottom, top), expected)


def test_modulation_by_hand_top_only_and_spatial_first():
    _, tdam = attached(BasicBlock, 2, 2, searchlight="top", order="spatial->channel")
    assert not hasattr(tdam, "w_bottom") and tdam.w_s.weight.shape == (2, 1, 1, 1)
    with torch.no_grad():
        tdam.w_top.weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
        tdam.w_s.weight.copy_(torch.tensor([1.0, -0.5]).view(2, 1, 1, 1))
    bottom = torch.tensor([[[[1.0, -1.0]], [[2.0, 0.5]]]])
    top = torch.tensor([[[[3.0, 1.0]], [[0.0, 1.0]]]])       # GAP = (2, 0.5): hidden ReLU(1.5) = 1.5
    s0, s1 = 1.5, -0.75
    a = [s0 * 1.0 + s1 * 2.0, s0 * -1.0 + s1 * 0.5]          # spatial first, on the raw bottom
    expected = torch.tensor([[[[1.0 * sig(a[0]) * sig(s0), -1.0 * sig(a[1]) * sig(s0)]],
                              [[2.0 * sig(a[0]) * sig(s1), 0.5 * sig(a[1]) * sig(s1)]]]])
    torch.testing.assert_close(tdam.modulate(bottom, top), expected)


@pytest.mark.parametrize("block_cls,inplanes,planes,stride,m,time_steps", [
    (Bottleneck, 16, 4, 1, 1, 2), (Bottleneck, 8, 4, 2, 2, 2), (Bottleneck, 16, 4, 1, 3, 2),
    (Bottleneck, 16, 4, 1, 0, 2), (Bottleneck, 16, 4, 1, 1, 3),
    (BasicBlock, 4, 4, 1, 1, 2), (BasicBlock, 4, 8, 2, 2, 2), (BasicBlock, 4, 4, 1, 0, 3),
])
def test_block_rerun_wiring(block_cls, inplanes, planes, stride, m, time_steps):
    """With W_s = 0 the searchlight is 0, so each modulation halves twice (channel 0.5, spatial 0.5): 0.25.

    In eval mode with zero BN means and biases every layer is positively homogeneous, so re-running the last m
    layers on 0.25^k * bottom gives 0.25^k * branch, times the gamma ratio of the last step's BN. The shortcut
    must still see the unmodulated input.
    """
    torch.manual_seed(0)
    block, tdam = attached(block_cls, inplanes, planes, stride, m=m, time_steps=time_steps)
    n = 3 if block_cls is Bottleneck else 2
    with torch.no_grad():
        tdam.w_s.weight.zero_()
        for k in range(1, n + 1):
            bn = getattr(block, f"bn{k}")
            bn.weight.uniform_(0.5, 1.5)
            bn.running_var.uniform_(0.5, 2.0)
            for t in range(1, time_steps):
                if k > n - m:  # a re-run layer: its per-step BN copies the block's, the last one doubles gamma
                    step_bn = getattr(tdam, f"bn{k}_{t}")
                    step_bn.load_state_dict(bn.state_dict())
                    if k == n:
                        step_bn.weight.mul_(2.0 * t)
                else:
                    assert not hasattr(tdam, f"bn{k}_{t}")
    block.eval()
    x = torch.randn(2, inplanes, 6, 6)
    with torch.no_grad():
        plain = block.branch(x)
        out = block(x)
    if m == 0:
        factor = 0.25 ** time_steps          # the branch output modulated T times (the official loop), no re-run
    else:
        last = time_steps - 1                # T-1 modulations, then the last step's BN gamma x (2 * last)
        factor = 0.25 ** last * (2.0 * last)
    torch.testing.assert_close(out, F.relu(factor * plain + block.shortcut(x)), rtol=1e-4, atol=1e-5)


def hand_modulate(u, top, w_top, w_bottom, w_s):
    """One TDjoint channel->spatial modulation in plain Python: u, top are [channel][position] lists."""
    def gap(f):
        return [sum(row) / len(row) for row in f]

    h_top = max(0.0, sum(w * g for w, g in zip(w_top, gap(top))))
    h_bottom = max(0.0, sum(w * g for w, g in zip(w_bottom, gap(u))))
    s = [ws[0] * h_top + ws[1] * h_bottom for ws in w_s]
    gated = [[v * sig(s[c]) for v in u[c]] for c in range(len(u))]
    a = [sum(s[c] * gated[c][p] for c in range(len(u))) for p in range(len(u[0]))]
    return [[gated[c][p] * sig(a[p]) for p in range(len(u[0]))] for c in range(len(u))]


@pytest.mark.parametrize("time_steps", [1, 2, 3])
def test_m0_modulates_the_branch_output_t_times_by_hand(time_steps):
    """Official m=0 (timm_td_resnet.py): ``for t in range(T): x = RA(x, x)``, i.e. T self-modulations."""
    torch.manual_seed(0)
    block, tdam = attached(BasicBlock, 2, 2, m=0, time_steps=time_steps)
    w_top, w_bottom, w_s = [0.8, -0.4], [0.3, 0.6], [[0.5, -1.0], [1.5, 0.25]]
    with torch.no_grad():
        tdam.w_top.weight.copy_(torch.tensor(w_top).view(1, 2, 1, 1))
        tdam.w_bottom.weight.copy_(torch.tensor(w_bottom).view(1, 2, 1, 1))
        tdam.w_s.weight.copy_(torch.tensor(w_s).view(2, 2, 1, 1))
    block.eval()
    x = torch.randn(1, 2, 3, 3)
    with torch.no_grad():
        u = block.branch(x)[0].reshape(2, 9).tolist()
        out = block(x)
    for _ in range(time_steps):
        u = hand_modulate(u, u, w_top, w_bottom, w_s)
    expected = F.relu(torch.tensor(u).view(1, 2, 3, 3) + x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not any(k.startswith("bn") for k, _ in tdam.named_children())  # nothing is re-run: no step BNs


def test_one_step_is_the_plain_block():
    torch.manual_seed(0)
    block, _ = attached(Bottleneck, 16, 4, m=3, time_steps=1)
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(block(x), F.relu(block.branch(x) + x))


def test_resnet50_count_and_flops():
    model = create_model("resnet50", attention="tdam")
    assert n_params(model) == 27_645_992                      # TDjoint, T=2, m=1, layer3 + layer4
    top = create_model("resnet50", attention="tdam", attention_kwargs={"searchlight": "top"})
    assert abs(n_params(top) - 27.06e6) < 0.01e6              # the poster's TDtop (t2, m1)
    flops = count_flops(model, 224)                           # 2 x MACs; the poster's 4.59 GMACs = 9.18 GFLOPs
    assert abs(flops - 9.18e9) / 9.18e9 < 0.03, flops


def test_default_placement_and_blocks_override():
    def tdam_blocks(model):
        return [[not isinstance(b.attn, torch.nn.Identity) for b in s] for s in model.stages()]

    r50 = create_model("resnet50", num_classes=10, attention="tdam")
    assert tdam_blocks(r50) == [[False] * 3, [False] * 4, [True] * 6, [True] * 3]
    r20 = create_model("resnet20", attention="tdam")
    assert tdam_blocks(r20) == [[False] * 3, [True] * 3, [True] * 3]
    r20_all = create_model("resnet20", attention="tdam", blocks="all")
    assert tdam_blocks(r20_all) == [[True] * 3] * 3
    r20_one = create_model("resnet20", attention="tdam", blocks={0: [1]})
    assert tdam_blocks(r20_one) == [[False, True, False], [False] * 3, [False] * 3]
    keys = r50.state_dict().keys()
    assert {"layer3.0.attn.w_top.weight", "layer3.0.attn.w_bottom.weight", "layer3.0.attn.w_s.weight",
            "layer3.0.attn.bn3_1.weight", "layer4.2.attn.bn3_1.running_var"} <= set(keys)
    assert not any(k.startswith(("layer1.", "layer2.")) and ".attn." in k for k in keys)


def test_bad_options():
    with pytest.raises(AttnlabError, match="m=3 is out of range for CifarBasicBlock"):
        create_model("resnet20", attention="tdam", attention_kwargs={"m": 3})
    with pytest.raises(AttnlabError, match="cannot be shared"):
        create_model("resnet20", attention="tdam", share=True)
    with pytest.raises(AttnlabError, match="searchlight"):
        create_model("resnet20", attention="tdam", attention_kwargs={"searchlight": "bottom"})
    with pytest.raises(AttnlabError, match="time_steps"):
        create_model("resnet20", attention="tdam", attention_kwargs={"time_steps": 0})
    with pytest.raises(AttnlabError, match="no option 'steps'"):
        create_model("resnet20", attention="tdam", attention_kwargs={"steps": 2})


def test_step_bn_statistics_come_from_the_second_step():
    torch.manual_seed(0)
    block, tdam = attached(Bottleneck, 16, 4)
    block.train()
    block(torch.randn(4, 16, 5, 5))
    assert int(block.bn3.num_batches_tracked) == 1 and int(tdam.bn3_1.num_batches_tracked) == 1
    assert not torch.allclose(block.bn3.running_mean, tdam.bn3_1.running_mean)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    # reduction 2: with C_top // 16 = 2 hidden units, both can be dead ReLUs for a whole batch by chance
    model = create_model("resnet20", attention="tdam", attention_kwargs={"m": 2, "reduction": 2})
    params = attention_params_with_gradients(model)
    assert {n.split(".", 1)[1] for n, _ in params} == {
        "w_top.weight", "w_bottom.weight", "w_s.weight", "bn1_1.weight", "bn1_1.bias", "bn2_1.weight", "bn2_1.bias"}


@pytest.mark.parametrize("name,size", backbone_cases())
def test_output_shapes(name, size):
    check_output_shape(name, size, "tdam")


def test_short_training_run_decreases_loss():
    torch.manual_seed(0)
    check_short_run_learns(create_model("resnet20", attention="tdam"))


def test_imagenet_recipe_starts_residual_branches_at_zero_like_the_official_code(tmp_path):
    """configs/imagenet_resnet50_tdam.yaml: zero_init_last_bn=True as the official TDAM ResNets; step BNs at 1."""
    from attnlab.data.sources import repo_root
    from attnlab.engine.config import load_config, to_dict

    cfg = load_config(repo_root() / "configs" / "imagenet_resnet50_tdam.yaml", [f"data.data_dir={tmp_path}"])
    m = cfg.model
    assert m.zero_init_residual is True and m.attention == "tdam" and cfg.train.batch_size == 512
    model = create_model(m.name, num_classes=1000, attention=m.attention, attention_kwargs=to_dict(m.attention_kwargs),
                         zero_init_residual=m.zero_init_residual)
    assert n_params(model) == 27_645_992
    blocks = [b for s in model.stages() for b in s]
    assert all(bool((b.bn3.weight == 0).all()) for b in blocks)               # every branch's last BN
    assert all(bool((b.bn2.weight == 1).all()) for b in blocks)
    steps = [b.attn.bn3_1 for b in blocks if not isinstance(b.attn, torch.nn.Identity)]
    assert len(steps) == 9 and all(bool((bn.weight == 1).all()) for bn in steps)
