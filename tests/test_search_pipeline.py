"""`attnlab search`: config split and checks, the search phase on a real (tiny) supernet checkpoint, its resume
through the evaluation cache, the fixed plan, the retrain config, and (with the engine's step hooks) the supernet
phase's exact resume (and its refusal to continue as a plain run) and the whole pipeline."""
import json
from pathlib import Path

import pytest
import torch

from attnlab.engine import train as engine
from attnlab.engine.checkpoint import load_checkpoint
from attnlab.errors import AttnlabError
from attnlab.search import pipeline
from attnlab.jsonl import read_jsonl
from attnlab.search.evaluator import SchemeEvaluator

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "search" / "ean_resnet20_se.yaml"
pytestmark = pytest.mark.needs_data("cifar10")


def tiny(tmp, name="ean", **extra):
    over = {"name": name, "out_dir": str(tmp), "data.cache_dir": f"{tmp}/cache", "data.subset": 20,
            "data.val_size": 40, "data.test_subset": 5, "train.epochs": 2, "train.batch_size": 32,
            "train.eval_batch_size": 64, "train.warmup_epochs": 0, "train.deterministic": True,
            "search.searcher": "random", "search.budget": 6, "search.table": False, "search.derive_samples": 3,
            "retrain.seeds": "[0]", "retrain.overrides": "{train.epochs: 1}", **extra}
    return [f"{k}={v}" for k, v in over.items()]


def test_the_recipe_splits_into_an_engine_config_and_pipeline_sections():
    cfg, sec = pipeline.load_pipeline(CONFIG)
    assert cfg.model.share is True and cfg.model.attention == "se" and cfg.name == "ean_resnet20_se"
    assert "search" not in cfg and sec.search.searcher == "reinforce" and sec.search.reward.alpha == 2.0
    assert sec.search.select == "best_sampled" and sec.supernet.p == 0.5
    with pytest.raises(AttnlabError, match="model.share=true"):
        pipeline.load_pipeline(CONFIG, ["model.share=false"])
    with pytest.raises(AttnlabError, match="compile"):
        pipeline.load_pipeline(CONFIG, ["train.compile=true"])
    with pytest.raises(AttnlabError, match="bad search config"):
        pipeline.load_pipeline(CONFIG, ["search.budgett=3"])
    with pytest.raises(AttnlabError, match="unknown config key"):
        pipeline.load_pipeline(CONFIG, ["train.epochz=3"])


def test_retrain_is_a_normal_run_of_the_scheme(tmp_path):
    cfg, sec = pipeline.load_pipeline(CONFIG, tiny(tmp_path))
    rcfg = pipeline.retrain_config(cfg, sec, tmp_path / "ean", "101110011", seed=2)
    assert rcfg.model.blocks == "101-110-011" and rcfg.model.share is True and rcfg.seed == 2
    assert rcfg.train.epochs == 1 and rcfg.name == "retrain-s2"


@pytest.fixture(scope="module")
def supernet_ckpt(tmp_path_factory):
    """A tiny share=True, blocks=all run (plain engine run; the search phase only needs its checkpoint)."""
    tmp = tmp_path_factory.mktemp("sn")
    cfg, sec = pipeline.load_pipeline(CONFIG, tiny(tmp, **{"train.epochs": 1}))
    root = tmp / cfg.name
    scfg = cfg.copy()
    scfg.out_dir, scfg.name = str(root), "supernet"
    engine.train(scfg)
    return root / "supernet" / "checkpoint_last.pt"


class Interrupting(SchemeEvaluator):
    """Stops (like a kill) after ``limit`` real evaluations."""
    limit = 3

    def __call__(self, bits):
        if self.evaluations >= self.limit and "".join(map(str, bits)) not in self.cache:
            raise KeyboardInterrupt
        return super().__call__(bits)


def _search_root(tmp, ckpt, name):
    root = tmp / name
    (root / "supernet").mkdir(parents=True)
    (root / "supernet" / "checkpoint_last.pt").write_bytes(ckpt.read_bytes())
    return root


