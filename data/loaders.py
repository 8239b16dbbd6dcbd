"""Data loaders for retrieval training (shuffled, sharded, resumable) and evaluation (contiguous shards)."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Iterator, Sequence, Sized

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

_logger = logging.getLogger(__name__)


class ResumableDistributedSampler(Sampler[int]):
    """Shuffled per-rank indices with ``DistributedSampler(shuffle=True, drop_last=True)`` semantics.

    Each epoch draws ``torch.randperm`` from a generator seeded with ``seed + epoch``, truncates it to
    a multiple of the number of ranks and gives rank r the indices ``[r::ranks]``. In addition,
    :meth:`set_start_batch` skips the first batches of the epoch so training resumes mid-epoch on
    exactly the samples it would have seen.

    ``accum_steps`` N > 1: the process plays the N virtual ranks ``rank * N ... rank * N + N - 1`` of
    ``world_size * N`` ranks, one micro-batch of ``batch_size`` each in turn: it yields, step after step,
    each virtual rank's batch, the same samples as the process of that rank would get.
    """

    def __init__(self, dataset: Sized, world_size: int = 1, rank: int = 0, seed: int = 0, accum_steps: int = 1,
                 batch_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        self.dataset_size = len(dataset)
        self.world_size = world_size * accum_steps  # ranks, virtual ones included
        self.ranks = range(rank * accum_steps, (rank + 1) * accum_steps)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.num_samples = self.dataset_size // self.world_size  # per rank, before skipping
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``; moving to another epoch clears any start batch."""
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def set_start_batch(self, start_batch: int, batch_size: int) -> None:
        """Skip the first ``start_batch`` batches of ``batch_size`` (of every virtual rank) in the current epoch
        (call after set_epoch)."""
        full_batches = self.num_samples // batch_size
        if not 0 <= start_batch <= full_batches:
            raise ValueError(
                f"start batch {start_batch} is outside this epoch's {full_batches} batches of {batch_size}"
            )
        self._skip = start_batch * batch_size * len(self.ranks)

    def _rank_indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator).tolist()
        total = self.num_samples * self.world_size
        shares = [order[:total][rank:total:self.world_size] for rank in self.ranks]
        if len(shares) == 1:
            return shares[0]
        batch = self.batch_size  # micro-batches in turn; the last incomplete batch is dropped, as drop_last does
        return [i for start in range(0, self.num_samples // batch * batch, batch)
                for share in shares for i in share[start:start + batch]]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_indices()[self._skip:])

    def __len__(self) -> int:
        if len(self.ranks) == 1:
            return self.num_samples - self._skip
        return self.num_samples // self.batch_size * self.batch_size * len(self.ranks) - self._skip


