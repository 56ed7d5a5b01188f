"""What an attention module can show: the gates it multiplies by, handed to a watcher while one is set.

A module with gates calls ``show_gate(self, kind, values)`` in its forward, once for every gate it applies. The
kind names the axes of the input (B, C, H, W) the gate varies over; ``values`` has those axes, or is given 4-D,
broadcastable to the input (size 1 on the other axes):
  * ``"channel"``: (B, C) or (B, C, 1, 1): one value per channel (SE, ECA, GCT, FcaNet);
  * ``"spatial"``: (B, H, W) or (B, 1, H, W): one value per position (CBAM's second gate);
  * ``"channel-height"``: (B, C, H) or (B, C, H, 1): per channel and row (Coordinate Attention's g_h);
  * ``"channel-width"``: (B, C, W) or (B, C, 1, W): per channel and column (Coordinate Attention's g_w);
  * ``"full"``: (B, C, H, W): one value per element (SimAM, BAM).
``values`` is the multiplier itself, so that input * values is what the module applies: usually in (0, 1), but
GCT's 1 + tanh(.) lies in (0, 2) and BAM's 1 + sigmoid(.) in (1, 2). A module whose output is an average of
gated copies (triplet attention) shows each copy's gate. ``values`` may also be a function of no arguments that
computes them: it is called only while someone watches. Nothing happens and nothing is kept unless a watcher is set
(:func:`watch_gates`, as the picture code in ``attnlab.viz`` does), so showing costs a dictionary lookup per call.
A module that calls nothing shows nothing (GCNet's default add fusion: x + t adds a term and multiplies by nothing);
a new module shows its gates by calling ``show_gate``, with no change in the picture code. A gate applied several
times in one forward (TDAM's modulation steps, a shared module used by several blocks) is shown each time, in the
order applied.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn as nn

# kind -> the axes of (C, H, W) the gate varies over
KINDS = {"channel": "C", "spatial": "HW", "channel-height": "CH", "channel-width": "CW", "full": "CHW"}
_WATCHER = "_gate_watcher"  # an instance attribute, present only while watched: never in state_dict or repr


def show_gate(module: nn.Module, kind: str, values: torch.Tensor | Callable[[], torch.Tensor]) -> None:
    """Hand ``module``'s gate of ``kind`` to its watcher, if it has one (else do nothing)."""
    watcher = module.__dict__.get(_WATCHER)
    if watcher is not None:
        if kind not in KINDS:
            raise ValueError(f"{type(module).__name__} shows a gate of kind {kind!r}; kinds: {', '.join(KINDS)}")
        watcher(module, kind, values() if callable(values) else values)


def gate_axes(kind: str, values: torch.Tensor) -> torch.Tensor:
    """``values`` with only the batch axis and the axes ``kind`` varies over: a 4-D (B, C, H, W)-broadcastable gate
    loses its size-1 axes ((B, C, 1, 1) -> (B, C)); a gate given that way already is returned as it is."""
    axes = KINDS[kind]
    if values.dim() != 4:
        if values.dim() != 1 + len(axes):
            raise ValueError(f"a {kind!r} gate has shape (B, {', '.join(axes)}) or 4-D, got {tuple(values.shape)}")
        return values
    kept = [values.shape[0]] + [n for n, axis in zip(values.shape[1:], "CHW") if axis in axes]
    dropped = [n for n, axis in zip(values.shape[1:], "CHW") if axis not in axes]
    if any(n != 1 for n in dropped):
        raise ValueError(f"a {kind!r} gate varies over {', '.join(axes)} only, got shape {tuple(values.shape)}")
    return values.reshape(kept)


@contextmanager
def watch_gates(module: nn.Module, watcher: Callable[[nn.Module, str, torch.Tensor], None]):
    """``watcher(module, kind, values)`` receives every gate ``module`` shows inside the ``with`` block."""
    if module.__dict__.get(_WATCHER) is not None:
        raise RuntimeError(f"{type(module).__name__}: its gates are already being watched")
    module.__dict__[_WATCHER] = watcher
    try:
        yield
    finally:
        module.__dict__.pop(_WATCHER, None)
