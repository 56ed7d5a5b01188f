"""benchmarks/ssia_screen.py (issue 31's screen: the table ranked on validation only, each design's step cost) and
the engine's synthetic step it times."""
import json
import time
from pathlib import Path

import pytest
import torch

from attnlab.bench.stats import mde
from attnlab.engine import step_timer
from attnlab.engine.config import load_config
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture
def screen():
    return load_benchmark("ssia_screen")


def record(method, val, test, speed, seed=0, **extra):
    return {"matrix": "ssia_screen", "method": method, "seed": seed, "status": "ok", "val_top1": val,
            "test_top1": test, "train_images_per_s": speed, "precision": "bf16", "device": "cpu (x86_64, 1 threads)",
            "threads": 1, **extra}


def _repeated_seeds() -> str:
    """runs.jsonl lines of none at 2 seeds and se at 3 (validation 80, 82 and 81, 81, 84)."""
    groups = (("none", (80.0, 82.0)), ("se", (81.0, 81.0, 84.0)))
    return "".join(json.dumps(record(m, v, 0, 1, seed=i)) + "\n" for m, vals in groups for i, v in enumerate(vals))


@pytest.fixture
def setup(screen, tmp_path, monkeypatch):
    """The real screen matrix, reusing a converged folder of our own; the SD from a file of our own."""
    from attnlab.bench.matrix import cells, fingerprint, load_matrix
    converged, folder = tmp_path / "converged", tmp_path / "screen"
    converged.mkdir()
    folder.mkdir()
    text = (ROOT / "benchmarks" / "matrices" / "ssia_screen.yaml").read_text()
    text = text.replace("reuse: [results/cifar10_resnet20_converged]", f"reuse: [{converged}]")
    text = text.replace("recipe: configs/", f"recipe: {ROOT}/configs/")
    matrix_path = tmp_path / "screen.yaml"
    matrix_path.write_text(text)
    matrix = load_matrix(matrix_path)
    none0 = next(c for c in cells(matrix) if c["method"] == "none")
    same = {"fingerprint": fingerprint(matrix, none0), "recipe_digest": matrix["recipe_digest"]}
    # The converged matrix's none at seeds 1 and 0 (file order is not seed order): seed 0 is the screen's.
    (converged / "runs.jsonl").write_text(json.dumps({**record("none", 99.0, 99.0, 300.0, seed=1), **same}) + "\n"
                                          + json.dumps({**record("none", 87.0, 87.91, 300.0), **same}) + "\n")
    sd = tmp_path / "sd.jsonl"
    sd.write_text(_repeated_seeds())
    monkeypatch.setattr(screen, "SD_SOURCES", (sd,))
    monkeypatch.setattr(screen, "ROOT", tmp_path)
    return matrix_path, folder


def test_table_ranks_on_validation_and_never_shows_test(screen, setup):
    matrix_path, folder = setup
    # byot is best on validation and worst on test: the table must follow validation and hold no test number.
    rows = [record("byot-w0.5", 87.5, 86.13, 250.0), record("maps-w0.5", 86.25, 88.77, 290.0),
            record("attn-w2", 86.5, 88.55, 2000.0, device="cuda:0 (NVIDIA H100)"),
            {"method": "cam-w2", "seed": 0, "status": "failed"}]
    (folder / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "cost.json").write_text(json.dumps({"methods": {"byot-w0.5": {"step_ratio": 1.19}}}))
    screen.main(["table", "--matrix", str(matrix_path), "--out", str(folder)])
    t = json.loads((folder / "screen.json").read_text())
    ranked = [r["method"] for r in t["rows"] if r.get("rank")]
    from attnlab.bench.matrix import load_matrix
    assert ranked == ["byot-w0.5", "none", "attn-w2", "maps-w0.5"] and t["cells_done"] == 4
    assert t["cells"] == len(load_matrix(matrix_path)["methods"])  # one seed each: every method is a row
    byot, none = t["rows"][0], t["rows"][1]
    assert none["val_top1"] == 87.0 and none["seed"] == 0  # the reused seed-0 cell, not seed 1's 99.0
    assert byot["val_vs_none"] == 0.5 and byot["step_ratio"] == 1.19 and byot["cell_speed_ratio"] == 1.2
    assert byot["design"] == "self_distill" and byot["weight"] == 0.5 and byot["warmup_epochs"] == 0
    attn = t["rows"][2]
    assert attn["val_vs_none"] == -0.5 and attn["cell_speed_ratio"] is None  # a GPU cell against a CPU none
    shuffled = next(r for r in t["rows"] if r["method"] == "cam-shuffled")
    assert shuffled["shuffled"] and shuffled["design"] == "cam" and shuffled["val_top1"] is None
    text = (folder / "screen.md").read_text() + (folder / "screen.json").read_text()
    for test_value in ("87.91", "86.13", "88.77", "88.55"):
        assert test_value not in text
    assert "test_top1" not in text
    # The smallest detectable difference between two single cells, from the pooled SD (by hand: sqrt(8 / 3), 3 df).
    assert t["val_sd"]["df"] == 3 and t["val_sd"]["source"] == "sd.jsonl"
    assert t["mde_one_seed_each"] == pytest.approx(mde((8 / 3) ** 0.5, 1, 1, 3), abs=0.01)
    assert not (folder / "runs.jsonl").read_text().count("reused_from")  # the table writes no record


