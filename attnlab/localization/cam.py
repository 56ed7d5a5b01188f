"""Class activation maps from the last stage and the classifier, for every attnlab ResNet.

CAM (Zhou et al., CVPR 2016): for class c, ``M_c = sum_k w_ck A_k`` with A (B, K, h, w) the last stage's output
(after its final ReLU, what the global average pool sees) and w the fc weights. No bias, no ReLU, no 1/K:
wsolevaluation divides by K and TDAM's code does not; neither matters after the min-max normalisation that every
metric applies. Because the head is GAP + fc, ``mean_hw(M_c) + b_c`` is exactly the logit of c.

Grad-CAM (Selvaraju et al., ICCV 2017): ``ReLU(sum_k alpha_k A_k)`` with ``alpha_k`` the spatial mean of the
gradient of the class logit w.r.t. A_k. On a GAP + fc head ``alpha_k = w_ck / (h w)``, so Grad-CAM is ReLU(CAM)
up to scale; the option is there for checking that and for heads where it differs (the ReLU changes which pixels
pass a low threshold, so MaxBoxAcc differs from CAM's).

TDAM per-step CAMs (the "shifting attention" of Jaiswal et al.): the official code sets ``time_steps`` of the
TDAM blocks in the last stage to t = 1..T and takes one CAM per forward pass; step 1 is the block without
feedback. Earlier stages keep their full T steps, as there. The official code uses the predicted class; here the
class is the caller's choice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention.tdam import stage_tdams, tdam_steps
from ..errors import AttnlabError

METHODS = ("cam", "gradcam")


def _check_model(model):
    if not hasattr(model, "fc") or not hasattr(model, "stages"):
        raise AttnlabError(f"CAM needs an attnlab ResNet (a last stage and an fc head), got {type(model).__name__}")


def last_stage(model, x):
    """(logits (B, classes), last-stage features (B, K, h, w))."""
    _check_model(model)
    logits, feats = model(x, features="stages")
    return logits, feats["stages"][-1]


def cam_from_features(features: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(B, h, w) maps: ``sum_k weight[classes[b], k] * features[b, k]``."""
    return torch.einsum("bk,bkhw->bhw", weight[classes].to(features.dtype), features)


def _classes(logits, classes):
    if classes is None:
        return logits.argmax(1)
    classes = torch.as_tensor(classes, device=logits.device).long().reshape(-1)
    if classes.numel() != logits.shape[0]:
        raise AttnlabError(f"got {classes.numel()} classes for {logits.shape[0]} images")
    if classes.numel() and (classes.min() < 0 or classes.max() >= logits.shape[1]):
        raise AttnlabError(f"class index out of range 0..{logits.shape[1] - 1}")
    return classes


@torch.no_grad()
def class_activation_maps(model, x, classes=None):
    """(maps (B, h, w), logits). ``classes``: one index per image; None takes each image's top-1 prediction."""
    logits, a = last_stage(model, x)
    c = _classes(logits, classes)
    return cam_from_features(a.float(), model.fc.weight.float(), c), logits


def grad_cams(model, x, classes=None):
    """(maps (B, h, w), logits): Grad-CAM on the last stage (ReLU of the gradient-weighted channel sum)."""
    with torch.enable_grad():
        logits, a = last_stage(model, x)
        c = _classes(logits, classes)
        score = logits.gather(1, c[:, None]).sum()
        grad, = torch.autograd.grad(score, a)
    alpha = grad.mean((2, 3))
    maps = F.relu(torch.einsum("bk,bkhw->bhw", alpha, a.detach()))
    return maps.float(), logits.detach()


def score_maps(model, x, classes=None, method: str = "cam"):
    if method == "cam":
        return class_activation_maps(model, x, classes)
    if method == "gradcam":
        return grad_cams(model, x, classes)
    raise AttnlabError(f"unknown CAM method '{method}'; valid choices: {', '.join(METHODS)}")


def tdam_modules(model, stage: int = -1) -> list:
    """The TDAM modules of one stage (default the last), in block order."""
    _check_model(model)
    return stage_tdams(model.stages()[stage])


@torch.no_grad()
def tdam_step_cams(model, x, classes=None):
    """(maps (T, B, h, w), logits (T, B, classes)): one CAM per computation step of the last stage's TDAM blocks.

    ``classes`` None uses each step's own top-1 prediction (the official code's choice); pass the labels for the
    ground-truth class. The last step equals :func:`class_activation_maps`.
    """
    mods = tdam_modules(model)
    if not mods:
        raise AttnlabError(f"model with attention '{getattr(model, 'attention', '?')}' has no TDAM block in its last "
                           "stage, so it has no per-step maps")
    steps = max(m.time_steps for m in mods)
    maps, logits = [], []
    for t in range(1, steps + 1):
        with tdam_steps(mods, t):
            m, lg = class_activation_maps(model, x, classes)
        maps.append(m)
        logits.append(lg)
    return torch.stack(maps), torch.stack(logits)
