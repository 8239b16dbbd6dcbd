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
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

import utils
from config import ConfigError, load_config, save_config
from data import (DataError, create_datasets, create_eval_loader, create_train_loader, ensure_annotations,
                  find_missing_images, set_loader_epoch)
from evaluation import evaluate_scores, recall_metrics
from models import blip_retrieval
from models.checkpoint import CheckpointError, read_checkpoint

_logger = logging.getLogger('train_retrieval')

RUN_FILES = ('checkpoint_last.pth', 'checkpoint_best.pth', 'log.txt')
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 0  # a clean stop: the scheduler requeues, `--resume auto` continues


class SetupError(RuntimeError):
    """Bad input found before training starts; the message names the item and the fix."""


class NonFiniteLossError(RuntimeError):
    pass


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
    parser.add_argument('--seed', default=42, type=int, help='base seed (each rank adds its rank)')
    parser.add_argument('--world_size', default=1, type=int,
                        help='kept for compatibility: the launcher (torchrun/SLURM) sets the world size')
    parser.add_argument('--dist_url', default='env://', help='process-group rendezvous')
    parser.add_argument('--distributed', default=True, type=str2bool, nargs='?', const=True,
                        help='false: one process even under a launcher (the original parsed any string as true)')
    parser.add_argument('--options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='override config keys, e.g. --options init_lr=2e-5 k_test=256')
    parser.add_argument('--resume', default=None, metavar='PATH|auto',
                        help="continue from a checkpoint_last.pth ('auto': output_dir's, if any)")
    parser.add_argument('--overwrite', action='store_true',
                        help="start afresh in an output_dir that holds another run's checkpoints")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- setup
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


def check_images(datasets: dict, image_root: str) -> None:
    """Every image of every split must exist: listed all at once, not found on step 3,000."""
    missing = {split: find_missing_images(image_root, ds.image_paths()) for split, ds in datasets.items()}
    missing = {split: paths for split, paths in missing.items() if paths}
    if missing:
        lines = [f'  {split}: {len(paths)} missing, e.g. {", ".join(paths[:5])}' for split, paths in missing.items()]
        raise SetupError(f'images named by the annotations are missing under image_root={image_root!r}:\n'
                         + '\n'.join(lines) + '\nPoint image_root at the folder holding them (e.g. the Kaggle '
                         '"Images" folder\'s parent); `python -m data.prepare_flickr30k --root DIR` checks a download.')


def check_batch_sizes(config: dict, train_size: int, world_size: int) -> None:
    global_batch = config['batch_size_train'] * world_size
    if config['queue_size'] % global_batch:
        valid = [q for q in range(global_batch, 2 * config['queue_size'] + 1, global_batch)]
        nearest = sorted(valid, key=lambda q: abs(q - config['queue_size']))[:3]
        raise SetupError(f"queue_size {config['queue_size']} is not divisible by the global batch size "
                         f"{global_batch} (batch_size_train {config['batch_size_train']} x {world_size} processes); "
                         f"use e.g. queue_size={' or '.join(map(str, sorted(nearest)))}")
    if global_batch > train_size:
        raise SetupError(f"global batch size {global_batch} (batch_size_train {config['batch_size_train']} x "
                         f"{world_size} processes) is larger than the {train_size} training samples; "
                         'lower batch_size_train')


def check_output_dir(output_dir: str, resume: Optional[str], overwrite: bool) -> None:
    existing = [name for name in RUN_FILES if os.path.exists(os.path.join(output_dir, name))]
    if existing and not resume and not overwrite:
        raise SetupError(f'{output_dir} already holds another run ({", ".join(existing)}); pass --resume auto to '
                         'continue it, --overwrite to start afresh there, or choose another --output_dir')


def build_model(config: dict, pretrained: Optional[str] = None):
    return blip_retrieval(
        pretrained=config['pretrained'] if pretrained is None else pretrained,
        med_config=config['med_config'], image_size=config['image_size'], vit=config['vit'],
        vit_grad_ckpt=config['vit_grad_ckpt'], vit_ckpt_layer=config['vit_ckpt_layer'],
        embed_dim=config['embed_dim'], queue_size=config['queue_size'], momentum=config['momentum'],
        negative_all_rank=config['negative_all_rank'], tokenizer=config['tokenizer'],
        sha256=config['sha256'], allow_unsafe_checkpoint=config['allow_unsafe_checkpoint'])


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


def rng_state() -> dict:
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
            'epoch': state.epoch, 'step': state.step, 'best_r_mean': state.best_r_mean,
            'best_epoch': state.best_epoch, 'best_test': state.best_test, 'train_meters': state.train_meters,
            'rng_states': rng_states, 'world_size': utils.get_world_size()}, path)
        _logger.info('Saved %s (epoch %d, step %d)', path, state.epoch, state.step)


