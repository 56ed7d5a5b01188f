"""ResNets with an attention slot in every residual block.

Three families share one definition:
  * ImageNet ResNets (resnet18/34/50/101): torchvision's layout and state_dict keys;
  * CIFAR ResNets of He et al. 2016 (resnet20/32/56/110 basic, resnet164 bottleneck): 3x3 stem of 16 channels,
    three stages; the basic ones use the paper's parameter-free option-A shortcuts, resnet164 1x1 projections;
  * CIFAR-stem ResNets (cifar_resnet18/34/50): ImageNet stages with a 3x3 stride-1 stem and no max-pool.

``forward(x)`` returns logits. ``forward(x, features="stages")`` also returns the hierarchical features
{"stem", "stages", "blocks"} (and ``features="blocks"`` each block's (input, output) pair); CAM and the SSIA
objective read them without any change to the model.
"""
import operator

import torch
import torch.nn as nn

from .. import attention as registry
from ..errors import AttnlabError, check_flag
from .blocks import BasicBlock, Bottleneck
from .placement import resolve_blocks


class Stage(nn.Module):
    """The blocks of one resolution and the attention module they share, if any.

    Children: the blocks as ``"0"``, ``"1"``, ... (torchvision's ``layerN.M.*`` keys) and, when the stage shares
    one module among its blocks, ``shared_attn`` (saved, counted, moved and copied once, as ``layerN.shared_attn.*``;
    these keys are the same as before the stage became a plain module, so older checkpoints load strictly).
    The blocks using it hold a plain reference to it (``Block(..., shared=True)``), not a second registration.
    A stage is a sequence of its blocks: ``len(stage)``, ``stage[j]`` and iteration cover the blocks only.
    """

    def __init__(self, blocks, shared_attn=None):
        super().__init__()
        self.depth = len(blocks)
        for j, block in enumerate(blocks):
            self.add_module(str(j), block)
        self.shared_attn = shared_attn  # registered after the blocks: the order of modules() and state_dict()

    def __setstate__(self, state):
        super().__setstate__(state)
        if "depth" not in self.__dict__:  # a whole model pickled by the older Stage, an nn.Sequential of its blocks
            self.depth = sum(name.isdigit() for name in self._modules)
            if "shared_attn" not in self._modules:
                self.shared_attn = None

    def __len__(self):
        return self.depth

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(self.depth)[j]]
        j = operator.index(j)
        if not -self.depth <= j < self.depth:
            raise IndexError(f"stage has {self.depth} blocks, got index {j}")
        return self._modules[str(j % self.depth)]

    def __iter__(self):
        return (self._modules[str(j)] for j in range(self.depth))

    def forward(self, x, block_io=None):
        # Stateful modules (DIA's LSTM) start afresh in every stage, shared or not, and drop their state
        # afterwards so no graph is kept alive between calls (and deepcopy, e.g. for EMA, keeps working).
        self._reset_states()
        for block in self:
            y = block(x)
            if block_io is not None:
                block_io.append((x, y))
            x = y
        self._reset_states()
        return x

    def _reset_states(self):
        seen = set()
        for block in self:
            attn = block.attn
            if hasattr(attn, "reset_state") and id(attn) not in seen:
                seen.add(id(attn))
                attn.reset_state()


def init_convs_and_norms(module: nn.Module) -> None:
    """torchvision's ResNet init for every conv and norm layer (the attention convs too, as SE/CBAM-ResNets do)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def init_attention(module: nn.Module) -> None:
    """Then each attention module's own initialisation, where its paper prescribes one (e.g. SPEM)."""
    for m in module.modules():
        if m is not module and hasattr(m, "init_weights"):
            m.init_weights()


class ResNet(nn.Module):
    def __init__(self, block, depths, planes=(64, 128, 256, 512), num_classes=1000, stem="imagenet",
                 stem_width=64, attention="none", attention_kwargs=None, blocks=None, share=None,
                 zero_init_residual=False):
        super().__init__()
        if int(num_classes) < 1:
            raise AttnlabError(f"num_classes must be >= 1, got {num_classes}")
        attention_kwargs = registry.options_dict(attention_kwargs)
        attn_cls = registry.get(attention)
        registry.check_kwargs(attention, attention_kwargs)
        masks = resolve_blocks(blocks, depths, getattr(attn_cls, "default_stages", None))
        share = getattr(attn_cls, "shared_by_default", False) if share is None else check_flag("share", share)
        zero_init_residual = check_flag("zero_init_residual", zero_init_residual)
        if len(planes) != len(depths):
            raise AttnlabError(f"planes needs one width per stage ({len(depths)}), got {tuple(planes)}")
        for key, value in (("stem_width", stem_width), *(("planes", p) for p in planes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AttnlabError(f"{key} must be {'integers' if key == 'planes' else 'an integer'} >= 1, got "
                                   f"{value!r}")
        if share and getattr(attn_cls, "wraps_block", False):
            raise AttnlabError(f"attention '{attention}' re-runs its block and cannot be shared across blocks")
        self.attention = attention
        self.depths = list(depths)

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(3, stem_width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise AttnlabError(f"unknown stem '{stem}'; valid choices: cifar, imagenet")
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)

        inplanes = stem_width
        self.stage_names = []
        for i, (depth, width) in enumerate(zip(depths, planes)):
            out = width * block.expansion
            shared = registry.create(attention, out, **attention_kwargs) if share and any(masks[i]) else None
            stage_blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                use = masks[i][j]
                attn = (shared if share else registry.create(attention, out, **attention_kwargs)) if use else None
                stage_blocks.append(block(inplanes, width, stride, attn, shared=use and share))
                if use and not share and hasattr(attn, "attach"):
                    attn.attach(stage_blocks[j])  # modules that re-run block layers (TDAM) size themselves here
                inplanes = out
            stage = Stage(stage_blocks, shared)
            name = f"layer{i + 1}"
            self.add_module(name, stage)
            self.stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self.num_features = inplanes
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual):
        init_convs_and_norms(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.constant_(m.last_bn.weight, 0)
        init_attention(self)

    def stages(self):
        return [getattr(self, n) for n in self.stage_names]

    def attention_modules(self):
        """Each distinct attention module once (shared modules count once)."""
        seen, mods = set(), []
        for stage in self.stages():
            for block in stage:
                if not isinstance(block.attn, nn.Identity) and id(block.attn) not in seen:
                    seen.add(id(block.attn))
                    mods.append(block.attn)
        return mods

    def forward(self, x, features: str | None = None):
        if features not in (None, "stages", "blocks"):
            raise AttnlabError(f"features must be None, 'stages' or 'blocks', got '{features}'")
        block_io = [] if features == "blocks" else None
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stem, stage_outs = x, []
        for stage in self.stages():
            x = stage(x, block_io)
            stage_outs.append(x)
        logits = self.fc(torch.flatten(self.avgpool(x), 1))
        if features is None:
            return logits
        return logits, {"stem": stem, "stages": stage_outs, "blocks": block_io or []}

    def forward_features(self, x, blocks: bool = False):
        """The hierarchical features alone: {"stem", "stages", "blocks"}."""
        return self(x, features="blocks" if check_flag("blocks", blocks) else "stages")[1]
