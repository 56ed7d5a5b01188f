"""``attnlab search --config configs/search/ean_resnet20_se.yaml``: supernet -> search -> retrain, resumable.

The YAML is an ordinary training recipe (its engine keys configure the supernet run) plus three sections of its own:

    supernet: {p: 0.5, eval_mask: all}
    search:   {searcher: reinforce, seed: 0, budget: null, select: best_sampled, derive_samples: 20,
               recal_batches: 0, table: false, reward: {alpha: 2.0, beta: 0.0, latency_table: null}, ...}
    retrain:  {seeds: [0], overrides: {}}   (overrides of the recipe for the retrain runs, e.g. {train.epochs: 30})

Everything goes under ``<out_dir>/<name>/``:
  supernet/        a normal engine run (config.yaml, metrics.csv, checkpoint_last.pt, results.json) trained with the
                   ``SupernetHook``; an interrupted one resumes from its checkpoint_last.pt;
  search/plan.json the searcher, seed, budget and selection rule, written before the first evaluation; a rerun
                   with a different plan is refused, finished or not (the rule is fixed before the search);
  search/evaluations.jsonl  every real evaluation (the cache; survives restarts); search.jsonl  every query of this
                   search run, in order; table.csv  all schemes (``search.table: true``); result.json  the three
                   candidates, the chosen scheme and the counts;
  retrain-s<seed>/ normal engine runs of the chosen scheme, ``model.share=true model.blocks=<scheme>``; one that
                   holds another scheme is refused rather than skipped or resumed.
A phase whose output is complete is skipped; ``--phases`` picks phases, ``--scheme`` retrains a given scheme
without searching, ``--table CSV`` searches on a committed scheme table (lookups, no supernet). The search
evaluates the supernet's final weights (checkpoint_last.pt) on the val split held out of train
(``data.val_size``); the test split is never read by the search.
"""
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..engine.config import SEARCH_SECTIONS
from ..engine.run_folder import RunFolder
from ..errors import AttnlabError

PHASES = SEARCH_SECTIONS  # supernet -> search -> retrain: each phase is a section of the recipe


@dataclass
class SupernetSection:
    p: float = 0.5
    eval_mask: str = "all"


@dataclass
class RewardSection:
    alpha: float = 2.0
    beta: float = 0.0
    latency_table: Optional[str] = None


@dataclass
class SearchSection:
    searcher: str = "reinforce"
    options: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    budget: Optional[int] = None  # distinct evaluations; None: the searcher's own end (random needs one)
    select: str = "best_sampled"
    derive_samples: int = 20
    recal_batches: int = 0
    recal_batch_size: int = 128
    eval_batch_size: Optional[int] = None  # None: train.eval_batch_size
    table: bool = False  # evaluate every scheme first (up to 2^12) and write table.csv
    dir: str = "search"  # sub-folder of the run for this search (variants, e.g. with recalibration, share the supernet)
    reward: RewardSection = field(default_factory=RewardSection)


@dataclass
class RetrainSection:
    seeds: List[int] = field(default_factory=lambda: [0])
    overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineSections:
    supernet: SupernetSection = field(default_factory=SupernetSection)
    search: SearchSection = field(default_factory=SearchSection)
    retrain: RetrainSection = field(default_factory=RetrainSection)


def add_arguments(p):
    p.add_argument("--config", required=True, help="search recipe (e.g. configs/search/ean_resnet20_se.yaml)")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of supernet,search,retrain")
    p.add_argument("--scheme", default=None, help="retrain this scheme (e.g. 101-110-011) instead of the searched one")
    p.add_argument("--table", default=None, metavar="CSV",
                   help="search on a committed scheme table (e.g. results/ean/table_resnet20_se.csv): look each "
                        "scheme up instead of evaluating the supernet; no supernet phase")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides: engine keys (train.epochs=2) or supernet./search./retrain. keys")


