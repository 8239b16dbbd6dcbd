"""The training epoch: batches in order, one optimizer step each, the step's losses reduced over ranks, stops and
non-finite losses handled at step boundaries (train_retrieval.py keeps the command line, the set-up and the epochs'
evaluation)."""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable, Optional

import torch

import utils
from data import DataError
from data.loaders import batches_of, worker_error_message
from models.blip_retrieval import Ranks
from models.checkpoint import LAST_CHECKPOINT
from models.virtual_ranks import VirtualStep
from run.checkpoints import RankStreams, RunState
from run.hooks import InjectedFailure, StepTrace
from run.progress import ProgressLogger
from run.stops import StopRequest
from run.tensorboard import TensorboardWriter

_logger = logging.getLogger('train_retrieval')

LEFT_OUT = 'itm_negatives_left_out'  # log.txt's train_itm_negatives_left_out: a count over the epoch, not a mean


class NonFiniteLossError(RuntimeError):
    """A training loss was NaN or infinite; the step was not applied."""


class TrainingDataError(RuntimeError):
    """An image that passed the check before training could not be read during it (also on the retry)."""


class Preempted(Exception):
    """A stop was requested (signal or test hook) and every rank agreed to stop after this step."""


def positioned_steps(iterator, epoch: int, start: int, steps_per_epoch: int, accum_steps: int):
    """The steps of a loader's iterator, `accum_steps` batches each; a sample that cannot be read stops the run with
    its epoch and step."""
    step = start
    while True:
        try:
            batch = [next(iterator) for _ in range(accum_steps)]
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
                    traces: list[StepTrace], fail_at: Optional[int], streams: RankStreams) -> dict:
    """Train the rest of `state.epoch` from `state.step`; `state` advances with every optimizer step.

    With `accum_steps` N each step is N micro-batches, one per rank this process plays (`streams`, `traces`).
    Raises Preempted after the step during which a stop was requested (on any rank), and
    NonFiniteLossError before applying a step with a non-finite loss (on any rank).
    """
    model.train()
    epoch, steps_per_epoch, accum_steps = state.epoch, state.steps_per_epoch, config['accum_steps']
    header = f'Train Epoch [{epoch}]'
    if accum_steps > 1:
        global_batch = config['batch_size_train'] * utils.get_world_size() * accum_steps
        header += f' (accum_steps {accum_steps}, global batch {global_batch})'
    progress = ProgressLogger(steps_per_epoch, header, config['log_every'])
    sums = dict(state.train_meters)
    lr = optimizer.param_groups[0]['lr']
    with batches_of(loader) as iterator:
        steps = positioned_steps(iterator, epoch, state.step, steps_per_epoch, accum_steps)
        for step, micro_batches in enumerate(progress.iter(steps, start=state.step), start=state.step):
            global_step = epoch * steps_per_epoch + step
            alpha = utils.ramp_alpha(config['alpha'], epoch, step, steps_per_epoch)
            optimizer.zero_grad(set_to_none=True)
            if accum_steps == 1:
                step_losses, no_negative = one_step(model, raw_model, micro_batches[0], alpha, autocast, device)
            else:  # the test hook's stop arrives after the first micro-batch: it must wait for the end of the step
                step_losses, no_negative = accumulated_step(model, raw_model, micro_batches, alpha, autocast, device,
                                                            streams, lambda: stop.note_step(global_step + 1))
            if fail_at == global_step + 1:
                raise InjectedFailure(f'BLIP_FAIL_AT: injected failure on rank {utils.get_rank()} at epoch {epoch} '
                                      f'step {step}')
            stop.note_step(global_step + 1)
            losses, mean_losses, left_out, stopping = reduce_step(step_losses, no_negative, stop.requested, device)
            if not all(map(math.isfinite, mean_losses)):  # non-finite on some rank: every rank sees it here
                raise NonFiniteLossError(nonfinite_message(epoch, step, steps_per_epoch, losses))
            optimizer.step()
            for trace, (_, caption, idx), (loss_ita, loss_itm) in zip(traces, micro_batches, losses):
                if trace.enabled:
                        trace.write(epoch=epoch, step=step, lr=lr, alpha=alpha, idx=idx.tolist(), caption=list(caption),
                                loss_ita=loss_ita, loss_itm=loss_itm)
            progress.update(loss_ita=sum(r[0] for r in losses) / len(losses),
                            loss_itm=sum(r[1] for r in losses) / len(losses), lr=lr)
            if left_out:
                progress.add_count('itm_negatives_left_out', left_out)
                if not sums.get(LEFT_OUT):
                    utils.warn_once('Epoch %d step %d: %d matching negative pair(s) left out of loss_itm: no '
                                    'candidate of another image (README: "A batch without a negative"); log.txt '
                                    'counts them in train_%s', epoch, step, left_out, LEFT_OUT)
            for name, value in (('loss_ita', mean_losses[0]), ('loss_itm', mean_losses[1]), ('lr', lr),
                                (LEFT_OUT, left_out)):
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
    left_out = int(sums.pop(LEFT_OUT, 0))
    return {**{name: value / count for name, value in sums.items()}, LEFT_OUT: left_out}


