"""Shared runtime helpers: distributed setup, collectives and failure handling, logging, LR schedule,
progress reporting, atomic file writes, seeding and TensorBoard.

This is the only module in the project that imports ``torch.distributed``; every
helper works without a process group (rank 0, world size 1, collectives are no-ops).
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import secrets
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

_logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- #
# Distributed setup
# --------------------------------------------------------------------------- #
class LaunchError(RuntimeError):
    """The launch environment cannot work (no GPU, a half-set SLURM environment); the message says the fix."""


@dataclass
class DistInfo:
    """Where this process sits in the job and which device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def _slurm_master_addr() -> str:
    """First host of the SLURM allocation, used as the rendezvous address."""
    launch_ip = os.environ.get("SLURM_LAUNCH_NODE_IPADDR")
    if launch_ip:
        return launch_ip
    nodelist = os.environ.get("SLURM_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if nodelist:
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                check=True, capture_output=True, text=True, timeout=60,
            ).stdout.split()
        except (OSError, subprocess.SubprocessError) as err:
            raise LaunchError(
                f"could not resolve MASTER_ADDR from SLURM_NODELIST={nodelist!r} "
                f"with `scontrol show hostnames` ({err}); export MASTER_ADDR yourself"
            ) from err
        if out:
            return out[0]
    raise LaunchError(
        "running under SLURM but MASTER_ADDR is not set and neither "
        "SLURM_LAUNCH_NODE_IPADDR nor SLURM_NODELIST is available; export MASTER_ADDR"
    )