def load_pipeline(path, overrides=()):
    """(engine config of the supernet run, the pipeline's own sections) from the recipe and overrides."""
    from ..engine.config import load_config, parse_overrides, read_recipe
    path = Path(path)
    raw = OmegaConf.to_container(read_recipe(path))
    own = {k: raw.pop(k) for k in PHASES if k in raw}
    mine = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] in PHASES]
    engine = [o for o in overrides if o not in mine]
    sections = OmegaConf.structured(PipelineSections)
    OmegaConf.set_struct(sections, True)
    OmegaConf.set_struct(sections.search.options, False)
    OmegaConf.set_struct(sections.retrain.overrides, False)
    try:
        sections = OmegaConf.merge(sections, OmegaConf.create(own), parse_overrides(mine))
    except OmegaConfBaseException as err:
        raise AttnlabError(f"bad search config in '{path}': {str(err).splitlines()[0]}") from None
    if not re.fullmatch(r"[A-Za-z0-9._-]+", sections.search.dir) or sections.search.dir in (".", "..", "supernet"):
        raise AttnlabError(f"search.dir must be a plain folder name (not '.', '..' or 'supernet'), "
                           f"got {sections.search.dir!r}")
    raw.setdefault("name", path.stem)
    cfg = load_config(None, engine, base=raw)
    _check_supernet_config(cfg)
    _check_search(sections)
    return cfg, sections


def _check_search(sec):
    """The search section's searcher, its options, the selection rule and the reward, checked before any phase
    runs: a misspelt searcher must not wait behind a supernet's training, nor be written into plan.json."""
    from .searchers import SELECT_RULES, make_searcher
    from ..errors import unknown
    s = sec.search
    if s.budget is not None and s.budget < 1:
        raise AttnlabError(f"search.budget must be >= 1 distinct evaluations (or null: the searcher's own end), "
                           f"got {s.budget}")
    if s.derive_samples < 1:
        raise AttnlabError(f"search.derive_samples must be >= 1, got {s.derive_samples}")
    seeds = list(sec.retrain.seeds)
    if not seeds or min(seeds) < 0 or len(set(seeds)) < len(seeds):
        raise AttnlabError(f"retrain.seeds must be a non-empty list of different seeds >= 0, got {seeds}")
    try:
        make_searcher(s.searcher, **OmegaConf.to_container(s.options))
    except TypeError as err:  # an option the searcher does not take
        raise AttnlabError(f"search.options for searcher '{s.searcher}': {err}") from None
    if s.select not in SELECT_RULES:
        raise unknown("search.select rule", s.select, SELECT_RULES)
    _reward(sec)


def _check_supernet_config(cfg):
    m = cfg.model
    if m.attention == "none" or m.share is not True or m.blocks not in (None, "all"):
        raise AttnlabError("a search recipe trains a supernet: it needs model.attention (not none), "
                           "model.share=true and model.blocks=all (or unset)")
    if cfg.train.compile:
        raise AttnlabError("train.compile must be false for a supernet (every new mask would recompile)")
    if cfg.train.ema.enabled:
        raise AttnlabError("train.ema.enabled must be false for a supernet (the search reads the raw weights)")


def run(args):
    cfg, sec = load_pipeline(args.config, args.overrides)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    for p in phases:
        if p not in PHASES:
            raise AttnlabError(f"unknown phase '{p}'; valid phases: {', '.join(PHASES)}")
    if not phases:
        raise AttnlabError(f"--phases names no phase; give some of {','.join(PHASES)}")
    if args.scheme is not None and "search" in phases:
        raise AttnlabError("--scheme retrains the scheme it names instead of a searched one: give --phases retrain "
                           "(or drop --scheme to search)")
    if _world_size() > 1 and phases != ["supernet"]:
        # The search evaluates on one device, and the retrain's seed loop would let the ranks disagree on which run
        # dir to resume: under torchrun the supernet is trained alone, the rest runs as one process afterwards.
        raise AttnlabError("under torchrun only the supernet phase runs (--phases supernet); run the others in one "
                           "process afterwards: attnlab search --config ... --phases search,retrain")
    root = Path(cfg.out_dir) / cfg.name
    scheme = args.scheme
    evaluator = None
    if args.table is not None:
        if "supernet" in phases:
            raise AttnlabError("--table replaces the supernet's evaluations: give --phases search (or search,retrain)")
        from .evaluator import TableEvaluator
        evaluator = TableEvaluator(args.table, cfg_depths(cfg))
    if "supernet" in phases:
        run_supernet(cfg, sec, root)
    if "search" in phases and scheme is None:
        scheme = run_search_phase(cfg, sec, root, evaluator)["chosen_blocks"]
    if "retrain" in phases:
        if scheme is None:
            scheme = read_result(root, sec.search.dir)["chosen_blocks"]
        run_retrain(cfg, sec, root, scheme)
    return 0


