"""attnlab.attach on torchvision and timm ResNets (random init, no downloads): slot, placement, sharing, refusals."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.errors import AttnlabError

tv = pytest.importorskip("torchvision.models")
timm = pytest.importorskip("timm")

BUILDERS = {
    "tv-resnet18": lambda: tv.resnet18(weights=None, num_classes=10),
    "tv-resnet50": lambda: tv.resnet50(weights=None, num_classes=10),
    "timm-resnet18": lambda: timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False),
}
SLOT = {"tv-resnet18": "attn", "tv-resnet50": "attn", "timm-resnet18": "se"}


def built(name, seed=0):
    torch.manual_seed(seed)
    return BUILDERS[name]().eval()


def images(batch, seed=1, size=64):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def slots(model, name):
    return [getattr(b, SLOT[name], None) for s in ("layer1", "layer2", "layer3", "layer4") for b in getattr(model, s)]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_none_leaves_the_model_unchanged(name):
    plain = built(name)
    model = attnlab.attach(copy.deepcopy(plain), attention="none")
    assert model.state_dict().keys() == plain.state_dict().keys()
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    model.train(), plain.train()
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("attention", ["se", "gc", "triplet"])
def test_two_training_steps_at_two_batch_sizes(name, attention):
    model = attnlab.attach(built(name), attention=attention).train()
    mods = [m for m in slots(model, name) if m is not None and not isinstance(m, torch.nn.Identity)]
    assert len(mods) == (16 if name == "tv-resnet50" else 8)
    assert all(isinstance(m, attnlab.attention.get(attention)) for m in mods)
    before = [p.detach().clone() for m in mods for p in m.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for batch in (4, 3):
        loss = F.cross_entropy(model(images(batch, seed=batch)), torch.arange(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    after = [p for m in mods for p in m.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the modules are in the graph and train


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_module_sits_after_the_last_bn_before_the_addition(name):
    model = attnlab.attach(built(name), attention="se")
    block = model.layer2[0]
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    seen = {}
    last_bn.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o.detach().clone()))
    getattr(block, SLOT[name]).register_forward_hook(
        lambda m, i, o: seen.update(inp=i[0].detach().clone(), out=o.detach().clone()))
    block.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach().clone(), y=o.detach().clone()))
    with torch.no_grad():
        model(images(2))
        shortcut = block.downsample(seen["x"])
    torch.testing.assert_close(seen["inp"], seen["bn"])  # the module's input is the last BN's output
    torch.testing.assert_close(seen["y"], torch.relu(seen["out"] + shortcut))  # its output is added, then ReLU


def test_placement_strings_and_sharing():
    model = attnlab.attach(built("tv-resnet50"), attention="eca", blocks="001-0001-000001-000")
    got = ["".join("0" if isinstance(b.attn, torch.nn.Identity) else "1" for b in getattr(model, s))
           for s in ("layer1", "layer2", "layer3", "layer4")]
    assert got == ["001", "0001", "000001", "000"]
    model = attnlab.attach(built("tv-resnet18"), attention="cbam", blocks="2,3", share=True)
    assert isinstance(model.layer1[0].attn, torch.nn.Identity)
    assert model.layer3[0].attn is model.layer3[1].attn and model.layer3[0].attn is not model.layer4[0].attn
    keys = [k for k in model.state_dict() if ".attn." in k]
    assert keys and all(k.startswith(("layer3.0.attn.", "layer4.0.attn.")) for k in keys)
    model = attnlab.attach(built("timm-resnet18"), attention="simam", blocks=[3])
    assert model.layer4[1].se is not None and model.layer3[1].se is None
    with torch.no_grad():
        assert model(images(1)).shape == (1, 10)
    gc4 = attnlab.attach(built("tv-resnet18"), attention="gc", attention_kwargs={"reduction": 4})
    assert gc4.layer1[0].attn.add.fc1.out_channels == 16
    copy.deepcopy(gc4)  # EMA copies the model
    buffer = io.BytesIO()
    torch.save(gc4, buffer)  # whole-model pickling finds the block classes
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(images(1)), gc4.eval()(images(1)))
    # A model given `none` first can take a module afterwards.
    model = attnlab.attach(attnlab.attach(built("tv-resnet18"), "none"), "se", blocks=[0])
    assert isinstance(model.layer1[0].attn, attnlab.attention.get("se"))


def test_refusals_are_one_line():
    cases = [
        (lambda: attnlab.attach(tv.mobilenet_v3_small(weights=None), "se"), r"attach supports torchvision and timm "
                                                                       r"ResNets .* not torchvision\.models"),
        (lambda: attnlab.attach(attnlab.create_model("resnet20"), "se"), r"not attnlab\.models\.resnet\.ResNet"),
        (lambda: attnlab.attach(built("tv-resnet18"), attention="tdam"), r"'tdam' re-runs its block"),
        (lambda: attnlab.attach(built("tv-resnet18"), attention="sse"), r"unknown attention 'sse'"),
        (lambda: attnlab.attach(built("tv-resnet18"), "se", blocks="1-1"), r"blocks: bit strings"),
        (lambda: attnlab.attach(built("tv-resnet18"), attention="se", attention_kwargs={"ratio": 2}),
         r"'se' has no option 'ratio'"),
        (lambda: attnlab.attach(timm.create_model("seresnet18", pretrained=False), "eca"),
         r"layer1\[0\] already holds"),
        (lambda: attnlab.attach(attnlab.attach(built("tv-resnet18"), "se"), "se"),
         r"already holds an attention module"),
    ]
    for call, pattern in cases:
        with pytest.raises(AttnlabError, match=pattern) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["tv-resnet18", "timm-resnet18"])
def test_a_refused_attach_leaves_the_model_as_it_was(name):
    model, x = built(name), images(2)
    with torch.no_grad():
        before, logits = copy.deepcopy(model.state_dict()), model(x)
    classes = [type(b) for s in ("layer1", "layer2", "layer3", "layer4") for b in getattr(model, s)]
    for kwargs, pattern in (({"reduction": 0}, r"reduction must be an integer >= 1"),  # fails at the first block
                            ([1], r"attention_kwargs must be a dict, got list \[1\]"),
                            ("reduction=4", r"attention_kwargs must be a dict, got str")):
        with pytest.raises(AttnlabError, match=pattern):
            attnlab.attach(model, "se", attention_kwargs=kwargs)
        assert [type(b) for s in ("layer1", "layer2", "layer3", "layer4") for b in getattr(model, s)] == classes
        assert model.state_dict().keys() == before.keys()
        with torch.no_grad():
            assert torch.equal(model(x), logits)


def test_timm_kind_attaches_too():
    model = attnlab.attach(built("tv-resnet18"), attention="timm:eca")
    with torch.no_grad():
        assert model(images(2)).shape == (2, 10)
