"""Collect the gates each attention module shows during a forward pass, with their block's name.

The modules say what they can show themselves (``attnlab.attention.gates``: a module calls ``show_gate`` for every
gate it applies); this file only watches every module in every block's slot and names the block that is running,
so a new module needs no change here. Records are ``Gate(block, kind, step, values)``: ``block`` the qualified name
("layer2.1"), ``kind`` one of attention.gates.KINDS with ``values`` on the CPU holding the batch axis and the axes
the kind varies over ("channel": B x C, "spatial": B x H x W, "channel-height": B x C x H, "channel-width":
B x C x W, "full": B x C x H x W), ``step`` the index of a repeated gate within its block (TDAM's modulations; 0
elsewhere). The values are the multipliers themselves (mostly in (0, 1); GCT's in (0, 2), BAM's in (1, 2)).

What the modules show today: SE, ECA, FcaNet and GCT their channel gate; CBAM its channel and spatial gates; SPE
its gate v; DIA the hidden state h it multiplies by; TDAM, per modulation, the searchlight's channel gate sigmoid(S)
and its spatial gate sigmoid(sum_c S_c X'_c) (T - 1 records of each per block); SimAM sigmoid of its inverse
energy and BAM its 1 + sigmoid gate ("full"); Coordinate Attention g_h and g_w ("channel-height",
"channel-width"); triplet attention its three branch gates (channel-width, channel-height, spatial); GC the scale
fusion's channel gate, and nothing with its default add fusion (which multiplies by nothing).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from ..attention.gates import gate_axes, watch_gates


@dataclass
class Gate:
    block: str
    kind: str
    step: int
    values: torch.Tensor


def _blocks(model):
    for name in model.stage_names:
        for j, block in enumerate(getattr(model, name)):
            yield f"{name}.{j}", block


@contextmanager
def capture_gates(model):
    """``with capture_gates(model) as gates: model(x)``; ``gates`` is then a list of :class:`Gate`."""
    records, handles = [], []
    current = [""]  # the block now running: a pre-hook on every block sets it (a shared module serves many blocks)

    def add(module, kind, values):
        records.append(Gate(current[0], kind, 0, gate_axes(kind, values.detach().float().cpu())))

    def enter(name):
        def hook(module, inputs):
            current[0] = name
        return hook

    with ExitStack() as watching:
        watched = set()
        for name, block in _blocks(model):
            handles.append(block.register_forward_pre_hook(enter(name)))
            for module in block.attn.modules():  # the slot's module and its parts (CBAM's two gates)
                if id(module) not in watched:
                    watched.add(id(module))
                    watching.enter_context(watch_gates(module, add))
        try:
            yield records
        finally:
            for h in handles:
                h.remove()
            _number_steps(records)


def _number_steps(records):
    """Number repeated (block, kind) records 0, 1, ... (TDAM's modulations; other modules record once)."""
    count = {}
    for r in records:
        key = (r.block, r.kind)
        r.step = count.get(key, 0)
        count[key] = r.step + 1
