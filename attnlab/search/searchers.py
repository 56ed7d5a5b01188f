"""Searchers over connection schemes, all on one budgeted oracle: exhaustive, random, greedy, REINFORCE.

The oracle (``Oracle``) maps a scheme (tuple of 0/1) to its reward record and remembers every scheme it has
evaluated. **The budget counts distinct evaluations** (a scheme already evaluated is a free lookup, as it is with the
evaluator's cache); every query, repeated or not, is counted and logged too. EAN's own loop had no cache, so its
"900 evaluations" are 900 queries; in our runs its distinct count is reported next to the query count.

Every searcher ends with three candidates (``run_search``):
  * ``mode``:         the policy's most likely scheme (REINFORCE: each bit's P(1) > 0.5; greedy: its final
                      incumbent; random / exhaustive have no policy, so theirs is the bit-wise majority of the best
                      10% of the schemes they evaluated, a fitted factorised policy);
  * ``best_sampled``: the best scheme evaluated during the search (ties: the first evaluated);
  * ``best_of_n``:    the best of N fresh samples drawn from that policy and evaluated afterwards (ENAS-pytorch's
                      ``derive()``, which EAN dropped; see ean_search.md §1.7).
Candidates' extra evaluations are counted apart (``derive_evaluations``) and are not limited by the budget. Which
candidate is retrained is the ``select`` rule, fixed before the search starts and recorded in the result.

REINFORCE, EAN preset (official ``search_imagent/EAN_search.py``, described in ean_search.md §1.3-1.6):
  * policy: a factorised Bernoulli over the blocks, parameterised as EAN does, an MLP 20 -> 50 -> ReLU -> 2n whose
    input is always zero (so a learned constant), logits divided by a temperature of 5 (``param="logits"``: the
    2n logits directly);
  * 3 samples a step, 300 steps, Adam lr 5e-2, no gradient clipping, no entropy term;
  * moving-average baseline, decay 0.95, over the step's mean reward, started at the first step's mean and updated
    *before* the advantage is taken (EAN's order: the current reward is inside its own baseline);
    loss = -mean_i(log pi(a_i) x (R_i - b)), log pi summed over the blocks;
  * RND bonus (``rnd``): a fixed random target MLP n -> 32 -> ReLU -> 32 -> ReLU -> 64 and a trained predictor
    n -> 32 -> ReLU -> 64 (Adam 5e-2) read the step's actions; the squared error summed over samples and outputs
    is one scalar added to all the step's rewards;
  * clipped replay step (``replay``): from step 10 on, one of the last 30 steps (bonus-free rewards, old per-block
    probabilities) is drawn; ratio = pi_new / pi_old per block and sample, detached; the loss is
    -0.1 x min(sum(ratio x log pi x A) / k, sum(clip(ratio, 0.9, 1.1) x log pi x A) / k), the min taken between the
    two summed scalars as the official code does, A = stored reward - current baseline.
Departures: the official code runs on GPU with global RNG state; here every draw comes from one seeded
``torch.Generator`` and the networks are initialised under a fixed seed, so a run is reproducible bit for bit
(which is also what makes a search resumable through the evaluator's cache). The preset ``reinforce`` has RND
and replay on, as the official code; ``reinforce-plain`` has both off.
"""
import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import AttnlabError, unknown


class BudgetExhausted(Exception):
    """Raised by the oracle when a new distinct evaluation would exceed the budget."""


class Oracle:
    """Reward records of schemes, evaluated at most once each, under a budget of distinct evaluations.

    ``evaluate(bits) -> dict`` with at least ``reward``; ``on_query(record)`` sees every query (for search.jsonl).
    """

    def __init__(self, evaluate, budget: int | None = None, on_query=None):
        self.evaluate, self.budget, self.on_query = evaluate, budget, on_query
        self.memo: dict[tuple, dict] = {}
        self.queries = 0
        self.phase, self.step = "search", None

    @property
    def distinct(self) -> int:
        return len(self.memo)

    def seen(self, bits) -> bool:
        return tuple(bits) in self.memo

    def __call__(self, bits, limited: bool = True) -> float:
        return self.record(bits, limited)["reward"]

    def record(self, bits, limited: bool = True) -> dict:
        bits = tuple(int(b) for b in bits)
        cached = bits in self.memo
        if not cached:
            if limited and self.budget is not None and self.distinct >= self.budget:
                raise BudgetExhausted
            self.memo[bits] = dict(self.evaluate(bits))
        self.queries += 1
        rec = self.memo[bits]
        if self.on_query is not None:
            self.on_query({"phase": self.phase, "step": self.step, "query": self.queries, "distinct": self.distinct,
                           "scheme": "".join(map(str, bits)), "repeat": cached, **rec})
        return rec

    def best(self):
        """(bits, record) of the best evaluated scheme; ties go to the first evaluated."""
        return max(self.memo.items(), key=lambda kv: kv[1]["reward"])


