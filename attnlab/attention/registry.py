"""String -> class registry for attention modules.

Protocol every registered module follows:
  * constructor ``Module(channels, **kwargs)``; the same keyword names mean the same thing everywhere
    (``reduction``: hidden width is channels // reduction; ``bias``; ``kernel_size``);
  * ``forward(x)`` takes the residual branch (B, C, H, W) after its last BN and returns a tensor of the same shape;
  * optional class attributes read by the backbones:
      ``default_stages``: stage indices (0-based) that get the module when ``blocks`` is not given
                          (None = every stage);
      ``shared_by_default``: one instance per stage, shared by every connected block (DIA);
      ``wraps_block``: the module re-runs part of the block itself and provides
                       ``forward_block(block, x)`` (TDAM);
      ``reset_state()``: called by the stage before its first block and after its last one (stateful
                         modules such as DIA); a module must not carry state from one call to the next
                         unless reset_state() has been called, so it is safe where nobody calls it (timm);
  * optional hooks called by the backbones:
      ``attach(block)``: called once, right after the block holding the module is built, so a module that
                         needs the block's inner widths (TDAM) creates its parameters before any optimizer exists;
      ``init_weights()``: called after the model's own (kaiming) initialisation, for a paper-prescribed init (SPEM).
  * optional, for the pictures of ``attnlab show``: ``show_gate(self, kind, values)`` (``attention/gates.py``) for
    each gate ``forward`` applies ("channel", "spatial", "channel-height", "channel-width" or "full"); it does
    nothing unless someone watches. A module that
    never calls it shows nothing; the picture code needs no change for a new module.
"""
import functools
import inspect
from collections.abc import Mapping

import torch.nn as nn

from ..errors import AttnlabError, check_int, unknown
from . import from_timm

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: make ``name`` resolvable by :func:`get` and :func:`create`."""
    def wrap(cls):
        if name in _REGISTRY:
            raise RuntimeError(f"attention '{name}' registered twice")
        _REGISTRY[name] = cls
        cls.registry_name = name
        cls.__init__ = _with_factory_kwargs(cls.__init__)
        return cls
    return wrap


def _with_factory_kwargs(init):
    """Accept PyTorch's ``device``/``dtype`` factory keywords, which timm (>= 1.0.20) passes every attn_layer, and
    check ``channels`` as :func:`create` does: timm builds the class directly, and a width of 0, -4, 2.5 or "64"
    failed deep inside torch (or built an empty layer). Parameter-free modules (default ``channels=0``) take 0.

    They are not module options: ``inspect.signature`` (and so :func:`check_kwargs`) still sees ``init``'s.
    """
    default = inspect.signature(init).parameters["channels"].default
    least = 0 if default == 0 else 1

    @functools.wraps(init)
    def __init__(self, *args, device=None, dtype=None, **kwargs):
        if args or "channels" in kwargs:
            check_int("channels", args[0] if args else kwargs["channels"], minimum=least)
        init(self, *args, **kwargs)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)
    return __init__


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type:
    """The class registered under ``name``, or timm's layer for ``timm:<kind>`` (usable as timm's ``attn_layer``)."""
    key = str(name).lower()
    if from_timm.is_timm_name(key):  # timm itself is imported only then
        return from_timm.get(key)
    if key not in _REGISTRY:
        raise unknown("attention", name, _REGISTRY)
    return _REGISTRY[key]


def options_dict(attention_kwargs) -> dict:
    """``attention_kwargs`` (None: none) as a new dict; anything but a mapping is a one-line error."""
    if attention_kwargs is not None and not isinstance(attention_kwargs, Mapping):
        raise AttnlabError(f"attention_kwargs must be a dict, got {type(attention_kwargs).__name__} "
                           f"{attention_kwargs!r}")
    return dict(attention_kwargs or {})


def check_kwargs(name: str, kwargs: dict) -> None:
    """Raise a one-line error when ``kwargs`` holds a keyword the module's constructor does not take."""
    cls = get(name)
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [p for p in params if p not in ("self", "channels")]
    for key in kwargs:
        if key not in valid:
            raise AttnlabError(
                f"attention '{name}' has no option '{key}'; valid options: {', '.join(valid) or '(none)'}")


def create(name: str, channels: int, **kwargs) -> nn.Module:
    """Instantiate attention ``name`` for a ``channels``-wide feature map."""
    check_kwargs(name, kwargs)
    try:
        check_int("channels", channels)  # torch would build empty or negative-width layers, or fail deep inside
    except ValueError as err:
        raise AttnlabError(f"attention '{name}': {err}") from None
    try:
        return get(name)(channels, **kwargs)
    except (TypeError, ValueError, AssertionError) as err:  # timm's layers check their options with assert
        if isinstance(err, AttnlabError):
            raise
        raise AttnlabError(f"attention '{name}' rejected its options {kwargs}: {_line(err)}") from None


def _line(err) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