# ---- phase 1 ---------------------------------------------------------------------------------------------------

def supernet_dir(root) -> Path:
    return Path(root) / "supernet"


def run_supernet(cfg, sec, root):
    from ..engine import train as engine
    from .supernet import SupernetHook
    run_dir = supernet_dir(root)
    if RunFolder(run_dir).is_complete():
        _say(f"supernet: done ({run_dir}); skipped")
        return
    scfg = cfg.copy()
    scfg.out_dir, scfg.name = str(root), "supernet"
    hook = SupernetHook(sec.supernet.p, cfg.seed, sec.supernet.eval_mask)
    # An existing dir is always resumed (the engine refuses to start a fresh run over it); without a checkpoint
    # yet (killed in epoch 1) the engine starts that run from the beginning.
    resume = run_dir if run_dir.is_dir() else None
    _say(f"supernet: {'resuming' if resume else 'training'} {run_dir} (each bit on with p={hook.p})")
    engine.train(scfg, resume=resume, step_hooks=[hook])


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _say(text: str) -> None:
    """Print a phase line once (rank 0 under torchrun, where every rank runs the training phases)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


# ---- phase 2 ---------------------------------------------------------------------------------------------------

def read_result(root, sub: str = "search") -> dict:
    path = Path(root) / sub / "result.json"
    if not path.is_file():
        raise AttnlabError(f"no search result at {path}: run the search phase first, or give --scheme")
    return json.loads(path.read_text())


def build_evaluator(cfg, sec, ckpt_path, cache_path):
    """The supernet's final weights on the held-out val split, as a cached SchemeEvaluator."""
    from ..data.loader import BatchLoader
    from ..engine.run_folder import open_run
    from .evaluator import SchemeEvaluator, checkpoint_context

    run = open_run(ckpt_path, cfg.device, use_ema=False)
    # The supernet's own data settings and seed: the val split must be the one held out of *its* training images.
    seed, batch = run.config["seed"], sec.search.eval_batch_size or cfg.train.eval_batch_size
    if run.config["data"].get("pipeline", "cache") == "stream":
        val, recal = _stream_search_loaders(run.config, sec, run.device, batch)
    else:
        b = run.dataset()
        if len(b.val) == 0:
            raise AttnlabError("the search evaluates on the val split held out of train: set data.val_size > 0")
        common = dict(mean=b.mean, std=b.std, device=run.device, seed=seed)
        val = BatchLoader(b.val, batch, **common)
        recal = None
        if sec.search.recal_batches:
            recal = BatchLoader(b.train, sec.search.recal_batch_size, shuffle=True, augment=False, drop_last=True,
                                **common)
    return SchemeEvaluator(run.model, val, run.device, recal, sec.search.recal_batches, cache_path,
                           f"{checkpoint_context(ckpt_path)}|data_seed={seed}", run.channels_last)


def _stream_search_loaders(run_cfg, sec, device, batch):
    """(val, recalibration or None) loaders of a streamed supernet (ImageNet-sized sets are never cached): the
    evaluation transform (resize, centre crop) on the held-out val split; the recalibration batches are training
    images under that same transform, in a seeded order."""
    from ..data.stream import ImageFiles, StreamLoader, stream_dataset
    from ..data.transforms import eval_transform
    data, seed = run_cfg["data"], int(run_cfg["seed"])
    b = stream_dataset(data, seed)
    if len(b.val) == 0:
        raise AttnlabError("the search evaluates on the val split held out of train: set data.val_size > 0")
    tf = eval_transform(data["stream"], b.image_size)
    common = dict(device=device, seed=seed, workers=int(data["workers"]))
    val = StreamLoader(ImageFiles(b.val, tf), batch, **common)
    recal = None
    if sec.search.recal_batches:
        recal = StreamLoader(ImageFiles(b.train, tf), sec.search.recal_batch_size, shuffle=True, drop_last=True,
                             **common)
    return val, recal


def _reward(sec):
    from .reward import LatencyTable, Reward
    r = sec.search.reward
    table = LatencyTable.load(r.latency_table) if r.latency_table else None
    return Reward(alpha=r.alpha, beta=r.beta, latency=table)