# ---- searchers -------------------------------------------------------------------------------------------------

class Searcher:
    name = "?"

    def run(self, oracle: Oracle, n_bits: int, gen: torch.Generator) -> None:
        raise NotImplementedError

    def policy(self, oracle: Oracle, n_bits: int) -> list[float]:
        """Per-bit P(1) of the searcher's final policy (default: the fitted elite frequencies)."""
        return elite_frequencies(oracle, n_bits)

    def info(self) -> dict:
        return {}


def elite_frequencies(oracle: Oracle, n_bits: int, fraction: float = 0.1) -> list[float]:
    ranked = sorted(oracle.memo.items(), key=lambda kv: -kv[1]["reward"])
    if not ranked:
        return [0.5] * n_bits
    elite = [bits for bits, _ in ranked[:max(1, math.ceil(fraction * len(ranked)))]]
    return [sum(b[i] for b in elite) / len(elite) for i in range(n_bits)]


def int_to_bits(value: int, n_bits: int) -> tuple[int, ...]:
    return tuple((value >> (n_bits - 1 - i)) & 1 for i in range(n_bits))


class Exhaustive(Searcher):
    """Every scheme, in counting order (000..0 first). Refused above 2^max_bits schemes."""
    name = "exhaustive"

    def __init__(self, max_bits: int = 12):
        self.max_bits = max_bits

    def run(self, oracle, n_bits, gen):
        if n_bits > self.max_bits:
            raise AttnlabError(f"exhaustive search over {n_bits} blocks means 2^{n_bits} evaluations; it is allowed "
                               f"up to {self.max_bits} blocks (use random, greedy or reinforce)")
        for value in range(2 ** n_bits):
            oracle(int_to_bits(value, n_bits))


class RandomSearch(Searcher):
    """Uniform schemes without replacement until the budget (or the space) is spent."""
    name = "random"

    def run(self, oracle, n_bits, gen):
        if oracle.budget is None:
            raise AttnlabError("random search needs a budget (search.budget)")
        if n_bits <= 20:
            for value in torch.randperm(2 ** n_bits, generator=gen).tolist():
                oracle(int_to_bits(value, n_bits))
            return
        while True:  # large spaces: rejection of repeats, which are rare there
            bits = tuple(int(v) for v in (torch.rand(n_bits, generator=gen) < 0.5).tolist())
            if not oracle.seen(bits):
                oracle(bits)


class Greedy(Searcher):
    """Coordinate ascent: from a random scheme, evaluate every one-bit flip and move to the best while it improves.

    At a local optimum it restarts from a random unevaluated scheme while budget remains (without a budget it
    stops at the first one). Its policy is the best incumbent found, so its mode is that scheme.
    """
    name = "greedy"

    def __init__(self):
        self.incumbent = None

    def run(self, oracle, n_bits, gen):
        while True:
            start = self._fresh_start(oracle, n_bits, gen)
            if start is None:
                return
            current, value = start, oracle(start)
            self._keep(oracle, current)
            while True:
                flips = []
                for i in torch.randperm(n_bits, generator=gen).tolist():
                    cand = current[:i] + (1 - current[i],) + current[i + 1:]
                    flips.append((oracle(cand), cand))
                best_value, best = max(flips, key=lambda t: t[0])
                if best_value <= value:
                    break
                current, value = best, best_value
                self._keep(oracle, current)
            if oracle.budget is None:
                return

    def _keep(self, oracle, bits):
        # The incumbent is the best point the climbs have stood on (updated at every move, so a budget that runs
        # out mid-climb still leaves the climb's current point).
        if self.incumbent is None or oracle.memo[bits]["reward"] > oracle.memo[self.incumbent]["reward"]:
            self.incumbent = bits

    @staticmethod
    def _fresh_start(oracle, n_bits, gen):
        if oracle.distinct >= 2 ** n_bits:
            return None
        for _ in range(10000):
            bits = tuple(int(v) for v in (torch.rand(n_bits, generator=gen) < 0.5).tolist())
            if not oracle.seen(bits):
                return bits
        return None

    def policy(self, oracle, n_bits):
        if self.incumbent is None:
            return elite_frequencies(oracle, n_bits)
        return [float(b) for b in self.incumbent]


