"""FcaNet: multi-spectral channel attention (Qin, Zhang, Wu, Li; ICCV 2021, arXiv 2012.11879).

SE with the global average pool generalised to 2-D DCT coefficients: the C channels are split into n equal groups,
group i is pooled with the DCT basis function of frequency (u_i, v_i) on a k x k grid,
  y_c = sum_{h,w} x_c[h, w] * B_{u_i}(h) * B_{v_i}(w),   B_u(t) = cos(pi u (t + 1/2) / k) / sqrt(k) * (sqrt(2) if u)
then s = sigmoid(W2 ReLU(W1 y)) (C -> C/r -> C, no biases) and the output is x * s. Frequency (0, 0) is
sqrt(k^2) times GAP, so ``freq="top1"`` is SE without biases up to that scale.

Defaults as the paper and the official code (``cfzd/FcaNet``, ``model/layer.py``): r = 16, ``freq="top16"`` (the
16 best single frequencies of the paper's 7x7 ranking), maps of another size adaptively average-pooled to k x k.

Paper, official code and timm:
  * The official ImageNet models use k = the stage's map size at 224 (56, 28, 14, 7) with the 7x7 frequencies scaled
    by k/7, keyed by the block's width; ``dct_size`` (default 7) is one k for every stage here, so maps of any size
    (CIFAR's 32/16/8 too) are pooled to 7x7 first. ``dct_size=14`` with 14x14 maps is the official third stage.
  * The DCT basis is a fixed buffer, not a parameter: 2C^2/r parameters, SE's without its biases (the paper's
    FcaNet-50, 28.07M).
  * channels must be divisible by the number of frequencies (as the official code asserts). timm has no FcaNet.
Shown to ``attnlab show`` (attention/gates.py): the channel gate s.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import check_int
from .gates import show_gate
from .registry import register

# The paper's ranking of the 7x7 DCT frequencies by single-frequency ImageNet accuracy (first 16): (u along H,
# v along W).
TOP_FREQUENCIES = [(0, 0), (0, 1), (6, 0), (0, 5), (0, 2), (1, 0), (1, 2), (4, 0),
                   (5, 0), (1, 6), (3, 0), (0, 4), (0, 6), (0, 3), (3, 5), (2, 2)]
FREQ_CHOICES = ("top1", "top2", "top4", "top8", "top16")


def dct_basis(u: int, k: int) -> torch.Tensor:
    """The orthonormal 1-D DCT-II basis vector of frequency u on k points."""
    t = torch.arange(k, dtype=torch.float64)
    b = torch.cos(math.pi * u * (t + 0.5) / k) / math.sqrt(k)
    return (b * math.sqrt(2) if u else b).float()


def dct_filters(channels: int, frequencies, k: int) -> torch.Tensor:
    """(C, k, k): channel group i holds the 2-D basis of frequencies[i], groups of C / n consecutive channels."""
    part = channels // len(frequencies)
    out = torch.empty(channels, k, k)
    for i, (u, v) in enumerate(frequencies):
        out[i * part:(i + 1) * part] = torch.outer(dct_basis(u, k), dct_basis(v, k))
    return out


@register("fca")
class FcaAttention(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, freq: str = "top16", dct_size: int = 7):
        super().__init__()
        check_int("reduction", reduction)
        check_int("dct_size", dct_size)
        if freq not in FREQ_CHOICES:
            raise ValueError(f"freq must be one of {', '.join(FREQ_CHOICES)}, got {freq!r}")
        n = int(freq[3:])
        if channels % n:
            raise ValueError(f"channels ({channels}) must be divisible by the {n} frequencies of freq={freq!r}")
        scale = dct_size // 7 if dct_size >= 7 else 1
        freqs = [(u * scale, v * scale) for u, v in TOP_FREQUENCIES[:n]]
        if max(max(f) for f in freqs) >= dct_size:
            raise ValueError(f"dct_size={dct_size} is too small for the frequencies of freq={freq!r} (need >= 7)")
        self.dct_size = dct_size
        self.register_buffer("dct", dct_filters(channels, freqs, dct_size), persistent=False)
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x):
        k = self.dct_size
        pooled = x if x.shape[2:] == (k, k) else F.adaptive_avg_pool2d(x, k)
        y = (pooled * self.dct.to(pooled.dtype)).sum((2, 3), keepdim=True)
        gate = self.fc2(self.act(self.fc1(y))).sigmoid()
        show_gate(self, "channel", gate)
        return x * gate
