"""train.amp on a CPU: bf16 autocast where the CPU has native bf16, fp32 with a one-line notice where it has not,
and the precision recorded with the run."""
import json
from pathlib import Path

import pytest
import torch

from attnlab.engine import precision
from attnlab.engine.config import load_config
from attnlab.engine.train import train
from attnlab.objectives import Objective, _OBJECTIVES, register_objective

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


class DtypeProbe(Objective):
    """Records the dtype of the last stage's output at every training step; adds nothing to the loss."""
    features = "stages"
    dtypes: list = []

    def __init__(self, **_):
        pass

    def __call__(self, *, model, logits, targets, features, epoch, step):
        DtypeProbe.dtypes.append(features["stages"][-1].dtype)
        return {}


@pytest.fixture(autouse=True)
def probe():
    register_objective("dtype_probe", defaults={"enabled": False})(DtypeProbe)
    DtypeProbe.dtypes.clear()
    yield
    _OBJECTIVES.pop("dtype_probe", None)


@pytest.mark.parametrize("amp, native, expected, notice", [
    ("auto", True, "fp32", False),   # the default keeps CPU runs in fp32, as before bf16 support
    ("off", True, "fp32", False),
    ("bf16", True, "bf16", False),
    ("bf16", False, "fp32", True),  # emulated bf16 is slower than fp32: refuse, and say so
    ("fp16", True, "fp32", True),   # fp16 autocast is a CUDA choice
])
def test_cpu_precision_follows_amp_and_the_cpu(monkeypatch, amp, native, expected, notice):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    got, message = precision.resolve_precision(CPU, amp)
    assert got == expected and (message is not None) == notice
    if message:
        assert "\n" not in message and f"train.amp={amp}" in message


def test_cuda_precision_is_unchanged():
    cuda = torch.device("cuda")
    assert precision.resolve_precision(cuda, "auto") == ("bf16", None)
    assert precision.resolve_precision(cuda, "fp16") == ("fp16", None)
    assert precision.resolve_precision(cuda, "off") == ("fp32", None)


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch, "cpu", None, raising=False)  # no torch query: the flags decide
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"avx2", "avx512_bf16"})
    assert precision.cpu_has_native_bf16()
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"avx2", "fma"})
    assert not precision.cpu_has_native_bf16()


def _tiny_run(tmp, name, amp):
    cfg = load_config(None, [f"name={name}", f"out_dir={tmp}", f"data.cache_dir={tmp}/cache", "data.subset=10",
                             "data.test_subset=5", "train.batch_size=32", "train.eval_batch_size=64",
                             "train.epochs=1", "device=cpu", f"train.amp={amp}", "dtype_probe.enabled=true"])
    return train(cfg)


@pytest.mark.needs_data("cifar10")
def test_bf16_autocast_trains_on_a_cpu_that_has_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    results = _tiny_run(tmp_path, "bf16", "bf16")
    assert DtypeProbe.dtypes and all(d == torch.bfloat16 for d in DtypeProbe.dtypes)
    saved = json.loads((tmp_path / "bf16" / "results.json").read_text())
    assert results["precision"] == saved["precision"] == "bf16" and saved["epochs_by_precision"] == {"bf16": 1}
    assert "in bf16" in capsys.readouterr().out


@pytest.mark.needs_data("cifar10")
def test_a_cpu_without_bf16_trains_in_fp32_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    results = _tiny_run(tmp_path, "nobf16", "bf16")
    assert DtypeProbe.dtypes and all(d == torch.float32 for d in DtypeProbe.dtypes)
    assert results["precision"] == "fp32"
    out = capsys.readouterr().out
    assert sum("has no native bf16" in line for line in out.splitlines()) == 1