def _plan(sec) -> dict:
    s = sec.search
    return {"searcher": s.searcher, "options": OmegaConf.to_container(s.options), "seed": s.seed,
            "budget": s.budget, "select": s.select, "derive_samples": s.derive_samples,
            "recal_batches": s.recal_batches, "reward": OmegaConf.to_container(s.reward)}


def _check_source(out: Path, res: dict, table: str | None) -> None:
    """A finished search is reused only on what it searched: the same --table (name and SHA-256), or the
    supernet when no table is given."""
    held = str(res.get("context", ""))
    if table is not None and held != table:
        raise AttnlabError(f"{out} holds a search on {held or 'the supernet'}, not on {table}: give "
                           "search.dir=<new folder> to search this table")
    if table is None and held.startswith("table="):
        raise AttnlabError(f"{out} holds a search on {held}, not on the supernet: give search.dir=<new folder>, "
                           "or the same --table")


def run_search_phase(cfg, sec, root, evaluator=None) -> dict:
    """The search over the supernet's evaluations (cached in evaluations.jsonl): plan.json fixes the rule first,
    result.json holds the chosen blocks; a finished search with the same plan is reused."""
    from ..models.connections import bits_to_blocks
    from ..files import atomic_write_bytes
    from ..jsonl import append_jsonl
    from .replay import write_json
    from .searchers import Oracle, make_searcher, run_search

    out = Path(root) / sec.search.dir
    plan = _plan(sec)
    _check_plan(out, plan)
    if (out / "result.json").is_file():
        res = read_result(root, sec.search.dir)
        _check_source(out, res, getattr(evaluator, "context", None))
        print(f"search: done ({out / 'result.json'}); chosen {res['chosen_blocks']} ({res['select']}); skipped")
        return res
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "plan.json", plan)
    searcher = make_searcher(sec.search.searcher, **plan["options"])
    reward = _reward(sec)
    if evaluator is None:
        ckpt = RunFolder(supernet_dir(root)).last
        if not ckpt.is_file():
            raise AttnlabError(f"no supernet checkpoint at {ckpt}: run the supernet phase first")
        evaluator = build_evaluator(cfg, sec, ckpt, out / "evaluations.jsonl")
    depths = evaluator.depths
    t0 = time.perf_counter()
    progress = _Progress(sec.search.budget)

    def evaluate(bits):
        res = evaluator(bits)
        progress.evaluated(res["cached"])
        return {**reward.terms(bits, res["top1"]), "loss": res["loss"]}

    if sec.search.table:
        _write_every_scheme(Oracle(evaluate), depths, out / "table.csv")
    log = atomic_write_bytes(out / "search.jsonl", b"", "search log")  # the search re-runs whole from the cache
    oracle = Oracle(evaluate, budget=sec.search.budget, on_query=lambda rec: append_jsonl(log, rec, sort_keys=True))
    outcome = run_search(searcher, oracle, sum(depths), sec.search.seed, sec.search.select, sec.search.derive_samples)
    progress.close()
    res = outcome.to_dict()
    res.update(chosen_blocks=bits_to_blocks(outcome.chosen, depths), depths=list(depths),
               real_evaluations=evaluator.evaluations, seconds=round(time.perf_counter() - t0, 1),
               evaluation_split=evaluator.split,
               bn_recalibration=sec.search.recal_batches, context=evaluator.context,
               reward_definition=f"top1 + {reward.alpha} x fraction not connected"
               + (f" - {reward.beta} x latency overhead %" if reward.latency else ""))
    write_json(out / "result.json", res)
    print(_outcome_line(outcome, res["chosen_blocks"], sec.search.derive_samples), flush=True)
    return res


def _check_plan(out: Path, plan: dict) -> None:
    """Refuse a search folder whose plan.json differs from this one, before a finished search there is reused:
    another searcher or rule must not silently get the old result."""
    plan_path = out / "plan.json"
    if plan_path.is_file() and json.loads(plan_path.read_text()) != plan:
        done = "finished" if (out / "result.json").is_file() else "started"
        raise AttnlabError(f"{plan_path} records a different plan (searcher, budget, selection rule or reward) for "
                           f"the search {done} there; the rule is fixed before the search: restore those settings, "
                           "or give search.dir=<new folder> (or a new run name) for another search")


