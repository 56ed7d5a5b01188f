"""Run-time connection masks (attnlab/models/connections.py): a 0 bit skips the module call, masks change per
forward, a masked supernet equals the static model with the same placement, FLOPs equal the plain block's."""
import pytest
import torch

import attnlab.attention
from attnlab.errors import AttnlabError
from attnlab.models import create_model
from attnlab.models.connections import (bits_to_blocks, connections, get_connections, scheme_bits,
                                        set_connections)
from attnlab.measure import count_flops

SHAREABLE = [a for a in attnlab.attention.names()
             if a != "none" and not getattr(attnlab.attention.get(a), "wraps_block", False)]


def supernet(attention, seed=0):
    torch.manual_seed(seed)
    return create_model("resnet20", attention=attention, share=True, blocks="all").eval()


def count_calls(model):
    """{id(module): calls} for every attention module, counted by forward pre-hooks."""
    calls = {}
    for mod in model.attention_modules():
        calls[id(mod)] = 0
        mod.register_forward_pre_hook(lambda m, args: calls.__setitem__(id(m), calls[id(m)] + 1))
    return calls


def test_shareable_list_is_not_empty():
    assert {"se", "dia", "eca", "cbam"} <= set(SHAREABLE)


@pytest.mark.parametrize("attention", SHAREABLE)
def test_zero_bits_call_no_module(attention):
    model = supernet(attention)
    calls = count_calls(model)
    assert len(calls) == 3  # one shared module per stage
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        set_connections(model, "000-000-000")
        model(x)
        assert sum(calls.values()) == 0
        set_connections(model, "100-011-000")
        model(x)
    assert sorted(calls.values()) == [0, 1, 2]  # stage 3 never called, stage 1 once, stage 2 twice


@pytest.mark.parametrize("attention", SHAREABLE)
def test_masked_supernet_equals_static_model_with_same_weights(attention):
    # For DIA this is the state rule: the static model's unconnected blocks hold no module at all, so its LSTM
    # state runs through the connected blocks only; the masked supernet must give exactly the same output.
    model = supernet(attention)
    x = torch.randn(3, 3, 32, 32)
    for mask in ("101-010-110", "000-111-001", "111-111-111", "000-000-000"):
        static = create_model("resnet20", attention=attention, share=True, blocks=mask).eval()
        # The static model has no shared_attn where a stage is empty; everything else has the same keys.
        missing, unexpected = static.load_state_dict(model.state_dict(), strict=False)
        assert not missing
        assert all(".shared_attn." in k for k in unexpected)
        with torch.no_grad():
            set_connections(model, mask)
            assert torch.equal(model(x), static(x)), mask


def test_masks_change_per_forward():
    model = supernet("se")
    calls = count_calls(model)
    x = torch.randn(2, 3, 32, 32)
    seen, outs = [], []
    with torch.no_grad():
        for mask in ("111-000-000", "000-111-000", "000-000-111", "111-000-000"):
            before = dict(calls)
            set_connections(model, mask)
            outs.append(model(x))
            seen.append(tuple(calls[k] - before[k] for k in calls))
    assert seen == [(3, 0, 0), (0, 3, 0), (0, 0, 3), (3, 0, 0)]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    assert torch.equal(outs[0], outs[3])


@pytest.mark.parametrize("attention", ["se", "dia"])
def test_flops_of_masked_blocks_equal_the_plain_blocks(attention):
    model = supernet(attention)
    plain = create_model("resnet20", attention="none")
    full = count_flops(model, 32)
    set_connections(model, "000-000-000")
    assert count_flops(model, 32) == count_flops(plain, 32)
    set_connections(model, "110-001-000")
    static = create_model("resnet20", attention=attention, share=True, blocks="110-001-000")
    assert count_flops(model, 32) == count_flops(static, 32)
    assert count_flops(plain, 32) < count_flops(model, 32) < full


def test_context_manager_restores_and_none_reconnects_all():
    model = supernet("se")
    set_connections(model, "100-100-100")
    with connections(model, "011-011-011"):
        assert scheme_bits(get_connections(model)) == (0, 1, 1) * 3
    assert scheme_bits(get_connections(model)) == (1, 0, 0) * 3
    set_connections(model, None)
    assert scheme_bits(get_connections(model)) == (1,) * 9


def test_a_bit_without_a_module_is_an_error():
    model = create_model("resnet20", attention="se", share=True, blocks="100-100-100")
    set_connections(model, "100-000-100")  # a subset of what was built is fine
    with pytest.raises(AttnlabError, match="stage 0 block 1.*blocks='all'"):
        set_connections(model, "110-000-000")
    with pytest.raises(AttnlabError, match="bit strings"):
        set_connections(model, "11-000-000")


def test_not_shared_models_take_masks_too():
    model = create_model("resnet20", attention="se").eval()
    calls = count_calls(model)
    assert len(calls) == 9
    set_connections(model, "100-000-001")
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert sum(calls.values()) == 2


def test_flat_bits_convert_to_blocks_strings():
    assert bits_to_blocks((1, 0, 1, 1, 1, 0, 0, 1, 1), [3, 3, 3]) == "101-110-011"
    assert bits_to_blocks("101110011", [3, 3, 3]) == "101-110-011"
    with pytest.raises(AttnlabError, match="9 bits"):
        bits_to_blocks("1011", [3, 3, 3])
    assert bits_to_blocks("101-110-011", [3, 3, 3]) == "101-110-011"
    with pytest.raises(AttnlabError, match=r"for stages \[3, 3, 3\] \(grouped by stage with -\), got '1011-10-011'"):
        bits_to_blocks("1011-10-011", [3, 3, 3])  # 9 bits, but not these stages: never regrouped
