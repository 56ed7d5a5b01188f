"""``attention="timm:<kind>"``: timm's attention layers in attnlab's slot, the unfit kinds refused in one line."""
import inspect
import io
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.attention import from_timm
from attnlab.errors import AttnlabError

timm = pytest.importorskip("timm")
from timm.layers import create_attn  # noqa: E402

SHAPES = [(2, 48, 5, 9), (1, 48, 3, 3), (2, 64, 7, 7)]


def timm_kinds():
    """Every string timm's get_attn accepts, read from its source (so a new timm kind fails the next test)."""
    from timm.layers import get_attn

    return set(re.findall(r"attn_type == '(\w+)'", inspect.getsource(get_attn)))


def test_every_timm_kind_is_classified():
    assert timm_kinds() == set(from_timm.FITS) | set(from_timm.REFUSED)
    assert not set(from_timm.FITS) & set(from_timm.REFUSED)


@pytest.mark.parametrize("kind", sorted(from_timm.FITS))
def test_fitting_kind_keeps_the_shape_and_equals_timm(kind):
    cls = attnlab.attention.get(f"timm:{kind}")
    assert cls.registry_name == f"timm:{kind}" and attnlab.attention.get(f"TIMM:{kind.upper()}") is cls
    for shape in SHAPES:
        torch.manual_seed(0)
        ours = attnlab.attention.create(f"timm:{kind}", shape[1]).eval()
        theirs = create_attn(kind, shape[1]).eval()
        assert isinstance(ours, type(theirs)) or isinstance(ours, ours.timm_class)
        theirs.load_state_dict(ours.state_dict(), strict=True)  # timm's own keys
        x = torch.randn(*shape)
        with torch.no_grad():
            out = ours(x)
            assert out.shape == x.shape
            torch.testing.assert_close(out, theirs(x))


@pytest.mark.parametrize("kind", sorted(from_timm.REFUSED))
def test_unfit_kind_is_refused_in_one_line_and_really_does_not_fit(kind):
    with pytest.raises(AttnlabError, match=rf"'timm:{kind}' does not fit a residual block's slot: ") as info:
        attnlab.create_model("resnet20", attention=f"timm:{kind}")
    assert "\n" not in str(info.value)
    # The reason holds in the installed timm: with its defaults the layer does not build, or it fails (or changes
    # the shape) on one of the maps every fitting kind takes.
    fails = False
    for shape in SHAPES:
        try:
            x = torch.randn(*shape)
            fails |= create_attn(kind, shape[1]).eval()(x).shape != x.shape
        except (AssertionError, TypeError, RuntimeError, ValueError):
            fails = True
    assert fails


def test_unknown_kind_bad_option_and_missing_timm(monkeypatch):
    with pytest.raises(AttnlabError, match=r"unknown timm attention 'timm:gcc' \(did you mean timm:gc"):
        attnlab.attention.get("timm:gcc")
    with pytest.raises(AttnlabError, match=r"'timm:gc' has no option 'reduction'; valid options: use_attn,"):
        attnlab.create_model("resnet20", attention="timm:gc", attention_kwargs={"reduction": 8})
    with pytest.raises(AttnlabError, match=r"'timm:splat' rejected its options \{'radix': 0\}") as info:
        attnlab.attention.create("timm:splat", 64, radix=0)
    assert "\n" not in str(info.value)
    m = attnlab.attention.create("timm:gc", 64, rd_ratio=1 / 4, fuse_add=True)
    assert m.mlp_scale.fc1.out_channels == 16 and m.mlp_add is not None
    monkeypatch.setattr(from_timm, "_import_get_attn", lambda: None)
    from_timm._wrap.cache_clear()
    try:
        with pytest.raises(AttnlabError, match=r"^attention 'timm:gc' needs timm, which is not installed: pip"):
            attnlab.create_model("resnet20", attention="timm:gc")
        from attnlab.listing import list_attention
        assert "timm is not installed" in list_attention()[-1]
    finally:
        from_timm._wrap.cache_clear()


