"""Run configuration: a typed schema <- YAML recipe <- dotted ``key=value`` overrides, merged by OmegaConf.

The schema is the engine's dataclasses plus one section per registered objective, built from
``attnlab.objectives.objective_defaults()``, so an objective's options are checked like the engine's own.
The merged config is in struct mode: a key that is not in the schema (in the YAML or an override) is an
AttnlabError naming the key and the closest valid keys; a value of the wrong type names the key too.
"""
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ..errors import AttnlabError, unknown, yaml_problem


@dataclass
class ModelConfig:
    name: str = "resnet20"
    num_classes: Optional[int] = None  # None: the dataset's number of classes
    attention: str = "none"
    attention_kwargs: Dict[str, Any] = field(default_factory=dict)
    blocks: Any = None  # see attnlab.models.placement
    share: Optional[bool] = None
    zero_init_residual: bool = False
    # a torchvision/timm ResNet state_dict file to start from; attention modules start fresh (docs/data.md)
    init: Optional[str] = None


@dataclass
class StreamConfig:
    """``data.pipeline=stream``: the per-image transforms (torchvision.transforms.v2), see docs/data.md."""
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet's, in 0..1
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area fraction
    ratio: List[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])  # and aspect ratio range
    interpolation: str = "bilinear"  # bilinear | bicubic | nearest: the training crop's resize
    hflip: float = 0.5
    color_jitter: float = 0.0  # brightness = contrast = saturation factor (timm's --color-jitter); 0: off
    auto_augment: str = "none"  # none | randaugment | autoaugment (ImageNet policy)
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0  # probability, after normalisation
    erasing_mode: str = "pixel"  # pixel: per-pixel normal noise (timm's 'pixel') | const: zeros
    mixup_alpha: float = 0.0  # 0: off
    cutmix_alpha: float = 0.0  # 0: off
    mix_prob: float = 1.0  # probability that a batch is mixed (when mixup or cutmix is on)
    mix_switch_prob: float = 0.5  # with both on: probability of cutmix instead of mixup for a mixed batch
    crop_fraction: float = 0.875  # evaluation: resize the short side to image_size / crop_fraction, centre crop
    eval_interpolation: str = "bilinear"


@dataclass
class DataConfig:
    name: str = "cifar10"
    data_dir: Optional[str] = None  # None: the data layer's default (../shared/data)
    # name=wsol: wsolevaluation's metadata folder (e.g. metadata/CUB with train/ val/ test/); data_dir is the image
    # root its image ids are relative to (docs/wsol.md)
    metadata: Optional[str] = None
    val_size: Any = None  # held out of train for validation: a count (int) or a fraction (float); None: default
    subset: Optional[int] = None  # keep this many training images per class (None: all)
    test_subset: Optional[int] = None  # evaluate on this many test images per class (None: all)
    cache_dir: str = ".cache/attnlab"
    image_size: Optional[int] = None
    augment: bool = True  # random crop + horizontal flip on the training split
    # cache: decode once into a uint8 array (small datasets) | stream: decode per batch in worker processes
    pipeline: str = "cache"
    workers: int = 4  # stream: DataLoader worker processes per rank (0: decode in the training process)
    stream: StreamConfig = field(default_factory=StreamConfig)


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.999


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128  # GLOBAL batch: each of N DDP ranks gets batch_size / N
    eval_batch_size: int = 512
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    wd_on_bn_bias: bool = True  # False: no weight decay on BatchNorm weights and biases (1-d parameters)
    schedule: str = "cosine"  # cosine | linear (to zero) | multistep
    milestones: List[int] = field(default_factory=list)  # multistep: epochs at which lr *= gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up from ~0, per step
    label_smoothing: float = 0.0
    # auto: bf16 autocast on CUDA, fp32 on a CPU | bf16: also on a CPU with native bf16 | fp16 (CUDA) | off
    amp: str = "auto"
    # NHWC activations: faster on CUDA, and on this 2-core Zen 3 CPU too (ResNet-20 eager step +20-30%, SE/ECA no
    # slower); null means on.
    channels_last: Optional[bool] = True
    compile: bool = False
    ema: EmaConfig = field(default_factory=EmaConfig)
    deterministic: bool = False


