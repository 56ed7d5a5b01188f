"""A stage's shared attention module is one plain child of the stage (``layerN.shared_attn``): counted, saved,
moved, copied and pickled once, with every block that uses it pointing at that one object."""
import copy
import io
import json
from pathlib import Path

import pytest
import torch

from attnlab import attention
from attnlab.models import create_model
from attnlab.models.blocks import CifarBasicBlock
from attnlab.models.resnet import ResNet, Stage

FIXTURE = Path(__file__).parent / "data" / "shared_stage_v1.json"


def shared_model(name="se", blocks="110-011-111"):
    torch.manual_seed(0)
    return create_model("resnet20", attention=name, share=True, blocks=blocks).eval()


def check_one_module_per_stage(model):
    """Every block using attention points at its stage's shared_attn, which the model registers exactly once."""
    names = {id(m): [] for m in model.modules()}
    for name, m in model.named_modules(remove_duplicate=False):
        names[id(m)].append(name)
    for stage_name, stage in zip(model.stage_names, model.stages()):
        shared = stage.shared_attn
        assert names[id(shared)] == [f"{stage_name}.shared_attn"]
        users = [b for b in stage if not isinstance(b.attn, torch.nn.Identity)]
        assert users and all(b.attn is shared for b in users)
        assert all("attn" not in b._modules for b in users)  # a reference, not a second registration


def image(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["se", "dia"])
def test_shared_module_is_registered_counted_and_saved_once(name):
    model = shared_model(name)
    check_one_module_per_stage(model)
    per_stage = sum(sum(p.numel() for p in attention.create(name, c).parameters()) for c in (16, 32, 64))
    plain = sum(p.numel() for p in create_model("resnet20").parameters())
    assert sum(p.numel() for p in model.parameters()) == plain + per_stage
    all_params = [p for m in model.modules() for p in m.parameters(recurse=False)]
    assert len(all_params) == len({id(p) for p in all_params})  # no module visited twice
    state = model.state_dict(keep_vars=True)
    attn_keys = [k for k in state if "attn" in k]
    assert attn_keys and all(k.split(".")[1] == "shared_attn" for k in attn_keys)
    shared_params = {id(p) for s in model.stages() for p in s.shared_attn.parameters()}
    assert sum(id(v) in shared_params for v in state.values()) == len(shared_params)  # one key per tensor


def test_a_stage_is_the_sequence_of_its_blocks():
    model = shared_model("se")
    stage = model.layer2
    assert isinstance(stage, Stage) and len(stage) == 3
    blocks = list(stage)
    assert len(blocks) == 3 and all(isinstance(b, CifarBasicBlock) for b in blocks)
    assert stage[0] is blocks[0] and stage[-1] is blocks[2] and stage[1:] == blocks[1:]
    with pytest.raises(IndexError):
        stage[3]
    assert [n for n, _ in stage.named_children()] == ["0", "1", "2", "shared_attn"]
    assert create_model("resnet20", attention="se").layer1.shared_attn is None  # unshared: no such child
    sparse = create_model("resnet20", attention="se", share=True, blocks="100-100-000")
    assert sparse.layer3.shared_attn is None and not any(k.startswith("layer3.") and "attn" in k
                                                         for k in sparse.state_dict())


@pytest.mark.parametrize("name", ["se", "dia"])
def test_deepcopy_pickle_and_dtype_keep_one_shared_object(name):
    model = shared_model(name)
    x = image()
    with torch.no_grad():
        expected = model(x)
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (clone, loaded):
        check_one_module_per_stage(other)
        assert other.layer1.shared_attn is not model.layer1.shared_attn
        with torch.no_grad():
            assert torch.equal(other(x), expected)
    model.to(torch.float64)
    check_one_module_per_stage(model)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.layer1[0].attn is model.layer1.shared_attn
    with torch.no_grad():
        torch.testing.assert_close(model(x.double()), expected.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("share", [True, False])
def test_a_whole_model_pickled_by_the_older_stage_still_loads(share):
    """The older Stage was an nn.Sequential: no ``depth``, and no ``shared_attn`` attribute where nothing is shared."""
    model = create_model("resnet20", attention="se", share=share).eval()
    x = image()
    with torch.no_grad():
        expected = model(x)
    for stage in model.stages():
        del stage.__dict__["depth"]
        if not share:
            del stage.__dict__["shared_attn"]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [len(s) for s in loaded.stages()] == [3, 3, 3]
    if share:
        check_one_module_per_stage(loaded)
    else:
        assert all(s.shared_attn is None for s in loaded.stages())
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_dtype_change_that_replaces_parameters_reaches_the_blocks():
    model = shared_model("se")
    before = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(before)
    check_one_module_per_stage(model)
    assert model.layer1[0].attn.fc1.weight is model.layer1.shared_attn.fc1.weight
    assert model.layer1[0].attn.fc1.weight.dtype == torch.float64


def _tensor(entry):
    return torch.tensor(entry["values"], dtype=getattr(torch, entry["dtype"])).reshape(entry["shape"])


@pytest.mark.parametrize("name", ["se", "dia"])
def test_same_init_keys_and_outputs_as_the_stage_before_it_was_a_plain_module(name):
    """tests/data/shared_stage_v1.json was written by the older Stage (an nn.Sequential hiding shared_attn): the
    same seed builds the same weights under the same keys, and its state_dict loads strictly and gives its logits."""
    saved = json.loads(FIXTURE.read_text())[name]
    torch.manual_seed(0)
    model = ResNet(CifarBasicBlock, [2, 2, 1], planes=(2, 4, 4), stem_width=2, num_classes=3, stem="cifar",
                   attention=name, share=True, attention_kwargs={"reduction": 2}).eval()
    old = {k: _tensor(v) for k, v in saved["state_dict"].items()}
    new = model.state_dict()
    assert list(new) == list(old)
    for k in new:
        torch.testing.assert_close(new[k], old[k], rtol=0, atol=0, msg=k)
    model.load_state_dict(old, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(_tensor(saved["x"])), _tensor(saved["logits"]))
