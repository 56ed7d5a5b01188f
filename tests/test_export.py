"""Zero inference cost of SSIA and the ``attnlab export`` command (resnet20 at 32x32, a few steps by hand)."""
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.cli import main
from attnlab.export import export_onnx
from attnlab.objectives.ssia import SSIA
from attnlab.measure import count_flops, count_params

MODEL = {"name": "resnet20", "num_classes": 10, "attention": "se", "attention_kwargs": {}, "blocks": None,
         "share": None, "zero_init_residual": False}


def train_steps(model, ssia=None, steps=2, seed=0):
    """A few SGD steps on random images, with the SSIA term added when ``ssia`` is given."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        if ssia is None:
            loss = F.cross_entropy(model(x), y)
        else:
            logits, feats = model(x, features=ssia.features)
            loss = F.cross_entropy(logits, y) + ssia(model=model, logits=logits, targets=y, features=feats,
                                                     epoch=0, step=step)["ssia"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    ssia_model = train_steps(attnlab.create_model("resnet20", attention="se"), SSIA(pairing="block", weight=10.0))
    torch.manual_seed(1)
    plain_model = train_steps(attnlab.create_model("resnet20", attention="se"))
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_last.pt"
    torch.save({"model": ssia_model.state_dict(), "epoch": 0, "best_val_top1": 0.0,
                "config": {"model": MODEL, "data": {"name": "cifar10", "image_size": None},
                           "ssia": {"enabled": True, "pairing": "block", "weight": 10.0}}}, path)
    return ssia_model, plain_model, path


def test_ssia_trained_weights_load_strictly_into_a_plain_model(trained):
    ssia_model, plain_model, _ = trained
    fresh = attnlab.create_model("resnet20", attention="se")
    fresh.load_state_dict(ssia_model.state_dict(), strict=True)
    assert set(ssia_model.state_dict()) == set(plain_model.state_dict())
    assert count_params(ssia_model) == count_params(fresh) == count_params(plain_model)
    assert count_flops(ssia_model, 32) == count_flops(fresh, 32) == count_flops(plain_model, 32)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), ssia_model(x))
    # the weights did move away from the plain run's: SSIA training was real
    assert not torch.equal(ssia_model.conv1.weight, plain_model.conv1.weight)


def test_export_cli_graphs_match_a_plain_model(trained, tmp_path, capsys):
    ssia_model, plain_model, ckpt = trained
    out = tmp_path / "ssia.onnx"
    with pytest.raises(SystemExit) as code:
        main(["export", "--checkpoint", str(ckpt), "--onnx", str(out)])
    assert code.value.code == 0
    printed = capsys.readouterr().out
    assert "exported resnet20 (attention=se)" in printed and "max |onnxruntime - torch|" in printed

    plain_path = export_onnx(plain_model, tmp_path / "plain.onnx", 32)
    ops = lambda p: Counter(n.op_type for n in onnx.load(str(p)).graph.node)
    assert ops(out) == ops(plain_path)

    # Same weights in a model built without SSIA: the exported graphs compute the same function.
    same = attnlab.create_model("resnet20", attention="se")
    same.load_state_dict(ssia_model.state_dict(), strict=True)
    same_path = export_onnx(same, tmp_path / "same.onnx", 32)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)  # batch 3: dynamic axis
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    a, b = run(out), run(same_path)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    with torch.no_grad():
        np.testing.assert_allclose(a, ssia_model(torch.from_numpy(x)).numpy(), atol=1e-5, rtol=0)


def test_export_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as code:
        main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--onnx", str(tmp_path / "m.onnx")])
    assert code.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnlab: error: checkpoint") and "does not exist" in err and "\n" not in err

    bad = tmp_path / "bad.pt"
    torch.save({"model": {}}, bad)
    with pytest.raises(SystemExit) as code:
        main(["export", "--checkpoint", str(bad), "--onnx", str(tmp_path / "m.onnx")])
    assert code.value.code == 2 and "is not an attnlab checkpoint" in capsys.readouterr().err

    wrong = tmp_path / "wrong.pt"  # resnet20 weights under a resnet32 config
    torch.save({"model": attnlab.create_model("resnet20").state_dict(),
                "config": {"model": {"name": "resnet32"}}}, wrong)
    with pytest.raises(SystemExit) as code:
        main(["export", "--checkpoint", str(wrong), "--onnx", str(tmp_path / "m.onnx")])
    assert code.value.code == 2 and "do not match model 'resnet32'" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()

    shaped = tmp_path / "shaped.pt"  # the same keys, a 5-class head under a config of 10 classes
    torch.save({"model": attnlab.create_model("resnet20", num_classes=5).state_dict(),
                "config": {"model": {"name": "resnet20", "num_classes": 10}}}, shaped)
    with pytest.raises(SystemExit) as code:
        main(["export", "--checkpoint", str(shaped), "--onnx", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.count("\n") == 1
    assert "fc.weight is (5, 64), the model wants (10, 64)" in err

    plain = tmp_path / "plain.pt"  # an opset the exporter does not write: one line, before anything is traced
    torch.save({"model": attnlab.create_model("resnet20").state_dict(), "config": {"model": {"name": "resnet20"}}},
               plain)
    for opset in ("3", "999"):
        with pytest.raises(SystemExit) as code:
            main(["export", "--checkpoint", str(plain), "--onnx", str(tmp_path / "m.onnx"), "--opset", opset])
        out, err = capsys.readouterr()
        assert code.value.code == 2 and f"--opset {opset}: attnlab exports with the legacy exporter of torch" in err
        assert err.count("\n") == 1 and not out and not (tmp_path / "m.onnx").exists()
    from attnlab.export import _opsets
    assert _opsets("dynamo")[0] == 18  # it converts lower opsets down from 18, which fails: refused instead


def test_export_takes_a_run_directory_and_prefers_the_ema_weights(trained, tmp_path):
    from attnlab.export import load_checkpoint_model

    ssia_model, plain_model, _ = trained
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": plain_model.state_dict(), "ema": {"module": ssia_model.state_dict(), "updates": 2},
                "config": {"model": MODEL}}, run / "checkpoint_best.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ema_model, _ = load_checkpoint_model(run)
        raw_model, _ = load_checkpoint_model(run, use_ema=False)
        assert torch.equal(ema_model(x), ssia_model(x))
        assert torch.equal(raw_model(x), plain_model(x))



def test_gc_exports_and_fca_names_the_exporter_that_can_in_one_line(tmp_path, capfd):
    from attnlab.errors import AttnlabError
    from attnlab.export import check_onnx
    gc = attnlab.create_model("resnet20", attention="gc").eval()  # its channel LayerNorm once traced a shape op
    assert check_onnx(gc, export_onnx(gc, tmp_path / "gc.onnx", 32), 32) < 1e-4
    fca = attnlab.create_model("resnet20", attention="fca").eval()  # adaptive pooling of a dynamic size
    with pytest.raises(AttnlabError, match=r"legacy exporter failed: .*adaptive_avg_pool2d.*; try --exporter dynamo$"):
        export_onnx(fca, tmp_path / "fca.onnx", 32)
    out, _ = capfd.readouterr()
    assert out == "" and not (tmp_path / "fca.onnx").exists()  # torch's C++ dump of the traced graph is silenced


def test_the_dynamo_exporter_writes_one_file_that_works_where_it_is_moved(tmp_path):
    from attnlab.export import check_onnx
    model = attnlab.create_model("resnet20", attention="fca").eval()
    folder = tmp_path / "out"
    folder.mkdir()
    path = export_onnx(model, folder / "m.onnx", 32, exporter="dynamo")
    assert [p.name for p in folder.iterdir()] == ["m.onnx"]  # no side file of weights named after the temp file
    moved = path.rename(tmp_path / "moved.onnx")
    assert check_onnx(model, moved, 32) < 1e-4
