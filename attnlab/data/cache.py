"""Decoded uint8 image cache: decode every image once with PIL, keep N x C x H x W uint8 arrays as ``.npy``.

The cache key hashes the source files (relative path, size, mtime) and the decode options, so editing, adding or
removing an image rebuilds the cache while moving the dataset folder does not. Files are written to a temp name and
``os.replace``-d into place, so a killed build never leaves a half-written cache, and loads are memory-mapped.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import numpy as np

from ..errors import AttnlabError
from ..files import atomic_write
from ..lifeline import stop_with_parent

CACHE_VERSION = 1
POOL_THRESHOLD = 4096  # below this many images a process pool costs more than it saves
WORKERS = 2

# Counters read by the tests (a second load must not decode anything).
STATS = {"decoded": 0, "builds": 0}


def source_key(root: Path, files: list[str], options: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, **options}, sort_keys=True).encode())
    base = str(root)
    for rel in files:
        try:
            st = os.stat(os.path.join(base, rel))
        except OSError as e:
            raise AttnlabError(f"cannot read image {os.path.join(base, rel)}: {e.strerror}") from None
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _decode(path: str, size):
    """One image as H x W x 3 uint8 (and its original (h, w)); errors come back as strings to name the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # greyscale / palette / RGBA -> 3 channels
            orig = (im.height, im.width)
            if size is not None and orig != tuple(size):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8), orig
    except Exception as e:  # PIL raises many types for bad files
        return f"{type(e).__name__}: {e}".replace("\n", " "), None


def _decode_chunk(args):
    paths, size = args
    return [_decode(p, size) for p in paths]


def _pool_context():
    # fork starts instantly and the children only run PIL; spawn elsewhere (and where fork is unavailable).
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") and "fork" in methods else "spawn")


def _start_decoder():
    """Pool initializer: a decoder dies on SIGTERM, ignores Ctrl-C and stops once its parent is gone.

    A forked decoder inherits its parent's Python signal handlers, and the bench's SIGTERM handler raises
    KeyboardInterrupt. ``Pool.terminate()`` ends the decoders with SIGTERM, but a Python handler only runs between
    bytecodes: a SIGTERM that arrives just as a decoder blocks on the task queue's lock is never acted upon, the
    decoder lives on and ``terminate()`` waits for it forever (a bench with ``--workers 1`` hung so for 35 minutes
    after decoding the test split). The default action is taken by the kernel, whatever the decoder is doing.
    Ctrl-C reaches the parent too, which stops the pool itself.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop_with_parent()


PROGRESS_MIN_IMAGES = 1000  # smaller decodes take well under a second: no progress output at all


class Progress:
    """Progress over images on stderr (decoding here; scoring CAMs in ``attnlab localize``): a tqdm bar on a
    terminal; in a log file (not a terminal) a plain line at every quarter, e.g. 'cifar10-train: decoded
    12800/50000 images', so a non-interactive log gets four lines instead of thousands of carriage-return updates."""

    def __init__(self, total: int, desc: str, stream=None, verb: str = "decoded"):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.desc, self.verb, self.done, self.quarter = total, desc, verb, 0, 0
        self.enabled = total >= PROGRESS_MIN_IMAGES
        self.bar = None
        if self.enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"{desc} ({total} images)", unit="img", leave=False, file=self.stream)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.done * 4 >= (self.quarter + 1) * self.total:
            self.quarter = self.done * 4 // self.total
            print(f"{self.desc}: {self.verb} {self.done}/{self.total} images", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def decode_images(root: Path, files: list[str], image_size, out: np.ndarray | None = None, desc: str = "decode"):
    """Decode ``files`` into a new (or given) N x 3 x H x W uint8 array; returns (images, original sizes N x 2)."""
    n = len(files)
    base = str(root)
    paths = [os.path.join(base, f) for f in files]
    first, orig = _decode(paths[0], image_size)
    if orig is None:
        raise AttnlabError(f"cannot decode image {paths[0]}: {first}")
    h, w = first.shape[:2]
    if out is None:
        out = np.empty((n, 3, h, w), dtype=np.uint8)
    sizes = np.empty((n, 2), dtype=np.int32)
    chunk = 512
    jobs = [(paths[i:i + chunk], image_size) for i in range(0, n, chunk)]
    use_pool = n >= POOL_THRESHOLD and WORKERS > 1 and (os.cpu_count() or 1) > 1
    bar = Progress(n, desc)
    # Each decoder stops once its parent is gone: a killed run must not leave them hanging (holding its locks).
    pool = _pool_context().Pool(WORKERS, initializer=_start_decoder) if use_pool else None
    try:
        results = pool.imap(_decode_chunk, jobs) if pool else map(_decode_chunk, jobs)
        i = 0
        for batch in results:
            for arr, size in batch:
                if size is None:
                    raise AttnlabError(f"cannot decode image {paths[i]}: {arr}")
                if arr.shape[:2] != (h, w):
                    raise AttnlabError(
                        f"images differ in size: {paths[0]} is {w}x{h} but {paths[i]} is {arr.shape[1]}x"
                        f"{arr.shape[0]}; pass image_size (data.image_size=N) to resize them all")
                out[i] = arr.transpose(2, 0, 1)
                sizes[i] = size
                i += 1
            bar.update(len(batch))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    STATS["decoded"] += n
    return out, sizes


def _holds_images_like(images: np.ndarray, root: Path, files: list[str], image_size) -> bool:
    """Whether a cache entry is N x 3 x H x W uint8 with the H x W the first file decodes to: an entry of another
    size or type (damaged, or written by hand) is rebuilt rather than trained on."""
    if images.dtype != np.uint8 or images.shape[:2] != (len(files), 3) or images.ndim != 4:
        return False
    first, orig = _decode(os.path.join(str(root), files[0]), image_size)
    return orig is not None and images.shape[2:] == first.shape[:2]


def cached_images(root: Path, files: list[str], image_size, cache_dir, tag: str):
    """Memory-mapped uint8 images for ``files`` (decoding them first if no valid cache entry exists).

    Returns (images N x 3 x H x W, original sizes N x 2, cache stem path). ``cache_dir=None`` disables the cache.
    """
    if not files:
        raise AttnlabError(f"no images to load for {tag}")
    options = {"image_size": list(image_size) if image_size is not None else None}
    if cache_dir is None:
        images, sizes = decode_images(root, files, image_size, desc=tag)
        return images, sizes, None
    key = source_key(root, files, options)
    cache_dir = Path(cache_dir).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AttnlabError(f"cannot create cache_dir {cache_dir}: {e.strerror}") from None
    stem = cache_dir / f"{tag}-{len(files)}-{key}"
    img_path, size_path = stem.with_suffix(".images.npy"), stem.with_suffix(".sizes.npy")
    if img_path.is_file() and size_path.is_file():
        try:
            # mode "c": copy-on-write, so torch gets a writable array while the file is never modified.
            images = np.load(img_path, mmap_mode="c")
            sizes = np.load(size_path)
            if sizes.shape == (len(files), 2) and _holds_images_like(images, root, files, image_size):
                return images, sizes, stem
        except (OSError, ValueError):
            pass  # unreadable entry: rebuild it below
    images, sizes = decode_images(root, files, image_size, desc=tag)
    atomic_write(img_path, lambda f: np.save(f, images), "image cache")
    atomic_write(size_path, lambda f: np.save(f, sizes), "image cache")
    STATS["builds"] += 1
    return np.load(img_path, mmap_mode="c"), sizes, stem
