"""benchmarks/gpu/session.sh, the script a GPU lease runs: here on the CPU with a tiny matrix, since the script's
bookkeeping (state folder, budget, resuming, what lands in $OUT) is the same on any device."""
import json
import os
import subprocess
import sys
from pathlib import Path


from conftest import require_dataset
from matrix_helpers import tiny_matrix_text

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "session.sh"


def _session(tmp_path, *phases, **env):
    full = dict(os.environ, OUT=str(tmp_path / "out"), STATE=str(tmp_path / "state"), PYTHON=sys.executable)
    full.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(SCRIPT), *phases], env=full, capture_output=True, text=True, timeout=900)


def _data_root():
    return require_dataset("cifar10").parent


def test_session_runs_a_matrix_resumes_and_collects_its_files(tmp_path):
    matrix = tmp_path / "tiny.yaml"
    matrix.write_text(tiny_matrix_text({"none": "none"},
                                       latency="{batch_sizes: [1], warmup: 1, repeats: 2, rounds: 1}"))
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


def _lane(tmp_path, name, methods):
    path = tmp_path / f"{name}.yaml"
    path.write_text(tiny_matrix_text(methods).replace("name: tiny", f"name: {name}"))
    return path


def test_slot_dry_run_checks_every_lane_and_trains_nothing(tmp_path):
    a, b = _lane(tmp_path, "lane_a", {"none": "none"}), _lane(tmp_path, "lane_b", {"se": "se", "bad": "nope"})
    done = _session(tmp_path, "slot", DRY_RUN=1, SLOT_CHECK=0, SLOT_DEVICE="cpu", SLOT_MATRICES=f"{a}:2 {b}:1",
                    ATTNLAB_DATA=_data_root(), BUDGET_S=400)
    assert done.returncode == 1, done.stdout + done.stderr  # lane_b has a config error
    assert "lane_a: 1 cells (0 finished)" in done.stdout and "lane_b: 2 cells (0 finished)" in done.stdout
    assert "CONFIG ERROR" in done.stdout and "device=cpu" in done.stdout
    assert not (tmp_path / "state" / "runs").exists()


def test_slot_runs_the_lanes_side_by_side_within_the_budget(tmp_path):
    a, b = _lane(tmp_path, "lane_a", {"none": "none"}), _lane(tmp_path, "lane_b", {"se": "se", "eca": "eca"})
    env = dict(SLOT_CHECK=0, SLOT_DEVICE="cpu", SLOT_MATRICES=f"{a}:1 {b}:2", ATTNLAB_DATA=_data_root(), BUDGET_S=400)
    done = _session(tmp_path, "slot", **env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    for name, methods in (("lane_a", {"none"}), ("lane_b", {"se", "eca"})):
        runs = [json.loads(line) for line in (out / f"{name}_runs.jsonl").read_text().splitlines()]
        assert {r["method"] for r in runs} == methods and all(r["status"] == "ok" for r in runs)
        assert "--budget" in (out / f"slot_{name}.log").read_text()
    lane_b = [json.loads(line) for line in (out / "lane_b_runs.jsonl").read_text().splitlines()]
    assert all(r["workers"] == 2 for r in lane_b)
    # Too little budget left: the slot starts nothing and says so.
    late = _session(tmp_path, "slot", **dict(env, BUDGET_S=30))
    assert late.returncode == 0 and "nothing started" in late.stdout


def test_stream_lane_dry_run_on_the_cpu_names_a_bottleneck(tmp_path):
    """The `stream` phase's python part at a tiny size on the CPU: a generated folder, the loader alone, the step
    alone and one engine epoch, all counted; the JSON names the slower of the first two as the bottleneck."""
    tiny = ("--images 16 --val-images 4 --image-size 32 --batch-size 8 --epochs 1 --workers 1 --step-repeats 2 "
            "--model resnet20")
    done = _session(tmp_path, "stream", ATTNLAB_DATA=_data_root(), BUDGET_S=900, STREAM_DEVICE="cpu",
                    STREAM_ARGS=tiny)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "stream_train.json").read_text())
    assert res["loader_alone"]["images"] == 16 and res["step_alone"]["steps"] == 2
    assert res["engine"]["steps"] == 2 and res["engine"]["epochs"] == 1
    rates = {"loader": res["loader_alone"]["images_per_s"], "step": res["step_alone"]["images_per_s"]}
    assert min(rates.values()) > 0 and res["bottleneck"] == min(rates, key=rates.get)
    assert (tmp_path / "state" / "stream_folder" / "train").is_dir()  # kept for a second call on a warm machine
    assert "stream lane: engine" in (tmp_path / "out" / "stream.log").read_text()
