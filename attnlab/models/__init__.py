"""Model registry: ``create_model(name, num_classes=..., attention=..., attention_kwargs=..., blocks=...)``."""
import operator
from functools import partial

from ..errors import AttnlabError, unknown
from .blocks import BasicBlock, Bottleneck, CifarBasicBlock
from .resnet import ResNet

_MODELS: dict[str, tuple] = {}  # name -> (builder, default num_classes, input size)


def register_model(name, builder, num_classes, input_size):
    _MODELS[name] = (builder, num_classes, input_size)


def list_models() -> list[str]:
    return sorted(_MODELS)


def default_input_size(name: str) -> int:
    if name not in _MODELS:
        raise unknown("model", name, _MODELS)
    return _MODELS[name][2]


def create_model(name: str, num_classes: int | None = None, attention: str = "none",
                 attention_kwargs: dict | None = None, blocks=None, share: bool | None = None, **kwargs):
    """Build a registered backbone with ``attention`` in the residual blocks chosen by ``blocks``.

    ``share=True`` gives each stage one attention instance used by all its connected blocks.
    """
    if name not in _MODELS:
        raise unknown("model", name, _MODELS)
    builder, default_classes, _ = _MODELS[name]
    if num_classes is not None:
        try:
            valid = operator.index(num_classes) >= 1 and not isinstance(num_classes, bool)
        except TypeError:
            valid = False
        if not valid:
            raise AttnlabError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        num_classes = operator.index(num_classes)
    _check_options(name, builder, kwargs)
    return builder(num_classes=default_classes if num_classes is None else num_classes, attention=attention,
                   attention_kwargs=attention_kwargs, blocks=blocks, share=share, **kwargs)


def _check_options(name: str, builder, kwargs: dict) -> None:
    """A keyword the model's builder does not take (a typo, or one its registration already fixes, like a CIFAR
    ResNet's depths) is a one-line error instead of a TypeError from deep inside."""
    import inspect
    params = inspect.signature(builder).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    taken = {"num_classes", "attention", "attention_kwargs", "blocks", "share"}
    valid = [p for p, v in params.items() if p not in taken and v.kind is not v.POSITIONAL_ONLY]
    for key in kwargs:
        if key not in valid:
            raise AttnlabError(f"model '{name}' has no option '{key}'; valid options: {', '.join(valid) or '(none)'}")


# He et al. 2016, CIFAR: depth 6n+2 (basic) or 9n+2 (bottleneck), 16-32-64 planes. The basic ones use the
# paper's option-A shortcuts (Table 6: 0.27M/0.85M/1.7M params); ResNet-164's bottlenecks project (1.7M).
_cifar = dict(planes=(16, 32, 64), stem="cifar", stem_width=16)
for _depth in (20, 32, 56, 110):
    _n = (_depth - 2) // 6
    register_model(f"resnet{_depth}", partial(ResNet, CifarBasicBlock, (_n, _n, _n), **_cifar), 10, 32)
register_model("resnet164", partial(ResNet, Bottleneck, (18, 18, 18), **_cifar), 10, 32)

# ImageNet stages on a 3x3 stride-1 stem without max-pool, for 32x32 inputs.
_cifar_stem = dict(stem="cifar", stem_width=64)
register_model("cifar_resnet18", partial(ResNet, BasicBlock, (2, 2, 2, 2), **_cifar_stem), 10, 32)
register_model("cifar_resnet34", partial(ResNet, BasicBlock, (3, 4, 6, 3), **_cifar_stem), 10, 32)
register_model("cifar_resnet50", partial(ResNet, Bottleneck, (3, 4, 6, 3), **_cifar_stem), 10, 32)

# torchvision's ImageNet ResNets (same keys, same outputs with attention 'none').
register_model("resnet18", partial(ResNet, BasicBlock, (2, 2, 2, 2)), 1000, 224)
register_model("resnet34", partial(ResNet, BasicBlock, (3, 4, 6, 3)), 1000, 224)
register_model("resnet50", partial(ResNet, Bottleneck, (3, 4, 6, 3)), 1000, 224)
register_model("resnet101", partial(ResNet, Bottleneck, (3, 4, 23, 3)), 1000, 224)

__all__ = ["create_model", "list_models", "register_model", "default_input_size", "ResNet", "BasicBlock",
           "CifarBasicBlock", "Bottleneck"]
