"""Triplet attention (Misra, Nalamada, Arasanipalai, Hou; WACV 2021, arXiv 2010.03045).

Three branches, each a spatial-attention gate on a rotated view of the tensor; the results are averaged:
  gate(v) = v * sigmoid(BN(conv_kxk(Z(v))))     Z = [max; mean] over v's first axis, conv 2 -> 1 without bias
  branch C-W: rotate so H is the pooled axis (gate over (C, W));  branch H-C: W pooled (gate over (H, C));
  branch H-W: C pooled (gate over (H, W), CBAM's spatial gate)
  output (branch_hw + branch_cw + branch_hc) / 3      (``no_spatial=True``: the first two only, / 2)

Defaults as the official code (``landskape-ai/triplet-attention``, ``MODELS/triplet_attention.py``): k = 7,
Z = [max; mean], BN with momentum 0.01 (PyTorch's convention; the official BasicConv's), no ReLU after the BN.
3 * (2 k^2 + 2) = 300 parameters per module whatever C is: ResNet-50 gets 16 * 300 = 4,800 more (the paper's Table
2: 25.56M params for Triplet-ResNet-50, "+4.8K").

Paper, official code and timm: the paper's Fig. 3 draws the pooling as [max; avg]; the code agrees. The official
ResNets put the module after the branch's last BN, the slot used here. timm has no triplet attention.

Shown to ``attnlab show`` (attention/gates.py): each branch's gate, rotated back to (B, C, H, W): C-W's as a
"channel-width" gate, H-C's as "channel-height", H-W's as "spatial"; the output is x times their mean.
"""
import torch
import torch.nn as nn

from ..errors import check_bool, check_int
from .gates import show_gate
from .registry import register


class ZGate(nn.Module):
    """Spatial gate over the last two axes of (B, D, P, Q), pooling axis 1 into [max; mean]: returns the gate
    (B, 1, P, Q) that multiplies v."""

    def __init__(self, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, v):
        z = torch.cat([v.amax(1, keepdim=True), v.mean(1, keepdim=True)], dim=1)
        return self.bn(self.conv(z)).sigmoid()


@register("triplet")
class TripletAttention(nn.Module):
    def __init__(self, channels: int = 0, kernel_size: int = 7, no_spatial: bool = False):
        super().__init__()
        check_int("kernel_size", kernel_size, odd=True)
        check_bool("no_spatial", no_spatial)
        self.cw = ZGate(kernel_size)
        self.hc = ZGate(kernel_size)
        self.hw = None if no_spatial else ZGate(kernel_size)

    def forward(self, x):
        g_cw = self.cw(x.transpose(1, 2)).transpose(1, 2)          # of (B, H, C, W): H pooled; (B, C, 1, W)
        g_hc = self.hc(x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)  # of (B, W, H, C): W pooled; (B, C, H, 1)
        show_gate(self, "channel-width", g_cw)
        show_gate(self, "channel-height", g_hc)
        if self.hw is None:
            return (x * g_cw + x * g_hc) / 2
        g_hw = self.hw(x)                                          # C pooled; (B, 1, H, W)
        show_gate(self, "spatial", g_hw)
        return (x * g_hw + x * g_cw + x * g_hc) / 3
