"""SE, CBAM and ECA against timm's implementations (weights copied), the ECA kernel rule, the registry's errors."""
import math

import pytest
import torch

from attn_helpers import randomise_bn

import attnlab
from attnlab.attention.cbam import CBAM
from attnlab.attention.eca import ECA, eca_kernel_size
from attnlab.attention.se import SE
from attnlab.errors import AttnlabError

timm = pytest.importorskip("timm")
from timm.layers.cbam import CbamModule  # noqa: E402
from timm.layers.eca import EcaModule  # noqa: E402
from timm.layers.squeeze_excite import SEModule  # noqa: E402


def feature_map(c, seed=1, size=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, c, size, size, generator=g)


@pytest.mark.parametrize("channels,rd", [(256, None), (2048, None), (64, 4)])
def test_se_equals_timm(channels, rd):
    # timm rounds C/16 up to a multiple of 8: equal to C // 16 for C = 256, 2048; pass it explicitly for C = 64.
    ours = SE(channels)
    theirs = SEModule(channels, rd_channels=rd)
    assert ours.fc1.out_channels == theirs.fc1.out_channels == channels // 16
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = feature_map(channels)
    out = ours(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, theirs(x), rtol=1e-5, atol=1e-6)
    # The gate really acts: the output is not the input and differs per channel.
    assert not torch.allclose(out, x)


@pytest.mark.parametrize("bias", [True, False])
def test_cbam_equals_timm(bias):
    channels = 64
    ours = CBAM(channels, bias=bias)
    theirs = CbamModule(channels, mlp_bias=bias)  # timm's default is mlp_bias=False
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.5)
    randomise_bn(ours)
    sd = ours.state_dict()
    mapped = {k.replace("spatial.conv.", "spatial.conv.conv.").replace("spatial.bn.", "spatial.conv.bn."): v
              for k, v in sd.items()}
    theirs.load_state_dict(mapped, strict=True)
    x = feature_map(channels)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    # Train mode too: the spatial BN then normalises with the batch's statistics in both.
    ours.train(), theirs.train()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    assert (ours.channel.fc1.bias is not None) == bias


@pytest.mark.parametrize("channels", [16, 32, 64, 128, 256, 512, 1024, 2048])
def test_eca_equals_timm(channels):
    ours, theirs = ECA(channels), EcaModule(channels)
    assert ours.kernel_size == theirs.conv.kernel_size[0]
    with torch.no_grad():
        ours.conv.weight.normal_()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = feature_map(channels, size=5)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_eca_kernel_is_the_papers_nearest_odd():
    # Paper Eq. 12 with gamma=2, b=1: t = (log2 C + 1) / 2, k = nearest odd to t. Worked by hand:
    #   C=16: t=2.5 -> 3   C=64: 3.5 -> 3   C=128: 4.0 -> 3|5 tie -> 5   C=256: 4.5 -> 5
    #   C=512: 5.0 -> 5    C=1024: 5.5 -> 5   C=2048: 6.0 -> 5|7 tie -> 7
    # Ties (t an even integer) go up, as in the official code; ECA-ResNet-50's stages thus use 5, 5, 5, 7.
    by_hand = {16: 3, 64: 3, 128: 5, 256: 5, 512: 5, 1024: 5, 2048: 7}
    for c, k in by_hand.items():
        assert eca_kernel_size(c) == k, c
        assert ECA(c).conv.kernel_size == (k,)

    def nearest_odd(t):  # independent check over more widths: closest odd integer, ties upwards
        below = 2 * math.floor((t - 1) / 2) + 1
        return below if t - below < below + 2 - t else below + 2

    for c in range(4, 4097):
        assert eca_kernel_size(c) == nearest_odd((math.log2(c) + 1) / 2), c


def test_eca_explicit_kernel_size():
    m = ECA(2048, kernel_size=3)
    assert m.conv.kernel_size == (3,)
    x = feature_map(2048, size=3)
    assert m(x).shape == x.shape


@pytest.mark.parametrize("name,module", [("se", SE), ("cbam", CBAM), ("eca", ECA)])
def test_registry_class_is_timm_attn_layer(name, module):
    cls = attnlab.attention.get(name)
    assert cls is module
    model = timm.create_model("resnet50", block_args=dict(attn_layer=cls), num_classes=10).eval()
    attn = [m for m in model.modules() if isinstance(m, module)]
    assert len(attn) == 16  # one per bottleneck of ResNet-50 (3 + 4 + 6 + 3)
    assert isinstance(model.layer3[2].se, module)
    assert attn[-1].registry_name == name
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_timm_with_our_se_has_our_parameter_count():
    theirs = timm.create_model("resnet50", block_args=dict(attn_layer=attnlab.attention.get("se")))
    ours = attnlab.create_model("resnet50", attention="se")
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())


def test_create_checks_names_and_options():
    assert {"none", "se", "cbam", "eca"} <= set(attnlab.attention.names())
    m = attnlab.attention.create("se", 128, reduction=8, bias=False)
    assert m.fc1.out_channels == 16 and m.fc1.bias is None
    with pytest.raises(AttnlabError, match=r"unknown attention 'sse'.*did you mean se.*valid choices: .*cbam"):
        attnlab.attention.get("sse")
    with pytest.raises(AttnlabError, match=r"'se' has no option 'ratio'; valid options: reduction, bias"):
        attnlab.attention.create("se", 64, ratio=8)
    bad_values = [("se", {"reduction": 0}, "reduction"), ("se", {"reduction": 2.5}, "reduction"),
                  ("se", {"bias": "yes"}, "bias"), ("cbam", {"kernel_size": 4}, "kernel_size"),
                  ("eca", {"kernel_size": 0}, "kernel_size"), ("eca", {"gamma": 0}, "gamma"),
                  ("eca", {"gamma": float("inf")}, "gamma"), ("eca", {"beta": float("nan")}, "gamma"),
                  ("tdam", {"time_steps": 1.5}, "time_steps"), ("dia", {"reduction": 2.5}, "reduction")]
    for name, kwargs, key in bad_values:
        with pytest.raises(AttnlabError, match=rf"attention '{name}' rejected .*{key} must be") as info:
            attnlab.attention.create(name, 64, **kwargs)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", attnlab.attention.names())
def test_every_module_takes_torch_factory_kwargs(name):
    # timm passes device=/dtype= to every attn_layer; they are not user options for check_kwargs.
    m = attnlab.attention.get(name)(64, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    with pytest.raises(AttnlabError, match="has no option 'dtype'"):
        attnlab.attention.check_kwargs(name, {"dtype": torch.float64})
