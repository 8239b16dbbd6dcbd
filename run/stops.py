"""Stopping a run cleanly: SIGTERM/SIGUSR1 (preemption) and Ctrl-C finish the step on every rank, then save."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

import torch

import utils
from run.hooks import STOP_AFTER_STEPS_ENV

_logger = logging.getLogger('train_retrieval')

# Stop after the current step and save. SIGTERM/SIGUSR1 are how schedulers preempt; SIGINT is Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """SIGTERM/SIGUSR1 (SLURM preemption) and a first SIGINT (Ctrl-C) set a flag; the loop finishes its step,
    saves and exits. A second SIGINT aborts at once (KeyboardInterrupt), saving nothing more.

    `stop_after_steps` (the BLIP_STOP_AFTER_STEPS test hook) sets the same flag during that step.
    Use as a context manager: the previous signal handlers come back on exit.
    """

    def __init__(self, stop_after_steps: Optional[int] = None):
        self.reason: Optional[str] = None
        self.stop_after_steps = stop_after_steps
        self._previous: dict = {}
        self._reported = False

    def __enter__(self) -> 'StopRequest':
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread install them
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        else:
            _logger.warning('Not in the main thread: SIGTERM/SIGUSR1/SIGINT will not stop training gracefully')
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame) -> None:
        # No logging here: the handler may interrupt a write to the same stream.
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.reason is None:
            self.reason = signal.Signals(signum).name

    def note_step(self, steps_done: int) -> None:
        """Count a training step (1-based over the whole run) for the test hook; report a pending stop once."""
        if self.stop_after_steps is not None and steps_done >= self.stop_after_steps and self.reason is None:
            self.reason = f'{STOP_AFTER_STEPS_ENV}={self.stop_after_steps}'
        if self.reason is not None and not self._reported:
            self._reported = True
            hint = ' (Ctrl-C again to abort without saving)' if self.reason == 'SIGINT' else ''
            _logger.warning('Rank %d: %s, stopping after this step%s', utils.get_rank(), self.reason, hint)

    @property
    def requested(self) -> bool:
        return self.reason is not None

    @property
    def exit_code(self) -> int:
        return utils.EXIT_INTERRUPTED if self.reason == 'SIGINT' else utils.EXIT_PREEMPTED


def agree(flags: list[bool], device: torch.device) -> list[bool]:
    """OR of per-rank flags over all ranks, so every rank stops at the same step."""
    tensor = torch.tensor([float(f) for f in flags], device=device)
    return [bool(v) for v in utils.all_reduce_sum_(tensor).gt(0).tolist()]
