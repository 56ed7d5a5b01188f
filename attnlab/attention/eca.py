"""ECA: Efficient Channel Attention (Wang et al., CVPR 2020, arXiv 1910.03151).

y = GAP(x) (B, 1, C); a 1-D conv of size k across channels (no bias); output x * sigmoid(y).
Adaptive kernel (paper Eq. 12): k = |log2(C)/gamma + b/gamma|_odd, gamma = 2, b = 1, the nearest odd number,
ties rounded up (as the official code's int(), +1-if-even does).

Paper vs implementations: timm clamps k to at least 3; the paper does not, which only differs for C < 8
(not in any of our backbones). Pass ``kernel_size`` to fix k instead of deriving it from C.
"""
import math

import torch.nn as nn

from ..errors import check_int
from .gates import show_gate
from .registry import register


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    t = int(abs((math.log2(channels) + beta) / gamma))
    return t if t % 2 else t + 1


@register("eca")
class ECA(nn.Module):
    def __init__(self, channels: int, kernel_size: int | None = None, gamma: float = 2, beta: float = 1):
        super().__init__()
        if kernel_size is not None:
            check_int("kernel_size", kernel_size, odd=True)  # odd keeps C outputs with padding (k - 1) // 2
        elif isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < math.inf or \
                isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
            raise ValueError(f"gamma must be a finite number > 0 and beta a finite number, got gamma={gamma!r}, "
                             f"beta={beta!r}")
        k = kernel_size if kernel_size is not None else eca_kernel_size(channels, gamma, beta)
        self.kernel_size = k
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x):
        b, c = x.shape[:2]
        y = self.conv(x.mean((2, 3)).view(b, 1, c))
        gate = y.view(b, c, 1, 1).sigmoid()
        show_gate(self, "channel", gate)
        return x * gate
