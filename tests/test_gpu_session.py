"""benchmarks/gpu/session.sh, the script a GPU lease runs: here on the CPU with a tiny matrix, since the script's
bookkeeping (state folder, budget, resuming, what lands in $OUT) is the same on any device."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab.data.sources import open_source
from attnlab.errors import AttnlabError
from matrix_helpers import tiny_matrix_text

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "session.sh"


def _session(tmp_path, *phases, **env):
    full = dict(os.environ, OUT=str(tmp_path / "out"), STATE=str(tmp_path / "state"), PYTHON=sys.executable)
    full.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(SCRIPT), *phases], env=full, capture_output=True, text=True, timeout=300)


def _data_root():
    try:
        return open_source("cifar10").root.parent
    except AttnlabError:
        pytest.skip("CIFAR-10 not found")


def test_session_runs_a_matrix_resumes_and_collects_its_files(tmp_path):
    matrix = tmp_path / "tiny.yaml"
    matrix.write_text(tiny_matrix_text({"none": "none"}, latency="{batch_sizes: [1], warmup: 1, repeats: 2, rounds: 1}"))
    env = dict(MATRIX="tiny", MATRIX_FILE=matrix, ATTNLAB_DATA=_data_root(), BUDGET_S=400)
    done = _session(tmp_path, "matrix", "latency", **env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    runs = [json.loads(line) for line in (out / "tiny_runs.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seed"], r["status"]) for r in runs] == [("none", 0, "ok")]
    assert Path(runs[0]["run_dir"]).is_relative_to(tmp_path / "state" / "runs")  # not the checkout's runs/
    assert "1 ran, 0 failed" in (out / "matrix.log").read_text()
    assert "cpu" in json.loads((out / "tiny_latency.json").read_text())["methods"]["none"]

    # A second call on the same (warm) machine resumes from the state folder: nothing runs again.
    again = _session(tmp_path, "matrix", **env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 ran, 0 failed, 1 skipped" in (out / "matrix.log").read_text()
    assert len((out / "tiny_runs.jsonl").read_text().splitlines()) == 1


def test_session_skips_the_matrix_when_the_budget_is_spent_and_rejects_unknown_phases(tmp_path):
    env = dict(ATTNLAB_DATA=_data_root(), BUDGET_S=30)
    skipped = _session(tmp_path, "matrix", **env)
    assert skipped.returncode == 0 and "skipped" in skipped.stdout and "BUDGET_S=30" in skipped.stdout
    bad = _session(tmp_path, "latency", "benchmark", **env)  # checked before the latency phase would run
    assert bad.returncode == 2 and "unknown phase 'benchmark'" in bad.stderr
    assert not (tmp_path / "out" / "latency.log").exists()
