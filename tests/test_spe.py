"""SPEM ('spe'): the gate's maths by hand, init, gradients, parameter count, the spe_reg objective, training."""
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from attn_helpers import (attention_params, backbone_cases, check_output_shape, check_short_run_learns, n_params)
from attnlab import attention
from attnlab.errors import AttnlabError
from attnlab.models import create_model
from attnlab.objectives import build_objectives, objective_defaults


def sig(z):
    return 1 / (1 + math.exp(-z))


def hand_set_module(variant):
    mod = attention.create("spe", 2, variant=variant)
    with torch.no_grad():
        mod.w_rew.copy_(torch.tensor([0.5, -1.0]).view(1, 2, 1, 1))
        mod.b_rew.copy_(torch.tensor([0.1, 0.2]).view(1, 2, 1, 1))
        mod.w_exc.copy_(torch.tensor([2.0, 0.5]).view(1, 2, 1, 1))
        mod.b_exc.copy_(torch.tensor([-1.0, 0.3]).view(1, 2, 1, 1))
        mod.p.copy_(torch.tensor([1.0, 2.0]))  # lambda = 1 / (1 + 4) = 0.2
    return mod


# channel 0: max 3, min -2; channel 1: max 4, min -1
X = torch.tensor([[[[1.0, -2.0], [3.0, 0.5]], [[-1.0, 4.0], [0.0, 2.0]]]])


def test_official_gate_by_hand():
    lam = 0.2
    # channel 0: a = g_rew(3) = 1.6, b = g_rew(-2) = -0.9; the mix is taken after g_rew
    a0, b0 = 0.5 * 3 + 0.1, 0.5 * -2 + 0.1
    v0 = sig(a0 + b0) * sig(2.0 * (lam * a0 + (1 - lam) * b0) - 1.0)
    # channel 1: a = g_rew(4) = -3.8, b = g_rew(-1) = 1.2
    a1, b1 = -1 * 4 + 0.2, -1 * -1 + 0.2
    v1 = sig(a1 + b1) * sig(0.5 * (lam * a1 + (1 - lam) * b1) + 0.3)
    out = hand_set_module("official")(X)
    expected = X * torch.tensor([v0, v1]).view(1, 2, 1, 1)
    torch.testing.assert_close(out, expected)
    assert abs(v0 - sig(0.7) * sig(-1.8)) < 1e-12  # the same numbers, written out


def test_figure_variant_by_hand():
    lam = 0.2
    # mix on the raw pools, one sigmoid after the product of the two branches
    v0 = sig(((0.5 * 3 + 0.1) + (0.5 * -2 + 0.1)) * (2.0 * (lam * 3 + (1 - lam) * -2) - 1.0))
    v1 = sig(((-1 * 4 + 0.2) + (-1 * -1 + 0.2)) * (0.5 * (lam * 4 + (1 - lam) * -1) + 0.3))
    out = hand_set_module("figure")(X)
    torch.testing.assert_close(out, X * torch.tensor([v0, v1]).view(1, 2, 1, 1))


def test_init_survives_model_init_and_scales_branch_by_0032():
    model = create_model("resnet20", attention="spe")
    mods = model.attention_modules()
    assert len(mods) == 9
    for mod in mods:
        assert torch.all(mod.w_rew == 0) and torch.all(mod.w_exc == 0)
        assert torch.all(mod.b_rew == -1) and torch.all(mod.b_exc == -1)
        assert mod.p.tolist() == [0.5, 0.5]
    u = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(mods[0](u), u * (sig(-2) * sig(-1)))


def test_init_bias_opens_the_gate_and_survives_model_init():
    model = create_model("resnet20", attention="spe", attention_kwargs={"init_bias": 2.0})
    mod = model.attention_modules()[4]
    assert torch.all(mod.b_rew == 2) and torch.all(mod.b_exc == 2) and torch.all(mod.w_rew == 0)
    u = torch.randn(2, mod.w_rew.shape[1], 4, 4)
    torch.testing.assert_close(mod(u), u * (sig(4) * sig(2)))  # ~0.87 instead of ~0.03
    for bad in ("open", float("nan"), float("inf")):  # NaN would make every gate NaN
        with pytest.raises(AttnlabError, match="init_bias must be a finite number"):
            create_model("resnet20", attention="spe", attention_kwargs={"init_bias": bad})


