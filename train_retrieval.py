"""Fine-tune and evaluate BLIP for image-text retrieval (Flickr30k, COCO), launched with torchrun.

Evaluate an official checkpoint (8 GPUs; `--nproc_per_node=1` for one GPU):
    torchrun --nproc_per_node=8 train_retrieval.py --config configs/retrieval_flickr.yaml \
        --output_dir output/retrieval_flickr --evaluate
Fine-tune (set `pretrained` to a pre-trained checkpoint, e.g. model_base.pth):
    torchrun --nproc_per_node=8 train_retrieval.py --config configs/retrieval_flickr.yaml \
        --output_dir output/retrieval_flickr_finetuned
Several nodes: torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=29500 --nproc_per_node=8 ...
SLURM: srun python train_retrieval.py ... (one task per GPU; MASTER_PORT exported).
CPU demo: python train_retrieval.py --config configs/retrieval_demo.yaml --device cpu

Never losing a run:
  * checkpoint_last.pth is written atomically (temp file + rename) when an epoch's training ends, again
    after its evaluation, and every `save_every_steps` steps; it holds the weights with the queues, the
    optimizer, epoch and step, the best val r_mean so far, the config and the RNG states of every rank.
    checkpoint_best.pth is only ever replaced by a better one, also atomically.
  * Run the same command plus `--resume auto` (or `--resume PATH`) to continue exactly where it stopped:
    same data order, learning rate, alpha, queues and random draws, hence the same weights bit for bit.
    With another number of processes, keep the global batch (batch_size_train x processes) and every
    global step still sees the same samples; weights, optimizer, queues, lr and alpha carry over, but the
    per-rank split of the loss and the random draws (dropout, hard negatives) differ.
  * SIGTERM or SIGUSR1 (SLURM preemption, `scancel`, torchrun forwarding them) finish the current step on
    every rank, save checkpoint_last.pth and exit with code 0 and a message (torchrun itself, having been
    signalled, still exits non-zero). A signal during evaluation stops the run once the epoch is saved.
    torchrun gives its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) before killing them, enough
    for a step and a save; it forwards SIGUSR1 only when TORCHELASTIC_SIGNALS_TO_HANDLE lists it (e.g.
    SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1). DataLoader workers ignore both signals and end with their process.
  * A non-finite loss stops the run before the step is applied (exit code 1), naming the step and the
    losses of every rank; the last checkpoint is left as it was.

Test hooks (environment variables, used by tests/test_resume.py):
  BLIP_STOP_AFTER_STEPS=N   behave as if SIGTERM arrived during the N-th training step of the run
                            (counted from epoch 0, step 0): the same code path as a real preemption.
  BLIP_STEP_TRACE=PREFIX    every rank appends one JSON line per step (epoch, step, lr, alpha, the batch's
                            image indices and captions, the losses) to PREFIX.rank<R>.jsonl.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Any, Callable, Optional

import torch

import utils
from config import ConfigError, load_config, save_config
from data import (DataError, create_datasets, create_eval_loader, create_train_loader, ensure_annotations,
                  set_loader_epoch)
from data.retrieval_dataset import find_unreadable_images
from evaluation import evaluate_scores, recall_metrics
from models import blip_retrieval
from models.checkpoint import CheckpointError
from report import REPORT_DIR, SplitScores, write_evaluation_report
from run_state import (LAST_CHECKPOINT, RunState, SetupError, StopRequest, adopt_resumed_config, agree,
                       load_resume_state, read_resume_checkpoint, resume_path, save_last, set_rng_state,
                       stop_after_steps_from_env, warn_once)

_logger = logging.getLogger('train_retrieval')

BEST_CHECKPOINT = 'checkpoint_best.pth'
TRAIN_LOG = 'log.txt'
RUN_FILES = (LAST_CHECKPOINT, BEST_CHECKPOINT, TRAIN_LOG)
STEP_TRACE_ENV = 'BLIP_STEP_TRACE'
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 1
EXIT_PREEMPTED = 0  # a clean stop: the scheduler requeues, `--resume auto` continues


class NonFiniteLossError(RuntimeError):
    """A training loss was NaN or infinite; the step was not applied."""


class Preempted(Exception):
    """A stop was requested (signal or test hook) and every rank agreed to stop after this step."""


# ---------------------------------------------------------------------------------------------- arguments
def str2bool(value: str) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ('1', 'true', 'yes', 'y', 'on'):
        return True
    if value.lower() in ('0', 'false', 'no', 'n', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {value!r}')


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='./configs/retrieval_flickr.yaml', help='YAML config')
    parser.add_argument('--output_dir', default='output/Retrieval_flickr', help='logs, configs and checkpoints')
    parser.add_argument('--evaluate', action='store_true', help='evaluate val and test once, no training')
    parser.add_argument('--device', default='cuda', help='cuda or cpu')
    parser.add_argument('--seed', default=42, type=int,
                        help='base seed (each rank adds its rank); a resumed run keeps its checkpoint\'s seed')
    parser.add_argument('--world_size', default=1, type=int,
                        help='kept for compatibility: the launcher (torchrun/SLURM) sets the world size')
    parser.add_argument('--dist_url', default='env://', help='process-group rendezvous')
    parser.add_argument('--distributed', default=True, type=str2bool, nargs='?', const=True,
                        help='false: one process even under a launcher (the original parsed any string as true)')
    parser.add_argument('--options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='override config keys, e.g. --options init_lr=2e-5 k_test=256')
    parser.add_argument('--resume', default=None, metavar='PATH|auto',
                        help=f"continue from a {LAST_CHECKPOINT} ('auto': output_dir's, if there is one)")
    parser.add_argument('--overwrite', action='store_true',
                        help="start afresh in an output_dir that holds another run's checkpoints (deletes them)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- input checks
def run_on_main(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only; every rank gets its result, or raises its error (no rank hangs)."""
    result, error = None, None
    if utils.is_main_process():
        try:
            result = fn()
        except (DataError, SetupError, CheckpointError, OSError, ValueError) as exc:
            error = f'{type(exc).__name__}: {exc}'
    result, error = utils.broadcast_object((result, error))
    if error:
        raise SetupError(error.split(': ', 1)[1])
    return result


