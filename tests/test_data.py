"""Data layer: sources, splits, the decoded cache and the batch loader, on real shared data and small generated
folders."""
import io
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from attnlab.data import BatchLoader, Split, channel_stats, crop_flip, load_dataset
from attnlab.data import cache as data_cache
from attnlab.data.splits import per_class_subset, stratified_split
from attnlab.errors import AttnlabError

needs_cifar = pytest.mark.needs_data("cifar10")


def make_folder(root: Path, classes=("a", "b", "c"), per_class=(6, 2), size=(8, 8), ext="png", seed=0):
    """An ImageFolder with train/ and test/ of random RGB images; returns the root."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:03d}.{ext}")
    return root


@pytest.fixture(scope="module")
def cifar(tmp_path_factory, cifar10_dir):
    return load_dataset("cifar10", subset=30, test_subset=10, seed=0, cache_dir=tmp_path_factory.mktemp("cache"))


# ---------------------------------------------------------------- splits


@needs_cifar
def test_cifar_subset_splits_are_disjoint_stratified_and_sized(cifar):
    assert cifar.num_classes == 10 and cifar.classes[0] == "airplane" and cifar.image_size == 32
    # subset=30 per class -> 300 pool images, val defaults to 10% of the pool, stratified: 3 per class.
    assert len(cifar.train) == 270 and len(cifar.val) == 30 and len(cifar.test) == 100
    assert cifar.train.class_counts(10) == [27] * 10
    assert cifar.val.class_counts(10) == [3] * 10
    assert cifar.test.class_counts(10) == [10] * 10
    assert not set(cifar.train.files) & set(cifar.val.files)
    assert all(f.startswith("train/") for f in cifar.train.files + cifar.val.files)
    assert all(f.startswith("test/") for f in cifar.test.files)
    # labels agree with the class folder of each file
    for split in (cifar.train, cifar.val, cifar.test):
        assert [cifar.classes[i] for i in split.labels.tolist()] == [f.split("/")[1] for f in split.files]
    assert cifar.train.images.shape == (270, 3, 32, 32) and cifar.train.images.dtype == torch.uint8
    assert cifar.train.labels.dtype == torch.int64


@needs_cifar
def test_splits_fixed_by_seed_and_val_size_override(cifar, tmp_path):
    again = load_dataset("cifar10", subset=30, test_subset=10, seed=0, cache_dir=tmp_path)
    assert again.train.files == cifar.train.files and again.val.files == cifar.val.files
    assert torch.equal(again.train.images, cifar.train.images)
    other = load_dataset("cifar10", subset=30, test_subset=10, seed=1, cache_dir=tmp_path)
    assert other.train.files != cifar.train.files
    assert other.test.files == cifar.test.files  # the test subset does not depend on the seed
    counted = load_dataset("cifar10", subset=30, test_subset=10, val_size=50, cache_dir=tmp_path)
    assert len(counted.val) == 50 and counted.val.class_counts(10) == [5] * 10 and len(counted.train) == 250
    frac = load_dataset("cifar10", subset=30, test_subset=10, val_size=0.2, cache_dir=tmp_path)
    assert len(frac.val) == 60 and frac.val.class_counts(10) == [6] * 10
    # a smaller subset is contained in a larger one for the same seed
    small = load_dataset("cifar10", subset=10, test_subset=10, val_size=0, cache_dir=tmp_path)
    assert len(small.val) == 0 and set(small.train.files) <= set(cifar.train.files) | set(cifar.val.files)


def test_stratified_split_cifar10_default_counts():
    labels = np.repeat(np.arange(10), 5000)
    train, val = stratified_split(labels, 5000, seed=0)
    assert len(val) == 5000 and len(train) == 45000
    assert np.bincount(labels[val]).tolist() == [500] * 10
    assert not set(train) & set(val) and len(set(train) | set(val)) == 50000
    train2, val2 = stratified_split(labels, 5000, seed=0)
    assert np.array_equal(val, val2)
    assert not np.array_equal(val, stratified_split(labels, 5000, seed=1)[1])
    # uneven classes: largest remainders get the extra images, the total is exact
    uneven = np.array([0] * 7 + [1] * 3)
    assert np.bincount(uneven[stratified_split(uneven, 5, 0)[1]], minlength=2).tolist() == [4, 1]
    assert len(per_class_subset(labels, 3, seed=0)) == 30


@pytest.mark.parametrize("bad", [-1, 1.5, "x", True])
def test_bad_val_size_and_subset_raise(tmp_path, bad):
    root = make_folder(tmp_path / "ds")
    with pytest.raises(AttnlabError, match="val_size"):
        load_dataset("imagefolder", data_dir=root, val_size=bad, cache_dir=tmp_path / "c")
    with pytest.raises(AttnlabError, match="subset"):
        load_dataset("imagefolder", data_dir=root, subset=bad if bad != 1.5 else 0, cache_dir=tmp_path / "c")
    with pytest.raises(AttnlabError, match="^test_subset must be a positive number of images per class"):
        load_dataset("imagefolder", data_dir=root, test_subset=bad if bad != 1.5 else 0, cache_dir=tmp_path / "c")
    with pytest.raises(AttnlabError, match="seed must be an integer >= 0"):
        load_dataset("imagefolder", data_dir=root, seed=bad if bad != "x" else -2, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("bad", ["32", 0, (32,), (32, -1), True])
def test_a_bad_image_size_is_refused(tmp_path, bad):
    root = make_folder(tmp_path / "ds")  # "32" must not become a 3 x 2 resize
    with pytest.raises(AttnlabError, match="image_size must be a positive int or \\(height, width\\)"):
        load_dataset("imagefolder", data_dir=root, image_size=bad, cache_dir=tmp_path / "c")


@needs_cifar
def test_mean_std_are_float64_train_statistics(cifar):
    x = cifar.train.images.numpy().astype(np.float64) / 255.0
    assert np.allclose(cifar.mean, x.mean(axis=(0, 2, 3)), atol=1e-12)
    assert np.allclose(cifar.std, x.std(axis=(0, 2, 3)), atol=1e-12)
    # normalised eval batches have zero mean and unit std per channel over the train split
    loader = BatchLoader(cifar.train, 64, mean=cifar.mean, std=cifar.std)
    xb = torch.cat([b for b, _ in loader]).double()
    assert torch.allclose(xb.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(xb.std((0, 2, 3), correction=0), torch.ones(3, dtype=torch.float64), atol=1e-5)


# ---------------------------------------------------------------- sources, cache and errors


def test_imagefolder_cache_reused_then_rebuilt_when_a_file_changes(tmp_path):
    root = make_folder(tmp_path / "ds")
    cache_dir = tmp_path / "cache"
    before = data_cache.STATS["decoded"]
    first = load_dataset("imagefolder", data_dir=root, cache_dir=cache_dir)
    assert data_cache.STATS["decoded"] - before == 18 + 6  # every train and test image decoded once
    entries = sorted(cache_dir.glob("*.images.npy"))
    assert len(entries) == 2
    mtimes = [p.stat().st_mtime_ns for p in entries]
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]  # temp files were renamed away

    before = data_cache.STATS["decoded"]
    second = load_dataset("imagefolder", data_dir=root, cache_dir=cache_dir)
    assert data_cache.STATS["decoded"] == before  # nothing decoded: the cache was used
    assert [p.stat().st_mtime_ns for p in entries] == mtimes
    assert torch.equal(first.train.images, second.train.images)
    assert first.mean == second.mean

    # change one test image's pixels: the test cache is rebuilt, the train cache is reused
    target = root / "test" / "b" / "001.png"
    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(target)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    before = data_cache.STATS["decoded"]
    third = load_dataset("imagefolder", data_dir=root, cache_dir=cache_dir)
    assert data_cache.STATS["decoded"] - before == 6
    row = third.test.files.index("test/b/001.png")
    assert bool((third.test.images[row] == 7).all())
    assert torch.equal(third.train.images, first.train.images)


@pytest.mark.parametrize("bad", ["smaller", "float32", "two_channels"])
def test_a_cache_entry_of_another_size_or_type_is_rebuilt_not_trained_on(tmp_path, bad):
    root = make_folder(tmp_path / "ds")
    cache_dir = tmp_path / "cache"
    first = load_dataset("imagefolder", data_dir=root, cache_dir=cache_dir)
    expected = first.test.images.clone()  # a copy: the loaded images map the entry's file, rewritten below
    entry = next(p for p in cache_dir.glob("*.images.npy") if np.load(p).shape[0] == len(first.test))
    n = len(first.test)
    np.save(entry, {"smaller": np.zeros((n, 3, 4, 4), np.uint8), "float32": np.zeros((n, 3, 8, 8), np.float32),
                    "two_channels": np.zeros((n, 2, 8, 8), np.uint8)}[bad])
    before = data_cache.STATS["decoded"]
    again = load_dataset("imagefolder", data_dir=root, cache_dir=cache_dir)
    assert data_cache.STATS["decoded"] - before == n  # that split decoded anew, the other read from its entry
    assert torch.equal(again.test.images, expected)


def test_imagefolder_structure_and_default_val_fraction(tmp_path):
    root = make_folder(tmp_path / "ds", per_class=(10, 3))
    bundle = load_dataset("imagefolder", data_dir=root, cache_dir=None, seed=3)
    assert bundle.classes == ["a", "b", "c"] and bundle.image_size == 8
    assert len(bundle.val) == 3 and bundle.val.class_counts(3) == [1, 1, 1] and len(bundle.test) == 9
    # pixels are exactly the PNGs' (lossless), in C x H x W order
    f = bundle.test.files[4]
    assert np.array_equal(bundle.test.images[4].permute(1, 2, 0).numpy(), np.asarray(Image.open(root / f)))


def test_corrupt_image_error_names_the_file(tmp_path):
    root = make_folder(tmp_path / "ds")
    bad = root / "train" / "c" / "002.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(AttnlabError, match=r"cannot decode image .*train/c/002\.png"):
        load_dataset("imagefolder", data_dir=root, cache_dir=tmp_path / "cache")


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "train" / "d").mkdir()                                       # would train as a 4th, empty class
    (root / "train" / "d" / "notes.txt").write_text("not an image")
    with pytest.raises(AttnlabError, match=r"class folder .*ds/train/d holds no images") as err:
        load_dataset("imagefolder", data_dir=root, cache_dir=tmp_path / "cache")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    (root / "train" / "d" / "notes.txt").unlink()
    (root / "train" / "d").rmdir()
    (root / "test" / "c").rename(root / "test" / "c_gone")              # an empty or absent test class is fine
    (root / "test" / "c").mkdir()
    (root / "test" / "c_gone" / "000.png").rename(root / "test" / "a" / "900.png")
    (root / "test" / "c_gone" / "001.png").unlink()
    (root / "test" / "c_gone").rmdir()
    bundle = load_dataset("imagefolder", data_dir=root, cache_dir=None, val_size=0)
    assert bundle.classes == ["a", "b", "c"] and bundle.test.class_counts(3) == [3, 2, 0]


def test_empty_tiny_imagenet_class_is_an_error_naming_it(tmp_path):
    root = tmp_path / "tiny"
    (root / "train" / "n01" / "images").mkdir(parents=True)
    (root / "train" / "n02" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "train" / "n01" / "images" / "n01_0.JPEG")
    (root / "wnids.txt").write_text("n01\nn02\n")
    with pytest.raises(AttnlabError, match=r"class folder .*tiny/train/n02/images holds no images"):
        load_dataset("tiny-imagenet", data_dir=root, cache_dir=None)


def test_sizes_differ_needs_image_size_then_resizes(tmp_path):
    root = make_folder(tmp_path / "ds")
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(root / "train" / "a" / "009.png")
    with pytest.raises(AttnlabError, match=r"differ in size.*009\.png.*image_size"):
        load_dataset("imagefolder", data_dir=root, cache_dir=tmp_path / "cache")
    bundle = load_dataset("imagefolder", data_dir=root, cache_dir=tmp_path / "cache", image_size=16, val_size=0)
    assert bundle.train.images.shape[1:] == (3, 16, 16) and bundle.test.images.shape[1:] == (3, 16, 16)
    assert bundle.image_size == 16


def test_greyscale_and_jpeg_become_rgb(tmp_path):
    root = make_folder(tmp_path / "ds", ext="jpg")
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8), mode="L").save(root / "train" / "a" / "000.jpg")
    bundle = load_dataset("imagefolder", data_dir=root, cache_dir=None, val_size=0)
    row = bundle.train.files.index("train/a/000.jpg")
    assert bundle.train.images.shape[1] == 3
    assert bool((bundle.train.images[row].int() - 200).abs().max() <= 2)


def test_missing_dataset_says_where_it_looked(tmp_path, monkeypatch):
    nowhere = tmp_path / "nowhere"
    fetch = r"load_dataset\('cifar10', download=True\)"
    with pytest.raises(AttnlabError, match=rf"not found; looked in: .*nowhere.*data\.data_dir.*{fetch}"):
        load_dataset("cifar10", data_dir=nowhere)
    monkeypatch.setenv("ATTNLAB_DATA", str(tmp_path / "empty"))
    with pytest.raises(AttnlabError, match=r"looked in: .*empty/cifar10-jpeg.*ATTNLAB_DATA"):
        load_dataset("cifar10")
    with pytest.raises(AttnlabError, match=r"empty/tiny-imagenet-50"):
        load_dataset("tiny-imagenet")
    with pytest.raises(AttnlabError, match="data_dir"):
        load_dataset("imagefolder")
    with pytest.raises(AttnlabError, match="unknown dataset 'cifar11'.*cifar10"):
        load_dataset("cifar11")


def test_attnlab_data_env_points_at_a_folder_of_datasets(tmp_path, monkeypatch):
    make_folder(tmp_path / "datasets" / "cifar10-jpeg", classes=("x", "y"))
    monkeypatch.setenv("ATTNLAB_DATA", str(tmp_path / "datasets"))
    bundle = load_dataset("cifar10", cache_dir=None)
    assert bundle.classes == ["x", "y"] and len(bundle.train) + len(bundle.val) == 12


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_torchvision_pickle_formats(tmp_path):
    rng = np.random.default_rng(0)
    d10 = tmp_path / "c10" / "cifar-10-batches-py"
    d10.mkdir(parents=True)
    _write_pickle(d10 / "batches.meta", {"label_names": [f"k{i}" for i in range(10)]})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write_pickle(d10 / name, {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                                   "labels": list(range(10)) * 2})
    bundle = load_dataset("cifar10", data_dir=tmp_path / "c10", cache_dir=None)  # data_dir holding the folder
    assert bundle.classes[3] == "k3" and len(bundle.train) + len(bundle.val) == 100 and len(bundle.test) == 20
    raw = pickle.load(open(d10 / "test_batch", "rb"))["data"].reshape(-1, 3, 32, 32)
    assert np.array_equal(bundle.test.images.numpy(), raw)

    d100 = tmp_path / "cifar-100-python"
    d100.mkdir()
    _write_pickle(d100 / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]})
    for name, n in (("train", 300), ("test", 100)):
        _write_pickle(d100 / name, {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                    "fine_labels": [i % 100 for i in range(n)]})
    b100 = load_dataset("cifar100", data_dir=d100, cache_dir=None)  # or the folder itself
    assert b100.num_classes == 100 and len(b100.val) == 30 and b100.val.class_counts(100).count(0) == 70


class _RunsCommand:
    """Unpickling this runs a shell command: the classic malicious-pickle payload."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _cifar10_folder(root, batch=None):
    """A tiny fake cifar-10-batches-py: 10 classes, 20 images per batch; ``batch`` replaces data_batch_1."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    _write_pickle(root / "batches.meta", {"label_names": [f"k{i}" for i in range(10)]})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write_pickle(root / name, {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                                    "labels": list(range(10)) * 2})
    if batch is not None:
        (root / "data_batch_1").write_bytes(batch)
    return root


@pytest.mark.parametrize("payload", ["os.system", "eval", "object array", "array subclass", "top-level list",
                                     "huge placeholder"])
def test_malicious_cifar_batch_never_runs_code(tmp_path, payload):
    marker = tmp_path / "pwned"
    labels = list(range(10)) * 2
    data = {"data": np.zeros((20, 3072), dtype=np.uint8), "labels": labels}
    if payload == "os.system":
        data["data"] = _RunsCommand(f"touch {marker}")
        live = tmp_path / "live"                     # the payload is real: plain pickle runs it
        pickle.loads(pickle.dumps(_RunsCommand(f"touch {live}")))
        assert live.exists()
    elif payload == "eval":
        data["batch_label"] = type("E", (), {"__reduce__": lambda self: (eval, (f"open({str(marker)!r}, 'w')",))})()
    elif payload == "object array":
        data["data"] = np.array([1, "x"], dtype=object)
    elif payload == "array subclass":
        data["data"] = np.zeros((20, 3072), dtype=np.uint8).view(np.ma.MaskedArray)
    else:
        data = [data]
    raw = pickle.dumps(data, protocol=2)
    if payload == "huge placeholder":  # numpy's empty (0,) placeholder made 2**40 long: a terabyte to allocate
        huge = pickle.dumps(2 ** 40, protocol=2)[2:-1]  # the LONG1 opcode for 2**40
        raw, n = re.subn(rb"(cnumpy\nndarray\nq.)K\x00\x85", lambda m: m.group(1) + huge + b"\x85", raw)
        assert n == 1
    folder = _cifar10_folder(tmp_path / "cifar-10-batches-py", raw)
    with pytest.raises(AttnlabError, match=r"refusing CIFAR batch file .*data_batch_1: it holds .*never") as err:
        load_dataset("cifar10", data_dir=folder, cache_dir=None)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def py2_cifar_batch(pixels, labels, batch_label):
    """A batch as the original CIFAR files store it: Python 2 cPickle protocol 2, str keys, the pixels as one raw
    BINSTRING (which a latin1 load turns into str), numpy.core names. Written opcode by opcode."""
    def text(t):
        b = t.encode("latin1")
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def integer(n):
        return b"K" + bytes([n]) if n < 256 else b"M" + struct.pack("<H", n)

    rows, cols = pixels.shape
    raw = pixels.tobytes()
    dtype = (b"cnumpy\ndtype\nq\x03" + text("u1") + integer(0) + integer(1) + b"\x87R(" + integer(3) + text("|")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + integer(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02" + integer(0) + b"\x85" + text("b")
             + b"\x87R(" + integer(1) + integer(rows) + integer(cols) + b"\x86" + dtype + b"\x89"
             + b"T" + struct.pack("<I", len(raw)) + raw + b"tb")
    items = (text("batch_label") + text(batch_label) + text("labels") + b"](" + b"".join(map(integer, labels))
             + b"e" + text("data") + array)
    return b"\x80\x02}q\x00(" + items + b"u."


@pytest.mark.parametrize("style", ["python2", "protocol2", "protocol5"])
def test_real_cifar_batch_formats_load(tmp_path, style):
    """The original files (Python 2), and what Python 3 writes at protocol 2 (_codecs.encode) and 5 (_frombuffer)."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    labels = list(range(10)) * 2
    batch = {"batch_label": b"training batch 1 of 5", "labels": labels, "data": pixels,
             "filenames": [f"img_{i}.png".encode() for i in range(20)]}
    if style == "python2":
        raw = py2_cifar_batch(pixels, labels, "training batch 1 of 5")
        assert np.array_equal(pickle.loads(raw, encoding="latin1")["data"], pixels)  # what plain pickle reads
    elif style == "protocol2":
        raw = pickle.dumps(batch, protocol=2)
        assert b"_codecs" in raw
    else:
        raw = pickle.dumps(batch, protocol=5)
        assert b"_frombuffer" in raw
    folder = _cifar10_folder(tmp_path / "cifar-10-batches-py", raw)
    bundle = load_dataset("cifar10", data_dir=folder, cache_dir=None, val_size=0)
    assert bundle.classes == [f"k{i}" for i in range(10)] and len(bundle.train) == 100
    assert np.array_equal(bundle.train.images[:20].numpy(), pixels.reshape(-1, 3, 32, 32))
    assert bundle.train.labels[:20].tolist() == labels


