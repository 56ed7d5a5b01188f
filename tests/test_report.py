"""attnlab report: statistics, report.md, plots and the README block, from fake runs.jsonl / metrics.csv fixtures."""
import json
import math
import statistics

import pytest

from attnlab import cli
from attnlab.errors import AttnlabError
from attnlab.bench.plots import PLOTS
from attnlab.bench.readme import update_readme
from attnlab.bench.render import readme_block
from attnlab.bench.report import write_report
from attnlab.bench.summary import summarize
from attnlab.bench.stats import t_ppf, welch_interval

# Per-seed accuracies. `none` and `se` have equal spread and n, so Welch's df is exactly 2n - 2 = 4.
VAL = {"none": [70.0, 71.0, 72.0], "se": [74.0, 75.0, 76.0], "ssia": [70.5, 72.5, 70.0]}
TEST = {"none": [69.0, 70.0, 71.0], "se": [73.0, 74.0, 75.0], "ssia": [69.5, 71.5, 69.0]}


def _write_run(root, method, seed, val, test, with_dir=True):
    run_dir = root / "runs" / f"{method}-s{seed}"
    curve = [val - 20 + 5 * e for e in range(4)] + [val]
    if with_dir:
        run_dir.mkdir(parents=True)
        rows = ["epoch,lr,train_loss,train_top1,val_loss,val_top1,val_top5,epoch_time_s,images_per_s"]
        rows += [f"{e},0.1,1.0,50.0,1.0,{v},90.0,1.0,100.0" for e, v in enumerate(curve)]
        (run_dir / "metrics.csv").write_text("\n".join(rows) + "\n")
    return {"matrix": "fake", "method": method, "seed": seed, "status": "ok", "val_top1": val, "test_top1": test,
            "test_top5": 95.0, "params": 270_000 + (5_000 if method == "se" else 0), "flops": 81_000_000,
            "train_images_per_s": 500.0, "wall_time_s": 60.0, "device": "cpu", "run_dir": str(run_dir),
            "epochs": 5, "val_curve": curve, "recipe": "configs/x.yaml", "threads": 1,
            "overrides": {"train.epochs": 5, "ssia.enabled": method == "ssia", "model.attention": method},
            "host": {"processor": "Fake CPU", "cpu_count": 2, "torch_threads": 2, "platform": "Linux-test",
                     "python": "3.11", "torch": "2.x"}}


