"""``BatchLoader``: batches straight from a uint8 tensor, augmented as whole batches on the training device.

Why not ``torch.utils.data.DataLoader``: for 32x32 images the per-sample Python work (PIL, ToTensor, collate) costs
far more than the model's forward pass on a small CPU. Here the whole split is one uint8 tensor that is moved to the
device once; each batch is one ``index_select``, one zero pad, one ``gather`` that does the random crop and the flip
for every sample at once, and one fused normalisation.

Determinism: the epoch's plan (order, crop offsets, flips) is drawn on the CPU from a ``torch.Generator`` seeded by
(seed, epoch) only, then moved to the device once per epoch, so it is identical on CPU and CUDA, for every rank, and
no batch needs a host sync. Call ``set_epoch(epoch)`` before each epoch (iterating twice without it repeats the epoch).

Distributed: all ranks draw the same global plan and rank ``r`` takes positions ``r, r + W, r + 2W, ...`` (an
equal-size strided slice, as ``DistributedSampler`` does), so W ranks with batch B see the same global batches,
with the same augmentation, as one process with batch W*B. With ``drop_last=False`` the plan is padded by repeating
its first positions until it divides by W (a few samples seen twice, as DistributedSampler does) and the last batch
may be short; with ``drop_last=True`` the plan is cut to a multiple of W and short last batches are dropped.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AttnlabError
from ..host import cpu_threads


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed from (seed, epoch): neighbouring seeds/epochs give unrelated streams."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise AttnlabError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def crop_flip(batch: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Random-crop-with-zero-padding and horizontal flip of a whole batch in one gather.

    ``batch`` B x C x H x W (any dtype); ``offsets`` B x 2 (dy, dx) in [0, 2*padding]; ``flips`` B bool. Output
    sample i equals ``pad(batch[i], padding)[:, dy:dy+H, dx:dx+W]``, mirrored left-right where ``flips[i]``.
    """
    b, c, h, w = batch.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = F.pad(batch, (padding, padding, padding, padding)) if padding else batch
    dev = batch.device
    rows = offsets[:, :1] + torch.arange(h, device=dev)  # B x H
    cols = torch.arange(w, device=dev)
    cols = offsets[:, 1:] + torch.where(flips[:, None], (w - 1) - cols, cols)  # B x W: mirrored reads = flip
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, index).view(b, c, h, w)


