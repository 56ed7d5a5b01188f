"""Per-epoch metrics: sums kept as device tensors during the epoch, one CSV row and TensorBoard scalars at its end."""
import csv
import io

import torch

from ..files import atomic_write_text
from .distributed import Dist, all_reduce_sum

BASE_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5"]
TAIL_COLUMNS = ["epoch_time_s", "images_per_s"]


class Meter:
    """Weighted sums on the training device, plus host-side counts; nothing here synchronises with the host until
    :meth:`result` (a Python number copied to a CUDA tensor would: PyTorch syncs on pageable host-to-device copies)."""

    def __init__(self, device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, value: torch.Tensor, weight=1) -> None:
        value = value.detach().float() * weight
        if name in self.sums:
            self.sums[name] += value
        else:
            self.sums[name] = value.clone()

    def count(self, name: str, n) -> None:
        self.counts[name] = self.counts.get(name, 0.0) + float(n)

    def result(self, d: Dist, total: str = "n") -> dict[str, float]:
        """Means over every rank's samples: each sum divided by the summed ``total`` count (one host sync)."""
        sums = dict(self.sums)
        for name, n in self.counts.items():
            sums[name] = sums[name] + n if name in sums else torch.tensor(n, device=self.device)
        sums = all_reduce_sum(sums, d)
        values = {k: float(v) for k, v in sums.items()}  # the epoch's only device->host transfer
        n = max(values.pop(total, 0.0), 1.0)
        return {k: v / n for k, v in values.items()} | {total: n}


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Per sample: is the target among the top-k logits, for each k (bool device tensors)."""
    kmax = min(max(ks), logits.shape[1])
    hit = logits.topk(kmax, dim=1).indices.eq(targets[:, None])
    return [hit[:, :min(k, kmax)].any(dim=1) for k in ks]


class RunLog:
    """metrics.csv and TensorBoard events, written by rank 0 only.

    The objective-term columns are the term names of the first epoch (an objective returns the same names every
    step). Epochs are numbered from 1. On resume after ``done`` completed epochs, only rows 1..done are kept: a run
    killed after writing its CSV row but before its checkpoint replays that epoch, and a kill in the middle of an
    append leaves a partial last row. The first write of a process rewrites the file atomically (header, kept
    rows, its row); later rows are appended.
    """

    def __init__(self, folder, done: int):
        """``folder``: the run's ``RunFolder`` (metrics.csv and the TensorBoard events go into it)."""
        self.path = folder.metrics
        self.columns, self.rows = None, []
        if done > 0 and self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = reader.fieldnames
                for r in reader:  # epochs 1, 2, ... in order; a torn row ("1" of "12") breaks the sequence
                    if len(self.rows) == done or r.get("epoch") != str(len(self.rows) + 1):
                        break
                    self.rows.append(r)
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(folder.path), purge_step=done + 1 if done > 0 else None)

    def write(self, row: dict, term_names) -> None:
        if self.columns is None:
            extra = [k for k in row if k.startswith("val_") and k not in BASE_COLUMNS]  # e.g. val_top1_any_step
            self.columns = BASE_COLUMNS + extra + list(term_names) + TAIL_COLUMNS
        line = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        if self.rows is not None:  # first write of this process: header, the rows kept from before, this row
            text = io.StringIO(newline="")
            w = csv.DictWriter(text, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows + [line])
            atomic_write_text(self.path, text.getvalue(), "metrics")
            self.rows = None
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(line)
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float):
                group = "val" if key.startswith("val_") else "train" if key.startswith("train_") or key in \
                    term_names else "misc"
                self.tb.add_scalar(f"{group}/{key}", value, row["epoch"])
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()
