"""``ResumableSampler`` and ``infinite_loader``: seeded, shardable, exactly resumable data order.

Resume protocol (read this before wiring a trainer)
---------------------------------------------------
The sampler's state is ``(epoch, position)``: ``position`` counts the samples of this rank's shard
of the current epoch that the trainer has CONSUMED (taken for a training step). Iterating the
sampler never changes the state: ``iter(sampler)`` snapshots ``(epoch, position)`` and yields the
rest of that epoch, so DataLoader workers and prefetching (which pull indices ahead of time) do not
move it. The state moves only through ``sampler.advance(n)``, called with the number of samples of
each batch the moment the trainer takes it. When ``position`` reaches ``len(sampler)`` the sampler
rolls over to ``(epoch + 1, 0)``.

``infinite_loader`` does this bookkeeping itself: it calls ``advance`` right before yielding each
batch, so a trainer that uses it must NOT call ``advance`` again. To checkpoint, save
``sampler.state_dict()`` after the step; to resume, build the same sampler, ``load_state_dict``
it and start a new ``infinite_loader``: the first batch is the one that follows the last batch
taken before the checkpoint. All ranks consume in lockstep, so rank 0's state is valid for every
rank (``rank`` is not part of the state).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from repa_probe.data.common import DatasetError, EpochFlipDataset, collate

log = logging.getLogger(__name__)

_CHECKED = ("dataset_len", "shuffle", "seed", "world_size", "drop_last", "batch_size")


class ResumableSampler(Sampler[int]):
    """Per-epoch seeded permutation, sharded over ranks, resumable mid-epoch.

    Epoch ``e`` uses ``torch.randperm(dataset_len, generator=Generator().manual_seed(seed + e))``
    (``arange`` if ``shuffle=False``). Sharding: rank ``r`` takes ``perm[r::world_size]`` after the
    permutation is cut (``drop_last=True``) or padded by wrapping around (``drop_last=False``) to a
    multiple of ``world_size``, so every rank gets the same count. With ``batch_size`` and
    ``drop_last=True`` the per-rank count is further cut to whole batches, so ``len(sampler)`` is
    exactly what one epoch consumes.

    Args:
        dataset_len: number of samples N.
        batch_size: per-rank batch size (optional; only used to cut epochs to whole batches).
        shuffle, seed, rank, world_size, drop_last: as above.

    State: ``state_dict() -> {"epoch", "position", + the settings checked on load}``.
    """

    def __init__(self, dataset_len: int, batch_size: int | None = None, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True):
        if dataset_len < 1:
            raise DatasetError(f"ResumableSampler: dataset_len must be >= 1, got {dataset_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DatasetError(f"ResumableSampler: need 0 <= rank < world_size, got rank={rank}, "
                               f"world_size={world_size}")
        if batch_size is not None and batch_size < 1:
            raise DatasetError(f"ResumableSampler: batch_size must be >= 1, got {batch_size}")
        self.dataset_len, self.batch_size = int(dataset_len), batch_size
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        per_rank = dataset_len // world_size if drop_last else -(-dataset_len // world_size)
        if drop_last and batch_size is not None:
            per_rank = (per_rank // batch_size) * batch_size
        if per_rank < 1:
            raise DatasetError(f"ResumableSampler: {dataset_len} samples give no full batch of "
                               f"{batch_size} on each of {world_size} ranks")
        self.num_samples = per_rank
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Samples per rank per epoch (not the remaining ones)."""
        return self.num_samples

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's full index sequence of ``epoch``: (len(self),) int64."""
        n, ws = self.dataset_len, self.world_size
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        total = self.num_samples * ws
        if total > n:  # pad by wrapping around (drop_last=False)
            perm = perm.repeat(-(-total // n))
        return perm[:total][self.rank::ws]

    def __iter__(self) -> Iterator[int]:
        # eager snapshot of (epoch, position): later advance() calls do not affect this iterator
        return iter(self.epoch_indices(self.epoch)[self.position:].tolist())

    def advance(self, n: int) -> None:
        """Record that the trainer consumed ``n`` more samples on this rank; rolls the epoch at its end."""
        if n < 0 or self.position + n > self.num_samples:
            raise DatasetError(f"ResumableSampler.advance({n}) from position {self.position} passes the "
                               f"epoch length {self.num_samples}")
        self.position += n
        if self.position == self.num_samples:
            self.epoch, self.position = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (DistributedSampler-compatible)."""
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "num_samples": self.num_samples,
                **{k: getattr(self, k) for k in _CHECKED}}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore ``epoch`` and ``position``. Settings saved alongside must match this sampler's
        (``strict=True``, else :class:`DatasetError`); with ``strict=False`` a changed
        ``world_size``/``batch_size`` keeps the epoch and rescales the position to the same
        fraction of the epoch (approximate: the shards differ), with a warning."""
        epoch, position = int(state["epoch"]), int(state["position"])
        diff = {k: (state[k], getattr(self, k)) for k in _CHECKED if k in state and state[k] != getattr(self, k)}
        if diff:
            msg = ", ".join(f"{k}: saved {a} vs now {b}" for k, (a, b) in diff.items())
            if strict:
                raise DatasetError(f"ResumableSampler.load_state_dict: settings differ ({msg})")
            old_len = state.get("num_samples")
            frac = position / old_len if old_len else 0.0
            position = int(frac * self.num_samples)
            if self.batch_size:
                position -= position % self.batch_size
            log.warning("sampler resumed with different settings (%s): position set to %d (approximate)",
                        msg, position)
        if not 0 <= position < self.num_samples:
            raise DatasetError(f"ResumableSampler.load_state_dict: position {position} outside [0, {self.num_samples})")
        self.epoch, self.position = epoch, position


class _EpochKeys(Sampler):
    """Iterates ``sampler`` as ``(epoch, index)`` keys (for :class:`EpochFlipDataset`); the epoch is the
    sampler's when iteration starts, as is the position."""

    def __init__(self, sampler: ResumableSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, indices = self.sampler.epoch, iter(self.sampler)
        return ((epoch, i) for i in indices)


def _batch_len(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    return len(batch)


@dataclass(frozen=True)
class LoaderOptions:
    """How :func:`infinite_loader` loads: ``num_workers``, ``pin_memory``, ``collate_fn``, ``drop_last``,
    ``prefetch_factor`` / ``persistent_workers`` (workers only; persistent by default), ``flip`` (random
    horizontal flip, keyed by ``seed``: None = the sampler's seed)."""

    num_workers: int = 0
    pin_memory: bool = False
    collate_fn: Callable = collate
    drop_last: bool = True
    prefetch_factor: int | None = None
    persistent_workers: bool | None = None
    seed: int | None = None
    flip: bool = False


def infinite_loader(dataset: Dataset, sampler: ResumableSampler, batch_size: int,
                    options: LoaderOptions | None = None, **fields) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches forever, epoch after epoch, starting from ``sampler``'s state; ``options`` (a
    :class:`LoaderOptions`, or its fields as keywords: ``infinite_loader(ds, s, 32, num_workers=2, flip=True)``).

    Calls ``sampler.advance(len(batch))`` right before yielding each batch (see the module
    docstring: the caller must not call ``advance`` itself). An epoch ends when the loader is
    exhausted; a tail shorter than ``batch_size`` is dropped (``drop_last``) and the sampler moves
    to the next epoch.

    ``flip``: random horizontal flip of image / moments / mask, decided per sample by a hash of
    (``seed``, epoch, index) (:func:`~repa_probe.data.common.flip_coin`) in whichever worker loads it: no
    RNG state, so a resumed loader flips exactly as an uninterrupted one, with any ``num_workers``.
    ``seed`` defaults to ``sampler.seed``; it also seeds the DataLoader's worker RNGs (with the rank).
    """
    if options is None:
        options = LoaderOptions(**fields)
    elif fields:
        raise TypeError(f"infinite_loader() takes LoaderOptions or its fields as keywords, not both ({sorted(fields)})")
    o = options
    if len(dataset) != sampler.dataset_len:  # type: ignore[arg-type]
        raise DatasetError(f"infinite_loader: dataset has {len(dataset)} samples, "  # type: ignore[arg-type]
                           f"sampler expects {sampler.dataset_len}")
    seed = sampler.seed if o.seed is None else o.seed
    g = torch.Generator().manual_seed(seed * 1000003 + sampler.rank)
    order: Sampler = sampler
    if o.flip:
        dataset, order = EpochFlipDataset(dataset, seed), _EpochKeys(sampler)
    kwargs: dict[str, Any] = {}
    if o.num_workers > 0:
        kwargs["persistent_workers"] = True if o.persistent_workers is None else o.persistent_workers
        if o.prefetch_factor is not None:
            kwargs["prefetch_factor"] = o.prefetch_factor
    loader = DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=o.num_workers,
                        pin_memory=o.pin_memory, collate_fn=o.collate_fn, drop_last=o.drop_last, generator=g,
                        **kwargs)
    while True:
        epoch = sampler.epoch
        got_any = False
        for batch in loader:
            got_any = True
            sampler.advance(_batch_len(batch))
            yield batch
        if sampler.epoch == epoch:  # tail dropped (or nothing left): move on to the next epoch
            if not got_any and sampler.position == 0:
                raise DatasetError("infinite_loader: an epoch yielded no batch (batch_size larger than the "
                                   "per-rank epoch?)")
            sampler.set_epoch(epoch + 1)
