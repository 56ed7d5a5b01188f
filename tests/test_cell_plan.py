"""benchmarks/cell_plan.py: a plan per machine from measured step rates (precision, workers x threads, cell time)."""
import json
from pathlib import Path

import pytest

from attnlab.engine import precision
from matrix_helpers import tiny_matrix_text
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cell_plan():
    return load_benchmark("cell_plan")


def test_plan_says_precision_workers_and_which_cells_fit(cell_plan, tmp_path, monkeypatch, capsys):
    matrix = tmp_path / "tiny.yaml"
    matrix.write_text(tiny_matrix_text({"none": "none", "se": "se"}).replace("  train.epochs: 1\n",
                                                                            "  train.epochs: 1\n  train.amp: bf16\n"))
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # as on an AVX2 machine
    rates = {1: 100.0, 2: 150.0}  # images/s at 1 and at 2 threads: two one-thread cells (200) beat one (150)
    monkeypatch.setattr(cell_plan, "step_rate", lambda cfg, prec, threads, steps: rates[threads])
    monkeypatch.setattr(cell_plan.torch, "get_num_threads", lambda: 2)
    out_path = tmp_path / "plan.json"
    cell_plan.main(["--matrix", str(matrix), "--out", str(out_path), "--limit", "0.3"])
    out = json.loads(out_path.read_text())
    assert out["workers"] == 2 and out["threads"] == 1
    assert out["notices"] and "no native bf16" in out["notices"][0]
    none = out["methods"]["none"]
    assert none["precision"] == "fp32" and none["epochs"] == 1
    # 1 epoch of CIFAR-10: 45,000 / 100 + 15,000 / 300 = 500 s at one thread; 333 s with 2 threads
    assert none["expected_cell_hours"] == pytest.approx(500 / 3600, abs=0.01) and none["setting"] == "shared"
    assert out["commands"] == [f"attnlab bench --matrix {matrix} --only none,se --workers 2 --threads 1 --budget 18m"]
    cell_plan.main(["--matrix", str(matrix), "--out", str(out_path), "--limit", "0.12"])  # 7.2 min: alone only
    out = json.loads(out_path.read_text())
    assert out["methods"]["se"]["setting"] == "alone" and out["methods"]["se"]["expected_cell_hours_alone"] < 0.12
    assert out["commands"] == [f"attnlab bench --matrix {matrix} --only none,se --workers 1 --threads 2 --budget 7m"]
    cell_plan.main(["--matrix", str(matrix), "--out", str(out_path), "--limit", "0.05"])
    assert json.loads(out_path.read_text())["methods"]["none"]["setting"] == "too long"
    assert "no native bf16" in capsys.readouterr().out


def test_step_rate_trains_the_configs_model(cell_plan, tmp_path):
    from attnlab.engine.config import load_config
    cfg = load_config(None, ["model.name=resnet20", "model.attention=se", "train.batch_size=4"])
    assert cell_plan.step_rate(cfg, "fp32", 1, steps=1) > 0
