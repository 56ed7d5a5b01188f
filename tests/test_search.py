"""EAN search pieces without the engine's training loop: reward, JSONL cache, searchers on known reward tables,
the budgeted oracle, the replay study, the supernet mask hook, and the evaluator (deterministic, cached, BN
recalibration) on a real tiny model."""
import json
import re

import pytest
import torch

from attnlab.data.datasets import Split
from attnlab.data.loader import BatchLoader
from attnlab.errors import AttnlabError
from attnlab.models import create_model
from attnlab.models.connections import get_connections, scheme_bits
from attnlab.search.evaluator import SchemeEvaluator
from attnlab.search.replay import ranks, read_table, replay_study, synthetic_table, write_table
from attnlab.search.reward import LatencyTable, Reward
from attnlab.search.searchers import SEARCHERS, Oracle, make_searcher, run_search
from attnlab.search.supernet import SupernetHook

N_BITS = 9


@pytest.fixture(scope="module")
def table():
    return synthetic_table(N_BITS, seed=0)


def oracle_for(table, budget=None, alpha=2.0, log=None):
    reward = Reward(alpha=alpha)
    return Oracle(lambda bits: reward.terms(bits, table[bits]["top1"]), budget=budget, on_query=log)


def true_best(table, alpha=2.0):
    reward = Reward(alpha=alpha)
    return "".join(map(str, max(table, key=lambda b: reward(b, table[b]["top1"]))))


# ---- reward ----------------------------------------------------------------------------------------------------

def test_reward_is_accuracy_plus_alpha_times_unconnected_fraction():
    r = Reward(alpha=2.0)
    assert r((1, 1, 1, 1), 90.0) == 90.0
    assert r((1, 0, 0, 0), 90.0) == pytest.approx(91.5)
    assert r((0, 0, 0, 0), 80.0) == pytest.approx(82.0)


def test_latency_term_reads_the_per_block_table(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text(json.dumps({"base_ms": 4.0, "delta_ms": [0.5, 0.5, 1.0]}))
    lat = LatencyTable.load(path)
    r = Reward(alpha=0.0, beta=0.1, latency=lat)
    t = r.terms((1, 0, 1), 90.0)
    assert t["latency_ms"] == pytest.approx(5.5)
    assert t["latency_overhead_pct"] == pytest.approx(37.5)
    assert t["reward"] == pytest.approx(90.0 - 3.75)
    with pytest.raises(AttnlabError, match="latency table"):
        Reward(beta=1.0)
    with pytest.raises(AttnlabError, match="3 blocks"):
        r((1, 0), 90.0)


# ---- searchers on a known table --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, budget", [("exhaustive", None), ("random", 512), ("greedy", 200),
                                          ("reinforce", None), ("reinforce-plain", None)])
def test_every_searcher_finds_the_best_scheme_of_a_synthetic_table(table, name, budget):
    out = run_search(make_searcher(name), oracle_for(table, budget), N_BITS, seed=0)
    assert out.candidates["best_sampled"]["scheme"] == true_best(table)
    assert out.chosen == out.candidates["best_sampled"]["scheme"]  # the default rule
    if budget is not None:
        assert out.distinct_evaluations <= budget


def test_reinforce_policy_converges_to_the_best_scheme(table):
    out = run_search(make_searcher("reinforce"), oracle_for(table), N_BITS, seed=0, select="mode")
    assert out.chosen == true_best(table)
    curve = out.info["curve"]
    assert len(curve) == 300
    assert curve[-1]["mean_reward"] > curve[0]["mean_reward"]
    assert out.queries == 900  # EAN: 3 samples x 300 steps
    assert out.distinct_evaluations < 512


def test_budget_caps_distinct_evaluations_and_candidates_are_counted_apart(table):
    for name in ("random", "greedy", "reinforce"):
        oracle = oracle_for(table, budget=30)
        out = run_search(make_searcher(name), oracle, N_BITS, seed=3, derive_samples=10)
        assert out.distinct_evaluations == 30, name
        assert out.queries >= 30
        assert out.distinct_evaluations + out.derive_evaluations == oracle.distinct
        assert set(out.candidates) == {"mode", "best_sampled", "best_of_n"}


def test_a_seeded_search_is_reproducible_and_seeds_differ(table):
    a = run_search(make_searcher("reinforce"), oracle_for(table, 60), N_BITS, seed=1).to_dict()
    b = run_search(make_searcher("reinforce"), oracle_for(table, 60), N_BITS, seed=1).to_dict()
    c = run_search(make_searcher("reinforce"), oracle_for(table, 60), N_BITS, seed=2).to_dict()
    assert a == b
    assert a["info"]["curve"] != c["info"]["curve"]


