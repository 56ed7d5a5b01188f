"""Read each attention module's own gate during a forward pass, with forward hooks from outside the modules.

Nothing in ``attnlab/attention`` changes: every gate is either the output of a submodule that a hook sees (the
pre-sigmoid logits), or recomputed from the module's input by the module's own method. Records are
``Gate(block, kind, step, values)``: ``block`` the qualified name ("layer2.1"), ``kind`` "channel" (values B x C)
or "spatial" (values B x H x W), ``step`` the TDAM modulation index (0 elsewhere), values in (0, 1) on the CPU.

Per module:
  * SE: sigmoid of ``fc2``'s output;  ECA: sigmoid of ``conv``'s output;
  * CBAM: channel gate recomputed from ``channel``'s input (its two MLP passes are summed inside ``forward``),
    spatial gate sigmoid of ``spatial.bn``'s output;
  * SPE: ``gate(u)`` of the module's input;  DIA: the hidden state h the module just multiplied by (``_state[0]``);
  * TDAM: channel gate sigmoid of the raw searchlight (``w_s``'s output); spatial gate sigmoid(sum_c S_c X'_c),
    taken by wrapping the module's ``_spatial`` on the instance for the duration of the capture (it is a static
    method without a submodule to hook). One record per modulation (T - 1 per block).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


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
    records, handles, patched, hooked = [], [], [], set()
    current = [""]  # the block now running: a pre-hook on every block sets it (DIA's module serves many blocks)

    def add(kind, values):
        records.append(Gate(current[0], kind, 0, values.detach().float().cpu()))

    def enter(name):
        def hook(module, inputs):
            current[0] = name
        return hook

    for name, block in _blocks(model):
        handles.append(block.register_forward_pre_hook(enter(name)))
        attn = block.attn
        if id(attn) in hooked:
            continue
        hooked.add(id(attn))
        kind = getattr(attn, "registry_name", None)
        if kind == "se":
            handles.append(attn.fc2.register_forward_hook(lambda m, i, o: add("channel", o.sigmoid().flatten(1))))
        elif kind == "eca":
            handles.append(attn.conv.register_forward_hook(lambda m, i, o: add("channel", o.sigmoid().flatten(1))))
        elif kind == "cbam":
            def channel(m, i, o):
                x = i[0]
                logits = m.mlp(x.mean((2, 3), keepdim=True)) + m.mlp(x.amax((2, 3), keepdim=True))
                add("channel", logits.sigmoid().flatten(1))
            handles.append(attn.channel.register_forward_hook(channel))
            handles.append(attn.spatial.bn.register_forward_hook(lambda m, i, o: add("spatial", o.sigmoid()[:, 0])))
        elif kind == "spe":
            handles.append(attn.register_forward_hook(lambda m, i, o: add("channel", m.gate(i[0]).flatten(1))))
        elif kind == "dia":
            handles.append(attn.register_forward_hook(lambda m, i, o: add("channel", m._state[0])))
        elif kind == "tdam":
            handles.append(attn.w_s.register_forward_hook(lambda m, i, o: add("channel", o.sigmoid().flatten(1))))

            def spatial(x, s, original=attn._spatial):
                add("spatial", torch.sigmoid((s * x).sum(1)))
                return original(x, s)
            attn._spatial = spatial  # an instance attribute shadows the static method while capturing
            patched.append(attn)
    try:
        yield records
    finally:
        for h in handles:
            h.remove()
        for attn in patched:
            del attn._spatial  # the class's static method shows through again
        _number_steps(records)


def _number_steps(records):
    """Number repeated (block, kind) records 0, 1, ... (TDAM's modulations; other modules record once)."""
    count = {}
    for r in records:
        key = (r.block, r.kind)
        r.step = count.get(key, 0)
        count[key] = r.step + 1