def prepare_data(config: dict, evaluate: bool) -> None:
    """Fetch what the run needs (annotations, or the demo data) before any dataset is built."""
    if config['dataset'] == 'demo':
        from data.demo import ensure_demo_data
        ensure_demo_data(config['image_root'])
    else:
        splits = ('val', 'test') if evaluate else ('train', 'val', 'test')
        ensure_annotations(config['ann_root'], config['dataset'], splits)


def check_images(datasets: dict, image_root: str, shown_per_split: int = 20) -> None:
    """Every image of every split must exist and look like an image: all listed at once, not found on step 3,000.

    Cheap (a stat and a few bytes per file, see `find_unreadable_images`); decoding every image is left
    to `python -m data.prepare_flickr30k`.
    """
    problems = {split: find_unreadable_images(image_root, ds.image_paths()) for split, ds in datasets.items()}
    problems = {split: found for split, found in problems.items() if found}
    if not problems:
        return
    lines = []
    for split, found in problems.items():
        lines.append(f'  {split}: {len(found)} of {len(datasets[split].image_paths())} images')
        lines += [f'    {path}: {problem}' for path, problem in list(found.items())[:shown_per_split]]
        if len(found) > shown_per_split:
            lines.append(f'    ... and {len(found) - shown_per_split} more')
    raise SetupError(f'images named by the annotations are missing or unreadable under image_root={image_root!r}:\n'
                     + '\n'.join(lines) + '\nPoint image_root at the folder holding them (e.g. the Kaggle "Images" '
                     "folder's parent) and replace empty or broken files; `python -m data.prepare_flickr30k --root "
                     'DIR` checks and repairs a Flickr30k download.')


def check_batch_sizes(config: dict, train_size: int, world_size: int) -> None:
    """The queue takes whole global batches, and one global batch must fit in the training set."""
    batch = config['batch_size_train']
    global_batch = batch * world_size
    if config['queue_size'] % global_batch:
        valid = range(global_batch, 2 * config['queue_size'] + global_batch, global_batch)
        nearest = sorted(sorted(valid, key=lambda q: abs(q - config['queue_size']))[:2])
        raise SetupError(f"queue_size {config['queue_size']} is not divisible by the global batch size "
                         f"{global_batch} (batch_size_train {batch} x {world_size} processes); "
                         f"use queue_size={' or '.join(map(str, nearest))} (any multiple of {global_batch})")
    if global_batch > train_size:
        raise SetupError(f'global batch size {global_batch} (batch_size_train {batch} x {world_size} processes) is '
                         f'larger than the {train_size} training samples; lower batch_size_train to at most '
                         f'{max(1, train_size // world_size)}')


def check_output_dir(output_dir: str, resume: Optional[str], overwrite: bool) -> None:
    """An output_dir that holds another run is only used to continue it (--resume) or replace it (--overwrite)."""
    if resume and overwrite:
        raise SetupError('--resume continues the run in output_dir and --overwrite deletes it: pass only one')
    existing = [name for name in RUN_FILES if os.path.exists(os.path.join(output_dir, name))]
    if existing and not resume and not overwrite:
        raise SetupError(f'{output_dir} already holds another run ({", ".join(existing)}); pass --resume auto to '
                         'continue it, --overwrite to delete it and start afresh there, or choose another --output_dir')


