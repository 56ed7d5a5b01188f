"""Shared helpers for the attention-module tests: tiny real data, a short training run, gradient checks."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from attnlab.models import create_model, default_input_size, list_models
from conftest import require_dataset

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def tiny_cifar(n=64):
    """The first images of each CIFAR-10 class, read with PIL: (n x 3 x 32 x 32 normalised, labels)."""
    CIFAR = require_dataset("cifar10") / "train"
    classes = sorted(p.name for p in CIFAR.iterdir())
    per_class = -(-n // len(classes))
    images, labels = [], []
    for i in range(per_class):
        for label, cls in enumerate(classes):
            img = Image.open(CIFAR / cls / f"{i:04d}.jpg").convert("RGB")
            images.append(np.asarray(img))
            labels.append(label)
    x = torch.from_numpy(np.stack(images[:n])).permute(0, 3, 1, 2).float() / 255
    return (x - MEAN) / STD, torch.tensor(labels[:n])


def train_losses(model, x, y, steps=25, lr=0.05, extra_loss=None):
    """Full-batch SGD on (x, y); returns the loss at every step."""
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        if extra_loss is not None:
            loss = loss + extra_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def check_short_run_learns(model, extra_loss=None):
    """20 full-batch steps on 32 real CIFAR images lower the loss clearly (by 0.15 over the first/last 3 steps)."""
    x, y = tiny_cifar(32)
    losses = train_losses(model, x, y, steps=20, lr=0.1, extra_loss=extra_loss)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.15, losses


def attention_params_with_gradients(model):
    """One backward pass of a 16x16 batch; asserts every attention parameter got a non-zero gradient and returns
    them as (name, parameter)."""
    F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3])).backward()
    params = attention_params(model)
    for name, p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    return params


def attention_params(model):
    """(name, parameter) of every parameter inside an attention module, shared ones once."""
    out, seen = [], set()
    for i, mod in enumerate(model.attention_modules()):
        for name, p in mod.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((f"attn{i}.{name}", p))
    return out


def backbone_cases():
    """(model name, input size): CIFAR models at 32x32, ImageNet ones at 64x64."""
    return [(name, 32 if default_input_size(name) == 32 else 64) for name in list_models()]


def check_output_shape(name, size, attention, **kwargs):
    model = create_model(name, num_classes=5, attention=attention, **kwargs).eval()
    assert model.attention_modules(), f"{name}: no {attention} module placed"
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, size, size), features="stages")
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    assert feats["stages"][-1].shape[:2] == (2, model.num_features)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def randomise_bn(module, seed=0):
    """Non-trivial BN statistics and affine parameters, so eval-mode BN is far from the identity (mild enough that
    a ResNet-101's activations stay finite)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return module


def cam_test_model(num_classes: int):
    """An untrained resnet20 in eval mode whose BN statistics are drawn (seed 0), so its class maps are not flat:
    enough for tests that compare two ways of scoring the same maps."""
    torch.manual_seed(0)
    m = create_model("resnet20", num_classes=num_classes).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m
