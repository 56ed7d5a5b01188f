"""The papers' ImageNet recipes: each loads, lists its departures at the top, and the transforms built from it carry
the official parameters (read back from the built objects)."""
from pathlib import Path

import pytest
from torchvision.transforms import InterpolationMode, v2

from attnlab.data.transforms import BatchMixer, eval_transform, train_transform
from attnlab.engine.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# recipe: (attention, global batch, lr, schedule, epochs, weight decay, label smoothing, colour jitter, erasing,
#          evaluation interpolation)
OFFICIAL = {
    "imagenet_resnet50_tdam.yaml": ("tdam", 512, 0.4, "cosine", 150, 2e-5, 0.1, 0.4, 0.5, InterpolationMode.BICUBIC),
    "imagenet_resnet50_se.yaml": ("se", 1024, 0.6, "multistep", 100, 1e-4, 0.0, 0.0, 0.0, InterpolationMode.BILINEAR),
    "imagenet_resnet50_cbam.yaml": ("cbam", 256, 0.1, "multistep", 100, 1e-4, 0.0, 0.0, 0.0,
                                    InterpolationMode.BILINEAR),
}


def _types(compose):
    return [type(t) for t in compose.transforms]


def _one(compose, cls):
    found = [t for t in compose.transforms if type(t) is cls]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("recipe", sorted(OFFICIAL))
def test_recipe_builds_the_official_transforms(recipe):
    attention, batch, lr, schedule, epochs, wd, smoothing, jitter, erasing, eval_interp = OFFICIAL[recipe]
    text = (CONFIGS / recipe).read_text()
    assert "# Departures from the official run:" in text.split("\nmodel:")[0]
    cfg = load_config(CONFIGS / recipe)
    assert (cfg.model.name, cfg.model.attention) == ("resnet50", attention)
    assert cfg.data.pipeline == "stream" and cfg.data.image_size == 224
    t = cfg.train
    assert (t.batch_size, t.lr, t.schedule, t.epochs, t.weight_decay, t.label_smoothing) == \
        (batch, lr, schedule, epochs, wd, smoothing)
    if schedule == "multistep":
        assert list(t.milestones) == [30, 60, 90] and t.gamma == 0.1 and t.warmup_epochs == 0

    train_t = train_transform(cfg.data.stream, cfg.data.image_size)
    crop = _one(train_t, v2.RandomResizedCrop)
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == InterpolationMode.BILINEAR
    assert _one(train_t, v2.RandomHorizontalFlip).p == 0.5
    norm = _one(train_t, v2.Normalize)
    assert norm.mean == [0.485, 0.456, 0.406] and norm.std == [0.229, 0.224, 0.225]
    if jitter:
        cj = _one(train_t, v2.ColorJitter)
        assert cj.brightness == cj.contrast == cj.saturation == pytest.approx((1 - jitter, 1 + jitter))
    else:
        assert v2.ColorJitter not in _types(train_t)
    if erasing:
        erase = _one(train_t, v2.RandomErasing)
        assert erase.p == erasing and erase.value is None  # pixel mode: normal noise per pixel
    else:
        assert v2.RandomErasing not in _types(train_t)
    assert v2.RandAugment not in _types(train_t) and v2.AutoAugment not in _types(train_t)
    assert BatchMixer.from_config(cfg.data.stream, 1000) is None  # no mixup/cutmix in the main variants

    eval_t = eval_transform(cfg.data.stream, cfg.data.image_size)
    resize = _one(eval_t, v2.Resize)
    assert resize.size == [256] and resize.interpolation == eval_interp  # 224 / 0.875
    assert _one(eval_t, v2.CenterCrop).size == (224, 224)


def test_tdam_recipe_official_model_and_optional_mix_variant():
    cfg = load_config(CONFIGS / "imagenet_resnet50_tdam.yaml",
                      ["data.stream.cutmix_alpha=1.0", "data.stream.mixup_alpha=0.7"])
    assert dict(cfg.model.attention_kwargs) == {"searchlight": "joint", "time_steps": 2, "m": 1}
    assert cfg.model.zero_init_residual and cfg.train.nesterov and not cfg.train.wd_on_bn_bias
    assert cfg.train.warmup_epochs == 5 and cfg.data.stream.erasing_mode == "pixel"
    mixer = BatchMixer.from_config(cfg.data.stream, 1000)
    assert mixer.cutmix.alpha == 1.0 and mixer.mixup.alpha == 0.7 and mixer.switch_prob == 0.5
