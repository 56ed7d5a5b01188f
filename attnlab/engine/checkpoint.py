"""Atomic checkpoint files and the RNG state that resume restores.

A checkpoint is written by ``attnlab.files.atomic_write``: a temp file in the destination's directory,
``os.replace``-d over the old one, so a crash or a failed write (full disk, an exception mid-save) leaves the
previous checkpoint intact.
"""
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import AttnlabError
from ..files import atomic_write


def atomic_save(obj, path) -> None:
    """torch.save ``obj`` to ``path`` through the one atomic writer (temp file beside it, fsync, os.replace)."""
    atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint")


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint_last.pt"
    if not path.is_file():
        raise AttnlabError(f"checkpoint '{path}' does not exist")
    try:
        # Our checkpoints hold only tensors, numbers, strings and containers (the config is a plain dict).
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise AttnlabError(f"cannot read checkpoint '{path}': {type(err).__name__}: {str(err).splitlines()[0]}") \
            from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys.numpy(), dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# numpy's and Python's RNG states as tensors and numbers, so torch.load(weights_only=True) can read them back.
def _numpy_state():
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def _python_state():
    version, internal, gauss_next = random.getstate()
    return [version, torch.tensor(internal, dtype=torch.int64), gauss_next]
