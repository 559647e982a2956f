"""Memory of a training process: what it may still allocate, what its step needs, and a stop with a clear
message before the kernel's OOM killer ends it without one.

Why: on the CPU a batch that does not fit is not an exception. Once the machine or the job's cgroup runs out
of memory the kernel kills the process (SIGKILL: no message, no traceback, a Snakemake log that ends mid-epoch).
On CUDA it is an exception, but only after the model, the data and a part of the step. So a training stage
measures before its first real step:

* :func:`memory_budget`: what this process may still allocate. On the CPU the tightest of ``MemAvailable``
  (``/proc/meminfo``), the cgroup's limit less its usage (v2 ``memory.max``, v1 ``memory.limit_in_bytes``, of
  this process's cgroup and its ancestors; page cache not counted as used) and SLURM's ``SLURM_MEM_PER_NODE``
  or ``SLURM_MEM_PER_CPU`` x ``SLURM_CPUS_ON_NODE`` less this process's RSS. On CUDA the device's free memory
  (``torch.cuda.mem_get_info``) plus what PyTorch's cache holds unused. The environment variable
  ``PNOC_MEM_LIMIT_MB`` replaces all of them by a limit of this process's own (host RSS on the CPU, PyTorch's
  allocated memory on CUDA): a cap on a shared machine, or a small fake limit in tests.
* :func:`measure_steps` (:func:`measure_growth`) and :func:`project`: the peak of the stage's real step on one
  and on four images (after one unmeasured step; each from the same saved state, which is restored afterwards:
  see :meth:`pnoc.training.EpochRunner.guard_memory`), and the straight line through them to the real batch:
  gradients and optimizer state are the fixed part, activations grow per image. On the CPU the peak is the
  kernel's high-water mark of the RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) after glibc's free
  pages are returned; on CUDA ``torch.cuda.max_memory_allocated``. The larger measuring step is cut to what
  the memory holds, so that measuring is not what the kernel kills.
* :func:`no_room`, :func:`judge` and :func:`too_big`: the verdict against the budget less a reserve (5 % of the
  limit, at least 64 MiB: allocator slack, the data loader, page cache), and the messages that name the keys
  to lower.
* :class:`MemoryWatch`: the safety net for what the step does not show (evaluation, caches that fill during the
  first epoch, other processes): a thread samples the budget while the stage trains and, when what is left falls
  under half the reserve, logs the message and raises :class:`MemoryLimitError` in the main thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pnoc.io import DataError, ResourceError

log = logging.getLogger("pnoc.memory")

ENV = "PNOC_MEM_LIMIT_MB"
MiB = 2**20
RESERVE_FRACTION = 0.05    # of the limit kept free by a projected step
RESERVE_MIN = 64 * MiB
TRAIN_MEM_KEY = "resources.train_mem_mb"  # the memory a training job asks SLURM for (Snakemake's mem_mb)


class MemoryLimitError(ResourceError):
    """A step would need more memory than the process may allocate; the message names the keys to lower."""


def human(n: float) -> str:
    """Bytes as MiB below 1 GiB, else GiB (two decimals)."""
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / MiB:.1f} MiB"


# ---------------------------------------------------------------------------- what is available
@dataclass
class Budget:
    """What a process may still allocate on its device.

    Attributes:
        device: ``cpu`` or ``cuda:N``.
        in_use: bytes it holds now (RSS on the CPU, PyTorch's allocated memory on CUDA).
        headroom: bytes it may still allocate.
        source: what bounds ``headroom``, for messages (``MemAvailable of the machine``, a cgroup file, ...).
        fix: how to get more memory from that source, for messages.
        shared: the processes of a node draw on the same headroom (host memory), so their needs add up.
    """

    device: str
    in_use: int
    headroom: int
    source: str
    fix: str
    shared: bool

    @property
    def limit(self) -> int:
        return self.in_use + self.headroom

    @property
    def reserve(self) -> int:
        """Bytes a projected step must leave free."""
        return max(RESERVE_MIN, int(RESERVE_FRACTION * max(self.limit, 0)))


def rss() -> int:
    """This process's resident memory in bytes (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _env_limit() -> int | None:
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    try:
        mb = float(value)
    except ValueError:
        raise DataError(f"{ENV}={value!r}: not a number of MiB; unset it, or give the memory this process may "
                        f"use, e.g. {ENV}=4000") from None
    return int(mb * MiB)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2, no limit) is not a number


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_limit(proc_cgroup: str | Path = "/proc/self/cgroup",
                 root: str | Path = "/sys/fs/cgroup") -> tuple[int, int, str] | None:
    """``(limit, used, file)`` of the tightest memory limit of this process's cgroup and its ancestors.

    ``used`` leaves out the inactive page cache, which the kernel reclaims before it kills anything. None
    where no cgroup sets a limit (or there is no cgroup file system).

    Args:
        proc_cgroup, root: where the process's cgroup list and the cgroup file system are (tests point them
            at a fake tree).
    """
    root = Path(root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, rel = parts
        if hid == "0" and controllers == "":
            base, names = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, names = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        # the mount shows either the whole hierarchy (the process's path below it) or, in a cgroup namespace,
        # the process's own cgroup as its root
        d = base / rel.strip("/")
        if not d.is_dir():
            d = base
        while True:
            limit = _read_int(d / names[0])
            if limit is not None and limit < 2**60:  # v1 writes "no limit" as a huge number
                usage = _read_int(d / names[1]) or 0
                used = max(0, usage - _stat(d / "memory.stat", names[2]))
                if best is None or limit - used < best[0] - best[1]:
                    best = (limit, used, str(d / names[0]))
            if d == base or d.parent == d:
                break
            d = d.parent
    return best


def slurm_limit() -> tuple[int, str] | None:
    """``(bytes, description)`` of the SLURM job's memory on this node, or None outside SLURM."""
    env = os.environ
    try:
        if env.get("SLURM_MEM_PER_NODE"):
            mb = int(env["SLURM_MEM_PER_NODE"])
            return mb * MiB, f"SLURM_MEM_PER_NODE={mb} MB"
        if env.get("SLURM_MEM_PER_CPU") and env.get("SLURM_CPUS_ON_NODE"):
            mb, cpus = int(env["SLURM_MEM_PER_CPU"]), int(env["SLURM_CPUS_ON_NODE"])
            return mb * cpus * MiB, f"SLURM_MEM_PER_CPU={mb} MB x SLURM_CPUS_ON_NODE={cpus}"
    except ValueError:
        return None
    return None


def _proc_kb(path: str, key: str) -> int | None:
    """Bytes of a ``key:  N kB`` line of a /proc file (``/proc/meminfo``, ``/proc/self/status``); None without it."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _meminfo_available() -> int | None:
    return _proc_kb("/proc/meminfo", "MemAvailable")


def memory_budget(device: torch.device | str = "cpu") -> Budget:
    """What this process may still allocate on ``device`` (see the module docstring for the sources).

    Raises:
        DataError: ``PNOC_MEM_LIMIT_MB`` is set but is not a number.
    """
    device = torch.device(device)
    env_limit = _env_limit()
    if device.type == "cuda":
        allocated = torch.cuda.memory_allocated(device)
        if env_limit is not None:
            return Budget(str(device), allocated, env_limit - allocated, f"{ENV}={env_limit // MiB}",
                          f"raise {ENV}", False)
        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - allocated
        name = torch.cuda.get_device_name(device)
        return Budget(str(device), allocated, free + cached, f"{device} ({name}, {human(total)}): {human(free)} free",
                      "run on a GPU with more memory, or split the batch over more GPUs (resources.gpus_per_job)",
                      False)
    now = rss()
    if env_limit is not None:
        return Budget("cpu", now, env_limit - now, f"{ENV}={env_limit // MiB}", f"raise {ENV}", False)
    in_slurm = bool(os.environ.get("SLURM_JOB_ID"))
    job_fix = f"raise {TRAIN_MEM_KEY} (the job's memory request)"
    candidates = []
    avail = _meminfo_available()
    if avail is not None:
        candidates.append((avail, "MemAvailable of the machine (/proc/meminfo)",
                           "free memory on the machine, or run on one with more"))
    cg = cgroup_limit()
    if cg is not None:
        limit, used, path = cg
        candidates.append((limit - used, f"the cgroup limit {human(limit)} ({path}, {human(used)} in use)",
                           job_fix if in_slurm else "raise the memory limit of the container or cgroup"))
    sl = slurm_limit()
    if sl is not None:
        candidates.append((sl[0] - now, f"the job's {sl[1]}", job_fix))
    if not candidates:  # no /proc: nothing to go by; do not stop anything
        return Budget("cpu", now, 2**62, "unknown (no /proc/meminfo)", "", True)
    headroom, source, fix = min(candidates)
    return Budget("cpu", now, headroom, source, fix, True)


# ---------------------------------------------------------------------------- what a step needs
def trim() -> None:
    """Collect garbage and hand glibc's free heap pages back to the kernel, so that a measurement starts from
    what is really held (freed memory kept by malloc would hide a step's growth)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _reset_high_water() -> bool:
    """Reset the kernel's peak-RSS mark of this process (``VmHWM``); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water() -> int | None:
    return _proc_kb("/proc/self/status", "VmHWM")


class _Sampler:
    """The largest RSS seen every 2 ms (where the high-water mark cannot be reset; may miss short spikes)."""

    def __init__(self):
        self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            self._stop.wait(0.002)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss())


def measure_growth(device: torch.device, fn: Callable[[], object]) -> int:
    """Bytes ``fn()`` adds, at its peak, to what the process holds before it.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` less the allocated memory before. CPU: the
    peak RSS (the kernel's ``VmHWM`` after a reset, else a 2 ms sampler) less the RSS before, both after
    :func:`trim`.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    trim()
    base = rss()
    if _reset_high_water() and _high_water() is not None:
        fn()
        peak = _high_water() or rss()
    else:
        sampler = _Sampler()
        try:
            fn()
        finally:
            peak = sampler.stop()
    return max(0, peak - base)


PROBE_SPAN = 4  # the larger sub-batch is this many times the smaller one


def probe_sizes(batch: int, smallest: int = 1) -> list[int]:
    """Sub-batches to measure a step on: ``smallest`` and :data:`PROBE_SPAN` times that (at most ``batch``), or
    ``batch`` alone when it is not larger than ``smallest``.

    The span is a trade: the allocator's noise is a few MiB whatever the batch, so 1 and 2 images give a slope
    off by a third on a small network, 1 and 4 by a tenth; larger sub-batches cost more of the real step.

    Args:
        batch: images of a real step on this process.
        smallest: the fewest images the step accepts (2 where a loss contrasts the images of a batch).
    """
    if batch <= smallest:
        return [batch]
    return [smallest, min(batch, PROBE_SPAN * smallest)]


def measure_steps(device: torch.device, step: Callable[[int], object], batch: int, smallest: int = 1,
                  after: Callable[[], None] = lambda: None, room: Callable[[], float] | None = None,
                  fixed: Callable[[], float] | None = None) -> list[tuple[int, int]]:
    """``(images, bytes)``: the growth of ``step(b)`` at the :func:`probe_sizes` of ``batch``.

    One unmeasured run comes first: the first step of a process loads kernels and fills library caches once,
    which would count as the growth of the smaller sub-batch and flatten the slope. A BatchNorm that cannot
    train on ``smallest`` images (one image: ResNeSt's split attention, DeepLab's ASPP pooling with ``norm: bn``
    or a small crop at a large output stride, whose maps are 1x1) doubles ``smallest``; the real batch can.
    The larger measuring step must not itself be what the kernel kills: it is cut to what ``room`` holds when
    the smaller step's growth, less its known fixed part, is counted as growing with every image (an upper
    bound), and left out when not even one image more fits (the projection then scales the one point, an upper
    bound too).

    Args:
        device: where the step runs.
        step: runs one step on the first ``b`` images.
        batch: images of a real step on this process.
        smallest: the fewest images the step accepts.
        after: runs after every step, raised or not (puts the saved state back).
        room: the bytes this process may add now (headroom less the reserve), asked before the larger step;
            None: no cut.
        fixed: the bytes of the smaller step known not to grow with the batch (new gradients and optimizer
            state), asked right after it.

    Raises:
        torch.OutOfMemoryError: a measuring step did not fit on the device.
    """
    while True:
        try:
            try:
                measure_growth(device, lambda: step(min(smallest, batch)))
            finally:
                after()
            break
        except ValueError as e:
            if "more than 1 value per channel" not in str(e) or smallest >= batch:
                raise
            smallest *= 2
    points: list[tuple[int, int]] = []
    known = 0.0
    for b in probe_sizes(batch, smallest):
        if points and room is not None:
            b0, g0 = points[0]
            known = min(known, g0)
            b = min(b, int(b0 * (max(0.0, room()) - known) // max(g0 - known, 1)))
            if b <= b0:
                break
        try:
            points.append((b, measure_growth(device, lambda: step(b))))
            if len(points) == 1 and fixed is not None:
                known = max(0.0, float(fixed()))
        finally:
            after()
    return points


@dataclass
class Projection:
    """What a step of ``batch`` images is expected to add to the memory the process holds.

    Attributes:
        batch: images of a real step on this process.
        points: ``(images, bytes)`` measured.
        per_image: bytes per image (the slope; 0 when the measurements did not grow).
        fixed: bytes independent of the batch (weights' gradients, optimizer state, workspaces).
        growth: projected bytes at ``batch``.
    """

    batch: int
    points: list[tuple[int, int]] = field(default_factory=list)
    per_image: float = 0.0
    fixed: float = 0.0
    growth: float = 0.0

    def at_most(self, room: float) -> int:
        """The largest batch whose projected growth fits in ``room`` bytes (capped at 2**20 images)."""
        if room < self.fixed:
            return 0
        if self.per_image <= 0:
            return 2**20
        return min(2**20, int((room - self.fixed) // self.per_image))

    def describe(self) -> str:
        pts = ", ".join(f"{b} image{'s' if b > 1 else ''} {human(g)}" for b, g in self.points)
        return f"measured on {pts}: {human(self.fixed)} + {human(self.per_image)} per image"


def project(points: list[tuple[int, int]], batch: int, fixed: float = 0.0) -> Projection:
    """The straight line through the measured ``(images, bytes)`` points, at ``batch`` images.

    One point: the step was measured at ``batch`` itself, or, when not, scaled in proportion but for ``fixed``
    (the part known not to grow with the batch): an upper bound.
    """
    points = sorted(points)
    if len(points) == 1 or points[0][0] == points[-1][0]:
        b, g = points[-1]
        if b == batch:
            return Projection(batch, points, per_image=g / max(1, b), fixed=0.0, growth=float(g))
        f = min(max(0.0, fixed), float(g))
        per = (g - f) / max(1, b)
        return Projection(batch, points, per_image=per, fixed=f, growth=f + per * batch)
    (b1, g1), (b2, g2) = points[0], points[-1]
    per = max(0.0, (g2 - g1) / (b2 - b1))
    top = max(g1, g2)  # a measurement that did not grow (allocator noise) is not a negative slope
    fixed = max(0.0, top - per * b2)
    return Projection(batch, points, per_image=per, fixed=fixed, growth=top + per * (batch - b2))


@dataclass
class Verdict:
    """The comparison of every process's projection with its budget.

    Attributes:
        fits: every process's step fits (and, on shared host memory, all of them together).
        needed: bytes the step adds (summed over the processes of a node when they share host memory).
        room: bytes available for it (headroom less the reserve).
        at_most: the largest batch per process that fits (the smallest over processes).
        budget: the budget that decided (the tightest).
    """

    fits: bool
    needed: float
    room: float
    at_most: int
    budget: Budget


def judge(projections: list[Projection], budgets: list[Budget]) -> Verdict:
    """Whether the projected steps of all processes (rank order) fit their budgets.

    Host memory (``shared``) is one pool for the processes of a node: their growths add up against the
    tightest headroom. Device memory is per process.
    """
    if budgets[0].shared:
        tight = min(budgets, key=lambda b: b.headroom)
        room = tight.headroom - tight.reserve
        needed = sum(p.growth for p in projections)
        share = room / len(projections)
        at_most = min(p.at_most(share) for p in projections)
        return Verdict(needed <= room, needed, room, at_most, tight)
    rows = [(p, b, b.headroom - b.reserve) for p, b in zip(projections, budgets)]
    p, b, room = min(rows, key=lambda r: r[2] - r[0].growth)
    return Verdict(all(q.growth <= r for q, _, r in rows), p.growth, room, min(q.at_most(r) for q, _, r in rows), b)


def too_big(what: str, verdict: Verdict, projection: Projection, batch_key: str, batch: int, world: int,
            lower: str, step: str = "one training step") -> str:
    """The message of a step that does not fit: what it needs, what is available, the keys that fix it.

    Args:
        what: the stage, e.g. ``train_cam``.
        verdict: from :func:`judge`.
        projection: this process's.
        batch_key: the config key of the global batch, e.g. ``cam.batch_size``.
        batch: its value.
        world: processes of the run (``resources.gpus_per_job``).
        lower: the other keys that lower the need, e.g. ``cam.crop``.
        step: what was measured, for the message.
    """
    b = verdict.budget
    host = b.device == "cpu"
    kind = "host memory" if host else f"{b.device} memory"
    per = f", {batch // world} per process x {world} processes" if world > 1 else ""
    fit = min(verdict.at_most * world, batch - world)  # below the batch that did not fit
    fit -= fit % world  # a global batch splits evenly over the processes
    if fit > 0:
        advice = f"Lower {batch_key} to at most {fit}, or lower {lower}"
    else:
        advice = f"Not even one image per process fits: lower {lower}"
    fix = f"; or {b.fix}" if b.fix else ""
    end = "the kernel would kill the process" if host else "the step would fail with an out-of-memory error"
    return (f"{what}: {step} at {batch_key}={batch}{per} needs about {human(verdict.needed)} more "
            f"{kind} ({projection.describe()}), but only {human(max(0.0, verdict.room))} are available "
            f"({b.source}, {human(b.in_use)} in use, {human(b.reserve)} kept in reserve): {end}. {advice}{fix}")


def no_room(what: str, budgets: list[Budget], batch_key: str, batch: int, lower: str,
            step: str = "a training step") -> str | None:
    """The message when the processes (rank order) have no memory left for even a measuring step, else None.

    Measuring would then only run the process into the kernel's OOM killer (or into the watchdog): the
    model, its optimizer and the data already take what there is.
    """
    tight = min(budgets, key=lambda b: b.headroom - b.reserve)
    room = tight.headroom - tight.reserve
    if room > 0:
        return None
    kind = "host memory" if tight.device == "cpu" else f"{tight.device} memory"
    fix = f"; or {tight.fix}" if tight.fix else ""
    return (f"{what}: no {kind} left for {step} at {batch_key}={batch}: {human(max(0, tight.headroom))} "
            f"available ({tight.source}), {human(tight.in_use)} in use already (model, optimizer, data) and "
            f"{human(tight.reserve)} kept in reserve; lower {lower} or {batch_key}, or use a smaller backbone{fix}")


# ---------------------------------------------------------------------------- the watchdog
class MemoryWatch:
    """While active, samples this process's CPU budget and stops it before the kernel's OOM killer does.

    When the headroom falls under half the reserve, the message is logged at once (so that it is in the log
    even if the kernel is faster) and :class:`MemoryLimitError` is raised in the main thread (delivered as
    ``SIGUSR2`` through :func:`_thread.interrupt_main`, i.e. at the main thread's next Python instruction: a long
    native operation finishes first). Devices other than the CPU raise their own out-of-memory errors and are
    not watched. Outside the main thread the watch only logs.

    Args:
        advice: what to lower, appended to the message (names the config keys).
        interval: seconds between samples.
    """

    def __init__(self, advice: str, interval: float = 0.05):
        self.advice = advice
        self.interval = interval
        self.message: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._installed = False  # our SIGUSR2 handler is in place (main thread only)
        self._old = None

    def _raise(self, signum, frame):
        raise MemoryLimitError(self.message or "memory nearly exhausted")

    def _run(self, trip: int) -> None:
        import _thread

        while not self._stop.wait(self.interval):
            b = memory_budget("cpu")
            if b.headroom >= trip:
                continue
            self.message = (f"memory nearly exhausted: {human(max(0, b.headroom))} left ({b.source}), this process "
                            f"holds {human(b.in_use)}; stopped before the kernel's OOM killer does; {self.advice}"
                            + (f"; or {b.fix}" if b.fix else ""))
            log.error("%s", self.message)
            if self._installed:
                _thread.interrupt_main(signal.SIGUSR2)
            return

    def start(self) -> "MemoryWatch":
        """Start sampling (idempotent)."""
        if self._thread is not None:
            return self
        b = memory_budget("cpu")
        trip = b.reserve // 2
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError, OSError):
                self._old = signal.signal(signal.SIGUSR2, self._raise)
                self._installed = True
        self._thread = threading.Thread(target=self._run, args=(trip,), name="pnoc-memory-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling and give SIGUSR2 its previous handler back."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._installed:
            with contextlib.suppress(ValueError, OSError):
                # None: a handler not set from Python; the default is what SIGUSR2 had then
                signal.signal(signal.SIGUSR2, self._old if self._old is not None else signal.SIG_DFL)
                self._installed = False

    def __enter__(self) -> "MemoryWatch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def fits_or_raise(what: str, projections: list[Projection], budgets: list[Budget], batch_key: str, batch: int,
                  lower: str, rank: int = 0) -> Verdict:
    """:func:`judge`, logged by rank 0; :class:`MemoryLimitError` with :func:`too_big`'s message when it does not
    fit (on every rank alike: the inputs are the gathered ones).
    """
    verdict = judge(projections, budgets)
    mine = projections[rank]
    if rank == 0:
        log.info("%s: a step of %d image(s) per process adds about %s (%s); %s available (%s; %s in use)", what,
                 mine.batch, human(mine.growth), mine.describe(), human(max(0.0, verdict.room)),
                 verdict.budget.source, human(verdict.budget.in_use))
    if not verdict.fits:
        raise MemoryLimitError(too_big(what, verdict, mine, batch_key, batch, len(projections), lower))
    return verdict

