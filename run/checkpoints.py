"""checkpoint_last.pth and checkpoint_best.pth: their payloads (written atomically), the run state with every
rank's RNG (virtual ranks included), and exact resume."""
from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

import utils
from atomic import atomic_torch_save
from config import RESULT_NEUTRAL_KEYS
from models.checkpoint import LAST_CHECKPOINT, compare_keys, read_checkpoint
from run.failures import SetupError

_logger = logging.getLogger('train_retrieval')

RESUME_KEYS = ('model', 'optimizer', 'config', 'epoch', 'step', 'best_r_mean', 'best_epoch', 'best_test',
               'train_meters', 'rng_states', 'world_size')


@dataclass
class RunState:
    """Where a fine-tune stands; saved in checkpoint_last.pth for an exact resume."""
    epoch: int = 0              # epoch in progress
    step: int = 0               # batches of `epoch` already trained
    best_r_mean: float = -1.0
    best_epoch: int = -1
    best_test: dict = field(default_factory=dict)
    best_test_seconds: Optional[float] = None  # how long the best epoch's test evaluation took
    train_meters: dict = field(default_factory=dict)  # running sums of the epoch in progress
    steps_per_epoch: int = 0
    rng: Optional[list[dict]] = None  # this process's ranks' RNG states to restore before training (resume only)


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


class RankStreams:
    """The random streams of the ranks this process plays (one, or `accum_steps` virtual ranks).

    Rank v draws dropout and hard negatives from its own stream, seeded `seed + v` when training starts (or
    restored by a resume), whether it is a process or one of several virtual ranks of a process: a run of P
    processes x accum_steps N draws what P x N processes draw. One rank's stream is simply the live RNG; several
    are swapped in and out around each use (`playing`).
    """

    def __init__(self, states: list[dict]):
        self.states = states
        if len(states) == 1:
            set_rng_state(states[0])

    @classmethod
    def seeded(cls, seed: int, ranks: range) -> 'RankStreams':
        states = []
        for rank in ranks:
            utils.seed_everything(seed + rank)
            states.append(rng_state())
        return cls(states)

    @contextlib.contextmanager
    def playing(self, j: int) -> Iterator[None]:
        """Draw from the stream of this process's j-th rank."""
        if len(self.states) == 1:
            yield
            return
        set_rng_state(self.states[j])
        yield
        self.states[j] = rng_state()

    def current(self) -> list[dict]:
        """Every stream as it stands (for checkpoint_last.pth, and to go back to the start of a step)."""
        return [rng_state()] if len(self.states) == 1 else list(self.states)

    def restore(self, states: list[dict]) -> None:
        self.states = list(states)
        if len(states) == 1:
            set_rng_state(states[0])


def save_last(path: str, model, optimizer, config: dict, state: RunState,
              streams: Optional[RankStreams] = None) -> None:
    """checkpoint_last.pth for --resume: every rank's RNG state goes in, virtual ranks in rank order
    (collective call)."""
    local = streams.current() if streams is not None else [rng_state()]
    rng_states = [rng for states in utils.all_gather_object(local) for rng in states]
    accum_steps = config.get('accum_steps', 1)
    if utils.is_main_process():
        atomic_torch_save({
            'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'config': config,
            'epoch': state.epoch, 'step': state.step, 'steps_per_epoch': state.steps_per_epoch,
            'best_r_mean': state.best_r_mean, 'best_epoch': state.best_epoch, 'best_test': state.best_test,
            'best_test_seconds': state.best_test_seconds,
            'train_meters': state.train_meters, 'rng_states': rng_states, 'world_size': utils.get_world_size(),
            'accum_steps': accum_steps,
            # The data order is a function of these alone (sampler and augmentation are seeded per epoch).
            'data_order': {'seed': config['seed'], 'epoch': state.epoch, 'start_batch': state.step,
                           'batch_size_train': config['batch_size_train'], 'world_size': utils.get_world_size(),
                           'accum_steps': accum_steps},
        }, path)
        _logger.info('Saved %s %s', path, saved_position(state, config.get('max_epoch')))


def saved_position(state: RunState, max_epoch: Optional[int]) -> str:
    """Where a checkpoint_last.pth stands, in words: epochs count from 0, and (epoch 8, step 0) is after epoch 7."""
    if state.step == 0:
        if state.epoch == 0:
            return 'before the first step'
        last = ' (the last)' if state.epoch == max_epoch else ''
        return f'after epoch {state.epoch - 1}{last}'
    if state.step == state.steps_per_epoch:
        return f"after epoch {state.epoch}'s training, before its evaluation"
    return f'after {state.step} of the {state.steps_per_epoch} steps of epoch {state.epoch}'


