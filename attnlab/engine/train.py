"""``attnlab train``: one training run from a resolved config, and ``--resume`` of an interrupted one.

A run writes ``<out_dir>/<name>/``: config.yaml (resolved), metrics.csv (one row per epoch, numbered from 1),
TensorBoard events, checkpoint_last.pt, checkpoint_best.pt (best val top-1) and results.json (test accuracy of the
best checkpoint, evaluated once at the end). Accuracies are percentages.

Speed: the step never synchronises with the host. Losses and accuracies are summed as device tensors and read once
per epoch; a non-finite loss is recorded on the device and raised at the end of the epoch (on a single CPU process,
where a sync is free, it is raised at once, before the bad step touches the weights). The data stay on the device as
uint8 and are augmented there (``attnlab.data.BatchLoader``), or with ``data.pipeline=stream`` are decoded per
batch in DataLoader workers (``attnlab.data.stream``; docs/data.md). CUDA runs use autocast (bf16 by default); every
device uses channels_last unless ``train.channels_last=false``; ``train.compile`` wraps the model in ``torch.compile``.

Resume: checkpoint_last.pt holds the model, optimizer, scheduler, grad scaler, EMA and RNG states after each epoch
(and the objectives' training-only modules, never part of the model's weights).
The data order and augmentation are a pure function of (seed, epoch), so a resumed run replays the interrupted
epoch from its start and, with ``train.deterministic`` on CPU, ends with the same weights as an uninterrupted one.
Every file is written atomically (``attnlab.files``) but the per-epoch appends to metrics.csv (a row torn by a kill
is dropped on resume) and the TensorBoard events; checkpoint_last.pt is written before checkpoint_best.pt, and a
resume re-derives checkpoint_best.pt when a kill came between the two. A resume may change only RESUMABLE_CHANGES
(more epochs, another lr: from the first resumed epoch), records what it changed at the top of config.yaml, and
changes nothing when the run is complete. A fresh run refuses a run dir that holds a run unless told to overwrite.
"""
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ..errors import AttnlabError
from ..host import device_name
from ..measure import fmt_duration
from ..files import (atomic_write_bytes, atomic_write_json, atomic_write_text, git_commit, remove_stale_temps,
                     writable_dir, write_error)
from .checkpoint import (atomic_save, init_from_state_dict, load_checkpoint, model_from_checkpoint, model_from_config,
                         rng_state, set_rng_state)
from .config import load_config, parse_overrides, read_recipe, refuse_ignored_settings, schema, to_dict
from .distributed import Dist, barrier, broadcast_object, cleanup, setup, sync_buffers
from .ema import EMA
from .evaluate import evaluate
from .precision import autocast, resolve_precision
from .run_folder import RunFolder, uses_channels_last
from .metrics import Meter, RunLog, topk_hits
from .optim import build_optimizer, build_scheduler

NO_BAD_STEP = 2 ** 62  # "no non-finite loss yet" (min-reduced across ranks)
# Config keys a resume may change. The schedule is a pure function of the step and the config, so from the first
# resumed epoch: train.epochs re-spreads the cosine (or multistep) schedule over the new length, train.lr scales it.
# Every other key defines the run (model, data, seed, optimiser, ...): changing it is a new run, not a resume.
# data.data_dir and data.metadata say where the same files are (a moved folder), not which files.
# name and out_dir last: they come from the run folder itself, so the refusal below does not offer them.
RESUMABLE_CHANGES = ("train.epochs", "train.lr", "train.eval_batch_size", "data.data_dir", "data.metadata",
                     "data.cache_dir", "data.workers", "device", "debug.kill_at_step", "name", "out_dir")
RESUME_OVERRIDES = RESUMABLE_CHANGES[:-2]  # the ones a user may give: name and out_dir come from the folder


def add_arguments(p):
    p.add_argument("--config", help="YAML recipe (e.g. configs/quick.yaml)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint_last.pt "
                   f"(overrides allowed on resume: {', '.join(RESUME_OVERRIDES)})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an existing run of the same name (otherwise that is an error)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=0.05")


def run(args):
    if args.resume:
        if args.config:
            raise AttnlabError("--resume takes the run's own config.yaml; give changes as key=value overrides")
        if args.overwrite:
            raise AttnlabError("--resume continues a run and --overwrite replaces it: give one of them")
        cfg = resume_config(args.resume, args.overrides)
        train(cfg, resume=args.resume)
    else:
        if not args.config and not args.overrides:
            raise AttnlabError("give --config configs/<recipe>.yaml (and/or key=value overrides), or --resume RUN_DIR")
        train(load_config(args.config, args.overrides), overwrite=args.overwrite)
    return 0


