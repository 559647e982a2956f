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
import copy
import hashlib
import logging
import os
import pickle
import random
import re
import signal
import time
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from pnoc.data.transforms import AugmentConfig, Augmenter
from pnoc.distributed import epoch_seed
from pnoc.io import DataError, DiskFullError, atomic_path

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


def peak_memory(device: torch.device | None = None) -> dict[str, float | None]:
    """This process's peak GPU memory so far (MiB), for a stage's metrics or ``_info.json``.

    ``peak_gpu_allocated_mib`` is the most PyTorch's tensors held at once (``torch.cuda.max_memory_allocated``,
    the figure of ``benchmarks/stages.py``); ``peak_gpu_reserved_mib`` the most its caching allocator held from
    the device (what must fit, short of the CUDA context). Both are None on the CPU, or when CUDA was never used.
    The ``peak_`` prefix makes :func:`pnoc.shards.merge_info` keep the largest value of the shards.

    Args:
        device: the stage's device; None = the current CUDA device when this process has used CUDA.
    """
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available() and torch.cuda.is_initialized()
    if not cuda:
        return {"peak_gpu_allocated_mib": None, "peak_gpu_reserved_mib": None}
    return {"peak_gpu_allocated_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "peak_gpu_reserved_mib": round(torch.cuda.max_memory_reserved(device) / 2**20, 1)}


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
                   fused: bool = False) -> torch.optim.Optimizer:
    """``sgd`` (the reference's: no momentum unless given) or ``adam``/``adamw``.

    Args:
        fused: torch's fused update (``fused=True``, config ``speed.fused_optimizer``): one kernel updates every
            parameter of the optimizer instead of a loop of small ops per tensor (CPU and CUDA). SGD's update is
            bit-identical to the loop's; Adam/AdamW's differs by float rounding (~1e-6 relative: the fused kernel
            orders the bias corrections and the division differently). The loop (``foreach=False`` on the CPU,
            torch's default there) stays the default for direct library use.
    """
    kw = {"fused": True} if fused else {}
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, nesterov=nesterov and momentum > 0,
                               **kw)
    if name == "adam":
        return torch.optim.Adam(groups, lr=groups[0]["lr"], **kw)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"], **kw)
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
        """The configured optimizer over parameter groups (see :func:`param_groups`); fused when the stage's
        :class:`Runtime` says ``fused_optimizer`` (every stage config is both a Solver and a Runtime)."""
        return make_optimizer(groups, self.optimizer, self.momentum, self.nesterov,
                              fused=bool(getattr(self, "fused_optimizer", False)))

    def augmenter(self, augment: str = "none") -> Augmenter:
        """Random resize (``resize_min: 0`` keeps the size), flip and crop, plus photometric ``augment``."""
        resize = (self.resize_min, self.resize_max) if self.resize_min > 0 else None
        return Augmenter(AugmentConfig(self.crop, resize, True, augment))


@dataclass(kw_only=True)
class Runtime:
    """Where and how a stage runs; none of it changes the result (except ``seed``, ``sync_bn`` with
    more than one process, and the float rounding of the speed keys)."""

    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    threads: int = 0
    sync_bn: bool = True           # SyncBatchNorm when several processes train on CUDA (resources.sync_bn)
    # config group speed (see Speed): how fast, not what; off here for direct library use and tests
    channels_last: bool = False    # NHWC weights and activations of the trained conv nets
    fused_optimizer: bool = False  # fused optimizer update (make_optimizer)
    compile: bool = False          # torch.compile the module being trained
    cudnn_benchmark: bool = False  # CUDA: cuDNN picks the fastest convolution algorithm per input shape


