"""The streaming pipeline's per-image transforms and its batch mixing, built from torchvision.transforms.v2.

``train_transform``: RandomResizedCrop(size, scale, ratio, interpolation) -> horizontal flip -> colour jitter ->
RandAugment or AutoAugment -> uint8 tensor (made contiguous) -> float in 0..1 -> Normalize -> RandomErasing
(``pixel``: normal noise per erased pixel, as timm's ``pixel`` mode; ``const``: zeros). ``eval_transform``: resize
the short side to ``floor(size / crop_fraction)`` and take the centre ``size`` crop (timm's ``crop_pct``; 0.875
gives 256 -> 224).
Every stage but ``Contiguous`` (a memory layout, no parameter) is torchvision's own class, so a recipe's parameters
can be read back from the built objects.

``BatchMixer``: mixup / cutmix on a whole batch (torchvision's MixUp and CutMix, one lambda per batch, as timm's
``batch`` mode): with probability ``mix_prob`` a batch is mixed, by cutmix with probability ``mix_switch_prob``
when both are on; targets come back as class probabilities (unmixed batches as one-hot) for the soft-target loss,
``F.cross_entropy(logits, probabilities, label_smoothing=...)``, which smooths the mixed targets exactly as timm's
``Mixup(label_smoothing=...)`` + ``SoftTargetCrossEntropy`` do.
"""
from __future__ import annotations

import math

import torch
from torchvision.transforms import InterpolationMode, v2

_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}


class Contiguous(torch.nn.Module):
    """``x.contiguous()``. PILToTensor returns a channels-first view of the HWC image; normalising a float tensor
    laid out that way took 0.29 ms at 224 px against 0.06 ms contiguous, more than the uint8 copy costs (0.10 ms;
    benchmarks/stream_loader.py's per-stage times, docs/data.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


def _normalize(cfg) -> list:
    # In place: ToDtype has just made a new float tensor, so normalising it needs no second one.
    return [v2.PILToTensor(), Contiguous(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([float(m) for m in cfg["mean"]], [float(s) for s in cfg["std"]], inplace=True)]


def train_transform(cfg, size: int) -> v2.Compose:
    """The training transform of a ``data.stream`` section (a dict or DictConfig) at ``size`` px, for PIL images."""
    steps = [v2.RandomResizedCrop(size, scale=tuple(float(s) for s in cfg["scale"]),
                                  ratio=tuple(float(r) for r in cfg["ratio"]),
                                  interpolation=_INTERPOLATION[cfg["interpolation"]], antialias=True)]
    if cfg["hflip"] > 0:
        steps.append(v2.RandomHorizontalFlip(float(cfg["hflip"])))
    if cfg["color_jitter"] > 0:
        cj = float(cfg["color_jitter"])
        steps.append(v2.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
    if cfg["auto_augment"] == "randaugment":
        steps.append(v2.RandAugment(num_ops=int(cfg["randaugment_ops"]), magnitude=int(cfg["randaugment_magnitude"]),
                                    interpolation=InterpolationMode.BILINEAR))
    elif cfg["auto_augment"] == "autoaugment":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=InterpolationMode.BILINEAR))
    steps += _normalize(cfg)
    if cfg["random_erasing"] > 0:
        steps.append(v2.RandomErasing(p=float(cfg["random_erasing"]),
                                      value="random" if cfg["erasing_mode"] == "pixel" else 0.0))
    return v2.Compose(steps)


def eval_transform(cfg, size: int) -> v2.Compose:
    """Resize (short side to ``floor(size / crop_fraction)``) and centre crop ``size``, then normalise."""
    resize = int(math.floor(size / float(cfg["crop_fraction"])))
    return v2.Compose([v2.Resize(resize, interpolation=_INTERPOLATION[cfg["eval_interpolation"]], antialias=True),
                       v2.CenterCrop(size), *_normalize(cfg)])


class BatchMixer:
    """``mixer(images, labels, generator_seed) -> (images, soft targets)`` for one batch; None when both alphas are
    0 (see the module docstring). The draws use the CPU RNG inside ``torch.random.fork_rng`` seeded by the
    caller, so they are a pure function of that seed and leave the process's RNG untouched."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, mix_prob: float = 1.0,
                 switch_prob: float = 0.5):
        self.num_classes, self.mix_prob, self.switch_prob = int(num_classes), float(mix_prob), float(switch_prob)
        self.mixup = v2.MixUp(alpha=float(mixup_alpha), num_classes=self.num_classes) if mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=float(cutmix_alpha), num_classes=self.num_classes) if cutmix_alpha > 0 else None

    @classmethod
    def from_config(cls, cfg, num_classes: int) -> "BatchMixer | None":
        if cfg["mixup_alpha"] <= 0 and cfg["cutmix_alpha"] <= 0:
            return None
        return cls(num_classes, cfg["mixup_alpha"], cfg["cutmix_alpha"], cfg["mix_prob"], cfg["mix_switch_prob"])

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mix = bool(torch.rand(()) < self.mix_prob)
            use_cutmix = self.cutmix is not None and (self.mixup is None or bool(torch.rand(()) < self.switch_prob))
            if not mix:
                return images, torch.nn.functional.one_hot(labels, self.num_classes).to(images.dtype)
            return (self.cutmix if use_cutmix else self.mixup)(images, labels)
