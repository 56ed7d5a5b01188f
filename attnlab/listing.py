"""``attnlab list [models|attention|datasets|objectives]``: what can be named in a recipe or on the command line."""
import inspect
import re

KINDS = ("models", "attention", "datasets", "objectives")


def add_arguments(p):
    p.add_argument("kind", nargs="?", choices=KINDS, default=None,
                   help="what to list (default: all four): backbones for model.name, modules for model.attention, "
                        "datasets for data.name, training objectives (config sections)")


def _first_line(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _default(value) -> str:
    return value.__name__ if isinstance(value, type) else repr(value)


def _options(cls) -> str:
    params = inspect.signature(cls.__init__).parameters.values()
    opts = [f"{p.name}={_default(p.default)}" for p in params
            if p.name not in ("self", "channels") and p.default is not inspect.Parameter.empty]
    return ", ".join(opts) or "(no options)"


def _natural(name: str):
    """resnet20 < resnet32 < resnet110: digits compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_models() -> list[str]:
    from .models import _MODELS

    return [f"{name:<16} {classes:>5} classes by default, {size}x{size} input"
            for name, (_, classes, size) in sorted(_MODELS.items(), key=lambda kv: _natural(kv[0]))]


def list_attention() -> list[str]:
    from . import attention

    rows = []
    for name in attention.names():
        cls = attention.get(name)
        module = inspect.getmodule(cls)
        title = _first_line(module) if name != "none" else "the plain backbone (no attention)"
        rows.append(f"{name:<12} {title}\n             options: {_options(cls)}")
    return rows + _list_timm_attention()


def _list_timm_attention() -> list[str]:
    """timm's kinds that fit the slot (``timm:<kind>``), then the refused ones with the reason."""
    from .attention import from_timm

    if from_timm._import_get_attn() is None:
        return [f"{'timm:*':<12} timm's attention layers: not available, timm is not installed (pip install timm)"]
    rows = []
    for name in from_timm.names():
        cls = from_timm.get(name)
        rows.append(f"{name:<12} {cls.__doc__}\n             options (timm's): {_options(cls)}")
    for kind, why in sorted(from_timm.REFUSED.items()):
        rows.append(f"{from_timm.PREFIX + kind:<12} refused: {why}")
    return rows


def list_datasets() -> list[str]:
    """Each dataset with the folder it would be read from now, or where it was looked for."""
    from .data.sources import DEFAULT_FOLDERS, _exists, data_roots

    rows = []
    for name in ("cifar10", "cifar100", "tiny-imagenet"):
        found = [r / f for r in data_roots() for f in DEFAULT_FOLDERS[name] if _exists(name, r / f)]
        where = f"found at {found[0]}" if found else f"not found under {', '.join(str(r) for r in data_roots())}"
        rows.append(f"{name:<14} {where}")
    rows.append(f"{'imagefolder':<14} any folder of train/<class>/ and test/<class>/ (or val/<class>/) images, "
                f"given as data.data_dir=...")
    rows.append(f"{'wsol':<14} images with boxes or masks in wsolevaluation's metadata layout (CUB, ImageNet, "
                f"OpenImages), given as data.data_dir=<image root> data.metadata=<metadata folder> (docs/wsol.md)")
    return rows


def list_objectives() -> list[str]:
    from .objectives import objective_defaults

    return [f"{name:<8} {', '.join(f'{name}.{k}={v!r}' for k, v in defaults.items())}"
            for name, defaults in sorted(objective_defaults().items())]


LISTERS = {"models": list_models, "attention": list_attention, "datasets": list_datasets,
           "objectives": list_objectives}


def run(args):
    kinds = [args.kind] if args.kind else list(KINDS)
    for i, kind in enumerate(kinds):
        if len(kinds) > 1:
            print(("\n" if i else "") + f"{kind}:")
        for row in LISTERS[kind]():
            print(("  " if len(kinds) > 1 else "") + row)
    return 0