def test_search_phase_resumes_from_its_cache_with_the_same_result(tmp_path, supernet_ckpt):
    cfg, sec = pipeline.load_pipeline(CONFIG, tiny(tmp_path, **{"search.searcher": "reinforce",
                                                                "search.options": "{steps: 4}",
                                                                "search.budget": "null"}))
    whole = _search_root(tmp_path, supernet_ckpt, "whole")
    ref = pipeline.run_search_phase(cfg, sec, whole)
    assert ref["real_evaluations"] == ref["distinct_evaluations"] + ref["derive_evaluations"]
    log = read_jsonl(whole / "search" / "search.jsonl")
    assert len(log) == ref["queries"] + 1 + 3 and all("top1" in r and "reward" in r for r in log)

    cut = _search_root(tmp_path, supernet_ckpt, "cut")
    _interrupt_search(cfg, sec, cut)
    assert len(read_jsonl(cut / "search" / "evaluations.jsonl")) == 3
    assert not (cut / "search" / "result.json").exists()
    res = pipeline.run_search_phase(cfg, sec, cut)
    assert res["real_evaluations"] == ref["real_evaluations"] - 3  # the first three came from the cache
    keep = ("candidates", "chosen", "chosen_blocks", "distinct_evaluations", "queries", "policy", "info")
    assert {k: res[k] for k in keep} == {k: ref[k] for k in keep}
    again = pipeline.run_search_phase(cfg, sec, cut)  # done: skipped, same result
    assert again["chosen"] == res["chosen"]


def _interrupt_search(cfg, sec, root):
    """Start the search phase under ``root`` with an evaluator that stops it (KeyboardInterrupt) mid-search."""
    ev = pipeline.build_evaluator(cfg, sec, root / "supernet" / "checkpoint_last.pt",
                                  root / "search" / "evaluations.jsonl")
    ev.__class__ = Interrupting
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_search_phase(cfg, sec, root, evaluator=ev)


def test_the_selection_rule_cannot_change_after_the_search_started(tmp_path, supernet_ckpt):
    cfg, sec = pipeline.load_pipeline(CONFIG, tiny(tmp_path))
    root = _search_root(tmp_path, supernet_ckpt, "rule")
    _interrupt_search(cfg, sec, root)
    _, other = pipeline.load_pipeline(CONFIG, tiny(tmp_path, **{"search.select": "mode"}))
    with pytest.raises(AttnlabError, match="different plan"):
        pipeline.run_search_phase(cfg, other, root)


class SyntheticAccuracy(SchemeEvaluator):
    """The real evaluator's bookkeeping with a synthetic accuracy table instead of 512 supernet forwards."""
    table = None

    def __call__(self, bits):
        from attnlab.search.replay import synthetic_table
        key = "".join(map(str, bits))
        if key in self.cache:
            return {**self.cache[key], "cached": True}
        SyntheticAccuracy.table = SyntheticAccuracy.table or synthetic_table(9, seed=1)
        self.evaluations += 1
        self.cache[key] = {"top1": self.table[tuple(bits)]["top1"], "loss": 0.0, "n": 1, "seconds": 0.0}
        return {**self.cache[key], "cached": False}


def test_the_table_holds_every_scheme_and_the_search_reuses_it(tmp_path, supernet_ckpt):
    from attnlab.search.replay import read_table
    cfg, sec = pipeline.load_pipeline(CONFIG, tiny(tmp_path, **{"search.table": True, "search.budget": 50}))
    root = _search_root(tmp_path, supernet_ckpt, "table")
    ev = pipeline.build_evaluator(cfg, sec, root / "supernet" / "checkpoint_last.pt", None)
    ev.__class__ = SyntheticAccuracy
    res = pipeline.run_search_phase(cfg, sec, root, evaluator=ev)
    table = read_table(root / "search" / "table.csv")
    assert len(table) == 512 and res["real_evaluations"] == 512  # the search itself ran on cached numbers
    assert all(table[b]["top1"] == pytest.approx(SyntheticAccuracy.table[b]["top1"], rel=1e-5) for b in table)
    assert all(table[b]["connected"] == sum(b) for b in table)
    best = max(table.values(), key=lambda r: r["reward"])["reward"]
    assert res["candidates"]["best_sampled"]["reward"] <= best + 1e-4


class ValAccuracy(SyntheticAccuracy):
    """Synthetic accuracies as a val split gives them: multiples of 100 / 5000 images (exact in table.csv)."""

    def __call__(self, bits):
        out = super().__call__(bits)
        return {**out, "top1": round(out["top1"] * 50) / 50}


