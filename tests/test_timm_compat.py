"""Every registered attention module as timm's ``attn_layer`` in a real timm ResNet: two training steps.

The README says ``attnlab.attention.get(name)`` is timm-compatible. timm builds one instance per block and never
calls ``reset_state()``, so a stateful module (DIA) must not carry anything from one forward pass to the next: the
second step (a new graph) and a smaller batch must both work. TDAM re-runs its block and must refuse clearly.
"""
import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.errors import AttnlabError

timm = pytest.importorskip("timm")

WORKS_IN_TIMM = {"none", "se", "cbam", "eca", "spe", "dia", "simam", "gc", "coord", "gct", "triplet", "bam", "fca"}
REFUSES = {"tdam": "re-runs its block, so it works only in attnlab's models"}


def timm_resnet18(name):
    # zero_init_last=False: with timm's zeroed last BN the modules would see 0 and get no gradient in step 1
    return timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False,
                             block_args=dict(attn_layer=attnlab.attention.get(name)))


def test_every_registered_module_is_classified():
    assert set(attnlab.attention.names()) == WORKS_IN_TIMM | set(REFUSES)


@pytest.mark.parametrize("name", attnlab.attention.names())
def test_two_training_steps_with_different_batch_sizes(name):
    torch.manual_seed(0)
    model = timm_resnet18(name).train()
    attn = [m for m in model.modules() if isinstance(m, attnlab.attention.get(name))]
    assert len(attn) == 8  # one per BasicBlock: timm put our module in every block's slot
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [[p.detach().clone() for p in m.parameters()] for m in attn]
    g = torch.Generator().manual_seed(1)
    if name in REFUSES:
        with pytest.raises(AttnlabError, match=REFUSES[name]):
            model(torch.randn(4, 3, 32, 32, generator=g))
        return
    for batch in (4, 3):  # a second graph, then a smaller batch: no state may survive the first pass
        x = torch.randn(batch, 3, 32, 32, generator=g)
        loss = F.cross_entropy(model(x), torch.arange(batch) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    # Every module is trained (not every tensor: e.g. SPE's mix weights get no cross-entropy gradient at init,
    # and DIA's W_hh input layer none without a recurrence, as here, where h is 0 in every call).
    for m, old in zip(attn, before):
        assert not old or any(not torch.equal(a, b) for a, b in zip(old, m.parameters()))
    with torch.no_grad():  # and the model is a pure function of its input: no call sees an earlier one
        model.eval()
        x = torch.randn(2, 3, 32, 32, generator=g)
        first = model(x)
        model(torch.randn(5, 3, 32, 32, generator=g))
        torch.testing.assert_close(model(x), first)