def build_model(config: dict, pretrained: Optional[str] = None):
    return blip_retrieval(
        pretrained=config['pretrained'] if pretrained is None else pretrained,
        med_config=config['med_config'], image_size=config['image_size'], vit=config['vit'],
        vit_grad_ckpt=config['vit_grad_ckpt'], vit_ckpt_layer=config['vit_ckpt_layer'],
        embed_dim=config['embed_dim'], queue_size=config['queue_size'], momentum=config['momentum'],
        negative_all_rank=config['negative_all_rank'], tokenizer=config['tokenizer'],
        sha256=config['sha256'], allow_unsafe_checkpoint=config['allow_unsafe_checkpoint'])


def build_optimizer(model, config: dict, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config['init_lr'], weight_decay=config['weight_decay'],
                             fused=device.type == 'cuda')


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
                f.write(json.dumps(record) + '\n')


# ---------------------------------------------------------------------------------------------- epochs
def train_one_epoch(model, raw_model, loader, optimizer, config: dict, state: RunState, device: torch.device,
                    autocast, stop: StopRequest, save_fn: Callable[[], None], writer: utils.TensorboardWriter,
                    trace: StepTrace) -> dict:
    """Train the rest of `state.epoch` from `state.step`; `state` advances with every step.

    Raises Preempted after the step during which a stop was requested (on any rank), and
    NonFiniteLossError before applying a step with a non-finite loss (on any rank).
    """
    model.train()
    epoch, steps_per_epoch = state.epoch, state.steps_per_epoch
    progress = utils.ProgressLogger(steps_per_epoch, f'Train Epoch [{epoch}]', config['log_every'])
    sums = dict(state.train_meters)
    lr = optimizer.param_groups[0]['lr']
    for step, (image, caption, idx) in enumerate(progress.iter(loader, start=state.step), start=state.step):
        image, idx = image.to(device, non_blocking=True), idx.to(device, non_blocking=True)
        alpha = utils.ramp_alpha(config['alpha'], epoch, step, steps_per_epoch)
        tokens = raw_model.tokenize(caption)
        with (autocast() if autocast else _null()):
            loss_ita, loss_itm = model(image, tokens, alpha=alpha, idx=idx)
        loss = loss_ita + loss_itm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stop.note_step(epoch * steps_per_epoch + step + 1)
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
                                'train/alpha': alpha}, epoch * steps_per_epoch + step)
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


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def evaluate_split(model, dataset, config: dict, dist_info, autocast, keep_scores: Optional[list] = None) -> dict:
    """Recall metrics of one split; rank 0 appends its matrices to `keep_scores` (for the report) when given."""
    loader = create_eval_loader(dataset, config['batch_size_test'], config['num_workers'], dist_info.rank,
                                dist_info.world_size)
    keep = keep_scores is not None and utils.is_main_process()
    scores = evaluate_scores(model, loader, dataset.text, config, dist_info.device, autocast, with_similarity=keep)
    metrics = recall_metrics(scores[0], scores[1], dataset.txt2img, dataset.img2txt)
    if keep:
        keep_scores.append(SplitScores(*scores, metrics))
    return metrics


# ---------------------------------------------------------------------------------------------- output files
def append_json(path: str, record: dict) -> None:
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    tmp_path = f'{path}.{os.getpid()}.tmp'
    with open(tmp_path, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)


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
        atomic_write_text(path, ''.join(kept))
        _logger.warning('%s: dropped %d record(s) of epoch %d on; the resumed run writes them again',
                        path, len(lines) - len(kept), epoch)


def remove_stale_temp_files(output_dir: str) -> None:
    """Temp files of writes that a hard kill interrupted (the files they were to replace are intact)."""
    prefixes = ('.' + LAST_CHECKPOINT + '.', '.' + BEST_CHECKPOINT + '.', TRAIN_LOG + '.')
    for name in os.listdir(output_dir):
        if name.startswith(prefixes) and name.endswith('.tmp'):
            os.remove(os.path.join(output_dir, name))
            _logger.info('Removed the unfinished write %s', name)


