"""A training run's folder, and opening a trained run for the commands that use one.

``RunFolder`` is the one place that names the files ``attnlab train`` writes into ``<out_dir>/<name>/`` and says
what a folder holds: its checkpoints, whether it is complete, its validation curve, and claiming it for a fresh
run. Whoever writes a file of their own beside a run (bench's cell marker, localize.json, show/) keeps its name
and tells ``claim`` what to leave alone.

``open_run`` gives ``attnlab eval``, ``localize``, ``show``, ``export`` and the EAN search's evaluator one
``TrainedRun``: the model, its config, its data and the device settings it trained with. What a path means has one
rule (``trained_checkpoint``): a checkpoint file is itself; a run folder is its checkpoint_best.pt (best val top-1),
else its checkpoint_last.pt (a run stopped after writing its first checkpoint_last but before checkpoint_best).
"""
from __future__ import annotations

import csv
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AttnlabError
from ..files import TEMP_SUFFIX, remove_stale_temps, write_error


class _File:
    """A run file as an attribute of RunFolder: its path inside that folder."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, folder, owner=None):
        return self if folder is None else folder.path / self.name


class RunFolder:
    CONFIG = "config.yaml"  # the resolved config (comment lines on top say what each resume changed)
    METRICS = "metrics.csv"  # one row per epoch, numbered from 1
    LAST = "checkpoint_last.pt"  # everything a resume needs, after every epoch
    BEST = "checkpoint_best.pt"  # the epoch of best val top-1
    RESULTS = "results.json"  # test accuracy of checkpoint_best.pt: written last, so its presence means done
    HOOKS = "step_hooks.json"  # the step hooks the run started with (absent: none)
    # What a run writes; ``claim(overwrite=True)`` removes exactly these.
    FILES = (CONFIG, METRICS, "events.out.tfevents.*", "checkpoint_*.pt", RESULTS, "eval_*.json", HOOKS)

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder('{self.path}')"

    # Their paths in this folder: ``folder.last`` is ``folder.path / "checkpoint_last.pt"``.
    config, metrics, last, best = _File(CONFIG), _File(METRICS), _File(LAST), _File(BEST)
    results, hooks = _File(RESULTS), _File(HOOKS)

    def eval_json(self, split: str) -> Path:
        return self.path / f"eval_{split}.json"

    def has_checkpoint(self) -> bool:
        """A resume can continue from here (at least one epoch's checkpoint_last.pt is written)."""
        return self.last.is_file()

    def is_complete(self) -> bool:
        """Trained and tested: results.json exists (it is the last file a run writes)."""
        return self.results.is_file()

    def curve(self, column: str = "val_top1") -> list[float] | None:
        """``column`` per epoch from metrics.csv (NaN where a row lacks it), or None when there is no metrics.csv."""
        if not self.metrics.is_file():
            return None
        values = []
        with open(self.metrics, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    values.append(float(row[column]))
                except (KeyError, TypeError, ValueError):
                    values.append(float("nan"))
        return values

    def recorded_hooks(self) -> list:
        """The hook specs step_hooks.json records ([] when absent: a run without hooks, or one from before the file
        existed)."""
        if not self.hooks.is_file():
            return []
        try:
            recorded = json.loads(self.hooks.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise AttnlabError(f"{self.hooks} is unreadable ({err}): it should list the run's step hooks as "
                               "JSON") from None
        if not isinstance(recorded, list):
            raise AttnlabError(f"{self.hooks} holds {type(recorded).__name__}, not the list of the run's step hooks")
        return recorded

    def claim(self, overwrite: bool = False, keep=()) -> None:
        """Make the folder ready for a fresh run: refuse one that holds another run's files, or remove them with
        ``overwrite``. Files named in ``keep`` (a caller's own, e.g. bench's cell marker) and temp files a killed
        write left do not count as a run and are not removed here."""
        if not self.path.is_dir():
            return
        held = sorted(p for p in self.path.iterdir() if p.name not in keep and not _is_temp(p))
        if not held:
            return
        if not overwrite:
            raise AttnlabError(f"run dir {self.path} already holds a run ({', '.join(p.name for p in held[:3])}"
                               f"{', ...' if len(held) > 3 else ''}); continue it with --resume {self.path}, train "
                               "under a new name=..., or pass --overwrite to replace it")
        for pattern in self.FILES:
            for p in self.path.glob(pattern):
                try:
                    p.unlink()
                except FileNotFoundError:  # another DDP rank removed it first
                    pass
                except OSError as err:
                    raise write_error(err, p, "run file") from None
        remove_stale_temps(self.path)


def _is_temp(p: Path) -> bool:
    """A temp file a killed atomic write left (removed when training starts)."""
    return p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)


def trained_checkpoint(path) -> Path:
    """The checkpoint file ``path`` means: a file is itself; a run folder is its checkpoint_best.pt, else its
    checkpoint_last.pt."""
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise AttnlabError(f"checkpoint '{path}' does not exist")
        return path
    folder = RunFolder(path)
    for candidate in (folder.best, folder.last):
        if candidate.is_file():
            return candidate
    raise AttnlabError(f"'{path}' holds no checkpoint ({RunFolder.BEST} or {RunFolder.LAST}): is it a run folder "
                       "of attnlab train?")


def uses_channels_last(train_cfg) -> bool:
    """Whether a run computes in channels_last (``train.channels_last``: unset means yes)."""
    value = train_cfg["channels_last"] if "channels_last" in train_cfg else None
    return value is None or bool(value)


@dataclass
class TrainedRun:
    """A trained model with what it was trained with. ``model`` is in eval mode on ``device``, in channels_last
    memory when the run computed that way (``channels_last``); ``precision`` is the autocast the run's
    ``train.amp`` gives on this device."""
    checkpoint: Path
    ckpt: dict
    model: torch.nn.Module
    device: torch.device
    precision: str
    channels_last: bool

    @property
    def config(self) -> dict:
        return self.ckpt["config"]

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.checkpoint.parent)

    def dataset(self, data_dir=None, metadata=None):
        """The run's dataset bundle (its own data settings and seed, so its val split is the one held out)."""
        from ..data import dataset_for_config
        self._needs("data")
        return dataset_for_config(self.config, data_dir, metadata)

    def loaders(self, batch_size: int | None = None, data_dir=None):
        """Evaluation loaders of the run's data pipeline (no train loader), at ``batch_size`` or the run's."""
        from ..data.pipeline import build_loaders
        self._needs("data", *(() if batch_size else ("train",)))
        batch = batch_size or self.config["train"]["eval_batch_size"]
        return build_loaders(self.config, self.device, 1, batch, data_dir=data_dir, with_train=False)

    def _needs(self, *sections: str) -> None:
        """A checkpoint whose config lacks a section this use reads is a one-line error, not a KeyError."""
        for name in sections:
            if not isinstance(self.config.get(name), dict):
                raise AttnlabError(f"{self.checkpoint}'s config has no '{name}' section: it was not written by "
                                   "attnlab train, which saves the whole config")


@contextmanager
def data_dir_hint_as_option():
    """A missing dataset's advice in the words of the commands that open a trained run (eval, localize, show): they
    take the folder as ``--data-dir``, not as a ``data.data_dir=`` override."""
    try:
        yield
    except AttnlabError as err:
        if "data.data_dir" not in str(err):
            raise
        text = str(err).replace("data.data_dir=", "--data-dir ")  # "pass data.data_dir=<folder>" and the like
        raise AttnlabError(text.replace("data.data_dir", "--data-dir")) from None


def refuse_overwriting_run(out, checkpoint, option: str) -> None:
    """One-line refusal when a command's output ``out`` is the checkpoint it reads or a file ``attnlab train`` wrote
    beside it (``eval --out`` onto checkpoint_best.pt replaced the weights with a JSON file)."""
    out = Path(out)
    if not out.is_file():
        return
    folder = RunFolder(Path(checkpoint).parent)
    for kept in (Path(checkpoint), folder.last, folder.best, folder.config, folder.metrics, folder.results,
                 folder.hooks):
        if kept.is_file() and out.samefile(kept):
            raise AttnlabError(f"{option} {out} is the run's {kept.name}: writing there would replace it; give "
                               "another path")


def open_run(path, device="auto", use_ema: bool = True, channels_last: bool | None = None) -> TrainedRun:
    """The trained run at ``path`` (a checkpoint file or a run folder; see ``trained_checkpoint``) on ``device``:
    its EMA weights when it kept an EMA and ``use_ema``. ``channels_last``: None follows the run's own setting;
    False keeps the model contiguous (ONNX export)."""
    from .checkpoint import load_training_checkpoint, model_from_checkpoint
    from .distributed import resolve_device
    from .precision import resolve_precision

    checkpoint = trained_checkpoint(path)
    ckpt = load_training_checkpoint(checkpoint)
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    model = model_from_checkpoint(ckpt, dev, use_ema=use_ema)
    train_cfg = ckpt["config"].get("train") or {}
    fmt = uses_channels_last(train_cfg) if channels_last is None else channels_last
    if fmt:
        model = model.to(memory_format=torch.channels_last)
    precision, _ = resolve_precision(dev, train_cfg.get("amp", "auto"))
    return TrainedRun(checkpoint, ckpt, model, dev, precision, fmt)
