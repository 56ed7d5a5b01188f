"""Backbones: torchvision and timm equality, the papers' parameter counts and FLOPs, every model x attention,
hierarchical features, attention placement and sharing."""
import re

import pytest
import torch

from attn_helpers import randomise_bn

import attnlab
from attnlab.attention.eca import eca_kernel_size
from attnlab.errors import AttnlabError
from attnlab.models import create_model, default_input_size, list_models
from attnlab.measure import count_flops, count_params


def image(size, batch=2, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ torchvision and timm equality

@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_weights_load_and_give_same_logits(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = randomise_bn(getattr(torchvision.models, name)()).eval()
    ours = randomise_bn(create_model(name), seed=1).eval()
    ours_weights = {k: v.clone() for k, v in ours.state_dict().items()}
    x = image(64)
    ours.load_state_dict(tv.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-4, atol=1e-5)
    # ... and the reverse direction: our own initialisation loaded into torchvision's model.
    tv.load_state_dict(ours_weights, strict=True)
    ours.load_state_dict(ours_weights, strict=True)
    with torch.no_grad():
        out = tv(x)
        torch.testing.assert_close(out, ours(x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, torch.zeros_like(out))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_peak_activation_memory_equals_torchvision(name):
    # Deterministic (live tensor bytes, no timing): our blocks free each activation as early as torchvision's.
    torchvision = pytest.importorskip("torchvision")
    from attnlab.measure import measure_peak_memory
    ours = measure_peak_memory(create_model(name), 64, batch_size=2)["peak_bytes"]
    assert ours == measure_peak_memory(getattr(torchvision.models, name)(), 64, batch_size=2)["peak_bytes"]


def timm_key(key):
    """Our state_dict key -> timm ResNet's: the slot is `se`, timm's CBAM wraps its 7x7 conv and BN."""
    return (key.replace(".attn.", ".se.").replace("spatial.conv.", "spatial.conv.conv.")
            .replace("spatial.bn.", "spatial.conv.bn."))


@pytest.mark.parametrize("attention", ["se", "cbam", "eca"])
def test_attention_resnet50_equals_timm(attention):
    timm = pytest.importorskip("timm")
    from functools import partial
    from timm.layers.cbam import CbamModule
    # timm's CBAM MLP defaults to no bias; ours follows the official code (bias) -> build timm's with bias.
    layer = partial(CbamModule, mlp_bias=True) if attention == "cbam" else attention
    theirs = timm.create_model("resnet50", block_args=dict(attn_layer=layer)).eval()
    ours = randomise_bn(create_model("resnet50", attention=attention)).eval()
    theirs.load_state_dict({timm_key(k): v for k, v in ours.state_dict().items()}, strict=True)
    x = image(64, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ parameter counts and FLOPs

def expected_params(block, depths, planes, stem, num_classes, shortcut="B", attention="none"):
    """Parameter count derived layer by layer from the papers' architecture tables (no model built)."""
    stem_width = planes[0] if stem == "cifar" and planes[0] == 16 else 64
    total = 3 * stem_width * (9 if stem == "cifar" else 49) + 2 * stem_width
    cin = stem_width
    for i, (depth, p) in enumerate(zip(depths, planes)):
        out = p * (4 if block == "bottleneck" else 1)
        for j in range(depth):
            if block == "bottleneck":
                total += cin * p + 9 * p * p + p * out + 2 * (p + p + out)
            else:
                total += 9 * cin * p + 9 * p * p + 2 * (p + p)
            if (cin != out or (i > 0 and j == 0)) and shortcut == "B":
                total += cin * out + 2 * out
            hidden = out // 16
            if attention in ("se", "cbam"):  # two 1x1 layers with biases
                total += 2 * out * hidden + hidden + out
            if attention == "cbam":  # 7x7 conv (2 -> 1, no bias) + BN(1)
                total += 2 * 49 + 2
            if attention == "eca":  # one 1-D conv of size k(C), no bias
                total += eca_kernel_size(out)
            cin = out
    return total + cin * num_classes + num_classes


CIFAR3 = (16, 32, 64)
IMNET = (64, 128, 256, 512)
PARAM_CASES = [
    # name, classes, attention, paper's count (M), derivation
    ("resnet20", 10, "none", 0.27, ("basic", (3, 3, 3), CIFAR3, "cifar", "A")),
    ("resnet56", 10, "none", 0.85, ("basic", (9, 9, 9), CIFAR3, "cifar", "A")),
    ("resnet110", 10, "none", 1.73, ("basic", (18, 18, 18), CIFAR3, "cifar", "A")),
    ("resnet164", 100, "none", 1.73, ("bottleneck", (18, 18, 18), CIFAR3, "cifar", "B")),
    ("cifar_resnet18", 10, "none", 11.17, ("basic", (2, 2, 2, 2), IMNET, "cifar", "B")),
    ("resnet50", 1000, "none", 25.56, ("bottleneck", (3, 4, 6, 3), IMNET, "imagenet", "B")),
    ("resnet50", 1000, "se", 28.09, ("bottleneck", (3, 4, 6, 3), IMNET, "imagenet", "B")),
    ("resnet50", 1000, "cbam", 28.09, ("bottleneck", (3, 4, 6, 3), IMNET, "imagenet", "B")),
    ("resnet50", 1000, "eca", 25.56, ("bottleneck", (3, 4, 6, 3), IMNET, "imagenet", "B")),
]


@pytest.mark.parametrize("name,classes,attention,millions,derivation", PARAM_CASES)
def test_parameter_counts_match_the_papers(name, classes, attention, millions, derivation):
    model = create_model(name, num_classes=classes, attention=attention)
    n = count_params(model)
    assert round(n / 1e6, 2) == millions
    block, depths, planes, stem, shortcut = derivation
    assert n == expected_params(block, depths, planes, stem, classes, shortcut, attention)


def test_published_exact_counts():
    # torchvision's documented ResNet-50 / ResNet-18 counts and the usual CIFAR ResNet-20 (option A) count.
    assert count_params(create_model("resnet50")) == 25_557_032
    assert count_params(create_model("resnet18")) == 11_689_512
    assert count_params(create_model("resnet20")) == 269_722


def test_resnet50_flops_at_224():
    flops = count_flops(create_model("resnet50"), 224)
    assert abs(flops - 8.2e9) / 8.2e9 < 0.02  # 4.1 GMACs; FLOPs = 2 x MACs
    assert flops % 2 == 0


def test_se_and_eca_add_only_their_tiny_convs_to_the_flops():
    # At 64x64 the ResNet-50 stage outputs are 16, 8, 4, 2 pixels wide; channels 256..2048.
    stages = [(256, 3, 16), (512, 4, 8), (1024, 6, 4), (2048, 3, 2)]
    base = count_flops(create_model("resnet50"), 64)
    se = sum(n * 2 * (2 * c * (c // 16)) for c, n, _ in stages)          # two 1x1 convs on a 1x1 map
    eca = sum(n * 2 * c * eca_kernel_size(c) for c, n, _ in stages)      # one 1-D conv over C channels
    cbam = sum(n * (2 * 2 * (2 * c * (c // 16)) + 2 * 2 * 49 * hw * hw) for c, n, hw in stages)  # MLP twice + 7x7
    assert count_flops(create_model("resnet50", attention="se"), 64) - base == se
    assert count_flops(create_model("resnet50", attention="eca"), 64) - base == eca
    assert count_flops(create_model("resnet50", attention="cbam"), 64) - base == cbam
    # Next to ResNet-50's 8.2 GFLOPs at 224 (these increments do not depend on the resolution): ~0.
    assert se < 1e-3 * 8.2e9 and eca < 1e-4 * 8.2e9


# ------------------------------------------------------------------ every model x every attention

FULL = ("resnet20", "resnet18", "resnet50")  # one per family/block type gets every attention


def model_attention_cases():
    others = [a for a in attnlab.attention.names() if a != "none"]
    cases = [(name, a) for name in FULL for a in attnlab.attention.names()]
    rest = [name for name in list_models() if name not in FULL]
    # The deeper/wider ones: rotating through the registry until every model and every attention had a turn.
    for i in range(max(len(rest), len(others))):
        cases.append((rest[i % len(rest)], others[i % len(others)]))
    return cases


@pytest.mark.parametrize("name,attention", model_attention_cases())
def test_every_model_and_attention_builds_and_runs(name, attention):
    torch.manual_seed(0)
    size = 32 if default_input_size(name) == 32 else 64
    model = create_model(name, num_classes=7, attention=attention).eval()
    if attention != "none":
        assert model.attention_modules(), f"{attention} placed nowhere in {name}"
    with torch.no_grad():
        logits = model(image(size, batch=1))
    assert logits.shape == (1, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("attention", attnlab.attention.names())
def test_every_attention_trains_in_a_block(attention):
    # Blocks add the shortcut in place (as torchvision does): that must leave every module's backward intact.
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=3, attention=attention).train()
    loss = model(image(32)).logsumexp(1).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_every_attention_lands_in_the_models_that_run_everything():
    cases = set(model_attention_cases())
    for a in attnlab.attention.names():
        assert sum((m, a) in cases for m in list_models()) >= len(FULL) + (a != "none")
    assert {m for m, _ in cases} == set(list_models())


# ------------------------------------------------------------------ hierarchical features

@pytest.mark.parametrize("name,size,stage_shapes", [
    ("resnet20", 32, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    ("resnet50", 64, [(256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 2, 2)]),
])
def test_hierarchical_features(name, size, stage_shapes):
    model = create_model(name, attention="se").eval()
    x = image(size)
    with torch.no_grad():
        plain = model(x)
        logits_s, feats_s = model(x, features="stages")
        logits_b, feats_b = model(x, features="blocks")
    torch.testing.assert_close(logits_s, plain, rtol=0, atol=0)
    torch.testing.assert_close(logits_b, plain, rtol=0, atol=0)
    assert [tuple(s.shape[1:]) for s in feats_b["stages"]] == stage_shapes
    assert feats_s["blocks"] == []
    assert feats_b["stem"].shape[1] == model.conv1.out_channels
    pairs = feats_b["blocks"]
    assert len(pairs) == sum(model.depths) == sum(len(s) for s in model.stages())
    assert pairs[0][0] is feats_b["stem"]
    for (_, out), (nxt, _) in zip(pairs, pairs[1:]):
        assert out is nxt  # each block's output is the next block's input
    ends = [sum(model.depths[:i + 1]) - 1 for i in range(len(model.depths))]
    for stage_out, i in zip(feats_b["stages"], ends):
        assert pairs[i][1] is stage_out
    with pytest.raises(AttnlabError, match="features must be"):
        model(x, features="layers")


# ------------------------------------------------------------------ placement and sharing

def attention_mask(model, cls):
    return [[isinstance(b.attn, cls) for b in stage] for stage in model.stages()]


SE = attnlab.attention.get("se")


@pytest.mark.parametrize("blocks,expected", [
    ("all", [[1] * 3, [1] * 4, [1] * 6, [1] * 3]),
    ([2, 3], [[0] * 3, [0] * 4, [1] * 6, [1] * 3]),
    ("2,3", [[0] * 3, [0] * 4, [1] * 6, [1] * 3]),
    ("3", [[0] * 3, [0] * 4, [0] * 6, [1] * 3]),
    ([-1], [[0] * 3, [0] * 4, [0] * 6, [1] * 3]),
    ("-1", [[0] * 3, [0] * 4, [0] * 6, [1] * 3]),  # as a string too (on the command line): not bits
    ("-1,-2", [[0] * 3, [0] * 4, [1] * 6, [1] * 3]),
    ("100-1011-010011-011", [[1, 0, 0], [1, 0, 1, 1], [0, 1, 0, 0, 1, 1], [0, 1, 1]]),
    (["100", "1011", "010011", "011"], [[1, 0, 0], [1, 0, 1, 1], [0, 1, 0, 0, 1, 1], [0, 1, 1]]),
    ({0: "all", 2: [1, 5]}, [[1] * 3, [0] * 4, [0, 1, 0, 0, 0, 1], [0] * 3]),
    ({"3": 0}, [[0] * 3, [0] * 4, [0] * 6, [1, 0, 0]]),
])
def test_blocks_place_attention_exactly_where_asked(blocks, expected):
    model = create_model("resnet50", num_classes=3, attention="se", blocks=blocks)
    assert attention_mask(model, SE) == [[bool(v) for v in s] for s in expected]
    n_se = sum(map(sum, expected))
    assert len(model.attention_modules()) == n_se
    plain = count_params(create_model("resnet50", num_classes=3))
    per_block = {c: 2 * c * (c // 16) + c // 16 + c for c in (256, 512, 1024, 2048)}
    widths = (256, 512, 1024, 2048)
    assert count_params(model) == plain + sum(per_block[w] * sum(s) for w, s in zip(widths, expected))


@pytest.mark.parametrize("blocks,message", [
    ("9", "stage 9 out of range; this model has stages 0..3"),
    ("1011", "bit strings must be one per stage"),
    ("10-1011-010011-011", "bit strings must be one per stage"),
    ({2: [6]}, "stage 2 has blocks 0..5, got block 6"),
    ({2: "some"}, "wants 'all' or a list"),
    ("layer3", "not understood"),
    (2.5, "not understood"),
    ("", "selects no block"),  # would build a model without attention, saying nothing
    (" , ", "selects no block"),
    ([], "selects no block"),
])
def test_bad_blocks_give_one_line_errors(blocks, message):
    with pytest.raises(AttnlabError, match=message) as info:
        create_model("resnet50", attention="se", blocks=blocks)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, message", [
    # bool("false") is True: a string read as a flag would share SE although asked not to.
    (dict(attention="se", share="false"), "share must be True or False, got 'false'"),
    (dict(attention="se", share=1), "share must be True or False, got 1"),
    (dict(zero_init_residual="yes"), "zero_init_residual must be True or False, got 'yes'"),
    (dict(attention="se", attention_kwargs="reduction=4"), "attention_kwargs must be a dict, got str"),
    (dict(attention="tdam", attention_kwargs={"time_steps": 1.5}), "time_steps must be an integer >= 1, got 1.5"),
    (dict(attention="tdam", attention_kwargs={"step_bn": "no"}), "step_bn must be true or false, got 'no'"),
    (dict(attention="dia", attention_kwargs={"reduction": 2.5}), "reduction must be an integer >= 1, got 2.5"),
])
def test_option_values_are_checked_not_converted(kwargs, message):
    with pytest.raises(AttnlabError, match=message):
        create_model("resnet20", **kwargs)
    assert create_model("resnet20", attention="se", share=False, blocks="000-000-000")  # no block, said explicitly
    with pytest.raises(AttnlabError, match="blocks must be True or False"):
        create_model("resnet20").forward_features(torch.zeros(1, 3, 32, 32), blocks="no")


@pytest.mark.parametrize("channels", [0, -8, 64.0, "64", True])
def test_a_module_needs_a_whole_positive_channel_count(channels):
    with pytest.raises(AttnlabError, match=f"attention 'se': channels must be an integer >= 1, got {channels!r}"):
        attnlab.attention.create("se", channels)


def test_shared_attention_is_one_module_per_stage():
    blocks = "100-1011-010011-011"
    shared = create_model("resnet50", num_classes=3, attention="se", blocks=blocks, share=True)
    separate = create_model("resnet50", num_classes=3, attention="se", blocks=blocks)
    plain = count_params(create_model("resnet50", num_classes=3))
    per_block = {c: 2 * c * (c // 16) + c // 16 + c for c in (256, 512, 1024, 2048)}
    assert count_params(shared) == plain + sum(per_block.values())  # every stage has >= 1 connected block
    assert count_params(separate) == plain + per_block[256] + 3 * per_block[512] + 3 * per_block[1024] \
        + 2 * per_block[2048]
    assert len(shared.attention_modules()) == 4
    for stage in shared.stages():
        users = [b.attn for b in stage if isinstance(b.attn, SE)]
        assert all(u is stage.shared_attn for u in users)
    keys = [k for k in shared.state_dict() if "fc1.weight" in k]
    assert keys == [f"layer{i}.shared_attn.fc1.weight" for i in range(1, 5)]
    # A fresh shared model loads the state_dict strictly and then computes the same logits.
    clone = create_model("resnet50", num_classes=3, attention="se", blocks=blocks, share=True)
    clone.load_state_dict(shared.state_dict(), strict=True)
    x = image(64, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(x), shared.eval()(x))
    # The unshared layout does not fit: different keys.
    with pytest.raises(RuntimeError):
        separate.load_state_dict(shared.state_dict(), strict=True)


def test_option_a_shortcut_is_parameter_free_zero_padding():
    model = create_model("resnet20").eval()
    block = model.layer2[0]
    assert not list(block.downsample.parameters())
    x = torch.randn(1, 16, 8, 8)
    y = block.shortcut(x)
    assert y.shape == (1, 32, 4, 4)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert (y[:, 16:] == 0).all()


@pytest.mark.parametrize("bad", [0, -3, "ten", 2.5])
def test_bad_num_classes(bad):
    with pytest.raises(AttnlabError, match="num_classes must be an integer >= 1"):
        create_model("resnet20", num_classes=bad)


@pytest.mark.parametrize("kwargs, message", [
    ({"foo": 1}, "model 'resnet20' has no option 'foo'; valid options: planes, stem, stem_width, zero_init_residual"),
    ({"depths": (1, 1, 1)}, "model 'resnet20' has no option 'depths'"),  # its registration fixes the depths
    ({"planes": (8, 16)}, "planes needs one width per stage (3), got (8, 16)"),
    ({"stem_width": 0}, "stem_width must be an integer >= 1, got 0"),
    ({"attention_kwargs": "reduction=4"}, "attention_kwargs must be a dict, got str 'reduction=4'"),
])
def test_model_options_are_checked_in_one_line(kwargs, message):
    with pytest.raises(AttnlabError, match=re.escape(message)):
        create_model("resnet20", **kwargs)
    assert create_model("resnet20", planes=(8, 16, 32)).fc.in_features == 32  # a width per stage is an option


def test_unknown_model_lists_choices():
    with pytest.raises(AttnlabError, match=r"unknown model 'resnet5'.*valid choices: .*resnet50"):
        create_model("resnet5")