@dataclass
class ReinforceConfig:
    steps: int = 300
    samples: int = 3
    temperature: float = 5.0
    lr: float = 5e-2
    baseline_decay: float = 0.95
    param: str = "mlp"  # mlp (EAN: zero input -> 20 -> 50 -> 2n) | logits
    rnd: bool = True
    rnd_lr: float = 5e-2
    replay: bool = True
    replay_start: int = 10
    replay_buffer: int = 30
    replay_clip: float = 0.1
    replay_weight: float = 0.1
    entropy_weight: float = 0.0
    init_seed: int | None = None  # network init seed (None: the search seed)


PRESETS = {
    "ean": {},  # the defaults above are EAN's
    "plain": {"rnd": False, "replay": False},
}


class Reinforce(Searcher):
    name = "reinforce"

    def __init__(self, **options):
        bad = set(options) - set(ReinforceConfig.__dataclass_fields__)
        if bad:
            raise AttnlabError(f"reinforce has no option {', '.join(sorted(bad))}; valid: "
                               f"{', '.join(ReinforceConfig.__dataclass_fields__)}")
        self.cfg = ReinforceConfig(**options)
        if self.cfg.param not in ("mlp", "logits"):
            raise unknown("reinforce param", self.cfg.param, ("mlp", "logits"))
        self.curve: list[dict] = []
        self.probs = None

    # The policy: P(bit = 1) per block, from 2 logits per block / temperature.
    def _build(self, n_bits, seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.cfg.param == "mlp":
                self.net = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 2 * n_bits))
            else:
                self.net = nn.Linear(1, 2 * n_bits, bias=False)
                nn.init.zeros_(self.net.weight)
            self.target = nn.Sequential(nn.Linear(n_bits, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                        nn.Linear(32, 64))
            self.predictor = nn.Sequential(nn.Linear(n_bits, 32), nn.ReLU(), nn.Linear(32, 64))
        self.target.requires_grad_(False)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr)
        self.rnd_opt = torch.optim.Adam(self.predictor.parameters(), lr=self.cfg.rnd_lr)

    def _log_probs(self):
        x = torch.zeros(1, 20) if self.cfg.param == "mlp" else torch.ones(1, 1)
        logits = self.net(x).view(-1, 2) / self.cfg.temperature
        return torch.log_softmax(logits, dim=1)  # n x 2: log P(0), log P(1)

    def run(self, oracle, n_bits, gen):
        c = self.cfg
        seed = c.init_seed if c.init_seed is not None else int(torch.randint(0, 2 ** 31, (1,), generator=gen))
        self._build(n_bits, seed)
        baseline, buffer = None, []
        for step in range(c.steps):
            oracle.step = step
            logp = self._log_probs()
            p1 = logp[:, 1].exp().detach()
            self.probs = p1.tolist()
            actions = (torch.rand(c.samples, n_bits, generator=gen) < p1).long()
            rewards = torch.tensor([oracle(tuple(a.tolist())) for a in actions])  # may raise BudgetExhausted
            old = logp.detach().gather(1, actions.t()).t().exp()  # k x n: P(chosen bit) under the sampling policy
            buffer = (buffer + [(actions, rewards, old)])[-c.replay_buffer:]
            bonus = self._rnd_bonus(actions) if c.rnd else 0.0
            total = rewards + bonus
            baseline = float(total.mean()) if baseline is None else (
                c.baseline_decay * baseline + (1 - c.baseline_decay) * float(total.mean()))
            adv = total - baseline
            chosen = logp.gather(1, actions.t()).t()  # k x n
            loss = -(chosen.sum(1) * adv).mean()
            if c.entropy_weight:
                loss = loss - c.entropy_weight * -(logp.exp() * logp).sum()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            if c.replay and step >= c.replay_start:
                self._replay_step(buffer, baseline, gen)
            self.curve.append({"step": step, "mean_reward": float(rewards.mean()), "bonus": float(bonus),
                               "baseline": baseline, "p": [round(v, 4) for v in self.probs]})
        self.probs = self._log_probs()[:, 1].exp().detach().tolist()

    def _rnd_bonus(self, actions) -> float:
        x = actions.float()
        err = ((self.predictor(x) - self.target(x)) ** 2).sum()
        self.rnd_opt.zero_grad()
        err.backward()
        self.rnd_opt.step()
        return float(err.detach())

    def _replay_step(self, buffer, baseline, gen):
        c = self.cfg
        actions, rewards, old = buffer[int(torch.randint(0, len(buffer), (1,), generator=gen))]
        logp = self._log_probs()
        chosen = logp.gather(1, actions.t()).t()
        ratio = (chosen.exp() / old).detach()
        adv = (rewards - baseline)[:, None]
        k = actions.shape[0]
        plain = (ratio * chosen * adv).sum() / k
        clipped = (ratio.clamp(1 - c.replay_clip, 1 + c.replay_clip) * chosen * adv).sum() / k
        loss = -c.replay_weight * torch.minimum(plain, clipped)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def policy(self, oracle, n_bits):
        return list(self.probs) if self.probs is not None else [0.5] * n_bits

    def info(self):
        return {"options": dict(self.cfg.__dict__), "curve": self.curve}


