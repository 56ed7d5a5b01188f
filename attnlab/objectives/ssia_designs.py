"""The SSIA designs other than ``maps``: each builds its training-only modules (``build_*``) and computes its terms
(``*_terms``). They use the objective ``obj`` (attnlab.objectives.ssia.SSIA) for the maps and distances shared by all
designs: ``obj._map(f)``, ``obj.map_loss(student_map, target_map)``. Every target is detached.

Term names (each already weighted; the engine sums them into the loss and logs each in metrics.csv):
    ssia       weight x the guidance of a lower layer by a target from above (every design; for self_distill the
               heads' tau^2 KL to the final classifier's softened output, tau = kd_temperature)
    ssia_aux   aux_weight x cross-entropy of the training-only classifier(s) (attn_target, teacher, self_distill)
    ssia_kd    kd_weight x tau^2 KL(teacher's softmax || student's softmax), tau = kd_temperature (teacher)
    ssia_hint  hint_weight x mean squared difference between a head's feature and the last stage's (self_distill)

``perm`` is None or a derangement of the batch (the shuffled-target control): target b is then image perm[b]'s.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AttnlabError
from .ssia_heads import AttnBlock, ClassHead, DistillHead, gated, init_forked, num_classes_of, stage_shapes

TERMS = {"maps": ("ssia",), "cam": ("ssia",), "attn_target": ("ssia", "ssia_aux"),
         "teacher": ("ssia", "ssia_kd", "ssia_aux"), "self_distill": ("ssia", "ssia_aux", "ssia_hint")}


def derangement(n: int, step: int) -> torch.Tensor:
    """A uniformly drawn permutation of range(n) with no fixed point, a pure function of ``step`` (so a resumed run
    draws the same ones and the global RNG is not touched). Rejection sampling: about e draws on average."""
    if n < 2:
        raise AttnlabError("ssia shuffle_target needs at least 2 images per batch (per process)")
    g = torch.Generator().manual_seed(0x551A + int(step))
    while True:
        perm = torch.randperm(n, generator=g)
        if not (perm == torch.arange(n)).any():
            return perm


def shuffled(t: torch.Tensor, perm):
    return t if perm is None else t[perm.to(t.device)]


def kd_loss(student_logits, teacher_logits, tau: float) -> torch.Tensor:
    """tau^2 KL(softmax(teacher / tau) || softmax(student / tau)), batch mean; the teacher is detached."""
    log_q = F.log_softmax(student_logits.float() / tau, dim=1)
    log_p = F.log_softmax(teacher_logits.detach().float() / tau, dim=1)
    return tau ** 2 * (log_p.exp() * (log_p - log_q)).sum(1).mean()


# ---------------------------------------------------------------------------------------------------------------
# attn_target: an attention block on the higher feature computes weights; they are the lower layer's target.

def build_attn_target(obj, model) -> nn.Module:
    shapes, classes = stage_shapes(model), num_classes_of(model)
    if obj.pairing == "block":
        raise AttnlabError("ssia design=attn_target takes pairing=stage or last (one block per higher stage)")
    highers = range(1, len(shapes)) if obj.pairing == "stage" else [len(shapes) - 1]
    return init_forked(lambda: nn.ModuleDict({
        "blocks": nn.ModuleDict({str(i): AttnBlock(obj.attn_block, shapes[i][0]) for i in highers}),
        "heads": nn.ModuleDict({str(i): ClassHead(shapes[i][0], classes) for i in highers})}))


def attn_target_terms(obj, features, targets, perm, active: bool) -> dict:
    """The block sees the higher feature detached: it learns from its own classifier (``ssia_aux``, on the gated
    higher feature), and the backbone learns only from ``ssia``, the pull of the lower profile towards the
    (detached) weights. ``active`` False (warm-up): the block still trains, ``ssia`` is 0."""
    stages = features["stages"]
    pairs = _attn_pairs(obj, len(stages))
    aux, guide = 0.0, 0.0
    for lo, hi in pairs:
        block, head = obj.module["blocks"][str(hi)], obj.module["heads"][str(hi)]
        u = stages[hi].detach()
        w = block.weights(u)
        aux = aux + F.cross_entropy(head(u * w), targets)
        if active:
            guide = guide + _profile_loss(obj, block, stages[lo], shuffled(w.detach(), perm))
    aux = obj.aux_weight * aux / len(pairs)
    guide = obj.weight * guide / len(pairs) if active else _zero(stages[-1])
    return {"ssia": guide, "ssia_aux": aux}


def _attn_pairs(obj, n: int) -> list:
    if obj.pairing == "stage":
        pairs = [(i, i + 1) for i in range(n - 1)]
    else:
        pairs = [(i, n - 1) for i in range(n - 1)]
    return pairs


def _profile_loss(obj, block, lower, w):
    """Distance of the lower feature's parameter-free profile to the weights w."""
    lower = lower.float()
    if block.spatial:
        return obj.map_loss(obj.spatial_profile(lower), w.float())
    if lower.shape[1] != w.shape[1]:
        raise AttnlabError(f"ssia attn_block={block.kind} gives {w.shape[1]} channel weights for a lower feature of "
                           f"{lower.shape[1]} channels; use attn_block=cbam_spatial for pairs of different widths")
    return obj.map_loss(lower.mean((2, 3)).unsqueeze(1), w.flatten(1).unsqueeze(1).float())