def load_resume(path: str, model, optimizer, config: dict) -> RunState:
    checkpoint = read_checkpoint(path)
    if 'optimizer' not in checkpoint or 'step' not in checkpoint:
        raise SetupError(f'{path} is not a checkpoint_last.pth written by this script (no optimizer/step); '
                         'use it as `pretrained` to fine-tune from its weights instead')
    model.load_state_dict(checkpoint['model'])
    optimizer.load_state_dict(checkpoint['optimizer'])
    changed = {k for k in config if k in checkpoint['config'] and checkpoint['config'][k] != config[k]}
    if changed:
        _logger.warning('Resuming with config values that differ from the checkpoint: %s', sorted(changed))
    state = RunState(epoch=checkpoint['epoch'], step=checkpoint['step'], best_r_mean=checkpoint['best_r_mean'],
                     best_epoch=checkpoint['best_epoch'], best_test=checkpoint['best_test'],
                     train_meters=checkpoint['train_meters'])
    saved_world = checkpoint['world_size']
    if saved_world == utils.get_world_size():
        set_rng_state(checkpoint['rng_states'][utils.get_rank()])
    else:
        # The data order of the rest of the epoch and the random draws differ; queues, weights,
        # optimizer, learning rate and alpha carry over. Restart the interrupted epoch's position in samples.
        samples = state.step * config['batch_size_train'] * saved_world
        state.step = samples // (config['batch_size_train'] * utils.get_world_size())
        _logger.warning('Resuming %d processes from a %d-process checkpoint: same weights, queues, optimizer, '
                        'lr and alpha; the data order of the rest of epoch %d and random draws differ',
                        utils.get_world_size(), saved_world, state.epoch)
    _logger.info('Resumed from %s at epoch %d step %d (best val r_mean %.2f at epoch %d)', path, state.epoch,
                 state.step, state.best_r_mean, state.best_epoch)
    return state


class StopRequest:
    """SIGTERM/SIGUSR1 (SLURM preemption) set a flag; the loop finishes its step, saves and exits."""

    def __init__(self):
        self.signal_name: Optional[str] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name


def agree(flags: list[bool], device: torch.device) -> list[bool]:
    """OR of per-rank flags over all ranks, so every rank stops at the same step."""
    tensor = torch.tensor([float(f) for f in flags], device=device)
    return [bool(v) for v in utils.all_reduce_sum_(tensor).gt(0).tolist()]


