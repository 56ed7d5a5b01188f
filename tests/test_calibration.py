"""benchmarks/calibration.py: the schedule is chosen on validation, and bf16 is set against its fp32 twin."""
import json
from pathlib import Path

import pytest
from conftest import load_benchmark

from attnlab.errors import AttnlabError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cal():
    return load_benchmark("calibration")


def _record(method, seed, val, test, precision="bf16", ips=500.0):
    return {"method": method, "seed": seed, "status": "ok", "val_top1": val, "test_top1": test,
            "wall_time_s": 3600.0, "precision": precision, "train_images_per_s": ips, "threads": 1}


def test_the_shortest_schedule_within_the_tolerance_of_the_longest_is_chosen_on_val(cal, tmp_path):
    res = tmp_path / "cal"
    res.mkdir()
    records = [_record("e15", 0, 88.0, 87.5), _record("e30", 0, 89.6, 80.0),  # e30's test is bad: not read
               _record("e60", 0, 90.0, 89.9), _record("e60", 1, 90.2, 90.1), _record("e30", 1, 89.8, 89.0),
               _record("e30_fp32", 0, 89.5, 89.2, "fp32", 300.0), _record("e30_fp32", 1, 89.9, 89.4, "fp32", 320.0),
               {"method": "e90", "seed": 0, "status": "failed", "error": "x"}]
    (res / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cal.main(["--results", str(res)])
    out = json.loads((res / "calibration.json").read_text())
    assert [r["epochs"] for r in out["schedules"]] == [15, 30, 60]  # the failed e90 is not a schedule
    choice = out["choice"]
    assert choice["longest_epochs"] == 60 and choice["ceiling_val_top1"] == pytest.approx(90.1)
    assert choice["chosen_epochs"] == 30 and choice["chosen_val_top1"] == pytest.approx(89.7)  # 90.1 - 0.5 <= 89.7
    pair = json.loads((res / "precision.json").read_text())["pairs"][0]
    assert pair["epochs"] == 30 and pair["seeds"] == [0, 1]
    assert pair["val_top1"]["bf16_minus_fp32"]["diff"] == pytest.approx(0.0)
    assert pair["train_images_per_s"]["bf16_over_fp32"] == pytest.approx(500.0 / 310.0)
    assert (res / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    cal.main(["--results", str(res), "--tolerance", "0.1"])
    assert json.loads((res / "calibration.json").read_text())["choice"]["chosen_epochs"] == 60


def test_no_speed_ratio_between_cells_that_ran_at_different_thread_counts(cal, tmp_path):
    res = tmp_path / "cal"
    res.mkdir()
    fp32 = {**_record("e15_fp32", 0, 84.5, 84.5, "fp32", 385.0), "threads": 2}  # the machine to itself
    records = [_record("e15", 0, 84.4, 84.2, ips=232.0), fp32]  # one thread beside another cell
    (res / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cal.main(["--results", str(res)])
    pair = json.loads((res / "precision.json").read_text())["pairs"][0]
    assert pair["train_images_per_s"]["bf16_over_fp32"] is None and pair["threads"] == [1, 2]
    assert "not comparable" in pair["note"]
    assert pair["test_top1"]["bf16_minus_fp32"]["diff"] == pytest.approx(-0.3)
    # One seed a side: no interval, written as null (strict JSON), not NaN.
    strict = json.loads((res / "precision.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    interval = strict["pairs"][0]["val_top1"]["bf16_minus_fp32"]
    assert interval["low"] is None and interval["high"] is None and interval["diff"] == pytest.approx(-0.1)


def test_no_speed_ratio_between_cells_that_ran_on_different_processors(cal, tmp_path):
    res = tmp_path / "cal"
    res.mkdir()
    zen4, xeon = {"processor": "AMD EPYC"}, {"processor": "Intel(R) Xeon(R) Processor @ 2.80GHz"}
    records = [{**_record("e30", 0, 86.4, 86.3, ips=560.0), "threads": 2, "host": zen4},
               {**_record("e30_fp32", 0, 86.5, 86.2, "fp32", 263.0), "threads": 2, "host": xeon}]
    (res / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cal.main(["--results", str(res)])
    pair = json.loads((res / "precision.json").read_text())["pairs"][0]
    assert pair["ran_on"] == {"bf16": ["2 threads, AMD EPYC"], "fp32": ["2 threads, Intel Xeon @ 2.80GHz"]}
    assert pair["threads"] == [2] and pair["processors"] == sorted([zen4["processor"], xeon["processor"]])
    assert pair["train_images_per_s"]["bf16_over_fp32"] is None and "not comparable" in pair["note"]
    # On one processor at one thread count the ratio is there.
    records[1]["host"] = zen4
    (res / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cal.main(["--results", str(res)])
    pair = json.loads((res / "precision.json").read_text())["pairs"][0]
    assert pair["train_images_per_s"]["bf16_over_fp32"] == pytest.approx(560.0 / 263.0)


def test_the_tables_replace_the_readme_block_and_nothing_else(cal, tmp_path):
    res = tmp_path / "results" / "cal"
    res.mkdir(parents=True)
    records = [_record("e15", 0, 88.0, 87.5), _record("e30", 0, 89.6, 89.5), _record("e30", 1, 89.8, 89.0),
               _record("e30_fp32", 0, 89.5, 89.2, "fp32", 300.0)]
    (res / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    other = "<!-- results:begin -->\nanother matrix's table\n<!-- results:end -->"
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n<!-- results:cifar10_calibration:begin -->\nold\n"
                      f"<!-- results:cifar10_calibration:end -->\n{other}\n")
    cal.main(["--results", str(res), "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and other in text and text.startswith("intro\n")
    assert "| 30 epochs | bf16 | 2 | 89.70 ± 0.14 | 89.25 ± 0.35 |" in text
    assert "Chosen: **30 epochs**" in text                       # 89.70 is within 0.5 of e30 itself, the longest
    # One seed a side: the difference without an interval; links point into the results folder from the README.
    assert "| 30 epochs | 0 | 89.60 | 89.50 | +0.10 (one seed a side: no interval) |" in text
    assert "(results/cal/calibration.json)" in text
    assert "(calibration.json)" in (res / "calibration.md").read_text()
    # A README without the calibration block is refused, and the matrix block is not taken instead.
    readme.write_text(f"intro\n{other}\n")
    with pytest.raises(AttnlabError, match="results:cifar10_calibration:begin"):
        cal.main(["--results", str(res), "--readme", str(readme)])
    assert readme.read_text() == f"intro\n{other}\n"


def test_an_fp32_seed_without_its_bf16_twin_is_listed_apart_not_paired(cal, tmp_path):
    res = tmp_path / "cal"
    res.mkdir()
    records = [_record("e60", 0, 87.9, 87.8), _record("e60_fp32", 0, 88.2, 87.6, "fp32"),
               {**_record("e60_fp32", 1, 88.0, 87.7, "fp32"), "threads": 2, "wall_time_s": 7200.0},
               _record("e90", 0, 88.1, 87.7)]  # a schedule without a twin is nothing to wait for
    (res / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:cifar10_calibration:begin -->\n<!-- results:cifar10_calibration:end -->\n")
    cal.main(["--results", str(res), "--readme", str(readme)])
    precision = json.loads((res / "precision.json").read_text())
    assert [p["seeds"] for p in precision["pairs"]] == [[0]]  # seed 1 has no bf16 cell: not in the Welch pair
    (waiting,) = precision["unpaired"]
    assert waiting["method"] == "e60_fp32" and waiting["seed"] == 1 and waiting["waits_for"] == "e60 seed 1"
    assert waiting["val_top1"] == 88.0 and waiting["train_hours"] == 2.0
    assert ("Finished but not in the comparison yet (no bf16 cell of the same seed): e60_fp32 seed 1 (fp32): "
            "val 88.00, test 87.70, 2.00 h (2 threads, ?), waiting for e60 seed 1.") in readme.read_text()
    # Once the bf16 seed is there, the pair takes both seeds and nothing waits.
    records.append(_record("e60", 1, 87.7, 87.9))
    (res / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cal.main(["--results", str(res)])
    precision = json.loads((res / "precision.json").read_text())
    assert precision["pairs"][0]["seeds"] == [0, 1] and precision["unpaired"] == []


def test_nothing_is_written_without_finished_cells_or_before_the_readme_is_found(cal, tmp_path):
    res = tmp_path / "cal"
    res.mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:cifar10_calibration:begin -->\nkept\n<!-- results:cifar10_calibration:end -->\n")
    with pytest.raises(AttnlabError, match="cal/runs.jsonl does not exist"):
        cal.main(["--results", str(res), "--readme", str(readme)])
    (res / "runs.jsonl").write_text("")  # tables of nothing would replace the README's block
    with pytest.raises(AttnlabError, match="holds no finished calibration cell; nothing was written"):
        cal.main(["--results", str(res), "--readme", str(readme)])
    (res / "runs.jsonl").write_text(json.dumps(_record("e15", 0, 88.0, 87.5)) + "\n")
    with pytest.raises(AttnlabError, match="README not found"):
        cal.main(["--results", str(res), "--readme", str(tmp_path / "nope.md")])
    assert sorted(p.name for p in res.iterdir()) == ["runs.jsonl"] and "kept" in readme.read_text()
