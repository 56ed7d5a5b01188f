"""``attnlab.attach(model, attention=..., blocks=...)``: attnlab's modules in a torchvision or timm ResNet you have.

The module goes where attnlab's own blocks hold it (``models/blocks.py``): on the residual branch after its last
BatchNorm (``bn2`` of a basic block, ``bn3`` of a bottleneck), before the addition.
  * torchvision (``torchvision.models.ResNet``, incl. ResNeXt and Wide ResNets): the block's class is switched to a
    subclass whose forward calls ``block.attn`` there; the original keys are unchanged, ``layerN.M.attn.*`` added.
  * timm (``timm.models.resnet.ResNet``): the module becomes the block's own attention slot, ``block.se``, which
    timm calls at that position; a block whose slot is taken (e.g. timm's SE-ResNets) is refused.
``blocks`` takes ``create_model``'s placement strings (``models/placement.py``) over ``layer1``..``layer4``;
``share=True`` gives one instance per stage, registered in its first block with the module (saved once). New
modules get attnlab's models' init: kaiming (fan_out) convs, BN at 1/0, then the module's own ``init_weights()``.
Any other architecture, and modules that re-run attnlab's own blocks (TDAM), are refused in one line.
"""
import torch.nn as nn

from .. import attention as registry
from ..errors import AttnlabError, check_flag
from .placement import resolve_blocks
from .resnet import init_attention, init_convs_and_norms

STAGES = ("layer1", "layer2", "layer3", "layer4")
_TV_CLASSES: dict[type, type] = {}


def _tv_forward_basic(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.attn(self.bn2(self.conv2(out)))
    out += identity
    return self.relu(out)


def _tv_forward_bottleneck(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.attn(self.bn3(self.conv3(out)))
    out += identity
    return self.relu(out)


def _families():
    """[(family, model class, {block class: (last BN name, torchvision forward or None)})] of what is installed."""
    out = []
    try:
        import torchvision.models.resnet as tv
    except ImportError:
        tv = None
    if tv is not None:
        out.append(("torchvision", tv.ResNet, {tv.BasicBlock: ("bn2", _tv_forward_basic),
                                              tv.Bottleneck: ("bn3", _tv_forward_bottleneck)}))
    try:
        import timm.models.resnet as tr
    except ImportError:
        tr = None
    if tr is not None:
        out.append(("timm", tr.ResNet, {tr.BasicBlock: ("bn2", None), tr.Bottleneck: ("bn3", None)}))
    return out


def _identify(model):
    for family, model_cls, blocks in _families():
        if isinstance(model, model_cls):
            stages = [getattr(model, s, None) for s in STAGES]
            if all(isinstance(s, nn.Sequential) for s in stages):
                kinds = {type(b) for s in stages for b in s}
                known = {k for k in kinds for c in blocks if issubclass(k, c)}
                if kinds == known:
                    return family, stages, blocks
            break
    raise AttnlabError(f"attach supports torchvision and timm ResNets (basic and bottleneck blocks in layer1..layer4), "
                       f"not {type(model).__module__}.{type(model).__name__}")


def _tv_class(block_cls, forward):
    if block_cls not in _TV_CLASSES:
        name = f"{block_cls.__name__}WithAttention"
        cls = type(name, (block_cls,), {"forward": forward, "__module__": __name__})
        if name not in globals():  # reachable by name, so torch.save(model) can pickle the blocks
            globals()[name] = cls
        _TV_CLASSES[block_cls] = cls
    return _TV_CLASSES[block_cls]


def _init(module):
    """attnlab's models' init for a new module (as ResNet._init_weights does), then the module's own."""
    init_convs_and_norms(module)
    if hasattr(module, "init_weights"):  # init_attention covers the submodules
        module.init_weights()
    init_attention(module)
    return module


def _set_slot(block, name, module, register):
    block._modules.pop(name, None)
    block.__dict__.pop(name, None)
    if register:
        setattr(block, name, module)
    else:  # shared: owned (and saved) by the stage's first block that uses it
        object.__setattr__(block, name, module)


def attach(model: nn.Module, attention: str, blocks=None, attention_kwargs: dict | None = None,
           share: bool | None = None) -> nn.Module:
    """Put ``attention`` into ``model``'s residual blocks in place; returns ``model``. See the module docstring."""
    family, stages, block_types = _identify(model)
    attention_kwargs = registry.options_dict(attention_kwargs)
    cls = registry.get(attention)
    registry.check_kwargs(attention, attention_kwargs)
    if getattr(cls, "wraps_block", False):
        raise AttnlabError(f"attention '{attention}' re-runs its block's layers, which only attnlab's own models "
                           f"allow; use attnlab.create_model")
    share = getattr(cls, "shared_by_default", False) if share is None else check_flag("share", share)
    for i, stage in enumerate(stages):
        for j, block in enumerate(stage):
            own = getattr(block, "attn", None)
            if (isinstance(own, nn.Module) and not isinstance(own, nn.Identity)) or \
                    (family == "timm" and getattr(block, "se", None) is not None):
                raise AttnlabError(f"attach: {STAGES[i]}[{j}] already holds an attention module")
    masks = resolve_blocks(blocks, [len(s) for s in stages], getattr(cls, "default_stages", None))
    # Every module is built before any block changes: one that cannot be built leaves the model as it was.
    plan = []  # (block, its forward, module or None, whether the block owns it)
    for stage, mask in zip(stages, masks):
        shared = None
        for block, use in zip(stage, mask):
            last_bn, forward = block_types[next(c for c in block_types if isinstance(block, c))]
            if not use:
                plan.append((block, forward, None, True))
            elif share and shared is not None:
                plan.append((block, forward, shared, False))
            else:
                channels = getattr(block, last_bn).num_features
                shared = _init(registry.create(attention, channels, **attention_kwargs))
                plan.append((block, forward, shared, True))
    for block, forward, module, owned in plan:
        if family == "torchvision" and not isinstance(block, tuple(_TV_CLASSES.values())):
            block.__class__ = _tv_class(type(block), forward)
        if module is not None:
            _set_slot(block, "attn" if family == "torchvision" else "se", module, register=owned)
        elif family == "torchvision":
            block.attn = nn.Identity()  # no parameters, no state_dict keys
    return model