def test_bad_variant():
    with pytest.raises(AttnlabError, match="variant"):
        create_model("resnet20", attention="spe", attention_kwargs={"variant": "paper"})


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = create_model("resnet20", attention="spe")
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), y).backward()
    params = attention_params(model)
    for name, p in params:
        if name.endswith(".p"):
            # at init g_rew(max) = g_rew(min) = -1, so the mix (and the loss) does not depend on lambda yet
            assert torch.all(p.grad == 0), name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the regulariser reaches p at once; after one step w_rew != 0 and the loss reaches p as well
    reg = build_objectives(OmegaConf.create({"spe_reg": objective_defaults()["spe_reg"]}), model)[0]
    reg(model=model, logits=None, targets=None, features=None, epoch=0, step=0)["spe_reg"].backward()
    assert all(p.grad.abs().sum() > 0 for name, p in params if name.endswith(".p"))
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for name, p in params:
        assert p.grad.abs().sum() > 0, name


def test_resnet164_parameter_count():
    base = n_params(create_model("resnet164", num_classes=100))
    spe = n_params(create_model("resnet164", num_classes=100, attention="spe"))
    assert abs(spe - 1.76e6) <= 0.01e6
    assert spe - base == 18 * ((4 * 64 + 2) + (4 * 128 + 2) + (4 * 256 + 2))  # 4C + 2 per block


def test_spe_reg_objective():
    section = OmegaConf.create({"spe_reg": objective_defaults()["spe_reg"]})
    assert dict(section.spe_reg) == {"enabled": "auto", "weight": 0.1}
    model = create_model("resnet20", attention="spe", blocks=[1, 2])
    (obj,) = build_objectives(section, model)
    terms = obj(model=model, logits=None, targets=None, features=None, epoch=0, step=0)
    assert set(terms) == {"spe_reg"}
    assert terms["spe_reg"].item() == pytest.approx(0.1 * 6 * (0.5 ** 2 + 0.5 ** 2))
    with torch.no_grad():
        model.attention_modules()[0].p.copy_(torch.tensor([3.0, -4.0]))
    terms = obj(model=model, logits=None, targets=None, features=None, epoch=0, step=0)
    assert terms["spe_reg"].item() == pytest.approx(0.1 * (5 * 0.5 + 25.0))
    # "auto" is off without SPE modules; "true" without them is an error; "false" turns it off
    assert build_objectives(section, create_model("resnet20", attention="se")) == []
    on = OmegaConf.create({"spe_reg": {"enabled": True, "weight": 0.1}})
    with pytest.raises(AttnlabError, match="no 'spe'"):
        build_objectives(on, create_model("resnet20"))
    off = OmegaConf.create({"spe_reg": {"enabled": False, "weight": 0.1}})
    assert build_objectives(off, model) == []
    bad = OmegaConf.create({"spe_reg": {"enabled": "sometimes", "weight": 0.1}})
    with pytest.raises(AttnlabError, match="spe_reg.enabled"):
        build_objectives(bad, model)


@pytest.mark.parametrize("name,size", backbone_cases())
def test_output_shapes(name, size):
    check_output_shape(name, size, "spe")


def test_short_training_run_decreases_loss():
    torch.manual_seed(0)
    model = create_model("resnet20", attention="spe")
    reg = build_objectives(OmegaConf.create({"spe_reg": objective_defaults()["spe_reg"]}), model)[0]
    check_short_run_learns(model, extra_loss=lambda: reg(
        model=model, logits=None, targets=None, features=None, epoch=0, step=0)["spe_reg"])


def test_spe_gate_script_measures_the_gate_each_block_applies():
    from conftest import load_benchmark
    sg = load_benchmark("spe_gate")
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, attention="spe")
    images = [(torch.randn(4, 3, 32, 32), None), (torch.randn(3, 3, 32, 32), None)]
    closed = sg.gate_stats(model, images)
    assert len(closed) == 9 and all(b["b_rew"] == -1.0 and b["lambda"] == 0.5 for b in closed)
    assert all(b["gate"] == round(torch.sigmoid(torch.tensor(-2.)).item() * torch.sigmoid(torch.tensor(-1.)).item(), 4)
               for b in closed)
    first = next(m for m in model.modules() if isinstance(m, attention.spe.SPE))
    with torch.no_grad():
        first.w_rew.fill_(0.5)  # the gate now depends on the input: measured from it, not from the biases
        first.b_rew.fill_(1.0)
    opened = sg.gate_stats(model, images)
    inputs = []
    handle = first.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    with torch.no_grad():
        for x, _ in images:
            model(x)
    handle.remove()
    by_hand = torch.cat([first.gate(u).flatten() for u in inputs]).mean().item()
    assert opened[0]["abs_w_rew"] == 0.5 and opened[0]["b_rew"] == 1.0
    assert opened[0]["gate"] == pytest.approx(by_hand, abs=1e-4) and opened[0]["gate"] > 0.2
    assert [b["gate"] for b in opened[1:]] == [b["gate"] for b in closed[1:]]
    assert sg.summary(closed)["gate"]["min"] == sg.summary(closed)["gate"]["max"] == closed[0]["gate"]
