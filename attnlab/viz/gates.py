"""Collect the gates each attention module shows during a forward pass, with their block's name.

The modules say what they can show themselves (``attnlab.attention.gates``: a module calls ``show_gate`` for every
gate it applies); this file only watches every module in every block's slot and names the block that is running,
so a new module needs no change here. Records are ``Gate(block, kind, step, values)``: ``block`` the qualified name
("layer2.1"), ``kind`` "channel" (values B x C) or "spatial" (values B x H x W), ``step`` the index of a repeated
gate within its block (TDAM's modulations; 0 elsewhere), values in (0, 1) on the CPU.

What the modules show today: SE and ECA their channel gate; CBAM its channel and spatial gates; SPE its gate v;
DIA the hidden state h it multiplies by; TDAM, per modulation, the searchlight's channel gate sigmoid(S) and its
spatial gate sigmoid(sum_c S_c X'_c) (T - 1 records of each per block).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from ..attention.gates import watch_gates


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
        values = values.detach().float().cpu()
        if kind == "channel":
            values = values.flatten(1)
        elif values.dim() == 4:
            values = values[:, 0]
        records.append(Gate(current[0], kind, 0, values))

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
