"""attnlab bench: matrix files, cells, dry runs, runs.jsonl bookkeeping, and a tiny real matrix that resumes."""
import importlib.util
import json
from pathlib import Path

import pytest

import attnlab.attention
from attnlab import cli
from attnlab.bench import (append_line, cells, format_value, load_matrix, read_runs, run_matrix, slug)
from attnlab.errors import AttnlabError
from matrix_helpers import tiny_matrix_text

ROOT = Path(__file__).resolve().parents[1]
MATRICES = ROOT / "benchmarks" / "matrices"


def _write(tmp_path, text, name="m.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_matrices_load_and_cover_every_method(tmp_path):
    for path in sorted(MATRICES.glob("*.yaml")):
        load_matrix(path)  # every shipped matrix is valid (recipe found, keys known)
    for name in ("cpu_proxy", "cifar10_resnet18", "cifar10_resnet164"):
        m = load_matrix(MATRICES / f"{name}.yaml")
        if importlib.util.find_spec("attnlab.engine.config"):  # every cell's config passes the engine's checks
            assert run_matrix(m, dry_run=True, results_root=tmp_path, log=lambda s: None)["config_errors"] == 0
        assert m["name"] == name and len(m["seeds"]) == 3
        attentions = {meth["overrides"].get("model.attention", "none") for meth in m["methods"]}
        # Every registered attention module is benchmarked, plus SSIA alone and SSIA on top of SE.
        assert attentions == set(attnlab.attention.names()), name
        ssia = {meth["name"]: meth["overrides"].get("ssia.enabled") for meth in m["methods"]}
        assert ssia["ssia"] is True and ssia["ssia+se"] is True and not ssia["se"] and not ssia["none"]


def test_load_matrix_rejects_bad_files(tmp_path):
    with pytest.raises(AttnlabError, match="not found"):
        load_matrix(tmp_path / "missing.yaml")
    with pytest.raises(AttnlabError, match="unknown key.*metods"):
        load_matrix(_write(tmp_path, "metods: []\n"))
    with pytest.raises(AttnlabError, match="'se' listed twice"):
        load_matrix(_write(tmp_path, "methods: [se, {name: se}]\nseeds: [0]\n"))
    with pytest.raises(AttnlabError, match="recipe 'nope.yaml' not found"):
        load_matrix(_write(tmp_path, "recipe: nope.yaml\nmethods: [se]\n"))
    with pytest.raises(AttnlabError, match="seeds"):
        load_matrix(_write(tmp_path, "methods: [se]\nseeds: [a]\n"))
    with pytest.raises(AttnlabError, match="non-empty list"):
        load_matrix(_write(tmp_path, "methods: []\n"))


def test_cells_overrides_and_names(tmp_path):
    m = load_matrix(_write(tmp_path, """
overrides: {train.epochs: 2, model.blocks: [1, 2]}
methods:
  - {name: none, overrides: {model.attention: none}}
  - {name: ssia+se, overrides: {model.attention: se, ssia.enabled: true, train.epochs: 3}}
seeds: [0, 1]
"""))
    cs = cells(m)
    # Seed-major order: a half-finished matrix already has every method once.
    assert [(c["method"], c["seed"]) for c in cs] == [("none", 0), ("ssia+se", 0), ("none", 1), ("ssia+se", 1)]
    assert cs[1]["run_name"] == "ssia_se-s0" and slug("a b/c") == "a_b_c"
    assert cs[1]["overrides"]["train.epochs"] == 3  # the method's override wins over the matrix's
    assert format_value(True) == "true" and format_value(None) == "null" and format_value([1, 2]) == "[1, 2]"
    assert [(c["method"], c["seed"]) for c in cells(m, seeds=[5], only=["ssia+se"])] == [("ssia+se", 5)]
    with pytest.raises(AttnlabError, match="unknown method 'sse'.*ssia\\+se"):
        cells(m, only=["sse"])


def test_append_line_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "r" / "runs.jsonl"
    append_line(path, {"method": "a", "seed": 0})
    with open(path, "a") as f:
        f.write('{"method": "b", "se')  # the process died mid-write
    assert [r["method"] for r in read_runs(path)] == ["a"]
    append_line(path, {"method": "c", "seed": 0})
    assert [r["method"] for r in read_runs(path)] == ["a", "c"]


def test_dry_run_lists_cells_and_runs_nothing(tmp_path, capsys):
    path = _write(tmp_path, "name: tiny\nmethods: [none, {name: se, overrides: {model.attention: se}}]\n"
                            "seeds: [0, 1]\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--matrix", str(path), "--dry-run", "--results-root", str(tmp_path / "res"),
                  "--runs-root", str(tmp_path / "runs")])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "4 cells (0 finished)" in out
    assert "[2/4] se seed 0: to run" in out and "model.attention=se" in out and "seed=0" in out
    assert not (tmp_path / "res").exists() and not (tmp_path / "runs").exists()