def test_torn_cifar_batch_is_a_clean_error(tmp_path):
    good = pickle.dumps({"data": np.zeros((20, 3072), dtype=np.uint8), "labels": [0] * 20}, protocol=2)
    folder = _cifar10_folder(tmp_path / "cifar-10-batches-py", good[: len(good) // 2])
    with pytest.raises(AttnlabError, match=r"cannot read CIFAR batch file .*data_batch_1"):
        load_dataset("cifar10", data_dir=folder, cache_dir=None)
    _write_pickle(folder / "data_batch_1", {"data": np.zeros((20, 3072), dtype=np.uint8), "labels": [0] * 19})
    with pytest.raises(AttnlabError, match=r"data_batch_1: labels must be 20 integers in 0..9"):
        load_dataset("cifar10", data_dir=folder, cache_dir=None)


def test_tiny_imagenet_boxes_are_aligned_with_images(tmp_path, tiny_imagenet_dir):
    TINY = tiny_imagenet_dir
    bundle = load_dataset("tiny-imagenet", subset=4, test_subset=2, cache_dir=tmp_path)
    wnids = (TINY / "wnids.txt").read_text().split()
    assert bundle.classes == wnids and bundle.num_classes == 50 and bundle.image_size == 64
    assert len(bundle.train) + len(bundle.val) == 200 and len(bundle.test) == 100
    assert bundle.test.images.shape[1:] == (3, 64, 64)
    for split in (bundle.train, bundle.val):
        assert split.boxes.shape == (len(split), 4)
        for i in (0, len(split) // 2, len(split) - 1):
            wnid = split.files[i].split("/")[1]
            assert wnids[int(split.labels[i])] == wnid
            boxes_txt = (TINY / "train" / wnid / f"{wnid}_boxes.txt").read_text()
            lines = dict(line.split("\t", 1) for line in boxes_txt.splitlines())
            want = [float(v) for v in lines[split.files[i].rsplit("/", 1)[1]].split()]
            assert split.boxes[i].tolist() == want
    val_txt = (TINY / "val" / "val_annotations.txt").read_text()
    ann = {line.split("\t")[0]: line.split("\t")[1:] for line in val_txt.splitlines()}
    for i in range(0, len(bundle.test), 17):
        wnid, *box = ann[bundle.test.files[i].rsplit("/", 1)[1]]
        assert wnids[int(bundle.test.labels[i])] == wnid
        assert bundle.test.boxes[i].tolist() == [float(v) for v in box]
    # resizing scales the boxes with the images (64 -> 32: inclusive 63 -> 31)
    small = load_dataset("tiny-imagenet", subset=4, test_subset=2, cache_dir=tmp_path, image_size=32)
    assert torch.allclose(small.test.boxes, (bundle.test.boxes + torch.tensor([0., 0., 1., 1.])) / 2
                          - torch.tensor([0., 0., 1., 1.]))


# ---------------------------------------------------------------- loader


def _split(n=50, size=8, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)  # no zeros: padding shows
    return Split("train", images, torch.arange(n) % classes)


def test_loader_builds_batches_with_its_capped_threads_and_gives_the_trainings_back():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for cap, inside in ((1, 1), (None, 2), (4, 2)):  # a cap above the training's threads changes nothing
            loader = BatchLoader(_split(), 16, shuffle=True, augment=True, seed=0, cpu_threads=cap)
            build, seen = loader._batch, []
            loader._batch = lambda *a: (seen.append(torch.get_num_threads()), build(*a))[1]
            for _ in loader:
                seen.append(("after", torch.get_num_threads()))
            assert seen[:2] == [inside, ("after", 2)] and len(seen) == 2 * len(loader), (cap, seen)
    finally:
        torch.set_num_threads(before)


def test_loader_deterministic_per_seed_and_epoch():
    split = _split()
    a = BatchLoader(split, 16, shuffle=True, augment=True, seed=5)
    b = BatchLoader(split, 16, shuffle=True, augment=True, seed=5)
    assert len(a) == 4
    for epoch in (0, 3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        batches_a, batches_b = list(a), list(b)
        assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(batches_a, batches_b))
    a.set_epoch(0)
    e0 = torch.cat([x for x, _ in a])
    a.set_epoch(1)
    e1 = torch.cat([x for x, _ in a])
    assert not torch.equal(e0, e1)
    assert not torch.equal(a.plan(0)[0], a.plan(1)[0])
    c = BatchLoader(split, 16, shuffle=True, augment=True, seed=6)
    assert not torch.equal(c.plan(0)[0], a.plan(0)[0])


def test_eval_loader_is_ordered_unaugmented_and_normalised():
    split = _split(n=37)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = BatchLoader(split, 16, mean=mean, std=std)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and [len(y) for _, y in batches] == [16, 16, 5]
    x = torch.cat([b for b, _ in batches])
    y = torch.cat([t for _, t in batches])
    assert x.dtype == torch.float32 and torch.equal(y, split.labels)
    want = (split.images.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(x.double(), want, atol=1e-5)
    assert len(BatchLoader(split, 16, drop_last=True)) == 2


def test_augmentation_is_a_padded_shifted_possibly_flipped_copy():
    split = _split(n=300, size=6)
    loader = BatchLoader(split, 64, shuffle=True, augment=True, seed=1, padding=2)
    order, offsets, flips = loader.plan()
    out = torch.cat([x for x, _ in loader])  # mean/std None: pixels in 0..1
    pixels = (out * 255).round().to(torch.uint8)
    padded = F.pad(split.images, (2, 2, 2, 2))
    seen = set()
    for k in range(len(order)):
        i, (dy, dx), f = int(order[k]), offsets[k].tolist(), bool(flips[k])
        want = padded[i, :, dy:dy + 6, dx:dx + 6]
        assert torch.equal(pixels[k], want.flip(-1) if f else want)
        seen.add((dy, dx, f))
    assert len(seen) > 30  # 5 x 5 offsets x 2 flips are all in use
    assert 0.35 < flips.float().mean() < 0.65
    # a zero border shows exactly where the crop reached into the padding
    k = next(k for k in range(len(order)) if offsets[k].tolist() == [0, 0] and not flips[k])
    assert bool((pixels[k, :, :2, :] == 0).all()) and bool((pixels[k, :, 2:, 2:] > 0).all())


def test_crop_flip_matches_torchvision_style_reference():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).view(2, 3, 4, 5)
    offsets = torch.tensor([[0, 2], [1, 0]])
    flips = torch.tensor([False, True])
    out = crop_flip(x, offsets, flips, 1)
    p = F.pad(x, (1, 1, 1, 1))
    assert torch.equal(out[0], p[0, :, 0:4, 2:7])
    assert torch.equal(out[1], p[1, :, 1:5, 0:5].flip(-1))


@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_shards_partition_the_same_permutation(drop_last):
    split = _split(n=103)
    world = 3
    single = BatchLoader(split, 8, shuffle=True, augment=True, seed=2, drop_last=drop_last)
    ranks = [BatchLoader(split, 8, shuffle=True, augment=True, seed=2, drop_last=drop_last, rank=r,
                         world_size=world) for r in range(world)]
    for loader in [single, *ranks]:
        loader.set_epoch(4)
    plans = [r.plan() for r in ranks]
    sizes = {len(p[0]) for p in plans}
    assert sizes == {34} if drop_last else sizes == {35}  # equal shards: 102 = 3*34 cut, 105 = 3*35 padded
    assert len({len(r) for r in ranks}) == 1
    shards = [set(p[0].tolist()) for p in plans]
    if drop_last:
        assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
        assert len(set().union(*shards)) == 102
    else:
        assert set().union(*shards) == set(range(103))
    # interleaving the shards gives back the single-process plan (cut or wrapped), augmentation included
    order, offsets, flips = single.plan()
    pos = torch.arange(102) if drop_last else torch.arange(105) % 103
    assert torch.equal(torch.stack([p[0] for p in plans], 1).reshape(-1), order[pos])
    assert torch.equal(torch.stack([p[1] for p in plans], 1).reshape(-1, 2), offsets[pos])
    assert torch.equal(torch.stack([p[2] for p in plans], 1).reshape(-1), flips[pos])
    # rank 0's first batch equals the samples at global positions 0, 3, 6, ... of the single-process epoch
    x0, y0 = next(iter(ranks[0]))
    xs = torch.cat([x for x, _ in single])
    assert torch.equal(x0, xs[0:24:3])


def test_loader_rejects_bad_arguments():
    split = _split()
    with pytest.raises(AttnlabError, match="batch_size"):
        BatchLoader(split, 0)
    with pytest.raises(AttnlabError, match="rank"):
        BatchLoader(split, 4, rank=2, world_size=2)
    with pytest.raises(AttnlabError, match="std"):
        BatchLoader(split, 4, mean=(0, 0, 0), std=(1, 0, 1))


@needs_cifar
def test_channel_stats_exact_against_numpy(cifar):
    mean, std = channel_stats(cifar.val.images.numpy())
    x = cifar.val.images.numpy().astype(np.float64) / 255
    assert np.allclose(mean, x.mean((0, 2, 3)), atol=1e-12) and np.allclose(std, x.std((0, 2, 3)), atol=1e-12)


def test_download_only_when_asked(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10, utils

    calls = []

    def fake_download(url, download_root, filename, md5):  # stands in for the network: unpacks the layout
        calls.append((url, download_root, filename, md5))
        d = Path(download_root) / "cifar-10-batches-py"
        d.mkdir(parents=True, exist_ok=True)
        _write_pickle(d / "batches.meta", {"label_names": [f"k{i}" for i in range(10)]})
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            _write_pickle(d / name, {"data": np.zeros((10, 3072), dtype=np.uint8), "labels": list(range(10))})

    monkeypatch.setattr(utils, "download_and_extract_archive", fake_download)
    with pytest.raises(AttnlabError, match=r"load_dataset\('cifar10', download=True\)"):
        load_dataset("cifar10", data_dir=tmp_path / "dl")
    assert calls == []  # never downloads unless asked
    bundle = load_dataset("cifar10", data_dir=tmp_path / "dl", download=True, cache_dir=None)
    assert calls == [(CIFAR10.url, str(tmp_path / "dl"), CIFAR10.filename, CIFAR10.tgz_md5)]
    assert len(bundle.test) == 10
    calls.clear()
    load_dataset("cifar10", data_dir=tmp_path / "dl", download=True, cache_dir=None)
    assert calls == []  # already there: no second download


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_decode_progress_is_plain_lines_off_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_cache, "PROGRESS_MIN_IMAGES", 4)
    root = make_folder(tmp_path / "ds", per_class=(6, 2))                 # 18 train images
    files = sorted(str(p.relative_to(root)) for p in (root / "train").rglob("*.png"))
    data_cache.decode_images(root, files, None, desc="train")
    err = capsys.readouterr().err                                          # pytest's stderr is not a terminal
    assert "\r" not in err
    assert err.splitlines() == ["train: decoded 18/18 images"]             # one chunk of 512: one line
    log = io.StringIO()
    bar = data_cache.Progress(2000, "train", stream=log)
    for _ in range(4):
        bar.update(500)
    bar.close()
    assert log.getvalue().splitlines() == [f"train: decoded {n}/2000 images" for n in (500, 1000, 1500, 2000)]
    tty = _Terminal()
    bar = data_cache.Progress(2000, "train", stream=tty)
    bar.update(2000)
    bar.close()
    assert "\r" in tty.getvalue() and "decoded" not in tty.getvalue()     # a tqdm bar on a terminal
    quiet = io.StringIO()
    data_cache.Progress(3, "small", stream=quiet).update(3)               # below the threshold (4 here): silent
    assert quiet.getvalue() == ""


def _signal_dispositions():
    import signal
    return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)


def test_a_decoder_dies_on_sigterm_even_under_a_raising_parent_handler():
    """The bench raises KeyboardInterrupt on SIGTERM; a forked decoder must not inherit that, or Pool.terminate()
    can wait forever for a decoder whose Python handler never ran."""
    import signal

    def raising(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, raising)
    try:
        pool = data_cache._pool_context().Pool(1, initializer=data_cache._start_decoder)
        try:
            term, intr = pool.apply(_signal_dispositions)
        finally:
            pool.terminate()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert term == signal.SIG_DFL     # the kernel ends it, whatever it is blocked on
    assert intr == signal.SIG_IGN     # Ctrl-C is the parent's to handle: it stops the pool