def test_oracle_logs_every_query_and_evaluates_each_scheme_once(table):
    calls, log = [], []
    reward = Reward()

    def evaluate(bits):
        calls.append(bits)
        return reward.terms(bits, table[bits]["top1"])

    oracle = Oracle(evaluate, on_query=log.append)
    out = run_search(make_searcher("reinforce", steps=20), oracle, N_BITS, seed=0, derive_samples=5)
    assert len(calls) == len(set(calls)) == oracle.distinct
    assert len(log) == oracle.queries == out.queries + 1 + 5  # + the mode + 5 fresh samples
    assert [r["query"] for r in log] == list(range(1, len(log) + 1))
    assert any(r["repeat"] for r in log)


def test_bad_searcher_options_are_one_line_errors():
    with pytest.raises(AttnlabError, match="unknown searcher"):
        make_searcher("evolution")
    with pytest.raises(AttnlabError, match="no option stepz"):
        make_searcher("reinforce", stepz=3)
    with pytest.raises(AttnlabError, match="needs a budget"):
        run_search(make_searcher("random"), Oracle(lambda b: {"reward": 0.0}), 4, seed=0)
    with pytest.raises(AttnlabError, match="allowed up to 12"):
        run_search(make_searcher("exhaustive"), Oracle(lambda b: {"reward": 0.0}), 13, seed=0)
    with pytest.raises(AttnlabError, match="selection rule"):
        run_search(make_searcher("greedy"), Oracle(lambda b: {"reward": 0.0}, budget=3), 4, seed=0, select="last")


# ---- replay ----------------------------------------------------------------------------------------------------

def test_table_round_trip_and_ranks(tmp_path, table):
    path = tmp_path / "table.csv"
    write_table(path, table, depths=[3, 3, 3])
    back = read_table(path)
    assert back.keys() == table.keys()
    assert all(back[b]["top1"] == pytest.approx(table[b]["top1"], rel=1e-5) for b in table)
    r = ranks({(0,): 3.0, (1,): 5.0, (2,): 3.0})
    assert r == {(1,): 1, (0,): 2, (2,): 2}


@pytest.mark.parametrize("content, message", [
    (bytes(range(128, 256)), "is not a CSV text file (UnicodeDecodeError)"),
    (b"scheme,top1\n101,0.5\n1x1,0.4\n", "line 3: a scheme of 0/1 digits and a finite top1 expected"),
    (b"scheme,top1\n101,high\n", "line 2: a scheme of 0/1 digits and a finite top1 expected"),
    (b"scheme,top1\n102,0.5\n", "line 2: a scheme of 0/1 digits"),
    (b"scheme,top1,loss\n101,,0.3\n", "line 2: a scheme of 0/1 digits and a finite top1 expected"),
    (b"scheme,top1\n101,nan\n", "line 2: a scheme of 0/1 digits and a finite top1 expected"),
    (b"scheme,top1\n101,0.5\n1-0-1,0.6\n", "line 3: scheme 1-0-1 is listed twice"),
])
def test_a_table_that_is_not_one_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "table.csv"
    path.write_bytes(content)
    with pytest.raises(AttnlabError, match=re.escape(message)):
        read_table(path)
    with pytest.raises(AttnlabError, match="is a folder, not a CSV file"):
        read_table(tmp_path)


def test_replay_study_ranks_each_searchers_pick(table):
    study = replay_study(table, budgets=(20, 512), seeds=3, searchers=("random", "greedy"), synthetic=True)
    assert study["synthetic"] is True and study["schemes"] == 512
    assert study["best_scheme"] == true_best(table)
    cells = {(s["searcher"], s["budget"]): s for s in study["summary"]}
    assert cells[("random", 512)]["best_sampled"]["p_rank1"] == 1.0  # the whole space, without replacement
    assert cells[("random", 20)]["mean_distinct"] == 20
    assert len(study["runs"]) == 2 * 2 * 3
    assert all(1 <= r["chosen_rank"] <= 512 for r in study["runs"])


def test_replay_covers_all_searchers():
    assert set(SEARCHERS) == {"exhaustive", "random", "greedy", "reinforce", "reinforce-plain"}


# ---- supernet hook ---------------------------------------------------------------------------------------------

class FakeTrainer:
    def __init__(self, model):
        self.model = model


