"""The run folder's one owner (engine/run_folder.py): what a path means, its files, its curve, claiming it, and
``open_run`` giving every command the same trained model and settings."""
import math
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.engine.checkpoint import atomic_save
from attnlab.engine.config import load_config, to_dict
from attnlab.engine.run_folder import RunFolder, open_run, trained_checkpoint
from attnlab.errors import AttnlabError

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(folder: Path, name: str, epoch: int, overrides=(), ema_shift=None) -> dict:
    """A checkpoint as the engine writes it (weights + config), of a fresh tiny ResNet-20."""
    cfg = load_config(None, ["model.name=resnet20", "model.attention=se", "model.num_classes=10", *overrides])
    torch.manual_seed(epoch)
    model = attnlab.create_model("resnet20", num_classes=10, attention="se")
    ckpt = {"model": model.state_dict(), "config": to_dict(cfg), "epoch": epoch, "ema": None}
    if ema_shift is not None:
        ckpt["ema"] = {"module": {k: v + ema_shift if v.is_floating_point() else v
                                  for k, v in model.state_dict().items()}}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save(ckpt, folder / name)
    return ckpt


def test_a_folder_means_its_best_checkpoint_else_its_last(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(AttnlabError, match="holds no checkpoint"):
        trained_checkpoint(run)
    with pytest.raises(AttnlabError, match="does not exist"):
        trained_checkpoint(tmp_path / "nowhere")
    _checkpoint(run, RunFolder.LAST, epoch=1)
    assert trained_checkpoint(run) == run / "checkpoint_last.pt"  # stopped before checkpoint_best was written
    _checkpoint(run, RunFolder.BEST, epoch=1)
    assert trained_checkpoint(run) == run / "checkpoint_best.pt"
    assert trained_checkpoint(run / "checkpoint_last.pt") == run / "checkpoint_last.pt"  # a file is itself


def test_every_command_opens_the_same_model_by_the_same_rule(tmp_path):
    from attnlab.export import load_checkpoint_model
    from attnlab.localization.command import open_trained

    run = tmp_path / "run"
    _checkpoint(run, RunFolder.LAST, epoch=2)
    best = _checkpoint(run, RunFolder.BEST, epoch=1)
    opened = open_run(run, "cpu")
    assert opened.checkpoint == run / "checkpoint_best.pt" and opened.ckpt["epoch"] == 1
    assert opened.folder.path == run and not opened.model.training
    for k, v in best["model"].items():
        assert torch.equal(opened.model.state_dict()[k], v), k
    exported, cfg = load_checkpoint_model(run)
    cams = open_trained(run, "cpu").model
    for k, v in best["model"].items():
        assert torch.equal(exported.state_dict()[k], v) and torch.equal(cams.state_dict()[k], v), k
    assert cfg == best["config"]


def test_open_run_follows_the_runs_memory_format_precision_and_ema(tmp_path):
    conv = lambda m: m.conv1.weight
    default = _checkpoint(tmp_path / "a", RunFolder.BEST, epoch=1, ema_shift=1.0)
    opened = open_run(tmp_path / "a", "cpu")
    assert opened.channels_last and conv(opened.model).is_contiguous(memory_format=torch.channels_last)
    assert opened.precision == "fp32"  # train.amp=auto on a CPU
    assert torch.equal(conv(opened.model), default["ema"]["module"]["conv1.weight"])  # the EMA weights
    raw = open_run(tmp_path / "a", "cpu", use_ema=False, channels_last=False)
    assert torch.equal(conv(raw.model), default["model"]["conv1.weight"])
    assert not raw.channels_last and conv(raw.model).is_contiguous()

    _checkpoint(tmp_path / "b", RunFolder.BEST, epoch=1, overrides=["train.channels_last=false", "train.amp=off"])
    plain = open_run(tmp_path / "b", "cpu")
    assert not plain.channels_last and conv(plain.model).is_contiguous() and plain.precision == "fp32"


def test_open_run_refuses_a_file_that_is_not_a_training_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(AttnlabError, match="is not an attnlab checkpoint"):
        open_run(tmp_path / "other.pt", "cpu")


def test_curve_reads_metrics_csv_and_marks_unreadable_values(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.curve() is None
    folder.metrics.write_text("epoch,val_top1,val_loss\n1,40.5,1.2\n2,,1.1\n3,61.0,0.9\n")
    top1 = folder.curve()
    assert top1[0] == 40.5 and math.isnan(top1[1]) and top1[2] == 61.0
    assert folder.curve("val_loss") == [1.2, 1.1, 0.9]
    assert all(math.isnan(v) for v in folder.curve("no_such_column"))


def test_claim_refuses_another_run_keeps_the_callers_files_and_overwrites_only_run_files(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.claim()  # no folder yet: nothing to refuse
    folder.path.mkdir()
    (folder.path / "marker.json").write_text("{}")
    (folder.path / ".checkpoint_last.pt.123.tmp").write_text("torn")  # a killed atomic write's temp
    folder.claim(keep=("marker.json",))  # only the caller's file and a temp: counts as empty
    folder.results.write_text("{}")
    folder.metrics.write_text("epoch\n1\n")
    (folder.path / "notes.txt").write_text("mine")
    with pytest.raises(AttnlabError, match="already holds a run"):
        folder.claim(keep=("marker.json",))
    folder.claim(overwrite=True, keep=("marker.json",))
    assert sorted(p.name for p in folder.path.iterdir()) == ["marker.json", "notes.txt"]
    assert not folder.is_complete() and not folder.has_checkpoint()


def test_no_engine_module_names_a_file_of_a_room_above_it():
    # The engine learns what to keep from its caller (train's keep=...): it never spells bench's marker itself.
    engine = (ROOT / "attnlab" / "engine").glob("*.py")
    assert not [p.name for p in engine if "bench_cell" in p.read_text()]


@pytest.mark.parametrize("config, message", [
    ({"model": {"attention": "none"}}, "is not an attnlab checkpoint .* a 'model' section that names the model"),
    ({"model": {"name": "resnet20", "attention_kwargs": [1]}}, "attention_kwargs must be a dict, got list"),
    ({"model": {"name": "resnet20"}, "train": {"eval_batch_size": 10}}, "config has no 'data' section"),
    ({"model": {"name": "resnet20"}, "data": {"name": "cifar10"}}, "config has no 'train' section"),
])
def test_a_checkpoint_config_of_the_wrong_shape_is_one_line(tmp_path, config, message):
    path = tmp_path / "checkpoint_best.pt"
    torch.save({"model": attnlab.create_model("resnet20").state_dict(), "config": config}, path)
    with pytest.raises(AttnlabError, match=message):
        open_run(path, "cpu").loaders()


def test_data_folder_advice_names_the_option_of_the_commands_that_open_a_run(tmp_path):
    from attnlab.data.sources import open_source
    from attnlab.engine.run_folder import data_dir_hint_as_option
    for kwargs in ({"name": "imagefolder"}, {"name": "imagefolder", "data_dir": tmp_path / "gone"},
                   {"name": "cifar10", "data_dir": tmp_path / "gone"}):
        with pytest.raises(AttnlabError) as info, data_dir_hint_as_option():
            open_source(**kwargs)
        assert "--data-dir" in str(info.value) and "data.data_dir" not in str(info.value)
