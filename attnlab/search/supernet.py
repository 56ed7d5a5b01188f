"""Supernet training: the engine's per-step hook that draws a fresh random connection mask for every step.

EAN (official ``train_imagenet/train_imagenet_ensemble_subset.py``) draws, for every mini-batch, each block's bit
as an independent fair coin and trains the shared-module network under that mask. Here the same is one hook,
``SupernetHook(p, seed)``, handed to ``attnlab.engine.train.train(cfg, step_hooks=[hook])``: the engine calls
``hook(trainer, epoch, step)`` before the forward of every training step. The mask of step s is drawn from a
generator seeded by (run seed, s) alone, so a resumed run draws the same masks as an uninterrupted one, and every
DDP rank draws the same mask (which DDP needs: its ranks must run the same graph).

Evaluation during training (the engine's per-epoch val top-1 and the final test) uses ``eval_mask``, default
"all" (every block connected); EAN validated with no block connected, which is ``eval_mask: "none"``. A forward
pre-hook on the model applies it whenever the model runs in eval mode, so the last training step's random mask
never leaks into a validation number. The search itself loads the final weights (checkpoint_last.pt) into a fresh
model and sets each scheme explicitly.

Departures: EAN passes the mask as a forward argument; here it is model state set by the hook (no engine change).
A mask that leaves a stage unconnected leaves its shared module without gradient for that step; the hook says so
(``leaves_parameters_unused``) and the engine builds DDP with ``find_unused_parameters`` (tests/test_ddp.py: two
ranks train the weights one process trains). ``spec()`` goes into every checkpoint, so the engine refuses to
resume a supernet run without this hook (or with another p, seed or eval mask).
"""
import numpy as np
import torch

from ..errors import AttnlabError
from ..models.connections import bits_to_blocks, connectable, random_bits, set_connections

_STREAM = 0xEA7  # keeps the mask stream apart from other uses of (seed, step)


def mask_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step) & 0xFFFFFFFF, _STREAM])
               .generate_state(1, np.uint64)[0] >> np.uint64(1))


class SupernetHook:
    leaves_parameters_unused = True  # a stage whose bits are all 0 does not call its shared module

    def __init__(self, p: float = 0.5, seed: int = 0, eval_mask: str = "all"):
        if not 0 < float(p) <= 1:
            raise AttnlabError(f"supernet.p must be in (0, 1], got {p}")
        if eval_mask not in ("all", "none"):
            raise AttnlabError(f"supernet.eval_mask must be 'all' or 'none', got {eval_mask!r}")
        self.p, self.seed, self.eval_mask = float(p), int(seed), eval_mask
        self._installed = set()
        self.last = None

    def spec(self) -> dict:
        return {"hook": "supernet", "p": self.p, "seed": self.seed, "eval_mask": self.eval_mask}

    def mask(self, step: int, n_bits: int) -> tuple[int, ...]:
        """The mask of global step ``step``: a pure function of (seed, step)."""
        return random_bits(n_bits, self.p, torch.Generator().manual_seed(mask_seed(self.seed, step)))

    def __call__(self, trainer, epoch: int, step: int) -> None:
        model = trainer.model
        self.install(model)
        bits = self.mask(step, sum(model.depths))
        set_connections(model, bits_to_blocks(bits, model.depths))
        self.last = bits

    def install(self, model) -> None:
        """Check the model is a supernet and add the eval-mode mask (once per model)."""
        if id(model) in self._installed:
            return
        if not all(all(stage) for stage in connectable(model)):
            raise AttnlabError("supernet training needs an attention module in every block "
                               "(model.share=true model.blocks=all, and an attention other than none)")
        model.register_forward_pre_hook(self._eval_pre_hook)
        self._installed.add(id(model))

    def _eval_pre_hook(self, module, args):
        if module.training:
            return
        if self.eval_mask == "all":
            set_connections(module, None)
        else:
            set_connections(module, bits_to_blocks("0" * sum(module.depths), module.depths))