def test_supernet_masks_are_a_pure_function_of_seed_and_step():
    hook = SupernetHook(p=0.5, seed=7)
    assert hook.mask(5, 9) == SupernetHook(p=0.5, seed=7).mask(5, 9)
    masks = [hook.mask(s, 9) for s in range(400)]
    assert len(set(masks)) > 200  # fresh masks, not one repeated
    assert sum(map(sum, masks)) / (400 * 9) == pytest.approx(0.5, abs=0.03)
    assert hook.mask(5, 9) != SupernetHook(p=0.5, seed=8).mask(5, 9) or hook.mask(6, 9) != SupernetHook(
        p=0.5, seed=8).mask(6, 9)
    dense = SupernetHook(p=0.9, seed=0)
    assert sum(map(sum, (dense.mask(s, 9) for s in range(400)))) / 3600 == pytest.approx(0.9, abs=0.03)


def test_supernet_hook_sets_the_mask_for_training_and_all_for_eval():
    model = create_model("resnet20", attention="se", share=True, blocks="all")
    hook = SupernetHook(p=0.5, seed=0)
    trainer = FakeTrainer(model)
    model.train()
    hook(trainer, 0, 3)
    assert scheme_bits(get_connections(model)) == hook.mask(3, 9)
    x = torch.randn(2, 3, 32, 32)
    model(x)  # training forward keeps the step's mask
    assert scheme_bits(get_connections(model)) == hook.mask(3, 9)
    model.eval()
    with torch.no_grad():
        model(x)
    assert scheme_bits(get_connections(model)) == (1,) * 9
    plain = create_model("resnet20", attention="se", share=True, blocks="100-100-100")
    with pytest.raises(AttnlabError, match="every block"):
        hook(FakeTrainer(plain), 0, 0)


# ---- evaluator -------------------------------------------------------------------------------------------------

def tiny_split(n, seed):
    g = torch.Generator().manual_seed(seed)
    return Split("tiny", torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, (n,), generator=g))


@pytest.fixture
def supernet_model():
    torch.manual_seed(0)
    model = create_model("resnet20", attention="se", share=True, blocks="all")
    with torch.no_grad():  # non-trivial BN statistics, so recalibration has something to change
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_evaluator_is_deterministic_and_cached_across_restarts(tmp_path, supernet_model):
    val = BatchLoader(tiny_split(40, 0), 16)
    cache = tmp_path / "evaluations.jsonl"
    ev = SchemeEvaluator(supernet_model, val, cache_path=cache, context="ckpt=test")
    a = ev((1, 0, 1, 0, 1, 0, 1, 0, 1))
    b = ev((0, 0, 0, 0, 0, 0, 0, 0, 0))
    assert ev.evaluations == 2 and not a["cached"]
    assert ev((1, 0, 1, 0, 1, 0, 1, 0, 1))["cached"] and ev.evaluations == 2
    assert a["top1"] != b["top1"] or a["loss"] != b["loss"]

    again = SchemeEvaluator(supernet_model, val, cache_path=cache, context="ckpt=test")
    assert again((1, 0, 1, 0, 1, 0, 1, 0, 1)) == {**a, "cached": True}
    assert again.evaluations == 0
    fresh = SchemeEvaluator(supernet_model, val, context="ckpt=test")  # no cache: recomputes the same numbers
    assert {k: v for k, v in fresh((1, 0, 1, 0, 1, 0, 1, 0, 1)).items() if k != "seconds"} == \
        {k: v for k, v in a.items() if k not in ("seconds", "cached")} | {"cached": False}
    other = SchemeEvaluator(supernet_model, val, cache_path=cache, context="ckpt=other")
    assert not other((1, 0, 1, 0, 1, 0, 1, 0, 1))["cached"]  # another supernet never reuses these numbers


def test_bn_recalibration_is_deterministic_and_restores_the_supernet(supernet_model):
    val = BatchLoader(tiny_split(32, 0), 16)
    recal = BatchLoader(tiny_split(64, 1), 16, shuffle=True, drop_last=True)
    before = {k: v.clone() for k, v in supernet_model.state_dict().items()}
    plain = SchemeEvaluator(supernet_model, val)
    ev = SchemeEvaluator(supernet_model, val, recal_loader=recal, recal_batches=3)
    scheme = (1, 1, 0, 0, 1, 1, 0, 0, 1)
    r1, r2 = ev(scheme), SchemeEvaluator(supernet_model, val, recal_loader=recal, recal_batches=3)(scheme)
    assert (r1["top1"], r1["loss"]) == (r2["top1"], r2["loss"])
    assert r1["loss"] != plain(scheme)["loss"]
    after = supernet_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.momentum == 0.1 for m in supernet_model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert "recal=3" in ev.context and "recal=0" in plain.context


# ---- proof-run driver helpers ----------------------------------------------------------------------------------

def _driver():
    from conftest import load_benchmark
    return load_benchmark("ean_resnet20")