# ---------------------------------------------------------------------------------------------- epochs
def train_one_epoch(model, raw_model, loader, optimizer, config: dict, state: RunState, device: torch.device,
                    autocast, stop: StopRequest, save_fn: Callable[[], None], writer: utils.TensorboardWriter
                    ) -> dict:
    model.train()
    epoch, steps_per_epoch = state.epoch, state.steps_per_epoch
    progress = utils.ProgressLogger(steps_per_epoch, f'Train Epoch [{epoch}]', config['log_every'])
    sums = dict(state.train_meters)
    lr = optimizer.param_groups[0]['lr']
    for step, (image, caption, idx) in enumerate(progress.iter(loader), start=state.step):
        image, idx = image.to(device, non_blocking=True), idx.to(device, non_blocking=True)
        alpha = utils.ramp_alpha(config['alpha'], epoch, step, steps_per_epoch)
        tokens = raw_model.tokenize(caption)
        with (autocast() if autocast else _null()):
            loss_ita, loss_itm = model(image, tokens, alpha=alpha, idx=idx)
        loss = loss_ita + loss_itm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        losses = torch.stack([loss_ita.detach(), loss_itm.detach()]).float().cpu().tolist()
        nonfinite, stopping = agree([not all(map(math.isfinite, losses)), stop.signal_name is not None], device)
        if nonfinite:
            raise NonFiniteLossError(f'non-finite loss at epoch {epoch} step {step}: loss_ita {losses[0]}, '
                                     f'loss_itm {losses[1]} on rank {utils.get_rank()}; the last good checkpoint '
                                     'is kept. Lower init_lr or use precision fp32/tf32.')
        optimizer.step()
        progress.update(loss_ita=losses[0], loss_itm=losses[1], lr=lr)
        for name, value in (('loss_ita', losses[0]), ('loss_itm', losses[1]), ('lr', lr)):
            sums[name] = sums.get(name, 0.0) + value
        sums['count'] = sums.get('count', 0) + 1
        state.step, state.train_meters = step + 1, sums
        global_step = epoch * steps_per_epoch + step
        if step % config['log_every'] == 0:
            writer.add_scalars({'train/loss_ita': losses[0], 'train/loss_itm': losses[1], 'train/lr': lr,
                                'train/alpha': alpha}, global_step)
        if stopping:
            raise Preempted()
        if config['save_every_steps'] and state.step % config['save_every_steps'] == 0 \
                and state.step < steps_per_epoch:
            save_fn()
    count = max(1, sums.pop('count', 1))
    return {name: value / count for name, value in sums.items()}


class Preempted(Exception):
    pass


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def evaluate_split(model, dataset, config: dict, dist_info, autocast) -> dict:
    loader = create_eval_loader(dataset, config['batch_size_test'], config['num_workers'], dist_info.rank,
                                dist_info.world_size)
    scores_i2t, scores_t2i = evaluate_scores(model, loader, dataset.text, config, dist_info.device, autocast)
    return recall_metrics(scores_i2t, scores_t2i, dataset.txt2img, dataset.img2txt)


def append_json(path: str, record: dict) -> None:
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    utils.setup_logging(None, int(os.environ.get('RANK', 0)))
    dist_info = None
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
        return 1
    finally:
        utils.destroy_distributed()


def run(args: argparse.Namespace, config: dict, dist_info) -> int:
    device, rank, world_size = dist_info.device, dist_info.rank, dist_info.world_size
    base_seed = args.seed if config['seed'] is None else config['seed']
    config['seed'] = base_seed  # data order and augmentation: same on every rank
    utils.seed_everything(base_seed + rank)  # dropout and negative sampling: per rank, as the original

    # Everything that can be wrong with the input is checked before any output is written.
    if not args.evaluate:
        check_output_dir(args.output_dir, args.resume, args.overwrite)
    run_on_main(lambda: prepare_data(config, args.evaluate))
    if config['dataset'] == 'demo':
        config['ann_root'] = os.path.join(config['image_root'], 'annotation')
    splits = ('val', 'test') if args.evaluate else ('train', 'val', 'test')
    datasets = create_datasets(config, splits)
    run_on_main(lambda: check_images(datasets, config['image_root']))
    if not args.evaluate:
        check_batch_sizes(config, len(datasets['train']), world_size)
    model = build_model(config).to(device)
    autocast = utils.configure_precision(config['precision'], device)
    if config['compile']:
        model.visual_encoder.compile()
        model.text_encoder.compile()

    os.makedirs(args.output_dir, exist_ok=True)
    utils.setup_logging(args.output_dir, rank)
    if utils.is_main_process():
        save_config(config, os.path.join(args.output_dir, 'config.yaml'))

    if args.evaluate:
        return run_evaluation(model, datasets, config, dist_info, autocast, args.output_dir)
    return run_training(args, model, datasets, config, dist_info, autocast)


