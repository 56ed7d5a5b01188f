"""DIA ('dia'): one LSTM step by hand, stage-wise state semantics (EAN masks), sharing of any module, counts."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from attn_helpers import (attention_params_with_gradients, backbone_cases, check_output_shape, check_short_run_learns,
                          n_params)
from attnlab import attention
from attnlab.errors import AttnlabError
from attnlab.models import create_model


def sig(z):
    return 1 / (1 + math.exp(-z))


def hand_set_unit():
    """C = 2, reduction 2 -> hidden width 1, so every weight is a small hand-picked number."""
    dia = attention.create("dia", 2, reduction=2)
    with torch.no_grad():
        dia.w_ih[0].weight.copy_(torch.tensor([[1.0, 1.0]]))
        dia.w_ih[0].bias.zero_()
        # gate chunks in order i, f, g, o, two channels each
        dia.w_ih[2].weight.copy_(torch.tensor([0.5, -0.5, 1.0, 0.2, 0.1, 0.3, -1.0, 0.4]).view(8, 1))
        dia.w_ih[2].bias.zero_()
        dia.w_hh[0].weight.copy_(torch.tensor([[1.0, 0.0]]))
        dia.w_hh[0].bias.zero_()
        dia.w_hh[2].weight.fill_(0.5)
        dia.w_hh[2].bias.fill_(0.1)
    return dia


def test_two_lstm_steps_by_hand():
    dia = hand_set_unit()
    x = torch.tensor([[[[1.0, 3.0]], [[-1.0, 0.0]]]])        # GAP = (2, -0.5)
    v = [0.5, -0.5, 1.0, 0.2, 0.1, 0.3, -1.0, 0.4]
    hid_ih = max(0.0, 2 - 0.5)                               # ReLU(1 * 2 + 1 * -0.5) = 1.5

    def step(h, c):
        hh = 0.5 * max(0.0, h[0]) + 0.1                        # W_hh: ReLU(h0) -> 0.5 * . + 0.1, every gate
        g = [hid_ih * w + hh for w in v]
        i, f, gg, o = g[0:2], g[2:4], g[4:6], g[6:8]
        c = [sig(f[k]) * c[k] + sig(i[k]) * math.tanh(gg[k]) for k in range(2)]
        h = [sig(o[k]) * sig(c[k]) for k in range(2)]         # sigmoid(c), not tanh(c)
        return h, c

    h1, c1 = step([0.0, 0.0], [0.0, 0.0])
    h2, c2 = step(h1, c1)
    dia.reset_state()
    torch.testing.assert_close(dia(x), x * torch.tensor(h1).view(1, 2, 1, 1))
    torch.testing.assert_close(dia(x), x * torch.tensor(h2).view(1, 2, 1, 1))   # the state carries over
    torch.testing.assert_close(dia._state[1], torch.tensor([c2]))
    dia.reset_state()
    torch.testing.assert_close(dia(x), x * torch.tensor(h1).view(1, 2, 1, 1))   # zeros again after a reset


def test_state_follows_connected_blocks_and_resets_per_stage():
    """EAN semantics: only connected blocks read/update the stage's state, which starts at zero per stage."""
    torch.manual_seed(0)
    masks = ["101", "011", "100"]
    model = create_model("resnet20", attention="dia", blocks="-".join(masks)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits, feats = model(x, features="blocks")
        io = iter(feats["blocks"])
        for stage, mask in zip(model.stages(), masks):
            dia, state = stage.shared_attn, None
            for block, bit in zip(stage, mask):
                inp, out = next(io)
                branch = block.branch(inp)
                if bit == "1":
                    assert block.attn is dia
                    state = dia.step(branch.mean((2, 3)), state)
                    branch = branch * state[0][:, :, None, None]
                else:
                    assert isinstance(block.attn, torch.nn.Identity)
                torch.testing.assert_close(out, F.relu(branch + block.shortcut(inp)))
        assert all(s.shared_attn._state is None for s in model.stages())  # dropped after each stage
        torch.testing.assert_close(model(x), logits)                     # no state leaks between calls
    copy.deepcopy(model)  # e.g. EMA: works after a forward, since no graph tensors are kept


@pytest.mark.parametrize("name", ["se", "spe", "dia"])
def test_shared_module_has_one_set_of_weights(name):
    widths = (16, 32, 64)
    per_stage = [n_params(attention.create(name, c)) for c in widths]
    base = n_params(create_model("resnet20"))
    full = create_model("resnet20", attention=name, share=True)
    sparse = create_model("resnet20", attention=name, share=True, blocks="100-011-000")
    assert n_params(full) == base + sum(per_stage)                 # however many blocks connect
    assert n_params(sparse) == base + per_stage[0] + per_stage[1]  # a stage with no connection has none
    for model in (full, sparse):
        for stage in model.stages():
            used = [b.attn for b in stage if not isinstance(b.attn, torch.nn.Identity)]
            assert all(a is stage.shared_attn for a in used)
        keys = [k for k in model.state_dict() if "attn" in k]
        assert keys and all(k.split(".")[1] == "shared_attn" for k in keys)
    assert len(full.attention_modules()) == 3 and len(sparse.attention_modules()) == 2
    assert len(full.layer1) == 3                                   # the shared module is not a block
    with torch.no_grad():
        assert sparse(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_unshared_dia_is_one_unit_per_block():
    model = create_model("resnet20", attention="dia", share=False)
    assert len(model.attention_modules()) == 9
    with torch.no_grad():
        a = model(torch.randn(2, 3, 16, 16))
        b = model(torch.randn(3, 3, 16, 16))  # a new batch size: no stale state from the last call
    assert a.shape == (2, 10) and b.shape == (3, 10)


def test_resnet164_parameter_count():
    base = n_params(create_model("resnet164", num_classes=100))
    dia = n_params(create_model("resnet164", num_classes=100, attention="dia"))
    assert abs(dia - 1.95e6) <= 0.02e6
    # per stage: two bottleneck MLPs C -> C/4 -> 4C with biases
    assert dia - base == sum(2 * ((c * c // 4 + c // 4) + (c // 4 * 4 * c + 4 * c)) for c in (64, 128, 256))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    assert len(attention_params_with_gradients(create_model("resnet20", attention="dia"))) == 3 * 8


@pytest.mark.parametrize("name,size", backbone_cases())
def test_output_shapes(name, size):
    check_output_shape(name, size, "dia")


def test_short_training_run_decreases_loss():
    torch.manual_seed(0)
    check_short_run_learns(create_model("resnet20", attention="dia"))


def test_unmanaged_unit_keeps_no_state_between_calls():
    """Where no stage calls reset_state() (timm's attn_layer), every call starts from zero state, keeps nothing."""
    dia = hand_set_unit()
    x = torch.tensor([[[[1.0, 3.0]], [[-1.0, 0.0]]]])
    first = dia(x)
    assert dia._state is None
    torch.testing.assert_close(dia(x), first)                   # no recurrence across calls
    h1, _ = dia.step(x.mean((2, 3)))
    torch.testing.assert_close(first, x * h1[:, :, None, None])  # one step from zero state
    dia(torch.randn(3, 2, 4, 4)).sum().backward()                # another batch size, a second graph: fine
    dia(x).sum().backward()


def test_carried_state_meeting_another_batch_is_a_clear_error():
    dia = attention.create("dia", 4)
    dia.reset_state()                                            # a managed sequence, but never closed
    dia(torch.randn(2, 4, 3, 3))
    with pytest.raises(AttnlabError, match=r"state of shape \(2, 4\) from an earlier call .*reset_state\(\)"):
        dia(torch.randn(3, 4, 3, 3))
