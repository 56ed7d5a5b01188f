"""Accuracy of a supernet under a connection scheme, on a split held out of train, cached per scheme.

``SchemeEvaluator(model, val_loader, ...)(bits) -> {"top1", "loss", "n", "seconds", "cached"}``:
  * the model is evaluated in eval mode, scheme set with ``set_connections``, on ``val_loader`` (the engine's
    ``data.val_size`` split, carved out of the training pool; the search never sees the test split);
  * deterministic: a fixed loader order, no augmentation, and (optional) BN recalibration from fixed batches;
  * BN recalibration (``recal_batches`` = N > 0), as SPOS (megvii-model/SinglePathOneShot, src/Search/tester.py)
    does per candidate: reset every BN's running statistics, run N training batches (no augmentation, a fixed
    seeded order) through the model in train mode without gradients, evaluate, then put the supernet's own
    statistics back. SPOS keeps BN's momentum (an EMA); here momentum is None while recalibrating, a cumulative
    average that does not depend on batch order. EAN never recalibrates (its search reads the supernet's running
    statistics as they are), which is ``recal_batches: 0``, the default;
  * cache: every evaluation is one line of a JSONL file (``attnlab.jsonl``) keyed by the scheme and a context
    string (the checkpoint's SHA-256, the recalibration setting, the val split's size), so a restarted search
    reads what was done and a changed supernet or setting never reuses stale numbers.
"""
import hashlib
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import AttnlabError
from ..models.connections import bits_to_blocks, set_connections
from ..jsonl import append_jsonl, read_jsonl


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class SchemeEvaluator:
    def __init__(self, model: nn.Module, val_loader, device="cpu", recal_loader=None, recal_batches: int = 0,
                 cache_path=None, context: str = "", channels_last: bool = False):
        from ..engine.evaluate import evaluate
        self._evaluate = evaluate
        self.model, self.val_loader, self.device = model.eval(), val_loader, torch.device(device)
        self.recal_loader, self.recal_batches = recal_loader, int(recal_batches)
        if self.recal_batches and recal_loader is None:
            raise ValueError("recal_batches > 0 needs a recal_loader of training batches")
        self.channels_last = channels_last
        self.context = f"{context}|recal={self.recal_batches}|val={val_loader.n}"
        self.cache: dict[str, dict] = {}
        self.cache_path = cache_path
        self.evaluations = 0  # real (uncached) evaluations by this instance
        self.depths = tuple(model.depths)
        self.split = f"val ({val_loader.n} images held out of train)"
        if cache_path is not None:
            for rec in read_jsonl(cache_path):
                if rec.get("context") == self.context:
                    self.cache[rec["scheme"]] = rec

    def __call__(self, bits) -> dict:
        key = "".join(str(int(b)) for b in bits)
        if key in self.cache:
            return {**_public(self.cache[key]), "cached": True}
        t0 = time.perf_counter()
        set_connections(self.model, bits_to_blocks(key, self.model.depths))
        saved = self._recalibrate() if self.recal_batches else None
        try:
            res = self._evaluate(self.model, self.val_loader, self.device, channels_last=self.channels_last)
        finally:
            if saved is not None:
                self.model.load_state_dict(saved, strict=True)
        rec = {"context": self.context, "scheme": key, "top1": float(res["top1"]), "loss": float(res["loss"]),
               "n": int(res["n"]), "seconds": round(time.perf_counter() - t0, 3)}
        self.evaluations += 1
        self.cache[key] = rec
        if self.cache_path is not None:
            append_jsonl(self.cache_path, rec, sort_keys=True)
        return {**_public(rec), "cached": False}

    @torch.no_grad()
    def _recalibrate(self):
        """Reset BN statistics and re-estimate them from ``recal_batches`` training batches; returns the old state."""
        saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the recalibration batches
        self.model.train()
        try:
            self.recal_loader.set_epoch(0)  # the same batches for every scheme
            for i, (x, _) in enumerate(self.recal_loader):
                if i >= self.recal_batches:
                    break
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                self.model(x)
        finally:
            for bn, m in zip(bns, momenta):
                bn.momentum = m
            self.model.eval()
        return saved


class TableEvaluator:
    """The same interface answered from a committed scheme table (``attnlab search --table``): each scheme's
    ``top1`` and ``loss`` are looked up, nothing is evaluated. It re-runs a search (another searcher, seed or
    selection rule, or a search whose folder was lost) on the numbers a supernet already produced; the result
    records the table's path and SHA-256 as its context."""

    def __init__(self, path, depths):
        from .replay import read_table
        self.table = read_table(path)
        self.depths = tuple(depths)
        n_bits = len(next(iter(self.table)))
        if n_bits != sum(self.depths) or len(self.table) != 2 ** n_bits:
            raise AttnlabError(f"table '{path}' has {len(self.table)} schemes of {n_bits} bits; this model needs "
                             f"all {2 ** sum(self.depths)} schemes of {sum(self.depths)} bits")
        self.split = f"looked up in {path}"
        self.context = f"table={Path(path).name}|sha256={file_sha256(path)[:16]}"
        self.evaluations = 0  # a table never evaluates

    def __call__(self, bits) -> dict:
        rec = self.table[tuple(int(b) for b in bits)]
        return {"top1": rec["top1"], "loss": rec.get("loss", float("nan")), "n": 0, "seconds": 0.0, "cached": True}


def _public(rec: dict) -> dict:
    return {k: rec[k] for k in ("top1", "loss", "n", "seconds")}


def checkpoint_context(path) -> str:
    return f"ckpt={file_sha256(Path(path))[:16]}"