class BatchLoader:
    """Yields ``(images, labels)``: float32 N x C x H x W normalised with ``mean``/``std`` (in 0..1 units; None
    leaves pixels in 0..1), int64 labels, both on ``device``. ``len(loader)`` is the number of batches per epoch.

    ``augment`` = random crop with ``padding`` zero pixels (torchvision ``RandomCrop(size, padding)``) and
    horizontal flip with p=0.5 (``flip``). ``cpu_threads`` caps torch's intra-op threads while a batch is built on
    the CPU (restored before the batch is yielded): these ops are small, and on a busy machine OpenMP threads that
    spin-wait for a descheduled partner made 2 threads ~20x slower than 1 (measured); None leaves torch's setting.
    ``images_on_device=False`` keeps the uint8 data on the host and copies each
    finished uint8 batch over (for datasets larger than device memory); the default moves it once.
    """

    def __init__(self, split, batch_size: int, shuffle: bool = False, augment: bool = False, mean=None, std=None,
                 device="cpu", seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 padding: int = 4, flip: bool = True, images_on_device: bool = True, cpu_threads: int | None = 1):
        self.batch_size = _positive_int("batch_size", batch_size)
        self.world_size = _positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 <= rank < world_size:
            raise AttnlabError(f"rank must be in [0, {world_size}), got {rank!r}")
        if isinstance(padding, bool) or not isinstance(padding, numbers.Integral) or padding < 0:
            raise AttnlabError(f"padding must be a non-negative integer, got {padding!r}")
        images, labels = split.images, split.labels
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise AttnlabError(f"BatchLoader needs uint8 images N x C x H x W, got {images.dtype} "
                               f"{tuple(images.shape)}")
        if len(images) == 0:
            raise AttnlabError("BatchLoader got an empty split")
        self.device = torch.device(device)
        self.rank, self.seed, self.epoch = int(rank), int(seed), 0
        self.shuffle, self.augment, self.drop_last = bool(shuffle), bool(augment), bool(drop_last)
        self.padding, self.flip = int(padding), bool(flip)
        self.cpu_threads = cpu_threads if self.device.type == "cpu" else None
        self.n = len(images)
        self.host_images = not images_on_device and self.device.type != "cpu"
        if self.host_images:
            self.images = images.contiguous().pin_memory() if torch.cuda.is_available() else images.contiguous()
        else:
            self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        c = images.shape[1]
        mean = torch.zeros(c, dtype=torch.float64) if mean is None else torch.as_tensor(mean, dtype=torch.float64)
        std = torch.ones(c, dtype=torch.float64) if std is None else torch.as_tensor(std, dtype=torch.float64)
        if mean.shape != (c,) or std.shape != (c,) or bool((std <= 0).any()):
            raise AttnlabError(f"mean and std need {c} values each and std > 0, got mean={mean.tolist()}, "
                               f"std={std.tolist()}")
        # x_norm = (x/255 - mean)/std = x * scale + shift, computed in float64 and applied in one fused op.
        self.scale = (1.0 / (255.0 * std)).float().view(1, c, 1, 1).to(self.device)
        self.shift = (-mean / std).float().view(1, c, 1, 1).to(self.device)

        w = self.world_size
        self.total = (self.n // w) * w if self.drop_last else math.ceil(self.n / w) * w
        self.per_rank = self.total // w
        if self.per_rank == 0:
            raise AttnlabError(f"{self.n} images cannot fill one sample per rank for world_size={w} with drop_last")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def plan(self, epoch: int | None = None):
        """This rank's (indices, offsets, flips) for ``epoch`` on the CPU; offsets/flips are None without augment."""
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch if epoch is None else epoch))
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        offsets = flips = None
        if self.augment:  # drawn for the n global positions, so the plan does not depend on world_size
            offsets = torch.randint(0, 2 * self.padding + 1, (self.n, 2), generator=g)
            flips = torch.rand(self.n, generator=g) < 0.5
            if not self.flip:
                flips.zero_()
        # Cut (drop_last) or pad by wrapping around (so every rank gets the same count).
        pos = torch.arange(self.total) % self.n
        order = order[pos]
        if offsets is not None:
            offsets, flips = offsets[pos], flips[pos]
        mine = slice(self.rank, None, self.world_size)
        return order[mine], None if offsets is None else offsets[mine], None if flips is None else flips[mine]

    def _batch(self, idx, offsets, flips):
        x = self.images.index_select(0, idx)
        if self.host_images:
            x = x.to(self.device, non_blocking=True)
        if offsets is not None:
            x = crop_flip(x, offsets, flips, self.padding)
        # One pass: float conversion, scale and shift (addcmul keeps it to two kernels).
        x = torch.addcmul(self.shift, x.to(torch.float32), self.scale)
        return x

    def __iter__(self):
        order, offsets, flips = self.plan()
        data_dev = torch.device("cpu") if self.host_images else self.device
        order = order.to(data_dev)
        labels_idx = order.to(self.device)
        if offsets is not None:
            offsets, flips = offsets.to(self.device), flips.to(self.device)
        b = self.batch_size
        for i in range(len(self)):
            sl = slice(i * b, (i + 1) * b)
            with cpu_threads(min(torch.get_num_threads(), self.cpu_threads) if self.cpu_threads else None):
                x = self._batch(order[sl], None if offsets is None else offsets[sl],
                                None if flips is None else flips[sl])
                y = self.labels.index_select(0, labels_idx[sl])
            yield x, y
