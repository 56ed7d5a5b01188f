"""SimAM: a simple, parameter-free attention module (Yang, Zhang, Li, Xie; ICML 2021).

Each neuron's weight is the inverse of its minimal energy, an estimate of how much it stands out from the other
neurons of its channel: with mu and var the channel's spatial mean and variance,
  e_inv = (x - mu)^2 / (4 (var + lambda)) + 1/2,      output x * sigmoid(e_inv),      lambda = 1e-4.

Paper, official code and timm:
  * Official code (``ZjjConan/SimAM``, ``networks/attentions/simam_module.py``): var = sum((x - mu)^2) / (H*W - 1),
    the unbiased estimate ("M - 1 other neurons" in the paper's derivation); the paper's Eq. 5 writes 1/M. We follow
    the code. ``e_lambda`` is the paper's lambda (1e-4, the value of its experiments).
  * The official ResNets put SimAM after the residual branch's last BN (``bn2``/``bn3``), the slot used here.
  * A 1x1 map has no other neuron (H*W - 1 = 0, the official code divides by zero): the divisor is kept >= 1 here,
    so the gate is sigmoid(1/2) everywhere instead of NaN.
  * timm has no SimAM. No parameters, so ``share=True`` changes nothing.
Shown to ``attnlab show`` (attention/gates.py): sigmoid(e_inv), a "full" gate (one value per element, in (0.62, 1)).
"""
import torch.nn as nn

from ..errors import check_positive
from .gates import show_gate
from .registry import register


@register("simam")
class SimAM(nn.Module):
    def __init__(self, channels: int = 0, e_lambda: float = 1e-4):
        super().__init__()
        self.e_lambda = check_positive("e_lambda", e_lambda)

    def forward(self, x):
        n = max(x.shape[2] * x.shape[3] - 1, 1)
        d = (x - x.mean((2, 3), keepdim=True)).pow(2)
        e_inv = d / (4 * (d.sum((2, 3), keepdim=True) / n + self.e_lambda)) + 0.5
        gate = e_inv.sigmoid()
        show_gate(self, "full", gate)
        return x * gate
