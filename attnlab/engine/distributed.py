"""DDP set-up from torchrun's environment (gloo on CPU, nccl on CUDA) and cross-rank reductions."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import AttnlabError, unknown


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process group was created by setup() (and is destroyed by cleanup())

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise AttnlabError("the device cuda was asked for but no CUDA device is available; use auto or cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name != "cpu":  # a typo must not train or evaluate on the CPU unnoticed
        raise unknown("device", name, ("auto", "cpu", "cuda"))
    return torch.device("cpu")


def setup(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local, owns), device


def cleanup(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensors: dict, d: Dist) -> dict:
    """Sum each tensor across ranks (one collective for all of them)."""
    if not d.enabled or not tensors:
        return tensors
    keys = list(tensors)
    flat = torch.stack([tensors[k].detach().double() if tensors[k].device.type == "cpu"
                        else tensors[k].detach().float() for k in keys])
    dist.all_reduce(flat)
    return {k: flat[i] for i, k in enumerate(keys)}


def sync_buffers(module: torch.nn.Module, d: Dist) -> None:
    """Give every rank rank 0's buffers (BN running statistics).

    DDP broadcasts buffers before each training forward, so after the epoch's last step every rank holds the stats
    of its own last batch; evaluating without this would mix models (rank 0's is the one checkpointed).
    """
    if d.enabled:
        for b in module.buffers():
            dist.broadcast(b.data, src=0)


def broadcast_object(obj, d: Dist):
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