def test_table_merges_a_slots_cells_first(screen, setup, tmp_path):
    matrix_path, folder = setup
    slot = tmp_path / "slot_runs.jsonl"
    slot.write_text(json.dumps({**record("cam-w2", 86.0, 85.0, 900.0), "fingerprint": None}) + "\n")
    screen.main(["table", "--matrix", str(matrix_path), "--out", str(folder), "--merge", str(slot)])
    rows = {r["method"]: r for r in json.loads((folder / "screen.json").read_text())["rows"]}
    assert rows["cam-w2"]["val_vs_none"] == -1.0 and rows["cam-w2"]["rank"] == 2


def test_a_baseline_or_method_the_matrix_lacks_is_refused_before_anything_is_written(screen, setup, capsys):
    matrix_path, folder = setup
    (folder / "runs.jsonl").write_text(json.dumps(record("maps-w0.5", 86.25, 88.77, 290.0)) + "\n")
    for argv, message in ((["table", "--baseline", "nnoe"], "--baseline nnoe: the matrix has no such method"),
                          (["cost", "--only", "mpas-w0.5"], "--only: the matrix has no method mpas-w0.5")):
        with pytest.raises(SystemExit):
            screen.main([*argv, "--matrix", str(matrix_path), "--out", str(folder)])
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["runs.jsonl"]  # no table of blank comparisons


def test_val_sd_pools_the_first_matrix_with_repeated_seeds(screen, tmp_path):
    one_seed, repeated = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    one_seed.write_text(json.dumps(record("none", 80.0, 0, 1)) + "\n")
    repeated.write_text(_repeated_seeds())
    screen.ROOT = tmp_path  # sources are reported relative to the repository
    out = screen.val_sd((one_seed, repeated))
    # by hand: none s^2 = 2 (1 df), se s^2 = 3 (2 df): pooled sqrt((2 + 6) / 3)
    assert out["df"] == 3 and out["sd"] == pytest.approx((8 / 3) ** 0.5) and out["source"] == "b.jsonl"


@pytest.fixture
def fake_clock(screen, monkeypatch):
    """A fake clock the interleaving reads: a teacher step costs 2, a self_distill step 1.5, any other 1. Returns the
    list of the steps taken, in order."""
    clock, calls = [0.0], []

    def fake_step(cfg, precision, seed=0):
        design = cfg.ssia.design if cfg.ssia.enabled else "plain"
        cost = {"teacher": 2.0, "self_distill": 1.5}.get(design, 1.0)

        def step():
            calls.append(design if design in ("teacher", "self_distill") else "plain")
            clock[0] += cost
        return step
    monkeypatch.setattr(screen, "synthetic_step", fake_step)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    return calls


QUICK = ["--steps", "2", "--warmup", "1", "--rounds", "1"]


def test_cost_times_each_design_against_the_plain_step_interleaved(screen, tmp_path, fake_clock):
    calls = fake_clock
    screen.main(["cost", "--only", "teacher-w2", *QUICK, "--out", str(tmp_path)])
    out = json.loads((tmp_path / "cost.json").read_text())
    assert set(out["methods"]) == {"none", "teacher-w2"} and out["compiled"] is False
    assert out["methods"]["none"]["step_ratio"] == 1.0  # the A/A row
    assert out["methods"]["teacher-w2"]["step_ratio"] == 2.0
    assert calls[-6:] == ["plain", "teacher", "teacher", "plain", "plain", "teacher"]  # A B, B A, A B


def test_cost_only_adds_its_rows_to_the_ones_measured_before(screen, tmp_path, fake_clock):
    screen.main(["cost", "--only", "teacher-w2", *QUICK, "--out", str(tmp_path)])
    screen.main(["cost", "--only", "byot-aux0.1", *QUICK, "--out", str(tmp_path)])
    out = json.loads((tmp_path / "cost.json").read_text())
    assert set(out["methods"]) == {"none", "teacher-w2", "byot-aux0.1"}
    assert out["methods"]["teacher-w2"]["step_ratio"] == 2.0 and out["methods"]["byot-aux0.1"]["step_ratio"] == 1.5
    assert [c.split(" --only ")[1].split()[0] for c in out["commands"]] == ["teacher-w2", "byot-aux0.1"]


def test_cost_refuses_to_add_rows_measured_otherwise_before_timing_anything(screen, tmp_path, fake_clock):
    screen.main(["cost", "--only", "teacher-w2", *QUICK, "--out", str(tmp_path)])
    before, n_steps = (tmp_path / "cost.json").read_text(), len(fake_clock)
    with pytest.raises(SystemExit, match="threads 1.*with 2"):
        screen.main(["cost", "--only", "byot-aux0.1", *QUICK, "--threads", "2", "--out", str(tmp_path)])
    assert (tmp_path / "cost.json").read_text() == before and len(fake_clock) == n_steps


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
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # as the engine lays it out
    for was, module in zip(before, (model, aux)):  # both optimised
        assert any(not torch.equal(was[k], v) for k, v in module.state_dict().items())
