"""Where datasets live on disk and what files they hold (no decoding here).

A *source* lists, for each of its two pools (``train`` and ``test``), the image files with their labels and,
for Tiny-ImageNet, one bounding box per image. Decoding and caching happen in ``cache.py``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import AttnlabError
from .pools import Pool, Source
from .safe_pickle import batch_field, load_cifar_batch
from .wsol_metadata import wsol_source

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

# Folder names searched inside a data root (``$ATTNLAB_DATA`` or ``../shared/data``) when no data_dir is given.
DEFAULT_FOLDERS = {
    "cifar10": ("cifar10-jpeg", "cifar-10-batches-py"),
    "cifar100": ("cifar-100-python",),
    "tiny-imagenet": ("tiny-imagenet-50", "tiny-imagenet-200"),
}
PICKLE_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def repo_root() -> Path:
    """The folder holding the ``attnlab`` package (the repository root in a checkout)."""
    return Path(__file__).resolve().parents[2]


def data_roots() -> list[Path]:
    """Folders holding datasets, in search order: ``$ATTNLAB_DATA`` alone if set, else ``../shared/data``
    relative to the repository root and to the cwd, then ``.data`` (where ``download=True`` puts CIFAR)."""
    env = os.environ.get("ATTNLAB_DATA")
    if env:
        return [Path(env).expanduser()]
    roots = [repo_root().parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / ".data"]
    out = []
    for r in roots:
        r = r.resolve()
        if r not in out:
            out.append(r)
    return out


def dataset_folder(name: str) -> Path | None:
    """Where ``open_source(name)`` finds the dataset without a data_dir (the first root holding one of its usual
    folders), or None when no root has it. Tests ask this before they need the offline data."""
    for root in data_roots():
        for folder in DEFAULT_FOLDERS.get(name, ()):
            if _exists(name, root / folder):
                return root / folder
    return None


def download_root() -> Path:
    env = os.environ.get("ATTNLAB_DATA")
    return Path(env).expanduser() if env else Path.cwd() / ".data"


def _missing(name: str, looked: list[Path], hint: str) -> AttnlabError:
    where = ", ".join(str(p) for p in looked)
    return AttnlabError(f"dataset '{name}' not found; looked in: {where}; {hint}")


def _hint(name: str) -> str:
    folders = " or ".join(DEFAULT_FOLDERS.get(name, ("<dataset folder>",)))
    msg = f"pass data.data_dir=<folder> or set ATTNLAB_DATA=<folder holding {folders}>"
    if name in PICKLE_FOLDERS:
        msg += (f" or fetch it once from Python: attnlab.data.load_dataset('{name}', download=True) (the official "
                "archive, needs internet)")
    return msg


def _list_images(folder: Path) -> list[str]:
    """Sorted image file names in ``folder`` (os.scandir: no stat per file, no pathlib per file; 60k files)."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())


