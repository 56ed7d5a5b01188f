"""Checkpoint files (atomic saves, safe loads), the RNG state that resume restores, and the one home for building a
model: ``model_from_config`` (a config's model section -> a fresh model) and ``model_from_checkpoint`` (a checkpoint
file, run dir or loaded dict -> the trained model in eval mode). Trainer, ``attnlab eval``, ``attnlab export``,
bench's latency model and ``attnlab profile`` all build through them.

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


MODEL_KEYS = ("name", "num_classes", "attention", "attention_kwargs", "blocks", "share", "zero_init_residual")


def model_from_config(model_cfg):
    """``create_model`` from a config's ``model`` section (a dict or DictConfig; missing keys take create_model's
    defaults), freshly initialised, on the CPU, in training mode."""
    from omegaconf import OmegaConf

    from ..models import create_model
    if OmegaConf.is_config(model_cfg):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    kwargs = {k: model_cfg[k] for k in MODEL_KEYS if k in model_cfg and model_cfg[k] is not None}
    if "attention_kwargs" in kwargs:
        kwargs["attention_kwargs"] = dict(kwargs["attention_kwargs"])
    return create_model(kwargs.pop("name"), **kwargs)


def load_training_checkpoint(path) -> dict:
    """A checkpoint written by ``attnlab train`` (a run directory stands for its checkpoint_best.pt), checked to
    have the model weights and the config they were trained with."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint_best.pt"
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt.get("config"), dict) \
            or not isinstance(ckpt["config"].get("model"), dict):
        raise AttnlabError(f"'{path}' is not an attnlab checkpoint (needs 'model' weights and a 'config' "
                           "with a 'model' section)")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu", use_ema: bool = True):
    """The trained model of ``ckpt`` (a loaded dict, a checkpoint file or a run dir) on ``device``, in eval mode:
    its EMA weights when the run kept an EMA and ``use_ema``, loaded strictly (a mismatch is a one-line error)."""
    if not isinstance(ckpt, dict):
        ckpt = load_training_checkpoint(ckpt)
    model_cfg = ckpt["config"]["model"]
    model = model_from_config(model_cfg)
    ema = ckpt.get("ema")
    state = ema["module"] if use_ema and isinstance(ema, dict) and "module" in ema else ckpt["model"]
    want, have = set(model.state_dict()), set(state)
    if want != have:
        raise AttnlabError(f"checkpoint weights do not match model '{model_cfg['name']}': missing "
                           f"{sorted(want - have)[:3]}, unexpected {sorted(have - want)[:3]}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


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
