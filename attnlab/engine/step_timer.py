"""One training step of a config on random tensors: what the benchmarks time to size cells and to compare the cost
of training-only objectives.

The step is the engine's: the config's model (channels_last as the run would be), its objectives and their
training-only modules, ``training_loss`` under the precision given, backward and the recipe's optimiser. The model
is compiled when ``train.compile`` says so (the first calls hold the compilation: time after a warm-up). The data
pipeline is left out: random images at the config's batch size and image size.
"""
import torch

from .checkpoint import model_from_config
from .optim import build_optimizer
from .precision import autocast
from .run_folder import uses_channels_last
from .train import training_loss

CPU = torch.device("cpu")


def synthetic_step(cfg, precision: str, seed: int = 0):
    """A closure that runs one training step of ``cfg`` on one fixed random batch (CPU). Objective terms are on:
    the step counts as the last epoch's, past any warm-up."""
    from ..objectives import build_objectives, features_needed, training_modules

    torch.manual_seed(seed)
    cfg.model.num_classes = cfg.model.num_classes or 10
    fmt = torch.channels_last if uses_channels_last(cfg.train) else torch.contiguous_format
    model = model_from_config(cfg.model).train().to(memory_format=fmt)
    objectives = build_objectives(cfg, model)
    aux = training_modules(objectives)
    if aux is not None:
        aux.train().to(memory_format=fmt)
    opt = build_optimizer(model if aux is None else torch.nn.ModuleList([model, aux]), cfg.train)
    forward = torch.compile(model) if cfg.train.compile else model
    features = features_needed(objectives)
    g = torch.Generator().manual_seed(seed)
    size = cfg.data.image_size or 32
    x = torch.randn(cfg.train.batch_size, 3, size, size, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, cfg.model.num_classes, (cfg.train.batch_size,), generator=g)
    epoch, count = cfg.train.epochs - 1, 0

    def step():
        nonlocal count
        with autocast(CPU, precision):
            loss, _, _ = training_loss(forward, model, objectives, features, x, y, epoch=epoch, step=count,
                                       label_smoothing=cfg.train.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        count += 1  # a shuffled-target control draws its derangement from the step
    return step
