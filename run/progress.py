"""Progress of the training and evaluation loops: periodic lines with smoothed losses, speed and ETA (rank 0)."""
from __future__ import annotations

import logging
import time
from collections import deque
from datetime import timedelta
from typing import Any, Iterable, Iterator

import torch

import utils

_logger = logging.getLogger(__name__)


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
        self.counts: dict[str, int] = {}  # events counted over the loop, shown once they happened
        self.step_time = SmoothedValue()
        self._start = time.time()
        self._last_logged: int | None = None

    def update(self, **scalars: Any) -> None:
        """Record scalars (floats, ints or one-element tensors) for the current step."""
        for name, value in scalars.items():
            self.meters.setdefault(name, SmoothedValue()).update(_to_float(value))

    def add_count(self, name: str, count: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + count

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
        parts += [f"{name} {count}" for name, count in self.counts.items()]
        parts.append(f"time {per_step:.3f} s/it")
        return " ".join(parts)

    def log(self, step: int) -> None:
        """Emit the progress line for ``step`` on rank 0 (once per step)."""
        if step == self._last_logged:
            return
        self._last_logged = step
        if utils.is_main_process():
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
        if utils.is_main_process():
            _logger.info("%s total time %s (%.3f s/it)", self.header,
                         timedelta(seconds=int(total)), total / max(1, step + 1 - start))
