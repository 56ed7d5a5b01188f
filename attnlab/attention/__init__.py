"""Attention modules. Every module is ``Module(channels, **kwargs)`` with same-shape input and output.

    attnlab.attention.create("se", 256, reduction=16)
    attnlab.attention.get("cbam")       # the class, usable as timm's attn_layer
    attnlab.attention.names()
"""
from .registry import check_kwargs, create, get, names, options_dict, register

# Importing a module registers it: one file per mechanism.
from . import none, se, cbam, eca, spe, tdam, dia  # noqa: F401
from . import simam, gc, coord, gct, triplet, bam, fca  # noqa: F401

__all__ = ["create", "get", "names", "register", "check_kwargs", "options_dict"]
