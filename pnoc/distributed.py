"""Data-parallel training over several processes (``torchrun``), the one place that knows about ranks.

A training rule with ``resources.gpus_per_job: N > 1`` runs as **one** SLURM task whose shell line is
``torchrun --standalone --nproc_per_node N -m pnoc.<stage> ...``; every rank runs the same stage code.
The stage asks :func:`setup` for a :class:`Distributed` and hands it to :class:`pnoc.training.EpochRunner`,
which uses it to wrap the models (DistributedDataParallel, optional SyncBatchNorm), to build each epoch's
loader, to average logged metrics, to gather every rank's RNG state into the checkpoint and to let rank 0
alone write artifacts. A single process (no ``torchrun``) gets the same object with ``world == 1``, and
nothing is wrapped.

Why the result does not depend on N (the "global batch" design):

* ``batch_size`` is the global batch of one forward step. :class:`GlobalBatchSampler` draws one permutation
  per epoch from ``(seed, epoch)``, cuts it into global batches and gives rank r the r-th slice of each, so
  the union of the ranks' batches is the single-process batch. DDP averages the ranks' gradients; with
  losses that are means over equal slices that is the gradient of the global batch.
* Augmentation is seeded per item from ``(seed, epoch, index)`` (see :func:`item_rng`), so an image gets the
  same crop and flip whichever rank, worker or process count loads it.
* Draws that span the batch (P-NOC's sampled class per image) come from :meth:`Distributed.shared_rand`: every
  rank draws the tensor of the whole global batch from the same generator and keeps its slice.
* BatchNorm statistics are per rank unless converted to SyncBatchNorm (``sync_bn``, CUDA only) or frozen.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import pickle
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pnoc.io import DataError

log = logging.getLogger("pnoc.distributed")

KEY = "resources.gpus_per_job"  # the config key that sets the process count (named in error messages)


def launched_world() -> int:
    """Processes of this run as set by ``torchrun`` (``WORLD_SIZE``); 1 without it."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of an epoch's data order and RNG streams: a function of (seed, epoch) only."""
    return seed * 100003 + epoch


def item_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one training item's augmentation: a function of (seed, epoch, dataset index) only."""
    return (epoch_seed(seed, epoch) * 1_000_003 + index) % (2**63 - 1)


@contextlib.contextmanager
def item_rng(seed: int | None) -> Iterator[None]:
    """Run the block with torch's CPU RNG seeded to ``seed`` and restore the previous state afterwards.

    ``None`` leaves the RNG alone (items fetched by plain integer index, e.g. in tests).
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def split_key(key) -> tuple[int, int | None]:
    """A dataset key from :class:`GlobalBatchSampler` is ``(index, item_seed)``; a plain int has no seed."""
    if isinstance(key, tuple):
        return int(key[0]), key[1]
    return int(key), None


class SeededItems(Dataset):
    """Base of the training datasets: ``__getitem__`` runs :meth:`item` under the key's item seed."""

    def item(self, i: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, key):
        i, seed = split_key(key)
        with item_rng(seed):
            return self.item(i)


