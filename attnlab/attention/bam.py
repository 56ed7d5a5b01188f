"""BAM: Bottleneck Attention Module (Park, Woo, Lee, Kweon; BMVC 2018, arXiv 1807.06514).

A channel and a spatial branch, added (broadcast to C x H x W) and turned into a residual gate:
  M_c = W_c1 ReLU(BN(W_c0 GAP(x)))                           MLP C -> C/r -> C (with biases), BN1d on the hidden
  M_s = conv1x1(ReLU(BN(d3x3(ReLU(BN(d3x3(ReLU(BN(conv1x1(x))))))))))
        1x1 C -> C/r, two 3x3 convs of dilation d on C/r channels, 1x1 C/r -> 1, each but the last with BN + ReLU
  output x * (1 + sigmoid(M_c + M_s))

Defaults as the paper and the official code (``Jongchan/attention-module``, ``MODELS/bam.py``): r = 16,
d = 4, two dilated convs, every conv and linear with a bias.

Paper, official code and timm:
  * The paper's Eq. 1 adds the branches (M_c + M_s) before the sigmoid; the released code multiplies them
    (``channel_att * spatial_att``). ``combine="add"`` (default) is the paper's, ``combine="mul"`` the code's.
  * The paper places BAM once per stage, on the stage's output (after the addition) between stages 1-3; here
    it sits in the residual slot, so ``blocks`` chooses where, e.g. the last block of each of the first three
    stages for ResNet-50: ``blocks="001-0001-000001-000"`` (on the branch, not on the sum).
  * The code pools with avg_pool2d(kernel=H), a global pool only for square maps; ours is global at any size.
  * The channel MLP's BatchNorm1d needs more than one sample per batch in training mode, as the official code.
  * timm has no BAM.
Shown to ``attnlab show`` (attention/gates.py): the combined gate 1 + sigmoid(M_c + M_s) (or of M_c * M_s), a "full"
gate in (1, 2); the two branches are not gates on their own (neither multiplies x before they are combined).
"""
import torch.nn as nn

from ..errors import check_int
from .gates import show_gate
from .registry import register


@register("bam")
class BAM(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4, num_dilated: int = 2,
                 combine: str = "add"):
        super().__init__()
        check_int("reduction", reduction)
        check_int("dilation", dilation)
        check_int("num_dilated", num_dilated, minimum=0)
        if combine not in ("add", "mul"):
            raise ValueError(f"combine must be 'add' or 'mul', got {combine!r}")
        self.combine = combine
        hidden = max(1, channels // reduction)
        self.channel = nn.Sequential(nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, channels))
        layers = [nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
        for _ in range(num_dilated):
            layers += [nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation), nn.BatchNorm2d(hidden),
                       nn.ReLU(inplace=True)]
        self.spatial = nn.Sequential(*layers, nn.Conv2d(hidden, 1, 1))

    def forward(self, x):
        b, c = x.shape[:2]
        m_c = self.channel(x.mean((2, 3))).view(b, c, 1, 1)
        m_s = self.spatial(x)
        m = m_c + m_s if self.combine == "add" else m_c * m_s
        gate = 1 + m.sigmoid()
        show_gate(self, "full", gate)
        return x * gate