# ---------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    root = logging.getLogger()
    handlers_before, level_before = list(root.handlers), root.level
    utils.setup_logging(None, int(os.environ.get('RANK', 0)))
    try:
        config = load_config(args.config, args.options)
        if not args.distributed:
            for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS'):
                os.environ.pop(name, None)
        dist_info = utils.init_distributed(args.device, args.dist_url)
        return run(args, config, dist_info)
    except (ConfigError, DataError, CheckpointError, SetupError) as error:
        _logger.error('%s', error)
        return EXIT_USER_ERROR
    except NonFiniteLossError as error:
        _logger.error('%s', error)
        return EXIT_NONFINITE
    finally:
        utils.destroy_distributed()
        # Called in-process (tests, notebooks): leave the root logger as it was, train.log closed.
        for handler in [h for h in root.handlers if h not in handlers_before]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level_before)


def run(args: argparse.Namespace, config: dict, dist_info) -> int:
    """Check every input, then evaluate or train; nothing is written before all checks have passed."""
    device, rank, world_size = dist_info.device, dist_info.rank, dist_info.world_size
    config['seed'] = args.seed if config['seed'] is None else config['seed']  # data order and augmentation
    checkpoint, last_path = None, None
    if not args.evaluate:
        check_output_dir(args.output_dir, args.resume, args.overwrite)
        stop_after_steps_from_env()
        last_path = resume_path(args.resume, args.output_dir)
        if last_path:
            checkpoint = read_resume_checkpoint(last_path, config['allow_unsafe_checkpoint'])
            adopt_resumed_config(config, checkpoint, last_path)
    utils.seed_everything(config['seed'] + rank)  # dropout and negative sampling: per rank, as the original

    run_on_main(lambda: prepare_data(config, args.evaluate))
    if config['dataset'] == 'demo':
        config['ann_root'] = os.path.join(config['image_root'], 'annotation')
    splits = ('val', 'test') if args.evaluate else ('train', 'val', 'test')
    datasets = create_datasets(config, splits)
    run_on_main(lambda: check_images(datasets, config['image_root']))
    if not args.evaluate:
        check_batch_sizes(config, len(datasets['train']), world_size)
    # A resumed run gets its weights from the checkpoint: `pretrained` need not be there any more.
    model = build_model(config, pretrained='' if checkpoint else None).to(device)
    optimizer, state = None, RunState()
    if not args.evaluate:
        optimizer = build_optimizer(model, config, device)
        if checkpoint is not None:
            state = load_resume_state(checkpoint, last_path, model, optimizer, config, rank, world_size)
            del checkpoint
    autocast = utils.configure_precision(config['precision'], device)
    torch.backends.cudnn.benchmark = True  # as the original: fixed image shapes, the fastest patch-embed conv
    if config['compile']:
        model.visual_encoder.compile()
        model.text_encoder.compile()

    # All checks passed: from here on the run writes its outputs.
    os.makedirs(args.output_dir, exist_ok=True)
    utils.setup_logging(args.output_dir, rank)
    if utils.is_main_process():
        if args.overwrite:
            for name in RUN_FILES:
                if os.path.exists(os.path.join(args.output_dir, name)):
                    os.remove(os.path.join(args.output_dir, name))
                    _logger.warning('--overwrite: deleted %s', os.path.join(args.output_dir, name))
        save_config(config, os.path.join(args.output_dir, 'config.yaml'))

    if args.evaluate:
        return run_evaluation(model, datasets, config, dist_info, autocast, args.output_dir)
    return run_training(args, model, optimizer, state, datasets, config, dist_info, autocast)


def run_evaluation(model, datasets, config, dist_info, autocast, output_dir: str) -> int:
    kept = [] if config['report'] else None
    results = {split: evaluate_split(model, datasets[split], config, dist_info, autocast, kept)
               for split in ('val', 'test')}
    if utils.is_main_process():
        record = {f'{split}_{k}': v for split in ('val', 'test') for k, v in results[split].items()}
        append_json(os.path.join(output_dir, 'evaluate.txt'), record)
        for split in ('val', 'test'):
            _logger.info('%s: %s', split.capitalize(), json.dumps(results[split]))
            print(f'{split}: ' + json.dumps(results[split]), flush=True)
        write_report(output_dir, kept, datasets, config)
    return 0


def write_report(output_dir: str, kept: Optional[list], datasets, config: dict, epoch: Optional[int] = None
                 ) -> Optional[str]:
    """output_dir/report/ from the val and test matrices that `evaluate_split` kept (rank 0; none if report off)."""
    if not kept:
        return None
    try:
        path = write_evaluation_report(output_dir, dict(zip(('val', 'test'), kept)), datasets, config, epoch)
    except OSError as error:  # a full disk must not end a fine-tune: the metrics and checkpoints are written
        _logger.error('The report was not written: %s', error)
        return None
    print(f'report: {path}', flush=True)
    return path


