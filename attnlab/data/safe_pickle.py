"""Read CIFAR's python-pickle batch files without ever running code from them.

``pickle.load`` calls whatever callable a file names, so a crafted batch file can run any command. The CIFAR
format only ever holds a dict of plain values: ``data`` (a uint8 numpy array), ``labels``/``fine_labels`` (lists
of ints), ``filenames`` and ``batch_label`` (bytes or str) and, in the meta files, lists of names. This reader
resolves only the few globals numpy itself needs to rebuild such an array, each checked before use, and refuses
every other global with a one-line AttnlabError; the loaded value is then checked to hold only those plain types.

The allowed globals, by pickle protocol: numpy's ``_reconstruct``, ``ndarray`` and ``dtype`` (protocols 0-4; the
original files are Python 2 protocol 2, naming ``numpy.core``; NumPy 2 writes ``numpy._core``), ``_frombuffer``
(protocol 5) and ``_codecs.encode`` (how protocol 2 written by Python 3 stores bytes). A dtype must be a plain
bool/int/uint/float one: NumPy refuses to build an object array from raw bytes, and object arrays are refused here.
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np

from ..errors import AttnlabError

PLAIN_KINDS = "biuf"  # bool, signed and unsigned integers, floats
PLAIN_TYPES = (str, bytes, int, float, bool, type(None))


class RefusedContent(Exception):
    """The file names something the CIFAR format never holds (turned into an AttnlabError naming the file)."""


def _plain_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind not in PLAIN_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise RefusedContent(f"a numpy array of dtype {dtype} (only bool, int and float arrays are allowed)")
    return dtype


def _make_dtype(spec, align=False, copy=True):
    if not isinstance(spec, str):
        raise RefusedContent(f"a numpy dtype built from {type(spec).__name__}")
    return _plain_dtype(np.dtype(spec, align=bool(align), copy=bool(copy)))


class _NdarrayToken:
    """Stands for ``numpy.ndarray``, which the format only names as _reconstruct's first argument."""

    def __call__(self, *args, **kwargs):
        raise RefusedContent("a direct call of numpy.ndarray")


NDARRAY = _NdarrayToken()


def _reconstruct(cls, shape, typecode):
    """numpy's protocol 0-4 path: an empty ndarray that BUILD then fills from raw bytes."""
    if cls is not NDARRAY:
        raise RefusedContent(f"an array of class {getattr(cls, '__name__', cls)!r}")
    # numpy writes an empty placeholder here (BUILD sets the real shape from the data), so a large shape is no
    # CIFAR file: refusing it keeps a crafted file from asking for terabytes.
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and 0 <= n for n in shape) and np.prod(shape) == 0):
        raise RefusedContent(f"an array placeholder of shape {shape!r}")
    return np.ndarray.__new__(np.ndarray, shape, _plain_dtype(typecode))


def _frombuffer(buffer, dtype, shape, order):
    """numpy's protocol 5 path: an array over an in-band buffer."""
    if not isinstance(buffer, (bytes, bytearray, memoryview, pickle.PickleBuffer)):
        raise RefusedContent(f"an array over a {type(buffer).__name__}")
    flat = np.frombuffer(buffer, dtype=_plain_dtype(dtype))
    return flat.reshape(shape, order="F" if order == "F" else "C")


def _encode(text, encoding="latin1"):
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise RefusedContent(f"a call of _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): NDARRAY,  # only ever an argument of _reconstruct
    ("numpy", "dtype"): _make_dtype,
    ("_codecs", "encode"): _encode,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise RefusedContent(f"a reference to {module}.{name}") from None

    def persistent_load(self, pid):
        raise RefusedContent("a persistent reference")


def _check_plain(value, depth=0):
    """Raise RefusedContent unless ``value`` holds only dicts, lists, tuples, plain scalars and plain arrays."""
    if depth > 8:
        raise RefusedContent("values nested more than 8 levels deep")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_plain(v, depth + 1)
    elif isinstance(value, np.ndarray):
        if type(value) is not np.ndarray:
            raise RefusedContent(f"an array of class {type(value).__name__}")
        _plain_dtype(value.dtype)
    elif type(value) not in PLAIN_TYPES:
        raise RefusedContent(f"a {type(value).__module__}.{type(value).__name__} object")


def load_cifar_batch(path: Path) -> dict:
    """The dict stored in one CIFAR python batch or meta file; AttnlabError for anything outside the format."""
    try:
        with open(path, "rb") as f:
            value = _CifarUnpickler(f, encoding="latin1").load()
        if not isinstance(value, dict):
            raise RefusedContent(f"a {type(value).__name__} at the top level (a CIFAR batch is a dict)")
        _check_plain(value)
    except RefusedContent as e:
        raise AttnlabError(f"refusing CIFAR batch file {path}: it holds {e}, which the CIFAR format never does "
                           f"(dataset files are never allowed to run code)") from None
    except OSError as e:
        raise AttnlabError(f"cannot read CIFAR batch file {path}: {e.strerror or e}") from None
    except Exception as e:  # a torn or foreign file: pickle and numpy raise many types
        msg = f"{type(e).__name__}: {e}".replace("\n", " ")
        raise AttnlabError(f"cannot read CIFAR batch file {path}: {msg}") from None
    return value


def batch_field(value: dict, key: str, path: Path):
    """``value[key]``, accepting the bytes keys of files written by Python 2 without latin1 decoding."""
    for k in (key, key.encode()):
        if k in value:
            return value[k]
    raise AttnlabError(f"CIFAR batch file {path} has no '{key}' entry; found: "
                       f"{', '.join(sorted(str(k) for k in value)) or 'nothing'}")
