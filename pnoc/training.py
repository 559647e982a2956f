"""Shared training machinery: device, parameter groups, poly schedule, AMP, resumable checkpoints.

Resume design: each training stage keeps its resume state in an *undeclared* folder
(``<state_dir>/last.pt``, written atomically after every epoch) because Snakemake deletes
the declared outputs of a failed job. The state holds every model and optimizer, the
GradScaler, the schedule step, the epoch and all RNG states; every epoch also reseeds its
data order and augmentation from ``(seed, epoch)``, so a resumed run reproduces an
uninterrupted one exactly on CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import random
import re
import signal
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from pnoc.data.transforms import AugmentConfig, Augmenter
from pnoc.distributed import epoch_seed
from pnoc.io import DataError, atomic_path

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- device / amp
def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:N`` are taken as given."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={spec!r} but CUDA is not available; use device: auto or cpu")
    return dev


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA only; a no-op context on CPU (AMP is a GPU feature here)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    # bf16 has fp32's exponent range, so loss scaling is unnecessary; the scaler is kept
    # (disabled) so checkpoints have one format whatever the precision.
    return torch.amp.GradScaler(device.type, enabled=False)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   scheduler=None) -> None:
    """One optimisation step on ``loss``: clear the gradients, backward through the (AMP) scaler, step,
    update the scale and, when given, the learning-rate schedule (the per-iteration poly schedule)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if scheduler is not None:
        scheduler.step()


@contextlib.contextmanager
def memory_guard(device: torch.device, images: list[str], size: tuple[int, int], fix: str) -> Iterator[None]:
    """Turn running out of device memory on a batch into a :class:`DataError` that names the images and the fix.

    Inference stages batch images of one size; a COCO/VOC image far above the usual 500 px, or a batch of
    them, may not fit at the largest TTA scale. Instead of a CUDA traceback the stage stops with the image
    ids, their size, the memory the device had and the config keys that lower the need.

    Args:
        device: where the batch ran.
        images: ids of the batch.
        size: (H, W) of its images.
        fix: what to change, naming config keys (e.g. ``lower inference.batch_size``).
    """
    try:
        yield
    except torch.OutOfMemoryError as e:
        total = ""
        if device.type == "cuda":
            total = f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        more = f" and {len(images) - 1} more image(s) of its batch" if len(images) > 1 else ""
        raise DataError(f"{images[0]}{more}, {size[0]}x{size[1]} px: out of {device} memory{total} ({first}); "
                        f"{fix}") from None


def set_threads(n: int) -> None:
    """Use ``n`` intra-op threads (Snakemake's ``threads:``)."""
    if n and n > 0:
        torch.set_num_threads(n)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- optimisation
def param_groups(pretrained: Iterable[tuple[str, nn.Parameter]], new: Iterable[tuple[str, nn.Parameter]],
                 lr: float, weight_decay: float, new_lr_mult: float = 10.0, bias_lr_mult: float = 2.0) -> list[dict]:
    """The four parameter groups of the reference code.

    pretrained weights (lr, wd), pretrained biases (2·lr, wd 0), new weights (10·lr, wd),
    new biases (20·lr, wd 0). BN gammas count as weights and BN betas as biases.

    Args:
        pretrained: ``named_parameters()`` of layers that start from (pre)trained weights.
        new: ``named_parameters()`` of layers initialised from scratch (heads).
    """
    groups = {k: [] for k in ("pw", "pb", "nw", "nb")}
    for prefix, named in (("p", pretrained), ("n", new)):
        for name, p in named:
            if not p.requires_grad:
                continue
            groups[prefix + ("b" if name.endswith("bias") else "w")].append(p)
    spec = {
        "pw": (1.0, weight_decay), "pb": (bias_lr_mult, 0.0),
        "nw": (new_lr_mult, weight_decay), "nb": (new_lr_mult * bias_lr_mult, 0.0),
    }
    out = []
    for k, params in groups.items():
        if params:
            mult, wd = spec[k]
            out.append({"params": params, "lr": lr * mult, "weight_decay": wd, "lr_mult": mult, "name": k})
    return out


