"""SPEM's regulariser on its mixing pairs: weight * sum over SPE modules of ||p||^2 (official run.py: alpha = 0.1).

lambda = p0^2 / (p0^2 + p1^2) ignores the scale of p, so this term only shrinks ||p||, which enlarges lambda's
effective step (the usual scale-invariance + weight-decay dynamics). The official model returns the sum of
p0^2 + p1^2 over every block; a module shared by several blocks (share=True) is counted once here.

Config section ``spe_reg``: ``enabled`` = "auto" (on whenever the model holds SPE modules), true or false;
``weight`` = alpha. Returns {"spe_reg": tensor}, already weighted.
"""
import torch

from ..attention.spe import SPE
from ..errors import AttnlabError
from . import Objective, register_objective


def spe_modules(model) -> list:
    """Each distinct SPE module of ``model`` once (shared modules count once; wrappers such as DDP are fine)."""
    seen, mods = set(), []
    for m in model.modules():
        if isinstance(m, SPE) and id(m) not in seen:
            seen.add(id(m))
            mods.append(m)
    # A shared module is registered once, on its stage (layerN.shared_attn), and not in the blocks.
    return mods


def _enabled(value) -> str:
    text = str(value).strip().lower()
    if text in ("auto", "true", "false"):
        return text
    raise AttnlabError(f"spe_reg.enabled must be auto, true or false, got '{value}'")


@register_objective("spe_reg", defaults={"enabled": "auto", "weight": 0.1})
class SPEReg(Objective):
    features = None

    def __init__(self, modules, weight: float = 0.1):
        if float(weight) < 0:
            raise AttnlabError(f"spe_reg.weight must be >= 0, got {weight}")
        self.modules = list(modules)
        self.weight = float(weight)

    @classmethod
    def from_config(cls, section, model):
        enabled = _enabled(section.get("enabled", "auto"))
        mods = spe_modules(model)
        if enabled == "false" or (enabled == "auto" and not mods):
            return None
        if not mods:
            raise AttnlabError("spe_reg.enabled=true but the model has no 'spe' attention modules")
        return cls(mods, weight=section.get("weight", 0.1))

    def penalty(self) -> torch.Tensor:
        """sum over modules of ||p||^2, unweighted."""
        return torch.stack([m.p.pow(2).sum() for m in self.modules]).sum()

    def __call__(self, *, model, logits, targets, features, epoch, step):
        return {"spe_reg": self.weight * self.penalty()}
