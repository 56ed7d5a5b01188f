"""The commands of the README and of its usage page (docs/usage.md) work as written: every `attnlab` line parses and
its recipe and overrides load, the README's Python block runs, the single-node torchrun line trains (2 CPU ranks,
gloo) at tiny size with the files the usage page's table lists, and the tools the README puts on PATH are in the
environment's bin/."""
import importlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab.cli import COMMANDS, build_parser
from attnlab.engine.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
USAGE = (ROOT / "docs" / "usage.md").read_text()


def blocks(lang, text=README + USAGE):
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def shell_commands():
    """Each command of the README's and the usage page's bash blocks: comments dropped, continuations joined,
    `&&` split."""
    text = "\n".join(blocks("bash")).replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.extend(part.strip() for part in line.split("&&"))
    return out


def attnlab_args(command):
    words = shlex.split(command)
    if words[0] == "torchrun":
        words = words[words.index("attnlab"):]  # what torchrun's `-m attnlab` receives
    assert words[0] == "attnlab", command
    return words[1:]


def test_readme_names_the_commands_it_uses():
    commands = shell_commands()
    assert "source .venv/bin/activate" in commands
    assert any(c.startswith("torchrun --nproc_per_node 2 -m attnlab train") for c in commands)
    assert any(c.startswith("tensorboard --logdir runs") for c in commands)
    assert sum(c.startswith("attnlab ") for c in commands) >= 8


def test_every_attnlab_command_parses_and_its_recipe_loads():
    parser = build_parser({n: importlib.import_module(m) for n, (m, _) in COMMANDS.items()})
    for command in shell_commands():
        if not command.startswith(("attnlab", "torchrun")):
            continue
        args = attnlab_args(command)
        if args in (["--help"],):
            continue
        try:
            ns = parser.parse_args(args)
        except SystemExit as e:  # argparse exits 2 on an unknown option
            raise AssertionError(f"README command does not parse: {command}") from e
        if ns.command == "train" and ns.config:
            assert (ROOT / ns.config).is_file(), command
            load_config(ROOT / ns.config, ns.overrides)  # every override key exists and type-checks
        if ns.command == "bench":
            assert (ROOT / ns.matrix).is_file(), command
        if ns.command == "report":
            assert (ROOT / ns.results_dir / "runs.jsonl").is_file(), command


PLACEHOLDERS = ("...", "<", "RECIPE", "METHODS", "$")  # a sketch of a command, not one to run as written


def docs_commands():
    """Each `attnlab` or `torchrun ... -m attnlab` line of every fenced block of docs/*.md (placeholders skipped)."""
    out = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for part in line.split(" #", 1)[0].split("&&"):
                    part = part.strip()
                    if part.startswith(("attnlab ", "torchrun ")) and not any(p in part for p in PLACEHOLDERS):
                        out.append((page.name, part))
    return out


def test_every_command_of_the_docs_parses_and_its_recipe_loads():
    """As above, for the pages under docs/: a recipe with a data folder of its own still has to accept the
    overrides the page gives it (a wsol dataset, for one, refuses a held-out val_size)."""
    parser = build_parser({n: importlib.import_module(m) for n, (m, _) in COMMANDS.items()})
    commands = docs_commands()
    assert len(commands) >= 20 and {page for page, _ in commands} >= {"imagenet.md", "wsol.md", "ean.md"}
    for page, command in commands:
        try:
            ns = parser.parse_args(attnlab_args(command))
        except SystemExit as e:
            raise AssertionError(f"docs/{page}: command does not parse: {command}") from e
        if getattr(ns, "config", None) and ns.command == "train":
            assert (ROOT / ns.config).is_file(), (page, command)
            load_config(ROOT / ns.config, ns.overrides)


def test_train_commands_use_their_own_run_names():
    """`make demo` made runs/quick: a README train command must not write into it again."""
    trains = [c for c in shell_commands() if " train --config " in c]
    assert trains and all("name=" in c for c in trains), trains


def test_the_python_block_runs():
    (code,) = blocks("python", README)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    logits, feats = scope["logits"], scope["feats"]
    assert logits.shape == (2, 100) and len(feats["stages"]) == 3


def test_the_environment_has_the_tools_the_readme_puts_on_path():
    bin_dir = Path(sys.executable).parent
    for tool in ("attnlab", "torchrun", "tensorboard"):
        assert (bin_dir / tool).is_file(), f"{tool} is not in {bin_dir}"


def run_files_listed():
    section = USAGE[USAGE.index("### Where a run's files go"):]
    table = section[section.index("| file |"):]
    table = table[:table.index("\n\n")]
    return [re.match(r"\| `([^`]+)`", row).group(1) for row in table.splitlines()[2:]]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.needs_data("cifar10")
def test_single_node_torchrun_command_as_written(tmp_path):
    (command,) = [c for c in shell_commands() if c.startswith("torchrun --nproc_per_node 2")]
    words = shlex.split(command)
    torchrun = Path(sys.executable).parent / "torchrun"
    tiny = [f"out_dir={tmp_path}", f"data.cache_dir={tmp_path}/cache", "data.subset=20", "data.val_size=20",
            "data.test_subset=10", "train.epochs=1", "train.batch_size=32", "train.eval_batch_size=50",
            "debug.max_steps_per_epoch=2", "device=cpu"]
    # PET_MASTER_PORT is torchrun's own environment default for --master_port: a free port, same command.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PET_MASTER_PORT=str(free_port()))
    proc = subprocess.run([str(torchrun), *words[1:], *tiny], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = next(w.split("=", 1)[1] for w in words if w.startswith("name="))
    run_dir = tmp_path / name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2                              # two ranks trained together
    assert "x 2 ranks" in proc.stdout and "of 32 " in proc.stdout   # the 32 is the global batch
    for pattern in run_files_listed():                          # every file the usage page says a run writes
        assert list(run_dir.glob(pattern)), f"{pattern} missing from {sorted(p.name for p in run_dir.iterdir())}"


def test_the_usage_pages_table_of_training_keys_names_each_key_with_its_default():
    """Every `train.` key of the config schema is in the table, every key the table names exists, and each row's
    defaults (its second column, in the order of its keys) are the schema's."""
    from attnlab.engine.config import schema, to_dict
    from attnlab.engine.train import _flatten
    section = USAGE.split("### The training recipe's keys", 1)[1].split("\n### ", 1)[0]
    named = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            keys, given, _ = line.split(" | ")
            names, values = re.findall(r"`([\w.]+)`", keys), [v.strip() for v in given.split(",")]
            assert len(names) == len(values), line
            named.update(zip(names, values))
    defaults = _flatten(to_dict(schema())["train"])
    assert set(named) == set(defaults)
    for key, value in named.items():
        want = defaults[key]
        if isinstance(want, (bool, str, list)):
            assert str(want).lower() == value, key
        else:
            assert float(want) == float(value), key


def test_the_usage_pages_matrix_example_loads_with_the_default_latency(tmp_path):
    import yaml
    from attnlab.bench import load_matrix
    from attnlab.bench.matrix import LATENCY_DEFAULTS
    (example,) = [b for b in blocks("yaml", USAGE) if b.startswith("name: my_matrix")]
    path = tmp_path / "my_matrix.yaml"
    path.write_text(example.replace("configs/quick.yaml", str(ROOT / "configs" / "quick.yaml")))
    matrix = load_matrix(path)
    assert [m["name"] for m in matrix["methods"]] == ["none", "se", "se_r4"] and len(matrix["claims"]) == 2
    assert yaml.safe_load(example)["latency"] == LATENCY_DEFAULTS