class GlobalBatchSampler(Sampler):
    """This rank's slice of every global batch of an epoch.

    Args:
        n: dataset length.
        batch_size: global batch (images of one forward step over all ranks).
        rank, world: this process and the process count; ``batch_size % world == 0``.
        seed, epoch: the permutation is ``randperm(n)`` of a generator seeded with :func:`epoch_seed`.
        drop_last: drop the last incomplete global batch (kept when the dataset is smaller than one batch).
        shuffle: False keeps the dataset order.

    Yields:
        lists of ``(index, item_seed)`` of length ``batch_size // world``.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, epoch: int,
                 drop_last: bool = True, shuffle: bool = True):
        if batch_size % world:
            raise DataError(f"batch_size {batch_size} is not divisible by the {world} processes of {KEY}; "
                            f"batch_size is the global batch: make it a multiple of {world}")
        self.n, self.batch, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.drop_last = drop_last and n >= batch_size

    def __len__(self) -> int:
        return self.n // self.batch if self.drop_last else math.ceil(self.n / self.batch)

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator()
        g.manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        order = self.order()
        for b in range(len(self)):
            batch = order[b * self.batch:(b + 1) * self.batch]
            # the last batch may be short (no drop_last): split it as evenly as possible
            per, extra = divmod(len(batch), self.world)
            lo = self.rank * per + min(self.rank, extra)
            mine = batch[lo:lo + per + (1 if self.rank < extra else 0)]
            yield [(i, item_seed(self.seed, self.epoch, i)) for i in mine]


@dataclass
class Distributed:
    """Rank, process count and device of a training process (see the module docstring).

    Attributes:
        rank, world, local_rank: from ``torchrun`` (0, 1, 0 for a single process).
        device: this rank's device (``cuda:local_rank`` on GPUs).
        speed: the stage's :class:`pnoc.training.Speed`, set by ``start_training`` for ``EpochRunner.wrap``
            (None: plain eager NCHW).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    shared: torch.Generator = field(default_factory=torch.Generator)
    speed: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    # ------------------------------------------------------------------ batches and randomness
    def per_rank(self, batch_size: int, key: str = "batch_size") -> int:
        """``batch_size // world``; a clear error naming ``key`` when it does not divide."""
        if batch_size % self.world:
            raise DataError(f"{key}={batch_size} is not divisible by {KEY}={self.world}: the batch size is the "
                            f"global batch of one step over all GPUs; make it a multiple of {self.world}")
        return batch_size // self.world

    def reseed(self, seed: int) -> None:
        """Seed the RNGs for an epoch: the shared generator alike on every rank, the global RNGs per rank
        (dropout and other per-sample noise must differ between ranks; rank 0 matches a single process)."""
        from pnoc.training import seed_everything

        self.shared.manual_seed(seed)
        seed_everything(seed + 7919 * self.rank)

    def shared_rand(self, local_batch: int, *shape: int) -> torch.Tensor:
        """Uniform draws for this rank's slice of the global batch, shape ``(local_batch, *shape)``.

        Every rank draws the whole ``(local_batch · world, *shape)`` tensor from the shared generator, so
        the draws of an image do not depend on the process count.
        """
        u = torch.rand((local_batch * self.world, *shape), generator=self.shared)
        return u[self.rank * local_batch:(self.rank + 1) * local_batch]

    def loader(self, dataset: Dataset, batch_size: int, seed: int, epoch: int, num_workers: int = 0,
               shuffle: bool = True, drop_last: bool = True) -> DataLoader:
        """The epoch's loader of this rank: its slice of every global batch (:class:`GlobalBatchSampler`)."""
        self.per_rank(batch_size)
        if len(dataset) < self.world:
            raise DataError(f"{len(dataset)} training images for {KEY}={self.world} processes: every process "
                            f"needs at least one image; use fewer GPUs")
        sampler = GlobalBatchSampler(len(dataset), batch_size, self.rank, self.world, seed, epoch, drop_last,
                                     shuffle)
        g = torch.Generator()  # the workers' base seed; items are seeded by the sampler anyway
        g.manual_seed(epoch_seed(seed, epoch))
        return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, generator=g,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    # ------------------------------------------------------------------ models
    def wrap(self, model: nn.Module, sync_bn: bool = False) -> nn.Module:
        """``model`` for training: itself in one process, else DistributedDataParallel.

        ``sync_bn`` turns BatchNorm layers into SyncBatchNorm (statistics over the global batch, as in one
        process) on CUDA; the parameters are the same objects, so optimizers and state dicts are unchanged.
        Frozen BN (eval-mode layers) is left alone.
        """
        if not self.enabled or not any(p.requires_grad for p in model.parameters()):
            return model
        training_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
        if sync_bn and training_bn:
            if self.device.type == "cuda":
                # children are replaced in place (same Parameter objects, so optimizers and state dicts hold)
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                log.warning("sync_bn: SyncBatchNorm needs CUDA; on %s each of the %d processes keeps its own BN "
                            "batch statistics", self.device, self.world)
        ids = [self.local_rank] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    # ------------------------------------------------------------------ collectives
    def all_mean(self, values: dict[str, float], sum_keys: Sequence[str] = ()) -> dict[str, float]:
        """Numeric values averaged over ranks (``sum_keys`` summed, e.g. throughputs); others kept."""
        if not self.enabled:
            return dict(values)
        keys = [k for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        tdist.all_reduce(t)
        out = dict(values)
        for k, v in zip(keys, t.tolist()):
            out[k] = v if k in sum_keys else v / self.world
        return out

    def gather_batch(self, t: torch.Tensor) -> torch.Tensor:
        """The global batch of a per-rank tensor ``t`` (B/N, ...) -> (B, ...), in rank order, with gradients.

        For losses that couple the images of a batch (C²AM's contrast between every pair): each rank
        computes the loss of the whole batch, the gradient flows back to every rank's own slice, and DDP's
        averaging of N identical losses gives exactly the single-process gradient.
        """
        if not self.enabled:
            return t
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(t.contiguous()), 0)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any rank (e.g. a stop signal)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0])
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (small picklable objects only)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def on_main(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on rank 0 only; its result (or its exception) on every rank.

        For work whose result is the same whoever does it: a per-epoch evaluation (N ranks evaluating the same
        images would do N-fold work for one number), or the writing of an artifact. The others wait for rank
        0, so this is also a barrier. An exception of rank 0 is raised on every rank (the others get a copy,
        or a ``RuntimeError`` with its text where it does not pickle), so that no rank waits forever in the
        next collective.

        Args:
            fn: returns a small picklable value (floats, dicts of them; CPU tensors at most).
        """
        if not self.enabled:
            return fn(*args, **kwargs)
        box: list = [None]
        error = None
        if self.is_main:
            try:
                box[0] = (True, fn(*args, **kwargs))
            except Exception as e:  # noqa: BLE001 - handed on to every rank, then re-raised here
                error = e
                try:
                    pickle.dumps(e)
                    box[0] = (False, e)
                except Exception:  # noqa: BLE001 - an exception that does not pickle travels as its text
                    box[0] = (False, RuntimeError(f"rank 0: {type(e).__name__}: {e}"))
        tdist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if error is not None:
            raise error
        if not ok:
            raise value
        return value

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()


_CURRENT: Distributed | None = None


def setup(device: str = "auto") -> Distributed:
    """The :class:`Distributed` of this process; starts the process group under ``torchrun``.

    Args:
        device: the stage's ``device`` (auto | cpu | cuda | cuda:N). Under torchrun, ``auto``/``cuda`` mean
            ``cuda:LOCAL_RANK`` when CUDA is present, else CPU with the gloo backend (the CPU tests).

    Raises:
        DataError: more processes than visible GPUs (``CUDA_VISIBLE_DEVICES`` or the CUDA device count),
            naming ``resources.gpus_per_job``.
    """
    global _CURRENT
    from pnoc.training import resolve_device

    world = launched_world()
    if world == 1:
        _CURRENT = Distributed(device=resolve_device(device))
        return _CURRENT
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    n_visible = len([v for v in visible.split(",") if v.strip()]) if visible else None
    if torch.cuda.is_available():
        n_visible = torch.cuda.device_count()
    if n_visible is not None and world > n_visible:
        raise DataError(f"{KEY}={world} processes but only {n_visible} GPU(s) are visible to this job "
                        f"(CUDA_VISIBLE_DEVICES={visible!r}); request {world} GPUs or lower {KEY}")
    if torch.cuda.is_available() and device in ("auto", "cuda"):
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = resolve_device("cpu" if device == "auto" else device)
        backend = "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    _CURRENT = Distributed(rank=rank, world=world, local_rank=local, device=dev)
    slurm = ""
    if os.environ.get("SLURM_JOB_ID"):  # one task must run torchrun; N tasks would train N copies
        slurm = (f"; SLURM job {os.environ['SLURM_JOB_ID']}, step tasks "
                 f"{os.environ.get('SLURM_STEP_NUM_TASKS', os.environ.get('SLURM_NTASKS', '?'))}")
    log.info("rank %d/%d on %s (%s backend%s)", rank, world, dev, backend, slurm)
    return _CURRENT


def shutdown() -> None:
    """Leave the process group (end of a stage under torchrun)."""
    global _CURRENT
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    _CURRENT = None


def current() -> Distributed:
    """The process's :class:`Distributed` (a single process when :func:`setup` was not called)."""
    return _CURRENT or Distributed()
