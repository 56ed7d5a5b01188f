"""SSIA: Self-Supervised Implicit Attention (Wu, Gong & Zhang, arXiv 2206.07434), as reconstructed here.

What the paper's abstract states (the full text and code were not available to us): attention weights are treated as
higher-level semantic information; supervisory signals generated from *higher* layers of the network guide the
parameter updates of *lower* layers; this is a self-supervised task built from the network's own hierarchical
features, active only in training, so inference costs nothing extra. Everything below (maps, pairing, resizing,
distances, weighting) is our reconstruction, close to Self-Attention Distillation (Hou et al. 2019) and Attention
Transfer (Zagoruyko & Komodakis 2017). See docs/ssia.md.

The objective reads ``model(x, features=...)`` and never edits the model. ``design`` picks one of five designs
(docs/ssia.md): ``maps`` (below; the default, parameter-free), ``attn_target``, ``teacher``, ``self_distill`` and
``cam`` (attnlab/objectives/ssia_designs.py). Designs with training-only modules (ssia_heads.py) hold them in
``self.module``, outside the model; ``shuffle_target`` is the control that gives each image another image's target.

Notation: F is a feature map (B, C, H, W); a pair (L, U) is a lower feature L guided by a higher feature U.

Pairs (``pairing``), with S_1..S_n the stage outputs and (X_i, Y_i) the input and output of residual block i:
    block : (X_i, Y_i) for every block i           (needs features="blocks"; Y_i may be half the size of X_i)
    stage : (S_l, S_{l+1}) for l = 1..n-1
    last  : (S_l, S_n)     for l = 1..n-1

Parameter-free maps (``map``), each returned as K descriptor maps of N entries per sample, shape (B, K, N):
    spatial, spatial_pool=mean     : A = mean_c |F|^p                         K = 1, N = H*W
    spatial, spatial_pool=mean_max : A = [mean_c |F|^p, max_c |F|^p]          K = 2 (CBAM's spatial descriptor)
    channel                        : A = mean_{h,w} F  (SE's squeeze)          K = 1, N = C
Channel maps need equal channel counts: pairs whose C differ are skipped (an error if no pair remains).

Target: T = A(U), resized to L's (H, W) before flattening (``resize`` = bilinear with align_corners=False, or area,
i.e. adaptive average pooling, which replicates when upsampling by an integer factor). With ``detach`` (default),
T is a constant (stop-gradient): only the lower layers are pulled towards the higher layer's attention.
Student: S = A(L).

Distance per sample b and descriptor k, on the flattened vectors s, t in R^N (``distance``):
    mse    : (1/N) sum_n (s_n/||s|| - t_n/||t||)^2            (attention transfer; equals 2(1 - cos(s, t)) / N)
    cosine : 1 - <s, t> / (||s|| ||t||)
    kl     : tau^2 sum_n P_n (log P_n - log Q_n),  P = softmax(t / (m_t tau)), Q = softmax(s / (m_s tau))
             KL(target || student) of spatial (or channel) softmax maps; tau = ``temperature``; tau^2 keeps the
             gradient size comparable across temperatures, as in distillation. m_v = mean_n |v_n| puts each map
             on a unit-mean scale first (our choice: raw maps of different layers differ in scale by orders of
             magnitude and grow in training, so a raw softmax would be near one-hot and tau meaningless).
Norms are clamped at 1e-8 (``eps``) so an all-zero map gives a finite value.

Loss, a mean over pairs and over batch and descriptors:
    L_ssia = weight * (1/|P|) sum_{(L,U) in P} (1/(B K)) sum_{b,k} d(S_bk, T_bk)
It is 0 (and not computed) while ``epoch < warmup_epochs`` (epochs counted from 0) or when ``weight`` is 0.
Maps are computed in float32 (also under AMP), once per distinct feature tensor: a block's output is the next
block's input, so the block pairing evaluates each feature once.
"""
import torch
import torch.nn.functional as F

from ..errors import AttnlabError, unknown
from . import Objective, register_objective
from . import ssia_designs as designs
from .ssia_heads import BLOCKS

