"""``attnlab localize`` and ``attnlab show`` end to end on tiny checkpoints trained for one step on real data."""
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2", reason="attnlab[wsol] (opencv-python-headless) not installed")

from attnlab.cli import main
from attnlab.data.sources import repo_root
from attnlab.engine.config import load_config
from attnlab.engine.train import train

RECIPE = repo_root() / "configs" / "tiny_imagenet_resnet20_cpu.yaml"


def _run(tmp_path, name, attention, overrides=()):
    cfg = load_config(RECIPE, [f"name={name}", f"out_dir={tmp_path}", "device=cpu", f"model.attention={attention}",
                               "data.subset=3", "data.val_size=50", "data.test_subset=1", "train.epochs=1",
                               "debug.max_steps_per_epoch=1", "train.batch_size=32", f"data.cache_dir={tmp_path}/c",
                               *overrides])
    train(cfg)
    return tmp_path / name


def _cli(*args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return exc.value.code


@pytest.mark.needs_data("tiny-imagenet")
def test_localize_and_show_on_a_tdam_checkpoint(tmp_path, capsys):
    run = _run(tmp_path, "tdam", "tdam")
    assert _cli("localize", "--checkpoint", str(run), "--interval", "0.05") == 0
    printed = capsys.readouterr().out
    assert "centre Gaussian" in printed and "full-image box" in printed
    res = json.loads((run / "localize.json").read_text())
    val, test = res["splits"]["val"], res["splits"]["test"]
    assert val["images"] == 50 and test["images"] == 50
    # tau comes from val: there it is GT-known Loc's oracle; on test it is at most the oracle
    assert val["gt_known_loc"]["at_tau"] == val["gt_known_loc"]["oracle"] and res["tau"] == val["tau"] == test["tau"]
    for r in (val, test):
        assert r["top1_loc"]["oracle"] <= min(r["top1"], r["gt_known_loc"]["oracle"]) + 1e-9
        assert r["max_box_acc_v2"] == pytest.approx(np.mean(list(r["max_box_acc_v2_iou"].values())))
    for split in ("val", "test"):
        pri = res["priors"][split]
        assert set(pri) == {"centre_gaussian", "full_image"}
        assert pri["centre_gaussian"]["max_box_acc"] >= pri["full_image"]["iou"]["50"]  # tau = 0 floor

    out = tmp_path / "pics"
    assert _cli("show", "--checkpoint", str(run), "--images", "3", "--out", str(out)) == 0
    assert "localize.json" in capsys.readouterr().out  # tau read from the localize step
    for name in ("cams.png", "spatial_gates.png", "channel_gates.png", "tdam_steps.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 200 and im.size[1] > 150
            assert np.asarray(im.convert("L")).std() > 10  # not blank
    (tmp_path / "a_file").write_text("x\n")
    assert _cli("show", "--checkpoint", str(run), "--images", "3", "--out", str(tmp_path / "a_file")) == 2
    assert "is a file; show writes its PNGs into a folder" in capsys.readouterr().err


def test_localize_names_its_json_with_out_like_eval_and_show():
    import importlib
    from attnlab.cli import COMMANDS, build_parser
    parser = build_parser({n: importlib.import_module(m) for n, (m, _) in COMMANDS.items()})
    for flag in ("--out", "--output"):
        assert parser.parse_args(["localize", "--checkpoint", "c.pt", flag, "x.json"]).output == "x.json"


@pytest.mark.needs_data("cifar10")
def test_show_works_on_cifar10_and_localize_says_there_are_no_boxes(tmp_path, capsys):
    run = _run(tmp_path, "se", "se", ["data.name=cifar10", "data.image_size=null", "data.val_size=20",
                                      "data.subset=6"])
    out = tmp_path / "pics"
    assert _cli("show", "--checkpoint", str(run), "--images", "4", "--out", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cams.png", "channel_gates.png"]
    assert _cli("localize", "--checkpoint", str(run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["attnlab: error: dataset 'cifar10' has no bounding boxes (its val split has none; only "
                   "tiny-imagenet and wsol have boxes), so localization metrics cannot be computed"]
    assert not (run / "localize.json").exists()


@pytest.fixture(scope="module")
def cifar_bundle(tmp_path_factory, cifar10_dir):
    from attnlab.data.datasets import load_dataset
    return load_dataset("cifar10", subset=2, val_size=2, test_subset=1, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("attention,kwargs,pictures", [
    ("simam", {}, ["spatial_gates.png", "channel_gates.png"]),
    ("gct", {}, ["channel_gates.png"]),
    ("fca", {}, ["channel_gates.png"]),
    ("coord", {}, ["axis_gates.png"]),
    ("triplet", {}, ["spatial_gates.png", "axis_gates.png"]),
    ("bam", {}, ["spatial_gates.png", "channel_gates.png"]),
    ("gc", {"fusion": "scale"}, ["channel_gates.png"]),
    ("gc", {}, []),  # add fusion: no gate, so only the CAMs
])
def test_show_draws_the_gates_of_the_newer_modules(cifar_bundle, tmp_path, attention, kwargs, pictures):
    import torch

    from attnlab.models import create_model
    from attnlab.viz.command import show
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, attention=attention, attention_kwargs=kwargs).eval()
    written = show(model, cifar_bundle, "test", tmp_path, count=3)
    assert [p.name for p in written] == ["cams.png", *pictures]
    for path in written:
        with Image.open(path) as im:
            assert im.size[0] > 200 and im.size[1] > 150
            assert np.asarray(im.convert("L")).std() > 10  # not blank


def test_show_and_localize_on_a_run_without_val_images_say_so_in_one_line(cifar_bundle, tmp_path):
    import dataclasses

    import torch

    from attnlab.errors import AttnlabError
    from attnlab.localization.command import localize
    from attnlab.models import create_model
    from attnlab.viz.command import show
    val = cifar_bundle.val
    bundle = dataclasses.replace(cifar_bundle, val=dataclasses.replace(val, images=val.images[:0],
                                                                       labels=val.labels[:0]))
    model = create_model("resnet20", num_classes=10, attention="none").eval()
    torch.manual_seed(0)
    held_out = r"cifar10 has no val images \(the run held none out of train: data.val_size=0\); give --split"
    with pytest.raises(AttnlabError, match=held_out + " test$"):
        show(model, bundle, "val", tmp_path / "pics", count=3)
    assert not (tmp_path / "pics").exists()
    with pytest.raises(AttnlabError, match=held_out + "s test$"):
        localize(model, bundle, ("val", "test"))
    assert [p.name for p in show(model, bundle, "test", tmp_path / "pics", count=1)] == ["cams.png"]


def test_show_takes_localizes_tau_only_for_the_kind_of_map_it_was_chosen_for(tmp_path):
    from attnlab.viz.command import DEFAULT_TAU, _tau
    best = tmp_path / "checkpoint_best.pt"
    assert _tau(best, None, "cam") == (DEFAULT_TAU, "default")  # no localize.json yet
    (tmp_path / "localize.json").write_text(json.dumps({"method": "cam", "tau": 0.4}))
    assert _tau(best, None, "cam") == (0.4, str(tmp_path / "localize.json"))
    tau, source = _tau(best, None, "gradcam")
    assert tau == DEFAULT_TAU and source.startswith("default:") and "--cam cam maps" in source
    assert _tau(best, 0.3, "gradcam") == (0.3, "--tau")
