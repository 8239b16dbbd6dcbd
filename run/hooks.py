"""Test hooks (environment variables) that drive a real run into a stop or a failure; see train_retrieval.py."""
from __future__ import annotations

import json
import os
from typing import Optional

from run.failures import SetupError

STOP_AFTER_STEPS_ENV = 'BLIP_STOP_AFTER_STEPS'
STEP_TRACE_ENV = 'BLIP_STEP_TRACE'
FAIL_AT_ENV = 'BLIP_FAIL_AT'


class InjectedFailure(RuntimeError):
    """The BLIP_FAIL_AT test hook: a failure on one rank, as a bug or a CUDA error would be."""


class StepTrace:
    """The BLIP_STEP_TRACE test hook: one JSON line per training step and rank (no-op when unset)."""

    def __init__(self, prefix: Optional[str], rank: int):
        self.path = f'{prefix}.rank{rank}.jsonl' if prefix else None

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def write(self, **record) -> None:
        if self.path:
            with open(self.path, 'a') as f:
                f.write(json.dumps({**record, 'pid': os.getpid()}) + '\n')


def failure_from_env(rank: int) -> Optional[int]:
    """The BLIP_FAIL_AT=RANK:STEP test hook: the global step (1-based) at which this rank fails, or None."""
    value = os.environ.get(FAIL_AT_ENV)
    if not value:
        return None
    try:
        fail_rank, step = (int(part) for part in value.split(':'))
    except ValueError:
        raise SetupError(f'{FAIL_AT_ENV}={value!r} must be RANK:STEP, e.g. 1:5') from None
    return step if fail_rank == rank else None


def stop_after_steps_from_env() -> Optional[int]:
    value = os.environ.get(STOP_AFTER_STEPS_ENV)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise SetupError(f'{STOP_AFTER_STEPS_ENV}={value!r} must be an integer number of steps') from None
