"""Attention modules show their own gates (attnlab.attention.gates); the picture code (attnlab.viz.gates) only
watches: the values it collects are the gates the modules multiply by, and a new module needs no viz change."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnlab.attention.gates import show_gate, watch_gates
from attnlab.models import create_model
from attnlab.viz.gates import capture_gates


def run(name, **kwargs):
    torch.manual_seed(0)
    model = create_model("resnet20", attention=name, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture_gates(model) as gates:
        _, feats = model(x, features="blocks")
    names = [f"{s}.{j}" for s in model.stage_names for j in range(len(getattr(model, s)))]
    blocks = dict(zip(names, [b for stage in model.stages() for b in stage]))
    return model, gates, blocks, dict(zip(names, feats["blocks"]))


def by_block(gates, kind):
    return {g.block: g.values for g in gates if g.kind == kind}


@pytest.mark.parametrize("name,kwargs", [("se", {}), ("eca", {}), ("spe", {}), ("dia", {}), ("dia", {"share": False}),
                                         ("se", {"share": True, "blocks": "101-011-110"})])
def test_channel_gate_shown_is_the_one_the_block_applies(name, kwargs):
    model, gates, blocks, io = run(name, **kwargs)
    channel = by_block(gates, "channel")
    with_attn = {n for n, b in blocks.items() if not isinstance(b.attn, nn.Identity)}
    assert set(channel) == with_attn and len(gates) == len(with_attn)
    assert all(g.kind == "channel" and g.step == 0 for g in gates)
    with torch.no_grad():
        for n in with_attn:
            block, (inp, out), gate = blocks[n], io[n], channel[n]
            assert gate.shape == (2, block.out_channels) and 0 < gate.min() and gate.max() < 1
            torch.testing.assert_close(out, F.relu(block.branch(inp) * gate[:, :, None, None] + block.shortcut(inp)))


def test_cbam_shows_its_channel_then_spatial_gate():
    model, gates, blocks, io = run("cbam")
    channel, spatial = by_block(gates, "channel"), by_block(gates, "spatial")
    assert set(channel) == set(spatial) == set(blocks) and len(gates) == 18
    assert [g.kind for g in gates[:2]] == ["channel", "spatial"]
    with torch.no_grad():
        for n, block in blocks.items():
            (inp, out), gc, gs = io[n], channel[n], spatial[n]
            branch = block.branch(inp)
            assert gs.shape == (2, *branch.shape[2:])
            applied = branch * gc[:, :, None, None] * gs[:, None]
            torch.testing.assert_close(out, F.relu(applied + block.shortcut(inp)))


@pytest.mark.parametrize("order", ["channel->spatial", "spatial"])
def test_tdam_shows_the_searchlight_gates_of_each_modulation(order):
    model, gates, blocks, io = run("tdam", blocks="all", attention_kwargs={"order": order, "time_steps": 3})
    for kind in ("channel", "spatial"):
        shown = [g for g in gates if g.kind == kind]
        assert len(shown) == 2 * len(blocks)  # T - 1 = 2 modulations per block
        assert [g.step for g in shown[:2]] == [0, 1]
    with torch.no_grad():
        for n, block in blocks.items():
            attn, (inp, _) = block.attn, io[n]
            bottom = block.relu(block.bn1(block.conv1(inp)))  # m = 1: the input of the last conv
            top = block.bn2(block.conv2(bottom))              # step 0: the plain forward
            s = attn.searchlight(top, bottom)
            first = {g.kind: g.values for g in gates if g.block == n and g.step == 0}
            torch.testing.assert_close(first["channel"], torch.sigmoid(s).flatten(1))
            x = bottom * torch.sigmoid(s) if order == "channel->spatial" else bottom
            torch.testing.assert_close(first["spatial"], torch.sigmoid((s * x).sum(1)))


def test_modules_without_gates_show_nothing_and_nothing_stays_behind():
    model, gates, _, _ = run("simam")
    assert gates == []
    model, gates, _, _ = run("cbam")
    assert not any("_gate_watcher" in vars(m) for m in model.modules())
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))  # no watcher: nothing recorded, nothing raised
    assert len(gates) == 18


class Halves(nn.Module):
    """A module the picture code has never heard of: it shows its own spatial gate."""

    def forward(self, x):
        gate = torch.full_like(x[:, :1], 0.5)
        show_gate(self, "spatial", gate)
        return x * gate


def test_a_new_module_is_shown_without_any_viz_change():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    model.layer2[1].attn = Halves()
    with torch.no_grad(), capture_gates(model) as gates:
        model(torch.randn(2, 3, 32, 32))
    assert [(g.block, g.kind, g.step) for g in gates] == [("layer2.1", "spatial", 0)]
    assert gates[0].values.shape == (2, 16, 16) and torch.all(gates[0].values == 0.5)


def test_watching_twice_is_refused_and_unwatched_calls_are_free():
    module, seen = Halves(), []
    module(torch.ones(1, 2, 3, 3))
    with watch_gates(module, lambda m, kind, values: seen.append((m, kind))):
        with pytest.raises(RuntimeError, match="already being watched"):
            with watch_gates(module, print):
                pass
        module(torch.ones(1, 2, 3, 3))
    module(torch.ones(1, 2, 3, 3))
    assert seen == [(module, "spatial")]