def test_driver_kendall_tau_spread_and_random_controls():
    d = _driver()
    assert d.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert d.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert d.kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    ranked = [((i,), None) for i in range(512)]
    picks = d.spread_schemes(ranked)
    assert picks[0] == (0,) and picks[-1] == (511,) and len(picks) == 8
    controls = d.random_same_k(4, exclude={"111100000"})
    assert len(controls) == 3 and len(set(controls)) == 3
    assert all(sum(b) == 4 and "".join(map(str, b)) != "111100000" for b in controls)
    assert controls == d.random_same_k(4, exclude={"111100000"})  # fixed before any retrain
    assert d.blocks((1, 0, 1, 1, 1, 0, 0, 1, 1)) == "101-110-011"


def test_driver_save_then_restore_into_a_lost_runs_folder(tmp_path, capsys):
    """runs/ does not survive a session: `save` copies the supernet's small files, each search folder and the
    tables to results/, and each phase first copies back what runs/ lacks, never overwriting what runs/ has."""
    import argparse
    import shutil
    d = _driver()
    a = argparse.Namespace(runs=str(tmp_path / "runs"), results=str(tmp_path / "results"), tiny=True)
    run = d.search_root(a)
    (run / "supernet").mkdir(parents=True)
    (run / "search-recal20").mkdir()
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "results.json", "events.out.tfevents.1"):
        (run / "supernet" / name).write_bytes(name.encode())
    (run / "search-recal20" / "evaluations.jsonl").write_text('{"scheme": "000000000"}\n')
    (run / "search-recal20" / "table.csv").write_text("scheme,top1\n")
    d.phase_save(a)
    saved = d.evidence_root(a)
    assert sorted(p.name for p in (saved / "supernet").iterdir()) == ["checkpoint_last.pt", "results.json"]
    assert sorted(p.name for p in (saved / "search-recal20").iterdir()) == ["evaluations.jsonl"]
    assert (tmp_path / "results" / "table_resnet20_se_recal20.csv").read_text() == "scheme,top1\n"
    shutil.rmtree(tmp_path / "runs")
    d.restore(a)
    assert (run / "supernet" / "checkpoint_last.pt").read_bytes() == b"checkpoint_last.pt"
    assert not (run / "supernet" / "checkpoint_best.pt").exists()
    assert (run / "search-recal20" / "table.csv").read_text() == "scheme,top1\n"
    (run / "search-recal20" / "evaluations.jsonl").write_text("longer cache\n")  # the live copy wins
    d.restore(a)
    assert (run / "search-recal20" / "evaluations.jsonl").read_text() == "longer cache\n"
    assert "restore: 4 files" in capsys.readouterr().out


def test_driver_retrain_matrix_lists_eans_claims_and_guards_its_cells(tmp_path):
    """The retrain matrix is kept with its results and loads as a bench matrix with EAN's claims; rewording a claim
    is allowed, another scheme for a method that has cells is not."""
    import argparse
    from attnlab.bench.matrix import load_matrix
    d = _driver()
    a = argparse.Namespace(runs=str(tmp_path / "runs"), results=str(tmp_path / "results"), tiny=False)
    methods = [("none", {"model.attention": "none"}), ("se", {"model.attention": "se"}),
               ("se-shared-full", {"model.attention": "se", "model.share": True, "model.blocks": "all"}),
               ("ean-se", {"model.attention": "se", "model.share": True, "model.blocks": "100-100-001"}),
               ("random3-0", {"model.attention": "se", "model.share": True, "model.blocks": "001-000-110"})]
    claims = d.retrain_claims(methods)
    path = d.write_matrix(a, "ean_retrain", methods, [0, 1, 2], {"train.epochs": 20}, latency=True, claims=claims)
    assert path == tmp_path / "results" / "matrices" / "ean_retrain.yaml"
    m = load_matrix(path)
    assert [(c["method"], c["baseline"], c["kind"]) for c in m["claims"]] == [
        ("ean-se", "se-shared-full", "match"), ("ean-se", "se", "match"), ("se-shared-full", "se", "match"),
        ("ean-se", "random3-0", "better")]
    assert m["claims"][0]["margin"] == 0.5
    reworded = [dict(claims[0], paper="re-read")] + claims[1:]
    d.write_matrix(a, "ean_retrain", methods, [0, 1, 2], {"train.epochs": 20}, latency=True, claims=reworded)
    assert load_matrix(path)["claims"][0]["paper"] == "re-read"
    other = methods[:3] + [("ean-se", dict(methods[3][1], **{"model.blocks": "100-100-000"}))] + methods[4:]
    with pytest.raises(SystemExit, match="exists with other content"):
        d.write_matrix(a, "ean_retrain", other, [0, 1, 2], {"train.epochs": 20}, latency=True, claims=claims)
    assert load_matrix(path)["methods"][3]["overrides"]["model.blocks"] == "100-100-001"
