"""model.init: start from a torchvision (or timm) ResNet state_dict; attention modules start fresh, the report
lists them, and a file that does not fit is refused in one line before any weight changes."""
import pickle
import warnings

import pytest
import torch
import torchvision

from attnlab import create_model
from attnlab.engine.checkpoint import init_from_state_dict
from attnlab.engine.config import load_config
from attnlab.engine.distributed import Dist
from attnlab.engine.train import Trainer
from attnlab.errors import AttnlabError

from test_streaming import make_folder


@pytest.fixture(scope="module")
def tv50(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("init") / "resnet50_tv.pt"
    torch.save(torchvision.models.resnet50().state_dict(), path)  # random init: no download
    return path


def test_engine_starts_se_resnet50_from_a_torchvision_state_dict(tmp_path, tv50, capsys):
    data = make_folder(tmp_path / "folder", size=40, train=4, val=2)
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=init", "data.name=imagefolder", f"data.data_dir={data}",
                             "data.pipeline=stream", "data.image_size=32", "data.val_size=0", "data.workers=0",
                             "model.name=resnet50", "model.attention=se", "model.num_classes=1000",
                             f"model.init={tv50}", "train.batch_size=4", "train.epochs=1", "device=cpu"])
    trainer = Trainer(cfg, Dist(), torch.device("cpu"))
    torch.manual_seed(0)  # the trainer seeds with cfg.seed=0 before it builds the model
    fresh = create_model("resnet50", num_classes=1000, attention="se").state_dict()
    got, saved = trainer.model.state_dict(), torch.load(tv50, weights_only=True)
    for k, v in saved.items():
        assert torch.equal(got[k], v), k  # every backbone tensor, the classifier and BN statistics included
    new = sorted(k for k in got if k not in saved)
    assert new and all(".attn." in k for k in new)  # only the SE modules are new
    for k in new:
        assert torch.equal(got[k], fresh[k]), k  # and they keep their fresh initialisation
    assert not torch.equal(got["conv1.weight"], fresh["conv1.weight"])
    out = capsys.readouterr().out
    assert f"model.init {tv50}: loaded {len(saved)} tensors; {len(new)} new, starting fresh: layer1.0.attn" in out


def test_report_lists_new_keys_and_a_fresh_classifier_for_another_class_count(tv50):
    model = create_model("resnet50", num_classes=10, attention="cbam")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_from_state_dict(model, tv50)
    assert report.fresh_head == ["fc.bias", "fc.weight"]
    assert all(".attn." in k or k.startswith("fc.") for k in report.new)
    assert torch.equal(model.state_dict()["fc.weight"], before["fc.weight"])
    assert torch.equal(model.state_dict()["conv1.weight"], torch.load(tv50, weights_only=True)["conv1.weight"])
    assert "classifier fc.bias, fc.weight starts fresh" in report.summary()


def test_timm_resnet50_state_dict_loads_too(tmp_path):
    timm = pytest.importorskip("timm")
    path = tmp_path / "timm50.pt"
    torch.save(timm.create_model("resnet50", pretrained=False).state_dict(), path)
    report = init_from_state_dict(create_model("resnet50", num_classes=1000, attention="eca"), path)
    assert len(report.loaded) == 320 and all(".attn." in k for k in report.new)


def test_files_that_do_not_fit_are_refused_in_one_line(tmp_path, tv50, monkeypatch):
    model = create_model("resnet50", num_classes=1000, attention="se")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r18 = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), r18)
    with pytest.raises(AttnlabError, match="shape mismatch") as info:
        init_from_state_dict(model, r18)
    assert "\n" not in str(info.value) and "layer1.0.conv1.weight (64, 64, 3, 3) vs (64, 64, 1, 1)" in str(info.value)
    extra = tmp_path / "extra.pt"
    state = torch.load(tv50, weights_only=True)
    state["head.proj.weight"] = torch.zeros(3)
    torch.save(state, extra)
    with pytest.raises(AttnlabError, match="1 keys the model does not have .head.proj.weight."):
        init_from_state_dict(model, extra)
    code = tmp_path / "code.pt"
    torch.save({"weights": torch.nn.Linear(2, 2)}, code)  # a pickled module: weights_only refuses it
    with pytest.raises(AttnlabError, match="holds more than tensors and plain values") as info:
        init_from_state_dict(model, code)
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
    plain = tmp_path / "plain.pkl"  # another program's plain pickle: refused without torch's protocol warning
    plain.write_bytes(pickle.dumps({"weights": [1.0]}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttnlabError, match="holds more than tensors and plain values"):
            init_from_state_dict(model, plain)
    with pytest.raises(AttnlabError, match="does not exist"):
        init_from_state_dict(model, tmp_path / "missing.pt")
    with pytest.raises(AttnlabError, match=f"model.init '{tmp_path}' is a folder, not a file$"):
        init_from_state_dict(model, tmp_path)
    (tmp_path / "config.yaml").write_text("model:\n  name: resnet50\n")
    with pytest.raises(AttnlabError, match=r"is not a PyTorch file: a text file \(it begins 'model:'\)$"):
        init_from_state_dict(model, tmp_path / "config.yaml")
    from attnlab.engine import checkpoint

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(checkpoint, "open", denied, raising=False)  # what a file root may not read would raise
    with pytest.raises(AttnlabError, match=r"cannot read model.init '.*r18.pt': Permission denied$"):
        init_from_state_dict(model, r18)
    monkeypatch.undo()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing changed by a refused file
