"""Shared runtime helpers, as the original's utils.py: process group and collectives, logging, LR schedule,
seeding, precision, and the exit codes every command returns.

This is the only module in the project that imports ``torch.distributed``; every
helper works without a process group (rank 0, world size 1, collectives are no-ops).
"""
from __future__ import annotations

import contextlib
import logging
import logging.handlers
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

_logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- #
# Exit codes (the README's table): train_retrieval.py, search.py and models.hf_export return them
# --------------------------------------------------------------------------- #
EXIT_PREEMPTED = 0     # SIGTERM/SIGUSR1: a clean stop; the scheduler requeues, `--resume auto` continues
EXIT_FAILED = 1        # a failure during the run: a bug, a failing rank, a full disk, a non-finite loss
EXIT_USER_ERROR = 2    # bad input found before any compute
EXIT_INTERRUPTED = 130  # SIGINT (128 + 2, the shell's convention), also after a clean save

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


# --------------------------------------------------------------------------- #
# Logging
# --------------------------------------------------------------------------- #
_HANDLER_TAG = "_blip_setup_logging"  # its value: 'console', or 'file' (train.log, or the records kept for it)
BARE = {"bare": True}  # `logger.info(text, extra=BARE)`: a closing summary, shown on the console as it is


class _Formatter(logging.Formatter):
    def __init__(self, console: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        self.console = console

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage() if self.console and getattr(record, "bare", False) else super().format(record)


def setup_logging(output_dir: str | None = None, rank: int = 0) -> None:
    """Configure the root logger: INFO to stdout and output_dir/train.log on rank 0, WARNING only on other ranks.
    Until output_dir is given (None: the folder may not be written yet), rank 0 keeps its records and writes them
    at the top of train.log then: the log starts with the console's first line. A new call replaces the handlers."""
    root, early = logging.getLogger(), []
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_TAG, None)]:
        early += getattr(handler, "buffer", [])
        root.removeHandler(handler)
        handler.close()
    level = logging.INFO if rank == 0 else logging.WARNING
    root.setLevel(level)
    handlers: dict[logging.Handler, str] = {logging.StreamHandler(sys.stdout): "console"}
    if rank == 0 and output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        handlers[logging.FileHandler(os.path.join(output_dir, "train.log"), mode="a")] = "file"
    elif rank == 0:  # keeps the records (flushLevel above CRITICAL: it never flushes by level, and has no target)
        handlers[logging.handlers.MemoryHandler(10 ** 6, flushLevel=logging.CRITICAL + 1)] = "file"
    for handler, kind in handlers.items():
        handler.setLevel(level)
        handler.setFormatter(_Formatter(console=kind == "console"))
        setattr(handler, _HANDLER_TAG, kind)
        root.addHandler(handler)
        for record in early if kind == "file" else []:
            handler.handle(record)


def warn_once(message: str, *args) -> None:
    """A warning from rank 0 only (other ranks log warnings too, and would repeat it)."""
    if is_main_process():
        logging.getLogger('train_retrieval').warning(message, *args)

# --------------------------------------------------------------------------- #
# Schedules and seeding
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


def seed_everything(seed: int) -> None:
    """Seed python's random, numpy and torch (CPU and all GPUs)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def autocast_context(autocast: Callable | None):
    """The context of `configure_precision`'s factory (bf16 autocast), or one that changes nothing (None)."""
    return autocast() if autocast is not None else contextlib.nullcontext()
