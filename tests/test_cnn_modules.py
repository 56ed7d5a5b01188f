"""SimAM, GC, Coordinate Attention, GCT, Triplet attention, BAM and FcaNet.

Where timm has the module (GC: ``timm.layers.GlobalContext``, Coordinate Attention: ``timm.layers.CoordAttn``) ours is
compared with timm's on copied weights; otherwise with the official code's parameter count (the repository is named
in each test) and a hand computation of the output on a small input.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from attn_helpers import n_params, randomise_bn

import attnlab
from attnlab.attention.bam import BAM
from attnlab.attention.coord import CoordAttention
from attnlab.attention.fca import TOP_FREQUENCIES, FcaAttention, dct_basis
from attnlab.attention.gc import GlobalContext
from attnlab.attention.gct import GCT
from attnlab.attention.simam import SimAM
from attnlab.attention.triplet import TripletAttention
from attnlab.errors import AttnlabError

NEW = ["simam", "gc", "coord", "gct", "triplet", "bam", "fca"]


def feature_map(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def randomise(module, std=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return randomise_bn(module, seed)


# --- every new module --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("shape", [(2, 32, 5, 9), (3, 64, 1, 1), (2, 16, 12, 7)])
def test_any_input_size_keeps_the_shape(name, shape):
    m = randomise(attnlab.attention.create(name, shape[1])).train()
    x = feature_map(*shape)
    out = m(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    m.eval()
    with torch.no_grad():
        assert m(x).shape == x.shape


@pytest.mark.parametrize("name", NEW)
def test_shared_per_stage_and_trained(name):
    torch.manual_seed(0)
    model = attnlab.create_model("resnet20", num_classes=10, attention=name, share=True)
    mods = model.attention_modules()
    assert len(mods) == 3 and all(model.layer2[i].attn is mods[1] for i in range(3))
    assert all(k.startswith(("layer1.shared_attn.", "layer2.shared_attn.", "layer3.shared_attn."))
               for k in model.state_dict() if ".attn" in k or "shared_attn" in k)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for batch in (4, 3):
        loss = F.cross_entropy(model(feature_map(batch, 3, 32, 32)), torch.arange(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)


def test_bad_options_are_one_line_errors():
    cases = [("simam", {"e_lambda": 0}, "e_lambda"), ("simam", {"e_lambda": float("nan")}, "finite number > 0"),
             ("gct", {"eps": float("inf")}, "eps must be a finite number > 0"), ("gc", {"fusion": "mul"}, "fusion"),
             ("gc", {"pooling": "max"}, "pooling"), ("coord", {"reduction": 0}, "reduction"),
             ("gct", {"mode": "l3"}, "mode"), ("triplet", {"kernel_size": 4}, "kernel_size"),
             ("bam", {"combine": "cat"}, "combine"), ("fca", {"freq": "top32"}, "freq"),
             ("fca", {"dct_size": 5}, "dct_size")]
    for name, kwargs, key in cases:
        with pytest.raises(AttnlabError, match=rf"attention '{name}' rejected .*{key}") as info:
            attnlab.attention.create(name, 64, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(AttnlabError, match=r"channels \(24\) must be divisible by the 16 frequencies"):
        attnlab.attention.create("fca", 24)


# --- SimAM -------------------------------------------------------------------------------------------------------

def test_simam_is_the_energy_formula_by_hand():
    # Official code ZjjConan/SimAM (networks/attentions/simam_module.py): no parameters; var over H*W - 1.
    assert n_params(SimAM(64)) == 0
    x = feature_map(2, 3, 3, 4)
    lam = 1e-4
    expected = torch.empty_like(x)
    for b in range(2):
        for c in range(3):
            vals = [float(v) for v in x[b, c].flatten()]
            mu = sum(vals) / len(vals)
            var = sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)
            for i in range(3):
                for j in range(4):
                    t = float(x[b, c, i, j])
                    energy_inv = (t - mu) ** 2 / (4 * (var + lam)) + 0.5  # 1 / e_t* of the paper's Eq. 6
                    expected[b, c, i, j] = t / (1 + math.exp(-energy_inv))
    torch.testing.assert_close(SimAM(3)(x), expected, rtol=1e-5, atol=1e-6)
    one = feature_map(2, 3, 1, 1)  # no other neuron: the gate is sigmoid(1/2), not NaN
    torch.testing.assert_close(SimAM(3)(one), one * torch.sigmoid(torch.tensor(0.5)))


# --- GC against timm ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fusion,pooling", [("add", "att"), ("scale", "att"), ("both", "att"), ("add", "avg")])
def test_gc_equals_timm(fusion, pooling):
    timm = pytest.importorskip("timm")
    c = 64
    ours = randomise(GlobalContext(c, fusion=fusion, pooling=pooling))
    theirs = timm.layers.GlobalContext(c, use_attn=pooling == "att", fuse_add=fusion in ("add", "both"),
                                       fuse_scale=fusion in ("scale", "both"), rd_ratio=1 / 16)
    for mlp in (theirs.mlp_add, theirs.mlp_scale):
        if mlp is not None:
            mlp.norm.eps = 1e-5  # timm's LayerNorm2d uses 1e-6, the official LN 1e-5 as ours
    names = {"conv_mask.": "conv_attn.", "add.": "mlp_add.", "scale.": "mlp_scale."}
    sd = {next(v + k[len(p):] for p, v in names.items() if k.startswith(p)): t for k, t in ours.state_dict().items()}
    theirs.load_state_dict(sd, strict=True)
    for shape in [(2, c, 9, 9), (2, c, 5, 11)]:
        x = feature_map(*shape)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_gc_official_defaults_start_as_identity_and_count():
    # Official xvjiarui/GCNet ContextBlock(inplanes, ratio=1/16, 'att', ('channel_add',)): conv_mask C + 1, and
    # C/r (C + 1) + 2 C/r + C/r C + C in the add transform (LayerNorm([C/r, 1, 1]) has 2 C/r).
    c, h = 256, 16
    m = GlobalContext(c)
    assert n_params(m) == (c + 1) + (h * (c + 1) + 2 * h + h * c + c)
    model = attnlab.create_model("resnet20", attention="gc")  # init_weights() after the model's kaiming init
    x = feature_map(2, 64, 8, 8)
    torch.testing.assert_close(model.layer3[0].attn(x), x)


# --- Coordinate Attention against timm ---------------------------------------------------------------------------

@pytest.mark.parametrize("c", [16, 64, 512])
def test_coord_equals_timm_with_the_official_width(c):
    timm = pytest.importorskip("timm")
    ours = randomise(CoordAttention(c))
    hidden = max(8, c // 32)  # official houqb/CoordAttention: mip = max(8, inp // reduction), reduction = 32
    assert ours.conv1.out_channels == hidden
    # official parameter count: conv1 (C m + m), BN (2 m), conv_h and conv_w (m C + C each)
    assert n_params(ours) == c * hidden + hidden + 2 * hidden + 2 * (hidden * c + c)
    theirs = timm.layers.coord_attn.CoordAttn(c, rd_channels=hidden, bias=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for mode in ("eval", "train"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        for shape in [(2, c, 6, 6), (2, c, 4, 9)]:
            x = feature_map(*shape)
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# --- GCT ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["l2", "l1"])
def test_gct_by_hand(mode):
    # Official z-x-yang/GCT: alpha, gamma, beta of shape (1, C, 1, 1): 3 C parameters; gate 1 at init.
    c = 4
    m = GCT(c, mode=mode)
    assert n_params(m) == 3 * c
    x = feature_map(2, c, 3, 2)
    torch.testing.assert_close(m(x), x)
    randomise(m)
    a, g, be = (p.flatten().tolist() for p in (m.alpha, m.gamma, m.beta))
    eps = 1e-5
    expected = torch.empty_like(x)
    for b in range(2):
        vals = [[float(v) for v in x[b, k].flatten()] for k in range(c)]
        if mode == "l2":
            s = [a[k] * math.sqrt(sum(v * v for v in vals[k]) + eps) for k in range(c)]
            norm = math.sqrt(sum(v * v for v in s) / c + eps)
        else:
            s = [a[k] * sum(abs(v) for v in vals[k]) for k in range(c)]
            norm = sum(abs(v) for v in s) / c + eps
        for k in range(c):
            expected[b, k] = x[b, k] * (1 + math.tanh(g[k] * s[k] / norm + be[k]))
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)


# --- Triplet attention -------------------------------------------------------------------------------------------

def test_triplet_parameter_count_is_the_papers():
    # Official landskape-ai/triplet-attention: three AttentionGates, each conv 2->1 7x7 without bias + BN(1).
    assert n_params(TripletAttention(64)) == n_params(TripletAttention(2048)) == 3 * (2 * 49 + 2)
    plain = n_params(attnlab.create_model("resnet50"))
    assert n_params(attnlab.create_model("resnet50", attention="triplet")) - plain == 4800  # paper: +4.8K
    assert n_params(TripletAttention(64, no_spatial=True)) == 200


def test_triplet_by_hand():
    # 1x1-effective kernels (only the centre tap set): every gate is sigmoid(BN(a max + b mean)) pointwise.
    m = TripletAttention(3).eval()
    taps = {"hw": (0.7, -0.4), "cw": (-0.3, 0.9), "hc": (0.5, 0.2)}
    with torch.no_grad():
        for name, (wa, wb) in taps.items():
            gate = getattr(m, name)
            gate.conv.weight.zero_()
            gate.conv.weight[0, 0, 3, 3], gate.conv.weight[0, 1, 3, 3] = wa, wb
    x = feature_map(2, 3, 4, 5)
    s = math.sqrt(1 + 1e-5)  # eval BN with running mean 0, var 1, weight 1, bias 0

    def gate(dim, wa, wb):  # pooled over `dim`, kept as a broadcastable axis
        return torch.sigmoid((wa * x.amax(dim, keepdim=True) + wb * x.mean(dim, keepdim=True)) / s)

    expected = (x * gate(1, *taps["hw"]) + x * gate(2, *taps["cw"]) + x * gate(3, *taps["hc"])) / 3
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)


# --- BAM ---------------------------------------------------------------------------------------------------------

def test_bam_parameter_count_is_the_official_codes():
    # Official Jongchan/attention-module MODELS/bam.py, r = 16, two dilated 3x3 convs: ChannelGate Linear(C, C/r),
    # BN1d, Linear(C/r, C); SpatialGate conv1x1 C -> C/r, BN, 2 x (3x3 C/r -> C/r, BN), conv1x1 C/r -> 1; all biased.
    c = 256
    h = c // 16
    channel = (c * h + h) + 2 * h + (h * c + c)
    spatial = (c * h + h) + 2 * h + 2 * (9 * h * h + h + 2 * h) + (h + 1)
    assert n_params(BAM(c)) == channel + spatial == 17_361


@pytest.mark.parametrize("combine", ["add", "mul"])
def test_bam_gate_by_hand(combine):
    c = 4
    m = randomise(BAM(c, reduction=2)).eval()
    bc, bs = torch.tensor([0.3, -1.0, 2.0, 0.5]), -0.7
    with torch.no_grad():  # the last layer of each branch reduced to its bias: M_c = bc, M_s = bs everywhere
        m.channel[-1].weight.zero_()
        m.channel[-1].bias.copy_(bc)
        m.spatial[-1].weight.zero_()
        m.spatial[-1].bias.fill_(bs)
    x = feature_map(2, c, 6, 5)
    for k in range(c):
        z = bc[k].item() + bs if combine == "add" else bc[k].item() * bs
        m.combine = combine
        torch.testing.assert_close(m(x)[:, k], x[:, k] * (1 + 1 / (1 + math.exp(-z))), rtol=1e-5, atol=1e-6)
    assert m.spatial[3].dilation == (4, 4) and m.spatial[6].dilation == (4, 4)


# --- FcaNet ------------------------------------------------------------------------------------------------------

def test_fca_dct_basis_is_orthonormal_and_dc_is_scaled_gap():
    basis = torch.stack([dct_basis(u, 7) for u in range(7)])
    torch.testing.assert_close(basis @ basis.T, torch.eye(7), atol=1e-6, rtol=0)
    assert torch.allclose(dct_basis(0, 7), torch.full((7,), 1 / math.sqrt(7)))
    # Official cfzd/FcaNet (model/layer.py): fc without biases, 2 C^2 / r parameters, the DCT is a buffer.
    m = FcaAttention(256)
    assert n_params(m) == 2 * 256 * 16 and "dct" not in m.state_dict()
    plain = n_params(attnlab.create_model("resnet50"))
    assert n_params(attnlab.create_model("resnet50", attention="fca")) == 28_071_976  # paper: FcaNet-50 28.07M
    assert plain == 25_557_032


def test_fca_by_hand():
    c, k = 16, 7
    m = randomise(FcaAttention(c, reduction=4))
    x = feature_map(2, c, k, k)
    y = torch.empty(2, c)
    for b in range(2):
        for ch in range(c):  # 16 frequencies, one channel each: channel ch uses the ch-th best frequency
            u, v = TOP_FREQUENCIES[ch]
            total = 0.0
            for i in range(k):
                for j in range(k):
                    bu = math.cos(math.pi * u * (i + 0.5) / k) / math.sqrt(k) * (math.sqrt(2) if u else 1)
                    bv = math.cos(math.pi * v * (j + 0.5) / k) / math.sqrt(k) * (math.sqrt(2) if v else 1)
                    total += float(x[b, ch, i, j]) * bu * bv
            y[b, ch] = total
    w1, w2 = m.fc1.weight.flatten(1), m.fc2.weight.flatten(1)
    s = torch.sigmoid(torch.relu(y @ w1.T) @ w2.T)
    torch.testing.assert_close(m(x), x * s[:, :, None, None], rtol=1e-5, atol=1e-5)
    # Another size is average-pooled to 7x7 first.
    x14 = feature_map(2, c, 14, 14).abs() + 0.5  # positive, so the gate is output / input
    pooled = F.avg_pool2d(x14, 2)
    torch.testing.assert_close((m(x14) / x14)[..., 0, 0], (m(pooled) / pooled)[..., 0, 0], rtol=1e-4, atol=1e-6)
