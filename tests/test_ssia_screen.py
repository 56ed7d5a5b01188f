"""benchmarks/ssia_screen.py (issue 31's screen: the table ranked on validation only, each design's step cost) and
the engine's synthetic step it times."""
import json

import pytest
import torch

from attnlab.bench.stats import mde
from attnlab.engine import step_timer
from attnlab.engine.config import load_config
from conftest import load_benchmark



@pytest.fixture
def screen():
    return load_benchmark("ssia_screen")


def record(method, val, test, speed, seed=0):
    return {"matrix": "ssia_screen", "method": method, "seed": seed, "status": "ok", "val_top1": val,
            "test_top1": test, "train_images_per_s": speed, "precision": "bf16"}


def test_table_ranks_on_validation_and_never_shows_test(screen, tmp_path):
    # byot is best on validation and worst on test: the table must follow validation and hold no test number.
    rows = [record("none", 87.0, 87.91, 300.0), record("byot-w0.5", 87.5, 86.13, 250.0),
            record("maps-w0.5", 86.25, 88.77, 290.0), {"method": "cam-w2", "seed": 0, "status": "failed"}]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "cost.json").write_text(json.dumps({"methods": {"byot-w0.5": {"step_ratio": 1.19}}}))
    screen.main(["table", "--out", str(tmp_path)])
    t = json.loads((tmp_path / "screen.json").read_text())
    ranked = [r["method"] for r in t["rows"] if r.get("rank")]
    assert ranked == ["byot-w0.5", "none", "maps-w0.5"] and t["cells_done"] == 3 and t["cells"] == 15
    byot = t["rows"][0]
    assert byot["val_vs_none"] == 0.5 and byot["step_ratio"] == 1.19 and byot["cell_speed_ratio"] == 1.2
    assert byot["design"] == "self_distill" and byot["weight"] == 0.5 and byot["warmup_epochs"] == 0
    shuffled = next(r for r in t["rows"] if r["method"] == "cam-shuffled")
    assert shuffled["shuffled"] and shuffled["design"] == "cam" and shuffled["val_top1"] is None
    text = (tmp_path / "screen.md").read_text() + (tmp_path / "screen.json").read_text()
    for test_value in ("87.91", "86.13", "88.77"):
        assert test_value not in text
    assert "test_top1" not in text
    # The smallest detectable difference between two single cells, from the pooled SD of a multi-seed matrix.
    sd = t["val_sd"]
    assert sd["df"] >= 2 and t["mde_one_seed_each"] == pytest.approx(mde(sd["sd"], 1, 1, sd["df"]), abs=0.01)


def test_table_merges_a_slots_cells_first(screen, tmp_path):
    slot = tmp_path / "slot_runs.jsonl"
    slot.write_text(json.dumps({**record("cam-w2", 86.0, 85.0, 900.0), "fingerprint": None}) + "\n")
    (tmp_path / "runs.jsonl").write_text(json.dumps(record("none", 87.0, 87.9, 300.0)) + "\n")
    screen.main(["table", "--out", str(tmp_path), "--merge", str(slot)])
    rows = {r["method"]: r for r in json.loads((tmp_path / "screen.json").read_text())["rows"]}
    assert rows["cam-w2"]["val_vs_none"] == -1.0 and rows["cam-w2"]["rank"] == 2


def test_val_sd_pools_the_first_matrix_with_repeated_seeds(screen, tmp_path):
    one_seed, repeated = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    one_seed.write_text(json.dumps(record("none", 80.0, 0, 1)) + "\n")
    repeated.write_text("".join(json.dumps(record(m, v, 0, 1, seed=s)) + "\n"
                                for m, vals in (("none", (80.0, 82.0)), ("se", (81.0, 81.0, 84.0)))
                                for s, v in enumerate(vals)))
    screen.ROOT = tmp_path  # sources are reported relative to the repository
    out = screen.val_sd((one_seed, repeated))
    # by hand: none s^2 = 2 (1 df), se s^2 = 3 (2 df): pooled sqrt((2 + 6) / 3)
    assert out["df"] == 3 and out["sd"] == pytest.approx((8 / 3) ** 0.5) and out["source"] == "b.jsonl"


def test_cost_times_each_design_against_the_plain_step_interleaved(screen, tmp_path, monkeypatch):
    clock, calls = [0.0], []

    def fake_step(cfg, precision, seed=0):  # a fake clock: the teacher's step costs twice the plain one
        cost = 2.0 if cfg.ssia.enabled and cfg.ssia.design == "teacher" else 1.0

        def step():
            calls.append("teacher" if cost == 2.0 else "plain")
            clock[0] += cost
        return step
    monkeypatch.setattr(screen, "synthetic_step", fake_step)
    monkeypatch.setattr(screen.time, "perf_counter", lambda: clock[0])
    screen.main(["cost", "--only", "teacher-w2", "--steps", "2", "--warmup", "1", "--rounds", "1",
                 "--out", str(tmp_path)])
    out = json.loads((tmp_path / "cost.json").read_text())
    assert set(out["methods"]) == {"none", "teacher-w2"} and out["compiled"] is False
    assert out["methods"]["none"]["step_ratio"] == 1.0  # the A/A row
    assert out["methods"]["teacher-w2"]["step_ratio"] == 2.0
    assert calls[-6:] == ["plain", "teacher", "teacher", "plain", "plain", "teacher"]  # A B, B A, A B


def test_synthetic_step_trains_the_objectives_modules_and_runs_the_teacher_twice(monkeypatch):
    cfg = load_config(None, ["model.name=resnet20", "train.batch_size=4", "ssia.enabled=true",
                             "ssia.design=teacher", "train.epochs=3"])
    import attnlab.objectives as objectives
    models, modules = [], []
    real_model, real_modules = step_timer.model_from_config, objectives.training_modules
    monkeypatch.setattr(step_timer, "model_from_config", lambda c: models.append(real_model(c)) or models[-1])
    monkeypatch.setattr(objectives, "training_modules", lambda objs: modules.append(real_modules(objs)) or modules[-1])
    step = step_timer.synthetic_step(cfg, "fp32")
    (model,), (aux,) = models, modules
    assert aux is not None  # the teacher's training-only gate
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, aux)]
    step()
    assert len(forwards) == 2  # the student and the weight-shared teacher
    for was, module in zip(before, (model, aux)):  # both optimised
        assert any(not torch.equal(was[k], v) for k, v in module.state_dict().items())
