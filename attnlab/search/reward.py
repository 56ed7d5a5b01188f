"""The search reward: R = top-1 (%) + alpha x (fraction of blocks NOT connected) - beta x latency overhead (%).

EAN (official ``search_imagent/EAN_search.py``): R = top-1 (%) + 2 x (fraction not connected) - 54, on the held-out
images; alpha = 2 here too. The -54 offset is left out: the moving-average baseline starts at the first step's mean
reward, so a constant cancels in every on-policy advantage (it does not in EAN's replay step; see ean_search.md
§1.6). EAN has no latency term; sparsity is its proxy for speed. The optional one here reads a per-block latency
table measured on the target device (``LatencyTable``): T(m) = base + sum_b m_b x delta_b, and the term is
beta x 100 x (T(m) / T_plain - 1), the relative inference-time increase in percent (EAN's Fig. 1 axis), with
T_plain = base. beta = 0 (the default) turns it off.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AttnlabError


@dataclass
class LatencyTable:
    base_ms: float  # the plain backbone (no block connected)
    delta_ms: list  # one per block: added time when that block calls its module
    meta: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path) -> "LatencyTable":
        path = Path(path)
        if not path.is_file():
            raise AttnlabError(f"latency table '{path}' does not exist")
        try:
            data = json.loads(path.read_text())
            return cls(float(data["base_ms"]), [float(v) for v in data["delta_ms"]], dict(data.get("meta", {})))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise AttnlabError(f"latency table '{path}' needs base_ms and delta_ms (one per block): {err}") from None

    def latency_ms(self, bits) -> float:
        if len(bits) != len(self.delta_ms):
            raise AttnlabError(f"latency table has {len(self.delta_ms)} blocks, the scheme {len(bits)}")
        return self.base_ms + sum(d for b, d in zip(bits, self.delta_ms) if b)


@dataclass
class Reward:
    alpha: float = 2.0
    beta: float = 0.0
    latency: LatencyTable | None = None

    def __post_init__(self):
        if self.beta and self.latency is None:
            raise AttnlabError("search.reward.beta > 0 needs a latency table (search.reward.latency_table)")

    def terms(self, bits, top1: float) -> dict:
        """Every named term of R for scheme ``bits`` whose accuracy is ``top1`` (%), and R itself."""
        n = len(bits)
        sparsity = 1.0 - sum(bits) / n
        out = {"top1": float(top1), "sparsity": sparsity, "sparsity_term": self.alpha * sparsity}
        reward = out["top1"] + out["sparsity_term"]
        if self.latency is not None:
            lat = self.latency.latency_ms(bits)
            overhead = 100.0 * (lat / self.latency.base_ms - 1.0)
            out.update(latency_ms=lat, latency_overhead_pct=overhead, latency_term=-self.beta * overhead)
            reward += out["latency_term"]
        out["reward"] = reward
        return out

    def __call__(self, bits, top1: float) -> float:
        return self.terms(bits, top1)["reward"]
