"""The streaming pipeline (data.pipeline=stream): transforms read back from the built objects, mixup/cutmix and the
soft-target loss against a hand computation, end-to-end train / resume / eval on a generated 224 px JPEG folder and
on Tiny-ImageNet-50 at 64 px, and a loader whose memory does not grow with the folder."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from attnlab.data.pipeline import build_loaders
from attnlab.data.transforms import BatchMixer, Contiguous, eval_transform, train_transform
from attnlab.engine.checkpoint import load_checkpoint
from attnlab.engine.config import load_config
from attnlab.engine.train import resume_config, train
from attnlab.errors import AttnlabError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "data" / "tiny-imagenet-50"
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


def make_folder(root: Path, classes=2, train=12, val=4, size=224, seed=0) -> Path:
    """root/train/<class>/*.jpg and root/val/<class>/*.jpg: noise around a per-class colour."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, 3)
            for i in range(n):
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i:04d}.jpg", quality=85)
    return root


def stream_overrides(tmp, name, data_dir, extra=()):
    return [f"name={name}", f"out_dir={tmp}", "data.name=imagefolder", f"data.data_dir={data_dir}",
            "data.pipeline=stream", "data.image_size=32", "data.val_size=4", "data.workers=2",
            "data.stream.color_jitter=0.4", "data.stream.random_erasing=0.5", "data.stream.auto_augment=randaugment",
            "data.stream.mixup_alpha=0.2", "data.stream.cutmix_alpha=1.0", "model.name=resnet20", "train.epochs=2",
            "train.batch_size=8", "train.eval_batch_size=16", "train.lr=0.05", "train.label_smoothing=0.1",
            "train.deterministic=true", "train.channels_last=false", "device=cpu", *extra]


# ---- transforms ------------------------------------------------------------------------------------------------


def _find(compose, cls):
    found = [t for t in compose.transforms if type(t) is cls]
    assert len(found) == 1, f"{cls.__name__} in {compose}"
    return found[0]


def test_train_transform_carries_the_configured_parameters():
    cfg = load_config(None, ["data.stream.scale=[0.25,1.0]", "data.stream.ratio=[0.5,2.0]",
                             "data.stream.interpolation=bicubic", "data.stream.hflip=0.3",
                             "data.stream.color_jitter=0.4", "data.stream.auto_augment=randaugment",
                             "data.stream.randaugment_ops=3", "data.stream.randaugment_magnitude=7",
                             "data.stream.random_erasing=0.25", "data.stream.mean=[0.5,0.4,0.3]",
                             "data.stream.std=[0.2,0.3,0.1]"]).data.stream
    t = train_transform(cfg, 192)
    crop = _find(t, v2.RandomResizedCrop)
    assert crop.size == (192, 192) and crop.scale == (0.25, 1.0) and crop.ratio == (0.5, 2.0)
    assert crop.interpolation == InterpolationMode.BICUBIC and crop.antialias
    assert _find(t, v2.RandomHorizontalFlip).p == 0.3
    cj = _find(t, v2.ColorJitter)
    assert cj.brightness == cj.contrast == cj.saturation == pytest.approx((0.6, 1.4)) and cj.hue is None
    ra = _find(t, v2.RandAugment)
    assert (ra.num_ops, ra.magnitude) == (3, 7)
    norm = _find(t, v2.Normalize)
    assert norm.mean == [0.5, 0.4, 0.3] and norm.std == [0.2, 0.3, 0.1]
    erase = _find(t, v2.RandomErasing)
    assert erase.p == 0.25 and erase.value is None  # None: normal noise per pixel (timm's 'pixel' mode)
    # Order: geometry and colour on the PIL image, erasing last (on the normalised tensor), as timm.
    kinds = [type(s) for s in t.transforms]
    assert kinds.index(v2.RandomResizedCrop) < kinds.index(v2.ColorJitter) < kinds.index(v2.RandAugment) \
        < kinds.index(v2.Normalize) < kinds.index(v2.RandomErasing)

    aa = train_transform(load_config(None, ["data.stream.auto_augment=autoaugment"]).data.stream, 224)
    assert _find(aa, v2.AutoAugment).policy == v2.AutoAugmentPolicy.IMAGENET
    plain = train_transform(load_config(None, ["data.stream.hflip=0"]).data.stream, 224)
    assert [type(s) for s in plain.transforms] == [v2.RandomResizedCrop, v2.PILToTensor, Contiguous, v2.ToDtype,
                                                   v2.Normalize]
    const = train_transform(load_config(None, ["data.stream.random_erasing=0.5", "data.stream.erasing_mode=const"]
                                        ).data.stream, 224)
    assert _find(const, v2.RandomErasing).value == [0.0]


def test_per_image_seeding_draws_as_manual_seed_and_leaves_the_process_rng_alone():
    from attnlab.data.stream import cpu_rng_seeded
    torch.manual_seed(11)
    expected = torch.rand(5)
    torch.manual_seed(3)
    ahead = torch.rand(4)  # the process's own stream after seed 3
    torch.manual_seed(3)
    with cpu_rng_seeded(11):
        drawn = torch.rand(5)
    assert torch.equal(drawn, expected) and torch.equal(torch.rand(4), ahead)
    torch.manual_seed(3)
    with pytest.raises(ValueError):  # a transform that fails still leaves the process's stream where it was
        with cpu_rng_seeded(11):
            torch.rand(5)
            raise ValueError("bad image")
    assert torch.equal(torch.rand(4), ahead)


def test_normalising_in_place_and_contiguous_gives_the_strided_out_of_place_result():
    t = train_transform(load_config(None, ["data.stream.hflip=0"]).data.stream, 32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    torch.manual_seed(0)
    x = t(image)
    torch.manual_seed(0)
    norm = _find(t, v2.Normalize)
    as_before = v2.Compose([s for s in t.transforms if not isinstance(s, (Contiguous, v2.Normalize))]
                           + [v2.Normalize(norm.mean, norm.std)])  # strided and out of place
    assert norm.inplace and x.is_contiguous() and torch.equal(x, as_before(image))


def test_eval_transform_resizes_by_the_crop_fraction_and_centre_crops():
    cfg = load_config(None, ["data.stream.crop_fraction=0.875", "data.stream.eval_interpolation=bicubic"]).data.stream
    t = eval_transform(cfg, 224)
    resize = _find(t, v2.Resize)
    assert resize.size == [256] and resize.interpolation == InterpolationMode.BICUBIC
    assert _find(t, v2.CenterCrop).size == (224, 224)
    assert _find(eval_transform(load_config(None, ["data.stream.crop_fraction=0.95"]).data.stream, 224),
                 v2.Resize).size == [235]  # floor(224 / 0.95), timm's crop_pct
    out = t(Image.new("RGB", (300, 200)))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32


@pytest.mark.parametrize("override, words", [
    ("data.pipeline=lmdb", "data.pipeline"), ("data.workers=-1", "data.workers"),
    ("data.stream.scale=[0.5,0.1]", "data.stream.scale"), ("data.stream.erasing_mode=noise", "erasing_mode"),
    ("data.stream.auto_augment=trivial", "auto_augment"), ("data.stream.hflip=1.5", "hflip"),
    ("data.stream.crop_fraction=0", "crop_fraction"), ("data.stream.crop_fraction=0.001", "must be in [0.25, 1]"),
    ("data.stream.mean=[0.5]", "data.stream.mean"),
    ("data.stream.mixup_alpha=-1", "mixup_alpha")])
def test_bad_stream_values_are_one_line_errors(override, words):
    with pytest.raises(AttnlabError) as info:
        load_config(None, [override])
    assert words in str(info.value) and "\n" not in str(info.value)


# ---- mixup / cutmix and the soft-target loss ---------------------------------------------------------------------


def test_mixup_targets_and_soft_loss_match_a_hand_computation():
    torch.manual_seed(0)
    x, y, c, ls = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0]), 5, 0.1
    mixer = BatchMixer(c, mixup_alpha=0.4)
    assert mixer.mixup.alpha == 0.4 and mixer.mixup.num_classes == c and mixer.cutmix is None
    before = torch.get_rng_state()
    mixed, soft = mixer(x.clone(), y, seed=123)
    assert torch.equal(torch.get_rng_state(), before)  # the draws leave the process's RNG alone
    again, soft2 = mixer(x.clone(), y, seed=123)
    assert torch.equal(mixed, again) and torch.equal(soft, soft2)  # a pure function of the seed
    lam = float(soft[1, 1])  # sample 1 (class 1) mixed with sample 0 (class 0)
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
    hand_t = lam * F.one_hot(y, c).float() + (1 - lam) * F.one_hot(y.roll(1, 0), c).float()
    torch.testing.assert_close(soft, hand_t)
    logits = torch.randn(6, c)
    smoothed = hand_t * (1 - ls) + ls / c  # timm: Mixup(label_smoothing) then SoftTargetCrossEntropy
    hand = -(smoothed * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(F.cross_entropy(logits, soft, label_smoothing=ls), hand)


def test_cutmix_weights_are_the_pasted_area_and_unmixed_batches_are_one_hot():
    torch.manual_seed(1)
    x, y, c = torch.rand(4, 3, 16, 16) + torch.arange(4).view(4, 1, 1, 1) * 10, torch.tensor([0, 1, 2, 1]), 3
    mixer = BatchMixer(c, cutmix_alpha=1.0)
    for seed in range(5):
        mixed, soft = mixer(x.clone(), y, seed=seed)
        pasted = (mixed[0] == x[3]).all(0).float().mean()  # sample 0 receives a box from sample 3 (roll by one)
        kept = (mixed[0] == x[0]).all(0).float().mean()
        assert float(kept + pasted) == pytest.approx(1.0)
        want = kept * F.one_hot(y[0], c).float() + pasted * F.one_hot(y[3], c).float()
        torch.testing.assert_close(soft[0], want)
    never = BatchMixer(c, mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.0)
    out, soft = never(x.clone(), y, seed=0)
    assert torch.equal(out, x) and torch.equal(soft, F.one_hot(y, c).float())
    both = BatchMixer(c, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5)
    kinds = set()
    for seed in range(20):  # cutmix leaves most pixels of sample 0 unchanged; mixup changes every pixel
        out, _ = both(x.clone(), y, seed=seed)
        kinds.add(bool((out[0] == x[0]).any()))
    assert kinds == {True, False}


# ---- end to end -------------------------------------------------------------------------------------------------


def test_generated_folder_trains_resumes_exactly_and_evaluates(tmp_path):
    data = make_folder(tmp_path / "folder")
    whole = train(load_config(None, stream_overrides(tmp_path, "whole", data)))
    assert whole["dataset"] == "imagefolder" and whole["epochs"] == 2

    # The same run killed at the second step of epoch 2 (2 steps per epoch: 20 train images, batch 8) with one
    # worker, resumed with none: the epoch restarts from its first batch with the same order and augmentation.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-m", "attnlab", "train",
                           *stream_overrides(tmp_path, "cut", data, ["data.workers=1", "debug.kill_at_step=3"])],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    cut = tmp_path / "cut"
    assert load_checkpoint(cut / "checkpoint_last.pt")["epoch"] == 1
    from attnlab.cli import main
    with pytest.raises(SystemExit) as info:
        main(["train", "--resume", str(cut), "data.workers=0"])
    assert info.value.code == 0
    a, b = load_checkpoint(tmp_path / "whole" / "checkpoint_last.pt"), load_checkpoint(cut / "checkpoint_last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)

    # attnlab eval streams the test split through the evaluation transform: the same top-1 as the run's results.
    with pytest.raises(SystemExit) as info:
        main(["eval", "--checkpoint", str(tmp_path / "whole"), "--split", "test", "--device", "cpu"])
    assert info.value.code == 0
    evaluated = json.loads((tmp_path / "whole" / "eval_test.json").read_text())
    assert evaluated["images"] == 8 and evaluated["top1"] == pytest.approx(whole["test_top1"])


def test_stream_batches_have_the_configured_shape_and_soft_targets(tmp_path):
    data = make_folder(tmp_path / "folder", train=6, val=2)
    cfg = load_config(None, stream_overrides(tmp_path, "shape", data, ["data.workers=0", "data.val_size=0"]))
    loaders = build_loaders(cfg, torch.device("cpu"), 4, 8)
    assert loaders.val is None and len(loaders.train) == 3 and loaders.bundle.image_size == 32
    x, y = next(iter(loaders.train))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, 2) and torch.allclose(y.sum(1), torch.ones(4))
    x, y = next(iter(loaders.test))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    plain = build_loaders(load_config(None, stream_overrides(tmp_path, "plain", data, ["data.augment=false"])),
                          torch.device("cpu"), 4, 8)
    assert plain.train.mixer is None and plain.train.dataset.transform.transforms[0].size == [36]  # floor(32/.875)


@pytest.mark.parametrize("workers", [0, 1])
def test_an_undecodable_image_is_a_one_line_error(tmp_path, workers):
    data = make_folder(tmp_path / "folder", train=4, val=1, size=40)
    (data / "train" / "class1" / "0002.jpg").write_bytes(b"not a jpeg")
    cfg = load_config(None, stream_overrides(tmp_path, "bad", data, [f"data.workers={workers}", "data.val_size=0"]))
    loaders = build_loaders(cfg, torch.device("cpu"), 8, 8)
    with pytest.raises(AttnlabError) as info:
        list(loaders.train)
    message = str(info.value)
    assert message.startswith("cannot decode image ") and "0002.jpg" in message and "\n" not in message


@pytest.mark.skipif(not TINY.is_dir(), reason="offline Tiny-ImageNet-50 copy not found")
def test_tiny_imagenet_streams_at_64px(tmp_path):
    over = ["name=tin", f"out_dir={tmp_path}", "data.name=tiny-imagenet", "data.pipeline=stream",
            "data.image_size=64", "data.subset=2", "data.val_size=10", "data.test_subset=1", "data.workers=2",
            "data.stream.crop_fraction=0.875", "model.name=resnet20", "train.epochs=2", "train.batch_size=16",
            "train.eval_batch_size=50", "train.schedule=multistep", "train.deterministic=true",
            "debug.max_steps_per_epoch=2", "device=cpu"]
    cfg = load_config(None, over)
    loaders = build_loaders(cfg, torch.device("cpu"), 16, 50)
    assert loaders.bundle.num_classes == 50 and len(loaders.bundle.train) == 90 and len(loaders.bundle.test) == 50
    x, _ = next(iter(loaders.test))
    assert x.shape == (50, 3, 64, 64)
    whole = train(load_config(None, over))
    assert whole["epochs"] == 2 and 0 <= whole["test_top1"] <= 100
    # Resume at the epoch boundary: one epoch, then --resume with train.epochs=2 (a constant lr, so the schedule
    # does not depend on the planned length) ends with the uninterrupted run's weights.
    train(load_config(None, [*over, "name=tin_cut", "train.epochs=1"]))
    cut = tmp_path / "tin_cut"
    train(resume_config(cut, ["train.epochs=2"]), resume=cut)
    a, b = load_checkpoint(tmp_path / "tin" / "checkpoint_last.pt"), load_checkpoint(cut / "checkpoint_last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)


def test_memory_stays_flat_as_the_folder_grows(tmp_path):
    """Peak RSS growth over one epoch with 100 and 800 images (96 px; 800 decoded would be 22 MB) stays the same;
    what the loader keeps per image is its file name and label."""
    small = make_folder(tmp_path / "small", classes=2, train=50, val=1, size=96, seed=1)
    big = make_folder(tmp_path / "big", classes=2, train=400, val=1, size=96, seed=2)
    script = textwrap.dedent("""
        import resource, sys, torch
        from attnlab.data.stream import FileSplit, ImageFiles, StreamLoader
        from attnlab.data.datasets import select_pools
        from attnlab.data.transforms import train_transform
        from attnlab.engine.config import load_config
        torch.set_num_threads(1)
        *_, pool, _, idx, _ = select_pools("imagefolder", sys.argv[1], val_size=0)
        t = train_transform(load_config(None, ["data.stream.scale=[0.5,1.0]"]).data.stream, 32)
        warm = StreamLoader(ImageFiles(FileSplit.from_pool("train", pool, idx[:100]), t, random=True), 50)
        for _ in warm:  # first-use allocations (PIL, the transforms' kernels) before the measurement
            pass
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loader = StreamLoader(ImageFiles(FileSplit.from_pool("train", pool, idx), t, random=True), 50, shuffle=True)
        for epoch in range(2):
            loader.set_epoch(epoch)
            for x, y in loader:
                pass
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(len(loader.dataset), after - before, loader.resident_bytes())
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = {}
    for folder in (small, big):
        proc = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        n, growth_kb, resident = (int(v) for v in proc.stdout.split())
        out[n] = (growth_kb, resident)
    assert set(out) == {100, 800}
    assert out[800][1] <= 800 * 64  # file names and labels only
    assert out[800][0] - out[100][0] < 4 * 1024, out  # < 4 MB more peak memory for 8x the images (22 MB decoded)


def _tiny_jpegs(root: Path, n: int, size: int = 32) -> Path:
    """root/train/class{0,1}/*.jpg (and one val image each): ``n`` small JPEGs (one encoded image per class written
    ``n / 2`` times, so 8k files take a second)."""
    import io
    rng = np.random.default_rng(0)
    blobs = []
    for c in range(2):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
        blobs.append(buf.getvalue())
    for c in range(2):
        d = root / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(n // 2):
            (d / f"{i:05d}.jpg").write_bytes(blobs[c])
        (root / "val" / f"class{c}").mkdir(parents=True)
        (root / "val" / f"class{c}" / "0.jpg").write_bytes(blobs[c])
    return root


def test_peak_memory_of_a_loader_pass_with_workers_stays_flat_from_1k_to_8k_images(tmp_path):
    """One pass over 1,000 and over 8,000 tiny JPEGs with 2 DataLoader workers: the peak RSS of the main process and
    of the largest worker grows by the same amount (8,000 images held decoded would be 24 MB as uint8, 98 MB as
    float32 batches; the tolerance is 8 MB)."""
    script = textwrap.dedent("""
        import resource, sys, torch
        from torchvision.transforms import v2
        from attnlab.data.stream import FileSplit, ImageFiles, StreamLoader
        from attnlab.data.datasets import select_pools
        torch.set_num_threads(1)
        t = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
        def split(folder, n):
            *_, pool, _, idx, _ = select_pools("imagefolder", folder, val_size=0)
            return FileSplit.from_pool("train", pool, idx[:n])
        warm = StreamLoader(ImageFiles(split(sys.argv[1], 256), t), 256, workers=2)
        for _ in warm:  # first-use allocations (PIL, the workers' imports) before the measurement
            pass
        self0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        loader = StreamLoader(ImageFiles(split(sys.argv[1], None), t), 256, shuffle=True, workers=2)
        seen = sum(len(y) for _, y in loader)
        self1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(seen, self1 - self0, kids1, loader.resident_bytes())
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = {}
    for n in (1000, 8000):
        folder = _tiny_jpegs(tmp_path / f"f{n}", n)
        # about 3 s of CPU for the 8k pass; the generous timeout is for a loaded machine, not the expected time
        proc = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen, self_growth_kb, worker_peak_kb, resident = (int(v) for v in proc.stdout.split())
        assert seen == n
        out[n] = (self_growth_kb, worker_peak_kb, resident)
    assert out[8000][2] <= 8000 * 64  # what the loader keeps: file names and labels
    assert out[8000][0] - out[1000][0] < 8 * 1024, out  # main process: peak growth over the pass, in KB
    assert out[8000][1] - out[1000][1] < 8 * 1024, out  # the largest worker's peak


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_stream_trains_under_torchrun_with_two_processes(tmp_path):
    data = make_folder(tmp_path / "folder")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # 19 training images (2 steps of 2 x 4 per epoch) and 5 validation images: rank 1's shard is padded.
    over = stream_overrides(tmp_path, "ddp", data, ["data.workers=1", "train.deterministic=false", "data.val_size=5"])
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "attnlab", "train", *over],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs"] == 2
    ck = load_checkpoint(tmp_path / "ddp" / "checkpoint_last.pt")
    assert ck["epoch"] == 2 and ck["scheduler"]["last_epoch"] == 2 * 2  # 20 images / global batch 8, per epoch
    # Sharded validation counts every image once: the same top-1 as one process evaluating checkpoint_last.
    from attnlab.cli import main
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(tmp_path / "ddp" / "checkpoint_last.pt"), "--split", "val", "--device", "cpu",
              "--out", str(tmp_path / "val.json")])
    single = json.loads((tmp_path / "val.json").read_text())
    last_row = (tmp_path / "ddp" / "metrics.csv").read_text().splitlines()[-1].split(",")
    header = (tmp_path / "ddp" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert single["images"] == 5
    assert float(last_row[header.index("val_top1")]) == pytest.approx(single["top1"])
    # Resume of the finished run under torchrun says it is complete.
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "attnlab", "train", "--resume",
                           str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "complete" in proc.stdout, proc.stderr[-3000:]