EPS = 1e-8

CHOICES = {
    "pairing": ("block", "stage", "last"),
    "map": ("spatial", "channel"),
    "spatial_pool": ("mean", "mean_max"),
    "resize": ("bilinear", "area"),
    "distance": ("mse", "kl", "cosine"),
    "design": ("maps", "attn_target", "teacher", "self_distill", "cam"),
    "attn_block": BLOCKS,
}

# The default configuration is the best of the ablation by validation accuracy (docs/ssia.md,
# results/ssia_ablation): stage l+1 guides stage l through KL of spatial-softmax maps, weight 0.5. The margins there
# were within seed noise, so treat it as a reasonable setting, not a proven best one.
DEFAULTS = {
    "enabled": False,
    "pairing": "stage",
    "map": "spatial",
    "p": 2.0,
    "spatial_pool": "mean",
    "resize": "bilinear",
    "distance": "kl",
    "temperature": 1.0,
    "weight": 0.5,
    "warmup_epochs": 0,
    "detach": True,
    # The designs (docs/ssia.md); the keys below were added after the ablation, at values that leave `maps` as it was.
    "design": "maps",
    "shuffle_target": False,  # control: every image gets the target of another image of the batch (a derangement)
    "attn_block": "cbam_spatial",  # attn_target and teacher: the training-only attention module
    "aux_weight": 1.0,  # cross-entropy of the training-only classifiers (attn_target, teacher, self_distill)
    "kd_weight": 1.0,  # teacher: KL from the gated teacher's logits to the student's
    "kd_temperature": 3.0,  # teacher and self_distill: temperature of the logit distillation
    "hint_weight": 0.1,  # self_distill: mean squared difference of a head's feature to the last stage's
}


# ---------------------------------------------------------------------------------------------------------------
# The pieces, usable on their own (the tests check each one by hand).

def spatial_map(f: torch.Tensor, p: float = 2.0, pool: str = "mean") -> torch.Tensor:
    """(B, C, H, W) -> (B, K, H, W): channel mean (and max) of |F|^p."""
    if pool == "mean" and p == 2:
        return _SquareMean.apply(f)
    a = f.abs().pow(p) if p != 2 else f * f
    mean = a.mean(1, keepdim=True)
    if pool == "mean":
        return mean
    return torch.cat([mean, a.amax(1, keepdim=True)], 1)


class _SquareMean(torch.autograd.Function):
    """mean_c F^2 with a one-pass backward, 2 F g / C.

    Autograd's own graph for (F * F).mean(1) makes four full-size passes in backward (mean's expand-and-divide,
    two products, their sum); this is the default map, applied to every block in the block pairing, so it
    matters (measured in benchmarks/ssia_overhead.py).
    """

    @staticmethod
    def forward(ctx, f):
        ctx.save_for_backward(f)
        return (f * f).sum(1, keepdim=True).mul_(1.0 / f.shape[1])

    @staticmethod
    def backward(ctx, g):
        (f,) = ctx.saved_tensors
        return f * (g * (2.0 / f.shape[1]))