@dataclass(frozen=True)
class Speed:
    """How a training stage runs its network fast (config group ``speed``): what :meth:`EpochRunner.wrap` does
    to the module it hands out. None of it changes what is computed, only the float rounding (see the tests).

    Attributes:
        channels_last: the module's 4-D weights in ``torch.channels_last`` (NHWC). A convolution with an NHWC
            weight returns NHWC activations, so the whole conv net then runs in NHWC, the layout oneDNN (CPU) and
            the cuDNN tensor-core kernels (CUDA) prefer; inputs stay NCHW (the first convolution converts them).
            Converted in place: the Parameter objects stay the same, so optimizers, state dicts and DDP hold.
            Results differ from NCHW by float rounding (another summation order), ~1e-6 relative.
        compile: ``torch.compile`` of the module being trained (after DDP wrapping). The first steps compile
            (tens of seconds on a CPU, minutes for ResNeSt-269); shapes that change (a last short batch)
            recompile. Results differ by float rounding (fused kernels).
    """

    channels_last: bool = False
    compile: bool = False

    @classmethod
    def of(cls, cfg) -> "Speed":
        """The speed settings of a stage config (a :class:`Runtime`; anything else runs plain)."""
        return cls(bool(getattr(cfg, "channels_last", False)), bool(getattr(cfg, "compile", False)))

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` in the configured memory format (in place); returns it."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def compiled(self, module: nn.Module) -> nn.Module:
        """``torch.compile(module)`` when ``compile``, else ``module`` itself."""
        return torch.compile(module) if self.compile else module


def set_backend_speed(cfg, device: torch.device) -> None:
    """Backend flags of ``cfg``'s speed settings on ``device``: ``torch.backends.cudnn.benchmark`` on CUDA.

    With it cuDNN times its convolution algorithms for each new input shape and keeps the fastest; training
    crops have one shape, so the timing is paid once. It can pick another algorithm than the default heuristic,
    i.e. other float rounding, and the choice may differ between runs (not bit-reproducible on CUDA, which
    cuDNN's default algorithms are not promised to be either). Nothing to do on the CPU.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(getattr(cfg, "cudnn_benchmark", False))


def start_training(cfg: Runtime):
    """Threads, device and process group of a training stage: a :class:`pnoc.distributed.Distributed`.

    Under ``torchrun`` the job's ``threads`` are shared by its processes, so each gets
    ``threads // processes`` (at least 1). The stage's :class:`Speed` rides on it to :meth:`EpochRunner.wrap`,
    and the backend flags are set (:func:`set_backend_speed`).
    """
    from pnoc.distributed import launched_world, setup

    if cfg.threads and cfg.threads > 0:
        set_threads(max(1, cfg.threads // launched_world()))
    dist = setup(cfg.device)
    if hasattr(cfg, "batch_size"):
        dist.per_rank(cfg.batch_size)  # a global batch that does not split fails before anything starts
    dist.speed = Speed.of(cfg)
    set_backend_speed(cfg, dist.device)
    return dist


# the speed keys change the float rounding only: a state trained with other speed settings is resumed
RUNTIME_ONLY = ("out", "metrics", "state_dir", "num_workers", "threads",
                "channels_last", "fused_optimizer", "compile", "cudnn_benchmark")


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


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state: about the size of its torch file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


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
        need = tensor_bytes(state)
        try:
            # beside the last state, renamed over it when complete: a full disk leaves the last state as it was;
            # through a file object, so that a short write surfaces as ENOSPC rather than torch's bare RuntimeError
            with atomic_path(self.path, ".pt", need=need) as tmp, open(tmp, "wb") as f:
                torch.save(state, f)
        except DiskFullError as e:
            raise DiskFullError(self._full_message(epoch, need, e)) from e

    def _full_message(self, epoch: int, need: int, e: DiskFullError) -> str:
        """What a user reads when the state of ``epoch`` did not fit on the disk: the folder, the space, the
        state that survives, the fix."""
        from pnoc.io import free_space, human_bytes, out_of_space

        try:
            free, total = free_space(self.dir)
            room = f"{human_bytes(free)} free of {human_bytes(total)}"
        except OSError:
            room = "free space unknown"
        kept = "no earlier state exists, so a rerun starts from scratch"
        if self.path.is_file():
            try:
                kept = (f"{self.path} of epoch {int(self.load(mmap=True)['_epoch']) + 1} is intact, so a rerun "
                        f"resumes from there")
            except (DataError, KeyError, TypeError, ValueError):
                kept = f"{self.path} is left as it was"
        return (f"{self.dir}: {out_of_space(e, self.dir) or 'no space left on the device'} while writing the resume "
                f"state of epoch {epoch + 1} (about {human_bytes(need)} needed, {room} there now); the partial file "
                f"was removed and {kept}; free space on that filesystem (or set the config key `results` to a "
                f"folder on a larger one), then rerun")

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
    # a file object, so that a full disk surfaces as ENOSPC (DiskFullError naming the folder and the size)
    with atomic_path(path, ".pt", need=tensor_bytes(state)) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


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


def _cpu_copy(obj):
    """A deep copy of a state dict with every tensor copied to the host (a snapshot that costs no device memory).

    Dict types and the ``_metadata`` of module state dicts (read by ``load_state_dict``) are kept.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, OrderedDict) else dict()
        for k, v in obj.items():
            out[k] = _cpu_copy(v)
        if hasattr(obj, "_metadata"):
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


class _TrainingState:
    """Everything a training step changes, saved to the host and put back by :meth:`restore` (any number of
    times): the state dicts of a runner's objects (models, optimizers, schedulers, scaler), the gradients of
    their parameters, the python/numpy/torch/CUDA RNG states and the run's shared generator."""

    def __init__(self, objects: dict, dist):
        self.objects, self.dist = objects, dist
        self.states = {k: _cpu_copy(o.state_dict()) for k, o in objects.items()}
        params: dict[int, nn.Parameter] = {}
        for o in objects.values():
            if isinstance(o, nn.Module):
                params.update((id(p), p) for p in o.parameters())
            elif isinstance(o, torch.optim.Optimizer):
                params.update((id(p), p) for g in o.param_groups for p in g["params"])
        self.grads = [(p, None if p.grad is None else p.grad.detach().to("cpu", copy=True)) for p in params.values()]
        self.rng = rng_state()
        self.shared = dist.shared.get_state()
        self.nbytes = tensor_bytes(self.states) + sum(tensor_bytes(g) for _, g in self.grads)  # host memory held
        self.held = _held_bytes(objects)

    def restore(self) -> None:
        # fresh copies every time: an optimizer's load_state_dict keeps CPU tensors it is given as its state
        for k, o in self.objects.items():
            o.load_state_dict(_cpu_copy(self.states[k]))
        for p, g in self.grads:
            p.grad = None if g is None else g.to(p.device, copy=True)
        set_rng_state(self.rng)
        self.dist.shared.set_state(self.shared)


def _held_bytes(objects: dict) -> int:
    """Bytes of the gradients of the objects' parameters and of their optimizers' state: what a training step
    adds whatever its batch."""
    params: dict[int, nn.Parameter] = {}
    state = 0
    for o in objects.values():
        if isinstance(o, nn.Module):
            params.update((id(p), p) for p in o.parameters())
        elif isinstance(o, torch.optim.Optimizer):
            params.update((id(p), p) for g in o.param_groups for p in g["params"])
            state += sum(tensor_bytes(v) for v in o.state.values())
    return state + sum(tensor_bytes(p.grad) for p in params.values() if p.grad is not None)


def _batch_len(batch) -> int:
    """Images of a loader batch (the first tensor's length)."""
    for v in batch if isinstance(batch, (list, tuple)) else [batch]:
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
    return len(batch[0])


def _batch_head(batch, n: int):
    """The first ``n`` images of a loader batch (every tensor and list cut alike)."""
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, (list, tuple)):
        return type(batch)(v[:n] if isinstance(v, (torch.Tensor, list, tuple)) else v for v in batch)
    return batch


class EpochRunner:
    """Resumable epoch loop shared by every training stage.

    Usage::

        runner = EpochRunner(state_dir, config_dict, epochs, seed, model=m, opt=o, sched=s, scaler=sc)
        runner.guard_memory(step, "cam")   # the first loader checks that step's memory before training
        for epoch in runner:           # restores state first; reseeds RNGs from (seed, epoch)
            for batch in runner.loader(train_set, batch_size):
                step(batch)
            val = runner.evaluate(score, m, val_set)   # rank 0 evaluates, every rank gets the result
            runner.log(epoch, {"loss": ..., "val": val}, shared=["val"])   # appended to runner.history
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
        self.epoch_seconds: list[float] = []  # wall time of each epoch this process ran (training, evaluation, checkpoint)
        self.start_epoch = 0
        self.epoch = 0
        self._memory: dict | None = None  # the step registered by guard_memory, until the first loader checks it
        self._watch = None                # the MemoryWatch of a CPU run, from that check to the end of the epochs

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
        try:
            with stop_requested() as flag:
                for epoch in range(start, self.epochs):
                    self.epoch = epoch
                    d.reseed(epoch_seed(self.seed, epoch))
                    t0 = time.perf_counter()
                    yield epoch
                    rngs = d.gather(rng_state()) if d.enabled else None
                    # one writer; the others wait so that nobody reads a half-written state, and a full disk
                    # (DiskFullError) stops every rank rather than leaving the others in the next collective
                    d.on_main(self.ckpt.save, epoch,
                              extra={"history": self.history, "finished": epoch + 1 == self.epochs},
                              rng_ranks=rngs, **self.objects)
                    self.epoch_seconds.append(time.perf_counter() - t0)
                    if d.any(flag["stop"]) and epoch + 1 < self.epochs:
                        log.warning("stopping after epoch %d on request; rerun to resume", epoch + 1)
                        raise SystemExit(75)
        finally:
            if self._watch is not None:
                self._watch.stop()
                self._watch = None

    # -- what every stage needs from the data-parallel machinery (pnoc.distributed), in one place
    def wrap(self, model: nn.Module, sync_bn: bool = False) -> nn.Module:
        """The module to train: ``model`` itself in one process, DistributedDataParallel under torchrun;
        with the stage's :class:`Speed` (``channels_last`` applied to ``model`` in place, then ``compile``).

        Keep ``model`` (not the wrapper) for evaluation and for the state dicts of artifacts.
        """
        speed = getattr(self.dist, "speed", None) or Speed()
        return speed.compiled(self.dist.wrap(speed.prepare(model), sync_bn))

    def loader(self, dataset, batch_size: int, num_workers: int = 0, shuffle: bool = True, drop_last: bool = True):
        """The current epoch's loader: this rank's slice of every global batch of ``batch_size``.

        The first call of a run whose stage registered its step (:meth:`guard_memory`) checks the memory first.
        """
        if self._memory is not None:
            guard, self._memory = self._memory, None
            self._check_memory(guard, dataset, batch_size, num_workers, shuffle, drop_last)
        return self.dist.loader(dataset, batch_size, self.seed, self.epoch, num_workers, shuffle, drop_last)

    # -- memory: a batch that does not fit stops with the keys to lower, not by the kernel's OOM killer
    def guard_memory(self, step: Callable[[object], object], section: str, stage: str | None = None,
                     smallest: int = 1, lower: str | None = None) -> None:
        """Register the stage's training step for the memory check of this run's first :meth:`loader`.

        Before the first real step, that check runs ``step`` on sub-batches of ``smallest`` (once unmeasured,
        once measured) and ``4·smallest`` images of the first batch, each from the same state, which is restored
        afterwards exactly (models,
        optimizers, schedulers, scaler, gradients, every RNG and the shared generator: the training does not
        change), projects the peak to the real batch and compares it with what the process may allocate
        (:mod:`pnoc.memory`; ``PNOC_MEM_LIMIT_MB`` overrides). A step that does not fit raises
        :class:`pnoc.memory.MemoryLimitError` on every rank, naming ``<section>.batch_size`` (with the largest
        value that fits), ``<section>.crop`` and, under SLURM, ``resources.train_mem_mb``. On the CPU a
        :class:`pnoc.memory.MemoryWatch` then guards the rest of the epochs (evaluation, caches).

        Args:
            step: one training step on a batch as the stage's loader yields it (tensors and id lists); it
                moves the batch to the device, runs forward, backward and the optimizer step(s). Only the
                objects given to the runner and the RNGs may change state (anything else the step keeps, e.g.
                an iteration counter, the stage resets itself).
            section: the stage's config section, e.g. ``cam`` or ``saliency.ccam``.
            stage: the stage's name for the message (default: the section).
            smallest: the fewest images the step accepts (2 where a loss contrasts the images of a batch; a
                BatchNorm that cannot train on one image doubles it by itself, see :func:`pnoc.memory.measure_steps`).
            lower: the other keys that lower the need (default ``<section>.crop``).
        """
        self._memory = {"step": step, "section": section, "stage": stage or section, "smallest": smallest,
                        "lower": lower or f"{section}.crop"}

    def _check_memory(self, guard: dict, dataset, batch_size: int, num_workers: int, shuffle: bool,
                      drop_last: bool) -> None:
        from pnoc import memory

        d = self.dist
        speed = getattr(d, "speed", None)
        # torch.compile specialises a batch of 1 (then compiles once more for the real batch): start at 2
        smallest = max(guard["smallest"], 2) if speed is not None and speed.compile else guard["smallest"]
        memory.trim()  # what the process really holds: freed memory that glibc kept is not in use
        budget = memory.memory_budget(d.device)
        key = f"{guard['section']}.batch_size"
        message = memory.no_room(guard["stage"], d.gather(budget), key, batch_size, guard["lower"])
        if message is not None:  # the same verdict on every rank: they all stop here
            raise memory.MemoryLimitError(message)
        snapshot = _TrainingState(self.objects, d)
        try:
            # a loader of its own: the epoch's loader keeps its generator's draws
            first = next(iter(d.loader(dataset, batch_size, self.seed, self.epoch, num_workers, shuffle, drop_last)))
            local = _batch_len(first)

            def room() -> float:
                # what a measuring step may take now (the host copy of the state and the batch are held already),
                # shared by the processes of a node, which all measure at once
                memory.trim()
                now = memory.memory_budget(d.device)
                return (now.headroom - now.reserve) / (d.world if now.shared else 1)

            watch = memory.MemoryWatch(f"lower {key} or {guard['lower']}")
            known = [0.0]

            def fixed() -> float:
                # what the step added that does not grow with the batch: new gradients and optimizer state
                known[0] = max(0.0, float(_held_bytes(self.objects) - snapshot.held))
                return known[0]

            with watch if d.device.type == "cpu" else contextlib.nullcontext():
                points = memory.measure_steps(d.device, lambda b: guard["step"](_batch_head(first, b)), local,
                                              smallest, after=snapshot.restore, room=room, fixed=fixed)
        except torch.OutOfMemoryError as e:
            first_line = (str(e).strip().splitlines() or ["out of memory"])[0]
            raise memory.MemoryLimitError(
                f"{guard['stage']}: even a measuring step of {smallest} to {memory.PROBE_SPAN * smallest} images per "
                f"process does not fit in {d.device} memory ({first_line}); lower {guard['lower']} or "
                f"{guard['section']}.batch_size; or {budget.fix}") from None
        finally:
            snapshot.restore()
        # the verdict against what is left now: the first step's one-time costs (kernels, library caches) are paid
        # and held for good, the copy of the state and the measuring batch are not
        snapshot = first = None
        memory.trim()
        budget = memory.memory_budget(d.device)
        projection = memory.project(points, local, known[0])
        rows = d.gather((projection, budget))
        memory.fits_or_raise(guard["stage"], [p for p, _ in rows], [b for _, b in rows], key, batch_size,
                             guard["lower"], d.rank)
        if d.device.type == "cpu":
            self._watch = memory.MemoryWatch(f"lower {key} or {guard['lower']}").start()

    # -- per-epoch evaluation: rank 0 evaluates, every rank gets the result
    def evaluate(self, fn: Callable[..., object], *args, **kwargs):
        """``fn(*args, **kwargs)`` on rank 0 only, its result on every rank (:meth:`Distributed.on_main`).

        A per-epoch evaluation of the same images on every rank would be N-fold work for one number. Pass the
        bare model (not :meth:`wrap`'s), whose forward needs no other rank. Log what it returns through
        :meth:`log`'s ``shared`` so that it is taken as it is rather than averaged over ranks.
        """
        return self.dist.on_main(fn, *args, **kwargs)

    def shared_rand(self, local_batch: int, *shape: int) -> torch.Tensor:
        """Uniform draws for this rank's images that do not depend on the process count."""
        return self.dist.shared_rand(local_batch, *shape)

    def gather_batch(self, t: torch.Tensor) -> torch.Tensor:
        """The global batch of a per-rank tensor, for losses that couple a batch's images (with gradients)."""
        return self.dist.gather_batch(t)

    def log(self, epoch: int, metrics: dict, shared: Iterable[str] = ()) -> None:
        """Append an epoch's metrics to the history: means over ranks (throughputs ``*images_per_s`` summed).

        Args:
            shared: keys whose values are the same on every rank (:meth:`evaluate`'s results): taken as they are,
                so that they equal a single process's to the bit.
        """
        shared = set(shared)
        averaged = self.dist.all_mean({k: v for k, v in metrics.items() if k not in shared},
                                      sum_keys=[k for k in metrics if k.endswith("images_per_s")])
        metrics = {k: metrics[k] if k in shared else averaged[k] for k in metrics}  # the stage's key order
        row = {"epoch": epoch + 1, **metrics}
        self.history.append(row)
        log.info("epoch %d: %s", epoch + 1, ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "epoch"))

    def save_weights(self, path: str | Path, state: dict) -> None:
        """:func:`save_weights` by rank 0 only (every rank holds the same weights); its failure (a full disk)
        stops every rank."""
        self.dist.on_main(save_weights, path, state)

    def write_metrics(self, path: str | Path, metrics: dict) -> None:
        """The stage's metrics JSON (+ the per-epoch CSV beside it), by rank 0 only.

        Adds ``processes``, ``epoch_seconds`` (rank 0's wall time of each epoch this process ran, checkpoint
        included; a resumed run lists only its own) and the peak GPU memory of the busiest rank
        (:func:`peak_memory`).
        """
        from pnoc.io import write_csv, write_json

        peaks = self.dist.gather(peak_memory())
        peak = {k: max((p[k] for p in peaks if p[k] is not None), default=None) for k in peaks[0]}
        metrics = {**metrics, "processes": self.dist.world, "epoch_seconds": self.epoch_seconds, **peak}

        def write() -> None:
            write_csv(Path(path).with_suffix(".csv"), self.history)
            write_json(path, metrics)

        self.dist.on_main(write)  # the others wait; a failure (a full disk) stops every rank