def test_a_search_on_the_committed_table_repeats_the_live_search(tmp_path, supernet_ckpt, capsys):
    """`attnlab search --table` (lookups, no supernet) gives the search that built the table the same rewards, so
    its candidates, policy and chosen scheme are the live search's; a wrong table or phase is one clear error."""
    from attnlab.cli import main
    over = tiny(tmp_path, **{"search.table": True, "search.searcher": "reinforce", "search.options": "{steps: 20}",
                             "search.budget": "null"})
    cfg, sec = pipeline.load_pipeline(CONFIG, over)
    live = _search_root(tmp_path, supernet_ckpt, "ean")  # the name tiny() gives the run
    ev = pipeline.build_evaluator(cfg, sec, live / "supernet" / "checkpoint_last.pt", None)
    ev.__class__ = ValAccuracy
    ref = pipeline.run_search_phase(cfg, sec, live, evaluator=ev)
    table = tmp_path / "committed.csv"
    table.write_bytes((live / "search" / "table.csv").read_bytes())
    replayed = over + ["search.dir=from-table"]
    with pytest.raises(SystemExit) as info:
        main(["search", "--config", str(CONFIG), "--phases", "search", "--table", str(table), *replayed])
    assert info.value.code == 0
    res = json.loads((live / "from-table" / "result.json").read_text())
    keep = ("candidates", "chosen", "chosen_blocks", "distinct_evaluations", "queries", "policy", "info")
    assert {k: res[k] for k in keep} == json.loads(json.dumps({k: ref[k] for k in keep}))
    assert res["real_evaluations"] == 0 and res["context"].startswith("table=committed.csv|sha256=")
    assert (live / "from-table" / "table.csv").read_bytes() == table.read_bytes()
    edited = tmp_path / "edited.csv"  # another table into the same search.dir: refused, not answered from before
    lines = table.read_text().splitlines(keepends=True)
    edited.write_text(lines[0] + lines[1].replace(",", ",9", 1) + "".join(lines[2:]))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["search", "--config", str(CONFIG), "--phases", "search", "--table", str(edited), *replayed])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "holds a search on table=committed.csv" in err and "search.dir=" in err
    with pytest.raises(SystemExit) as info:  # the same table again: its result, skipped
        main(["search", "--config", str(CONFIG), "--phases", "search", "--table", str(table), *replayed])
    assert info.value.code == 0 and "skipped" in capsys.readouterr().out
    for phases, bad, message in (("supernet,search", table, "--table replaces"),
                                 ("search", tmp_path / "missing.csv", "does not exist")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main(["search", "--config", str(CONFIG), "--phases", phases, "--table", str(bad), *replayed])
        assert info.value.code != 0 and message in capsys.readouterr().err
    short = tmp_path / "short.csv"
    short.write_text("".join(table.read_text().splitlines(keepends=True)[:100]))
    with pytest.raises(SystemExit):
        main(["search", "--config", str(CONFIG), "--phases", "search", "--table", str(short), *replayed])
    assert "needs all 512 schemes" in capsys.readouterr().err


@pytest.fixture(scope="module")
def whole_supernet(tmp_path_factory):
    """An uninterrupted tiny supernet run: its final weights, and the data cache it built (shared below)."""
    from attnlab.cli import main
    tmp = tmp_path_factory.mktemp("whole")
    with pytest.raises(SystemExit) as info:
        main(["search", "--config", str(CONFIG), "--phases", "supernet", *tiny(tmp, "whole")])
    assert info.value.code == 0
    last = load_checkpoint(tmp / "whole" / "supernet" / "checkpoint_last.pt")
    assert last["epoch"] == 2
    return last["model"], tmp / "cache"


@pytest.mark.parametrize("kill_at_step", [2, 7])  # in epoch 1 (no checkpoint yet) and in epoch 2 of 2 (one exists)
def test_a_killed_supernet_run_resumes_only_with_its_hook_and_exactly(tmp_path, capsys, whole_supernet,
                                                                      kill_at_step):
    """Killed mid-run: `attnlab train --resume` (it would continue without random masks) and a search with another
    hook are refused in one line with nothing changed; the same hook resumes it to the uninterrupted run's weights."""
    import os
    import subprocess
    import sys
    from attnlab.cli import main
    whole, cache = whole_supernet
    cut = tiny(tmp_path, "sn", **{"data.cache_dir": str(cache)})
    proc = subprocess.run([sys.executable, "-m", "attnlab", "search", "--config", str(CONFIG), "--phases",
                           "supernet", *cut, f"debug.kill_at_step={kill_at_step}"],
                          env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())), capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_dir = tmp_path / "sn" / "supernet"
    assert (run_dir / "checkpoint_last.pt").is_file() == (kill_at_step == 7)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(SystemExit) as info:
        main(["train", "--resume", str(run_dir)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "step hooks" in err and "'hook': 'supernet'" in err and "--phases supernet" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as info:  # another p is another hook: refused as well
        main(["search", "--config", str(CONFIG), "--phases", "supernet", *cut, "supernet.p=0.3"])
    assert info.value.code == 2 and "'p': 0.5" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    with pytest.raises(SystemExit) as info:  # the same hook continues it
        main(["search", "--config", str(CONFIG), "--phases", "supernet", *cut])
    assert info.value.code == 0
    resumed = load_checkpoint(run_dir / "checkpoint_last.pt")
    assert resumed["epoch"] == 2
    assert resumed["model"].keys() == whole.keys() and all(torch.equal(whole[k], resumed["model"][k]) for k in whole)


def test_a_hook_whose_spec_is_not_json_is_refused_before_training(tmp_path):
    from attnlab.engine.config import load_config
    from attnlab.engine.train import train

    class TupleKeys:
        def spec(self):
            return {(1, 2): "tuple key"}

        def __call__(self, trainer, epoch, step):
            pass

    run_dir = tmp_path / "bad"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("kept\n")
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=bad", f"data.cache_dir={tmp_path}/cache"])
    with pytest.raises(AttnlabError, match="not a plain JSON value"):
        train(cfg, step_hooks=[TupleKeys()], overwrite=True)
    assert [p.name for p in run_dir.iterdir()] == ["metrics.csv"]


def test_whole_pipeline_runs_and_skips_done_phases(tmp_path, capsys, monkeypatch):
    from attnlab.cli import main
    from attnlab.models.connections import get_connections, scheme_bits
    from attnlab.search.supernet import SupernetHook
    seen, original = [], SupernetHook.__call__

    def recording(self, trainer, epoch, step):
        original(self, trainer, epoch, step)
        seen.append((step, scheme_bits(get_connections(trainer.model))))

    monkeypatch.setattr(SupernetHook, "__call__", recording)
    args = ["search", "--config", str(CONFIG), *tiny(tmp_path, **{"train.epochs": 1})]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 0
    # The engine called the hook before every training step, and each step trained under that step's own mask.
    assert [s for s, _ in seen] == list(range(len(seen))) and len(seen) >= 4
    assert all(bits == SupernetHook(0.5, 0).mask(s, 9) for s, bits in seen)
    assert len({bits for _, bits in seen}) > 1
    root = tmp_path / "ean"
    res = json.loads((root / "search" / "result.json").read_text())
    retrain = json.loads((root / "retrain-s0" / "results.json").read_text())
    assert retrain["attention"] == "se"
    saved = (root / "retrain-s0" / "config.yaml").read_text()
    assert res["chosen_blocks"] in saved
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(args)
    out = capsys.readouterr().out
    assert out.count("skipped") == 3
    # Another searcher on the finished search, another scheme on the finished retrain: refused, nothing changed.
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as info:
        main([*args, "search.searcher=greedy"])
    assert info.value.code == 2 and "different plan" in capsys.readouterr().err
    other = "000-000-000" if res["chosen_blocks"] != "000-000-000" else "111-111-111"
    with pytest.raises(SystemExit) as info:
        main([*args, "--phases", "retrain", "--scheme", other])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"retrains scheme model.blocks={res['chosen_blocks']}, not {other}" in err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("args, message", [
    (["--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    (["--config", str(CONFIG), "--phases", "supernet,serch"], "unknown phase 'serch'"),
    (["--config", str(CONFIG), "search.dir=../x"], "search.dir must be a plain folder name"),
    # Said before the supernet trains (the default phases run it first), so nothing waits behind a typo.
    (["--config", str(CONFIG), "search.searcher=reinfroce"], "unknown searcher 'reinfroce' (did you mean reinforce"),
    (["--config", str(CONFIG), "search.select=best"], "unknown search.select rule 'best'"),
    (["--config", str(CONFIG), "search.options.stepz=3"], "reinforce has no option stepz"),
    (["--config", str(CONFIG), "search.budget=0"], "search.budget must be >= 1 distinct evaluations"),
    (["--config", str(CONFIG), "search.derive_samples=-1"], "search.derive_samples must be >= 1, got -1"),
    (["--config", str(CONFIG), "retrain.seeds=[]"], "retrain.seeds must be a non-empty list of different seeds"),
    (["--config", str(CONFIG), "--phases", ","], "--phases names no phase"),
    (["--config", str(CONFIG), "--phases", "search,retrain", "--scheme", "111-111-111"], "give --phases retrain"),
])
def test_search_command_bad_input_is_one_line(args, message, capsys):
    from attnlab.cli import main
    with pytest.raises(SystemExit) as info:
        main(["search", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnlab: error: ") and message in err and "\n" not in err
