"""The metadata layout of clovaai/wsolevaluation (CUB-200-2011, ImageNet, OpenImages), read as plain text.

``<metadata>/<split>/`` for split ``train``, ``val`` (fully supervised, chooses tau) and ``test`` holds:

- ``image_ids.txt``: one image path per line, relative to the image root (``data.data_dir``);
- ``class_labels.txt``: ``image_id,class`` (an integer class index);
- ``image_sizes.txt``: ``image_id,width,height`` of the original image;
- ``localization.txt`` (val and test): ``image_id,x0,y0,x1,y1``, one line per box, several lines for an image
  with several boxes; or (OpenImages) ``image_id,mask_path,ignore_path``, one line per instance mask, the ignore
  mask's path on one of an image's lines (the others leave it empty; an image may have none). Mask paths are
  relative to the image root, like the image ids; every file must exist (checked here, decoded by ``masks.py``).

Every problem is one AttnlabError naming the file and the line. Boxes are inclusive pixel boxes of the original
image; a box may reach the frame's far edge (x1 = width, as CUB's x + w can), which is clipped to width - 1.
Images are decoded and boxes rescaled by the same code as every other dataset (``datasets.py``, ``boxes.py``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import AttnlabError
from .pools import Pool, Source

SPLITS = ("train", "val", "test")
FILES = ("image_ids.txt", "class_labels.txt", "image_sizes.txt")


def _lines(path: Path):
    """(line number, stripped text) of the non-empty lines of ``path``."""
    if not path.is_file():
        raise AttnlabError(f"WSOL metadata: missing file {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AttnlabError(f"WSOL metadata: cannot read {path}: {err}".replace("\n", " ")) from None
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _bad(path: Path, line: int, what: str) -> AttnlabError:
    return AttnlabError(f"WSOL metadata: {path} line {line}: {what}")


def _numbers(path: Path, line: int, fields: list[str], kind=float) -> list:
    try:
        values = [kind(f) for f in fields]
    except ValueError:
        raise _bad(path, line, f"expected numbers, got '{','.join(fields)}'") from None
    if not all(np.isfinite(values)):
        raise _bad(path, line, f"expected finite numbers, got '{','.join(fields)}'")
    return values


def _table(path: Path, ids: dict[str, int], n_fields: int, kind=float) -> dict[str, tuple[int, list]]:
    """``image_id -> (line, values)`` of a one-line-per-image file; every id must be listed in image_ids.txt."""
    out = {}
    for line, text in _lines(path):
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != n_fields + 1:
            raise _bad(path, line, f"expected image_id and {n_fields} value(s) separated by commas, got '{text}'")
        if parts[0] not in ids:
            raise _bad(path, line, f"image '{parts[0]}' is not in image_ids.txt")
        if parts[0] in out:
            raise _bad(path, line, f"image '{parts[0]}' is listed twice (first on line {out[parts[0]][0]})")
        out[parts[0]] = (line, _numbers(path, line, parts[1:], kind))
    return out


def read_split(folder: Path, root: Path, localization: bool) -> tuple[Pool, dict[int, str]]:
    """One split's Pool (labels, original sizes (h, w) and, with ``localization``, its localization.txt: every box
    as an (N, K, 4) NaN-padded array, or each image's masks) and ``{class: image id}`` of the first image of each
    class (for class names)."""
    ids_file = folder / "image_ids.txt"
    ids, order = {}, []
    for line, text in _lines(ids_file):
        if text in ids:
            raise _bad(ids_file, line, f"image '{text}' is listed twice")
        if Path(text).is_absolute() or ".." in Path(text).parts:
            raise _bad(ids_file, line, f"image '{text}' must be a path inside the image root")
        ids[text] = len(order)
        order.append(text)
    if not order:
        raise AttnlabError(f"WSOL metadata: {ids_file} lists no images")
    labels_file, sizes_file = folder / "class_labels.txt", folder / "image_sizes.txt"
    labels = _table(labels_file, ids, 1, int)
    sizes = _table(sizes_file, ids, 2, int)
    for path, table in ((labels_file, labels), (sizes_file, sizes)):
        missing = [i for i in order if i not in table]
        if missing:
            raise AttnlabError(f"WSOL metadata: {path} has no line for image '{missing[0]}' (line "
                               f"{ids[missing[0]] + 1} of {ids_file}; {len(missing)} image(s) missing)")
    for image_id, (line, (w, h)) in sizes.items():
        if w < 1 or h < 1:
            raise _bad(sizes_file, line, f"image '{image_id}' has size {w}x{h}")
    for image_id, (line, (c,)) in labels.items():
        if c < 0:
            raise _bad(labels_file, line, f"class of '{image_id}' must be >= 0, got {c}")
    label_array = np.asarray([labels[i][1][0] for i in order], dtype=np.int64)
    size_array = np.asarray([[sizes[i][1][1], sizes[i][1][0]] for i in order], dtype=np.int64)  # (h, w)
    first = {}
    for image_id, c in zip(order, label_array.tolist()):
        first.setdefault(c, image_id)
    box_sets = masks = None
    if localization:
        loc_file = folder / "localization.txt"
        if _layout(loc_file) == "masks":
            masks = _read_masks(loc_file, ids, order, root)
        else:
            box_sets = _read_boxes(loc_file, ids, order, sizes)
    return Pool(root, order, label_array, None if box_sets is None else box_sets[:, 0].copy(),
                sizes=size_array, box_sets=box_sets, masks=masks), first


def _layout(path: Path) -> str:
    """'masks' when every line has 3 fields (OpenImages), 'boxes' otherwise; a file mixing both is refused."""
    lines = _lines(path)
    counts = {len(text.split(",")) for _, text in lines}
    if 3 in counts and counts != {3}:
        first = next(line for line, text in lines if len(text.split(",")) != 3)
        raise _bad(path, first, "mixes mask lines (image_id,mask_path,ignore_path) with other lines")
    return "masks" if counts == {3} else "boxes"


def _read_boxes(path: Path, ids: dict[str, int], order: list[str], sizes) -> np.ndarray:
    per_image: list[list] = [[] for _ in order]
    for line, text in _lines(path):
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 5:
            raise _bad(path, line, f"expected image_id,x0,y0,x1,y1 (a box) or image_id,mask_path,ignore_path (a "
                                   f"mask), got '{text}'")
        if parts[0] not in ids:
            raise _bad(path, line, f"image '{parts[0]}' is not in image_ids.txt")
        x0, y0, x1, y1 = _numbers(path, line, parts[1:])
        w, h = sizes[parts[0]][1]
        if not (0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h):
            raise _bad(path, line, f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) of '{parts[0]}' is not inside its "
                                   f"{w}x{h} frame")
        per_image[ids[parts[0]]].append([x0, y0, min(x1, w - 1), min(y1, h - 1)])
    missing = [i for i, b in enumerate(per_image) if not b]
    if missing:
        raise AttnlabError(f"WSOL metadata: {path} has no box for image '{order[missing[0]]}' "
                           f"({len(missing)} image(s) without a box)")
    k = max(len(b) for b in per_image)
    out = np.full((len(order), k, 4), np.nan, dtype=np.float32)
    for i, b in enumerate(per_image):
        out[i, :len(b)] = b
    return out


def _mask_file(path: Path, line: int, root: Path, name: str, what: str) -> Path:
    """The existing file ``root / name`` (a path inside the image root), else one error naming the line."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise _bad(path, line, f"{what} '{name}' must be a path inside the image root")
    file = root / name
    if not file.is_file():
        raise _bad(path, line, f"{what} file {file} does not exist")
    return file


