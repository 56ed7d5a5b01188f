"""`attnlab profile` end to end, and bad input: one line on stderr, exit code 2, no traceback."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab import create_model
from attnlab.cli import main
from attnlab.measure import count_params

ROOT = Path(__file__).resolve().parents[1]

BAD_INPUT = [
    (["--model", "resnet5"], r"unknown model 'resnet5'.*valid choices: .*resnet50"),
    (["--attention", "sse"], r"unknown attention 'sse'.*valid choices: .*cbam.*eca.*se"),
    (["--attention", "se", "--attention-kwargs", "ratio=8"], r"'se' has no option 'ratio'; valid options: reduction"),
    (["--attention", "se", "--attention-kwargs", "reduction=0"], r"reduction must be an integer >= 1, got 0"),
    (["--attention", "eca", "--attention-kwargs", "kernel_size=4"], r"kernel_size must be an odd integer"),
    (["--attention", "se", "--attention-kwargs", "reduction"], r"'reduction' is not KEY=VALUE"),
    (["--num-classes", "0"], r"num_classes must be an integer >= 1, got 0"),
    (["--attention", "se", "--blocks", "7"], r"stage 7 out of range; this model has stages 0..2"),
    (["--attention", "se", "--blocks", "layer3"], r"blocks='layer3' is not understood; use 'all'"),
    (["--attention", "se", "--blocks", "{2: [5]}"], r"stage 2 has blocks 0..2, got block 5"),
    (["--device", "tpu"], r"unknown device 'tpu'; valid choices: cpu, cuda"),
    (["--batch-sizes", "0"], r"batch sizes must be >= 1"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_bad_input_exits_2_with_one_line(args, message, capsys, tmp_path):
    argv = ["profile", "--model", "resnet20", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
            "--out", str(tmp_path / "x.json")]
    with pytest.raises(SystemExit) as info:
        main(argv + args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("attnlab: error: ")
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "x.json").exists()


def run_cli(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "attnlab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_bad_input_in_a_subprocess():
    proc = run_cli("profile", "--model", "resnet5")
    assert proc.returncode == 2
    assert proc.stderr.startswith("attnlab: error: unknown model 'resnet5'")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "resnet50" in proc.stderr and "cifar_resnet18" in proc.stderr
    # argparse's own errors (a non-integer where an integer is due) also exit 2 without a traceback.
    proc = run_cli("profile", "--num-classes", "ten")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "invalid int value" in proc.stderr


def test_profile_writes_default_json_and_prints_table(tmp_path):
    proc = run_cli("profile", "--model", "resnet20", "--attention", "eca", "--batch-sizes", "1", "2",
                   "--repeats", "2", "--warmup", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "runs" / "profile" / "resnet20_eca.json"   # beside the runs, not in results/
    assert not (tmp_path / "results").exists()
    data = json.loads(path.read_text())
    assert data["model"] == "resnet20" and data["attention"] == "eca"
    assert data["input_size"] == [3, 32, 32]  # the model's default input size
    assert set(data["latency"]) == {"1", "2"}
    assert "FLOPs = 2 x MACs" in proc.stdout and "median" in proc.stdout
    assert f"{data['params']:,}" in proc.stdout


def test_profile_options_reach_the_model(tmp_path, capsys):
    out = tmp_path / "p.json"
    with pytest.raises(SystemExit) as info:
        main(["profile", "--model", "resnet20", "--attention", "se", "--attention-kwargs", "reduction=4",
              "bias=false", "--blocks", "{2: [0, 2]}", "--num-classes", "3", "--input-size", "16",
              "--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--json", str(out)])  # --out's old name
    assert info.value.code == 0
    data = json.loads(out.read_text())
    assert data["attention_kwargs"] == {"reduction": 4, "bias": False}
    assert data["input_size"] == [3, 16, 16]
    # resnet20 (10 -> 3 classes): fc 64*3+3; two SE modules on 64 channels, hidden 16, no bias: 2*(2*64*16).
    assert data["params"] == count_params(create_model("resnet20", num_classes=3)) + 2 * (2 * 64 * 16)
    assert "wrote" in capsys.readouterr().out


def test_top_level_help_is_for_users(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    from attnlab.cli import COMMANDS
    for name, (_, help_text) in COMMANDS.items():
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), name
    assert "examples:" in out and "attnlab train --config configs/quick.yaml" in out and "torchrun" in out
    assert "add_arguments" not in out and "AttnlabError" not in out   # no developer text


def test_every_option_of_every_command_has_help():
    import argparse

    from attnlab.cli import COMMANDS, build_parser
    import importlib

    parser = build_parser({n: importlib.import_module(m) for n, (m, _) in COMMANDS.items()})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help and action.help.strip(), f"attnlab {name} {action.option_strings or action.dest}"


def test_version_is_the_package_version(capsys):
    import attnlab

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"attnlab {attnlab.__version__}"
    assert f'version = "{attnlab.__version__}"' in (ROOT / "pyproject.toml").read_text()


def test_list_names_what_a_recipe_can_use(capsys):
    import attnlab
    from attnlab.data import list_datasets
    from attnlab.objectives import objective_defaults

    def listed(*args):
        with pytest.raises(SystemExit) as info:
            main(["list", *args])
        assert info.value.code == 0
        return capsys.readouterr().out

    models = listed("models")
    assert [line.split()[0] for line in models.splitlines()] == sorted(
        attnlab.list_models(), key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
    attention = listed("attention")
    assert all(re.search(rf"^{n}\s", attention, re.M) for n in attnlab.attention.names())
    assert "time_steps=2" in attention and "reduction=16" in attention
    datasets = listed("datasets")
    names = [line.split()[0] for line in datasets.splitlines()]
    assert sorted(names) == sorted(list_datasets())  # every name data.name takes, once
    assert "data.metadata=" in datasets.splitlines()[names.index("wsol")]
    objectives = listed("objectives")
    assert all(f"{name}.{key}=" in objectives for name, d in objective_defaults().items() for key in d)
    everything = listed()
    assert all(f"{kind}:" in everything for kind in ("models", "attention", "datasets", "objectives"))
    with pytest.raises(SystemExit) as info:
        main(["list", "losses"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def _torch_file(path, obj):
    import torch
    torch.save(obj, path)
    return path


class _NotPlain:  # pickled by torch.save below: a class, which weights_only loading refuses
    pass


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b""), r"is empty \(0 bytes\): cut short or never written"),
    (lambda p: p.write_text("name: quick\n"), r"is not a PyTorch file: a text file \(it begins 'name: quick'\)$"),
    (lambda p: p.write_bytes(bytes(range(1, 64))), r"is not a PyTorch file: neither a zip archive nor a pickle$"),
    (lambda p: p.write_bytes(_torch_file(p, {"w": [1.0] * 1000}).read_bytes()[:300]),
     r"corrupt or truncated \(RuntimeError: PytorchStreamReader failed reading zip archive"),
    (lambda p: _torch_file(p, {"x": _NotPlain()}),
     r"holds more than tensors and plain values.*never unpickled: that could run code\)$"),
])
def test_an_unreadable_checkpoint_is_one_line_without_torchs_advice_to_unpickle_it(make, message, capsys, tmp_path):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(SystemExit) as info:
        main(["eval", "--checkpoint", str(path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert re.search(message, err.strip()), err
    assert "weights_only" not in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["eval", "--checkpoint", "x", "--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
    (["localize", "--checkpoint", "x", "--batch-size", "-1"], "argument --batch-size: must be a positive integer"),
    (["show", "--checkpoint", "x", "--images", "0"], "argument --images: must be a positive integer"),
    (["export", "--checkpoint", "x", "--onnx", "x.onnx", "--input-size", "-4"],
     "argument --input-size: must be a positive integer, got '-4'"),
    (["eval", "--checkpoint", "x", "--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
    (["localize", "--checkpoint", "x", "--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
])
def test_a_size_of_zero_or_an_unknown_device_is_refused_not_replaced_by_a_default(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "Traceback" not in err


def test_an_unknown_device_in_a_recipe_is_refused():
    from attnlab.engine.distributed import resolve_device
    from attnlab.errors import AttnlabError
    with pytest.raises(AttnlabError, match=r"unknown device 'gpu'.*valid choices: auto, cpu, cuda"):
        resolve_device("gpu")
    assert resolve_device("cpu").type == "cpu"


def test_overrides_may_come_before_between_and_after_the_options(monkeypatch):
    import importlib
    from attnlab.cli import COMMANDS, build_parser
    modules = {n: importlib.import_module(m) for n, (m, _) in COMMANDS.items()}
    argv = ["train", "name=x", "--config", "configs/quick.yaml", "train.epochs=1", "--overwrite", "seed=3"]
    with pytest.raises(SystemExit):  # argparse alone takes only the first run of key=value words
        build_parser(modules).parse_args(argv)
    seen = {}
    monkeypatch.setattr(modules["train"], "run", lambda args: seen.update(vars(args)) or 0)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert seen["overrides"] == ["name=x", "train.epochs=1", "seed=3"] and seen["overwrite"] is True
