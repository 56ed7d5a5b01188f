"""Connection masks that change at run time: which blocks call their (usually stage-shared) attention module.

EAN (Huang et al., arXiv 2011.14058) trains one supernet with a shared module per stage and, at every step, a
fresh random choice of which blocks apply it. Here a model built once (``create_model(..., share=True,
blocks="all")``) takes a new mask before any forward pass:

    set_connections(model, "101-110-011")      # any form ``blocks=`` accepts (models/placement.py)
    set_connections(model, None)               # every block that has a module calls it again

A 0 bit *skips* the module call (``Block.forward`` checks ``block.connected``): nothing is multiplied by zero, so a
masked block costs exactly what the plain block costs (FLOPs, latency). A stateful shared module (DIA) is only
called by connected blocks, so its (h, c) state runs through the connected blocks of a stage only, zeros at the
first connected one, as the official EAN code. With the same weights, a masked supernet computes the same function
as ``create_model(..., share=True, blocks=mask)`` (tests/test_connections.py).

Official code vs here: EAN passes the mask as a 4-tuple of per-stage integers through ``forward``; here it is
model state (one bool per block), so the engine, the profiler and export need no new argument. Under
``torch.compile`` each new mask is a new guard (a recompile), so supernet training runs eager.

A flat scheme (one bit per block over the whole network, the searchers' unit) converts with
:func:`scheme_bits` / :func:`bits_to_blocks`; the per-stage string form ``"101-110-011"`` is what ``blocks=``
and the retrain take.
"""
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..errors import AttnlabError
from .placement import resolve_blocks


def _blocks(model):
    if not hasattr(model, "stages") or not hasattr(model, "depths"):
        raise AttnlabError(f"connection masks need an attnlab ResNet, got {type(model).__name__}")
    return [list(stage) for stage in model.stages()]


def connectable(model) -> list[list[bool]]:
    """Per stage, per block: whether the block holds an attention module it could call."""
    return [[not isinstance(b.attn, nn.Identity) for b in stage] for stage in _blocks(model)]


def set_connections(model, masks) -> list[list[bool]]:
    """Set which blocks call their attention module; returns the resolved per-stage booleans.

    ``masks``: None (every block with a module), or any ``blocks=`` form: ``"all"``, stage indices, per-stage bit
    strings (``"100-1011-010011-011"`` or a list of them), a dict. A 1 bit where the model was built without a
    module is an error: build the supernet with ``blocks="all"``.
    """
    can = connectable(model)
    wanted = can if masks is None else resolve_blocks(masks, model.depths)
    for s, (want_stage, can_stage) in enumerate(zip(wanted, can)):
        for j, (want, has) in enumerate(zip(want_stage, can_stage)):
            if want and not has:
                raise AttnlabError(f"connection mask sets stage {s} block {j}, but this model was built without an "
                                   "attention module there (build the supernet with blocks='all')")
    for stage, want_stage in zip(_blocks(model), wanted):
        for block, want in zip(stage, want_stage):
            block.connected = bool(want)
    return [list(map(bool, w)) for w in wanted]


def get_connections(model) -> list[list[bool]]:
    """Per stage, per block: whether the block calls an attention module in the next forward."""
    return [[bool(b.connected) and not isinstance(b.attn, nn.Identity) for b in stage] for stage in _blocks(model)]


@contextmanager
def connections(model, masks):
    """``with connections(model, "101-110-011"): ...``: the mask for the block, the previous one afterwards."""
    before = [[b.connected for b in stage] for stage in _blocks(model)]
    set_connections(model, masks)
    try:
        yield
    finally:
        for stage, flags in zip(_blocks(model), before):
            for block, flag in zip(stage, flags):
                block.connected = flag


def scheme_bits(masks) -> tuple[int, ...]:
    """Per-stage booleans -> one flat tuple of 0/1 over all blocks, first stage first."""
    return tuple(int(bool(b)) for stage in masks for b in stage)


def bits_to_blocks(bits, depths) -> str:
    """A flat 0/1 sequence (or string "101110011") -> the per-stage string ``blocks=`` takes, e.g. "101-110-011"."""
    text = "".join(str(int(b)) for b in bits) if not isinstance(bits, str) else bits.replace("-", "")
    grouped = isinstance(bits, str) and "-" in bits  # "101-110-011": its groups must be the stages
    if len(text) != sum(depths) or set(text) - set("01") or \
            (grouped and [len(g) for g in bits.split("-")] != list(depths)):
        raise AttnlabError(f"a scheme needs {sum(depths)} bits of 0/1 for stages {list(depths)}"
                           f"{' (grouped by stage with -)' if grouped else ''}, got {bits!r}")
    out, i = [], 0
    for d in depths:
        out.append(text[i:i + d])
        i += d
    return "-".join(out)


def random_bits(n: int, p: float, generator: torch.Generator) -> tuple[int, ...]:
    """``n`` independent bits, each 1 with probability ``p`` (EAN's supernet sampling uses p = 0.5)."""
    return tuple(int(v) for v in (torch.rand(n, generator=generator) < p).tolist())
