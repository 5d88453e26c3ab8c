"""Per-sample random streams that do not depend on workers, ranks or restarts.

The pretraining augmentations draw from torch's global RNG inside DataLoader workers, whose seeds depend on the
number of workers and processes. :class:`SeededSampler` tags every index with its epoch and its *global* position
in the epoch (rank ``r`` of ``w`` owns positions ``r, r + w, ...``, matching ``DistributedSampler``), and
:class:`SeededDataset` re-seeds the RNG from ``(seed, epoch, position)`` before producing the sample. The same
sample therefore gets the same crop on 1 or 8 processes, with 0 or 10 workers, and after a mid-epoch resume.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["sample_seed", "ResumableSampler", "SeededSampler", "SeededDataset"]

_MIX = 0x9E3779B1  # odd constant spreading nearby integers over the seed space


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for one sample of one epoch."""
    return ((int(seed) * _MIX + int(epoch)) * _MIX + int(position)) % (2**63 - 1)


class ResumableSampler(Sampler):
    """Wrap a (distributed) training sampler so that an epoch can be resumed mid-way.

    ``skip`` drops this rank's first ``skip`` indices (resuming mid-epoch; applies to the current epoch only until
    :meth:`set_epoch` is called with another epoch). ``on_resume`` (a callable, e.g. restoring the RNG state saved
    with the checkpoint) runs once, just before the first index of the resumed epoch is handed out: after the
    DataLoader's iterator has drawn its seed and the wrapped sampler has started, before the first sample is
    loaded -- the instant at which the interrupted run saved.
    """

    def __init__(self, sampler: Sampler, skip: int = 0) -> None:
        self.sampler, self.skip = sampler, skip
        self.epoch = 0
        self.on_resume: Optional[Callable[[], None]] = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip, self.on_resume = 0, None
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _item(self, local: int, index: Any) -> Any:
        """What is yielded for this rank's ``local``-th index of the epoch."""
        return index

    def __iter__(self) -> Iterator[Any]:
        hook, self.on_resume = self.on_resume, None
        for local, index in enumerate(self.sampler):
            if local >= self.skip:
                if hook is not None:
                    hook()
                    hook = None
                yield self._item(local, index)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class SeededSampler(ResumableSampler):
    """A :class:`ResumableSampler` yielding ``(epoch, global_position, index)`` (for :class:`SeededDataset`)."""

    def __init__(self, sampler: Sampler, rank: int = 0, world_size: int = 1, skip: int = 0):
        super().__init__(sampler, skip)
        self.rank, self.world_size = rank, world_size

    def _item(self, local: int, index: Any) -> tuple[int, int, Any]:
        return self.epoch, self.rank + self.world_size * local, index


class SeededDataset(Dataset):
    """Re-seed torch's RNG from ``(seed, epoch, position)`` before fetching ``dataset[index]``."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, Any]):
        epoch, position, index = key
        torch.manual_seed(sample_seed(self.seed, epoch, position))
        return self.dataset[index]
