"""timm's attention layers in attnlab's slot: ``attention="timm:<kind>"`` (``timm.layers.get_attn``'s kinds).

``attnlab.attention.get("timm:gc")`` returns a subclass of timm's class built as ``Module(channels, **kwargs)``
with timm's own option names (``rd_ratio``, ``act_layer``, ...); its weights and state_dict keys are timm's. It works
wherever a name is taken: ``create_model``, configs (``model.attention: timm:gc``), bench matrices, timm's
``attn_layer``. The kinds that do not fit the slot (same channels in and out, any spatial size, output shape equal to
the input's) are refused with the reason; ``tests/test_from_timm.py`` checks every kind both ways. timm is an
optional dependency (attnlab's ``dev`` extra installs it).
"""
import functools
import inspect

from ..errors import AttnlabError, unknown

PREFIX = "timm:"

# Kinds of timm 1.0.x's get_attn that keep the input's shape at any size (checked on 7x7, 5x9 and 3x3 maps).
FITS = {
    "se": "Squeeze-and-Excitation (timm's SEModule; hidden width rounded to a multiple of 8)",
    "ese": "Effective SE (one FC, no reduction; timm's EffectiveSEModule)",
    "eca": "Efficient Channel Attention (timm's EcaModule)",
    "ecam": "ECA with an MLP instead of the 1-D conv (timm's EcaModule, use_mlp=True)",
    "ceca": "ECA with circular padding (timm's CecaModule)",
    "gc": "Global Context block, scale fusion (timm's GlobalContext)",
    "gca": "Global Context block, add fusion as GCNet's default (timm's GlobalContext, fuse_add=True)",
    "cbam": "CBAM (timm's CbamModule; MLP without bias by default)",
    "lcbam": "light CBAM: 1-channel spatial descriptor (timm's LightCbamModule)",
    "coord": "Coordinate Attention (timm's CoordAttn; hardswish, hidden width rounded to 8)",
    "scoord": "simplified Coordinate Attention (timm's SimpleCoordAttn)",
    "ela": "Efficient Local Attention (timm's EfficientLocalAttn)",
    "strip": "strip attention (timm's StripAttn)",
    "sk": "Selective Kernel convolution (timm's SelectiveKernel; a conv layer, not a light gate)",
    "splat": "split attention of ResNeSt (timm's SplitAttn; a conv layer, not a light gate)",
    "lambda": "lambda layer (timm's LambdaLayer; local context r=9 keeps it size-independent)",
    "nl": "non-local block (timm's NonLocalAttn)",
}
REFUSED = {
    "bottleneck": "timm's BottleneckAttn needs a fixed feature size (feat_size) equal to its input's, "
                  "so it cannot take any spatial size",
    "halo": "timm's HaloAttn needs H and W divisible by its block size (8)",
    "bat": "timm's BatNonLocalAttn needs square maps whose side is divisible by its block size (7)",
    "ge": "timm's GatherExcite does not build with its defaults (extent=0, use_mlp=True: ConvMlp gets act_layer "
          "twice), and its global extent with parameters needs a fixed feature size",
}


def is_timm_name(name) -> bool:
    return str(name).lower().startswith(PREFIX)


def names() -> list[str]:
    """Every timm kind that fits the slot, as ``timm:<kind>``."""
    return [PREFIX + k for k in sorted(FITS)]


def _import_get_attn():
    try:
        from timm.layers import get_attn
    except ImportError:
        return None
    return get_attn


def get(name: str) -> type:
    """The slot-ready class for ``timm:<kind>``; a one-line AttnlabError for a missing timm or an unfit kind."""
    kind = str(name).lower()[len(PREFIX):]
    if kind in REFUSED:
        raise AttnlabError(f"attention '{PREFIX}{kind}' does not fit a residual block's slot: {REFUSED[kind]}")
    if kind not in FITS:
        raise unknown("timm attention", name, names())
    return _wrap(kind)


@functools.cache
def _wrap(kind: str) -> type:
    get_attn = _import_get_attn()
    if get_attn is None:
        raise AttnlabError(f"attention '{PREFIX}{kind}' needs timm, which is not installed: pip install timm")
    target = get_attn(kind)
    preset = {}
    if isinstance(target, functools.partial):  # e.g. 'gca' = partial(GlobalContext, fuse_add=True, fuse_scale=False)
        preset, target = dict(target.keywords), target.func

    def __init__(self, channels, **kwargs):
        target.__init__(self, channels, **{**preset, **kwargs})

    # The options check (registry.check_kwargs) and `attnlab list` read this signature: timm's, with the kind's
    # presets as defaults and without the factory keywords (device/dtype are still passed through to timm).
    sig = inspect.signature(target.__init__)
    params = [p.replace(default=preset[p.name]) if p.name in preset else p
              for p in sig.parameters.values() if p.name not in ("device", "dtype")]
    __init__.__signature__ = sig.replace(parameters=params)
    body = {"__init__": __init__, "__module__": __name__, "__doc__": FITS[kind], "registry_name": PREFIX + kind,
            "timm_class": target}
    if hasattr(target, "reset_parameters"):
        # attnlab's models re-initialise every conv (kaiming, fan_out) and then call init_weights(): timm's own
        # init (e.g. GC's zeroed last add-fusion conv) is re-applied there, as timm's models keep it.
        body["init_weights"] = lambda self: self.reset_parameters()
    cls = type(f"Timm_{kind}", (target,), body)
    globals()[cls.__name__] = cls  # reachable by name, so torch.save(model) can pickle it
    return cls