def _write_every_scheme(oracle, depths, path: Path) -> None:
    """``search.table``: every one of the 2^blocks schemes evaluated and written to table.csv (up to 12 blocks)."""
    from .replay import write_table
    from .searchers import all_schemes
    n_bits = sum(depths)
    if n_bits > 12:
        raise AttnlabError(f"search.table evaluates all 2^{n_bits} schemes; allowed up to 12 blocks")
    table = {tuple(bits): oracle.record(bits) for bits in all_schemes(n_bits)}
    write_table(path, {b: {**r, "connected": sum(b)} for b, r in table.items()}, depths)


def _outcome_line(outcome, chosen_blocks, derive_samples: int) -> str:
    c = outcome.candidates
    return (f"search: {outcome.searcher} seed {outcome.seed}: {outcome.distinct_evaluations} distinct evaluations, "
            f"{outcome.queries} queries, {outcome.derive_evaluations} for the candidates; mode {c['mode']['scheme']} "
            f"({c['mode']['reward']:.3f}), best sampled {c['best_sampled']['scheme']} "
            f"({c['best_sampled']['reward']:.3f}), best of {derive_samples} {c['best_of_n']['scheme']} "
            f"({c['best_of_n']['reward']:.3f}); rule {outcome.select} -> {chosen_blocks}")


class _Progress:
    """A tqdm bar of evaluations on a terminal; a line every 50 evaluations otherwise."""

    def __init__(self, total):
        from tqdm import tqdm
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc="search", unit="eval", disable=not self.tty, dynamic_ncols=True)
        self.real = self.hits = 0
        self.t0 = time.perf_counter()

    def evaluated(self, cached: bool):
        self.hits += cached
        self.real += not cached
        self.bar.update(1)
        self.bar.set_postfix(real=self.real, cached=self.hits)
        n = self.real + self.hits
        if not self.tty and n % 50 == 0:
            print(f"search: {n} evaluations ({self.real} run, {self.hits} from the cache), "
                  f"{time.perf_counter() - self.t0:.0f} s", flush=True)

    def close(self):
        self.bar.close()


# ---- phase 3 ---------------------------------------------------------------------------------------------------

def retrain_config(cfg, sec, root, scheme: str, seed: int):
    from ..engine.config import load_config
    from ..models.connections import bits_to_blocks
    blocks = bits_to_blocks(scheme, cfg_depths(cfg))
    overrides = [f"{k}={_value(v)}" for k, v in OmegaConf.to_container(sec.retrain.overrides).items()]
    rcfg = load_config(None, overrides + [f"model.blocks={blocks}", "model.share=true", f"seed={seed}"],
                       base=OmegaConf.to_container(cfg))
    rcfg.out_dir, rcfg.name = str(root), f"retrain-s{seed}"
    return rcfg


def cfg_depths(cfg):
    from ..models import create_model
    return create_model(cfg.model.name, num_classes=2).depths


def _value(v):
    return json.dumps(v) if isinstance(v, (list, dict)) else ("null" if v is None else str(v))


def _check_retrained_scheme(run_dir: Path, blocks: str) -> None:
    """A retrain dir of another scheme (an earlier search, or another --scheme) is neither skipped as done nor
    resumed: refused, so the result read afterwards is always the scheme asked for."""
    from ..engine.train import resume_config
    if not RunFolder(run_dir).config.is_file():
        return
    held = resume_config(run_dir).model.blocks
    if str(held) != str(blocks):
        raise AttnlabError(f"{run_dir} retrains scheme model.blocks={held}, not {blocks}: move it away, or give "
                           "name=<new run name> to retrain another scheme beside it")


def run_retrain(cfg, sec, root, scheme: str):
    from ..engine import train as engine
    for seed in sec.retrain.seeds:
        rcfg = retrain_config(cfg, sec, root, scheme, seed)
        run_dir = Path(rcfg.out_dir) / rcfg.name
        _check_retrained_scheme(run_dir, rcfg.model.blocks)
        if RunFolder(run_dir).is_complete():
            _say(f"retrain: done ({run_dir}); skipped")
            continue
        resume = run_dir if run_dir.is_dir() else None  # as the supernet: an existing dir is resumed
        _say(f"retrain: {'resuming' if resume else 'training'} {run_dir}: model.share=true "
             f"model.blocks={rcfg.model.blocks} seed {seed}")
        engine.train(rcfg, resume=resume)