@pytest.mark.parametrize("kind", ["gca", "coord", "nl"])
def test_timm_kind_in_attnlab_model_placed_shared_and_trained(kind):
    torch.manual_seed(0)
    model = attnlab.create_model("resnet20", num_classes=10, attention=f"timm:{kind}", blocks="1,2")
    attn = model.attention_modules()
    assert len(attn) == 6 and not model.layer1[0].attn.__class__.__name__.startswith("Timm")
    if kind == "gca":  # timm's zero init of the add-fusion's last conv survives attnlab's kaiming init
        assert all(m.mlp_add.fc2.weight.abs().sum() == 0 for m in attn)
    shared = attnlab.create_model("resnet20", attention=f"timm:{kind}", share=True)
    assert len(shared.attention_modules()) == 3
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for batch in (4, 3):
        loss = F.cross_entropy(model(torch.randn(batch, 3, 32, 32)), torch.arange(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)


def test_timm_kind_as_timm_attn_layer_and_state_dict_round_trip():
    cls = attnlab.attention.get("timm:coord")
    model = timm.create_model("resnet18", num_classes=10, block_args=dict(attn_layer=cls)).eval()
    assert sum(isinstance(m, cls) for m in model.modules()) == 8
    ours = attnlab.create_model("resnet18", attention="timm:coord").eval()
    again = attnlab.create_model("resnet18", attention="timm:coord").eval()
    again.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    buffer = io.BytesIO()
    torch.save(ours, buffer)  # whole-model pickling finds the generated class
    buffer.seek(0)
    pickled = torch.load(buffer, weights_only=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x))
        torch.testing.assert_close(pickled(x), ours(x))
        assert model(x).shape == (1, 10)


def test_list_shows_timm_kinds_and_refusals():
    from attnlab.listing import list_attention

    text = "\n".join(list_attention())
    for name in from_timm.names():
        assert re.search(rf"^{re.escape(name)}\s", text, re.M), name
    for kind in from_timm.REFUSED:
        assert re.search(rf"^timm:{kind}\s+refused: ", text, re.M), kind
    assert "act_layer=ReLU" in text


def test_timm_kinds_in_a_bench_matrix(tmp_path):
    from attnlab.bench import load_matrix, run_matrix

    root = Path(__file__).resolve().parents[1]
    text = (root / "benchmarks" / "matrices" / "cpu_proxy.yaml").read_text()
    head = text.split("methods:")[0].replace("recipe: configs/", f"recipe: {root / 'configs'}/")
    path = tmp_path / "timm.yaml"
    path.write_text(head + "methods:\n  - {name: gc, overrides: {model.attention: 'timm:gc'}}\n"
                    "  - {name: coord, overrides: {model.attention: 'timm:coord', "
                    "model.attention_kwargs: {rd_ratio: 0.25}}}\nseeds: [0]\n")
    m = load_matrix(path)
    assert run_matrix(m, dry_run=True, results_root=tmp_path, log=lambda s: None)["config_errors"] == 0
    path.write_text(head + "methods:\n  - {name: halo, overrides: {model.attention: 'timm:halo'}}\nseeds: [0]\n")
    lines = []
    result = run_matrix(load_matrix(path), dry_run=True, results_root=tmp_path, log=lines.append)
    assert result["config_errors"] == 1 and any("does not fit a residual block's slot" in s for s in lines)


@pytest.mark.parametrize("name", attnlab.attention.names())
def test_a_class_built_directly_as_timm_does_checks_its_width(name):
    """timm calls attn_layer(channels) itself, past attention.create's checks: the class checks the width too."""
    cls = attnlab.attention.get(name)
    least = 0 if name in ("none", "simam", "triplet") else 1  # parameter-free: no width needed
    for bad in (least - 1, 2.5, "64", None, True):
        with pytest.raises(ValueError, match=rf"channels must be an integer >= {least}, got {re.escape(repr(bad))}$"):
            cls(bad)
