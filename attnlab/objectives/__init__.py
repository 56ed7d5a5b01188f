"""Training-only objectives: extra loss terms the engine adds to the cross-entropy and logs.

An objective never edits model code and adds nothing to the model's state_dict. Protocol:

    @register_objective("ssia", defaults={"enabled": False, "weight": 1.0, ...})
    class SSIA(Objective):
        features = "stages"          # what it reads from model(x, features=...): None, "stages" or "blocks"
        @classmethod
        def from_config(cls, section, model): ... return an instance, or None when it is off
        @classmethod
        def check(cls, section): ...  # optional: refuse a bad option even while the objective is off
        def __call__(self, *, model, logits, targets, features, epoch, step) -> dict[str, Tensor]

Each registered objective owns one config section (its name) whose defaults are merged into the engine's
config schema, so ``ssia.weight=0.5`` on the command line is checked like any other key. The returned terms
are already weighted; the engine sums them into the loss and logs each one by name in metrics.csv.
An objective with ``needs_inputs = True`` is also given ``inputs=``, the batch the model saw (to run it again).

An objective may own a training-only ``module`` (an nn.Module, e.g. auxiliary heads): the engine trains it with the
model's optimiser, moves it to the device and saves it in checkpoint_last.pt (``training_modules``), but it is never
part of the model, so evaluation, export and checkpoint_best's model weights are the plain network.
"""
from ..errors import unknown

_OBJECTIVES: dict[str, tuple[type, dict]] = {}


class Objective:
    features: str | None = None
    module = None  # a training-only nn.Module, or None
    needs_inputs = False  # True: __call__ also takes inputs= (the batch)

    @classmethod
    def from_config(cls, section, model):
        return cls(**{k: v for k, v in dict(section).items() if k != "enabled"}) if section.get("enabled") else None

    @classmethod
    def check(cls, section) -> None:
        """Refuse a bad option of ``section`` whether or not the objective is on (by default: nothing to check)."""

    def __call__(self, *, model, logits, targets, features, epoch, step):
        raise NotImplementedError


def register_objective(name: str, defaults: dict):
    def wrap(cls):
        _OBJECTIVES[name] = (cls, dict(defaults))
        cls.config_name = name
        return cls
    return wrap


def objective_names() -> list[str]:
    return sorted(_OBJECTIVES)


def objective_defaults() -> dict:
    """{section name: default options} for every registered objective (merged into the config schema)."""
    _import_all()
    return {name: dict(defaults) for name, (_, defaults) in _OBJECTIVES.items()}


def build_objectives(cfg, model) -> list:
    """Instantiate every objective whose config section turns it on, in name order."""
    _import_all()
    out = []
    for name in sorted(_OBJECTIVES):
        cls, _ = _OBJECTIVES[name]
        section = cfg.get(name) if hasattr(cfg, "get") else None
        if section is None:
            continue
        obj = cls.from_config(section, model)
        if obj is not None:
            out.append(obj)
    return out


def check_sections(cfg) -> None:
    """Every objective's options checked, also those of objectives that are off (``Objective.check``)."""
    _import_all()
    for name in sorted(_OBJECTIVES):
        section = cfg.get(name)
        if section is not None:
            _OBJECTIVES[name][0].check(section)


def features_needed(objectives) -> str | None:
    """The widest feature request among ``objectives`` ("blocks" > "stages" > None)."""
    order = {None: 0, "stages": 1, "blocks": 2}
    need = None
    for obj in objectives:
        if order[obj.features] > order[need]:
            need = obj.features
    return need


def training_modules(objectives):
    """The objectives' training-only modules as one nn.ModuleDict keyed by section name, or None when none has one."""
    import torch.nn as nn
    mods = {obj.config_name: obj.module for obj in objectives if getattr(obj, "module", None) is not None}
    return nn.ModuleDict(mods) if mods else None


def get_objective(name: str) -> type:
    _import_all()
    if name not in _OBJECTIVES:
        raise unknown("objective", name, _OBJECTIVES)
    return _OBJECTIVES[name][0]


def _import_all():
    """Import every module of this package (one objective per file; importing registers it). No list to keep in
    step and no error swallowed: a module that fails to import fails loudly."""
    import importlib
    import pkgutil
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
