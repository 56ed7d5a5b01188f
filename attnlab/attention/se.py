"""Squeeze-and-Excitation (Hu et al., CVPR 2018, arXiv 1709.01507).

s = sigmoid(W2 relu(W1 GAP(x))), output x * s.  W1: C -> C/r, W2: C/r -> C, r = 16.

Paper vs implementations:
  * The hidden width is C // r as in the paper (at least 1). timm rounds it up to a multiple of 8
    (rd_divisor=8), which changes the width only for narrow layers (C < 128 with r = 16, e.g. CIFAR ResNets).
  * The FC layers carry biases, as in the official Caffe release; the paper's parameter counts
    (SE-ResNet-50: 28.09M) include them.
"""
import torch.nn as nn

from ..errors import check_bool, check_int
from .gates import show_gate
from .registry import register


@register("se")
class SE(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, bias: bool = True):
        super().__init__()
        check_int("reduction", reduction)
        check_bool("bias", bias)
        hidden = max(1, channels // reduction)
        # 1x1 convs on a (B, C, 1, 1) tensor: the same maths as Linear, no reshapes, channels_last friendly.
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        gate = self.fc2(self.act(self.fc1(s))).sigmoid()
        show_gate(self, "channel", gate)
        return x * gate