class ShardSampler(Sampler[int]):
    """The contiguous index range ``[start, end)`` in order."""

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous share ``[start, end)`` of ``n`` items for ``rank``; shares differ by at most one item."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def collate_train_batch(
    batch: Sequence[tuple[torch.Tensor, str, int]],
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Stack ``(image, caption, image_index)`` samples into (Tensor[B,3,H,W], list[str], Tensor[B])."""
    images, captions, indices = zip(*batch)
    # default_collate builds the tensors in shared memory inside workers, saving a copy
    return default_collate(images), list(captions), default_collate(indices)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM/SIGUSR1/SIGINT.

    torchrun and SLURM signal the whole process group on preemption, and a terminal's Ctrl-C reaches every
    process of the foreground group; the training process stops gracefully after its current step, and its
    loader workers must live until then (with the spawn start method the default action would kill them and
    fail the step; with fork they would run a copy of the trainer's handler). They exit with their parent.
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def batches_of(loader: DataLoader) -> Iterator[Iterator]:
    """An iterator over `loader` whose worker processes are stopped however the loop ends.

    The workers ignore SIGTERM (see :func:`ignore_stop_signals`), and the interpreter's exit joins every child
    after a SIGTERM: workers still alive when a run ends by an error (their iterator held by a traceback) would
    keep the process from ever exiting. DataLoader has no public close, so this calls what its iterator's
    ``__del__`` calls; for an exhausted iterator it does nothing.
    """
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def default_num_workers(processes_on_node: int, most: int = 4) -> int:
    """Loader workers per process when the config says null: the original's 4, or this process's share of the
    CPUs it may run on if that is smaller (more workers than CPUs only compete with the model)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(most, cpus // max(1, processes_on_node)))


def worker_error_message(error: BaseException) -> str:
    """The original message of an error raised in a DataLoader worker.

    The loader re-raises a worker's exception in the main process as the same type, its message wrapped in
    "Caught X in DataLoader worker process N. Original Traceback ...: X: <message>"; keep only <message>.
    """
    text = str(error)
    if "Original Traceback" not in text:
        return text
    marker = f"{type(error).__name__}: "
    return text[text.rindex(marker) + len(marker):].strip() if marker in text else text


def _pin_memory() -> bool:
    return torch.cuda.is_available()


def create_train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int = 0,
    start_batch: int = 0,
    accum_steps: int = 1,
) -> DataLoader:
    """Training loader over this rank's shuffled share, starting at ``start_batch`` of ``epoch``.

    With ``accum_steps`` N each step is N consecutive batches, those of this process's virtual ranks
    (see :class:`ResumableDistributedSampler`); ``start_batch`` counts steps.
    Workers are not persistent, so the epoch set on the dataset (see :func:`set_loader_epoch`)
    reaches them each time the loader is iterated.
    """
    size = len(dataset)
    if batch_size * world_size * accum_steps > size:
        name = getattr(dataset, "name", type(dataset).__name__)
        accum = f" x accum_steps {accum_steps}" if accum_steps > 1 else ""
        raise ValueError(
            f"batch size {batch_size} x {world_size} processes{accum} is larger than the {size} training samples "
            f"in {name}; lower batch_size_train or use more data"
        )
    sampler = ResumableDistributedSampler(dataset, world_size=world_size, rank=rank, seed=seed,
                                          accum_steps=accum_steps, batch_size=batch_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_train_batch,
        pin_memory=_pin_memory(),
        drop_last=True,
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals,
        # Its own generator: creating an iterator must not draw from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
    )
    set_loader_epoch(loader, epoch, start_batch)
    return loader


def drop_last_message(size: int, batch_size: int, world_size: int) -> str:
    """The line that says how many training captions each epoch leaves out, and why ('' when none)."""
    steps = size // world_size // batch_size  # the sampler's share per rank, then full batches only
    left_out = size - steps * batch_size * world_size
    if not left_out:
        return ''
    return (f'Each epoch leaves out {left_out} of the {size} training captions (other ones each epoch): the shuffled '
            f'captions fill {steps} full batch{"es" if steps != 1 else ""} of {batch_size * world_size} and the '
            'last, partial batch is dropped (drop_last, as in the original)')


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Point a training loader's sampler and dataset at ``epoch``, skipping ``start_batch`` batches."""
    loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    loader.sampler.set_start_batch(start_batch, loader.batch_size)


def create_eval_loader(
    dataset: Dataset, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Loader over this rank's contiguous share of ``dataset`` (see :func:`shard_range`), in order.

    ``loader.dataset`` stays the whole dataset (its captions and index maps are needed by every rank).
    """
    start, end = shard_range(len(dataset), rank, world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(start, end),
        num_workers=num_workers,
        pin_memory=_pin_memory(),
        drop_last=False,
        worker_init_fn=ignore_stop_signals,
        # Its own generator: an iterator draws its base seed from it, not from the global RNG, so evaluating
        # (or not evaluating) test between two epochs leaves the next epoch's dropout and negatives as they were.
        generator=torch.Generator().manual_seed(0),
    )