def run_evaluation(model, datasets, config, dist_info, autocast, output_dir: str) -> int:
    results = {split: evaluate_split(model, datasets[split], config, dist_info, autocast) for split in ('val', 'test')}
    if utils.is_main_process():
        record = {f'{split}_{k}': v for split in ('val', 'test') for k, v in results[split].items()}
        append_json(os.path.join(output_dir, 'evaluate.txt'), record)
        for split in ('val', 'test'):
            _logger.info('%s: %s', split.capitalize(), json.dumps(results[split]))
            print(f'{split}: ' + json.dumps(results[split]), flush=True)
    return 0


def run_training(args, model, datasets, config, dist_info, autocast) -> int:
    device, rank, world_size = dist_info.device, dist_info.rank, dist_info.world_size
    output_dir = args.output_dir
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config['init_lr'], weight_decay=config['weight_decay'],
                                  fused=device.type == 'cuda')
    last_path = os.path.join(output_dir, 'checkpoint_last.pth')
    resume_path = last_path if args.resume == 'auto' else args.resume
    state = RunState()
    if resume_path and os.path.exists(resume_path):
        state = load_resume(resume_path, model, optimizer, config)
    elif args.resume and args.resume != 'auto':
        raise SetupError(f'--resume {args.resume}: file not found')
    elif args.resume == 'auto':
        _logger.info('--resume auto: no %s yet, starting from the beginning', last_path)

    train_set = datasets['train']
    state.steps_per_epoch = (len(train_set) // world_size) // config['batch_size_train']
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
    stop = StopRequest()
    save = lambda: save_last(last_path, model, optimizer, config, state)
    best_path = os.path.join(output_dir, 'checkpoint_best.pth')

    try:
        while state.epoch < config['max_epoch']:
            epoch = state.epoch
            utils.set_lr(optimizer, utils.cosine_lr(epoch, config['max_epoch'], config['init_lr'], config['min_lr']))
            set_loader_epoch(loader, epoch, state.step)
            train_stats = train_one_epoch(train_model, model, loader, optimizer, config, state, device, autocast,
                                          stop, save, writer)
            val = evaluate_split(model, datasets['val'], config, dist_info, autocast)
            test = evaluate_split(model, datasets['test'], config, dist_info, autocast)
            if val['r_mean'] > state.best_r_mean:
                state.best_r_mean, state.best_epoch, state.best_test = val['r_mean'], epoch, test
                if utils.is_main_process():
                    utils.atomic_torch_save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                                             'config': config, 'epoch': epoch, 'val_r_mean': val['r_mean']},
                                            best_path)
                    _logger.info('New best val r_mean %.2f: saved %s', val['r_mean'], best_path)
            if utils.is_main_process():
                record = {**{f'train_{k}': v for k, v in train_stats.items()},
                          **{f'val_{k}': v for k, v in val.items()},
                          **{f'test_{k}': v for k, v in state.best_test.items()},
                          'epoch': epoch, 'best_epoch': state.best_epoch}
                append_json(os.path.join(output_dir, 'log.txt'), record)
                writer.add_scalars({f'val/{k}': v for k, v in val.items()}, epoch)
                _logger.info('Epoch %d: val %s | test %s', epoch, json.dumps(val), json.dumps(test))
            state.epoch, state.step, state.train_meters = epoch + 1, 0, {}
            save()
    except Preempted:
        save()
        _logger.warning('Stopped by %s at epoch %d step %d; saved %s. Continue with the same command plus '
                        '--resume auto', stop.signal_name, state.epoch, state.step, last_path)
        return EXIT_PREEMPTED
    finally:
        writer.close()
    _logger.info('Training done: best val r_mean %.2f at epoch %d', state.best_r_mean, state.best_epoch)
    return 0


if __name__ == '__main__':
    sys.exit(main())
