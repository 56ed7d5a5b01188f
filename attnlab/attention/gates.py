"""What an attention module can show: the gates it multiplies by, handed to a watcher while one is set.

A module with gates calls ``show_gate(self, kind, values)`` in its forward, once for every gate it applies:
  * ``"channel"``: values (B, C) or (B, C, 1, 1);
  * ``"spatial"``: values (B, H, W) or (B, 1, H, W);
values in (0, 1). ``values`` may also be a function of no arguments that computes them: it is called only while
someone watches. Nothing happens and nothing is kept unless a watcher is set (:func:`watch_gates`, as the picture
code in ``attnlab.viz`` does), so showing costs a dictionary lookup per call. A module that calls nothing shows
nothing; a new module shows its gates by calling ``show_gate``, with no change in the picture code. A gate applied
several times in one forward (TDAM's modulation steps, a shared module used by several blocks) is shown each time,
in the order applied.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn as nn

KINDS = ("channel", "spatial")
_WATCHER = "_gate_watcher"  # an instance attribute, present only while watched: never in state_dict or repr


def show_gate(module: nn.Module, kind: str, values: torch.Tensor | Callable[[], torch.Tensor]) -> None:
    """Hand ``module``'s gate of ``kind`` to its watcher, if it has one (else do nothing)."""
    watcher = module.__dict__.get(_WATCHER)
    if watcher is not None:
        watcher(module, kind, values() if callable(values) else values)


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
