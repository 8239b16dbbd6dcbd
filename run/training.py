"""The training epoch: batches in order, one optimizer step each, the step's losses reduced over ranks, stops and
non-finite losses handled at step boundaries (train_retrieval.py keeps the command line, the set-up and the epochs'
evaluation)."""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch

import utils
from data import DataError
from data.loaders import batches_of, worker_error_message
from models.checkpoint import LAST_CHECKPOINT
from run.checkpoints import RunState
from run.hooks import InjectedFailure, StepTrace
from run.progress import ProgressLogger
from run.stops import StopRequest
from run.tensorboard import TensorboardWriter

_logger = logging.getLogger('train_retrieval')


class NonFiniteLossError(RuntimeError):
    """A training loss was NaN or infinite; the step was not applied."""


class TrainingDataError(RuntimeError):
    """An image that passed the check before training could not be read during it (also on the retry)."""


class Preempted(Exception):
    """A stop was requested (signal or test hook) and every rank agreed to stop after this step."""


def positioned_batches(iterator, epoch: int, start: int, steps_per_epoch: int):
    """The batches of a loader's iterator; a sample that cannot be read stops the run with its epoch and step."""
    step = start
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except DataError as error:
            raise TrainingDataError(
                f'epoch {epoch} step {step} (global step {epoch * steps_per_epoch + step}): '
                f'{worker_error_message(error)}\nThe sample is not replaced by another one (that would change the '
                f'data order that --resume relies on); {LAST_CHECKPOINT} is as last saved. Restore the file, then '
                'continue with --resume auto.') from None
        yield batch
        step += 1


def train_one_epoch(model, raw_model, loader, optimizer, config: dict, state: RunState, device: torch.device,
                    autocast, stop: StopRequest, save_fn: Callable[[], None], writer: TensorboardWriter,
                    trace: StepTrace, fail_at: Optional[int]) -> dict:
    """Train the rest of `state.epoch` from `state.step`; `state` advances with every step.

    Raises Preempted after the step during which a stop was requested (on any rank), and
    NonFiniteLossError before applying a step with a non-finite loss (on any rank).
    """
    model.train()
    epoch, steps_per_epoch = state.epoch, state.steps_per_epoch
    progress = ProgressLogger(steps_per_epoch, f'Train Epoch [{epoch}]', config['log_every'])
    sums = dict(state.train_meters)
    lr = optimizer.param_groups[0]['lr']
    with batches_of(loader) as iterator:
        batches = positioned_batches(iterator, epoch, state.step, steps_per_epoch)
        for step, (image, caption, idx) in enumerate(progress.iter(batches, start=state.step), start=state.step):
            global_step = epoch * steps_per_epoch + step
            image, idx = image.to(device, non_blocking=True), idx.to(device, non_blocking=True)
            alpha = utils.ramp_alpha(config['alpha'], epoch, step, steps_per_epoch)
            tokens = raw_model.tokenize(caption)
            with utils.autocast_context(autocast):
                loss_ita, loss_itm = model(image, tokens, alpha=alpha, idx=idx)
            loss = loss_ita + loss_itm
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if fail_at == global_step + 1:
                raise InjectedFailure(f'BLIP_FAIL_AT: injected failure on rank {utils.get_rank()} at epoch {epoch} '
                                      f'step {step}')
            stop.note_step(global_step + 1)
            losses, mean_losses, stopping = reduce_step(loss_ita, loss_itm, stop.requested, device)
            if not all(map(math.isfinite, mean_losses)):  # non-finite on some rank: every rank sees it here
                raise NonFiniteLossError(nonfinite_message(epoch, step, steps_per_epoch, losses))
            optimizer.step()
            if trace.enabled:
                trace.write(epoch=epoch, step=step, lr=lr, alpha=alpha, idx=idx.tolist(), caption=list(caption),
                            loss_ita=losses[0], loss_itm=losses[1])
            progress.update(loss_ita=losses[0], loss_itm=losses[1], lr=lr)
            for name, value in (('loss_ita', mean_losses[0]), ('loss_itm', mean_losses[1]), ('lr', lr)):
                sums[name] = sums.get(name, 0.0) + value
            sums['count'] = sums.get('count', 0) + 1
            state.step, state.train_meters = step + 1, sums
            if step % config['log_every'] == 0:
                writer.add_scalars({'train/loss_ita': mean_losses[0], 'train/loss_itm': mean_losses[1], 'train/lr': lr,
                                    'train/alpha': alpha}, global_step)
            if stopping:
                raise Preempted()
            if config['save_every_steps'] and state.step % config['save_every_steps'] == 0 \
                    and state.step < steps_per_epoch:
                save_fn()
    sums = dict(sums)
    count = max(1, sums.pop('count', 1))
    return {name: value / count for name, value in sums.items()}


def reduce_step(loss_ita: torch.Tensor, loss_itm: torch.Tensor, stop_requested: bool, device: torch.device
                ) -> tuple[list[float], list[float], bool]:
    """(this rank's losses, their mean over ranks, whether any rank asked to stop): one collective, one host sync.

    The epoch's train_* statistics average the mean over ranks, as the original's synchronized meters do, so
    log.txt does not depend on which rank writes it (and every rank's running sums, saved for resume, agree).
    """
    stop_flag = torch.full((), float(stop_requested), device=device)  # a fill kernel: no host-to-device copy
    local = torch.stack([loss_ita.detach().float(), loss_itm.detach().float(), stop_flag])
    total = utils.all_reduce_sum_(local.clone())
    values = torch.cat([local, total]).cpu().tolist()
    world_size = utils.get_world_size()
    return values[:2], [v / world_size for v in values[3:5]], values[5] > 0


def nonfinite_message(epoch: int, step: int, steps_per_epoch: int, losses: list[float]) -> str:
    """Which step and whose losses went non-finite (collective call: every rank's losses are gathered)."""
    per_rank = utils.all_gather_object(losses)
    described = '; '.join(f'rank {r}: loss_ita {ita}, loss_itm {itm}' for r, (ita, itm) in enumerate(per_rank))
    return (f'non-finite loss at epoch {epoch} step {step} (global step {epoch * steps_per_epoch + step}): '
            f'{described}. The step was not applied and {LAST_CHECKPOINT} is left as it was; lower init_lr or use '
            'precision fp32, then continue with --resume auto.')