def one_step(model, raw_model, batch, alpha: float, autocast, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one batch: its (1, 2) losses and how many negative pairs had no candidate."""
    image, caption, idx = batch
    ranks = Ranks()
    with utils.autocast_context(autocast):
        loss_ita, loss_itm = model(image.to(device, non_blocking=True), raw_model.tokenize(caption), alpha=alpha,
                                   idx=idx.to(device, non_blocking=True), ranks=ranks)
    (loss_ita + loss_itm).backward()
    return torch.stack([loss_ita.detach().float(), loss_itm.detach().float()])[None], ranks.no_negative.sum()


def accumulated_step(model, raw_model, micro_batches: list, alpha: float, autocast, device: torch.device,
                     streams: RankStreams, after_first: Callable[[], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step as the ranks of the micro-batches would compute it (models/virtual_ranks.py).

    Each micro-batch runs with its rank's random stream. Gradients add up over the micro-batches and are synced
    across processes once, by the last backward (DDP's no_sync for the others); DDP averages over processes,
    the division by accum_steps here makes the mean over all ranks that DDP over P x N processes would take.
    """
    accum_steps = len(micro_batches)
    step = VirtualStep(raw_model, accum_steps)
    tokens = [raw_model.tokenize(caption) for _, caption, _ in micro_batches]
    # One micro-batch's images on the device at a time: memory does not grow with accum_steps.
    images = lambda j: micro_batches[j][0].to(device, non_blocking=True)
    idx = [micro_batch[2].to(device, non_blocking=True) for micro_batch in micro_batches]
    step.begin()
    if step.all_rank:  # pass 1: the step's candidates and what each rank's loss sends to the others' images
        start = streams.current()
        with utils.autocast_context(autocast):
            for j in range(accum_steps):
                with streams.playing(j):
                    step.probe(j, images(j), *tokens[j], idx[j])
            step.share_probes()
            for j in range(accum_steps):
                with streams.playing(j):
                    step.probe_negatives(j)
        step.share_received_gradients()
        streams.restore(start)
    losses, no_negative = [], []
    no_sync = getattr(model, 'no_sync', contextlib.nullcontext)
    for j in range(accum_steps):
        ranks = step.rank(j)
        with streams.playing(j), (no_sync() if j < accum_steps - 1 else contextlib.nullcontext()):
            with utils.autocast_context(autocast):
                loss_ita, loss_itm = model(images(j), tokens[j], alpha=alpha, idx=idx[j], ranks=ranks)
            (loss_ita + loss_itm).backward()
        losses.append(torch.stack([loss_ita.detach().float(), loss_itm.detach().float()]))
        no_negative.append(ranks.no_negative.sum())
        if j == 0:
            after_first()
    step.finish()
    grads = [p.grad for p in raw_model.parameters() if p.grad is not None]
    torch._foreach_mul_(grads, 1.0 / accum_steps)
    return torch.stack(losses), torch.stack(no_negative).sum()


def reduce_step(losses: torch.Tensor, no_negative: torch.Tensor, stop_requested: bool, device: torch.device
                ) -> tuple[list[list[float]], list[float], int, bool]:
    """(the losses of this process's ranks, their mean over every rank, the step's negative pairs without a
    candidate on all ranks, whether any rank asked to stop): one collective, one host sync.

    The epoch's train_* statistics average the mean over ranks, as the original's synchronized meters do, so
    log.txt does not depend on which rank writes it (and every rank's running sums, saved for resume, agree).
    """
    stop_flag = torch.full((1,), float(stop_requested), device=device)  # a fill kernel: no host-to-device copy
    local = torch.cat([losses.sum(dim=0), no_negative.float().view(1), stop_flag])
    total = utils.all_reduce_sum_(local)
    values = torch.cat([losses.flatten(), total]).cpu().tolist()
    per_rank, (ita, itm, left_out, stop) = values[:losses.numel()], values[losses.numel():]
    ranks = utils.get_world_size() * losses.shape[0]
    return [per_rank[i:i + 2] for i in range(0, len(per_rank), 2)], [ita / ranks, itm / ranks], int(left_out), stop > 0


def nonfinite_message(epoch: int, step: int, steps_per_epoch: int, losses: list[float]) -> str:
    """Which step and whose losses went non-finite (collective call: every rank's losses are gathered)."""
    per_rank = [rank_losses for process in utils.all_gather_object(losses) for rank_losses in process]
    described = '; '.join(f'rank {r}: loss_ita {ita}, loss_itm {itm}' for r, (ita, itm) in enumerate(per_rank))
    return (f'non-finite loss at epoch {epoch} step {step} (global step {epoch * steps_per_epoch + step}): '
            f'{described}. The step was not applied and {LAST_CHECKPOINT} is left as it was; lower init_lr or use '
            'precision fp32, then continue with --resume auto.')
