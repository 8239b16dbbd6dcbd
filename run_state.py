"""What a run writes, how a fine-tune continues and how a run ends: the output folder, the run state,
checkpoint_last.pth, exact resume, stops on signals, exit codes, failures reported once, and the test hooks.

A module of its own so that train_retrieval.py keeps to the command line and the loops; the guarantees
(atomic saves, bit-identical resume, clean stops on SIGTERM/SIGUSR1/SIGINT) are described in train_retrieval.py.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shlex
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

import utils
from config import RESULT_NEUTRAL_KEYS
from models.checkpoint import read_checkpoint

_logger = logging.getLogger('train_retrieval')

LAST_CHECKPOINT = 'checkpoint_last.pth'
BEST_CHECKPOINT = 'checkpoint_best.pth'
TRAIN_LOG = 'log.txt'
RUN_FILES = (LAST_CHECKPOINT, BEST_CHECKPOINT, TRAIN_LOG)
RESUME_KEYS = ('model', 'optimizer', 'config', 'epoch', 'step', 'best_r_mean', 'best_epoch', 'best_test',
               'train_meters', 'rng_states', 'world_size')
# Stop after the current step and save. SIGTERM/SIGUSR1 are how schedulers preempt; SIGINT is Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Exit codes (the README's table).
EXIT_PREEMPTED = 0     # SIGTERM/SIGUSR1: a clean stop; the scheduler requeues, `--resume auto` continues
EXIT_FAILED = 1        # a failure during the run: a bug, a failing rank, a full disk, a non-finite loss
EXIT_USER_ERROR = 2    # bad input found before any compute
EXIT_INTERRUPTED = 130  # SIGINT (128 + 2, the shell's convention), also after a clean save

# Test hooks (environment variables), see train_retrieval.py's docstring.
STOP_AFTER_STEPS_ENV = 'BLIP_STOP_AFTER_STEPS'
STEP_TRACE_ENV = 'BLIP_STEP_TRACE'
FAIL_AT_ENV = 'BLIP_FAIL_AT'


class SetupError(RuntimeError):
    """Bad input found before training starts; the message names the item and the fix."""


class InjectedFailure(RuntimeError):
    """The BLIP_FAIL_AT test hook: a failure on one rank, as a bug or a CUDA error would be."""


def warn_once(message: str, *args) -> None:
    """A warning from rank 0 only (other ranks log warnings too, and would repeat it)."""
    if utils.is_main_process():
        _logger.warning(message, *args)


# ---------------------------------------------------------------------------------------------- training state
@dataclass
class RunState:
    """Where a fine-tune stands; saved in checkpoint_last.pth for an exact resume."""
    epoch: int = 0              # epoch in progress
    step: int = 0               # batches of `epoch` already trained
    best_r_mean: float = -1.0
    best_epoch: int = -1
    best_test: dict = field(default_factory=dict)
    train_meters: dict = field(default_factory=dict)  # running sums of the epoch in progress
    steps_per_epoch: int = 0
    rng: Optional[dict] = None  # this rank's RNG state to restore just before training (resume only)


def rng_state() -> dict:
    """This process's torch, CUDA, numpy and Python RNG states, as tensors and lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': _plain(random.getstate()),
             'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                       'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])}}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    np_state = state['numpy']
    np.random.set_state(('MT19937', np_state['keys'].numpy().astype(np.uint32), np_state['pos'],
                         np_state['has_gauss'], np_state['cached_gaussian']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def save_last(path: str, model, optimizer, config: dict, state: RunState) -> None:
    """checkpoint_last.pth for --resume: every rank's RNG state goes in (collective call)."""
    rng_states = utils.all_gather_object(rng_state())
    if utils.is_main_process():
        utils.atomic_torch_save({
            'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'config': config,
            'epoch': state.epoch, 'step': state.step, 'steps_per_epoch': state.steps_per_epoch,
            'best_r_mean': state.best_r_mean, 'best_epoch': state.best_epoch, 'best_test': state.best_test,
            'train_meters': state.train_meters, 'rng_states': rng_states, 'world_size': utils.get_world_size(),
            # The data order is a function of these alone (sampler and augmentation are seeded per epoch).
            'data_order': {'seed': config['seed'], 'epoch': state.epoch, 'start_batch': state.step,
                           'batch_size_train': config['batch_size_train'], 'world_size': utils.get_world_size()},
        }, path)
        _logger.info('Saved %s (epoch %d, step %d)', path, state.epoch, state.step)


def resume_path(resume: Optional[str], output_dir: str) -> Optional[str]:
    """The checkpoint --resume names, or None (no --resume, or 'auto' with nothing to resume yet)."""
    if not resume:
        return None
    if resume == 'auto':
        path = os.path.join(output_dir, LAST_CHECKPOINT)
        if os.path.exists(path):
            return path
        _logger.info('--resume auto: no %s yet, starting from the beginning', path)
        return None
    if not os.path.isfile(resume):
        raise SetupError(f'--resume {resume}: file not found; pass the {LAST_CHECKPOINT} of the run to continue, '
                         f'or --resume auto for the one in --output_dir')
    return resume


def read_resume_checkpoint(path: str, allow_unsafe: bool) -> dict:
    """Read (weights_only) and sanity-check a checkpoint_last.pth."""
    checkpoint = read_checkpoint(path, allow_unsafe=allow_unsafe)
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise SetupError(f'{path} is not a {LAST_CHECKPOINT} written by this script (it lacks {", ".join(missing)}); '
                         'to fine-tune from its weights, set it as `pretrained` instead of --resume')
    return checkpoint


def adopt_resumed_config(config: dict, checkpoint: dict, path: str) -> None:
    """Keep the checkpoint's data seed (the data order depends on it); warn about changed keys that change results.

    Keys that change no number (RESULT_NEUTRAL_KEYS: logging, workers, evaluation batching...) get one info line.
    """
    saved = checkpoint['config']
    if saved.get('seed') is not None and saved['seed'] != config['seed']:
        warn_once('Resuming with the checkpoint\'s seed %d (not %d): the data order depends on it',
                  saved['seed'], config['seed'])
        config['seed'] = saved['seed']
    changed = sorted(k for k in config if k in saved and saved[k] != config[k])
    describe = lambda keys: ', '.join(f'{k}: {saved[k]!r} -> {config[k]!r}' for k in keys)
    neutral = [k for k in changed if k in RESULT_NEUTRAL_KEYS]
    significant = [k for k in changed if k not in RESULT_NEUTRAL_KEYS]
    if significant:
        warn_once('Resuming %s with config values that differ from the checkpoint\'s, so the run is not '
                  'the one it would have been: %s', path, describe(significant))
    if neutral and utils.is_main_process():
        _logger.info('Resuming with other settings that change no result: %s', describe(neutral))


def state_dict_mismatches(model: torch.nn.Module, state_dict: dict) -> list[str]:
    """Every key that is missing, unexpected or of another shape, one line each."""
    target = model.state_dict()
    lines = [f'missing: {k}' for k in target if k not in state_dict]
    lines += [f'unexpected: {k}' for k in state_dict if k not in target]
    lines += [f'shape: {k}: {tuple(v.shape)} in the checkpoint, {tuple(target[k].shape)} in the model'
              for k, v in state_dict.items() if k in target and v.shape != target[k].shape]
    return lines


def load_resume_state(checkpoint: dict, path: str, model, optimizer, config: dict, rank: int,
                      world_size: int) -> RunState:
    """Put a checkpoint_last.pth into the model and optimizer and return where the run stands."""
    mismatches = state_dict_mismatches(model, checkpoint['model'])
    if mismatches:
        shown = '\n'.join(f'  {line}' for line in mismatches[:40])
        more = f'\n  ... and {len(mismatches) - 40} more' if len(mismatches) > 40 else ''
        saved = checkpoint['config']
        raise SetupError(f'{path} is of another architecture than this config builds ({len(mismatches)} keys differ):\n'
                         f'{shown}{more}\nResume with the settings it was written with (vit={saved.get("vit")!r}, '
                         f'embed_dim={saved.get("embed_dim")}, image_size={saved.get("image_size")}, '
                         f'queue_size={saved.get("queue_size")}, med_config={saved.get("med_config")!r}) '
                         'or start a new run in another --output_dir.')
    model.load_state_dict(checkpoint['model'])
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
    except (ValueError, KeyError) as error:
        raise SetupError(f'{path}: the optimizer state does not fit this model ({error}); resume with the config '
                         'the checkpoint was written with') from None
    state = RunState(epoch=checkpoint['epoch'], step=checkpoint['step'], best_r_mean=checkpoint['best_r_mean'],
                     best_epoch=checkpoint['best_epoch'], best_test=checkpoint['best_test'],
                     train_meters=checkpoint['train_meters'])
    saved_world, saved_batch = checkpoint['world_size'], checkpoint['config']['batch_size_train']
    if (saved_world, saved_batch) == (world_size, config['batch_size_train']):
        state.rng = checkpoint['rng_states'][rank]
    else:
        # Same position in samples; with an unchanged global batch every global step sees the same
        # samples as before (rank r takes every world_size-th index of the same permutation).
        samples = state.step * saved_batch * saved_world
        state.step = samples // (config['batch_size_train'] * world_size)
        same_global = saved_batch * saved_world == config['batch_size_train'] * world_size
        warn_once(
            'Resuming %d processes x batch %d from a checkpoint of %d x %d: weights, queues, optimizer, lr and '
            'alpha carry over; %s; the per-rank loss split and the random draws differ, so the run is not '
            'bit-identical', world_size, config['batch_size_train'], saved_world, saved_batch,
            'every global step sees the same samples' if same_global else
            f'the global batch changed, so the data order of the rest of epoch {state.epoch} differs')
        # Fresh, reproducible random streams (the saved ones belong to other ranks).
        seed = np.random.SeedSequence([config['seed'], rank, state.epoch, state.step]).generate_state(1)[0]
        utils.seed_everything(int(seed))
    _logger.info('Resuming from %s at epoch %d step %d (best val r_mean %.2f at epoch %d)', path, state.epoch,
                 state.step, state.best_r_mean, state.best_epoch)
    return state


# ---------------------------------------------------------------------------------------------- stopping
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
        return EXIT_INTERRUPTED if self.reason == 'SIGINT' else EXIT_PREEMPTED


def agree(flags: list[bool], device: torch.device) -> list[bool]:
    """OR of per-rank flags over all ranks, so every rank stops at the same step."""
    tensor = torch.tensor([float(f) for f in flags], device=device)
    return [bool(v) for v in utils.all_reduce_sum_(tensor).gt(0).tolist()]


# ---------------------------------------------------------------------------------------------- the output folder
def check_output_dir(output_dir: str, resume: Optional[str], overwrite: bool) -> None:
    """An output_dir that holds another run is only used to continue it (--resume) or replace it (--overwrite)."""
    if resume and overwrite:
        raise SetupError('--resume continues the run in output_dir and --overwrite deletes it: pass only one')
    existing = [name for name in RUN_FILES if os.path.exists(os.path.join(output_dir, name))]
    if existing and not resume and not overwrite:
        raise SetupError(f'{output_dir} already holds another run ({", ".join(existing)}); pass --resume auto to '
                         'continue it, --overwrite to delete it and start afresh there, or choose another --output_dir')


def check_writable(output_dir: str) -> None:
    """Fail before any compute when output_dir cannot be written (read-only disk, no permission).

    Probes the folder, or its nearest existing parent, with a temp file that is removed at once: nothing stays.
    """
    folder = os.path.abspath(output_dir)
    while not os.path.isdir(folder):
        if os.path.exists(folder):
            raise SetupError(f'--output_dir {output_dir}: {folder} is a file, not a folder; choose another path')
        folder = os.path.dirname(folder)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix='.write-probe-')
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise SetupError(f'--output_dir {output_dir} cannot be written ({error.strerror or error} in {folder}); '
                         'point --output_dir at a writable disk') from None


def trim_log(path: str, epoch: int) -> None:
    """Keep the log records of epochs before `epoch`: a resumed run redoes the later ones (and drops a cut line)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith('\n') and isinstance(record, dict) and record.get('epoch', epoch) < epoch:
            kept.append(line)
    if len(kept) != len(lines):
        utils.atomic_write_text(path, ''.join(kept))
        _logger.warning('%s: dropped %d record(s) of epoch %d on; the resumed run writes them again',
                        path, len(lines) - len(kept), epoch)


def remove_stale_temp_files(output_dir: str) -> None:
    """Temp files of writes that a hard kill interrupted (the files they were to replace are intact)."""
    prefixes = ('.' + LAST_CHECKPOINT + '.', '.' + BEST_CHECKPOINT + '.', TRAIN_LOG + '.')
    for name in os.listdir(output_dir):
        if name.startswith(prefixes) and name.endswith('.tmp'):
            os.remove(os.path.join(output_dir, name))
            _logger.info('Removed the unfinished write %s', name)


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same arguments plus --resume auto (under the same launcher)."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ('--resume', '--overwrite'):
            skip = arg == '--resume'
        elif not arg.startswith('--resume='):
            args.append(arg)
    script = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_retrieval.py'))
    launcher = 'torchrun <the same options>' if 'TORCHELASTIC_RUN_ID' in os.environ else 'python'
    return ' '.join([launcher, shlex.quote(script), *map(shlex.quote, args), '--resume', 'auto'])


# ---------------------------------------------------------------------------------------------- test hooks
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


# ---------------------------------------------------------------------------------------------- how a run fails
def fail(message: str, exit_code: int, shared: bool = False, with_traceback: bool = False) -> int:
    """Report a failure once and tell the other ranks; returns the exit code.

    `shared`: every rank meets the same error (bad input, a non-finite loss, Ctrl-C), so only rank 0 prints it.
    Otherwise the failing rank prints its own error, unless it follows from another rank's failure reported
    first (its collective broke): then it names that one. Under torchrun the message also goes to the worker's
    error file, so that torchrun's failure summary shows it as the root cause.
    """
    rank = utils.launch_rank()
    first = utils.report_failure(message, exit_code)  # the first failure reported by any rank
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
    after the rank whose error it repeats."""
    path = os.environ.get('TORCHELASTIC_ERROR_FILE')
    if path:
        with contextlib.suppress(OSError):
            with open(path, 'w') as f:
                json.dump({'message': message, 'timestamp': int(time.time()) + int(later)}, f)