@dataclass
class EvalConfig:
    # TDAM's official evaluation beside plain top-1: an image counts as correct if the top-1 prediction of any of
    # TDAM's T steps is (val_top1_any_step / test_top1_any_step; attnlab/engine/evaluate.py says where it differs)
    tdam_any_step: bool = False


@dataclass
class DebugConfig:
    kill_at_step: Optional[int] = None  # SIGKILL the process at this global step (resume tests); cleared on resume
    max_steps_per_epoch: Optional[int] = None  # stop each training epoch early (smoke runs, benchmarks)


@dataclass
class RunConfig:
    name: Optional[str] = None  # None: the recipe's file name
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    out_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def _section_type(name: str, defaults: dict) -> type:
    """A dataclass for one objective's section, typed by its default values (None means any type)."""
    fields = []
    for key, value in defaults.items():
        if isinstance(value, bool | int | float | str):
            fields.append((key, type(value), field(default=value)))
        elif isinstance(value, list | tuple):
            fields.append((key, List[Any], field(default_factory=lambda v=list(value): list(v))))
        elif isinstance(value, dict):
            fields.append((key, Dict[str, Any], field(default_factory=lambda v=dict(value): dict(v))))
        else:
            fields.append((key, Any, field(default=value)))
    return dataclasses.make_dataclass(f"{name.title().replace('_', '')}Config", fields)


def schema() -> DictConfig:
    """The default config: engine sections plus every registered objective's defaults."""
    from ..objectives import objective_defaults
    sections = []
    for name, defaults in objective_defaults().items():
        section = _section_type(name, defaults)
        sections.append((name, section, field(default_factory=section)))
    cfg = OmegaConf.structured(dataclasses.make_dataclass("RunConfig", sections, bases=(RunConfig,)))
    OmegaConf.set_struct(cfg, True)
    _open_free_dicts(cfg)
    return cfg


def _open_free_dicts(cfg: DictConfig) -> None:
    """Struct mode for the typed sections only: free-form dicts (attention_kwargs, a dict ``blocks``) take any key."""
    for key in cfg.keys():
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            if OmegaConf.get_type(node) in (dict, None):
                OmegaConf.set_struct(node, False)
            else:
                _open_free_dicts(node)


