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
    for name in ("none", "gc"):  # GC's default add fusion multiplies by nothing
        model, gates, _, _ = run(name)
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


# ---- the seven modules added later: each gate shown is the multiplier the module applies ----------------------

def randomized(module, seed=0):
    """``module`` with every parameter drawn at random (the identity inits of GCT and GC would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module.eval()


def shown(module, x):
    """(output, {kind: values}) of one forward, the values as the picture code keeps them."""
    from attnlab.attention.gates import gate_axes
    seen = {}
    with torch.no_grad(), watch_gates(module, lambda m, kind, v: seen.setdefault(kind, gate_axes(kind, v))):
        out = module(x)
    return out, seen


def multiplier(kinds):
    """The (B, C, H, W)-broadcastable product of the gates a module shows (triplet: their mean, see below)."""
    full = {"channel": lambda v: v[:, :, None, None], "spatial": lambda v: v[:, None],
            "channel-height": lambda v: v[..., None], "channel-width": lambda v: v[:, :, None, :],
            "full": lambda v: v}
    out = 1
    for kind, v in kinds.items():
        out = out * full[kind](v)
    return out


X = torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(3)) * 2  # H != W: the axes cannot swap


def test_simam_shows_the_sigmoid_of_its_inverse_energy():
    from attnlab.attention.simam import SimAM
    out, seen = shown(SimAM(16), X)
    mu = X.mean((2, 3), keepdim=True)
    var = ((X - mu) ** 2).sum((2, 3), keepdim=True) / (5 * 7 - 1)
    e_inv = (X - mu) ** 2 / (4 * (var + 1e-4)) + 0.5
    assert list(seen) == ["full"] and seen["full"].shape == (2, 16, 5, 7)
    torch.testing.assert_close(seen["full"], torch.sigmoid(e_inv))
    assert seen["full"].min() >= torch.sigmoid(torch.tensor(0.5)) - 1e-6  # e_inv >= 1/2
    torch.testing.assert_close(out, X * seen["full"])


def test_gct_shows_its_tanh_gate_which_may_exceed_one():
    from attnlab.attention.gct import GCT
    module = randomized(GCT(16))
    out, seen = shown(module, X)
    a, g, b = (p.view(16) for p in (module.alpha, module.gamma, module.beta))
    s = a * torch.sqrt((X ** 2).sum((2, 3)) + 1e-5)                       # (B, C)
    n = g * s / torch.sqrt((s ** 2).mean(1, keepdim=True) + 1e-5)
    assert list(seen) == ["channel"]
    torch.testing.assert_close(seen["channel"], 1 + torch.tanh(n + b))
    assert seen["channel"].max() > 1 and seen["channel"].min() > 0
    torch.testing.assert_close(out, X * multiplier(seen))
    _, at_init = shown(GCT(16), X)
    assert torch.all(at_init["channel"] == 1)  # gamma = beta = 0: the gate starts at 1


def test_fcanet_shows_its_channel_gate_from_the_dct_coefficients():
    import math

    from attnlab.attention.fca import TOP_FREQUENCIES, FcaAttention
    module = randomized(FcaAttention(16))
    x = X[:, :, :5, :5].repeat(1, 1, 2, 2)[:, :, :7, :7]  # a 7x7 map: no pooling before the DCT
    out, seen = shown(module, x)

    def basis(u, t):
        return math.cos(math.pi * u * (t + 0.5) / 7) / math.sqrt(7) * (math.sqrt(2) if u else 1)

    y = torch.zeros(2, 16)
    for c, (u, v) in enumerate(TOP_FREQUENCIES):  # 16 channels, 16 frequencies: one each
        for h in range(7):
            for w in range(7):
                y[:, c] += x[:, c, h, w] * basis(u, h) * basis(v, w)
    w1, w2 = module.fc1.weight.flatten(1), module.fc2.weight.flatten(1)
    torch.testing.assert_close(seen["channel"], torch.sigmoid(torch.relu(y @ w1.T) @ w2.T), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, x * multiplier(seen))


def test_coord_shows_its_height_and_width_gates():
    from attnlab.attention.coord import CoordAttention
    module = randomized(CoordAttention(16))
    out, seen = shown(module, X)
    assert list(seen) == ["channel-height", "channel-width"]
    assert seen["channel-height"].shape == (2, 16, 5) and seen["channel-width"].shape == (2, 16, 7)
    # row i's height gate reads row i only, every column's width gate reads every row: change the last row
    x2 = X.clone()
    x2[:, :, 4] += 5
    _, seen2 = shown(module, x2)
    torch.testing.assert_close(seen2["channel-height"][:, :, :4], seen["channel-height"][:, :, :4])
    assert torch.all(seen2["channel-height"][:, :, 4] != seen["channel-height"][:, :, 4])
    assert torch.all(seen2["channel-width"] != seen["channel-width"])
    torch.testing.assert_close(out, X * multiplier(seen))


def test_triplet_shows_its_three_branch_gates_and_applies_their_mean():
    from attnlab.attention.triplet import TripletAttention
    module = randomized(TripletAttention())
    out, seen = shown(module, X)
    assert list(seen) == ["channel-width", "channel-height", "spatial"]

    def zgate(gate, z):  # sigmoid(BN(conv([max; mean]))) on an already pooled (B, 2, P, Q) descriptor
        return torch.sigmoid(gate.bn(gate.conv(z)))[:, 0]

    def pool(axis):
        return torch.stack([X.amax(axis), X.mean(axis)], 1)

    with torch.no_grad():
        torch.testing.assert_close(seen["spatial"], zgate(module.hw, pool(1)))                     # C pooled: (H, W)
        torch.testing.assert_close(seen["channel-width"], zgate(module.cw, pool(2)))               # H pooled: (C, W)
        torch.testing.assert_close(seen["channel-height"],                                         # W pooled: (H, C)
                                   zgate(module.hc, pool(3).transpose(2, 3)).transpose(1, 2))
    mean = (seen["spatial"][:, None] + seen["channel-width"][:, :, None] + seen["channel-height"][..., None]) / 3
    torch.testing.assert_close(out, X * mean)
    out2, seen2 = shown(randomized(TripletAttention(no_spatial=True)), X)
    assert list(seen2) == ["channel-width", "channel-height"]
    torch.testing.assert_close(out2, X * (seen2["channel-width"][:, :, None] + seen2["channel-height"][..., None]) / 2)


@pytest.mark.parametrize("combine", ["add", "mul"])
def test_bam_shows_its_combined_residual_gate(combine):
    from attnlab.attention.bam import BAM
    module = randomized(BAM(16, reduction=4, combine=combine))
    out, seen = shown(module, X)
    with torch.no_grad():
        m_c = module.channel(X.mean((2, 3)))[:, :, None, None]
        m_s = module.spatial(X)
    m = m_c + m_s if combine == "add" else m_c * m_s
    assert list(seen) == ["full"]
    torch.testing.assert_close(seen["full"], 1 + torch.sigmoid(m))
    assert 1 < seen["full"].min() and seen["full"].max() < 2
    torch.testing.assert_close(out, X * seen["full"])


@pytest.mark.parametrize("fusion", ["add", "scale", "both"])
def test_gc_shows_the_scale_gate_and_nothing_for_the_added_term(fusion):
    from attnlab.attention.gc import GlobalContext
    module = randomized(GlobalContext(16, reduction=4, fusion=fusion))
    out, seen = shown(module, X)
    if fusion == "add":
        assert seen == {}
        return
    with torch.no_grad():
        w = module.conv_mask(X).flatten(1).softmax(-1)                 # attention pooling over the 35 positions
        context = (X.flatten(2) * w[:, None]).sum(-1)[:, :, None, None]
        gate = torch.sigmoid(module.scale(context))[:, :, 0, 0]
    torch.testing.assert_close(seen["channel"], gate)
    added = out - X * multiplier(seen)
    if fusion == "scale":
        torch.testing.assert_close(added, torch.zeros_like(X), atol=1e-6, rtol=0)
    else:  # x * gate + t: what is left is one term per channel, the same at every position
        assert added.abs().max() > 1e-3
        torch.testing.assert_close(added, added[:, :, :1, :1].expand_as(added))


def applied(gates):
    """The multiplier a block applies from the gates it showed: triplet's three are averaged, the others multiply."""
    if set(gates) == {"channel-width", "channel-height", "spatial"}:
        return (gates["spatial"][:, None] + gates["channel-width"][:, :, None] + gates["channel-height"][..., None]) / 3
    return multiplier(gates)


@pytest.mark.parametrize("name,kwargs,kinds", [
    ("simam", {}, {"full"}), ("gct", {}, {"channel"}), ("fca", {}, {"channel"}),
    ("coord", {}, {"channel-height", "channel-width"}), ("triplet", {}, {"channel-width", "channel-height", "spatial"}),
    ("bam", {}, {"full"}), ("gc", {"fusion": "scale"}, {"channel"})])
def test_new_modules_in_a_resnet_show_what_each_block_applies(name, kwargs, kinds):
    model, _, blocks, _ = run(name, attention_kwargs=kwargs)
    for b in blocks.values():
        randomized(b.attn)  # away from the identity inits, so that a wrong gate cannot pass
    with torch.no_grad(), capture_gates(model) as gates:
        _, feats = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), features="blocks")
    io = dict(zip(blocks, feats["blocks"]))
    for n, block in blocks.items():
        mine = {g.kind: g.values for g in gates if g.block == n}
        assert set(mine) == kinds
        inp, out = io[n]
        with torch.no_grad():
            torch.testing.assert_close(out, F.relu(block.branch(inp) * applied(mine) + block.shortcut(inp)))