def resume_config(run_dir, overrides=()) -> DictConfig:
    """The saved run's config (+ overrides, e.g. more epochs), pointed at ``run_dir`` itself."""
    run_dir = Path(run_dir)
    saved = RunFolder(run_dir).config
    if not run_dir.is_dir():
        what = "is a file" if run_dir.exists() else "does not exist"
        raise AttnlabError(f"cannot resume: '{run_dir}' {what}; --resume takes the run folder attnlab train wrote "
                           "(it holds config.yaml and checkpoint_last.pt)")
    if not saved.is_file():
        raise AttnlabError(f"cannot resume: '{saved}' does not exist")
    base = read_recipe(saved)  # a damaged config.yaml is one line, as any recipe
    given = parse_overrides(overrides)
    name, out_dir = (OmegaConf.select(given, key, default=None) for key in ("name", "out_dir"))
    if (name is not None and str(name) != run_dir.name) or (
            out_dir is not None and Path(str(out_dir)).resolve() != run_dir.parent.resolve()):
        raise AttnlabError(f"name and out_dir come from the run folder on resume ({run_dir}): a resumed run stays "
                           "where it is; copy the folder to move it")
    OmegaConf.update(base, "debug.kill_at_step", None, force_add=True)  # a debugging kill: that attempt's only
    # The run is where it is: a name saved before names had to be plain folder names must not block its resume.
    OmegaConf.update(base, "out_dir", str(run_dir.parent), force_add=True)
    OmegaConf.update(base, "name", run_dir.name, force_add=True)
    cfg = load_config(None, overrides, base=base)
    cfg.out_dir, cfg.name = str(run_dir.parent), run_dir.name
    return cfg


@contextmanager
def _determinism(enabled: bool, device: torch.device):
    """torch.use_deterministic_algorithms and cuDNN flags for the run; the process's previous settings come back."""
    prev = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    if device.type == "cuda" and not enabled:
        torch.set_float32_matmul_precision("high")  # TF32 for whatever runs outside autocast
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic GEMMs
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = device.type == "cuda" and not enabled
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[1:3]
        torch.set_float32_matmul_precision(prev[3])


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def train(cfg, resume=None, step_hooks=(), overwrite=False, keep=()) -> dict:
    """Train as ``cfg`` says (a DictConfig from load_config, or a plain dict merged onto the defaults).

    ``step_hooks``: callables ``hook(trainer, epoch, step)`` run before the forward of every training step (epoch
    0-based, step the global 0-based step index, the same after a resume); ``trainer.model`` is the unwrapped model,
    so a training mode (e.g. a supernet drawing a new attention mask per step) can change it without its own loop.
    A hook may say ``leaves_parameters_unused = True`` (some steps use only part of the model: DDP is then built
    with ``find_unused_parameters``) and ``spec()`` (what it is, a JSON value; without one the hook is its class
    name, so two plain functions both record as "function"). The specs are recorded in step_hooks.json when the run
    starts and in every checkpoint: a resume with other hooks is refused, so a supernet never continues as a plain
    run, not even after a kill in epoch 1.
    A fresh run (``resume=None``) refuses a run dir that already holds a run unless ``overwrite``; then that run's
    files are removed once the new run's data, model and optimiser are built, so a new config that fails loses
    nothing. Files named in ``keep`` are the caller's own (bench's cell marker): a dir holding only those counts as
    empty.
    Returns the content of results.json. Under torchrun each rank calls this; rank 0 writes the files.
    """
    if not isinstance(cfg, DictConfig):
        cfg = load_config(base=cfg)
    _hook_specs(step_hooks)
    if resume is None:  # a saved run keeps what it started with: its resume is not refused for them
        refuse_ignored_settings(cfg)
    replace = None  # with --overwrite: the caller's own files, kept when the old run is removed
    if resume is None and overwrite:
        replace = tuple(keep)
    elif resume is None:  # refused before anything loads
        RunFolder(Path(cfg.out_dir) / str(cfg.name)).claim(False, keep)
    d, device = setup(cfg.device)
    try:
        with _determinism(bool(cfg.train.deterministic), device):
            return Trainer(cfg, d, device, resume, step_hooks, replace).fit()
    finally:
        cleanup(d)


def _hook_specs(hooks) -> list:
    """What each step hook is (its ``spec()``, else its class name), checked to be JSON (it goes to step_hooks.json)."""
    specs = [h.spec() if hasattr(h, "spec") else type(h).__qualname__ for h in hooks]
    for spec in specs:
        try:
            if json.loads(json.dumps(spec)) != spec:
                raise ValueError("it changes through JSON (tuples, non-string keys)")
        except (TypeError, ValueError) as err:
            raise AttnlabError(f"step hook spec {spec!r} is not a plain JSON value ({err}): spec() must return "
                               "str, numbers, bools, lists and dicts with string keys") from None
    return specs


def _record_step(meter: Meter, loss, logits, y, terms: dict) -> None:
    """The step's loss, top-1 hits and objective terms into the epoch's means (kept on the device: no host sync)."""
    n = y.shape[0]
    meter.add("loss", loss, n)
    meter.add("top1", topk_hits(logits.detach(), hard_labels(y), ks=(1,))[0].sum(), 100.0)
    for name, value in terms.items():
        meter.add(name, value, n)
    meter.count("n", n)