SEARCHERS = {
    "exhaustive": lambda **kw: Exhaustive(**kw),
    "random": lambda **kw: RandomSearch(**kw),
    "greedy": lambda **kw: Greedy(**kw),
    "reinforce": lambda **kw: Reinforce(**{**PRESETS["ean"], **kw}),
    "reinforce-plain": lambda **kw: Reinforce(**{**PRESETS["plain"], **kw}),
}
SELECT_RULES = ("best_sampled", "mode", "best_of_n")


def make_searcher(name: str, **options) -> Searcher:
    if name not in SEARCHERS:
        raise unknown("searcher", name, SEARCHERS)
    s = SEARCHERS[name](**options)
    s.name = name
    return s


@dataclass
class SearchOutcome:
    searcher: str
    seed: int
    select: str
    candidates: dict
    chosen: str
    distinct_evaluations: int
    queries: int
    derive_evaluations: int
    policy: list
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_search(searcher: Searcher, oracle: Oracle, n_bits: int, seed: int, select: str = "best_sampled",
               derive_samples: int = 20) -> SearchOutcome:
    """Run ``searcher`` until its end or the budget, then form the three candidates and apply ``select``."""
    if select not in SELECT_RULES:
        raise unknown("selection rule", select, SELECT_RULES)
    gen = torch.Generator().manual_seed(int(seed))
    oracle.phase = "search"
    try:
        searcher.run(oracle, n_bits, gen)
    except BudgetExhausted:
        pass
    if not oracle.memo:
        raise AttnlabError(f"searcher '{searcher.name}' evaluated no scheme (budget {oracle.budget})")
    distinct, queries = oracle.distinct, oracle.queries
    probs = searcher.policy(oracle, n_bits)
    best_bits, _ = oracle.best()
    oracle.phase, oracle.step = "derive", None
    mode = tuple(int(p > 0.5) for p in probs)
    oracle.record(mode, limited=False)
    fresh = [tuple(int(v) for v in (torch.rand(n_bits, generator=gen) < torch.tensor(probs)).tolist())
             for _ in range(derive_samples)]
    for bits in fresh:
        oracle.record(bits, limited=False)
    best_fresh = max(fresh, key=lambda b: oracle.memo[b]["reward"]) if fresh else mode

    def cand(bits):
        return {"scheme": "".join(map(str, bits)), **oracle.memo[bits]}

    candidates = {"mode": cand(mode), "best_sampled": cand(best_bits), "best_of_n": cand(best_fresh)}
    return SearchOutcome(searcher.name, int(seed), select, candidates, candidates[select]["scheme"], distinct,
                         queries, oracle.distinct - distinct, [round(p, 4) for p in probs], searcher.info())


def all_schemes(n_bits: int):
    return itertools.product((0, 1), repeat=n_bits)
