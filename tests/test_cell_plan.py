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
    whole_cifar = tiny_matrix_text({"none": "none", "se": "se"}).replace(  # steps are faked: no image is read
        "  data.subset: 8\n  data.val_size: 20\n  data.test_subset: 5\n", "")
    matrix.write_text(whole_cifar.replace("  train.epochs: 1\n", "  train.epochs: 1\n  train.amp: bf16\n"))
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


def test_an_epoch_counts_the_images_the_engine_draws(cell_plan):
    from attnlab.engine.config import load_config
    data = lambda *o: load_config(None, ["data.name=cifar10", *o]).data
    assert cell_plan.epoch_images(data(), "m") == (45_000, 5_000 + 10_000)  # a tenth held out of 50,000
    # 8 per class of 10 classes, 20 of them held out; 5 test images per class
    assert cell_plan.epoch_images(data("data.subset=8", "data.val_size=20", "data.test_subset=5"), "m") == (60, 70)
    assert cell_plan.epoch_images(data("data.val_size=0.2"), "m") == (40_000, 20_000)


def test_step_rate_trains_the_configs_model(cell_plan, tmp_path):
    from attnlab.engine.config import load_config
    cfg = load_config(None, ["model.name=resnet20", "model.attention=se", "train.batch_size=4"])
    assert cell_plan.step_rate(cfg, "fp32", 1, steps=1) > 0


def test_step_rate_times_the_compiled_model_when_the_recipe_compiles(cell_plan, monkeypatch):
    from attnlab.engine.config import load_config
    compiled = []

    def fake_compile(model):  # torch.compile itself takes most of a minute on a CPU: record the call instead
        compiled.append(type(model).__name__)
        return model
    monkeypatch.setattr(cell_plan.torch, "compile", fake_compile)
    base = ["model.name=resnet20", "model.attention=none", "train.batch_size=4"]
    assert cell_plan.step_rate(load_config(None, base), "fp32", 1, steps=1) > 0 and compiled == []
    assert cell_plan.step_rate(load_config(None, [*base, "train.compile=true"]), "fp32", 1, steps=1) > 0
    assert compiled == ["ResNet"]


def test_compare_eager_times_a_compiling_matrix_both_ways(cell_plan, tmp_path, monkeypatch):
    matrix = tmp_path / "tiny.yaml"
    matrix.write_text(tiny_matrix_text({"none": "none"}).replace("  train.epochs: 1\n",
                                                                "  train.epochs: 1\n  train.compile: true\n"))
    # compiled steps at 120 images/s, eager ones at 100 (per thread count)
    monkeypatch.setattr(cell_plan, "step_rate",
                        lambda cfg, prec, threads, steps: (120.0 if cfg.train.compile else 100.0) * threads)
    monkeypatch.setattr(cell_plan.torch, "get_num_threads", lambda: 2)
    out_path = tmp_path / "plan.json"
    cell_plan.main(["--matrix", str(matrix), "--out", str(out_path), "--compare-eager"])
    none = json.loads(out_path.read_text())["methods"]["none"]
    assert none["compile"] is True and none["images_per_s_1_thread"] == 120.0
    assert none["eager_images_per_s_1_thread"] == 100.0 and none["compile_speedup_1_thread"] == 1.2
    cell_plan.main(["--matrix", str(matrix), "--out", str(out_path)])  # without the flag: compiled rates only
    assert "eager_images_per_s_1_thread" not in json.loads(out_path.read_text())["methods"]["none"]


def test_no_plan_where_bench_would_refuse_the_precision(cell_plan, tmp_path, monkeypatch):
    from attnlab.bench.matrix import cells, load_matrix
    matrix = tmp_path / "tiny.yaml"
    matrix.write_text(tiny_matrix_text({"none": "none", "se": "se"}).replace("  train.epochs: 1\n",
                                                                            "  train.epochs: 1\n  train.amp: bf16\n"))
    (none0,) = cells(load_matrix(matrix), only=["none"])
    results = tmp_path / "results"
    results.mkdir()
    done = {"method": "none", "seed": 0, "status": "ok", "precision": "bf16", "overrides": none0["overrides"]}
    (results / "runs.jsonl").write_text(json.dumps(done) + "\n")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # a CPU without native bf16
    timed = []
    monkeypatch.setattr(cell_plan, "step_rate", lambda *args: timed.append(args) or 100.0)
    with pytest.raises(SystemExit, match=r"no plan for this machine: .*none seed 0 trained in bf16, but here "
                                         r"se seed 0 would train in fp32"):
        cell_plan.main(["--matrix", str(matrix), "--results", str(results)])
    assert not timed and not (results / "cell_plan.json").exists()
    # Where the CPU has native bf16 the cells train in bf16 like the finished one: the plan is made.
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(cell_plan.torch, "get_num_threads", lambda: 2)
    cell_plan.main(["--matrix", str(matrix), "--results", str(results)])
    assert json.loads((results / "cell_plan.json").read_text())["methods"]["se"]["precision"] == "bf16"
