"""DIA: Dense-and-Implicit Attention (Huang, Liang, Liang, Yang; DIANet, AAAI 2020, arXiv 1905.10671).

One LSTM-style unit per stage, shared by every connected block of that stage (``shared_by_default``), carrying
its (h, c) state from block to block:
  f      = GAP(x)                                       (B, C)
  gates  = W_ih(f) + W_hh(h)                            W_* = Linear(C, C/r) -> ReLU -> Linear(C/r, 4C), biases
  i, f', g, o = split(gates, 4)                         in that order, as the official code
  c      = sigmoid(f') * c + sigmoid(i) * tanh(g)
  h      = sigmoid(o) * sigmoid(c)                      sigmoid, not tanh: h in (0, 1) is the attention vector
  output x * h
State: zeros at the first connected block of a stage; the stage calls ``reset_state()`` before its first
block (and after its last). Blocks without the module neither read nor update it (EAN's semantics).
The state never outlives a forward pass: it is carried from call to call only after ``reset_state()`` has opened
a sequence (as an attnlab stage does). A module no stage manages, e.g. timm's ``attn_layer`` (one instance per
block, nobody calls ``reset_state()``), starts from zero state in every call and keeps nothing, so a second
training step or a new batch size works; it is then one LSTM step per block, with no recurrence across blocks.

Defaults and differences: r = 4 as in DIANet's CIFAR code (gbup-group/DIANet models/cifar/dia_resnet.py);
EAN's ImageNet code uses r = 20 (pass reduction=20). The hidden width is max(1, C // r). The official unit also
defines a Dropout(0.1) that only feeds an unused second layer; it is left out. Like the official code the
Linear layers keep PyTorch's default init. The official wrapper only works for bottleneck blocks; here any
block works. ``share=False`` gives each block its own unit, whose state then starts at zero every time.
"""
import torch
import torch.nn as nn

from ..errors import AttnlabError, check_int
from .gates import show_gate
from .registry import register


def _bottleneck_mlp(channels: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 4 * channels))


@register("dia")
class DIA(nn.Module):
    shared_by_default = True

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        check_int("reduction", reduction)
        hidden = max(1, channels // reduction)
        self.channels = channels
        self.w_ih = _bottleneck_mlp(channels, hidden)
        self.w_hh = _bottleneck_mlp(channels, hidden)
        self._state = None  # (h, c), each (B, C); a plain attribute, so never in state_dict
        self._carry = False  # True once reset_state() has opened a sequence of calls (an attnlab stage)

    def reset_state(self):
        """Drop the state and carry it across the following calls, until the next reset (the stage's job)."""
        self._state = None
        self._carry = True

    def step(self, f, state=None):
        """One LSTM step: f (B, C) and optional (h, c) -> new (h, c)."""
        if state is None:
            h = c = f.new_zeros(f.shape)
        else:
            h, c = state
        i, fg, g, o = (self.w_ih(f) + self.w_hh(h)).chunk(4, dim=1)
        c = torch.sigmoid(fg) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.sigmoid(c)
        return h, c

    def forward(self, x):
        f = x.mean((2, 3))
        if self._state is not None and self._state[0].shape != f.shape:
            raise AttnlabError(f"attention 'dia': state of shape {tuple(self._state[0].shape)} from an earlier call "
                               f"met a batch of shape {tuple(f.shape)}; call reset_state() between forward passes")
        state = self.step(f, self._state)
        if self._carry:
            self._state = state
        show_gate(self, "channel", state[0])
        return x * state[0][:, :, None, None]

    def extra_repr(self):
        return f"channels={self.channels}"