def valid_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of ``cfg`` (sections and leaves)."""
    keys = []
    for key in cfg.keys():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        node = cfg._get_node(key)
        # Typed sections are walked; free-form dicts (attention_kwargs) accept any key below them.
        if isinstance(node, DictConfig) and OmegaConf.get_type(node) not in (dict, None):
            keys.extend(valid_keys(node, dotted + "."))
    return keys


def _merge(cfg: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(cfg, other)
        _open_free_dicts(merged)
        return merged
    except ConfigKeyError as err:
        key = err.full_key or str(err.key)
        close = difflib.get_close_matches(key, valid_keys(cfg), n=3, cutoff=0.5)
        hint = f"; closest valid keys: {', '.join(close)}" if close else ""
        raise AttnlabError(f"unknown config key '{key}' in {source}{hint}") from None
    except OmegaConfBaseException as err:
        first = str(err).splitlines()[0]
        key = getattr(err, "full_key", None)
        raise AttnlabError(f"bad value for config key '{key}' in {source}: {first}") from None


def parse_overrides(overrides) -> DictConfig:
    items = list(overrides or ())
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise AttnlabError(f"override '{item}' must look like key=value (e.g. train.lr=0.05)")
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as err:
        raise AttnlabError(f"cannot parse overrides {items}: {str(err).splitlines()[0]}") from None


# The sections of an EAN search recipe (attnlab search) beside the engine's keys: search/pipeline.py's PHASES.
SEARCH_SECTIONS = ("supernet", "search", "retrain")


def read_recipe(path) -> DictConfig:
    """A recipe file's settings, or one line saying why there are none (missing, a folder, bad YAML, not a mapping,
    empty). The one reader for the engine's and the search pipeline's recipes, so their messages agree."""
    path = Path(path)
    if not path.is_file():
        raise AttnlabError(f"config file '{path}' " + ("is a folder, not a YAML file" if path.is_dir() else
                                                       "does not exist"))
    try:
        recipe = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors come in several types
        raise AttnlabError(f"cannot read config '{path}': {yaml_problem(err)}") from None
    if not isinstance(recipe, DictConfig):
        raise AttnlabError(f"config '{path}' must be a mapping of keys to values")
    if not recipe:  # an unsaved or wrong file: training every default instead would say nothing
        raise AttnlabError(f"config '{path}' is empty; give a recipe that sets something (configs/ holds examples)")
    return recipe


def load_config(path=None, overrides=(), base: DictConfig | dict | None = None) -> DictConfig:
    """Schema <- ``base`` (a saved run's config, for resume) <- YAML at ``path`` <- ``key=value`` overrides."""
    cfg = schema()
    if base is not None:
        cfg = _merge(cfg, OmegaConf.create(OmegaConf.to_container(OmegaConf.create(base))), "the saved config")
    if path is not None:
        recipe = read_recipe(path)
        search_sections = [k for k in SEARCH_SECTIONS if k in recipe]
        if search_sections:  # the engine would call them unknown keys and suggest look-alikes
            raise AttnlabError(f"'{path}' is a search recipe (it has {', '.join(search_sections)}): run it with "
                               f"attnlab search --config {path}")
        cfg = _merge(cfg, recipe, f"'{path}'")
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), "the overrides")
    try:  # interpolations (${...}) resolve here: reading cfg.name first would raise OmegaConf's own error
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise AttnlabError(f"cannot resolve config: {str(err).splitlines()[0]}") from None
    if cfg.name is None:
        cfg.name = Path(path).stem if path is not None else "run"
    # `amp: true/false` in a recipe reads naturally; map it onto the dtype choices.
    cfg.train.amp = {"true": "bf16", "false": "off", "none": "off"}.get(str(cfg.train.amp).lower(), cfg.train.amp)
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks OmegaConf's types cannot express (choices and ranges)."""
    choices = {"device": ("auto", "cpu", "cuda"), "train.schedule": ("cosine", "linear", "multistep"),
               "train.amp": ("auto", "bf16", "fp16", "off")}
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise unknown(f"value for {key}", value, allowed)
    name = str(cfg.name)
    if name in ("", ".", "..") or "/" in name or "\\" in name:  # the run dir is out_dir/name: it stays inside
        raise AttnlabError(f"name must be a plain folder name (no '/', not '.' or '..'), got {name!r}; "
                           "give out_dir=<folder> to train elsewhere")
    t = cfg.train
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if t[key] < 1:
            raise AttnlabError(f"train.{key} must be >= 1, got {t[key]}")
    # Each comparison is False for NaN, and isfinite catches infinity: neither may reach the optimizer.
    for key, ok, rule in (("lr", t.lr > 0, "> 0"), ("momentum", 0 <= t.momentum < 1, "in [0, 1)"),
                          ("weight_decay", t.weight_decay >= 0, ">= 0"), ("gamma", t.gamma > 0, "> 0"),
                          ("label_smoothing", 0 <= t.label_smoothing < 1, "in [0, 1)"),
                          ("ema.decay", 0 <= t.ema.decay < 1, "in [0, 1)"),
                          ("warmup_epochs", 0 <= t.warmup_epochs <= t.epochs, "in [0, train.epochs]")):
        value = OmegaConf.select(t, key)
        if not (ok and math.isfinite(value)):
            raise AttnlabError(f"train.{key} must be a finite number {rule}, got {value}")
    if list(t.milestones) != sorted(t.milestones):
        raise AttnlabError(f"train.milestones must be increasing, got {list(t.milestones)}")
    if t.nesterov and t.momentum <= 0:
        raise AttnlabError(f"train.nesterov=true needs train.momentum > 0, got {t.momentum}")
    if cfg.seed < 0:
        raise AttnlabError(f"seed must be >= 0, got {cfg.seed}")
    from ..attention import get as attention_class
    attention_class(cfg.model.attention)  # an unknown name is said now, not after the data has decoded
    _validate_data(cfg.data)