class Trainer:
    def __init__(self, cfg: DictConfig, d: Dist, device: torch.device, resume=None, step_hooks=(), replace=None):
        self.cfg, self.d, self.device = cfg, d, device
        self.step_hooks = tuple(step_hooks)
        self.hook_specs = _hook_specs(self.step_hooks)
        self.replace = replace  # not None: remove the run this fresh one replaces (keeping these files) at the start
        self.run_dir = Path(cfg.out_dir) / cfg.name
        self.folder = RunFolder(self.run_dir)
        self.log = print if d.is_main else (lambda *a, **k: None)
        if cfg.train.batch_size % d.world_size:
            raise AttnlabError(f"train.batch_size={cfg.train.batch_size} (the global batch) must divide by the "
                               f"{d.world_size} DDP processes")
        resumed = resume is not None and RunFolder(resume).has_checkpoint()
        if resume is not None and not resumed and RunFolder(resume).best.is_file():
            # checkpoint_best.pt is written after checkpoint_last.pt: this run got past epoch 1, and starting it
            # from the beginning would overwrite what it trained.
            raise AttnlabError(f"{resume} has checkpoint_best.pt but no checkpoint_last.pt (removed or lost since "
                               "it was written): it cannot continue where it stopped; start it again (`attnlab "
                               f"train --config {Path(resume) / 'config.yaml'} --overwrite`) or remove the folder")
        # The order below is the order the seeded generators are drawn from (data, then model, then objectives'
        # modules): changing it changes every run's numbers.
        seed_everything(cfg.seed)
        self._build_data()
        self._build_model(init=bool(cfg.model.init) and not resumed)  # a resume loads its checkpoint instead
        self._build_optimisation()
        if resumed:
            # Loaded on the CPU: load_state_dict moves model and optimizer state to their parameters' device.
            self._restore(load_checkpoint(RunFolder(resume).last, map_location="cpu"))
        elif resume is not None:
            self._check_hooks(RunFolder(resume).recorded_hooks())
            self.log(f"{resume} has no checkpoint yet (stopped during epoch 1): starting from the beginning")
        self.epochs_done = self.start_epoch  # epochs whose checkpoint is written (named in a non-finite loss error)
        self.eval_model = self.ema.module if self.ema else self.model
        if cfg.eval.tdam_any_step:  # refused before the first epoch, not after it
            from .evaluate import any_step_modules
            any_step_modules(self.eval_model)
        self.forward = self._training_forward()

    def _build_data(self) -> None:
        """Loaders (the uint8 cache, which rank 0 builds first and the others then read, or the streaming
        pipeline), the model's class count from the data, the precision and the epoch's length."""
        from ..data.pipeline import build_loaders
        cfg, d, t = self.cfg, self.d, self.cfg.train
        loaders = build_loaders(cfg, self.device, t.batch_size // d.world_size, t.eval_batch_size, d.rank,
                                d.world_size, sync=lambda: barrier(d))
        self.bundle, self.train_loader, self.val_loader, self.test_loader = \
            loaders.bundle, loaders.train, loaders.val, loaders.test
        b = self.bundle
        if cfg.model.num_classes is None:
            cfg.model.num_classes = b.num_classes
        elif cfg.model.num_classes < b.num_classes:
            raise AttnlabError(f"model.num_classes={cfg.model.num_classes} but dataset '{b.name}' has "
                               f"{b.num_classes} classes (use null to take the dataset's)")
        self.precision, self.precision_notice = resolve_precision(self.device, t.amp)
        self.channels_last = uses_channels_last(t)
        self.steps_per_epoch = len(self.train_loader)
        if cfg.debug.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, int(cfg.debug.max_steps_per_epoch))

    def _build_model(self, init: bool) -> None:
        """The model (with ``model.init``'s weights when ``init``) and the objectives with their training-only
        modules, on the device in the run's memory format."""
        from ..objectives import build_objectives, features_needed, training_modules
        self.model = model_from_config(self.cfg.model)
        if init:
            self.log(init_from_state_dict(self.model, self.cfg.model.init).summary())
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        self.model = self.model.to(self.device, memory_format=fmt)
        self.objectives = build_objectives(self.cfg, self.model)
        self.features = features_needed(self.objectives)
        # Objectives' training-only modules: optimised with the model, saved in checkpoint_last only (never "model").
        self.aux = training_modules(self.objectives)
        if self.aux is not None:
            self.aux.to(self.device, memory_format=fmt)

    def _build_optimisation(self) -> None:
        """Optimizer, schedule, gradient scaler, EMA, and the progress a fresh run starts from."""
        t = self.cfg.train
        trainable = self.model if self.aux is None else torch.nn.ModuleList([self.model, self.aux])
        self.optimizer = build_optimizer(trainable, t)
        self.scheduler = build_scheduler(self.optimizer, t, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.ema = EMA(self.model, t.ema.decay) if t.ema.enabled else None
        self.start_epoch, self.best, self.best_epoch = 0, float("-inf"), 0
        self.best_top5 = float("nan")  # val top-5 at the best top-1 epoch (reported, never selected on)
        self.elapsed = {"wall_s": 0.0, "train_s": 0.0, "train_images": 0}
        self.pending_rng = None
        self.resume_note = None  # what a resume changed, recorded at the top of config.yaml
        self._wall_mark = time.perf_counter()  # fit() restarts it; _tick_wall() adds the time since to wall_s

    def _training_forward(self):
        """The model as the training forward calls it: wrapped in DDP and compiled when the run asks; state_dicts
        and evaluation use the plain module."""
        forward = self.model
        if self.d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # A step hook that switches modules off for a step (a supernet's random mask) leaves their parameters
            # without gradient on that step, which DDP rejects unless it searches the graph for unused ones.
            find_unused = any(getattr(h, "leaves_parameters_unused", False) for h in self.step_hooks)
            forward = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                          find_unused_parameters=find_unused)
        return torch.compile(forward) if self.cfg.train.compile else forward

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def _state(self, epoch: int) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "epoch": epoch,
                "best_val_top1": self.best, "best_val_top5": self.best_top5, "best_epoch": self.best_epoch,
                "elapsed": dict(self.elapsed),
                "rng": rng_state(), "config": to_dict(self.cfg), "step_hooks": self.hook_specs,
                **({"objective_modules": self.aux.state_dict()} if self.aux is not None else {})}

    def _check_hooks(self, recorded: list) -> None:
        """Refuse a resume whose step hooks differ from those the run was started with."""
        if recorded != self.hook_specs:
            raise AttnlabError(f"{self.run_dir} was trained with step hooks {recorded or 'none'} and this "
                               f"resume has {self.hook_specs or 'none'}: resume it the way it was started "
                               "(a supernet through `attnlab search --config <recipe> --phases supernet`)")

    def _restore(self, ck: dict) -> None:
        changes = _config_changes(ck["config"], to_dict(self.cfg))
        # Checkpoints from before hooks were recorded carry no "step_hooks" and are not checked.
        if "step_hooks" in ck:
            self._check_hooks(ck["step_hooks"])
        self.model.load_state_dict(ck["model"])
        if self.aux is not None:
            self.aux.load_state_dict(ck["objective_modules"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None and ck.get("ema"):
            self.ema.load_state_dict(ck["ema"])
        self.start_epoch, self.best = int(ck["epoch"]), float(ck["best_val_top1"])
        self.best_epoch = int(ck.get("best_epoch", 0))
        self.best_top5 = float(ck.get("best_val_top5", float("nan")))
        self.elapsed = dict(ck.get("elapsed", self.elapsed))
        self.pending_rng = ck["rng"]  # restored just before the first resumed epoch, as an uninterrupted run has it
        self.log(f"resuming {self.run_dir} after epoch {self.start_epoch} (best val top-1 {self.best:.2f}%)")
        if changes:
            self._apply_resume_changes(changes)

    def _apply_resume_changes(self, changes: dict) -> None:
        """Continue the schedule with the changed epochs/lr from the first resumed step (see RESUMABLE_CHANGES)."""
        epochs = int(self.cfg.train.epochs)
        if epochs < self.start_epoch:
            raise AttnlabError(f"train.epochs={epochs} is fewer than the {self.start_epoch} epochs {self.run_dir} "
                               "has already trained")
        if "train.lr" in changes and epochs == self.start_epoch:
            raise AttnlabError(f"{self.run_dir} has trained all {epochs} epochs, so train.lr would apply to none; "
                               "add train.epochs=N to train longer")
        if "train.lr" in changes:
            self.scheduler.base_lrs = [float(self.cfg.train.lr)] * len(self.optimizer.param_groups)
            for g in self.optimizer.param_groups:
                g["initial_lr"] = float(self.cfg.train.lr)
        if "train.lr" in changes or "train.epochs" in changes:
            step = self.scheduler.last_epoch
            for g, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
                g["lr"] = base * factor(step)
        self.resume_note = (f"resumed after epoch {self.start_epoch} with "
                            + ", ".join(f"{k}={new} (was {old})" for k, (old, new) in changes.items())
                            + f"; from epoch {self.start_epoch + 1} the schedule follows the new values")
        self.log(self.resume_note)

    # ---- one training step ---------------------------------------------------------------------------------------

    def _before_step(self, epoch: int, step: int) -> None:
        if self.cfg.debug.kill_at_step is not None and step == self.cfg.debug.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        for hook in self.step_hooks:
            hook(self, epoch, step)

    def _forward_loss(self, x, y, epoch: int, step: int):
        """(loss, logits, objective terms) of one batch."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            return training_loss(self.forward, self.model, self.objectives, self.features, x, y, epoch=epoch,
                                 step=step, label_smoothing=self.cfg.train.label_smoothing)

    def _update(self, loss) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.aux is not None and self.d.enabled:  # outside DDP's wrapper: average their gradients here
            average_gradients(self.aux, self.d.world_size)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)

    # ---- one epoch -----------------------------------------------------------------------------------------------

    def _train_epoch(self, epoch: int) -> tuple[dict, float]:
        """The epoch's training means (loss, top1, objective terms, n, lr) and its training seconds.

        A non-finite loss is checked at once where a host sync is free (one CPU process: before the bad step touches
        the weights), otherwise recorded on the device and raised after the epoch.
        """
        from tqdm import tqdm

        dev = self.device
        self.model.train()
        self.train_loader.set_epoch(epoch)
        meter = Meter(dev)
        bad_step = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=dev)
        check_now = dev.type == "cpu" and not self.d.enabled
        show = self.d.is_main and sys.stderr.isatty()
        shown_loss = LazyScalar(dev)
        start, lr = time.perf_counter(), self.optimizer.param_groups[0]["lr"]
        with tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}", leave=False,
                  disable=not show, dynamic_ncols=True) as bar:
            for i, (x, y) in enumerate(self.train_loader):
                if i >= self.steps_per_epoch:
                    break
                step = epoch * self.steps_per_epoch + i
                self._before_step(epoch, step)
                lr = self.optimizer.param_groups[0]["lr"]
                loss, logits, terms = self._forward_loss(x, y, epoch, step)
                finite = torch.isfinite(loss.detach())
                if check_now and not bool(finite):
                    raise self._nonfinite(loss, epoch, step)
                bad_step = torch.where(finite, bad_step, torch.clamp(bad_step, max=step))
                self._update(loss)
                _record_step(meter, loss, logits, y, terms)
                if show:
                    bar.update(1)
                    if i % 10 == 0:
                        rate = (i + 1) * y.shape[0] * self.d.world_size / (time.perf_counter() - start)
                        bar.set_postfix(loss=f"{shown_loss.read(loss):.3f}", img_s=f"{rate:.0f}")
        self._raise_first_bad_step(bad_step, epoch)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        stats = meter.result(self.d)
        stats["lr"] = lr
        return stats, seconds

    def _raise_first_bad_step(self, bad_step, epoch: int) -> None:
        if self.d.enabled:
            torch.distributed.all_reduce(bad_step, op=torch.distributed.ReduceOp.MIN)
        if int(bad_step) != NO_BAD_STEP:
            raise self._nonfinite(None, epoch, int(bad_step))

    def _nonfinite(self, loss, epoch, step) -> AttnlabError:
        what = f"{float(loss.detach())}" if loss is not None else "non-finite"
        kept = (f"checkpoint_last.pt from epoch {self.epochs_done} is kept" if self.epochs_done
                else "no checkpoint was written")
        return AttnlabError(f"loss became {what} at epoch {epoch + 1}, step {step} (global step; "
                            f"{step - epoch * self.steps_per_epoch} within the epoch); training stopped and {kept}; "
                            "try a lower train.lr or check the data")

    def _validate(self) -> dict:
        sync_buffers(self.eval_model, self.d)  # every rank evaluates (and later tests) rank 0's BN statistics
        if self.val_loader is None:
            return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan")}
        return evaluate(self.eval_model, self.val_loader, self.device, self.precision, self.channels_last, self.d,
                        tdam_any_step=self.cfg.eval.tdam_any_step)

    def _run_epoch(self, epoch: int) -> tuple[dict, list]:
        """Train and validate one epoch: (its metrics.csv row, the objective-term names in it)."""
        e0 = time.perf_counter()
        stats, seconds = self._train_epoch(epoch)
        val = self._validate()
        terms = [k for k in stats if k not in ("loss", "top1", "n", "lr")]
        images = int(stats["n"])
        self.elapsed["train_s"] += seconds
        self.elapsed["train_images"] += images
        self.elapsed["rates"] = list(self.elapsed.get("rates", [])) + [images / seconds]
        # A resumed run may train on with another thread count or GPU: results name every device and its epochs.
        by_device, name = self.elapsed.setdefault("epochs_by_device", {}), device_name(self.device)
        by_device[name] = by_device.get(name, 0) + 1
        by_precision = self.elapsed.setdefault("epochs_by_precision", {})
        by_precision[self.precision] = by_precision.get(self.precision, 0) + 1
        row = {"epoch": epoch + 1, "lr": stats["lr"], "train_loss": stats["loss"], "train_top1": stats["top1"],
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
               **({"val_top1_any_step": val.get("top1_any_step", float("nan"))} if self.cfg.eval.tdam_any_step
                  else {}),
               **{k: stats[k] for k in terms},
               "epoch_time_s": time.perf_counter() - e0, "images_per_s": images / seconds}
        return row, terms

    def _track_best(self, row: dict) -> bool:
        """Whether this epoch is the new best (always, without a validation split); updates the best fields."""
        improved = self.val_loader is None or row["val_top1"] > self.best
        if improved:
            self.best, self.best_top5, self.best_epoch = row["val_top1"], row["val_top5"], row["epoch"]
        return improved

    # ---- files ---------------------------------------------------------------------------------------------------

    def _tick_wall(self) -> None:
        """Add the wall time since the last tick to elapsed["wall_s"] (so a checkpoint carries it)."""
        now = time.perf_counter()
        self.elapsed["wall_s"] += now - self._wall_mark
        self._wall_mark = now

    def _save_epoch(self, log, row: dict, terms: list, improved: bool) -> None:
        """metrics.csv row and checkpoints (rank 0), then every rank learns whether that worked."""
        self._tick_wall()
        failed = self._write_epoch_files(log, row, terms, improved) if self.d.is_main else None
        self._stop_if_rank0_failed(failed)
        self.epochs_done = row["epoch"]

    def _write_epoch_files(self, log, row: dict, terms: list, improved: bool) -> AttnlabError | None:
        try:
            log.write(row, terms)  # before the checkpoint: a crash in between replays this epoch
            state = self._state(row["epoch"])
            atomic_save(state, self.folder.last)
            if improved:
                atomic_save(state, self.folder.best)
        except AttnlabError as err:
            return err
        except OSError as err:  # metrics.csv and TensorBoard are appended in place
            return write_error(err, self.folder.metrics, "metrics")
        return None

    def _stop_if_rank0_failed(self, failed: AttnlabError | None) -> None:
        """Raise rank 0's write error on every rank (instead of the others waiting for it forever)."""
        message = broadcast_object(None if failed is None else str(failed), self.d)
        if failed is not None:
            raise failed
        if message is not None:
            raise AttnlabError(f"rank 0 stopped: {message}")

    def _start_run_dir(self) -> None:
        """Remove the run this one replaces (--overwrite), create the run dir, drop temp files a kill left, write
        config.yaml; every rank learns if that failed."""
        failed = None
        if self.d.is_main:
            try:
                if self.replace is not None:
                    self.folder.claim(True, self.replace)
                writable_dir(self.run_dir, "run dir")
                remove_stale_temps(self.run_dir)
                if self.start_epoch > 0 and self.folder.results.is_file():
                    # A finished run trained on (more epochs): its results.json describes the shorter run, so it
                    # goes until the new one is written; a kill in between leaves a run that is not done.
                    self.folder.results.unlink()
                atomic_write_text(self.folder.config, self._config_text(), "config")
                if self.hook_specs:
                    atomic_write_text(self.folder.hooks, json.dumps(self.hook_specs) + "\n", "step hooks")
            except AttnlabError as err:
                failed = err
        self._stop_if_rank0_failed(failed)

    def _config_text(self) -> str:
        """The resolved config, under comment lines saying what each resume changed (kept from before)."""
        path = self.folder.config
        notes = [line for line in path.read_text().splitlines() if line.startswith("# resumed")] \
            if self.start_epoch > 0 and path.is_file() else []
        if self.resume_note:
            notes.append(f"# {self.resume_note}")
        return "".join(n + "\n" for n in notes) + OmegaConf.to_yaml(self.cfg)

    def _reconcile_best(self) -> None:
        """On resume: checkpoint_best.pt must be the epoch checkpoint_last.pt records as best.

        checkpoint_last is written first, so a kill while checkpoint_best is written for an improving epoch leaves
        last saying best_epoch == its own epoch while best holds an older one; last is then that best state.
        """
        if self.start_epoch == 0:
            return
        failed = None
        if self.d.is_main:
            try:
                self._fix_best_file()
            except AttnlabError as err:
                failed = err
        self._stop_if_rank0_failed(failed)

    def _fix_best_file(self) -> None:
        best_path, last_path = self.folder.best, self.folder.last
        try:
            best_epoch = int(load_checkpoint(best_path)["epoch"]) if best_path.is_file() else None
        except AttnlabError:
            best_epoch = None  # unreadable: re-derive it like a missing one
        if best_epoch == self.best_epoch:
            return
        if self.best_epoch != self.start_epoch:
            raise AttnlabError(f"{best_path} holds epoch {best_epoch} but {last_path.name} records epoch "
                               f"{self.best_epoch} as the best, which no file holds any more; start the run again")
        atomic_write_bytes(best_path, last_path.read_bytes(), "checkpoint")
        self.log(f"checkpoint_best.pt re-derived from checkpoint_last.pt (epoch {self.best_epoch}, the best; "
                 "the previous attempt stopped while writing it)")

    def _completed_results(self) -> dict | None:
        """The saved results.json when this resume has nothing left to do (all epochs trained and tested)."""
        if self.start_epoch < self.cfg.train.epochs:
            return None
        try:
            saved = json.loads(self.folder.results.read_text())
        except (OSError, ValueError):
            return None  # killed before results.json: test the best checkpoint now
        return saved if saved.get("epochs") == self.cfg.train.epochs else None

    # ---- the run -------------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        done = self._completed_results()
        if done is not None:
            self.log(f"{self.run_dir} is complete ({self.cfg.train.epochs} epochs, results.json written); nothing "
                     f"changed. To train longer: --resume {self.run_dir} train.epochs=N")
            return done
        self._wall_mark = time.perf_counter()
        self._start_run_dir()
        self._reconcile_best()
        log = RunLog(self.folder, self.start_epoch) if self.d.is_main else None
        self._announce()
        if self.pending_rng is not None:
            set_rng_state(self.pending_rng)
        started = time.perf_counter()  # this attempt's pace gives the time left on each epoch line
        try:
            for epoch in range(self.start_epoch, self.cfg.train.epochs):
                row, terms = self._run_epoch(epoch)
                improved = self._track_best(row)
                self._save_epoch(log, row, terms, improved)
                done = epoch + 1 - self.start_epoch
                self._print_epoch(row, terms, left_s=(time.perf_counter() - started) / done * (
                    self.cfg.train.epochs - epoch - 1))
        finally:
            if log is not None:
                log.close()
        return self._finish()

    def _announce(self) -> None:
        cfg, t, d = self.cfg, self.cfg.train, self.d
        self.log(f"{cfg.name}: {cfg.model.name} ({cfg.model.attention}) on {self.bundle.summary()}; "
                 f"{t.epochs} epochs x {self.steps_per_epoch} steps of {t.batch_size} on {device_name(self.device)}"
                 f"{f' x {d.world_size} ranks' if d.enabled else ''} in {self.precision}; run dir {self.run_dir}")
        if self.precision_notice:
            self.log(self.precision_notice)

    def _print_epoch(self, row: dict, terms: list, left_s: float) -> None:
        """The epoch's line. Every epoch's line but the last ends with the time the remaining epochs will take at
        this attempt's pace (training, evaluation and checkpoints), e.g. '1h05m left'."""
        extra = "".join(f"  {k} {row[k]:.4f}" for k in terms)
        any_step = f" (any step {row['val_top1_any_step']:5.2f}%)" if "val_top1_any_step" in row else ""
        left = f"  {fmt_duration(left_s)} left" if left_s > 0 else ""
        self.log(f"epoch {row['epoch']:>3}/{self.cfg.train.epochs}  lr {row['lr']:.4f}  train loss "
                 f"{row['train_loss']:.4f} top-1 {row['train_top1']:5.2f}%{extra}  val loss {row['val_loss']:.4f} "
                 f"top-1 {row['val_top1']:5.2f}%{any_step} top-5 {row['val_top5']:5.2f}%  {row['epoch_time_s']:.1f}s  "
                 f"{row['images_per_s']:.0f} img/s{left}", flush=True)

    def _finish(self) -> dict:
        """Test accuracy of checkpoint_best.pt, written to results.json (rank 0) and returned."""
        cfg, d = self.cfg, self.d
        barrier(d)
        ck = load_checkpoint(self.folder.best, map_location=self.device)
        best_model = model_from_checkpoint(ck, self.device, use_ema=True)
        if self.channels_last:
            best_model = best_model.to(memory_format=torch.channels_last)
        test = evaluate(best_model, self.test_loader, self.device, self.precision, self.channels_last, d,
                        tdam_any_step=cfg.eval.tdam_any_step)
        self._tick_wall()
        results = {
            "name": cfg.name, "model": cfg.model.name, "attention": cfg.model.attention, "dataset": self.bundle.name,
            "epochs": cfg.train.epochs, "best_epoch": int(ck["best_epoch"]),
            "best_val_top1": _number(ck["best_val_top1"]),
            "best_val_top5": _number(ck.get("best_val_top5", float("nan"))),
            "test_top1": test["top1"], "test_top5": test["top5"],
            **({"test_top1_any_step": test["top1_any_step"]} if "top1_any_step" in test else {}),
            "test_loss": test["loss"], "params": sum(p.numel() for p in self.model.parameters()),
            "flops": _flops(self.model, self.bundle.image_size), "wall_time_s": round(self.elapsed["wall_s"], 2),
            "train_images_per_s": self.elapsed["train_images"] / max(self.elapsed["train_s"], 1e-9),
            # The median epoch leaves out a first epoch slowed by torch.compile's warm-up.
            "train_images_per_s_median_epoch": float(np.median(self.elapsed["rates"])) if self.elapsed.get("rates")
            else None,
            "device": device_name(self.device), "epochs_by_device": dict(self.elapsed.get("epochs_by_device", {})),
            "precision": _precision_of(self.elapsed, self.precision),
            "epochs_by_precision": dict(self.elapsed.get("epochs_by_precision", {})),
            "world_size": d.world_size, "torch": torch.__version__,
            "git_commit": git_commit(), "seed": cfg.seed,
        }
        if d.is_main:
            atomic_write_json(self.folder.results, results, "results")
            print(results_table(results, self.run_dir), flush=True)
        return results


class LazyScalar:
    """A device scalar for display, read without waiting for the GPU: a non-blocking copy into pinned memory that
    is read once its event has completed (the shown value lags a few steps). CPU tensors are read directly."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.value, self.event = float("nan"), None
        if self.cuda:
            self.buf = torch.empty((), dtype=torch.float32, pin_memory=True)

    def read(self, t: torch.Tensor) -> float:
        if not self.cuda:
            return float(t.detach())
        if self.event is not None and self.event.query():
            self.value, self.event = float(self.buf), None
        if self.event is None:
            self.buf.copy_(t.detach().float(), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        return self.value


def training_loss(forward, model, objectives, features, x, y, *, epoch: int, step: int, label_smoothing: float):
    """(loss, logits, objective terms) of one batch: cross-entropy plus every objective's weighted terms.

    ``forward`` is the module that runs the batch (the model, or its DDP / compiled wrapper); ``model`` the plain
    network, which objectives read (a teacher design runs it again). The engine's loss, and the one
    benchmarks time through ``engine/step_timer.py`` (cell_plan.py, ssia_screen.py cost), so both measure the same
    step.
    """
    if features:
        logits, feats = forward(x, features=features)
    else:
        logits, feats = forward(x), None
    # Class indices, or class probabilities from mixup/cutmix (the soft-target loss; objectives get the dominant
    # class).
    ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    terms = {}
    for obj in objectives:
        extra = {"inputs": x} if getattr(obj, "needs_inputs", False) else {}
        terms.update(obj(model=model, logits=logits, targets=hard_labels(y), features=feats, epoch=epoch,
                         step=step, **extra))
    loss = ce + sum(terms.values()) if terms else ce
    return loss, logits, terms


def results_table(r: dict, run_dir) -> str:
    rows = [("model", f"{r['model']} + {r['attention']}"), ("dataset", r["dataset"]),
            ("best val top-1", "n/a (no validation split)" if r["best_val_top1"] is None else
             f"{r['best_val_top1']:.2f}% (epoch {r['best_epoch']}/{r['epochs']})"),
            ("test top-1 / top-5", f"{r['test_top1']:.2f}% / {r['test_top5']:.2f}%"),
            *([("test any-step top-1 (TDAM)", f"{r['test_top1_any_step']:.2f}%")] if "test_top1_any_step" in r else []),
            ("params / FLOPs", f"{r['params'] / 1e6:.3f} M / {r['flops'] / 1e6:.1f} M"),
            ("train speed", f"{r['train_images_per_s']:.0f} images/s on {r['device']}"
             + (f" (median epoch {r['train_images_per_s_median_epoch']:.0f})"
                if r.get("train_images_per_s_median_epoch") else "")),
            ("wall time", f"{r['wall_time_s']:.1f} s"), ("run dir", str(run_dir))]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k:<{width}} | {v}" for k, v in rows] + [line])


def _number(x):
    x = float(x)
    return None if x != x or x in (float("inf"), float("-inf")) else x  # JSON has no NaN


def _config_changes(saved: dict, now: dict) -> dict:
    """{dotted key: (saved value, new value)} for the keys a resume changes; a change to a key outside
    RESUMABLE_CHANGES is an AttnlabError naming every such key."""
    a, b = _flatten(saved), _flatten(now)
    # A key the schema gained after the run started reads as its default (the value the run trained with).
    a.update({k: v for k, v in _flatten(to_dict(schema())).items() if k not in a and k in b})
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    fixed = [k for k in changed if k not in RESUMABLE_CHANGES]
    if fixed:
        raise AttnlabError("cannot change on resume: " + ", ".join(f"{k} ({changed[k][0]} -> {changed[k][1]})"
                                                                   for k in fixed)
                           + f"; they define the run (resume may change {', '.join(RESUME_OVERRIDES)}); train "
                           "a new run under a new name=... instead (if no override changed them, the checkpoint and "
                           "the config disagree: checkpoint_last.pt was copied from another run, or the recipe or "
                           "config.yaml was edited)")
    return {k: v for k, v in changed.items() if k not in ("name", "out_dir", "debug.kill_at_step")}


def hard_labels(y: torch.Tensor) -> torch.Tensor:
    """Class indices from targets that may be class probabilities (mixup/cutmix): the most weighted class."""
    return y.argmax(-1) if y.is_floating_point() else y


def average_gradients(module, world_size: int) -> None:
    for p in module.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world_size)


def _flatten(node, prefix="") -> dict:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    if not node and prefix:
        return {prefix[:-1]: {}}
    out = {}
    for k, v in node.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _flops(model, image_size) -> int:
    """FLOPs (2 x MACs) of one image, counted by the profiler on a CPU copy of the model."""
    import copy

    from ..measure import count_flops
    size = image_size if isinstance(image_size, int) else tuple(image_size)
    probe = copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.contiguous_format)
    return int(count_flops(probe, size, batch_size=1))


def _precision_of(elapsed: dict, current: str) -> str:
    """The run's precision: the one every epoch trained in, or "mixed" when a resume changed it."""
    seen = set(elapsed.get("epochs_by_precision") or {}) or {current}
    return seen.pop() if len(seen) == 1 else "mixed"