def save_best(path: str, model, optimizer, config: dict, epoch: int, val_r_mean: float) -> None:
    """checkpoint_best.pth: called only when val r_mean improved, so a better file is never replaced by a worse."""
    atomic_torch_save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'config': config,
                       'epoch': epoch, 'val_r_mean': val_r_mean}, path)
    _logger.info('New best val r_mean %.2f: saved %s', val_r_mean, path)


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
        utils.warn_once('Resuming with the checkpoint\'s seed %d (not %d): the data order depends on it',
                  saved['seed'], config['seed'])
        config['seed'] = saved['seed']
    # accum_steps is checked with the number of processes (load_resume_state): a run resumes exactly or not at all.
    changed = sorted(k for k in config if k in saved and saved[k] != config[k] and k != 'accum_steps')
    describe = lambda keys: ', '.join(f'{k}: {saved[k]!r} -> {config[k]!r}' for k in keys)
    neutral = [k for k in changed if k in RESULT_NEUTRAL_KEYS]
    significant = [k for k in changed if k not in RESULT_NEUTRAL_KEYS]
    if significant:
        utils.warn_once('Resuming %s with config values that differ from the checkpoint\'s, so the run is not '
                  'the one it would have been: %s', path, describe(significant))
    if neutral and utils.is_main_process():
        _logger.info('Resuming with other settings that change no result: %s', describe(neutral))


def state_dict_mismatches(model: torch.nn.Module, state_dict: dict) -> list[str]:
    """Every key that is missing, unexpected or of another shape, one line each (a resume allows none)."""
    target = model.state_dict()
    missing, unexpected, other_shape = compare_keys(target, state_dict)
    return ([f'missing: {k}' for k in missing] + [f'unexpected: {k}' for k in unexpected]
            + [f'shape: {k}: {tuple(state_dict[k].shape)} in the checkpoint, {tuple(target[k].shape)} in the model'
               for k in other_shape])


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
                     best_test_seconds=checkpoint.get('best_test_seconds'), train_meters=checkpoint['train_meters'])
    saved_world, saved_batch = checkpoint['world_size'], checkpoint['config']['batch_size_train']
    saved_accum, accum = checkpoint.get('accum_steps', 1), config['accum_steps']
    if (saved_world * saved_accum, saved_batch) == (world_size * accum, config['batch_size_train']):
        # The same ranks (virtual or not): the same data split, and each rank's own random stream.
        state.rng = checkpoint['rng_states'][rank * accum:(rank + 1) * accum]
        if (saved_world, saved_accum) != (world_size, accum) and utils.is_main_process():
            _logger.info('Resuming the %d ranks of a run of %d process(es) x accum_steps %d as %d x %d: the same '
                         'data and random streams in every step', world_size * accum, saved_world, saved_accum,
                         world_size, accum)
    elif saved_accum > 1 or accum > 1:
        raise SetupError(another_split_message(path, (saved_world, saved_accum, saved_batch),
                                               (world_size, accum, config['batch_size_train'])))
    else:
        # Same position in samples; with an unchanged global batch every global step sees the same
        # samples as before (rank r takes every world_size-th index of the same permutation).
        samples = state.step * saved_batch * saved_world
        state.step = samples // (config['batch_size_train'] * world_size)
        same_global = saved_batch * saved_world == config['batch_size_train'] * world_size
        utils.warn_once(
            'Resuming %d processes x batch %d from a checkpoint of %d x %d: weights, queues, optimizer, lr and '
            'alpha carry over; %s; the per-rank loss split and the random draws differ, so the run is not '
            'bit-identical', world_size, config['batch_size_train'], saved_world, saved_batch,
            'every global step sees the same samples' if same_global else
            f'the global batch changed, so the data order of the rest of epoch {state.epoch} differs')
        # Fresh, reproducible random streams (the saved ones belong to other ranks).
        seed = np.random.SeedSequence([config['seed'], rank, state.epoch, state.step]).generate_state(1)[0]
        utils.seed_everything(int(seed))
        state.rng = [rng_state()]
    _logger.info('Resuming from %s at epoch %d step %d (best val r_mean %.2f at epoch %d)', path, state.epoch,
                 state.step, state.best_r_mean, state.best_epoch)
    return state


def another_split_message(path: str, saved: tuple[int, int, int], now: tuple[int, int, int]) -> str:
    """Why a checkpoint of other ranks (processes x accum_steps, batch) cannot continue under accum_steps."""
    (saved_world, saved_accum, saved_batch), (world, accum, batch) = saved, now
    ranks = saved_world * saved_accum
    fits = f'accum_steps={ranks // world} with {world} process(es)' if ranks % world == 0 else \
        f'processes x accum_steps = {ranks}'
    return (f'--resume {path}: that run has {saved_world} process(es) x accum_steps {saved_accum} = {ranks} ranks of '
            f'batch_size_train {saved_batch}; this one {world} x {accum} = {world * accum} ranks of {batch}, so every '
            f'rank\'s share of the data would differ. Resume with {fits} and batch_size_train={saved_batch} (the same '
            'run, step for step), or start a new run in another --output_dir.')