def test_dry_run_flags_bad_config(tmp_path, capsys):
    pytest.importorskip("attnlab.engine.config")
    path = _write(tmp_path, "methods: [{name: typo, overrides: {train.epoch: 1}}, "
                            "{name: bad, overrides: {model.attention: nope}}]\n")
    counts = run_matrix(load_matrix(path), dry_run=True, results_root=tmp_path / "res", runs_root=tmp_path / "runs")
    out = capsys.readouterr().out
    assert counts["config_errors"] == 2
    assert "typo seed 0: to run" in out and "CONFIG ERROR" in out and "train.epoch" in out
    assert "unknown attention 'nope'" in out


def test_tiny_matrix_runs_records_failures_and_resumes(tmp_path, capsys):
    pytest.importorskip("attnlab.engine.train")
    path = _write(tmp_path, tiny_matrix_text({"none": "none", "bogus": "nope", "se": "se"}))
    res, runs = tmp_path / "res", tmp_path / "runs"
    matrix = load_matrix(path)
    counts = run_matrix(matrix, results_root=res, runs_root=runs)
    assert counts == {"total": 3, "skipped": 0, "ok": 2, "failed": 1}
    lines = read_runs(res / "tiny" / "runs.jsonl")
    assert [(r["method"], r["status"]) for r in lines] == [("none", "ok"), ("bogus", "failed"), ("se", "ok")]
    bogus = lines[1]
    assert "nope" in bogus["error"] and "\n" not in bogus["error"]
    for r in (lines[0], lines[2]):
        assert 0 <= r["test_top1"] <= r["test_top5"] <= 100 and 0 <= r["val_top1"] <= r["val_top5"] <= 100
        assert r["params"] > 0 and r["flops"] > 0 and r["device"].startswith("cpu")
        assert Path(r["run_dir"]).name == f"{r['method']}-s0" and (Path(r["run_dir"]) / "metrics.csv").is_file()
        assert len(r["val_curve"]) == 1
    assert lines[2]["params"] > lines[0]["params"]  # SE adds parameters
    latency = json.loads((res / "tiny" / "latency.json").read_text())
    assert set(latency["methods"]["se"]["cpu"]["batch"]) == {"1", "2"}
    assert latency["methods"]["se"]["cpu"]["batch"]["2"]["n"] == 2 and latency["methods"]["se"]["cpu"]["threads"] >= 1
    assert "error" in latency["methods"]["bogus"]
    out = capsys.readouterr().out
    assert "[1/3] none seed 0: running" in out and "[3/3] se seed 0" in out and "FAILED" in out

    # Again: every cell is finished (the failed one too), nothing runs, nothing is appended.
    counts = run_matrix(matrix, results_root=res, runs_root=runs)
    assert counts == {"total": 3, "skipped": 3, "ok": 0, "failed": 0}
    assert len(read_runs(res / "tiny" / "runs.jsonl")) == 3
    assert "finished earlier" in capsys.readouterr().out

    # --retry-failed re-runs only the failed cell; a changed matrix is refused rather than mixed in.
    counts = run_matrix(matrix, results_root=res, runs_root=runs, retry_failed=True, latency=False)
    assert counts == {"total": 3, "skipped": 2, "ok": 0, "failed": 1}
    assert len(read_runs(res / "tiny" / "runs.jsonl")) == 4
    changed = load_matrix(_write(tmp_path, path.read_text().replace("train.epochs: 1", "train.epochs: 2")))
    with pytest.raises(AttnlabError, match="other settings"):
        run_matrix(changed, results_root=res, runs_root=runs)
