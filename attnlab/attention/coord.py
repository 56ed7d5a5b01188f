"""Coordinate Attention (Hou, Zhou, Feng; CVPR 2021, arXiv 2103.02907).

Channel attention factorised along the two spatial directions:
  z_h = mean over W (B, C, H, 1), z_w = mean over H (B, C, W, 1, transposed)
  f = h_swish(BN(W_1 [z_h; z_w]))         shared 1x1 conv C -> m on the concatenation along the spatial axis
  g_h = sigmoid(W_h f_h) (B, C, H, 1), g_w = sigmoid(W_w f_w) (B, C, 1, W)       W_h, W_w: m -> C
  output x * g_h * g_w

Defaults as the official code (``houqb/CoordAttention``, ``coordatt.py``): m = max(8, C // 32) (``reduction=32``,
``min_hidden=8``), 1x1 convs with biases, BatchNorm, hard-swish.

Paper, official code and timm (``timm.layers.CoordAttn``, ``timm:coord`` here):
  * timm: m = C * 1/16 * 2/3 rounded to a multiple of 8, convs without bias. ``tests/test_cnn_modules.py``
    builds timm's with the official width and biases and copies the weights.
  * The paper evaluates it in MobileNetV2/MobileNeXt; in a ResNet block the slot is after the last BN, as for SE.
Shown to ``attnlab show`` (attention/gates.py): g_h as a "channel-height" gate and g_w as a "channel-width" gate.
"""
import torch
import torch.nn as nn

from ..errors import check_int
from .gates import show_gate
from .registry import register


@register("coord")
class CoordAttention(nn.Module):
    def __init__(self, channels: int, reduction: int = 32, min_hidden: int = 8):
        super().__init__()
        check_int("reduction", reduction)
        check_int("min_hidden", min_hidden)
        hidden = max(min_hidden, channels // reduction)
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act = nn.Hardswish()
        self.conv_h = nn.Conv2d(hidden, channels, 1)
        self.conv_w = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        h, w = x.shape[2:]
        pooled = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], dim=2)
        f = self.act(self.bn1(self.conv1(pooled)))
        f_h, f_w = torch.split(f, [h, w], dim=2)
        g_h = self.conv_h(f_h).sigmoid()                    # (B, C, H, 1)
        g_w = self.conv_w(f_w.transpose(2, 3)).sigmoid()    # (B, C, 1, W)
        show_gate(self, "channel-height", g_h)
        show_gate(self, "channel-width", g_w)
        return x * g_h * g_w