def _read_launch_env() -> tuple[int, int, int, str]:
    """Return (rank, world_size, local_rank, launcher) from torchrun or SLURM env vars.

    launcher is 'torchrun', 'slurm' or 'none'. For SLURM with more than one task,
    MASTER_ADDR is filled in (when unset) and MASTER_PORT must be set.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
        return _env_int("RANK"), _env_int("WORLD_SIZE"), local_rank, "torchrun"
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        rank, world_size = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
        local_rank = _env_int("SLURM_LOCALID") if "SLURM_LOCALID" in os.environ else 0
        if world_size > 1:
            if not os.environ.get("MASTER_ADDR"):
                os.environ["MASTER_ADDR"] = _slurm_master_addr()
            if not os.environ.get("MASTER_PORT"):
                raise LaunchError(
                    "running under SLURM with several tasks but MASTER_PORT is not set; "
                    "export MASTER_PORT=<free port, e.g. 29500> in the job script"
                )
        return rank, world_size, local_rank, "slurm"
    return 0, 1, 0, "none"


def init_distributed(device: str = "cuda", dist_url: str = "env://",
                     timeout_minutes: int = 60) -> DistInfo:
    """Set up the process group from torchrun/SLURM env vars (if any) and pick the device.

    A single process (no launcher, or a world size of 1) gets no process group and
    ``distributed=False``. The backend is nccl for CUDA and gloo otherwise. The timeout
    is long because rank 0 may spend a long time in evaluation while others wait.
    """
    rank, world_size, local_rank, launcher = _read_launch_env()
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LaunchError("--device cuda (the default) but CUDA is not available on this machine "
                              f"(torch {torch.__version__}); run with --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible on "
                              "this node; start at most that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)

    distributed = world_size > 1
    if distributed and not is_dist_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        _logger.info("init process group: %s rank %d/%d (local %d) backend %s via %s",
                     launcher, rank, world_size, local_rank, backend, dist_url)
        kwargs: dict[str, Any] = {}
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # binds NCCL to this GPU, avoids device guessing
        timeout = timedelta(minutes=timeout_minutes)
        store = _attempt_store(dist_url, timeout)
        if store is not None:
            kwargs["store"] = store
        else:
            kwargs["init_method"] = dist_url
        dist.init_process_group(backend=backend, world_size=world_size, rank=rank, timeout=timeout, **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank,
                    device=dev, distributed=distributed)


def _attempt_store(dist_url: str, timeout: timedelta):
    """Under torchrun, the agent's store with keys of this attempt only (None otherwise: init_method does it).

    torchrun's static rendezvous keeps one store for all restarts, and the process group writes no attempt prefix
    there: a restarted rank could read the address its dead peer published and fail to connect to it.
    """
    if not (dist_url.startswith("env://") and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore("blip/attempt_{}".format(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), store)


def destroy_distributed(failed: bool = False) -> None:
    """Tear down the process group if one exists.

    After a clean run every rank waits for the others first, so that the rank hosting the rendezvous store
    does not take it away while another rank still watches it (run.failures). After a failure nobody waits:
    the other ranks may be gone.
    """
    if is_dist_initialized():
        if not failed:
            barrier()
        dist.destroy_process_group()


def is_dist_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def _uses_nccl() -> bool:
    return is_dist_initialized() and dist.get_backend() == "nccl"


def barrier() -> None:
    """Wait for all ranks; no-op without a process group."""
    if not is_dist_initialized():
        return
    if _uses_nccl():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


# --------------------------------------------------------------------------- #
# Collectives
# --------------------------------------------------------------------------- #
def _gather_equal(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (all of one shape) concatenated along dim 0 in rank order."""
    gathered = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(gathered, t)
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def all_gather_cat(t: torch.Tensor, equal_sizes: bool = False) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0 (rank order), without gradients.

    First dims may differ across ranks: sizes are gathered first, every rank pads
    to the largest size, and padding is trimmed after the gather. ``equal_sizes=True``
    (every rank passes the same shape, as in a training step) skips that exchange and
    its wait for the device.
    """
    world_size = get_world_size()
    if world_size == 1:
        return t
    t = t.detach().contiguous()
    if equal_sizes:
        return _gather_equal(t)
    local_size = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(local_size) for _ in range(world_size)]
    dist.all_gather(sizes, local_size)
    sizes_list = [int(s.item()) for s in sizes]
    max_size = max(sizes_list)
    if max_size == 0:
        return t
    if t.shape[0] < max_size:
        pad = t.new_zeros((max_size - t.shape[0], *t.shape[1:]))
        t = torch.cat([t, pad], dim=0)
    return torch.cat([g[:n] for g, n in zip(_gather_equal(t).split(max_size), sizes_list)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands every rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        ctx.local_size = t.shape[0]
        return _gather_equal(t.contiguous())

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        # Every rank's loss may depend on every slice, so sum the grads from all ranks.
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_size
        return grad[start:start + ctx.local_size]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally sized tensors from every rank along dim 0, keeping autograd.

    Gradients of the result flow back to each rank's own slice (summed over ranks).
    All ranks must pass the same shape.
    """
    if get_world_size() == 1:
        return t
    return _AllGatherWithGrad.apply(t)


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` across ranks in place and return it; no-op without a process group."""
    if is_dist_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s picklable ``obj`` on every rank."""
    if not is_dist_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Return a list with every rank's picklable ``obj`` in rank order."""
    if not is_dist_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_main(fn: Callable[[], Any], expected: tuple[type[BaseException], ...]) -> Any:
    """Run ``fn`` on rank 0 only; every rank gets its result, or raises its error if it is one of ``expected``.

    No rank is left waiting: an expected error travels to every rank (an unexpected one ends rank 0, and the
    failure watch ends the others).
    """
    result, error = None, None
    if is_main_process():
        try:
            result = fn()
        except expected as exc:
            error = exc
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def launch_rank() -> int:
    """This process's rank as the launcher set it: known before the process group exists."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


# --------------------------------------------------------------------------- #
# A rank that fails alone
# --------------------------------------------------------------------------- #
class FailureWatch:
    """Ends every rank within seconds when one rank fails, whoever launched them.

    A failing rank calls :meth:`report`: its rank, error and exit code go to the rendezvous store (the first
    report wins, so the root cause is kept). A thread on every rank polls the store; on a peer's report, or when
    the store itself is gone (its host, rank 0 or torchrun's agent, has died), it logs the failing rank's error and
    ends its own process with ``os._exit``: the main thread may be blocked in a collective with the failed rank,
    which NCCL waits out for the process group's timeout (60 minutes). torchrun's agent would stop the other
    workers too; a plain ``srun`` launch has no agent.
    """

    ACK_WAIT_SECONDS = 5.0  # how long a failing rank waits for the others to have read its report

    def __init__(self, store, rank: int, world_size: int, prefix: str, poll_seconds: float = 0.5) -> None:
        self._store = store
        self.rank = rank
        self.world_size = world_size
        self._key, self._ack_key = f"{prefix}/failure", f"{prefix}/acknowledged"
        self._poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._handled = threading.Event()  # this rank knows of the failure (its own, or a peer's it acted on)
        self._thread = threading.Thread(target=self._watch, name="failure-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, message: str, exit_code: int) -> dict:
        """Record this rank's failure (unless another came first) and return the failure that counts."""
        self._handled.set()  # from now on this rank's main thread ends the process itself
        mine = json.dumps({"rank": self.rank, "message": message, "exit_code": exit_code})
        try:
            first = json.loads(self._store.compare_set(self._key, "", mine))
            self._store.add(self._ack_key, 1)
            deadline = time.monotonic() + self.ACK_WAIT_SECONDS
            # Without torchrun rank 0 hosts the store: leaving at once would take the report away with it.
            while self.rank == 0 and self._store.add(self._ack_key, 0) < self.world_size \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
        except Exception:  # the store is gone: nobody else to tell
            return json.loads(mine)
        return first

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            try:
                if not self._store.check([self._key]):
                    continue
                failure = json.loads(self._store.get(self._key))
                self._store.add(self._ack_key, 1)
            except Exception as error:
                if self._stop.is_set():
                    return
                failure = {"rank": None, "exit_code": 1, "message": "lost contact with the rendezvous store: the "
                           f"process hosting it (rank 0, or torchrun's agent) has ended ({error})"}
            if self._handled.is_set() or failure["rank"] == self.rank:
                return
            self._handled.set()
            who = "a peer" if failure["rank"] is None else f"rank {failure['rank']}"
            _logger.error("Rank %d stops because %s failed: %s", self.rank, who, failure["message"])
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(failure["exit_code"] or 1)


_failure_watch: FailureWatch | None = None


def _store_address(dist_url: str) -> tuple[str, int] | None:
    """Host and port of the rendezvous TCP store (env:// or tcp://), or None for other rendezvous kinds."""
    if dist_url.startswith("env://"):
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        return (host, int(port)) if host and port else None
    if dist_url.startswith("tcp://"):
        host, _, port = dist_url[len("tcp://"):].rpartition(":")
        return host.strip("[]"), int(port)
    return None


def rendezvous_store_client(dist_url: str) -> tuple[Any, str] | None:
    """A client connection of its own to the rendezvous TCP store and a key prefix for this attempt, or None.

    For the failure watch (run.failures): the process group's store is not meant to be shared with another
    thread. torchrun's agent keeps its store across restarts, so each attempt gets its own prefix.
    """
    address = _store_address(dist_url)
    if address is None:
        return None
    store = dist.TCPStore(address[0], address[1], is_master=False, timeout=timedelta(seconds=30),
                          wait_for_workers=False)
    prefix = "blip/{}/{}".format(os.environ.get("TORCHELASTIC_RUN_ID", "job"),
                                 os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return store, prefix


def start_failure_watch(dist_url: str, rank: int, world_size: int) -> None:
    """Watch the other ranks for failures (only once a process group exists; a single process has no peers)."""
    global _failure_watch
    if not is_dist_initialized():
        return
    client = rendezvous_store_client(dist_url)
    if client is None:
        _logger.warning("rendezvous %s has no TCP store: a rank that fails alone may leave the others waiting "
                        "for the process group timeout", dist_url)
        return
    store, prefix = client
    _failure_watch = FailureWatch(store, rank, world_size, prefix)
    _failure_watch.start()


def stop_failure_watch() -> None:
    """Stop watching (before the process group goes: its store host may leave first)."""
    global _failure_watch
    if _failure_watch is not None:
        _failure_watch.stop()
        _failure_watch = None


def report_failure(message: str, exit_code: int) -> dict:
    """Tell the other ranks that this one fails; returns the failure that counts (the first reported).

    Without a process group (or a store) it is this rank's own failure.
    """
    # Before the process group exists (it may be what failed), the launcher's rank is this rank's.
    mine = {"rank": get_rank() if is_dist_initialized() else launch_rank(), "message": message,
            "exit_code": exit_code}
    return _failure_watch.report(message, exit_code) if _failure_watch is not None else mine


# --------------------------------------------------------------------------- #
# Logging
# --------------------------------------------------------------------------- #
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"
_HANDLER_TAG = "_blip_setup_logging"


def setup_logging(output_dir: str | None = None, rank: int = 0) -> None:
    """Configure the root logger: INFO to stdout (and output_dir/train.log) on rank 0,
    WARNING only on other ranks. Calling it again replaces the handlers it added."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            root.removeHandler(handler)
            handler.close()
    level = logging.INFO if rank == 0 else logging.WARNING
    root.setLevel(level)
    formatter = logging.Formatter(_LOG_FORMAT, datefmt=_LOG_DATEFMT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if output_dir is not None and rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, "train.log"), mode="a"))
    for handler in handlers:
        handler.setLevel(level)
        handler.setFormatter(formatter)
        setattr(handler, _HANDLER_TAG, True)
        root.addHandler(handler)


# --------------------------------------------------------------------------- #
# Schedules
# --------------------------------------------------------------------------- #
def cosine_lr(epoch: int, max_epoch: int, init_lr: float, min_lr: float) -> float:
    """Cosine decay from init_lr (epoch 0) to min_lr (epoch max_epoch), set once per epoch."""
    if max_epoch <= 0:
        return init_lr
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def ramp_alpha(alpha: float, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Distillation weight: linear warm-up over the first epoch, then constant."""
    if epoch > 0 or steps_per_epoch <= 0:
        return alpha
    return alpha * min(1.0, step / steps_per_epoch)


# --------------------------------------------------------------------------- #
# Progress reporting
# --------------------------------------------------------------------------- #
class SmoothedValue:
    """Tracks a scalar: recent window (median/avg/latest) and the running global average."""

    def __init__(self, window: int = 20) -> None:
        self.window: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.total += value * n
        self.count += n

    @property
    def value(self) -> float:
        return self.window[-1] if self.window else 0.0

    @property
    def median(self) -> float:
        if not self.window:
            return 0.0
        ordered = sorted(self.window)
        return ordered[(len(ordered) - 1) // 2]

    @property
    def avg(self) -> float:
        return sum(self.window) / len(self.window) if self.window else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else 0.0


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().item())
    return float(value)


class ProgressLogger:
    """Periodic progress lines on rank 0, e.g.
    ``Train Epoch [0] [  50/906] eta 0:12:31 loss_ita 3.1234 (3.3000) lr 0.000010 time 0.812 s/it``.

    Scalars whose name starts with ``lr`` are shown as their latest value; others as
    window median (global average). Use ``for batch in progress.iter(loader)`` to time
    steps and log automatically every ``log_every`` steps and at the last step.
    """

    def __init__(self, total_steps: int, header: str, log_every: int = 50) -> None:
        self.total_steps = total_steps
        self.header = header
        self.log_every = max(1, log_every)
        self.meters: dict[str, SmoothedValue] = {}
        self.step_time = SmoothedValue()
        self._start = time.time()
        self._last_logged: int | None = None

    def update(self, **scalars: Any) -> None:
        """Record scalars (floats, ints or one-element tensors) for the current step."""
        for name, value in scalars.items():
            self.meters.setdefault(name, SmoothedValue()).update(_to_float(value))

    def _seconds_per_step(self, step: int) -> float:
        if self.step_time.count:
            return self.step_time.avg
        return (time.time() - self._start) / max(1, step + 1)

    def format_line(self, step: int) -> str:
        width = len(str(self.total_steps))
        per_step = self._seconds_per_step(step)
        eta = timedelta(seconds=int(per_step * max(0, self.total_steps - step - 1)))
        parts = [f"{self.header} [{step:>{width}}/{self.total_steps}] eta {eta}"]
        for name, meter in self.meters.items():
            if name.startswith("lr"):
                parts.append(f"{name} {meter.value:.6f}")
            else:
                parts.append(f"{name} {meter.median:.4f} ({meter.global_avg:.4f})")
        parts.append(f"time {per_step:.3f} s/it")
        return " ".join(parts)

    def log(self, step: int) -> None:
        """Emit the progress line for ``step`` on rank 0 (once per step)."""
        if step == self._last_logged:
            return
        self._last_logged = step
        if is_main_process():
            _logger.info(self.format_line(step))

    def iter(self, iterable: Iterable[Any], start: int = 0) -> Iterator[Any]:
        """Yield from ``iterable``, timing each step (data + compute) and logging periodically.

        ``start``: number of the first step (an epoch resumed mid-way counts on from there).
        """
        self._start = time.time()
        tick = self._start
        step = start - 1
        for step, item in enumerate(iterable, start=start):
            yield item
            now = time.time()
            self.step_time.update(now - tick)
            tick = now
            if step % self.log_every == 0 or step == self.total_steps - 1:
                self.log(step)
        total = time.time() - self._start
        if is_main_process():
            _logger.info("%s total time %s (%.3f s/it)", self.header,
                         timedelta(seconds=int(total)), total / max(1, step + 1 - start))


# --------------------------------------------------------------------------- #
# Files, seeding, TensorBoard
# --------------------------------------------------------------------------- #
class DiskWriteError(RuntimeError):
    """A file could not be written (disk full, read-only file system, quota); the previous file is intact."""

    def __init__(self, errno_value: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_value


# errno values that a user fixes by making room or pointing the output elsewhere, not by changing code.
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}


def human_bytes(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as df -H prints them)."""
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the tensor storages in a nested checkpoint, each counted once: about what torch.save writes."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` that never leaves a partial file at ``path``.

    Writes to a temp file in the same directory, fsyncs it and renames it over
    ``path``; on any failure the temp file is removed and ``path`` is untouched.
    A full disk or read-only file system raises :class:`DiskWriteError` with the space the file needs.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(
        directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.makedirs(directory, exist_ok=True)
        # O_EXCL: never clobber someone else's temp file; mode 0o666 honours the umask.
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as error:
        try:
            os.remove(tmp_path)
        except OSError:
            pass
        if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
            needed = _tensor_bytes(obj)
            kept = "the previous file is unchanged" if os.path.exists(path) else "nothing was written"
            raise DiskWriteError(error.errno, f"cannot write {path} ({os.strerror(error.errno)}): it needs about "
                                 f"{human_bytes(needed)} ({needed:,} bytes) in {directory}; {kept}. Free that "
                                 "much space there or point --output_dir at a writable disk with room") from None
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Replace a file in one step (temp file beside it, fsync, rename): never a partial file at `path`."""
    tmp_path = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp_path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def append_json(path: str, record: dict) -> None:
    """Append one JSON line and make it durable (a metrics record survives a crash right after it)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: str) -> None:
    """Persist the rename itself (best effort; not possible on every platform)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def seed_everything(seed: int) -> None:
    """Seed python's random, numpy (if installed) and torch (CPU and all GPUs)."""
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TensorboardWriter:
    """Scalar logging to TensorBoard on rank 0; a no-op elsewhere, without a log_dir,
    or when tensorboard is not installed."""

    def __init__(self, log_dir: str | None, purge_step: int | None = None) -> None:
        """``purge_step``: a resumed run's first step; events an earlier run wrote from there on are dropped,
        so the replayed steps do not show twice."""
        self._writer = None
        if log_dir is None or not is_main_process():
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            _logger.warning("tensorboard is not installed; scalars will not be written")
            return
        self._writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def add_scalars(self, scalars: dict[str, Any], step: int) -> None:
        """Write each ``name: value`` pair as its own scalar series at ``step``."""
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, _to_float(value), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# --------------------------------------------------------------------------- #
# Numerical precision
# --------------------------------------------------------------------------- #
def configure_precision(precision: str, device: torch.device):
    """Set matmul precision for ``precision`` (fp32 | tf32 | bf16); return an autocast factory or None.

    tf32 is what the original ran with on A100s (PyTorch's default then); bf16 autocasts on top of it.
    """
    if precision not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"precision must be fp32, tf32 or bf16; got {precision!r}")
    allow_tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    if precision != "bf16":
        return None
    device_type = device.type
    return lambda: torch.autocast(device_type, dtype=torch.bfloat16)
