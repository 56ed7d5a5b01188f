"""GC: the global context block of GCNet (Cao, Xu, Lin, Wei, Hu; ICCVW 2019 / TPAMI 2020, arXiv 1904.11492).

Context modelling, then a bottleneck transform, then fusion:
  w = softmax_{HW}(W_k x)              W_k: 1x1 conv C -> 1 (with bias), softmax over all positions
  c = sum_j w_j x_j                     (B, C, 1, 1), attention pooling
  t = W_v2 ReLU(LN(W_v1 c))             W_v1: C -> C/r, LayerNorm over the C/r channels, W_v2: C/r -> C (with biases)
  fusion "add" (default): x + t;  "scale": x * sigmoid(t);  "both": one transform each, (x * sigmoid(t_s)) + t_a

Defaults from the paper and the official code (``xvjiarui/GCNet``, ``mmdet/ops/gcb/context_block.py``): r = 16
(the paper's choice, ``ratio=1/16`` in its configs), attention pooling, add fusion; W_k kaiming (fan_in) and the
add transform's last conv zero-initialised, so the block starts as the identity. ``init_weights()`` re-applies
this after the model's own init. ``pooling="avg"`` replaces the attention pooling by global average pooling.

Paper, official code and timm (``timm.layers.GlobalContext``; ``timm:gc`` / ``timm:gca`` here):
  * Hidden width: official int(C / 16) (at least 1 here); timm's default is C / 8.
  * timm's ``gc`` kind is scale fusion; its ``gca`` kind is the paper's add fusion. timm zero-inits the add
    transform's last conv but not the scale one's, as the official code.
  * LayerNorm: the official LN([C/r, 1, 1]) (eps 1e-5) and timm's channel LayerNorm2d (eps 1e-6) normalise the same
    C/r values with one affine per channel; here the same, eps 1e-5. Weights map one to one onto timm's. With
    C/r = 1 (C = 16 at r = 16, as in CIFAR ResNets' first stage) the normalised value is 0 and t is constant, as in
    the official code.
  * The official code places the block after the residual branch's last BN (``gcb`` in ResNet stages c3-c5);
    placement is ``blocks`` here (every block by default).
Shown to ``attnlab show`` (attention/gates.py): the scale fusion's channel gate sigmoid(t_s) ("scale", "both"). The
default add fusion multiplies x by nothing (x + t adds a per-channel term), so it shows nothing; nor are the
attention-pooling weights w a gate (they weigh the context, not x).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import check_int
from .gates import show_gate
from .registry import register

FUSIONS = ("add", "scale", "both")


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, 1, 1) tensor, one affine per channel (any batch size, even C = 1)."""

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        # The normalised shape from the weight, not from x: a traced x.shape is a graph op the legacy ONNX exporter
        # cannot export (a Gather on the shape), a parameter's shape is a constant.
        return F.layer_norm(x.flatten(1), self.weight.shape, self.weight, self.bias, self.eps).view_as(x)


class Transform(nn.Sequential):
    def __init__(self, channels, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.norm = ChannelNorm(hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)


@register("gc")
class GlobalContext(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, fusion: str = "add", pooling: str = "att"):
        super().__init__()
        check_int("reduction", reduction)
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        if pooling not in ("att", "avg"):
            raise ValueError(f"pooling must be 'att' or 'avg', got {pooling!r}")
        hidden = max(1, channels // reduction)
        self.conv_mask = nn.Conv2d(channels, 1, 1) if pooling == "att" else None
        self.add = Transform(channels, hidden) if fusion in ("add", "both") else None
        self.scale = Transform(channels, hidden) if fusion in ("scale", "both") else None
        self.init_weights()

    def init_weights(self):
        if self.conv_mask is not None:
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)
        if self.add is not None:
            nn.init.zeros_(self.add.fc2.weight)
            nn.init.zeros_(self.add.fc2.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        if self.conv_mask is None:
            context = x.mean((2, 3), keepdim=True)
        else:
            weights = self.conv_mask(x).view(b, 1, h * w).softmax(-1)  # (B, 1, HW)
            context = torch.bmm(x.reshape(b, c, h * w), weights.transpose(1, 2)).view(b, c, 1, 1)
        out = x
        if self.scale is not None:
            gate = self.scale(context).sigmoid()
            show_gate(self, "channel", gate)
            out = out * gate
        if self.add is not None:
            out = out + self.add(context)
        return out
