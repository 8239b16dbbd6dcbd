"""How a run fails: bad input (SetupError), a rank that fails alone (the failure watch), and one report of
each failure, with the exit code, to the console and to torchrun's error file.

The exit codes themselves are in utils.py: search.py and models.hf_export return them too.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time

import utils

_logger = logging.getLogger('train_retrieval')
LATER_SECONDS = 5  # how much later a rank that repeats another's error dates it (write_torchrun_error_file)


class SetupError(RuntimeError):
    """Bad input found before training starts; the message names the item and the fix."""


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


def start_failure_watch(dist_url: str, rank: int, world_size: int) -> None:
    """Watch the other ranks for failures (only once a process group exists; a single process has no peers)."""
    global _failure_watch
    if not utils.is_dist_initialized():
        return
    client = utils.rendezvous_store_client(dist_url)
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
    mine = {"rank": utils.get_rank() if utils.is_dist_initialized() else utils.launch_rank(), "message": message,
            "exit_code": exit_code}
    return _failure_watch.report(message, exit_code) if _failure_watch is not None else mine


def fail(message: str, exit_code: int, shared: bool = False, with_traceback: bool = False) -> int:
    """Report a failure once and tell the other ranks; returns the exit code.

    `shared`: every rank meets the same error (bad input, a non-finite loss, Ctrl-C), so only rank 0 prints it.
    Otherwise the failing rank prints its own error, unless it follows from another rank's failure reported
    first (its collective broke): then it names that one. Under torchrun the message also goes to the worker's
    error file, so that torchrun's failure summary shows it as the root cause.
    """
    rank = utils.launch_rank()
    first = report_failure(message, exit_code)  # the first failure reported by any rank
    if not shared and first['rank'] != rank:
        _logger.error('Rank %d stops because rank %s failed: %s', rank, first['rank'], first['message'])
        write_torchrun_error_file(f"stopped because rank {first['rank']} failed (see its message)", later=True)
    elif shared:
        if rank == 0:
            _logger.error('%s', message)
        write_torchrun_error_file(message if rank == 0 else 'the same error as rank 0', later=rank != 0)
    else:
        if with_traceback:
            _logger.exception('Rank %d failed: %s', rank, message)
        else:
            _logger.error('%s', message if rank == 0 else f'Rank {rank}: {message}')
        write_torchrun_error_file(message)
    return exit_code


def write_torchrun_error_file(message: str, later: bool = False) -> None:
    """torchrun's agent reads a failed worker's TORCHELASTIC_ERROR_FILE ({"message", "timestamp"}, the format of
    torch.distributed.elastic's error handler) and names the earliest as the root cause; `later` puts this rank's
    after the rank whose error it repeats. The timestamps are whole seconds and the repeating rank may write
    first (it has nothing to print), so `later` adds LATER_SECONDS: one second ties when the ranks straddle a
    second, and the agent then names whichever exited first."""
    path = os.environ.get('TORCHELASTIC_ERROR_FILE')
    if path:
        with contextlib.suppress(OSError):
            with open(path, 'w') as f:
                json.dump({'message': message, 'timestamp': int(time.time()) + LATER_SECONDS * later}, f)
