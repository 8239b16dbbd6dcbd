"""TensorBoard scalars of a run, written by rank 0 (a no-op elsewhere)."""
from __future__ import annotations

import logging
from typing import Any

import utils
from run.progress import _to_float

_logger = logging.getLogger(__name__)


class TensorboardWriter:
    """Scalar logging to TensorBoard on rank 0; a no-op elsewhere, without a log_dir,
    or when tensorboard is not installed."""

    def __init__(self, log_dir: str | None, purge_step: int | None = None) -> None:
        """``purge_step``: a resumed run's first step; events an earlier run wrote from there on are dropped,
        so the replayed steps do not show twice."""
        self._writer = None
        if log_dir is None or not utils.is_main_process():
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
