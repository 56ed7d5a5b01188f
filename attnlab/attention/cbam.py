"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018, arXiv 1807.06521).

Channel attention, then spatial attention, applied in sequence:
  Mc = sigmoid(MLP(AvgPool(x)) + MLP(MaxPool(x)))             shared MLP C -> C/r -> C, r = 16
  Ms = sigmoid(BN(conv7x7([mean_c(x'); max_c(x')])))          x' = x * Mc; output x' * Ms

Paper vs implementations:
  * Spatial descriptor order is [average; max] as in the paper's Eq. 3 (and timm); the official code
    concatenates [max; mean]. The order only permutes the 7x7 kernel's input channels.
  * The shared MLP has biases (official code uses nn.Linear); the paper's count for CBAM-ResNet-50 (28.09M)
    includes them. timm's CbamModule defaults to mlp_bias=False: pass bias=False for that variant.
  * The 7x7 conv has no bias and is followed by BatchNorm (official code and timm; the paper does not
    mention the BN).
  * Hidden width C // r (at least 1), the paper's; timm's rd_divisor=1 gives the same.
"""
import torch
import torch.nn as nn

from ..errors import check_bool, check_int
from .gates import show_gate
from .registry import register


class ChannelGate(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, bias: bool = True):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias)

    def mlp(self, v):
        return self.fc2(self.act(self.fc1(v)))

    def forward(self, x):
        logits = self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True))
        gate = logits.sigmoid()
        show_gate(self, "channel", gate)
        return x * gate


class SpatialGate(nn.Module):
    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x):
        # The [mean; max] descriptor is not bound to a name, so it is freed as soon as the conv has run.
        logits = self.conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1))
        gate = self.bn(logits).sigmoid()
        show_gate(self, "spatial", gate)
        return x * gate


@register("cbam")
class CBAM(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, bias: bool = True):
        super().__init__()
        check_int("reduction", reduction)
        check_int("kernel_size", kernel_size, odd=True)  # odd keeps the map's size with padding k // 2
        check_bool("bias", bias)
        self.channel = ChannelGate(channels, reduction, bias)
        self.spatial = SpatialGate(kernel_size)

    def forward(self, x):
        return self.spatial(self.channel(x))
