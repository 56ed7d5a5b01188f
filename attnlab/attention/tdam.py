"""TDAM: Top-Down Attention Module (Jaiswal, Fernando, Tan; ECCV 2022, arXiv 2111.13470).

Inside one residual block, the "top" feature X^N (the last conv's output after its BN) sends a searchlight S
back to a "bottom" feature X^0 (the input of the last m layers), and those m layers are re-run on the
modulated bottom:
  searchlight (B, C_bottom, 1, 1), bias-free 1x1 convs, hidden r = max(1, C_top // reduction) in every branch:
    TDjoint ("joint", default): S = W_s [ReLU(W_t GAP(X^N)); ReLU(W_b GAP(X^0))]      (2r -> C_bottom)
    TDtop   ("top"):            S = W_s ReLU(W_t GAP(X^N))                             (r -> C_bottom)
  channel:  X' = X^0 * sigmoid(S)
  spatial:  A = sum_c S[c] X'[c]   (a per-sample 1x1 conv with the RAW searchlight), X^0 <- X' * sigmoid(A)
T computation steps (``time_steps``, default 2): step 0 is the block's ordinary forward; each later step re-runs
the last m layers on the bottom modulated by the previous step's searchlight, with the same convs and a separate
BatchNorm per step (``bn{k}_{t}``, owned by this module, so saved as ``layerN.M.attn.bn3_1.*``; ``step_bn=False``
reuses the block's BNs). Only the last step's output is used; the shortcut takes the unmodulated block input.
Feedback distance m: bottleneck 0..3, basic 0..2 (m=1, default: bottom = input of the last conv; m = number of
convs: bottom = block input, the whole branch is re-run). m=0 has no re-run: the branch output is its own top and
bottom and is modulated by itself T times (the official ``_static_recur_attention_forward_m0`` loops over all T
steps, unlike m >= 1, whose step 0 is the plain forward and which therefore modulates T-1 times).

Placement: ``default_stages = [-2, -1]`` (the official code's layer3 + layer4); change it with ``blocks``.
The module needs the block's inner widths, so the model calls ``attach(block)`` right after building the block;
the parameters therefore exist before the optimizer. Init: the model's kaiming-normal (fan_out) init covers the
1x1 convs, per-step BNs start at gamma=1, beta=0 (also with zero_init_residual, as in the official code). The
official TDAM ResNets zero the last BN of every residual branch (timm's zero_init_last_bn=True, their default);
attnlab's default is off, so pass zero_init_residual=True to match them (configs/imagenet_resnet50_tdam.yaml does).

Differences from the official code (shantanuj/TDAM_Top_down_attention_module, timm_td_resnet.py / modules.py):
  * r is at least 1 (the official C_top // 16 would be 0 for CIFAR widths below 16);
  * only average pooling and the concat/top searchlights (no max/learned pooling, no 'bilinear' sum variant);
  * ``order`` offers the ablation's orders: 'channel->spatial' (default), 'spatial->channel', 'channel', 'spatial';
  * accuracy is plain single-output top-1; the official evaluation's "any step correct" top-1 is
    ``eval.tdam_any_step`` (attnlab/engine/evaluate.py), without its IoU merge of steps whose CAM boxes overlap.
"""
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..errors import AttnlabError, check_bool, check_int
from .gates import show_gate
from .registry import register

SEARCHLIGHTS = ("joint", "top")
ORDERS = ("channel->spatial", "spatial->channel", "channel", "spatial")


def branch_layers(block):
    """[(conv, bn), ...] of a residual branch: conv1/bn1, conv2/bn2 (, conv3/bn3); a ReLU follows all but the last."""
    layers = []
    for k in (1, 2, 3):
        conv, bn = getattr(block, f"conv{k}", None), getattr(block, f"bn{k}", None)
        if conv is None:
            break
        layers.append((conv, bn))
    if not layers:
        raise AttnlabError(f"attention 'tdam' needs a residual block with conv1/bn1..., got {type(block).__name__}")
    return layers