def poly_factor(step: int, total: int, power: float = 0.9) -> float:
    """(1 − step/total)^power, clamped at 0."""
    return max(0.0, 1.0 - step / max(1, total)) ** power


OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(groups: list[dict], name: str = "sgd", momentum: float = 0.0, nesterov: bool = False,
                   ) -> torch.optim.Optimizer:
    """``sgd`` (the reference's: no momentum unless given) or ``adam``/``adamw``."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=groups[0]["lr"])
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"])
    raise ValueError(f"optimizer {name!r}: use sgd | adam | adamw")


def poly_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9):
    """LambdaLR applying :func:`poly_factor` to every group's base LR (one ``step()`` per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: poly_factor(s, total_steps, power))


# ---------------------------------------------------------------------------- the solver
@dataclass(kw_only=True)
class Solver:
    """Optimisation settings shared by every training stage (detectron2's SOLVER node).

    Each training section of ``config.yaml`` (``classifier``, ``cam``, ``saliency.ccam``,
    ``saliency.poolnet``, ``affinity.train``, ``segmentation``) holds these keys; the schema
    describes them once (``$defs/solver``). The defaults here only serve direct library use.
    """

    epochs: int = 5
    batch_size: int = 16           # images of one forward step
    optimizer: str = "sgd"         # sgd | adam | adamw
    lr: float = 0.01               # base LR, poly decay (power 0.9) where the stage schedules
    momentum: float = 0.9          # SGD only
    nesterov: bool = False         # SGD only
    weight_decay: float = 1e-4
    crop: int = 128                # square training crop (px)
    resize_min: int = 96           # random long side before the crop; 0 = keep the image size
    resize_max: int = 160
    amp: bool = True               # bf16 autocast on CUDA (ignored on CPU)

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """The configured optimizer over parameter groups (see :func:`param_groups`)."""
        return make_optimizer(groups, self.optimizer, self.momentum, self.nesterov)

    def augmenter(self, augment: str = "none") -> Augmenter:
        """Random resize (``resize_min: 0`` keeps the size), flip and crop, plus photometric ``augment``."""
        resize = (self.resize_min, self.resize_max) if self.resize_min > 0 else None
        return Augmenter(AugmentConfig(self.crop, resize, True, augment))


@dataclass(kw_only=True)
class Runtime:
    """Where and how a stage runs; none of it changes the result (except ``seed``, and ``sync_bn`` with
    more than one process)."""

    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    threads: int = 0
    sync_bn: bool = True           # SyncBatchNorm when several processes train on CUDA (resources.sync_bn)


