"""attnlab bench: matrix files, cells, dry runs, runs.jsonl bookkeeping, and a tiny real matrix that resumes."""
import json
import os
from pathlib import Path

import pytest

import attnlab.attention
from attnlab import cli
from attnlab.bench import cells, fingerprint, format_value, load_matrix, run_matrix, slug
from attnlab.bench.budget import Estimates, parse_duration
from attnlab.bench.runs import cell_lock
from attnlab.errors import AttnlabError
from attnlab.jsonl import append_jsonl, read_jsonl
from matrix_helpers import tiny_matrix_text

ROOT = Path(__file__).resolve().parents[1]
MATRICES = ROOT / "benchmarks" / "matrices"


def _counts(**given):
    return {"total": 0, "skipped": 0, "ok": 0, "failed": 0, "deferred": 0, "interrupted": 0, "busy": 0, **given}


def _write(tmp_path, text, name="m.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_matrices_load_and_cover_every_method(tmp_path):
    for path in sorted(MATRICES.glob("*.yaml")):
        load_matrix(path)  # every shipped matrix is valid (recipe found, keys known)
    for name in ("cpu_proxy", "cifar10_resnet18", "cifar10_resnet164"):
        m = load_matrix(MATRICES / f"{name}.yaml")
        # every cell's config passes the engine's checks
        assert run_matrix(m, dry_run=True, results_root=tmp_path, log=lambda s: None)["config_errors"] == 0
        assert m["name"] == name and len(m["seeds"]) == 3
        attentions = {meth["overrides"].get("model.attention", "none") for meth in m["methods"]}
        # Every registered attention module is benchmarked, plus SSIA alone and SSIA on top of SE.
        assert attentions == set(attnlab.attention.names()), name
        ssia = {meth["name"]: meth["overrides"].get("ssia.enabled") for meth in m["methods"]}
        assert ssia["ssia"] is True and ssia["ssia+se"] is True and not ssia["se"] and not ssia["none"]
    # The converged matrix and its calibration: every cell valid; 5 seeds where the claims need them.
    for name in ("cifar10_resnet20_converged", "cifar10_calibration"):
        m = load_matrix(MATRICES / f"{name}.yaml")
        assert run_matrix(m, dry_run=True, results_root=tmp_path, log=lambda s: None)["config_errors"] == 0
    m = load_matrix(MATRICES / "cifar10_resnet20_converged.yaml")
    by_seeds = {meth["name"]: len(cells(m, only=[meth["name"]])) for meth in m["methods"]}
    assert all(n >= 3 for n in by_seeds.values()) and by_seeds["none"] == by_seeds["se"] == by_seeds["cbam"] == 5
    # The evidence matrix: 3 seeds, every cell valid, and a claim for each paper the project is built on.
    m = load_matrix(MATRICES / "cifar10_resnet20.yaml")
    assert len(m["seeds"]) == 3 and m["overrides"]["train.epochs"] == 20
    assert run_matrix(m, dry_run=True, results_root=tmp_path, log=lambda s: None)["config_errors"] == 0
    assert {(c["method"], c["baseline"]) for c in m["claims"]} == {
        ("ssia", "se"), ("ssia", "cbam"), ("spe", "se"), ("tdam", "se"), ("tdam", "cbam"), ("dia", "none")}


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
    with pytest.raises(AttnlabError, match=r"'a\+b' and 'a_b' share the run folder name 'a_b'"):
        load_matrix(_write(tmp_path, "methods: [a+b, a_b]\n"))
    for latency, message in [("{repeat: 3}", "unknown key.*repeat"), ("{batch_sizes: 1}", "batch_sizes must be"),
                             ("{repeats: x}", "repeats must be an integer >= 1"),
                             ("{threads: 0}", "threads must be an integer >= 1")]:
        with pytest.raises(AttnlabError, match=message):
            load_matrix(_write(tmp_path, f"methods: [se]\nlatency: {latency}\n"))
    assert load_matrix(_write(tmp_path, "methods: [se]\nlatency: {repeats: 7}\n"))["latency"]["threads"] == 1


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


def test_a_failure_counts_as_done_only_under_the_settings_and_recipe_it_failed_with(tmp_path):
    from attnlab.bench.runs import is_done
    matrix = load_matrix(_write(tmp_path, tiny_matrix_text({"se": "se"})))
    (cell,) = cells(matrix)
    ok = {"status": "ok", "fingerprint": fingerprint(matrix, cell), "recipe_digest": "aaa"}
    failed = dict(ok, status="failed")
    matrix["recipe_digest"] = "aaa"
    assert not is_done(None, matrix, cell, retry_failed=False)
    assert is_done(ok, matrix, cell, retry_failed=True) and is_done(failed, matrix, cell, retry_failed=False)
    assert not is_done(failed, matrix, cell, retry_failed=True)
    other = load_matrix(_write(tmp_path, tiny_matrix_text({"se": "eca"}), "other.yaml"))
    assert not is_done(failed, other, cells(other)[0], retry_failed=False)  # the method was mended
    matrix["recipe_digest"] = "bbb"
    assert not is_done(failed, matrix, cell, retry_failed=False)  # the recipe was mended
    assert is_done(ok, matrix, cell, retry_failed=False)  # a result stays (_pending refuses to mix it)


def test_a_method_may_run_its_own_seeds_in_seed_major_order(tmp_path):
    from attnlab.bench.matrix import cells
    path = _write(tmp_path, "seeds: [0, 1]\nmethods:\n  - {name: none, seeds: [0, 1, 2, 3]}\n  - se\n"
                            "  - {name: cbam, seeds: [1, 5]}\n")
    m = load_matrix(path)
    assert [(c["method"], c["seed"]) for c in cells(m)] == [
        ("none", 0), ("se", 0), ("none", 1), ("se", 1), ("cbam", 1), ("none", 2), ("none", 3), ("cbam", 5)]
    # --seeds 1,3: those seeds for a method without its own list; a method's own list still limits it.
    assert [(c["method"], c["seed"]) for c in cells(m, seeds=[1, 3])] == [("none", 1), ("se", 1), ("cbam", 1),
                                                                          ("none", 3), ("se", 3)]
    with pytest.raises(AttnlabError, match="method 'se': 'seeds' must be a non-empty list of integers >= 0"):
        load_matrix(_write(tmp_path, "methods: [{name: se, seeds: []}]\n", "bad.yaml"))
    with pytest.raises(AttnlabError, match="'seeds' must be a non-empty list of integers >= 0"):
        load_matrix(_write(tmp_path, "seeds: [0, -1]\nmethods: [se]\n", "negative.yaml"))
    with pytest.raises(AttnlabError, match=r"is not valid YAML: .* at line 3, column 1 \(while parsing a flow "
                                           r"sequence begun at line 2, column 10\)$"):
        load_matrix(_write(tmp_path, "seeds: [0]\nmethods: [{name: se}\n", "broken.yaml"))


def test_dry_run_flags_bad_config(tmp_path, capsys):
    path = _write(tmp_path, "seeds: [0, 1]\nmethods: [{name: typo, overrides: {train.epoch: 1}}, "
                            "{name: bad, overrides: {model.attention: nope}}, "
                            "{name: r0, overrides: {model.attention: se, model.attention_kwargs: {reduction: 0}}}, "
                            "{name: fine, overrides: {model.attention: se}}]\n")
    counts = run_matrix(load_matrix(path), dry_run=True, results_root=tmp_path / "res", runs_root=tmp_path / "runs")
    out = capsys.readouterr().out
    assert counts["config_errors"] == 6  # every seed of the three bad methods
    assert "typo seed 0: to run" in out and "CONFIG ERROR" in out and "train.epoch" in out
    assert "unknown attention 'nope'" in out
    assert out.count("reduction must be an integer >= 1") == 2  # the model is built: module options are checked
    assert "fine seed 1: to run; overrides:" in out and "CONFIG ERROR" not in out.split("fine seed 1")[1]


@pytest.mark.parametrize("flags, message", [
    (["--latency-only", "--no-latency"], "--latency-only times latency and trains nothing: it conflicts with "
                                         "--no-latency"),
    (["--latency-only", "--dry-run"], "it conflicts with --dry-run"),
])
def test_contradictory_flags_are_refused_before_anything_runs(tmp_path, capsys, flags, message):
    path = _write(tmp_path, tiny_matrix_text({"none": "none"}))
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--matrix", str(path), "--results-root", str(tmp_path / "res"), *flags])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "res").exists()
    with pytest.raises(SystemExit) as info:  # a folder given as the matrix says so
        cli.main(["bench", "--matrix", str(tmp_path)])
    assert "is a folder, not a YAML file" in capsys.readouterr().err


def test_a_results_root_that_cannot_hold_results_is_refused_before_any_cell_trains(tmp_path, capsys):
    path = _write(tmp_path, tiny_matrix_text({"none": "none"}))
    (tmp_path / "a_file").write_text("x\n")
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--matrix", str(path), "--results-root", str(tmp_path / "a_file"), "--no-latency",
                  "--runs-root", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"cannot create results folder {tmp_path / 'a_file' / 'tiny'}" in err
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_latency_times_again_the_methods_timed_on_another_machine(tmp_path):
    from attnlab.bench.latency import measure_latencies
    from attnlab.host import cpu_threads, timing_machine as machine
    from attnlab.engine.config import load_config

    matrix = load_matrix(_write(tmp_path, tiny_matrix_text({"none": "none", "se": "se", "cbam": "cbam",
                                                            "eca": "eca"})))
    path = tmp_path / "latency.json"
    fake = {"batch": {"1": {"median_ms": 123.0, "images_per_s": 8.1, "n": 2, "round_medians_ms": [120.0, 126.0]}},
            "input_size": 32, "threads": 1}
    no_rounds = {**fake, "batch": {"1": {"median_ms": 99.0, "images_per_s": 8.1, "n": 2}}}
    with cpu_threads(1):  # the matrix's latency.threads (default 1), whatever this process runs with
        here = machine("cpu")
    path.write_text(json.dumps({"methods": {"none": {"cpu": {**fake, "machine": "AMD EPYC, AVX512 kernels"}},
                                            "se": {"cpu": {**fake, "machine": here}},
                                            "cbam": {"cpu": {**no_rounds, "machine": here}},
                                            "gone": {"cpu": {**fake, "machine": "old"}}}}))
    lines = []
    # Nothing is missing: nothing is timed, not even the entry from another machine.
    measure_latencies(matrix, matrix["methods"][:2], path, load_config=load_config, log=lines.append)
    assert json.loads(path.read_text())["methods"]["none"]["cpu"]["batch"]["1"]["median_ms"] == 123.0 and not lines

    # eca is new: it is timed, and none (timed elsewhere) beside it; se (timed here) keeps its entry, and a method
    # no longer in the matrix is left alone.
    measure_latencies(matrix, matrix["methods"][3:], path, load_config=load_config, log=lines.append)
    data = json.loads(path.read_text())["methods"]
    assert data["eca"]["cpu"]["machine"] == here and data["none"]["cpu"]["machine"] == here
    assert data["none"]["cpu"]["batch"]["1"]["median_ms"] != 123.0 and set(data["none"]["cpu"]["batch"]) == {"1", "2"}
    assert data["se"]["cpu"]["batch"]["1"]["median_ms"] == 123.0 and data["gone"]["cpu"]["machine"] == "old"
    # cbam was timed here, but before per-round medians were kept: its ratios would have no interval.
    assert data["cbam"]["cpu"]["batch"]["1"]["median_ms"] != 99.0
    assert len(data["eca"]["cpu"]["batch"]["1"]["round_medians_ms"]) == matrix["latency"]["rounds"]
    assert any("none, cbam cpu: timed on another machine or before per-round medians were kept, timed again "
               "beside eca" in x for x in lines), lines
    assert data["eca"]["cpu"]["threads"] == 1 and ", 1 threads," in here


def test_latency_keeps_entries_another_bench_wrote_while_this_one_timed(tmp_path):
    from attnlab.bench.latency import measure_latencies
    from attnlab.engine.config import load_config

    matrix = load_matrix(_write(tmp_path, tiny_matrix_text({"none": "none", "se": "se"})))
    path = tmp_path / "latency.json"
    other = {"cpu": {"batch": {"1": {"median_ms": 7.0}}, "machine": "a GPU slot's CPU"}}
    path.write_text(json.dumps({"methods": {"se": {"cuda": "old"}}}))
    written = []

    def log(line):  # while this bench times on the CPU, another one on the matrix writes its own entries
        if not written:
            written.append(line)
            path.write_text(json.dumps({"methods": {"other": other, "se": {"cuda": "new"}}}))

    data = measure_latencies(matrix, matrix["methods"], path, load_config=load_config, log=log)
    on_disk = json.loads(path.read_text())
    assert written and on_disk == data and on_disk["methods"]["other"] == other
    assert on_disk["methods"]["se"]["cuda"] == "new"  # not the copy this bench read before it timed
    assert "cpu" in on_disk["methods"]["se"] and "cpu" in on_disk["methods"]["none"]


def test_tiny_matrix_runs_records_failures_and_resumes(tmp_path, capsys):
    path = _write(tmp_path, tiny_matrix_text({"none": "none", "bogus": "nope", "se": "se"}))
    res, runs = tmp_path / "res", tmp_path / "runs"
    matrix = load_matrix(path)
    counts = run_matrix(matrix, results_root=res, runs_root=runs)
    assert counts == _counts(total=3, ok=2, failed=1)
    lines = read_jsonl(res / "tiny" / "runs.jsonl")
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
    assert counts == _counts(total=3, skipped=3)
    assert len(read_jsonl(res / "tiny" / "runs.jsonl")) == 3
    assert "finished earlier" in capsys.readouterr().out

    # --retry-failed re-runs only the failed cell; a changed matrix is refused rather than mixed in.
    counts = run_matrix(matrix, results_root=res, runs_root=runs, retry_failed=True, latency=False)
    assert counts == _counts(total=3, skipped=2, failed=1)
    assert len(read_jsonl(res / "tiny" / "runs.jsonl")) == 4
    text = path.read_text()
    changed = load_matrix(_write(tmp_path, text.replace("train.epochs: 1", "train.epochs: 2")))
    with pytest.raises(AttnlabError, match="other settings"):
        run_matrix(changed, results_root=res, runs_root=runs)

    # The failed method mended (other settings now): its failures hold no result, so it trains without a flag.
    mended = load_matrix(_write(tmp_path, text.replace("model.attention: nope", "model.attention: eca")))
    counts = run_matrix(mended, results_root=res, runs_root=runs)
    assert counts == _counts(total=3, skipped=2, ok=1)
    assert set(json.loads((res / "tiny" / "latency.json").read_text())["methods"]["bogus"]) == {"cpu"}  # no error
    assert [(r["method"], r["status"]) for r in read_jsonl(res / "tiny" / "runs.jsonl")][-1] == ("bogus", "ok")
    assert run_matrix(mended, results_root=res, runs_root=runs, latency=False) == _counts(total=3, skipped=3)


# ----------------------------------------------------------------------------------------------- issue 10
def test_cells_with_the_settings_of_another_matrix_reuse_its_results(tmp_path, capsys, monkeypatch):
    src = tmp_path / "results" / "earlier"
    text = tiny_matrix_text({"plain": "none", "se": "se"}) + f"reuse: [{src}]\n"
    with pytest.raises(AttnlabError, match="reuse folder .* not found"):
        load_matrix(_write(tmp_path, text))
    src.mkdir(parents=True)
    matrix = load_matrix(_write(tmp_path, text))
    plain, se = cells(matrix)
    # "none" there is "plain" here: the settings and the seed decide, not the name. A failed cell or one with
    # other settings is never reused.
    append_jsonl(src / "runs.jsonl", {"method": "none", "seed": 0, "status": "ok", "test_top1": 41.0,
                                      "fingerprint": fingerprint(matrix, plain)})
    append_jsonl(src / "runs.jsonl", {"method": "se", "seed": 0, "status": "failed",
                                      "fingerprint": fingerprint(matrix, se)})
    other = fingerprint(matrix, se).replace('"train.epochs": 1', '"train.epochs": 2')
    append_jsonl(src / "runs.jsonl", {"method": "se", "seed": 0, "status": "ok", "fingerprint": other})
    res, runs = tmp_path / "res", tmp_path / "runs"
    run_matrix(matrix, dry_run=True, results_root=res, runs_root=runs)
    out = capsys.readouterr().out
    assert f"plain seed 0: done in {src / 'runs.jsonl'} (same settings and seed: reused)" in out
    assert "se seed 0: to run" in out and not (res / "tiny" / "runs.jsonl").exists()

    counts = run_matrix(matrix, only=["plain"], results_root=res, runs_root=runs, latency=False)
    assert counts == _counts(total=1, skipped=1) and not runs.exists()  # nothing trained
    [rec] = read_jsonl(res / "tiny" / "runs.jsonl")
    assert (rec["method"], rec["matrix"], rec["test_top1"], rec["reused_from"]) == ("plain", "tiny", 41.0,
                                                                                   str(src / "runs.jsonl"))
    assert "its result is used" in capsys.readouterr().out
    run_matrix(matrix, only=["plain"], results_root=res, runs_root=runs, latency=False)
    assert len(read_jsonl(res / "tiny" / "runs.jsonl")) == 1  # taken once
    # A matrix reusing that copy names where the result came from, not the copy.
    third_text = text.replace(str(src), str(res / "tiny")).replace("name: tiny", "name: third")
    third = load_matrix(_write(tmp_path, third_text))
    run_matrix(third, only=["plain"], results_root=res, runs_root=runs, latency=False)
    [rec] = read_jsonl(res / "third" / "runs.jsonl")
    assert rec["reused_from"] == str(src / "runs.jsonl") and rec["matrix"] == "third"
    # Run from the repository root, the origin is recorded relative to it (committed records hold no machine path).
    monkeypatch.chdir(tmp_path)
    fourth = load_matrix(_write(tmp_path, text.replace("name: tiny", "name: fourth")))
    run_matrix(fourth, only=["plain"], results_root=res, runs_root=runs, latency=False)
    assert read_jsonl(res / "fourth" / "runs.jsonl")[0]["reused_from"] == "results/earlier/runs.jsonl"


def test_parse_duration():
    assert parse_duration("150m") == 9000 and parse_duration("2h") == 7200 and parse_duration("1h30m") == 5400
    assert parse_duration("90s") == 90
    for bad in ("150", "soon", "2h x", ""):
        with pytest.raises(AttnlabError, match="needs a unit"):
            parse_duration(bad)
    with pytest.raises(AttnlabError, match="above zero"):
        parse_duration("0m")  # not "no budget"
    for bad in (["--budget", "150"], ["--budget", "0s"], ["--threads", "0"], ["--threads", "-2"]):
        with pytest.raises(SystemExit):
            cli.main(["bench", "--matrix", "x.yaml", *bad])


@pytest.mark.parametrize("flag, value, message", [
    ("--seeds", "1,,2", "comma-separated integers with none empty, got '1,,2'"),
    ("--seeds", "", "with none empty"),
    ("--seeds", "1,x", "must be comma-separated integers, got '1,x'"),
    ("--seeds", "0,1,0", "'0' is given twice in '0,1,0'"),
    ("--seeds", "1,01", "'1' is given twice in '1,01'"),
    ("--seeds", "2,-1", "seeds are integers >= 0, got '2,-1'"),
    ("--only", "se,,cbam", "comma-separated names with none empty"),
    ("--only", "se,se", "'se' is given twice"),
])
def test_a_list_with_an_empty_or_repeated_item_is_refused(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--matrix", "x.yaml", flag, value])
    assert message in capsys.readouterr().err


def test_seed_and_method_lists_are_read_as_given():
    from attnlab.bench.cli import _int_list, _str_list
    assert _int_list("3, 1,2") == [3, 1, 2] and _str_list("se, cbam") == ["se", "cbam"]


def test_a_new_worker_takes_the_least_busy_gpu():
    from attnlab.bench.pool import least_busy_gpu
    assert least_busy_gpu(["0", "1"], []) == "0"
    assert least_busy_gpu(["0", "1"], ["0"]) == "1"  # cell 3 after cell 2 was skipped or finished first
    assert least_busy_gpu(["0", "1", "2"], ["1", "0", "1"]) == "2"


def test_latency_json_that_is_not_an_object_of_methods_is_a_one_line_error(tmp_path):
    from attnlab.bench.latency import read_latency
    assert read_latency(tmp_path / "none.json") == {}
    for text in ("<<<<<<< HEAD\n{}", "[1, 2]", '{"methods": [1]}'):
        (tmp_path / "latency.json").write_text(text)
        with pytest.raises(AttnlabError, match="latency.json .*delete it to time every method again"):
            read_latency(tmp_path / "latency.json")


def _seed_record(matrix, method, seed, wall_time_s):
    (cell,) = cells(matrix, seeds=[seed], only=[method])
    return {"matrix": matrix["name"], "method": method, "seed": seed, "status": "ok", "wall_time_s": wall_time_s,
            "fingerprint": fingerprint(matrix, cell), "test_top1": 10.0, "val_top1": 10.0}


def _none_and_se_two_seeds(tmp_path):
    """A tiny matrix of none and se, seeds 0 and 1: (its file, the matrix, results root, runs root, runs.jsonl)."""
    path = _write(tmp_path, tiny_matrix_text({"none": "none", "se": "se"}).replace("seeds: [0]", "seeds: [0, 1]"))
    res = tmp_path / "res"
    return path, load_matrix(path), res, tmp_path / "runs", res / "tiny" / "runs.jsonl"


def test_an_edited_recipe_is_not_mixed_with_cells_trained_before_the_edit(tmp_path):
    from attnlab.bench.cell import prepare_run_dir
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  lr: 0.1\n")
    path = _write(tmp_path, "recipe: recipe.yaml\nmethods: [none]\nseeds: [0]\n")
    matrix = load_matrix(path)
    res, runs = tmp_path / "res", tmp_path / "runs"
    runs_path = res / matrix["name"] / "runs.jsonl"
    append_jsonl(runs_path, {**_seed_record(matrix, "none", 0, 5.0), "recipe_digest": matrix["recipe_digest"]})
    recipe.write_text("# a comment and new layout change nothing\ntrain: {lr: 0.1}\n")
    assert load_matrix(path)["recipe_digest"] == matrix["recipe_digest"]
    assert run_matrix(load_matrix(path), results_root=res, runs_root=runs, latency=False)["skipped"] == 1
    recipe.write_text("train:\n  lr: 0.2\n")
    edited = load_matrix(path)
    with pytest.raises(AttnlabError, match="trained with recipe recipe.yaml as it was before an edit"):
        run_matrix(edited, results_root=res, runs_root=runs, latency=False)
    # An interrupted cell started under the old recipe starts afresh rather than resume under the new one.
    (cell,) = cells(edited)
    run_dir = runs / "m" / cell["run_name"]
    assert prepare_run_dir(run_dir, fingerprint(edited, cell), matrix["recipe_digest"]) is None
    (run_dir / "checkpoint_last.pt").write_bytes(b"x")
    assert prepare_run_dir(run_dir, fingerprint(edited, cell), matrix["recipe_digest"]) == run_dir
    assert prepare_run_dir(run_dir, fingerprint(edited, cell), edited["recipe_digest"]) is None
    assert not (run_dir / "checkpoint_last.pt").exists()
    # A finished run of other settings is moved aside, not deleted: another runs.jsonl may point at it.
    (run_dir / "checkpoint_last.pt").write_bytes(b"x")
    (run_dir / "results.json").write_text('{"test_top1": 50.0}\n')
    assert prepare_run_dir(run_dir, fingerprint(edited, cell), matrix["recipe_digest"]) is None
    (aside,) = run_dir.parent.glob(f"{run_dir.name}.replaced-*")
    assert (aside / "results.json").read_text() == '{"test_top1": 50.0}\n'
    assert sorted(p.name for p in run_dir.iterdir()) == ["bench_cell.json"]
    # A GPU slot's cell trained with the edited recipe does not merge into the old recipe's runs.jsonl.
    from attnlab.bench.runs import merge_runs
    slot = tmp_path / "slot.jsonl"
    append_jsonl(slot, {**_seed_record(edited, "none", 1, 5.0), "recipe_digest": edited["recipe_digest"]})
    before = runs_path.read_text()
    with pytest.raises(AttnlabError, match="another version of the recipe.*nothing merged"):
        merge_runs(slot, runs_path)
    assert runs_path.read_text() == before


def test_budget_starts_only_cells_that_fit_and_adding_methods_runs_only_them(tmp_path, capsys):
    path, matrix, res, runs, runs_path = _none_and_se_two_seeds(tmp_path)
    # Seed 0 already ran: `none` took 30 s (longer than a tiny cell takes here, so no pace scales the estimates),
    # `se` 10,000 s. With a 60 s budget only none's seed 1 fits.
    append_jsonl(runs_path, _seed_record(matrix, "none", 0, 30.0))
    append_jsonl(runs_path, _seed_record(matrix, "se", 0, 10000.0))
    gpu = dict(_seed_record(matrix, "none", 7, 99999.0), device="NVIDIA H200")  # another device: no estimate
    append_jsonl(runs_path, gpu)
    counts = run_matrix(matrix, results_root=res, runs_root=runs, latency=False, budget_s=60)
    assert counts == _counts(total=4, skipped=2, ok=1, deferred=1)
    out = capsys.readouterr().out
    assert "--budget 1m00s" in out and "se seed 1: not started, it would not finish within the budget" in out
    assert "(estimate 2h46m, median of 1 se cell)" in out
    assert "1 left for a later slice" in out
    assert [(r["method"], r["seed"]) for r in read_jsonl(runs_path)][-1] == ("none", 1)

    # A method added to the matrix runs alone; the finished cells (and the deferred one, not asked for) stay.
    before = runs_path.read_text()
    grown = load_matrix(_write(tmp_path, path.read_text().replace(
        "methods:\n", "methods:\n  - {name: eca, overrides: {model.attention: eca}}\n"), "grown.yaml"))
    counts = run_matrix(grown, seeds=[0], results_root=res, runs_root=runs, latency=False)
    assert counts == _counts(total=3, skipped=2, ok=1)
    assert runs_path.read_text().startswith(before)
    assert [(r["method"], r["seed"]) for r in read_jsonl(runs_path)][-1] == ("eca", 0)


def test_estimates_say_what_they_rest_on():
    records = [{"method": m, "status": "ok", "wall_time_s": t, "device": "cpu (x86_64, 1 threads)"}
               for m, t in [("none", 50.0), ("none", 70.0), ("cbam", 300.0), ("se", 90.0)]]
    est = Estimates(records + [{"method": "se", "status": "failed", "wall_time_s": 1.0}])
    assert est("none") == 60.0 and est.basis("none") == "median of 2 none cells"
    assert est("se") == 90.0  # a failed cell does not count
    assert est("tdam") == 300.0 and est.basis("tdam") == "slowest method's median (cbam): no tdam cell finished yet"
    empty = Estimates([], device_kind="cuda")
    assert empty("se") is None and empty.basis("se") == "no finished cuda cell to go by"


def test_budget_sees_cells_another_bench_finished_meanwhile(tmp_path, capsys):
    # Two bench processes on one matrix: while this one trains none's seed 1, the other finishes se's seed 0 in
    # 10,000 s. se's seed 1, queued next, must be judged by that cell, not by the stand-in estimate read at start.
    _, matrix, res, runs, runs_path = _none_and_se_two_seeds(tmp_path)
    append_jsonl(runs_path, _seed_record(matrix, "none", 0, 30.0))
    lines = []

    def log(line):
        lines.append(line)
        if "none seed 1: running" in line:
            append_jsonl(runs_path, _seed_record(matrix, "se", 0, 10000.0))  # the other process's cell

    counts = run_matrix(matrix, seeds=[1], results_root=res, runs_root=runs, latency=False, budget_s=60, log=log)
    assert counts == _counts(total=2, ok=1, deferred=1)
    assert any("se seed 1: not started" in x and "(estimate 2h46m, median of 1 se cell)" in x for x in lines), lines


def test_budget_counts_only_the_epochs_an_interrupted_cell_has_left(tmp_path, capsys):
    text = tiny_matrix_text({"none": "none"}).replace("seeds: [0]", "seeds: [0, 1, 2]")
    path = _write(tmp_path, text.replace("train.epochs: 1", "train.epochs: 4"))
    res, runs = tmp_path / "res", tmp_path / "runs"
    matrix = load_matrix(path)
    append_jsonl(res / "tiny" / "runs.jsonl", _seed_record(matrix, "none", 0, 400.0))  # a whole cell: 400 s
    # Seed 1 stopped after 3 of its 4 epochs in an earlier slice (its metrics.csv says so); seed 2 never started.
    (runs / "tiny" / "none-s1").mkdir(parents=True)
    (runs / "tiny" / "none-s1" / "metrics.csv").write_text("epoch,val_top1\n1,10\n2,11\n3,12\n")
    counts = run_matrix(matrix, dry_run=False, results_root=res, runs_root=runs, latency=False, budget_s=150,
                        only=["none"], seeds=[2, 1])
    out = capsys.readouterr().out
    # Seed 2 (400 s) does not fit in 150 s; seed 1, queued after it, has 100 s left and starts (its folder holds
    # no checkpoint, so it trains afresh here).
    assert counts["ok"] == 1 and counts["deferred"] == 1
    assert "none seed 1: running (1 queued, ETA 6m40s" in out and "none seed 2: not started" in out


def test_budget_scales_estimates_by_the_pace_this_run_measured(tmp_path, capsys, monkeypatch):
    # The finished cell says a `none` cell takes 0.01 s (a much faster machine); here one takes 1 s. Going by the
    # record alone, seed 2 would start at ~1 s within the 1.5 s budget and end at ~2 s, past it. This run's first
    # cell shows the pace, so seed 2's estimate grows to ~1 s and it waits for a later slice.
    import time

    import attnlab.engine.train

    def slow_train(cfg, resume=False, keep=()):
        time.sleep(1.0)
        return {"best_val_top1": 10.0, "test_top1": 10.0, "wall_time_s": 1.0}

    monkeypatch.setattr(attnlab.engine.train, "train", slow_train)
    _, matrix, res, runs, runs_path = _none_and_se_two_seeds(tmp_path)
    append_jsonl(runs_path, _seed_record(matrix, "none", 0, 0.01))
    counts = run_matrix(matrix, only=["none"], seeds=[1, 2], results_root=res, runs_root=runs, latency=False,
                        budget_s=1.5)
    out = capsys.readouterr().out
    assert counts == _counts(total=2, ok=1, deferred=1), out
    assert "none seed 2: not started" in out and "for this run's pace)" in out


def test_pace_of_a_running_cell_is_its_time_per_finished_epoch_against_the_estimate(tmp_path):
    import time

    from attnlab.bench.plan import Planner, Started
    from attnlab.engine.run_folder import RunFolder

    text = tiny_matrix_text({"none": "none", "se": "se"}).replace("seeds: [0]", "seeds: [0, 1]")
    matrix = load_matrix(_write(tmp_path, text.replace("train.epochs: 1", "train.epochs: 4")))
    runs_dir = tmp_path / "runs" / "tiny"
    planner = Planner(Estimates([_seed_record(matrix, "none", 0, 400.0)]), None, epochs_of=lambda c: 4,
                      epochs_done=lambda c: len(RunFolder(runs_dir / c["run_name"]).curve() or []), workers=2)
    [none1] = cells(matrix, seeds=[1], only=["none"])
    [se1] = cells(matrix, seeds=[1], only=["se"])
    running = [Started(none1, time.time() - 300.0), Started(se1, time.time() - 900.0)]
    assert planner.pace(running) is None  # no epoch finished yet
    for c in (none1, se1):
        (runs_dir / c["run_name"]).mkdir(parents=True)
        (runs_dir / c["run_name"] / "metrics.csv").write_text("epoch,val_top1\n1,10\n2,11\n")
    # none: 2 epochs in 300 s against 100 s an epoch -> 1.5; se has no finished cell of its own, so it says nothing.
    assert planner.pace(running) == pytest.approx(1.5, rel=1e-3)
    assert planner.estimate(none1, planner.pace(running)) == pytest.approx(300.0, rel=1e-3)  # 2 left x 100 s x 1.5
    # A budget of 250 s: none seed 1 needs 300 s at this pace, 200 s (half its 400 s) without one.
    planner.deadline = time.monotonic() + 250.0
    queue = [(1, none1)]
    assert planner.next_that_fits(queue, running) is None and queue == [(1, none1)]
    assert planner.next_that_fits(queue, []) == (1, none1) and queue == []



def test_a_cell_locked_by_another_bench_is_skipped(tmp_path, capsys):
    path = _write(tmp_path, tiny_matrix_text({"none": "none"}))
    runs = tmp_path / "runs"
    with cell_lock(runs / "tiny" / ".bench" / "locks" / "none-s0.lock") as held:
        assert held
        counts = run_matrix(load_matrix(path), results_root=tmp_path / "res", runs_root=runs, latency=False)
    assert counts == _counts(total=1, busy=1)
    assert "being trained by another attnlab bench" in capsys.readouterr().out
    assert not (tmp_path / "res" / "tiny" / "runs.jsonl").exists()


def _kill_worker(method):
    """SIGKILL the worker process training ``method`` (found by its command line)."""
    import os
    import signal
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"attnlab.bench.worker" in cmd and method.encode() in cmd:
            os.kill(int(pid), signal.SIGKILL)
            return True
    return False


def test_workers_train_cells_in_processes_and_a_killed_one_resumes(tmp_path):
    text = tiny_matrix_text({"none": "none", "se": "se"}).replace("train.epochs: 1", "train.epochs: 12")
    matrix = load_matrix(_write(tmp_path, text))
    res, runs = tmp_path / "res", tmp_path / "runs"
    killed, out = [], []

    def log(line):
        out.append(line)
        # Once `none` has an epoch checkpoint, kill its worker mid-run (the other cell goes on).
        if not killed and (runs / "tiny" / "none-s0" / "checkpoint_last.pt").is_file() and "[none-s0]" in line:
            killed.append(_kill_worker("none"))

    counts = run_matrix(matrix, results_root=res, runs_root=runs, latency=False, workers=2, threads=1, log=log)
    assert killed == [True]
    assert counts == _counts(total=2, ok=1, interrupted=1)
    text_out = "\n".join(out)
    assert "none seed 0: worker killed by signal 9" in text_out and "[se-s0] epoch" in text_out
    lines = read_jsonl(res / "tiny" / "runs.jsonl")
    assert [(r["method"], r["status"], r["workers"], r["threads"]) for r in lines] == [("se", "ok", 2, 1)]

    # The next run resumes the killed cell from its checkpoint and finishes it; the finished one is skipped.
    out.clear()
    counts = run_matrix(matrix, results_root=res, runs_root=runs, latency=False, workers=2, threads=1, log=out.append)
    assert counts == _counts(total=2, skipped=1, ok=1)
    assert any("[none-s0] resuming" in line for line in out)
    none = read_jsonl(res / "tiny" / "runs.jsonl")[-1]
    assert none["method"] == "none" and none["status"] == "ok" and len(none["val_curve"]) == 12
    assert (runs / "tiny" / ".bench" / "logs" / "none-s0.log").is_file()
    assert not list((runs / "tiny" / ".bench" / "records").glob("*.json"))


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting to be reaped does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def _lock_holders(path) -> str:
    """The processes with ``path`` open (any of them may hold its lock), for a failure message."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in fds):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:160]
                out.append(f"{pid} {cmd!r}")
        except OSError:
            continue
    return "; ".join(out) or "no process has it open"


def _wait_for(predicate, timeout_s: float) -> bool:
    import time
    end = time.time() + timeout_s
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_a_worker_stops_once_its_bench_is_gone(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    # A stands in for the bench: it starts B (a worker watching its parent) and prints B's pid; then A is killed.
    # A passes its pid, as the bench passes --parent-pid: B may still be importing when A is killed, and
    # os.getppid() read after that would name B's new parent.
    child = ("import sys, time; from attnlab.lifeline import stop_with_parent; "
             "stop_with_parent(int(sys.argv[1]), every_s=0.1); time.sleep(120)")
    parent = (f"import os, subprocess, sys, time; "
              f"b = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())]); "
              "print(b.pid, flush=True); time.sleep(120)")
    a = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    b = int(a.stdout.readline())
    assert _pid_alive(b)
    assert not _wait_for(lambda: not _pid_alive(b), 3.0)  # B keeps running while A lives
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    assert _wait_for(lambda: not _pid_alive(b), 30.0), "the worker outlived its bench"


def test_a_killed_bench_leaves_its_cell_locked_until_its_worker_has_stopped(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    path = _write(tmp_path, tiny_matrix_text({"none": "none"}).replace("train.epochs: 1", "train.epochs: 500"))
    runs = tmp_path / "runs"
    bench = subprocess.Popen([sys.executable, "-m", "attnlab", "bench", "--matrix", str(path), "--workers", "2",
                              "--threads", "1", "--no-latency", "--results-root", str(tmp_path / "res"),
                              "--runs-root", str(runs)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             cwd=ROOT)

    def worker_pid():
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"attnlab.bench.worker" in cmd and str(path).encode() in cmd:
                return int(pid)
        return None

    try:
        assert _wait_for(lambda: worker_pid() is not None, 120.0), "no worker started"
        worker = worker_pid()
        os.kill(bench.pid, signal.SIGKILL)
        bench.wait()
        lock_file = runs / "tiny" / ".bench" / "locks" / "none-s0.lock"
        with cell_lock(lock_file) as held:
            assert not held  # the orphaned worker holds the cell: a restarted bench would skip it
        assert _wait_for(lambda: not _pid_alive(worker), 30.0), "the worker outlived its bench"

        def free():
            with cell_lock(lock_file) as held:
                return bool(held)

        # Once it has stopped, with the processes it forked (they exit a moment after it), the cell can resume.
        assert _wait_for(free, 30.0), _lock_holders(lock_file)
    finally:
        if bench.poll() is None:
            bench.kill()
        if (pid := worker_pid()) is not None:
            os.kill(pid, signal.SIGKILL)


def test_device_is_where_a_cell_runs_not_what_it_computes(tmp_path):
    from attnlab.bench.matrix import same_settings
    path = _write(tmp_path, tiny_matrix_text({"none": "none"}))
    matrix = load_matrix(path)
    (cell,) = cells(matrix)
    fp = fingerprint(matrix, cell)
    assert "device" not in json.loads(fp)["overrides"]
    # A record written before the device left the fingerprint still counts as the same settings.
    old = json.loads(fp)
    old["overrides"]["device"] = "cpu"
    assert same_settings(json.dumps(old, sort_keys=True), fp)
    old["overrides"]["train.epochs"] = 9
    assert not same_settings(json.dumps(old, sort_keys=True), fp) and not same_settings("{torn", fp)
    # --device goes to every cell as the harness's own override, after the matrix's.
    counts = run_matrix(matrix, dry_run=True, device="cpu", results_root=tmp_path / "r", runs_root=tmp_path / "runs",
                        log=lambda s: None)
    assert counts["config_errors"] == 0
    from attnlab.bench.matrix import cell_overrides
    assert cell_overrides(matrix, cell, "runs", "cuda")[-1] == "device=cuda"


def test_a_machine_that_would_train_in_another_precision_is_refused_before_training(tmp_path, monkeypatch):
    from attnlab.engine import precision
    text = tiny_matrix_text({"none": "none", "se": "se", "se32": "se"}).replace(
        "  train.epochs: 1\n", "  train.epochs: 1\n  train.amp: bf16\n").replace(
        "{name: se32, overrides: {model.attention: se}}",
        "{name: se32, overrides: {model.attention: se, train.amp: off}}")
    matrix = load_matrix(_write(tmp_path, text))
    res, runs = tmp_path / "res", tmp_path / "runs"
    (res / "tiny").mkdir(parents=True)
    (none0,) = cells(matrix, only=["none"])
    done = {**_seed_record(matrix, "none", 0, 60.0), "precision": "bf16", "overrides": none0["overrides"]}
    (res / "tiny" / "runs.jsonl").write_text(json.dumps(done) + "\n")
    before = (res / "tiny" / "runs.jsonl").read_text()
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # as on an AVX2 machine
    # A dry run says so in a line, without counting it as a config error (its plan may be for another machine).
    said = []
    counts = run_matrix(matrix, dry_run=True, results_root=res, runs_root=runs, log=said.append)
    assert counts["config_errors"] == 0
    assert said[-1].startswith("on this machine the bench would stop before training: ")
    assert "se seed 0 would train in fp32" in said[-1]
    with pytest.raises(AttnlabError, match=r"none seed 0 trained in bf16, but here se seed 0 would train in fp32 "
                                           r"\(train.amp=bf16: this CPU has no native bf16"):
        run_matrix(matrix, results_root=res, runs_root=runs, latency=False)
    assert (res / "tiny" / "runs.jsonl").read_text() == before and not (runs / "tiny" / "se-s0").exists()
    # A method configured for fp32 (train.amp=off) is compared with finished fp32 cells only: none here.
    counts = run_matrix(matrix, only=["se32"], results_root=res, runs_root=runs, latency=False)
    assert counts["ok"] == 1