def refuse_ignored_settings(cfg: DictConfig) -> None:
    """Settings a fresh run would accept and then ignore (checked when a run starts, not on its resume: a run
    saved with them keeps training as it began)."""
    t = cfg.train
    if t.milestones and t.schedule != "multistep":
        raise AttnlabError(f"train.milestones are read by train.schedule=multistep only, not by {t.schedule}")
    from ..objectives import check_sections
    check_sections(cfg)  # an objective that is off ignores its options: a typo there waits for it to be on


def _validate_data(data) -> None:
    is_wsol = str(data.name).lower() == "wsol"
    if is_wsol and (data.metadata is None or data.data_dir is None):
        raise AttnlabError("data.name=wsol needs data.metadata=<metadata folder with train/ val/ test/> and "
                           "data.data_dir=<image root>")
    if is_wsol and data.val_size is not None:  # said here, before any image is read, as load_dataset says it
        raise AttnlabError(f"data.name=wsol has its own val split (its metadata's val/); set data.val_size=null "
                           f"(got {data.val_size})")
    if data.metadata is not None and not is_wsol:
        raise AttnlabError(f"data.metadata is read by data.name=wsol only, not by '{data.name}'")
    if data.image_size is not None and data.image_size < 1:
        raise AttnlabError(f"data.image_size must be >= 1 (or null: the dataset's own size), got {data.image_size}")
    if data.pipeline not in ("cache", "stream"):
        raise unknown("value for data.pipeline", data.pipeline, ("cache", "stream"))
    if data.workers < 0:
        raise AttnlabError(f"data.workers must be >= 0, got {data.workers}")
    s = data.stream
    interps, policies = ("bilinear", "bicubic", "nearest"), ("none", "randaugment", "autoaugment")
    for key, allowed in (("interpolation", interps), ("eval_interpolation", interps),
                         ("erasing_mode", ("pixel", "const")), ("auto_augment", policies)):
        if s[key] not in allowed:
            raise unknown(f"value for data.stream.{key}", s[key], allowed)
    for key, n in (("mean", 3), ("std", 3), ("scale", 2), ("ratio", 2)):
        if len(s[key]) != n:
            raise AttnlabError(f"data.stream.{key} needs {n} numbers, got {list(s[key])}")
    if min(s.std) <= 0:
        raise AttnlabError(f"data.stream.std must be > 0, got {list(s.std)}")
    if not 0 < s.scale[0] <= s.scale[1] <= 1:
        raise AttnlabError(f"data.stream.scale must be [low, high] with 0 < low <= high <= 1, got {list(s.scale)}")
    if not 0 < s.ratio[0] <= s.ratio[1]:
        raise AttnlabError(f"data.stream.ratio must be [low, high] with 0 < low <= high, got {list(s.ratio)}")
    for key in ("hflip", "random_erasing", "mix_prob", "mix_switch_prob"):
        if not 0 <= s[key] <= 1:
            raise AttnlabError(f"data.stream.{key} is a probability in [0, 1], got {s[key]}")
    for key in ("color_jitter", "mixup_alpha", "cutmix_alpha"):
        if s[key] < 0:
            raise AttnlabError(f"data.stream.{key} must be >= 0, got {s[key]}")
    if not 0.25 <= s.crop_fraction <= 1:  # 0.001 resized a 224 crop's short side to 224,000 px (a stall)
        raise AttnlabError(f"data.stream.crop_fraction must be in [0.25, 1] (evaluation resizes the short side to "
                           f"image_size / crop_fraction), got {s.crop_fraction}")
    if s.randaugment_ops < 1 or not 0 <= s.randaugment_magnitude <= 30:
        raise AttnlabError(f"data.stream.randaugment_ops must be >= 1 and randaugment_magnitude in [0, 30], got "
                           f"{s.randaugment_ops} and {s.randaugment_magnitude}")


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