@register("tdam")
class TDAM(nn.Module):
    wraps_block = True
    default_stages = [-2, -1]

    def __init__(self, channels: int, reduction: int = 16, time_steps: int = 2, m: int = 1,
                 searchlight: str = "joint", order: str = "channel->spatial", step_bn: bool = True):
        super().__init__()
        if searchlight not in SEARCHLIGHTS:
            raise AttnlabError(f"attention 'tdam': unknown searchlight '{searchlight}'; "
                               f"valid choices: {', '.join(SEARCHLIGHTS)}")
        if order not in ORDERS:
            raise AttnlabError(f"attention 'tdam': unknown order '{order}'; valid choices: {', '.join(ORDERS)}")
        check_int("time_steps", time_steps)  # 1.5 must not become 1 (T = 1 is the plain block) unnoticed
        check_int("reduction", reduction)
        if check_int("m", m, minimum=0) > 3:
            raise AttnlabError(f"attention 'tdam': m must be 0..3 (bottleneck) or 0..2 (basic block), got {m}")
        self.channels = channels  # C_top: the block's output width
        self.reduction = reduction
        self.time_steps = time_steps
        self.m = m
        self.searchlight_kind = searchlight
        self.order = order
        self.step_bn = check_bool("step_bn", step_bn)
        self.attached = False

    def attach(self, block):
        """Create the searchlight convs and per-step BNs for ``block`` (called once by the model)."""
        if self.attached:
            raise AttnlabError("attention 'tdam': this module is already attached to a block")
        layers = branch_layers(block)
        n = len(layers)
        if self.m > n:
            raise AttnlabError(f"attention 'tdam': m={self.m} is out of range for {type(block).__name__} "
                               f"(its branch has {n} convs: m in 0..{n})")
        c_top = layers[-1][0].out_channels
        if c_top != self.channels:
            raise AttnlabError(f"attention 'tdam' was built for {self.channels} channels but the block outputs {c_top}")
        c_bottom = c_top if self.m == 0 else layers[n - self.m][0].in_channels
        r = max(1, c_top // self.reduction)
        self.w_top = nn.Conv2d(c_top, r, 1, bias=False)
        if self.searchlight_kind == "joint":
            self.w_bottom = nn.Conv2d(c_bottom, r, 1, bias=False)
        self.w_s = nn.Conv2d(r * (2 if self.searchlight_kind == "joint" else 1), c_bottom, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        if self.step_bn and self.m > 0:
            for t in range(1, self.time_steps):
                for k in range(n - self.m, n):
                    self.add_module(f"bn{k + 1}_{t}", nn.BatchNorm2d(layers[k][1].num_features))
        self.c_bottom = c_bottom
        self.attached = True

    def searchlight(self, top, bottom):
        """S (B, C_bottom, 1, 1), raw (no nonlinearity)."""
        h = self.relu(self.w_top(top.mean((2, 3), keepdim=True)))
        if self.searchlight_kind == "joint":
            h = torch.cat([h, self.relu(self.w_bottom(bottom.mean((2, 3), keepdim=True)))], dim=1)
        return self.w_s(h)

    @staticmethod
    def _channel(x, s):
        return x * torch.sigmoid(s)

    def _spatial(self, x, s):
        gate = torch.sigmoid((s * x).sum(1, keepdim=True))
        show_gate(self, "spatial", gate)
        return x * gate

    def modulate(self, bottom, top):
        """One top-down modulation of ``bottom`` by the searchlight computed from (top, bottom)."""
        s = self.searchlight(top, bottom)
        show_gate(self, "channel", lambda: torch.sigmoid(s))  # the searchlight's channel gate, in every order
        if self.order == "channel->spatial":
            return self._spatial(self._channel(bottom, s), s)
        if self.order == "spatial->channel":
            return self._channel(self._spatial(bottom, s), s)
        if self.order == "channel":
            return self._channel(bottom, s)
        return self._spatial(bottom, s)

    def forward_block(self, block, x):
        if not self.attached:
            raise AttnlabError("attention 'tdam' was not attached to its block (build models with create_model)")
        layers = branch_layers(block)
        n = len(layers)
        first = n - self.m  # index of the first re-run layer
        out = x
        for k in range(first):  # the layers below the bottom run once
            conv, bn = layers[k]
            out = bn(conv(out))
            if k < n - 1:
                out = block.relu(out)
        if self.m == 0:  # no re-run: every one of the T steps modulates the branch output by itself (official)
            for t in range(self.time_steps):
                out = self.modulate(out, out)
        else:
            bottom = out
            for t in range(self.time_steps):
                out = bottom
                for k in range(first, n):
                    conv, bn = layers[k]
                    if t > 0 and self.step_bn:
                        bn = getattr(self, f"bn{k + 1}_{t}")
                    out = bn(conv(out))
                    if k < n - 1:
                        out = block.relu(out)
                if t < self.time_steps - 1:
                    bottom = self.modulate(bottom, out)
        return block.relu(out + block.shortcut(x))

    def forward(self, x):
        raise AttnlabError("attention 'tdam' re-runs its block, so it works only in attnlab's models "
                           "(attnlab.create_model), not as a plain attn_layer (e.g. timm's): the block must call "
                           "forward_block(block, x)")

    def extra_repr(self):
        return (f"channels={self.channels}, searchlight={self.searchlight_kind}, time_steps={self.time_steps}, "
                f"m={self.m}, reduction={self.reduction}, order={self.order}")


def stage_tdams(stage) -> list:
    """The TDAM modules of a stage's blocks, in block order (CAM per step, the any-step evaluation)."""
    return [b.attn for b in stage if getattr(b.attn, "registry_name", None) == "tdam"]


@contextmanager
def tdam_steps(modules, t: int):
    """Run ``modules`` with ``time_steps = t`` (restored afterwards, also after an error)."""
    saved = [m.time_steps for m in modules]
    try:
        for m in modules:
            m.time_steps = t
        yield
    finally:
        for m, s in zip(modules, saved):
            m.time_steps = s