def _empty_class(name: str, folder: Path) -> AttnlabError:
    return AttnlabError(f"dataset '{name}': class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                        f"add images or remove the folder")


def _folder_pool(root: Path, split_dir: Path, classes: list[str], name: str, defines_classes: bool) -> Pool:
    files, labels = [], []
    for label, cls in enumerate(classes):
        d = split_dir / cls
        if not d.is_dir():
            continue  # a class may be absent from a small test folder
        prefix = d.relative_to(root).as_posix() + "/"
        names = _list_images(d)
        if not names and defines_classes:  # it would train silently as a class that never occurs
            raise _empty_class(name, d)
        files.extend(prefix + f for f in names)
        labels.extend([label] * len(names))
    return Pool(root, files, np.asarray(labels, dtype=np.int64))


def image_folder(name: str, root: Path) -> Source:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``root/val/<class>/*``)."""
    train_dir = root / "train"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise AttnlabError(f"dataset '{name}' at {root} needs train/ and test/ (or val/) subfolders of class "
                           f"folders; found: {', '.join(sorted(p.name for p in root.iterdir())) or 'nothing'}")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise AttnlabError(f"dataset '{name}': no class folders in {train_dir}")
    train = _folder_pool(root, train_dir, classes, name, defines_classes=True)
    test = _folder_pool(root, test_dir, classes, name, defines_classes=False)
    for split, pool, d in (("train", train, train_dir), ("test", test, test_dir)):
        if len(pool) == 0:
            raise AttnlabError(f"dataset '{name}': no images ({', '.join(IMAGE_EXTENSIONS)}) in {d}/<class>/")
    extra = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in classes)
    if extra:
        raise AttnlabError(f"dataset '{name}': {test_dir} has classes missing from train/: {', '.join(extra)}")
    return Source(name, root, classes, train, test, kind="folder")


def _text(name) -> str:
    return name.decode("latin1") if isinstance(name, bytes) else str(name)


def _cifar_pixels(data, path: Path) -> np.ndarray:
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise AttnlabError(f"CIFAR batch file {path}: 'data' must be N x 3072 uint8, got {data.shape} {data.dtype}")
    return data.reshape(-1, 3, 32, 32)


def _cifar_labels(labels, n: int, num_classes: int, path: Path) -> list[int]:
    ok = isinstance(labels, (list, tuple, np.ndarray)) and len(labels) == n
    ok = ok and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < num_classes
                    for v in labels)
    if not ok:
        raise AttnlabError(f"CIFAR batch file {path}: labels must be {n} integers in 0..{num_classes - 1}")
    return [int(v) for v in labels]


def cifar_pickle(name: str, root: Path) -> Source:
    """torchvision's CIFAR python format: ``root`` is the ``cifar-10-batches-py``/``cifar-100-python`` folder.

    The batch files are pickles; they are read by ``safe_pickle.load_cifar_batch``, which never runs code.
    """
    if name == "cifar10":
        train_files, test_files = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        meta, names_key, label_key = "batches.meta", "label_names", "labels"
    else:
        train_files, test_files = ["train"], ["test"]
        meta, names_key, label_key = "meta", "fine_label_names", "fine_labels"
    classes = [_text(c) for c in batch_field(load_cifar_batch(root / meta), names_key, root / meta)]

    def pool(files):
        data, labels = [], []
        for f in files:
            d = load_cifar_batch(root / f)
            pixels = _cifar_pixels(batch_field(d, "data", root / f), root / f)
            data.append(pixels)
            labels.extend(_cifar_labels(batch_field(d, label_key, root / f), len(pixels), len(classes), root / f))
        return Pool(root, [], np.asarray(labels, dtype=np.int64), arrays=np.concatenate(data))

    return Source(name, root, classes, pool(train_files), pool(test_files), kind="pickle")


def _read_boxes(path: Path, n_fields: int) -> dict[str, list]:
    """{image file: its other fields} of a Tiny-ImageNet box file, the last four (the box) as numbers; a box that is
    not four numbers, or whose corners are swapped, is a one-line error naming the file and line."""
    out = {}
    with open(path) as f:
        for i, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) == n_fields:
                try:
                    box = [float(v) for v in parts[-4:]]
                except ValueError:
                    raise AttnlabError(f"{path} line {i}: a box is four numbers (x0 y0 x1 y1), got "
                                       f"{' '.join(parts[-4:])!r}") from None
                if box[0] > box[2] or box[1] > box[3]:
                    raise AttnlabError(f"{path} line {i}: a box's corners come in the order x0 y0 x1 y1 with "
                                       f"x0 <= x1 and y0 <= y1, got {' '.join(parts[-4:])!r}")
                out[parts[0]] = parts[1:-4] + box
    return out


def tiny_imagenet(name: str, root: Path) -> Source:
    """Tiny-ImageNet layout; its official ``val/`` (labelled) is our test split. Boxes are kept per image."""
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise AttnlabError(f"dataset '{name}' at {root} has no wnids.txt (expected the Tiny-ImageNet layout)")
    classes = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(classes)}
    words = {}
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text().splitlines():
            if "\t" in line:
                w, text = line.split("\t", 1)
                words[w] = text
    files, labels, boxes = [], [], []
    for w in classes:
        box_file = root / "train" / w / f"{w}_boxes.txt"
        table = _read_boxes(box_file, 5) if box_file.is_file() else {}
        img_dir = root / "train" / w / "images"
        if not img_dir.is_dir():
            raise AttnlabError(f"dataset '{name}': missing {img_dir}")
        names = _list_images(img_dir)
        if not names:
            raise _empty_class(name, img_dir)
        for f in names:
            files.append(f"train/{w}/images/{f}")
            labels.append(index[w])
            boxes.append(table.get(f, [float("nan")] * 4))  # nan marks an image with no annotation
    train = Pool(root, files, np.asarray(labels, dtype=np.int64), np.asarray(boxes, dtype=np.float32))
    ann_file = root / "val" / "val_annotations.txt"
    if not ann_file.is_file():
        raise AttnlabError(f"dataset '{name}': missing {ann_file} (labels of the test split)")
    ann = _read_boxes(ann_file, 6)
    files, labels, boxes = [], [], []
    for f in _list_images(root / "val" / "images"):
        if f not in ann:
            raise AttnlabError(f"dataset '{name}': {root / 'val' / 'images' / f} has no line in {ann_file}")
        wnid, *box = ann[f]
        if wnid not in index:
            raise AttnlabError(f"dataset '{name}': {ann_file} names class {wnid} missing from wnids.txt")
        files.append(f"val/images/{f}")
        labels.append(index[wnid])
        boxes.append(box)
    test = Pool(root, files, np.asarray(labels, dtype=np.int64), np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    return Source(name, root, classes, train, test, [words.get(w, w) for w in classes], kind="tiny-imagenet")


def _is_image_folder(p: Path) -> bool:
    return (p / "train").is_dir() and ((p / "test").is_dir() or (p / "val").is_dir())


def _download_cifar(name: str, root: Path) -> None:
    """Fetch and unpack the official archive (checked against torchvision's md5). Not through torchvision's CIFAR
    dataset classes: they unpickle the batch files with plain pickle, which would run code in a tampered file."""
    from torchvision.datasets import CIFAR10, CIFAR100, utils

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    root.mkdir(parents=True, exist_ok=True)
    try:
        utils.download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except Exception as e:  # network errors come in many types
        raise AttnlabError(f"downloading {name} into {root} failed: {e}".replace("\n", " ")) from None


def open_source(name: str, data_dir=None, download: bool = False, metadata=None) -> Source:
    """Find dataset ``name`` on disk (see module docs for the search order) and list its files.

    ``wsol``: images under ``data_dir`` described by the wsolevaluation metadata folder ``metadata``."""
    if name == "wsol":
        return wsol_source(name, data_dir, metadata)
    if name == "imagefolder":
        if data_dir is None:
            raise AttnlabError("dataset 'imagefolder' needs data.data_dir=<folder with train/ and test/ (or val/) "
                               "subfolders>")
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise _missing(name, [root], "data.data_dir must be a folder with train/ and test/ (or val/) subfolders")
        return image_folder(name, root)

    if data_dir is not None:
        root = Path(data_dir).expanduser()
        # The dataset's own folder, or (leniently) a folder holding it under its usual name.
        candidates = [root] + [root / f for f in DEFAULT_FOLDERS[name]]
        if download and name in PICKLE_FOLDERS and not any(_exists(name, c) for c in candidates):
            _download_cifar(name, root)
    else:
        candidates = [r / f for r in data_roots() for f in DEFAULT_FOLDERS[name]]
        if download and name in PICKLE_FOLDERS and not any(_exists(name, c) for c in candidates):
            _download_cifar(name, download_root())
            candidates.append(download_root() / PICKLE_FOLDERS[name])
    for c in candidates:
        if _exists(name, c):
            return _open(name, c)
    raise _missing(name, candidates, _hint(name))


def _exists(name: str, p: Path) -> bool:
    if not p.is_dir():
        return False
    if name == "tiny-imagenet":
        return (p / "wnids.txt").is_file()
    if name == "cifar100":
        return (p / "train").is_file() and (p / "meta").is_file()
    return (p / "batches.meta").is_file() or _is_image_folder(p)


def _open(name: str, p: Path) -> Source:
    if name == "tiny-imagenet":
        return tiny_imagenet(name, p)
    if name == "cifar100" or (p / "batches.meta").is_file():
        return cifar_pickle(name, p)
    return image_folder(name, p)
