"""SPEM / SPENet: self-adaptive pooling enhanced attention (Zhong, Wen, Qin; MMM 2023, arXiv 2208.10322).

On the residual branch u (B, C, H, W), after its last BN:
  f_max, f_min = global max pool(u), global min pool(u)                    (B, C, 1, 1)
  g_rew(z) = w_rew * z + b_rew    per-channel affine, ONE shared by both pools ("reweight")
  g_exc(z) = w_exc * z + b_exc    per-channel affine ("excitation")
  lambda   = p0^2 / (p0^2 + p1^2) one learned scalar pair p per module (not per channel)

  variant="official" (Qrange-group/SPEM models/spem.py; the default):
      a, b = g_rew(f_max), g_rew(f_min)
      v    = sigmoid(a + b) * sigmoid(g_exc(lambda * a + (1 - lambda) * b))   mix taken AFTER g_rew
  variant="figure" (the paper's architecture figure, images/arch.png):
      v    = sigmoid((g_rew(f_max) + g_rew(f_min)) * g_exc(lambda * f_max + (1 - lambda) * f_min))
      i.e. the mix is taken on the raw pools and one sigmoid follows the product of the two branches.
  output u * v.

Init (official): w = 0, b = -1 for both affines, p = (0.5, 0.5); so v = sigmoid(-2) * sigmoid(-1) ~ 0.032 at
init and every residual branch starts scaled down ~30x (a near zero-init residual). The model calls
``init_weights()`` after its kaiming init, which only touches convs and BNs, so this init survives.
The official training adds 0.1 * sum_blocks ||p||^2 to the loss: attnlab.objectives.spe_reg.

Our differences: the official code only has SPEM in bottleneck blocks of CIFAR ResNet-164; here it fits any
block. torch.amax/amin split the gradient evenly among tied maxima, where AdaptiveMaxPool2d gives it to one.
"""
import math

import torch
import torch.nn as nn

from ..errors import AttnlabError
from .gates import show_gate
from .registry import register

VARIANTS = ("official", "figure")


@register("spe")
class SPE(nn.Module):
    def __init__(self, channels: int, variant: str = "official", init_bias: float = -1.0):
        """``init_bias``: the starting value of both affines' biases. The official -1 starts the gate at
        sigmoid(-2) * sigmoid(-1) ~ 0.032; e.g. 2.0 starts it at ~0.87, an open gate (not in the paper: an ablation
        knob for short schedules, where the official gate hardly moves from its init)."""
        super().__init__()
        if variant not in VARIANTS:
            raise AttnlabError(f"attention 'spe': unknown variant '{variant}'; valid choices: {', '.join(VARIANTS)}")
        if isinstance(init_bias, bool) or not isinstance(init_bias, (int, float)) or not math.isfinite(init_bias):
            raise AttnlabError(f"attention 'spe': init_bias must be a finite number, got {init_bias!r}")
        self.variant, self.init_bias = variant, float(init_bias)
        shape = (1, channels, 1, 1)
        self.w_rew = nn.Parameter(torch.empty(shape))
        self.b_rew = nn.Parameter(torch.empty(shape))
        self.w_exc = nn.Parameter(torch.empty(shape))
        self.b_exc = nn.Parameter(torch.empty(shape))
        self.p = nn.Parameter(torch.empty(2))
        self.init_weights()

    def init_weights(self):
        with torch.no_grad():
            for w, b in ((self.w_rew, self.b_rew), (self.w_exc, self.b_exc)):
                w.zero_()
                b.fill_(self.init_bias)
            self.p.fill_(0.5)

    def mix_weight(self) -> torch.Tensor:
        """lambda = p0^2 / (p0^2 + p1^2): the weight of the max pool in the mix."""
        p2 = self.p.pow(2)
        return p2[0] / p2.sum()

    def gate(self, u: torch.Tensor) -> torch.Tensor:
        """The attention vector v (B, C, 1, 1)."""
        f_max = u.amax((2, 3), keepdim=True)
        f_min = u.amin((2, 3), keepdim=True)
        lam = self.mix_weight()
        a = self.w_rew * f_max + self.b_rew
        b = self.w_rew * f_min + self.b_rew
        if self.variant == "official":
            mix = lam * a + (1 - lam) * b
            return torch.sigmoid(a + b) * torch.sigmoid(self.w_exc * mix + self.b_exc)
        mix = lam * f_max + (1 - lam) * f_min
        return torch.sigmoid((a + b) * (self.w_exc * mix + self.b_exc))

    def forward(self, u):
        gate = self.gate(u)
        show_gate(self, "channel", gate)
        return u * gate

    def extra_repr(self):
        return f"channels={self.w_rew.shape[1]}, variant={self.variant}, init_bias={self.init_bias}"