@pytest.fixture
def results(tmp_path):
    res = tmp_path / "results" / "fake"
    res.mkdir(parents=True)
    lines = []
    for method in VAL:
        for seed in range(3):
            # ssia seed 2 has no run dir left: its curve must come from runs.jsonl's val_curve.
            lines.append(_write_run(tmp_path, method, seed, VAL[method][seed], TEST[method][seed],
                                    with_dir=not (method == "ssia" and seed == 2)))
    # A method whose only cell failed.
    lines.append({"matrix": "fake", "method": "tdam", "seed": 0, "status": "failed",
                  "error": "AttnlabError: unknown attention 'tdamx'", "run_dir": "nowhere"})
    (res / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    lat = {"methods": {m: {"cpu": {"batch": {"1": {"median_ms": 2.0 + i, "images_per_s": 1.0},
                                             "32": {"median_ms": 20.0 + i, "images_per_s": 1.0}}}}
                       for i, m in enumerate(VAL)},
           "host": {"processor": "Fake CPU", "torch_threads": 2}}
    (res / "latency.json").write_text(json.dumps(lat))
    return res


def test_t_quantiles_match_tables():
    # Two-sided 95% critical values of Student's t.
    for df, ref in [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (10, 2.2281389), (30, 2.0422725)]:
        assert t_ppf(0.975, df) == pytest.approx(ref, abs=1e-6)
    assert t_ppf(0.5, 7) == pytest.approx(0.0, abs=1e-9)


def test_welch_interval_by_hand():
    d = welch_interval([1, 2, 3], [2, 4, 6, 8])
    va, vb = 1 / 3, (20 / 3) / 4
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    assert d["diff"] == pytest.approx(-3.0)
    assert d["df"] == pytest.approx(df)
    assert d["high"] - d["diff"] == pytest.approx(t_ppf(0.975, df) * math.sqrt(va + vb))
    assert d["low"] < 0 < d["high"]
    # One value on a side: no interval, but still the difference.
    one = welch_interval([5.0], [1.0, 2.0])
    assert one["diff"] == pytest.approx(3.5) and math.isnan(one["low"])


def test_summary_means_stds_and_intervals(results):
    s = summarize(results)
    by = {m.name: m for m in s.methods}
    assert list(by) == ["none", "se", "ssia", "tdam"]  # order of first appearance; tdam only failed
    for name in VAL:
        assert by[name].n == 3
        assert by[name].val[0] == pytest.approx(statistics.mean(VAL[name]))
        assert by[name].val[1] == pytest.approx(statistics.stdev(VAL[name]))
        assert by[name].test[0] == pytest.approx(statistics.mean(TEST[name]))
        assert by[name].test[1] == pytest.approx(statistics.stdev(TEST[name]))
    # se - none: diff 4, both std 1, n 3 -> se = sqrt(2/3), df = 4.
    d = by["se"].delta_test
    half = 2.7764451 * math.sqrt(2 / 3)
    assert d["diff"] == pytest.approx(4.0)
    assert d["df"] == pytest.approx(4.0)
    assert (d["low"], d["high"]) == (pytest.approx(4 - half, abs=1e-5), pytest.approx(4 + half, abs=1e-5))
    # Paired by seed: se - none is +4 at every seed (no spread); ssia - none = [0.5, 1.5, -2].
    assert (by["se"].paired_test["low"], by["se"].paired_test["high"]) == (pytest.approx(4.0), pytest.approx(4.0))
    p = by["ssia"].paired_test
    half = 4.3026527 * statistics.stdev([0.5, 1.5, -2.0]) / math.sqrt(3)
    assert p["diff"] == pytest.approx(0.0, abs=1e-12) and p["high"] == pytest.approx(half, abs=1e-5)
    assert by["none"].delta_test is None
    assert by["tdam"].n == 0 and by["tdam"].failed == 1
    # Mean curve over seeds, including the one read back from runs.jsonl (ssia seed 2 has no metrics.csv).
    assert by["ssia"].curve[-1] == pytest.approx(statistics.mean(VAL["ssia"]))
    assert len(by["none"].curve) == 5
    assert s.n_ok == 9 and s.n_failed == 1


def test_devices_include_every_device_a_resumed_cell_trained_on(results):
    lines = (results / "runs.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first.update(device="cpu (x86_64, 1 threads)",
                 epochs_by_device={"cpu (x86_64, 2 threads)": 3, "cpu (x86_64, 1 threads)": 2})
    (results / "runs.jsonl").write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    assert summarize(results).devices == ["cpu", "cpu (x86_64, 1 threads)", "cpu (x86_64, 2 threads)"]


def test_report_markdown_and_plots(results):
    write_report(results)
    md = (results / "report.md").read_text()
    # se's improvement is well outside noise; ssia's is not, and the report says so plainly.
    assert "`se`: +4.00 [" in md and "beats none" in md
    assert "`ssia`:" in md and "no difference of" in md and "points or more detected" in md
    assert "Welch" in md
    assert "74.00 ± 1.00" in md and "70.00 ± 1.00" in md  # se / none test top-1
    assert "Fake CPU" in md and "2 logical CPUs" in md
    assert "not measured yet" in md  # no GPU anywhere
    assert "attnlab bench --matrix benchmarks/matrices/fake.yaml --workers 1 --threads 1 && attnlab report" in md
    from attnlab.bench.render import reproduce_command
    from attnlab.bench.summary import _setup
    cells = [{"method": "se", "seed": 0, "status": "ok", "overrides": {}, "run_dir": "qa/runs/fake/se-s0"}]
    assert _setup(cells, ["se"]).runs_roots == ["qa/runs"]  # a --runs-root the bench was given
    assert _setup([dict(cells[0], run_dir="/elsewhere/runs/fake/se-s0")], ["se"]).runs_roots == []
    s = summarize(results)
    s.setup.runs_roots = ["qa/runs"]
    assert "--threads 1 --runs-root qa/runs && attnlab report" in reproduce_command(s)
    # Setup comes from the runs: shared overrides once, each method's own beside it.
    assert "`train.epochs=5`" in md and "`ssia` (ssia.enabled=true, model.attention=ssia)" in md
    assert "unknown attention 'tdamx'" in md
    for name in PLOTS:
        data = (results / name).read_bytes()
        assert len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in md


def test_report_names_the_machine_latencies_were_timed_on(results):
    lat = json.loads((results / "latency.json").read_text())
    for entry in lat["methods"].values():
        entry["cpu"]["machine"] = "Fake CPU, AVX2 kernels, 1 threads, torch 2.x"
    (results / "latency.json").write_text(json.dumps(lat))
    write_report(results)
    md = (results / "report.md").read_text()
    assert "- CPU latency: Fake CPU, AVX2 kernels, 1 threads, torch 2.x, batch sizes 1, 32." in md
    lat["methods"]["se"]["cpu"]["machine"] = "Other CPU, AVX512 kernels, 1 threads, torch 2.x"
    (results / "latency.json").write_text(json.dumps(lat))
    write_report(results)
    md = (results / "report.md").read_text()
    assert "Other CPU" in md and "timed on different machines: compare only methods timed on the same one" in md


def test_hardware_line_counts_the_runs_per_cpu_kernel_set(results):
    write_report(results)
    assert "torch CPU kernels" not in (results / "report.md").read_text()  # no run recorded them
    lines = [json.loads(x) for x in (results / "runs.jsonl").read_text().splitlines()]
    for r in lines[:2]:
        r["host"]["cpu_kernels"] = "AVX2"
    (results / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    write_report(results)
    n_ok = sum(1 for r in lines if r["status"] == "ok")
    assert f"torch CPU kernels AVX2: 2 runs, not recorded: {n_ok - 2} runs" in (results / "report.md").read_text()


def test_a_records_own_curve_wins_over_what_its_run_dir_holds_now(tmp_path):
    from attnlab.bench.summary import record_curve
    run_dir = tmp_path / "se-s0"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("epoch,val_top1\n1,9.0\n")  # a later, partial run of the same cell
    record = {"run_dir": str(run_dir), "val_curve": [50.0, None, 70.0]}
    assert record_curve(record)[::2] == [50.0, 70.0] and math.isnan(record_curve(record)[1])
    assert record_curve({"run_dir": str(run_dir)}) == [9.0]  # an older record without its curve


def test_plots_are_written_atomically(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnlab.files import save_figure
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "p.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [f.name for f in tmp_path.iterdir()] == ["p.png"]
    before = path.read_bytes()

    class Broken(Exception):
        pass

    def fail(*a, **k):
        raise Broken("renderer died")

    fig.savefig = fail
    with pytest.raises(AttnlabError, match="could not write plot .*p.png.*the previous plot is kept"):
        save_figure(fig, path)
    assert path.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == ["p.png"]
    plt.close(fig)


def test_readme_block_is_replaced(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n\n<!-- results:begin -->\nold table\n<!-- results:end -->\n\nfooter\n")
    update_readme(readme, readme_block(summarize(results)))
    text = readme.read_text()
    assert "old table" not in text
    assert text.startswith("# Title\n\nintro\n\n<!-- results:begin -->\n")
    assert text.endswith("<!-- results:end -->\n\nfooter\n")
    assert "| se | 74.00 ± 1.00 | +4.00 [" in text
    assert "Fake CPU" in text and f"({results}/report.md)" in text
    assert "Beats `none` at Holm-adjusted p < 0.05: se." in text
    assert "Against `none`, no difference of 3.1 points or more detected: ssia." in text

    bare = tmp_path / "BARE.md"
    bare.write_text("# no markers\n")
    with pytest.raises(AttnlabError, match="results:begin"):
        update_readme(bare, "x")
    with pytest.raises(AttnlabError, match="no block to replace: '<!-- results:tiny:begin -->' ... "
                                           "'<!-- results:tiny:end -->' or '<!-- results:begin -->'"):
        update_readme(bare, "x", "tiny")  # both blocks it would have taken are named
    with pytest.raises(AttnlabError, match="is a folder, not a file"):
        update_readme(tmp_path, "x")
    assert bare.read_text() == "# no markers\n"


@pytest.mark.parametrize("edit, problem", [({"test_top1": "abc"}, "a test_top1 that is not a number"),
                                           ({"method": None}, "no method name"),
                                           ({"seed": "0"}, "a seed ('0') that is not an integer >= 0")])
def test_a_runs_record_of_the_wrong_shape_is_one_line_naming_it(results, capsys, edit, problem):
    path = results / "runs.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), **edit})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", str(results)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "runs.jsonl: the record of method" in err and f"has {problem}; fix or delete that line" in err


def test_cli_report_and_errors(results, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", str(results)])
    assert exit_.value.code == 0
    assert (results / "report.md").is_file()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", str(tmp_path / "missing")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"attnlab: error: results folder '{tmp_path / 'missing'}' does not exist"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", str(tmp_path / "empty")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("attnlab: error: no runs.jsonl") and "\n" not in err
    with pytest.raises(SystemExit) as exit_:  # the file itself instead of its folder
        cli.main(["report", str(results / "runs.jsonl")])
    assert "is a file: give the results/<matrix>/ folder that holds runs.jsonl" in capsys.readouterr().err
    before = (results / "report.md").read_bytes()
    with pytest.raises(SystemExit) as exit_:  # a misspelt baseline is not read as "no baseline run yet"
        cli.main(["report", str(results), "--baseline", "sse"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "unknown baseline method 'sse' (did you mean se" in err and "\n" not in err
    assert (results / "report.md").read_bytes() == before
    # A matrix without a `none` method (a schedule calibration, say) still reports under the default baseline.
    path = results / "runs.jsonl"
    path.write_text(path.read_text().replace('"method": "none"', '"method": "plain"'))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", str(results)])
    assert exit_.value.code == 0 and "No baseline (`none`) runs finished" in (results / "report.md").read_text()


CLAIMS_MATRIX = """name: fake
methods: [none, se, ssia, tdam]
seeds: [0, 1, 2]
claims:
  - {claim: "SE beats none", source: "Hu et al. 2018", method: se, baseline: none, paper: "+1.5 top-1"}
  - {claim: "none beats SE", method: none, baseline: se}
  - {claim: "SSIA beats none", method: ssia, baseline: none}
  - {claim: "SSIA keeps none's accuracy", method: ssia, baseline: none, kind: match, margin: 5}
  - {claim: "TDAM beats SE", method: tdam, baseline: se}
"""


def _with_claims(results, tmp_path):
    mfile = tmp_path / "fake.yaml"
    mfile.write_text(CLAIMS_MATRIX)
    path = results / "runs.jsonl"
    lines = [dict(json.loads(line), matrix_file=str(mfile)) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_claims_get_verdicts_with_both_intervals(results, tmp_path):
    from attnlab.bench.claims import judge_all
    _with_claims(results, tmp_path)
    rows = judge_all(summarize(results))
    mde = rows[0]["mde"]  # pooled SD over none, se and ssia (6 df), 3 seeds a side
    assert [r["verdict"] for r in rows] == ["holds", "reversed", f"no difference of {mde:.1f} points or more detected",
                                            "holds", "not run yet (needs 2 seeds of both, has 0)"]
    # Holm over the four judged claims: p (0.0039, 0.0080, 0.0080, 1.0) -> (x4, x3, x2 raised to x3's, x1).
    p = [r["p"] for r in rows[:4]]
    assert rows[3]["p_holm"] == pytest.approx(4 * p[3]) and rows[0]["p_holm"] == pytest.approx(3 * p[0])
    assert rows[1]["p_holm"] == pytest.approx(rows[0]["p_holm"]) and rows[2]["p_holm"] == 1.0
    se = rows[0]
    assert se["welch"]["diff"] == pytest.approx(4.0) and se["n"] == 3
    assert se["paired"]["low"] == pytest.approx(4.0) and se["paired"]["high"] == pytest.approx(4.0)  # +4 each seed
    assert se["latency"]["ratio"] == pytest.approx(3.0 / 2.0)  # bs 1: se 3 ms, none 2 ms
    assert math.isnan(se["latency"]["low"])  # the fixture's latency.json keeps no per-round medians
    ssia = welch_interval(TEST["ssia"], TEST["none"])
    assert rows[2]["welch"]["low"] == pytest.approx(ssia["low"]) and ssia["low"] < 0 < ssia["high"]

    write_report(results, readme=None)
    md = (results / "report.md").read_text()
    assert "## The papers' claims" in md and "| SE beats none | Hu et al. 2018 | +1.5 top-1 | +4.00 (3, 3) |" in md
    assert "**reversed**" in md and "SSIA keeps none's accuracy (match within ±5)" in md
    assert (results / "deltas.png").stat().st_size > 1000
    assert "The papers' claims at this scale" in readme_block(summarize(results))


def test_report_takes_the_matrix_when_the_recorded_one_is_gone(results, tmp_path, capsys):
    """A generated matrix may live under a lost runs/: --matrix gives it (claims, method order) to the report."""
    _with_claims(results, tmp_path)  # the runs record tmp_path/fake.yaml, a matrix with claims
    write_report(results, readme=None)
    assert "## The papers' claims" in (results / "report.md").read_text()
    (tmp_path / "fake.yaml").unlink()
    write_report(results, readme=None)
    assert "## The papers' claims" not in (results / "report.md").read_text()
    mfile = tmp_path / "kept.yaml"
    mfile.write_text(CLAIMS_MATRIX)
    with pytest.raises(SystemExit) as info:
        cli.main(["report", str(results), "--matrix", str(mfile)])
    assert info.value.code == 0
    md = (results / "report.md").read_text()
    assert "## The papers' claims" in md and "| SE beats none | Hu et al. 2018 | +1.5 top-1 | +4.00 (3, 3) |" in md
    assert f"&& attnlab report {results} --matrix {mfile}\n" in md  # the reproduce line names the matrix given
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(["report", str(results), "--matrix", str(tmp_path / "nope.yaml")])
    assert info.value.code == 2 and "matrix file not found" in capsys.readouterr().err
    assert "## The papers' claims" in (results / "report.md").read_text()  # the earlier report is untouched
    other = tmp_path / "other.yaml"  # another matrix's file (its name is not the runs' matrix): refused
    other.write_text(CLAIMS_MATRIX.replace("name: fake", "name: cifar10_resnet20"))
    before = (results / "report.md").read_text()
    with pytest.raises(SystemExit) as info:
        cli.main(["report", str(results), "--matrix", str(other)])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1
    assert "is matrix 'cifar10_resnet20' but the runs" in err and "are matrix 'fake'" in err
    assert (results / "report.md").read_text() == before


def test_bad_claims_are_refused(tmp_path):
    from attnlab.bench.matrix import load_matrix
    bad = {"method: se, baseline: nonee": "baseline 'nonee' is not a method of this matrix",
           "method: se, baseline: none, kind: equal": "kind must be one of better, match",
           "method: se, baseline: none, kind: match, margin: -1": "margin must be a non-negative",
           "method: se, baseline: none, margin: 0.5": "margin is read by kind: match only",
           "method: se, baseline: se": "method and baseline are both 'se'",
           "method: se, baseline: none, papers: x": "unknown key.*papers"}
    for body, message in bad.items():
        path = tmp_path / "m.yaml"
        path.write_text(f"methods: [none, se]\nclaims:\n  - {{claim: c, {body}}}\n")
        with pytest.raises(AttnlabError, match=message):
            load_matrix(path)


def test_readme_block_of_a_matrix_in_progress_goes_to_its_own_markers(results, tmp_path):
    _with_claims(results, tmp_path)  # the matrix lists 4 methods x 3 seeds; tdam has only a failed cell
    s = summarize(results)
    block = readme_block(s)
    assert "**In progress: 9 of 12 cells finished.** Not run yet: tdam." in block
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:begin -->\nheadline\n<!-- results:end -->\n"
                      "<!-- results:fake:begin -->\nold\n<!-- results:fake:end -->\n")
    update_readme(readme, block, "fake")
    text = readme.read_text()
    assert "headline" in text and "\nold\n" not in text and "In progress" in text
    update_readme(readme, "other", "unlisted")  # no block of its own: the default block
    assert "headline" not in readme.read_text() and "In progress" in readme.read_text()


def test_report_merges_a_slots_runs_without_losing_cells_finished_here(results, tmp_path, capsys):
    path = results / "runs.jsonl"
    slot_file = tmp_path / "slot_runs.jsonl"
    slot = [json.loads(line) for line in path.read_text().splitlines()]  # the slot starts from the committed file
    tdam = _write_run(tmp_path / "gpu", "tdam", 0, 73.0, 72.0)  # ran on the GPU where it failed here
    none_again = dict(slot[0], test_top1=99.0, device="cuda")  # also finished here: ours stays
    slot_file.write_text("".join(json.dumps(r) + "\n" for r in slot + [tdam, none_again]))
    local_new = _write_run(tmp_path, "se", 3, 75.0, 74.0)  # a CPU cell finished here during the slot
    with open(path, "a") as f:
        f.write(json.dumps(local_new) + "\n")

    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", str(results), "--merge", str(slot_file)])
    assert exit_.value.code == 0
    assert "1 cells added, 8 already here, 1 also run here" in capsys.readouterr().out
    merged = [json.loads(line) for line in path.read_text().splitlines()]
    assert merged[-2] == local_new and merged[-1] == tdam  # appended, nothing rewritten
    summary = summarize(results)
    assert summary.n_ok == 11 and "tdam" in [m.name for m in summary.methods]
    assert sorted(r["test_top1"] for r in merged if r["method"] == "none") == TEST["none"]

    # Merging again adds nothing; a slot cell run with other settings stops before anything is written.
    with pytest.raises(SystemExit):
        cli.main(["report", str(results), "--merge", str(slot_file)])
    assert "0 cells added" in capsys.readouterr().out
    before = path.read_bytes()
    other = dict(slot[1], fingerprint=json.dumps({"recipe": "other.yaml", "overrides": {}}), test_top1=1.0)
    slot_file.write_text(json.dumps(other) + "\n" + json.dumps(_write_run(tmp_path / "gpu", "se", 4, 1.0, 1.0)) + "\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", str(results), "--merge", str(slot_file)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "other settings" in err and "nothing merged" in err and "\n" not in err
    assert path.read_bytes() == before
    other_seed = dict(other, seed=7)  # a new cell, but its method ran here with other settings
    slot_file.write_text(json.dumps(other_seed) + "\n")
    with pytest.raises(SystemExit):
        cli.main(["report", str(results), "--merge", str(slot_file)])
    assert "other settings" in capsys.readouterr().err and path.read_bytes() == before
    slot_file.write_text(json.dumps(dict(tdam, matrix="cifar10_resnet18", seed=5)) + "\n")
    with pytest.raises(SystemExit):
        cli.main(["report", str(results), "--merge", str(slot_file)])
    assert "holds matrix 'cifar10_resnet18'" in capsys.readouterr().err and path.read_bytes() == before


def test_report_compares_validation_with_test_per_run(results):
    path = results / "runs.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for r in lines:
        if r["method"] == "none" and r["seed"] == 0:
            r["test_top1"] = 68.5  # val 70.0: this run's val - test is +1.50, every other one's +1.00
        if r["method"] == "ssia" and r["seed"] == 2:  # its curve comes from runs.jsonl: peak at epoch 2 of 5
            r["val_curve"] = [60.0, 70.0, 65.0, 66.0, 69.0]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    write_report(results)
    text = (results / "report.md").read_text()
    section = text[text.index("## Validation against test"):text.index("## Failed cells")]
    assert "| none | 3 | 5, 5, 5 | +1.50, +1.00, +1.00 | +1.17 |" in section
    assert "| ssia | 3 | 5, 5, 2 | +1.00, +1.00, +1.00 | +1.00 |" in section
    assert "tdam" not in section  # its only cell failed: nothing to compare
    assert "Over all 9 runs" in section and "+1.06 ± 0.17 points (from +1.00 to +1.50)" in section


# --------------------------------------------------------------------------- power, pooled SD, Holm, latency ratio
def test_welch_and_pooled_p_values_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    from attnlab.bench.stats import p_two_sided, pooled_interval, pooled_sd
    a, b = [85.1, 85.4, 85.9], [85.47, 85.45, 85.5, 85.0]
    assert p_two_sided(welch_interval(a, b)) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, abs=1e-6)
    # Pooled over just these two groups, the pooled test is Student's two-sample t test.
    sd, df = pooled_sd([a, b])
    iv = pooled_interval(a, b, sd, df)
    ref = stats.ttest_ind(a, b, equal_var=True)
    assert df == 5 and p_two_sided(iv) == pytest.approx(ref.pvalue, abs=1e-6)
    ci = ref.confidence_interval(0.95)
    assert (iv["low"], iv["high"]) == pytest.approx((ci.low, ci.high), abs=1e-6)


def test_pooled_sd_weights_each_group_by_its_degrees_of_freedom():
    from attnlab.bench.stats import pooled_sd
    sd, df = pooled_sd([[1.0, 2.0, 3.0], [10.0, 14.0], [7.0], []])  # variances 1 (2 df) and 8 (1 df); 1 value: none
    assert df == 3 and sd == pytest.approx(math.sqrt((2 * 1 + 1 * 8) / 3))


@pytest.mark.parametrize("sd, n1, n2, df", [(0.36, 3, 3, 20), (0.36, 3, 3, 4), (0.2, 5, 5, 8), (0.36, 5, 3, 40)])
def test_mde_has_the_stated_power_under_the_noncentral_t(sd, n1, n2, df):
    stats = pytest.importorskip("scipy.stats")
    from attnlab.bench.stats import mde
    effect = mde(sd, n1, n2, df)
    crit = stats.t.ppf(0.975, df)
    nc = effect / (sd * math.sqrt(1 / n1 + 1 / n2))
    power = stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)
    assert power == pytest.approx(0.80, abs=0.015)  # the t-quantile formula against the exact power
    assert effect == pytest.approx((stats.t.ppf(0.975, df) + stats.t.ppf(0.8, df)) * sd * math.sqrt(1 / n1 + 1 / n2))


def test_mde_of_the_evidence_table():
    from attnlab.bench.stats import mde
    # ../shared/research/evidence.md: SD 0.36, n = 3 a side, 4 df -> about 1.1 points; n = 10 (18 df) -> ~0.45.
    assert mde(0.36, 3, 3, 4) == pytest.approx(1.1, abs=0.05)
    assert mde(0.36, 10, 10, 18) == pytest.approx(0.45, abs=0.05)


def test_holm_step_down_against_hand_values():
    from attnlab.bench.stats import holm
    # sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> kept monotone at 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm([0.2, float("nan"), 0.6])  # nan stays out of the family (m = 2)
    assert out[0] == pytest.approx(0.4) and math.isnan(out[1]) and out[2] == pytest.approx(0.6)
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1


def test_latency_ratio_interval_is_a_t_interval_on_log_ratios():
    from attnlab.bench.stats import ratio_interval
    num, den = [1.10, 1.20, 1.15, 1.05], [1.0, 1.0, 1.0, 1.0]
    logs = [math.log(v) for v in num]
    mean, sd = statistics.mean(logs), statistics.stdev(logs)
    half = t_ppf(0.975, 3) * sd / 2
    out = ratio_interval(num, den)
    assert out["n"] == 4 and out["ratio"] == pytest.approx(math.exp(mean))
    assert (out["low"], out["high"]) == pytest.approx((math.exp(mean - half), math.exp(mean + half)))
    assert math.isnan(ratio_interval([1.1], [1.0])["low"])


def test_a_latency_verdict_needs_the_interval_to_exclude_one():
    from attnlab.bench.claims import latency_ratio, latency_verdict

    def method(rounds):
        return {"cpu": {"batch": {"1": {"median_ms": statistics.median(rounds), "round_medians_ms": rounds}}}}
    base = method([4.0, 4.1, 3.9, 4.0, 4.2])
    assert latency_verdict(latency_ratio(method([3.0, 3.1, 2.9, 3.0, 3.2]), base)) == "lower"
    assert latency_verdict(latency_ratio(method([5.0, 5.2, 4.9, 5.0, 5.1]), base)) == "higher"
    noisy = latency_ratio(method([3.0, 5.5, 3.2, 5.0, 4.0]), base)
    assert noisy["low"] < 1 < noisy["high"] and latency_verdict(noisy) == "no difference shown"
    old = {"cpu": {"batch": {"1": {"median_ms": 3.0}}}}  # timed before rounds were kept
    assert latency_verdict(latency_ratio(old, base)).startswith("no interval")


def test_a_large_gap_that_the_family_rejects_is_called_inconclusive():
    from attnlab.bench.claims import judge_family
    c = {"n": 3, "kind": "better", "diff": -1.25, "mde": 0.86, "p": 0.04,
         "welch": {"diff": -1.25, "se": 0.4, "df": 2.0}, "pooled": {"diff": -1.25, "se": 0.3, "df": 20}}
    other = {**c, "diff": 0.1, "welch": {"diff": 0.1, "se": 0.4, "df": 2.0},
             "pooled": {"diff": 0.1, "se": 0.3, "df": 20}}
    rows = judge_family([c, other])
    assert rows[0]["verdict"].startswith("inconclusive") and rows[0]["p_holm"] > 0.05
    assert rows[1]["verdict"] == "no difference of 0.9 points or more detected"


def test_report_refuses_cells_of_different_precisions(results, capsys):
    path = results / "runs.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[0]["precision"] = "bf16"  # the others are old CPU records: fp32
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(AttnlabError, match="different precisions") as info:
        summarize(results)
    assert "bf16: none seed 0" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", str(results)])
    assert exit_info.value.code == 2 and not (results / "report.md").exists()
    lines[0]["precision"] = "fp32"  # recorded fp32 and unrecorded CPU cells are the same precision
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert summarize(results).precisions == ["fp32"]