def channel_map(f: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, C): global-average channel profile."""
    return f.mean((2, 3)).unsqueeze(1)


def resize_map(a: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """Resize a (B, K, h, w) map to ``size`` = (H, W)."""
    if tuple(a.shape[-2:]) == tuple(size):
        return a
    if mode == "bilinear":
        return F.interpolate(a, size=size, mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(a, size)


def map_distance(s: torch.Tensor, t: torch.Tensor, distance: str = "mse", temperature: float = 1.0) -> torch.Tensor:
    """Per-descriptor distance between student ``s`` and target ``t``, both (B, K, N) -> (B, K)."""
    if distance == "mse":
        qs = s / s.norm(dim=-1, keepdim=True).clamp_min(EPS)
        qt = t / t.norm(dim=-1, keepdim=True).clamp_min(EPS)
        return (qs - qt).pow(2).mean(-1)
    if distance == "cosine":
        return 1 - F.cosine_similarity(s, t, dim=-1, eps=EPS)
    if distance == "kl":
        log_q = F.log_softmax(s / (s.abs().mean(-1, keepdim=True).clamp_min(EPS) * temperature), dim=-1)
        log_p = F.log_softmax(t / (t.abs().mean(-1, keepdim=True).clamp_min(EPS) * temperature), dim=-1)
        return temperature ** 2 * (log_p.exp() * (log_p - log_q)).sum(-1)
    raise unknown("ssia distance", distance, CHOICES["distance"])


def feature_pairs(features: dict, pairing: str) -> list:
    """The (lower, higher) feature tensors that ``pairing`` selects from a model's feature dict."""
    if pairing == "block":
        pairs = list(features.get("blocks") or [])
        if not pairs:
            raise AttnlabError("ssia pairing=block needs the model's block features (forward(x, features='blocks'))")
        return pairs
    stages = list(features.get("stages") or [])
    if len(stages) < 2:
        raise AttnlabError(f"ssia pairing={pairing} needs at least 2 stages, the model returned {len(stages)}")
    if pairing == "stage":
        return list(zip(stages[:-1], stages[1:]))
    return [(s, stages[-1]) for s in stages[:-1]]


# ---------------------------------------------------------------------------------------------------------------

