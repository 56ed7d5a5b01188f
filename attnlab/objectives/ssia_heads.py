"""SSIA's training-only modules: they exist while training and are never part of the model or its state_dict.

The engine puts an objective's ``module`` in the optimiser, moves it with the model and saves it in
checkpoint_last.pt (for an exact resume), but never in the model weights that evaluation and export load.

    AttnBlock      an attnlab.attention module (SE, CBAM's channel or spatial gate) that exposes its weights
    ClassHead      global average pooling + linear classifier
    DistillHead    conv3x3 (strided down to the last stage's size) + BN + ReLU, then a ClassHead (BYOT's shallow head)
    gated(model, gates)   a context in which each stage's output is multiplied by its gate (forward hooks), with the
                   model's BatchNorm running statistics left untouched
"""
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention.cbam import ChannelGate, SpatialGate
from ..attention.se import SE
from ..errors import AttnlabError

BLOCKS = ("se", "cbam_channel", "cbam_spatial")


class AttnBlock(nn.Module):
    """Attention weights of an existing module: (B, C, 1, 1) for ``se`` and ``cbam_channel``, (B, 1, H, W) for
    ``cbam_spatial``. ``forward`` gates its input with them, as the module does inside a block."""

    def __init__(self, kind: str, channels: int):
        super().__init__()
        self.kind = kind
        self.spatial = kind == "cbam_spatial"
        self.gate = {"se": lambda: SE(channels), "cbam_channel": lambda: ChannelGate(channels, 16),
                     "cbam_spatial": lambda: SpatialGate(7)}[kind]()

    def weights(self, x):
        g = self.gate
        if self.kind == "se":
            return g.fc2(g.act(g.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()
        if self.kind == "cbam_channel":
            return (g.mlp(x.mean((2, 3), keepdim=True)) + g.mlp(x.amax((2, 3), keepdim=True))).sigmoid()
        return g.bn(g.conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1))).sigmoid()

    def forward(self, x):
        return x * self.weights(x)


class ClassHead(nn.Module):
    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class DistillHead(nn.Module):
    """A lower stage's feature -> (a feature shaped like the last stage's, logits)."""

    def __init__(self, cin: int, cout: int, stride: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.head = ClassHead(cout, num_classes)

    def forward(self, x, size):
        h = F.relu(self.bn(self.conv(x)))
        if tuple(h.shape[-2:]) != tuple(size):
            h = F.adaptive_avg_pool2d(h, size)
        return h, self.head(h)


def stage_shapes(model) -> list[tuple[int, int, int]]:
    """(C, H, W) of each stage output for a 64x64 input (eval mode, no gradient; the model's mode comes back)."""
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, feats = model(torch.zeros(1, 3, 64, 64, device=param.device, dtype=param.dtype), features="stages")
    finally:
        model.train(was_training)
    return [tuple(f.shape[1:]) for f in feats["stages"]]


def num_classes_of(model) -> int:
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise AttnlabError("ssia: this design needs a model with a linear classifier `fc` after global pooling")
    return fc.out_features


@contextmanager
def gated(model, gates):
    """Within the context, stage l's output is ``gates[l](output)`` and BatchNorm layers normalise with the batch's
    statistics without updating their running ones (the deployed model's statistics stay the student's)."""
    stages = model.stages()
    if len(stages) != len(gates):
        raise AttnlabError(f"ssia teacher: {len(gates)} gates for {len(stages)} stages")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    handles = [s.register_forward_hook(lambda mod, inp, out, g=g: g(out)) for s, g in zip(stages, gates)]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in bns:
            m.track_running_stats = True


def init_forked(build, seed_offset: int = 1):
    """``build()`` under a forked CPU RNG seeded from the run's seed, so creating training-only modules draws no
    numbers from the global stream: the model and data see exactly what a run without them sees."""
    seed = torch.initial_seed() + seed_offset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
