"""Checkpoint files (atomic saves, safe loads), the RNG state that resume restores, and the one home for building a
model: ``model_from_config`` (a config's model section -> a fresh model) and ``model_from_checkpoint`` (a checkpoint
file or loaded dict -> the trained model in eval mode); ``init_from_state_dict`` starts a model from a
torchvision or timm state_dict file (``model.init``). Trainer, ``open_run`` (run_folder.py: what a run folder means,
for eval, localize, show, export and the search), bench's latency model and ``attnlab profile`` all build through
them.

A checkpoint is written by ``attnlab.files.atomic_write``: a temp file in the destination's directory,
``os.replace``-d over the old one, so a crash or a failed write (full disk, an exception mid-save) leaves the
previous checkpoint intact.
"""
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import AttnlabError
from ..files import atomic_write


def atomic_save(obj, path) -> None:
    """torch.save ``obj`` to ``path`` through the one atomic writer (temp file beside it, fsync, os.replace)."""
    atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint")


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint file, read with weights_only=True; a missing or unreadable file is a one-line error."""
    # Our checkpoints hold only tensors, numbers, strings and containers (the config is a plain dict).
    return read_weights_only(path, "checkpoint", map_location)


def _what_it_is(head: bytes) -> str:
    """A text file (with its first line) or something else, from a file's first bytes."""
    text = head.decode("utf-8", errors="replace")
    body = text[:-2]  # a character cut off by the end of ``head`` decodes as a replacement character
    if body.strip() and all(c.isprintable() or c in "\t\r\n" for c in body) and "\ufffd" not in body:
        return f"a text file (it begins {text.splitlines()[0][:40]!r})"
    return "neither a zip archive nor a pickle"


def read_weights_only(path, what: str, map_location="cpu"):
    """A torch.save file read with weights_only=True (a file from elsewhere never runs code), or a one-line error
    that starts with ``what`` (checkpoint, model.init) and says why: missing, a folder, empty, not a PyTorch file at
    all, more than tensors and plain values inside, or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise AttnlabError(f"{what} '{path}' is a folder, not a file" if path.is_dir() else
                           f"{what} '{path}' does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as err:
        raise AttnlabError(f"cannot read {what} '{path}': {err.strerror or err}") from None
    if not head:
        raise AttnlabError(f"{what} '{path}' is empty (0 bytes): cut short or never written")
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip archive (older torch: a pickle)
        raise AttnlabError(f"{what} '{path}' is not a PyTorch file: {_what_it_is(head)}")
    try:
        with warnings.catch_warnings():  # torch warns about a plain pickle's protocol before failing on it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        first = (str(err).splitlines() or [""])[0]
        if first.startswith("Weights only load failed"):  # torch's advice to unpickle anyway is not ours to give
            raise AttnlabError(f"cannot read {what} '{path}': it holds more than tensors and plain values, as "
                               "no attnlab checkpoint or state_dict does (corrupt, or another program's pickle, "
                               "which is never unpickled: that could run code)") from None
        raise AttnlabError(f"cannot read {what} '{path}': corrupt or truncated ({type(err).__name__}: "
                           f"{first.split('. ')[0][:160]})") from None


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
        from ..attention import options_dict
        kwargs["attention_kwargs"] = options_dict(kwargs["attention_kwargs"])  # not a mapping: one line
    return create_model(kwargs.pop("name"), **kwargs)


def load_training_checkpoint(path) -> dict:
    """A checkpoint file written by ``attnlab train``, checked to have the model weights and the config they were
    trained with (``run_folder.trained_checkpoint`` says which file a run folder means)."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt.get("config"), dict) \
            or not isinstance(ckpt["config"].get("model"), dict) \
            or not isinstance(ckpt["config"]["model"].get("name"), str):
        raise AttnlabError(f"'{path}' is not an attnlab checkpoint (needs 'model' weights and a 'config' "
                           "with a 'model' section that names the model)")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu", use_ema: bool = True):
    """The trained model of ``ckpt`` (a loaded dict or a checkpoint file) on ``device``, in eval mode:
    its EMA weights when the run kept an EMA and ``use_ema``, loaded strictly (a mismatch is a one-line error)."""
    if not isinstance(ckpt, dict):
        ckpt = load_training_checkpoint(ckpt)
    model_cfg = ckpt["config"]["model"]
    model = model_from_config(model_cfg)
    ema = ckpt.get("ema")
    state = ema["module"] if use_ema and isinstance(ema, dict) and "module" in ema else ckpt["model"]
    expected = model.state_dict()
    want, have = set(expected), set(state)
    if want != have:
        raise AttnlabError(f"checkpoint weights do not match model '{model_cfg['name']}': missing "
                           f"{sorted(want - have)[:3]}, unexpected {sorted(have - want)[:3]}")
    for key, tensor in state.items():  # torch's own message lists every mismatch over many lines
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected[key].shape:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise AttnlabError(f"checkpoint weights do not match model '{model_cfg['name']}': {key} is {got}, "
                               f"the model wants {tuple(expected[key].shape)}")
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


@dataclass
class InitReport:
    """What ``init_from_state_dict`` did: the file's tensors loaded, the model's tensors the file did not have (they
    keep their fresh initialisation: attention modules), and a classifier left fresh for another class count."""
    path: str
    loaded: list
    new: list
    fresh_head: list

    def summary(self, show: int = 6) -> str:
        new = ", ".join(self.new[:show]) + (f" (and {len(self.new) - show} more)" if len(self.new) > show else "")
        head = (f"; classifier {', '.join(self.fresh_head)} starts fresh (another class count)"
                if self.fresh_head else "")
        return (f"model.init {self.path}: loaded {len(self.loaded)} tensors; {len(self.new)} new, starting fresh"
                f"{': ' + new if self.new else ''}{head}")


def _plain_state_dict(obj, path) -> dict:
    """The tensors of a saved state_dict: a plain {name: tensor} dict, or one under 'state_dict' / 'model' (an
    attnlab or training-script checkpoint); a 'module.' prefix (saved from DDP) is dropped."""
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        raise AttnlabError(f"model.init '{path}' is not a state_dict (a dict of parameter names to tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def init_from_state_dict(model: torch.nn.Module, path) -> InitReport:
    """Start ``model`` from a torchvision or timm ResNet state_dict file (``model.init``), read with
    ``weights_only=True`` (a file from elsewhere never runs code).

    Every tensor of the file must exist in the model with the same shape; the one exception is the classifier (the
    model's last Linear), which starts fresh when its shape differs (another number of classes). Model tensors the
    file lacks (attention modules) keep their fresh initialisation and are listed in the report. A file that does
    not fit is refused whole, in one line, before any weight changes.
    """
    path = Path(path)
    state, own = _plain_state_dict(read_weights_only(path, "model.init"), path), model.state_dict()
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    head = {f"{linears[-1]}.weight", f"{linears[-1]}.bias"} if linears else set()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise AttnlabError(f"model.init '{path}' does not fit the model: {len(unknown)} keys the model does not have "
                           f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})")
    bad = [k for k in sorted(state) if state[k].shape != own[k].shape and k not in head]
    if bad:
        raise AttnlabError(f"model.init '{path}' does not fit the model: shape mismatch for {len(bad)} keys ("
                           + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:3])
                           + (", ..." if len(bad) > 3 else "") + ")")
    fresh_head = sorted(k for k in state if k in head and state[k].shape != own[k].shape)
    take = {k: v for k, v in state.items() if k not in fresh_head}
    model.load_state_dict(take, strict=False)
    return InitReport(str(path), sorted(take), sorted(k for k in own if k not in take), fresh_head)
