"""Residual blocks with one attention slot.

The slot (``self.attn``) sits on the residual branch after its last BatchNorm and before the addition, the
SE/CBAM/ECA/SPEM/DIA position. An empty slot is ``nn.Identity`` and adds no parameters or state_dict keys, so
the blocks' keys equal torchvision's. A module that must re-run part of the block itself (TDAM) sets
``wraps_block = True`` and provides ``forward_block(block, x)``; the block then hands its whole forward to it.
A module its stage shares among its blocks (``shared=True``) is owned by the stage (``layerN.shared_attn``); the
block only holds a plain reference to it, so the module is registered, saved and moved once.
"""
import torch.nn as nn
import torch.nn.functional as F


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """He et al.'s option A: the identity, subsampled by the stride, with zero channels appended. No parameters.

    Their CIFAR ResNets use it ("identity shortcuts in all cases"), which gives Table 6's 0.27M/0.85M/1.7M.
    """

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


def projection(cin, cout, stride, kind="B"):
    """The shortcut where the shape changes: 1x1 conv + BN (option B, torchvision's `downsample`) or option A."""
    if stride == 1 and cin == cout:
        return None
    if kind == "A":
        return PadShortcut(cin, cout, stride)
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


class Block(nn.Module):
    """What both block types share: the slot, the shortcut and the final ReLU."""
    expansion = 1
    shortcut_kind = "B"  # see projection(); CifarBasicBlock uses "A"
    connected = True  # set per block by models.connections.set_connections; a class default keeps state_dict as is

    def __init__(self, inplanes, planes, stride, attn, shared=False):
        super().__init__()
        self.downsample = projection(inplanes, planes * self.expansion, stride, self.shortcut_kind)
        if attn is not None and shared:
            object.__setattr__(self, "attn", attn)  # the stage's module: a reference, not a child of this block
        else:
            self.attn = attn if attn is not None else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    @property
    def out_channels(self):
        return self.last_bn.num_features

    def shortcut(self, x):
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x):
        if not self.connected:  # a 0 bit of a run-time connection mask (models/connections.py): no module call
            out = self.branch(x)
        elif getattr(self.attn, "wraps_block", False):
            return self.attn.forward_block(self, x)
        else:
            out = self.attn(self.branch(x))
        out += self.shortcut(x)  # in place, as torchvision and timm: one block-sized tensor less alive
        return self.relu(out)


class BasicBlock(Block):
    """3x3 -> 3x3 (ResNet-18/34, CIFAR ResNet-20..110)."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, attn=None, shared=False):
        super().__init__(inplanes, planes, stride, attn, shared)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)

    @property
    def last_bn(self):
        return self.bn2

    def branch(self, x):
        # One layer per statement: rebinding `out` frees each conv's input as soon as the conv has run
        # (nested calls kept it alive through BN and ReLU too: ResNet-50 had 8% more peak activation memory
        # than torchvision's and its blocks ran ~8% slower on CPU, from the allocator's extra page faults).
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        return self.bn2(out)


class CifarBasicBlock(BasicBlock):
    """BasicBlock with the parameter-free option-A shortcut of He et al.'s CIFAR ResNet-20..110."""
    shortcut_kind = "A"


class Bottleneck(Block):
    """1x1 -> 3x3 (stride here, torchvision's v1.5) -> 1x1 expanding by 4 (ResNet-50/101, ResNet-164)."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, attn=None, shared=False):
        super().__init__(inplanes, planes, stride, attn, shared)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)

    @property
    def last_bn(self):
        return self.bn3

    def branch(self, x):
        out = self.relu(self.bn1(self.conv1(x)))  # see BasicBlock.branch: one conv per statement
        out = self.conv2(out)
        out = self.relu(self.bn2(out))
        out = self.conv3(out)
        return self.bn3(out)