def _read_masks(path: Path, ids: dict[str, int], order: list[str], root: Path) -> list:
    """Per image (its instance mask files, its ignore mask file or None), in image order."""
    masks: list[list] = [[] for _ in order]
    ignore: list = [None] * len(order)
    for line, text in _lines(path):
        image_id, mask, ignore_name = (p.strip() for p in text.split(","))
        if image_id not in ids:
            raise _bad(path, line, f"image '{image_id}' is not in image_ids.txt")
        if not mask:
            raise _bad(path, line, f"image '{image_id}' has an empty mask path")
        i = ids[image_id]
        masks[i].append(_mask_file(path, line, root, mask, "mask"))
        if ignore_name:
            file = _mask_file(path, line, root, ignore_name, "ignore mask")
            if ignore[i] is not None and ignore[i] != file:
                raise _bad(path, line, f"image '{image_id}' has a second ignore mask ({ignore_name}); one per image")
            ignore[i] = file
    missing = [i for i, m in enumerate(masks) if not m]
    if missing:
        raise AttnlabError(f"WSOL metadata: {path} has no mask for image '{order[missing[0]]}' "
                           f"({len(missing)} image(s) without a mask)")
    return [(tuple(m), g) for m, g in zip(masks, ignore)]


def wsol_source(name: str, root, metadata) -> Source:
    """The dataset at image root ``root`` described by the metadata folder ``metadata`` (holding train/ val/ test/).

    The metadata's own ``val`` split is kept (``Source.val``): it is not drawn out of train.
    """
    if metadata is None:
        raise AttnlabError("dataset 'wsol' needs data.metadata=<wsolevaluation metadata folder, e.g. metadata/CUB, "
                           "holding train/ val/ test/>")
    if root is None:
        raise AttnlabError("dataset 'wsol' needs data.data_dir=<image root the metadata's image ids are relative to>")
    meta, root = Path(metadata).expanduser(), Path(root).expanduser()
    if not meta.is_dir():
        raise AttnlabError(f"WSOL metadata folder {meta} does not exist")
    if not root.is_dir():
        raise AttnlabError(f"dataset 'wsol': image root {root} (data.data_dir) does not exist")
    pools, first = {}, {}
    for split in SPLITS:
        pools[split], f = read_split(meta / split, root, localization=split != "train")
        for c, image_id in f.items():
            first.setdefault(c, image_id)
    if (pools["val"].masks is None) != (pools["test"].masks is None):
        kinds = {s: "masks" if pools[s].masks is not None else "boxes" for s in ("val", "test")}
        raise AttnlabError(f"WSOL metadata {meta}: val/localization.txt lists {kinds['val']} but "
                           f"test/localization.txt lists {kinds['test']}; both must use the same kind")
    num_classes = int(max(int(p.labels.max()) for p in pools.values())) + 1
    classes = [str(c) for c in range(num_classes)]
    # CUB and ImageNet keep each class's images in a folder named after it: the first image's folder names it.
    names = [Path(first[c]).parent.name or str(c) if c in first else str(c) for c in range(num_classes)]
    return Source(name, root, classes, pools["train"], pools["test"], names, kind="wsol", val=pools["val"])