def start_training(cfg: Runtime):
    """Threads, device and process group of a training stage: a :class:`pnoc.distributed.Distributed`.

    Under ``torchrun`` the job's ``threads`` are shared by its processes, so each gets
    ``threads // processes`` (at least 1).
    """
    from pnoc.distributed import launched_world, setup

    if cfg.threads and cfg.threads > 0:
        set_threads(max(1, cfg.threads // launched_world()))
    dist = setup(cfg.device)
    if hasattr(cfg, "batch_size"):
        dist.per_rank(cfg.batch_size)  # a global batch that does not split fails before anything starts
    return dist


RUNTIME_ONLY = ("out", "metrics", "state_dir", "num_workers", "threads")


def resume_key(cfg) -> dict[str, str]:
    """The parameters a resume state is keyed on: every field of a stage config except paths
    of outputs and the pure runtime knobs (a state trained with other values is not resumed)."""
    return {k: str(v) for k, v in asdict(cfg).items() if k not in RUNTIME_ONLY}


def linear_ramp(a0: float, a1: float, step: int, total: int, fraction: float = 1.0) -> float:
    """Linear schedule from ``a0`` to ``a1`` over the first ``fraction`` of ``total`` steps, then ``a1``."""
    span = max(1e-12, total * fraction)
    t = min(1.0, step / span)
    return a0 + (a1 - a0) * t


# ---------------------------------------------------------------------------- safe files
# Every file pnoc writes with torch.save (model artifacts, resume states) holds tensors and plain values only,
# and every file it reads goes through safe_load, i.e. torch's weights_only unpickler: a crafted .pt file
# cannot run code when a stage opens it. plain() enforces the first half at save time.

_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def plain(obj, where: str = "state"):
    """``obj`` with every value made loadable by ``torch.load(weights_only=True)``.

    Tensors, ``None``/bool/int/float/complex/str/bytes, torch dtypes/devices/sizes and dicts,
    lists, tuples and sets of them pass unchanged; paths become ``str``, numpy scalars their
    Python value, numeric numpy arrays tensors and string arrays lists (dict keys too).
    Containers without anything to convert are returned as they are, so state dicts keep their
    type and ``_metadata`` (read by ``load_state_dict``).

    Args:
        obj: what is about to be saved.
        where: its name in error messages (keys and indices are appended while descending).

    Raises:
        TypeError: a value of any other type (a custom class would need arbitrary unpickling to
            load); the message names where it sits, so the stage can store a plain value instead.
    """
    # exact types: np.float64 / np.str_ subclass float / str, an IntEnum int, and all of them pickle as classes
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_SCALARS:
        return obj
    if isinstance(obj, np.generic):
        return plain(obj.item(), where)  # datetime64 and the like give objects that are not plain either
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "biuf":
            return torch.from_numpy(np.ascontiguousarray(obj))
        if obj.dtype.kind in "US":
            return obj.tolist()
        raise TypeError(f"{where}: a numpy {obj.dtype} array cannot be stored; store a list of plain values")
    if isinstance(obj, dict):
        pairs = [(plain(k, f"{where} key {k!r}"), plain(v, f"{where}[{k!r}]")) for k, v in obj.items()]
        unchanged = all(k2 is k and v2 is v for (k2, v2), (k, v) in zip(pairs, obj.items()))
        if unchanged and type(obj) in (dict, OrderedDict):
            return obj
        items = dict(pairs)
        # dict subclasses other than OrderedDict (defaultdict, ...) would need unpickling code: store a dict
        out = OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # state dicts carry per-module versions
        return out
    if type(obj) in (list, tuple, set):  # exact types: a namedtuple is a custom class
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return type(obj)(items)
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be stored in a pnoc file "
                    f"(only tensors and plain values load without arbitrary unpickling); store a plain value")


def _refusal_reason(e: BaseException) -> str:
    """The one line of a weights_only refusal that says what it refused (torch wraps it in advice)."""
    text = str(e)
    m = re.search(r"(?:Unsupported global: )?GLOBAL ([\w.]+)", text)
    if m:
        return f"it names {m.group(1)}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("Unsupported", "Trying to", "Unexpected")):
            return ln
    return lines[-1] if lines else type(e).__name__


def safe_load(path: str | Path, what: str = "model file", fix: str = "re-create it with the rule that produces it",
              mmap: bool = False):
    """``torch.load(path, weights_only=True)`` onto the CPU, with errors that name the file and the fix.

    Args:
        path: a file pnoc wrote with :func:`save_weights` or :class:`Checkpointer` (or a plain state dict).
        what: what the file is, for messages (``model file``, ``resume state``, ``weights file``).
        fix: how to get a good file, for messages.
        mmap: map the tensors instead of reading them (cheap peeks at large files).

    Raises:
        DataError: the file holds objects other than tensors and plain values (they would run code
            when unpickled, so nothing of it is loaded), or it is truncated / not a torch file.
        FileNotFoundError: no such file (callers check first and say which rule makes it).
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise DataError(
            f"{path}: refused to load this {what}: it holds objects other than tensors and plain metadata "
            f"({_refusal_reason(e)}), which could run code when unpickled; pnoc writes only tensors and plain values. "
            f"Fix: {fix} (or, for a file you trust, e.g. from an older pnoc, convert it once with "
            f"python -c \"from pnoc.training import resave_trusted; resave_trusted({str(path)!r})\")"
        ) from None  # torch's own advice (weights_only=False) is exactly what must not be done here
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        reason = str(e).split(". ")[0] or type(e).__name__
        raise DataError(f"{path}: unreadable {what} ({reason}): truncated or not a torch file; {fix}") from e


def resave_trusted(path: str | Path) -> None:
    """Rewrite a *trusted* torch file (e.g. from an older pnoc) so that :func:`safe_load` reads it.

    Loads with full unpickling (which runs whatever the file names: only for files you made
    yourself), converts it with :func:`plain` and writes it back atomically.

    Raises:
        TypeError: the file holds a custom object that has no plain equivalent.
    """
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=False)
    rng = state.get("_rng") if isinstance(state, dict) else None
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
        # older resume states kept numpy's legacy tuple (with an ndarray); store the dict form rng_state() writes
        np_state = np.random.RandomState()
        np_state.set_state(rng["numpy"])
        state["_rng"] = {**rng, "numpy": _numpy_rng_plain(np_state.get_state(legacy=False))}
    with atomic_path(path, ".pt") as tmp:
        torch.save(plain(state, str(path)), tmp)
    safe_load(path)  # proves the conversion
    log.info("%s: rewritten with tensors and plain values only", path)


# ---------------------------------------------------------------------------- checkpoints
def _numpy_rng_plain(st: dict) -> dict:
    """numpy's ``get_state(legacy=False)`` dict with the MT19937 key as an int64 tensor (an ndarray would
    need arbitrary unpickling to load)."""
    key = torch.from_numpy(np.asarray(st["state"]["key"], dtype=np.int64))
    return {**st, "state": {**st["state"], "key": key}}


def _numpy_rng_native(st: dict) -> dict:
    key = st["state"]["key"]
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    return {**st, "state": {**st["state"], "key": key.astype(np.uint32)}}


def rng_state() -> dict:
    """The python, numpy, torch (and CUDA) RNG states, as tensors and plain values."""
    st = {"python": random.getstate(), "numpy": _numpy_rng_plain(np.random.get_state(legacy=False)),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(st["python"])
    np.random.set_state(_numpy_rng_native(st["numpy"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class Checkpointer:
    """Resume state of one training rule, kept in an undeclared folder.

    ``save(epoch, **objects)`` stores ``state_dict()`` of every object (models,
    optimizers, schedulers, scaler) plus RNG states and ``epoch``; ``restore(**objects)``
    loads them back and returns the next epoch to run (0 when there is no state).
    A ``config`` dict is stored too, and a state written under another config is
    refused rather than silently mixed (delete the folder to start over).
    """

    def __init__(self, state_dir: str | Path, config: dict | None = None):
        self.dir = Path(state_dir)
        self.path = self.dir / "last.pt"
        # plain already here: the guard compares it with the stored (plain) config
        self.config = plain(dict(config or {}), "config")

    def save(self, epoch: int, extra: dict | None = None, rng_ranks: list | None = None, **objects) -> None:
        """Write the state atomically.

        Args:
            rng_ranks: the RNG states of every rank of a multi-process run (rank order); stored as
                ``_rng_ranks``, and rank 0's as ``_rng``. None: this process's state only.
        """
        state = {k: v.state_dict() for k, v in objects.items()}
        state["_epoch"] = epoch
        state["_rng"] = rng_ranks[0] if rng_ranks else rng_state()
        if rng_ranks and len(rng_ranks) > 1:
            state["_rng_ranks"] = list(rng_ranks)
        state["_config"] = self.config
        state["_extra"] = extra or {}
        state = plain(state, f"{self.path} state")
        with atomic_path(self.path, ".pt") as tmp:
            torch.save(state, tmp)

    def load(self, mmap: bool = False) -> dict:
        """The stored state, read safely (see :func:`safe_load`)."""
        return safe_load(self.path, "resume state", f"delete {self.dir} to train from scratch", mmap=mmap)

    def restore(self, rank: int = 0, world: int = 1, **objects) -> tuple[int, dict]:
        """Load the state into ``objects``; this rank's RNG state. Returns ``(next_epoch, extra)``."""
        if not self.path.is_file():
            return 0, {}
        state = self.load()
        if state.get("_config") != self.config:
            old = state.get("_config") or {}
            keys = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
            raise RuntimeError(
                f"{self.path}: resume state was written with a different configuration or different input "
                f"files (changed: {', '.join(keys)}); delete {self.dir} to retrain from scratch"
            )
        for k, obj in objects.items():
            obj.load_state_dict(state[k])
        ranks = state.get("_rng_ranks") or [state["_rng"]]
        if len(ranks) != world:
            log.warning("%s was written by %d process(es), this run has %d: the schedule and data order are the "
                        "same, but BN statistics and per-rank noise follow a different split from here on",
                        self.path, len(ranks), world)
        set_rng_state(ranks[rank] if rank < len(ranks) else ranks[0])
        log.info("resumed from %s after epoch %d", self.path, state["_epoch"] + 1)
        return state["_epoch"] + 1, state.get("_extra", {})

    def clear(self) -> None:
        if self.path.exists():
            self.path.unlink()


