"""GCT: Gated Channel Transformation (Yang, Zhu, Wu, Yang; CVPR 2020, arXiv 1909.11519).

Per channel, three parameters (alpha, gamma, beta), no channel mixing but a normalisation across channels:
  s_c = alpha_c * sqrt(sum_{HW} x_c^2 + eps)              "l2" embedding (default)
  n_c = gamma_c * s_c / sqrt(mean_c(s^2) + eps)           channel normalisation
  output x * (1 + tanh(n_c + beta_c))
``mode="l1"``: s_c = alpha_c * sum_{HW} |x_c| and n_c = gamma_c * s_c / (mean_c |s| + eps).

Defaults as the official code (``z-x-yang/GCT``, ``PyTorch/GCT.py``): eps = 1e-5, alpha = 1, gamma = 0, beta = 0, so
the gate is 1 at init (the paper: "initialize gamma and beta to 0"). 3C parameters.

Paper, official code and timm:
  * The paper's normalisation sqrt(C) s_c / ||s||_2 equals s_c / sqrt(mean s^2); the code (and we) add eps inside.
  * The paper puts GCT before every convolution; here it sits in the residual slot after the last BN (use
    ``blocks`` for placement). timm has no GCT.
  * The official ``after_relu=True`` option (l1 mode without abs) is not offered: the slot's input is not ReLU'd.
Shown to ``attnlab show`` (attention/gates.py): the channel gate 1 + tanh(n + beta), in (0, 2).
"""
import torch
import torch.nn as nn

from ..errors import check_positive
from .gates import show_gate
from .registry import register


@register("gct")
class GCT(nn.Module):
    def __init__(self, channels: int, mode: str = "l2", eps: float = 1e-5):
        super().__init__()
        if mode not in ("l2", "l1"):
            raise ValueError(f"mode must be 'l2' or 'l1', got {mode!r}")
        self.mode, self.eps = mode, check_positive("eps", eps)
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def init_weights(self):
        with torch.no_grad():
            self.alpha.fill_(1)
            self.gamma.zero_()
            self.beta.zero_()

    def forward(self, x):
        if self.mode == "l2":
            s = (x.pow(2).sum((2, 3), keepdim=True) + self.eps).sqrt() * self.alpha
            n = self.gamma * s / (s.pow(2).mean(1, keepdim=True) + self.eps).sqrt()
        else:
            s = x.abs().sum((2, 3), keepdim=True) * self.alpha
            n = self.gamma * s / (s.abs().mean(1, keepdim=True) + self.eps)
        gate = 1 + torch.tanh(n + self.beta)
        show_gate(self, "channel", gate)
        return x * gate