def run_training(args, model, optimizer, state: RunState, datasets, config, dist_info, autocast) -> int:
    device, rank, world_size = dist_info.device, dist_info.rank, dist_info.world_size
    output_dir = args.output_dir
    last_path = os.path.join(output_dir, LAST_CHECKPOINT)
    best_path = os.path.join(output_dir, BEST_CHECKPOINT)
    log_path = os.path.join(output_dir, TRAIN_LOG)
    if utils.is_main_process():
        remove_stale_temp_files(output_dir)
        trim_log(log_path, state.epoch)

    train_set = datasets['train']
    state.steps_per_epoch = len(train_set) // world_size // config['batch_size_train']
    loader = create_train_loader(train_set, config['batch_size_train'], config['num_workers'], rank, world_size,
                                 config['seed'])
    train_model = model
    if dist_info.distributed:
        # Queues are identical on every rank by construction (all ranks enqueue the same gathered
        # features), so DDP need not broadcast 2 x 57600 x 256 floats of buffers each step.
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)
    writer = utils.TensorboardWriter(os.path.join(output_dir, 'tensorboard')
                                     if config['tensorboard'] and utils.is_main_process() else None)
    trace = StepTrace(os.environ.get(STEP_TRACE_ENV), rank)
    saved_at: list[tuple[int, int]] = []
    report_path = None  # the best epoch's report, written by rank 0

    def save() -> None:
        """checkpoint_last.pth of the current position (once per position)."""
        if saved_at[-1:] != [(state.epoch, state.step)]:
            save_last(last_path, model, optimizer, config, state)
            saved_at.append((state.epoch, state.step))

    if state.rng is not None:  # last, so that nothing above can shift the resumed random streams
        set_rng_state(state.rng)
        state.rng = None
    with StopRequest(stop_after_steps_from_env()) as stop:
        try:
            while state.epoch < config['max_epoch']:
                epoch = state.epoch
                utils.set_lr(optimizer, utils.cosine_lr(epoch, config['max_epoch'], config['init_lr'],
                                                        config['min_lr']))
                set_loader_epoch(loader, epoch, state.step)
                train_stats = train_one_epoch(train_model, model, loader, optimizer, config, state, device,
                                              autocast, stop, save, writer, trace)
                save()  # the epoch's training is safe before its (possibly long) evaluation
                kept = [] if config['report'] else None
                val = evaluate_split(model, datasets['val'], config, dist_info, autocast, kept)
                test = evaluate_split(model, datasets['test'], config, dist_info, autocast, kept)
                if val['r_mean'] > state.best_r_mean:
                    state.best_r_mean, state.best_epoch, state.best_test = val['r_mean'], epoch, test
                    if utils.is_main_process():
                        utils.atomic_torch_save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                                                 'config': config, 'epoch': epoch, 'val_r_mean': val['r_mean']},
                                                best_path)
                        _logger.info('New best val r_mean %.2f: saved %s', val['r_mean'], best_path)
                        report_path = write_report(output_dir, kept, datasets, config, epoch) or report_path
                del kept
                if utils.is_main_process():
                    record = {**{f'train_{k}': v for k, v in train_stats.items()},
                              **{f'val_{k}': v for k, v in val.items()},
                              **{f'test_{k}': v for k, v in state.best_test.items()},
                              'epoch': epoch, 'best_epoch': state.best_epoch}
                    append_json(log_path, record)
                    writer.add_scalars({f'val/{k}': v for k, v in val.items()}, epoch)
                    _logger.info('Epoch %d: val %s | test %s', epoch, json.dumps(val), json.dumps(test))
                state.epoch, state.step, state.train_meters = epoch + 1, 0, {}
                save()
                # A signal that came during evaluation: the epoch is saved, stop before the next one.
                if state.epoch < config['max_epoch'] and agree([stop.requested], device)[0]:
                    raise Preempted()
        except Preempted:
            save()
            warn_once('Stopped by %s at epoch %d step %d of %d; saved %s. Continue with the same command '
                      'plus --resume auto', stop.reason or 'another rank', state.epoch, state.step,
                      state.steps_per_epoch, last_path)
            return EXIT_PREEMPTED
        finally:
            writer.close()
    _logger.info('Training done: best val r_mean %.2f at epoch %d', state.best_r_mean, state.best_epoch)
    existing = os.path.join(output_dir, REPORT_DIR, 'index.html')
    report_path = report_path or (existing if config['report'] and os.path.exists(existing) else None)
    if report_path and utils.is_main_process():  # a resumed run may have written it before it stopped
        print(f'report of the best epoch ({state.best_epoch}): {report_path}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