@register_objective("ssia", defaults=DEFAULTS)
class SSIA(Objective):
    """Training-only guidance of lower layers by targets from higher ones, in one of five designs (``design``).

    ``maps`` holds no parameters. The other designs that need training-only modules (attn_target, teacher,
    self_distill) build them in ``build(model)`` as ``self.module``; the engine trains, moves and checkpoints it
    beside the model, never in it.
    """

    module = None

    def __init__(self, pairing="stage", map="spatial", p=2.0, spatial_pool="mean", resize="bilinear",
                 distance="kl", temperature=1.0, weight=0.5, warmup_epochs=0, detach=True, design="maps",
                 shuffle_target=False, attn_block="cbam_spatial", aux_weight=1.0, kd_weight=1.0, kd_temperature=3.0,
                 hint_weight=0.1):
        for key, value in (("pairing", pairing), ("map", map), ("spatial_pool", spatial_pool),
                           ("resize", resize), ("distance", distance), ("design", design),
                           ("attn_block", attn_block)):
            if value not in CHOICES[key]:
                raise unknown(f"ssia {key}", value, CHOICES[key])
        self.pairing, self.map, self.spatial_pool = pairing, map, spatial_pool
        self.resize, self.distance = resize, distance
        self.design, self.attn_block = design, attn_block
        self.p = _number("p", p, positive=True)
        self.temperature = _number("temperature", temperature, positive=True)
        self.kd_temperature = _number("kd_temperature", kd_temperature, positive=True)
        self.weight = _number("weight", weight)
        self.aux_weight, self.kd_weight = _number("aux_weight", aux_weight), _number("kd_weight", kd_weight)
        self.hint_weight = _number("hint_weight", hint_weight)
        self.warmup_epochs = int(_number("warmup_epochs", warmup_epochs))
        self.detach = _flag("detach", detach)
        self.shuffle_target = _flag("shuffle_target", shuffle_target)
        if design == "cam" and map != "spatial":
            raise AttnlabError("ssia design=cam needs map=spatial (the CAM is a spatial map)")
        # Block pairs need every block's (input, output); stage pairs only the stage outputs forward returns anyway.
        self.features = "blocks" if pairing == "block" and design == "maps" else "stages"
        self.terms = designs.TERMS[design]
        self.needs_inputs = design == "teacher"  # it runs the model a second time on the batch

    @classmethod
    def check(cls, section) -> "SSIA":
        """The objective ``section`` describes, built as if it were on: its options are checked also while
        ssia.enabled=false, so a typo is not first heard of when the objective is turned on."""
        opts = {k: v for k, v in dict(section).items() if k != "enabled"}
        for key in opts:
            if key not in DEFAULTS:
                raise unknown("ssia option", key, DEFAULTS)
        return cls(**opts)

    @classmethod
    def from_config(cls, section, model=None):
        if not section.get("enabled", False):
            return None
        obj = cls.check(section)
        if model is not None:
            obj.build(model)
        return obj

    def build(self, model):
        """Create the design's training-only modules for ``model`` (none for maps and cam). Returns self."""
        builder = {"attn_target": designs.build_attn_target, "teacher": designs.build_teacher,
                   "self_distill": designs.build_self_distill}.get(self.design)
        self.module = builder(self, model) if builder else None
        return self

    def active(self, epoch) -> bool:
        """Whether the guidance is on at ``epoch``. For maps a zero weight also turns it off (nothing computed)."""
        if self.design == "maps" and self.weight == 0:
            return False
        return epoch is None or epoch >= self.warmup_epochs

    def __call__(self, *, model=None, logits=None, targets=None, features, epoch=None, step=None, inputs=None):
        ref = logits if logits is not None else features["stages"][-1]
        on = self.active(epoch)
        if self.design != "attn_target" and not on:
            return {name: ref.new_zeros((), dtype=torch.float32) for name in self.terms}
        if self.design != "maps" and self.module is None and self.design != "cam":
            raise AttnlabError(f"ssia design={self.design} has no training-only modules: call build(model) first")
        perm = designs.derangement(ref.shape[0], step or 0) if self.shuffle_target else None
        if self.design == "maps":
            return {"ssia": self.weight * self.loss(features, perm)}
        if self.design == "cam":
            return designs.cam_terms(self, model, features, targets, perm)
        if self.design == "attn_target":
            return designs.attn_target_terms(self, features, targets, perm, on)
        if self.design == "teacher":
            return designs.teacher_terms(self, model, inputs, logits, features, targets, perm)
        return designs.self_distill_terms(self, logits, features, targets, perm)

    def loss(self, features: dict, perm=None) -> torch.Tensor:
        """The unweighted maps term: mean over pairs of the batch-and-descriptor mean distance."""
        pairs = feature_pairs(features, self.pairing)
        if self.map == "channel":
            pairs = [(lo, hi) for lo, hi in pairs if lo.shape[1] == hi.shape[1]]
            if not pairs:
                raise AttnlabError(f"ssia map=channel: no (lower, higher) pair with equal channel counts under "
                                   f"pairing={self.pairing}; use pairing=block or map=spatial")
        students = {id(lo) for lo, _ in pairs}
        cache = {}

        def get(f, target):
            key = id(f)
            if key not in cache:
                if target and self.detach and key not in students:
                    with torch.no_grad():  # a target-only feature: no graph at all
                        cache[key] = self._map(f)
                else:
                    cache[key] = self._map(f)
            return cache[key]

        total = 0.0
        for lo, hi in pairs:
            t = get(hi, target=True)
            if self.detach:
                t = t.detach()
            total = total + self.map_loss(get(lo, target=False), designs.shuffled(t, perm))
        return total / len(pairs)

    def map_loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Batch-and-descriptor mean distance of student map ``s`` to target ``t``: (B, K, H, W) spatial maps (the
        target resized to the student's size) or (B, K, N) vectors."""
        if s.dim() == 4:
            t = resize_map(t, s.shape[-2:], self.resize)
            s, t = s.flatten(2), t.flatten(2)
        return map_distance(s, t, self.distance, self.temperature).mean()

    def _map(self, f):
        if f.dtype in (torch.float16, torch.bfloat16):
            f = f.float()  # squares and softmax of half-precision maps lose too much
        if self.map == "channel":
            return channel_map(f)
        return spatial_map(f, self.p, self.spatial_pool)

    def spatial_profile(self, f):
        """The one-descriptor spatial map mean_c |F|^p, in float32 (attn_target's student for spatial weights)."""
        return spatial_map(f.float(), self.p, "mean")


def _flag(name, value):
    if not isinstance(value, bool):
        raise AttnlabError(f"ssia {name} must be true or false, got {value!r}")
    return value


def _number(name, value, positive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AttnlabError(f"ssia {name} must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise AttnlabError(f"ssia {name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)
