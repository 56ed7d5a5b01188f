"""The empty slot: the plain backbone."""
import torch.nn as nn

from .registry import register


@register("none")
class NoAttention(nn.Identity):
    """Identity with the attention-module signature; adds no parameters and no state_dict keys."""

    def __init__(self, channels: int = 0):
        super().__init__()