# ---------------------------------------------------------------------------------------------------------------
# teacher: the same network with a training-only gate after every stage, run a second time on the same batch.

def build_teacher(obj, model) -> nn.Module:
    shapes = stage_shapes(model)
    return init_forked(lambda: nn.ModuleDict({"gates": nn.ModuleList(AttnBlock(obj.attn_block, c)
                                                                      for c, _, _ in shapes)}))


def teacher_terms(obj, model, inputs, logits, features, targets, perm) -> dict:
    if inputs is None:
        raise AttnlabError("ssia design=teacher needs the batch: call the objective with inputs=x")
    with gated(model, list(obj.module["gates"])):
        t_logits, t_feats = model(inputs, features="stages")
    students, teachers = features["stages"], t_feats["stages"]
    maps = sum(obj.map_loss(obj._map(s), shuffled(obj._map(t.detach()), perm)) for s, t in zip(students, teachers))
    return {"ssia": obj.weight * maps / len(students),
            "ssia_kd": obj.kd_weight * kd_loss(logits, shuffled(t_logits, perm), obj.kd_temperature),
            "ssia_aux": obj.aux_weight * F.cross_entropy(t_logits, targets)}


# ---------------------------------------------------------------------------------------------------------------
# self_distill (Be Your Own Teacher): classifier heads after the lower stages, taught by the final classifier.

def build_self_distill(obj, model) -> nn.Module:
    shapes, classes = stage_shapes(model), num_classes_of(model)
    c_n, h_n, _ = shapes[-1]
    return init_forked(lambda: nn.ModuleDict({"heads": nn.ModuleList(
        DistillHead(c, c_n, max(1, h // h_n), classes) for c, h, _ in shapes[:-1])}))


def self_distill_terms(obj, logits, features, targets, perm) -> dict:
    stages = features["stages"]
    top = shuffled(stages[-1].detach().float(), perm)
    top_logits = shuffled(logits.detach(), perm)
    ce = kd = hint = 0.0
    for head, f in zip(obj.module["heads"], stages[:-1]):
        h, z = head(f, top.shape[-2:])
        ce = ce + F.cross_entropy(z, targets)
        kd = kd + kd_loss(z, top_logits, obj.kd_temperature)
        hint = hint + (h.float() - top).pow(2).mean()
    n = len(stages) - 1
    # ssia is the distillation itself: the lower heads pulled towards the top classifier's softened output.
    return {"ssia": obj.weight * kd / n, "ssia_aux": obj.aux_weight * ce / n, "ssia_hint": obj.hint_weight * hint / n}


# ---------------------------------------------------------------------------------------------------------------
# cam: the classifier's class activation map for the true class as the spatial target of the lower stages.

def cam_target(top: torch.Tensor, fc_weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_c W[y_b, c] F_b[c]) as a (B, 1, H, W) map, detached (the fc bias is the same at every position)."""
    w = fc_weight.detach().float()[targets]
    return torch.einsum("bc,bchw->bhw", w, top.detach().float()).relu().unsqueeze(1)


def cam_terms(obj, model, features, targets, perm) -> dict:
    stages = features["stages"]
    if obj.map != "spatial":
        raise AttnlabError("ssia design=cam needs map=spatial (the CAM is a spatial map)")
    num_classes_of(model)
    cam = shuffled(cam_target(stages[-1], model.fc.weight, targets), perm)
    total = sum(obj.map_loss(obj._map(f), cam) for f in stages[:-1])
    return {"ssia": obj.weight * total / (len(stages) - 1)}


def _zero(ref):
    return ref.new_zeros((), dtype=torch.float32)