@contextlib.contextmanager
def stop_requested() -> Iterator[dict]:
    """Catch SIGUSR1/SIGTERM (SLURM's warning before a time limit) and set a flag.

    The training loop checks ``flag["stop"]`` after each epoch's checkpoint and exits
    with code 75 (EX_TEMPFAIL) so the job is requeued/retried and resumes.
    """
    flag = {"stop": False}

    def handler(signum, _frame):
        log.warning("signal %d received: will stop after the current epoch's checkpoint", signum)
        flag["stop"] = True

    old = {}
    for s in (signal.SIGUSR1, signal.SIGTERM):
        try:
            old[s] = signal.signal(s, handler)
        except ValueError:  # not in the main thread
            pass
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def save_weights(path: str | Path, state: dict) -> None:
    """Write a final model artifact atomically (a plain dict of state dicts + metadata).

    Metadata is made plain first (paths to str, numpy values to Python/tensors, see :func:`plain`),
    so :func:`load_weights` reads the file with ``weights_only=True``.

    Raises:
        TypeError: ``state`` holds an object with no plain equivalent.
    """
    state = plain(state, f"{path} artifact")
    with atomic_path(path, ".pt") as tmp:
        torch.save(state, tmp)


def load_weights(path: str | Path) -> dict:
    """A model artifact written by :func:`save_weights`, read with ``weights_only=True``.

    Raises:
        DataError: no such file, or it holds anything but tensors and plain values (nothing of it runs).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: model file not found; run the training rule that produces it")
    return safe_load(path, "model file")


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def input_fingerprint(paths: Iterable[str | Path | None]) -> dict[str, str]:
    """Fingerprint of a training's input artifacts, for the resume guard.

    Args:
        paths: files or folders; None and missing paths are skipped.

    Returns:
        {path: sha1 of (relative name, size, mtime_ns) of every file under it}. Stat only, no
        reading: a folder of 10k masks costs milliseconds.
    """
    out = {}
    for p in paths:
        if p is None or str(p).lower() == "none":
            continue
        p = Path(p)
        if not p.exists():
            continue
        h = hashlib.sha1()
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(p) if f != p else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        out[str(p)] = h.hexdigest()
    return out


class EpochRunner:
    """Resumable epoch loop shared by every training stage.

    Usage::

        runner = EpochRunner(state_dir, config_dict, epochs, seed, model=m, opt=o, sched=s, scaler=sc)
        for epoch in runner:           # restores state first; reseeds RNGs from (seed, epoch)
            ...train one epoch...
            runner.log(epoch, {"loss": ...})   # appended to runner.history
        # after each iteration the full state is checkpointed atomically

    A SIGUSR1/SIGTERM during an epoch stops the run after that epoch's checkpoint
    with exit code 75, so a requeued job resumes instead of restarting.
    """

    def __init__(self, state_dir: str | Path, config: dict, epochs: int, seed: int,
                 inputs: Iterable[str | Path | None] = (), dist=None, **objects):
        from pnoc.distributed import current

        self.dist = dist or current()
        config = dict(config)
        if inputs:
            # Snakemake reruns a training whose input artifacts changed under the same parameters
            # (e.g. regenerated pseudo masks): a state of the old inputs must not be restored.
            config["_inputs"] = input_fingerprint(inputs)
        self.ckpt = Checkpointer(state_dir, config)
        self.epochs = epochs
        self.seed = seed
        self.objects = objects
        self.history: list[dict] = []
        self.start_epoch = 0
        self.epoch = 0

    def _drop_finished_state_of_other_config(self) -> None:
        """A *finished* training's state written under another configuration is discarded.

        Snakemake reruns a training rule whose parameters changed; that rerun must train from
        scratch, not fail on the config guard. An unfinished state of another configuration is
        still refused by :meth:`Checkpointer.restore` (it would mix two trainings).
        """
        path = self.ckpt.path
        if not path.is_file():
            return
        state = self.ckpt.load(mmap=True)
        if state.get("_config") == self.ckpt.config:
            return
        finished = state.get("_extra", {}).get("finished")
        if finished is None:  # older states: finished when the stored epoch is the stored config's last
            try:
                finished = int(state["_config"]["epochs"]) == state["_epoch"] + 1
            except (KeyError, TypeError, ValueError):
                finished = False
        if finished:
            log.info("%s: finished training of another configuration; training from scratch", path)
            self.ckpt.clear()

    def __iter__(self):
        d = self.dist
        if d.is_main:
            self._drop_finished_state_of_other_config()
        d.barrier()
        start, extra = self.ckpt.restore(rank=d.rank, world=d.world, **self.objects)
        self.history = list(extra.get("history", []))
        self.start_epoch = start
        with stop_requested() as flag:
            for epoch in range(start, self.epochs):
                self.epoch = epoch
                d.reseed(epoch_seed(self.seed, epoch))
                yield epoch
                rngs = d.gather(rng_state()) if d.enabled else None
                if d.is_main:  # one writer; the others wait so that nobody reads a half-written state
                    self.ckpt.save(epoch, extra={"history": self.history, "finished": epoch + 1 == self.epochs},
                                   rng_ranks=rngs, **self.objects)
                d.barrier()
                if d.any(flag["stop"]) and epoch + 1 < self.epochs:
                    log.warning("stopping after epoch %d on request; rerun to resume", epoch + 1)
                    raise SystemExit(75)

    # -- what every stage needs from the data-parallel machinery (pnoc.distributed), in one place
    def wrap(self, model: nn.Module, sync_bn: bool = False) -> nn.Module:
        """The module to train: ``model`` itself in one process, DistributedDataParallel under torchrun.

        Keep ``model`` (not the wrapper) for evaluation and for the state dicts of artifacts.
        """
        return self.dist.wrap(model, sync_bn)

    def loader(self, dataset, batch_size: int, num_workers: int = 0, shuffle: bool = True, drop_last: bool = True):
        """The current epoch's loader: this rank's slice of every global batch of ``batch_size``."""
        return self.dist.loader(dataset, batch_size, self.seed, self.epoch, num_workers, shuffle, drop_last)

    def shared_rand(self, local_batch: int, *shape: int) -> torch.Tensor:
        """Uniform draws for this rank's images that do not depend on the process count."""
        return self.dist.shared_rand(local_batch, *shape)

    def gather_batch(self, t: torch.Tensor) -> torch.Tensor:
        """The global batch of a per-rank tensor, for losses that couple a batch's images (with gradients)."""
        return self.dist.gather_batch(t)

    def log(self, epoch: int, metrics: dict) -> None:
        """Append an epoch's metrics to the history: means over ranks (throughputs ``*images_per_s`` summed)."""
        metrics = self.dist.all_mean(metrics, sum_keys=[k for k in metrics if k.endswith("images_per_s")])
        row = {"epoch": epoch + 1, **metrics}
        self.history.append(row)
        log.info("epoch %d: %s", epoch + 1, ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "epoch"))

    def save_weights(self, path: str | Path, state: dict) -> None:
        """:func:`save_weights` by rank 0 only (every rank holds the same weights)."""
        if self.dist.is_main:
            save_weights(path, state)
        self.dist.barrier()

    def write_metrics(self, path: str | Path, metrics: dict) -> None:
        """The stage's metrics JSON (+ the per-epoch CSV beside it), by rank 0 only."""
        from pnoc.io import write_csv, write_json

        metrics = {**metrics, "processes": self.dist.world}
        if self.dist.is_main:
            write_csv(Path(path).with_suffix(".csv"), self.history)
            write_json(path, metrics)
        self.dist.barrier()
