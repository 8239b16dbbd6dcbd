"""Fine-tune and evaluate BLIP for image-text retrieval (Flickr30k, COCO), launched with torchrun.

Evaluate an official checkpoint (8 GPUs; `--nproc_per_node=1` for one GPU):
    torchrun --nproc_per_node=8 train_retrieval.py --config configs/retrieval_flickr.yaml \\
        --output_dir output/retrieval_flickr --evaluate
Evaluate your own fine-tune: add `--options pretrained=<its output_dir>/checkpoint_best.pth`.
Fine-tune (set `pretrained` to a pre-trained checkpoint, e.g. model_base.pth):
    torchrun --nproc_per_node=8 train_retrieval.py --config configs/retrieval_flickr.yaml \\
        --output_dir output/retrieval_flickr_finetuned
Several nodes: torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=29500 --nproc_per_node=8 ...
The 8-GPU recipe on 2 GPUs: --nproc_per_node=2 ... --options accum_steps=4 (each process plays 4 ranks in turn; the
same steps as 8 processes, see models/virtual_ranks.py).
SLURM: srun python train_retrieval.py ... (one task per GPU; MASTER_PORT exported).
CPU demo: python train_retrieval.py --config configs/retrieval_demo.yaml --device cpu
Without --output_dir a run writes to output/<config file name>, e.g. output/retrieval_demo.

Never losing a run:
  * checkpoint_last.pth is written atomically (temp file + rename) when an epoch's training ends, again
    after its evaluation, and every `save_every_steps` steps; it holds the weights with the queues, the
    optimizer, epoch and step, the best val r_mean so far, the config and the RNG states of every rank.
    checkpoint_best.pth is only ever replaced by a better one, also atomically. A write that fails (full
    disk, read-only file system) leaves the previous file as it was and stops the run, naming the space needed.
  * Run the same command plus `--resume auto` (or `--resume PATH`) to continue exactly where it stopped:
    same data order, learning rate, alpha, queues and random draws, hence the same weights bit for bit.
    With another number of processes, keep the global batch (batch_size_train x processes) and every
    global step still sees the same samples; weights, optimizer, queues, lr and alpha carry over, but the
    per-rank split of the loss and the random draws (dropout, hard negatives) differ. With accum_steps, resume
    with the same number of ranks (processes x accum_steps), in any split: the same run; other numbers are refused.
  * Signals. SIGTERM or SIGUSR1 (SLURM preemption, `scancel`, torchrun forwarding them) and a first Ctrl-C
    (SIGINT) finish the current step on every rank, save checkpoint_last.pth, print the command that continues
    and exit: code 0 after SIGTERM/SIGUSR1 (a scheduler requeues), 130 after Ctrl-C. A second Ctrl-C stops at
    once (code 130; checkpoint_last.pth stays as last saved). A signal during evaluation stops the run once the
    epoch is saved. torchrun itself, having been signalled, exits non-zero; it gives its workers
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) before killing them, enough for a step and a save, and
    forwards SIGUSR1 only when TORCHELASTIC_SIGNALS_TO_HANDLE lists it (e.g. SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1).
    DataLoader workers ignore these signals and end with their process.
  * A rank that fails (a bug, a CUDA error, an image that became unreadable, a full disk) tells the others
    through the rendezvous store, and every rank exits within seconds (code 1), under torchrun or a plain srun
    launch; the message names the failing rank and its error. Under `torchrun --max-restarts=N ... --resume
    auto` the job then continues from the last checkpoint_last.pth on its own.
  * A non-finite loss stops the run before the step is applied (exit code 1), naming the step and the
    losses of every rank; the last checkpoint is left as it was.
  * Bad input (config typos, missing images or annotations, a checkpoint that does not fit) is found before any
    compute and reported once, from rank 0, in one message (exit code 2).

Test hooks (environment variables, used by tests/test_resume.py and tests/test_failures.py):
  BLIP_STOP_AFTER_STEPS=N   behave as if SIGTERM arrived during the N-th training step of the run
                            (counted from epoch 0, step 0; with accum_steps, after its first micro-batch): the same
                            code path as a real preemption.
  BLIP_STEP_TRACE=PREFIX    every rank (each virtual rank of accum_steps too) appends one JSON line per step (epoch,
                            step, lr, alpha, the batch's image indices and captions, the losses, the pid) to
                            PREFIX.rank<R>.jsonl.
  BLIP_FAIL_AT=RANK:N       that rank raises an error during the N-th training step (a bug on one rank).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

import torch

import utils
from config import ConfigError, load_config, save_config
from data import (DataError, check_images, create_datasets, create_train_loader, prepare_data, set_loader_epoch)
from data.loaders import default_num_workers, drop_last_message
from evaluation import evaluate_split
from models import model_from_config
from models.checkpoint import (BEST_CHECKPOINT, EVALUATE_LOG, LAST_CHECKPOINT, RUN_CONFIG, TENSORBOARD_DIR, TRAIN_LOG,
                               CheckpointError)
from models.tokenizer import TokenizerError
from report import REPORT_DIR, write_evaluation_report
from atomic import DiskWriteError, append_json
from run.checkpoints import (RankStreams, RunState, adopt_resumed_config, load_resume_state, read_resume_checkpoint,
                             resume_path, save_best, save_last)
from run.failures import SetupError, fail, start_failure_watch, stop_failure_watch
from run.hooks import STEP_TRACE_ENV, StepTrace, failure_from_env, stop_after_steps_from_env
from run.output import (RUN_FILES, check_output_dir, check_writable, default_output_dir, evaluation_summary,
                        remove_stale_temp_files, resume_command, training_summary, trim_log)
from run.results import epoch_line, evaluates_val, result_fields, timed
from run.stops import StopRequest, agree
from run.tensorboard import TensorboardWriter
from run.training import NonFiniteLossError, Preempted, TrainingDataError, train_one_epoch
from utils import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USER_ERROR, warn_once

_logger = logging.getLogger('train_retrieval')

# Found before any compute, identical on every rank: reported once, by rank 0, without a traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, SetupError, TokenizerError, utils.LaunchError)


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
    parser.add_argument('--output_dir', default=None,
                        help='logs, configs and checkpoints (default: output/<config file name without .yaml>)')
    parser.add_argument('--evaluate', action='store_true', help='evaluate val and test once, no training')
    parser.add_argument('--allow_random_weights', action='store_true',
                        help="with --evaluate and pretrained '': evaluate a randomly initialised model on purpose")
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
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.output_dir is None:
        args.output_dir = default_output_dir(args.config)
    return args


# ---------------------------------------------------------------------------------------------- input checks
def check_batch_sizes(config: dict, train_size: int, world_size: int) -> None:
    """The queue takes whole global batches (of every rank, virtual ones included), and one global batch must fit
    in the training set."""
    batch, queue, accum = config['batch_size_train'], config['queue_size'], config.get('accum_steps', 1)
    global_batch = batch * world_size * accum
    made_of = f'batch_size_train {batch} x {world_size} processes' + (f' x accum_steps {accum}' if accum > 1 else '')
    if queue % global_batch:
        valid = range(global_batch, 2 * queue + global_batch, global_batch)
        nearest = sorted(sorted(valid, key=lambda q: abs(q - queue))[:2])
        # The other way out: the key that multiplies the global batch (accum_steps when it is in use).
        name, value, per_unit = (('accum_steps', accum, batch * world_size) if accum > 1 else
                                 ('batch_size_train', batch, world_size))
        fitting = [n for n in range(1, 2 * value + 1) if queue % (n * per_unit) == 0]
        others = sorted(sorted(fitting, key=lambda n: abs(n - value))[:2])
        raise SetupError(f"queue_size {queue} is not divisible by the global batch size {global_batch} "
                         f"({made_of}); use queue_size="
                         f"{' or '.join(map(str, nearest))} (any multiple of {global_batch})"
                         + (f", or {name}={' or '.join(map(str, others))}" if others else ''))
    if global_batch > train_size:
        raise SetupError(f'global batch size {global_batch} ({made_of}) is larger than the {train_size} training '
                         f'samples; lower batch_size_train to at most {max(1, train_size // (world_size * accum))}')


def check_pretrained_for_evaluation(config: dict, args: argparse.Namespace) -> None:
    """Evaluating random weights is almost always a mistake (a config with `pretrained: ''`): refuse it."""
    if args.evaluate and not config['pretrained'] and not args.allow_random_weights:
        # The run to evaluate: this output_dir's, else the config's default folder's (evaluations often get a
        # folder of their own), else this output_dir's to be.
        folders = [args.output_dir, default_output_dir(args.config)]
        folder = next((f for f in folders if os.path.isfile(os.path.join(f, BEST_CHECKPOINT))), args.output_dir)
        raise SetupError(
            "--evaluate with `pretrained: ''` would evaluate randomly initialised weights (recall at chance). "
            f"To evaluate your fine-tune, add: --options pretrained={os.path.join(folder, BEST_CHECKPOINT)} "
            '(or the path of another checkpoint); to evaluate random weights on purpose, add --allow_random_weights')


def resolve_num_workers(config: dict, world_size: int) -> None:
    """num_workers null: the original's 4, or fewer when this machine has fewer CPUs per process (said once)."""
    if config['num_workers'] is not None:
        return
    per_node = int(os.environ.get('LOCAL_WORLD_SIZE', world_size))
    config['num_workers'] = default_num_workers(per_node)
    if config['num_workers'] < 4 and utils.is_main_process():
        _logger.info('num_workers %d per process: this machine has %d CPU(s) for %d process(es) '
                     '(set num_workers to choose)', config['num_workers'], os.cpu_count() or 1, per_node)


def build_optimizer(model, config: dict, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config['init_lr'], weight_decay=config['weight_decay'],
                             fused=device.type == 'cuda')


# ---------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    root = logging.getLogger()
    handlers_before, level_before = list(root.handlers), root.level
    utils.setup_logging(None, utils.launch_rank())  # rank 0 keeps the lines for the top of train.log
    _logger.info('Output folder: %s', os.path.abspath(args.output_dir))  # the first line (other ranks: WARNING only)
    failed = True
    try:
        config = load_config(args.config, args.options)
        if not args.distributed:
            for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS'):
                os.environ.pop(name, None)
        dist_info = utils.init_distributed(args.device, args.dist_url)
        start_failure_watch(args.dist_url, dist_info.rank, dist_info.world_size)
        code = run(args, config, dist_info)
        failed = False
        return code
    except USER_ERRORS as error:
        return fail(str(error), EXIT_USER_ERROR, shared=True)
    except NonFiniteLossError as error:  # every rank raises it at the same step
        return fail(str(error), EXIT_FAILED, shared=True)
    except (TrainingDataError, DiskWriteError) as error:
        return fail(str(error), EXIT_FAILED)
    except KeyboardInterrupt:
        return fail(f'Interrupted: stopped at once. {LAST_CHECKPOINT} in {args.output_dir}, if any, is as last saved',
                    EXIT_INTERRUPTED, shared=True)
    except Exception as error:  # a bug, a CUDA error, a collective broken by a failed peer
        return fail(f'{type(error).__name__}: {error}', EXIT_FAILED, with_traceback=True)
    finally:
        stop_failure_watch()
        utils.destroy_distributed(failed=failed)
        # Called in-process (tests, notebooks): leave the root logger as it was, train.log closed.
        for handler in [h for h in root.handlers if h not in handlers_before]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level_before)


def run(args: argparse.Namespace, config: dict, dist_info) -> int:
    """Check every input, then evaluate or train; nothing is written before all checks have passed."""
    device, rank, world_size = dist_info.device, dist_info.rank, dist_info.world_size
    config['seed'] = args.seed if config['seed'] is None else config['seed']  # data order and augmentation
    check_pretrained_for_evaluation(config, args)
    check_writable(args.output_dir)
    checkpoint, last_path = None, None
    if not args.evaluate:
        check_output_dir(args.output_dir, args.resume, args.overwrite)
        stop_after_steps_from_env()
        last_path = resume_path(args.resume, args.output_dir)
        if last_path:
            checkpoint = read_resume_checkpoint(last_path, config['allow_unsafe_checkpoint'])
            adopt_resumed_config(config, checkpoint, last_path)
    resolve_num_workers(config, world_size)

    splits = ('val', 'test') if args.evaluate else ('train', 'val', 'test')
    utils.run_on_main(lambda: prepare_data(config, splits), USER_ERRORS)
    datasets = create_datasets(config, splits)
    if utils.is_main_process():
        _logger.info('Checking the %d images of %s under %s', sum(len(ds.image_paths()) for ds in datasets.values()),
                     '/'.join(splits), config['image_root'])
    utils.run_on_main(lambda: check_images(datasets, config['image_root']), USER_ERRORS)
    if not args.evaluate:
        check_batch_sizes(config, len(datasets['train']), world_size)
    elif config['accum_steps'] != 1 and utils.is_main_process():
        _logger.info('accum_steps %d is ignored with --evaluate (it only changes how training steps are computed)',
                     config['accum_steps'])
    if utils.is_main_process():
        source = 'from the resumed checkpoint' if checkpoint else (config['pretrained'] or 'random initialisation')
        _logger.info('Building the model (vit %s, %d px, text encoder %s); weights: %s', config['vit'],
                     config['image_size'], os.path.basename(config['med_config']), source)
    # A resumed run gets its weights from the checkpoint: `pretrained` need not be there any more. The same random
    # init on every rank, queues included (DDP does not broadcast them); training draws from each rank's own stream.
    utils.seed_everything(config['seed'])
    model = model_from_config(config, pretrained='' if checkpoint else None).to(device)
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
    restart = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
    if restart != '0' and utils.is_main_process():
        _logger.warning('torchrun restart %s of this job (TORCHELASTIC_RESTART_COUNT=%s): %s', restart, restart,
                        'continuing from the last checkpoint' if state.epoch or state.step else 'starting afresh')
    if utils.is_main_process():
        if args.overwrite:
            for name in RUN_FILES:
                if os.path.exists(os.path.join(args.output_dir, name)):
                    os.remove(os.path.join(args.output_dir, name))
                    _logger.warning('--overwrite: deleted %s', os.path.join(args.output_dir, name))
        save_config(config, os.path.join(args.output_dir, RUN_CONFIG))

    if args.evaluate:
        return run_evaluation(model, datasets, config, device, autocast, args.output_dir)
    return run_training(args, model, optimizer, state, datasets, config, dist_info, autocast)


def run_evaluation(model, datasets, config, device, autocast, output_dir: str) -> int:
    kept = [] if config['report'] else None
    results, seconds = {}, {}
    for split in ('val', 'test'):
        results[split], seconds[split] = timed(evaluate_split, model, datasets[split], config, device, autocast, kept)
    if utils.is_main_process():
        record = {f'{split}_{k}': v for split in ('val', 'test') for k, v in results[split].items()}
        append_json(os.path.join(output_dir, EVALUATE_LOG), {**record, **result_fields(config, device, seconds,
                                                                                        datasets)})
        _logger.info('%s', evaluation_summary(config, results, seconds, datasets, output_dir),
                     extra=utils.BARE)  # as it is on the console, and in train.log
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
    _logger.info('report: %s', path, extra=utils.BARE)
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

    train_set, accum = datasets['train'], config['accum_steps']
    state.steps_per_epoch = len(train_set) // (world_size * accum) // config['batch_size_train']
    loader = create_train_loader(train_set, config['batch_size_train'], config['num_workers'], rank, world_size,
                                 config['seed'], accum_steps=accum)
    train_model = model
    if dist_info.distributed:
        # Queues are identical on every rank by construction (the same init, then all ranks enqueue the same
        # gathered features), so DDP need not broadcast 2 x 57600 x 256 floats of buffers each step.
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)
    resumed_at = state.epoch * state.steps_per_epoch + state.step
    # A resumed run redoes the steps after its checkpoint: their earlier TensorBoard points are purged.
    writer = TensorboardWriter(os.path.join(output_dir, TENSORBOARD_DIR)
                                     if config['tensorboard'] and utils.is_main_process() else None,
                                     purge_step=resumed_at or None)
    ranks = range(rank * accum, (rank + 1) * accum)  # the ranks this process plays (more than one: accum_steps)
    traces = [StepTrace(os.environ.get(STEP_TRACE_ENV), r) for r in ranks]
    fail_at = failure_from_env(rank)
    saved_at: list[tuple[int, int]] = []
    if utils.is_main_process():
        _logger.info('Training %d epochs of %d steps (global batch %d = %d x %d processes%s)%s', config['max_epoch'],
                     state.steps_per_epoch, config['batch_size_train'] * world_size * accum,
                     config['batch_size_train'], world_size, f' x accum_steps {accum}' if accum > 1 else '',
                     f', from epoch {state.epoch} step {state.step}' if resumed_at else '')
        dropped = drop_last_message(len(train_set), config['batch_size_train'], world_size * accum)
        if dropped:
            _logger.info(dropped)
    report_path = None  # the best epoch's report, written by rank 0

    def save() -> None:
        """checkpoint_last.pth of the current position (once per position)."""
        if saved_at[-1:] != [(state.epoch, state.step)]:
            save_last(last_path, model, optimizer, config, state, streams)
            saved_at.append((state.epoch, state.step))

    # Last, so that nothing above can shift the random streams: each rank's from the checkpoint, or seed + rank.
    streams = RankStreams(state.rng) if state.rng is not None else RankStreams.seeded(config['seed'], ranks)
    state.rng = None
    with StopRequest(stop_after_steps_from_env()) as stop:
        try:
            while state.epoch < config['max_epoch']:
                epoch = state.epoch
                utils.set_lr(optimizer, utils.cosine_lr(epoch, config['max_epoch'], config['init_lr'],
                                                        config['min_lr']))
                set_loader_epoch(loader, epoch, state.step)
                train_stats = train_one_epoch(train_model, model, loader, optimizer, config, state, device,
                                              autocast, stop, save, writer, traces, fail_at, streams)
                save()  # the epoch's training is safe before its (possibly long) evaluation
                kept = [] if config['report'] else None
                val, test, seconds = {}, {}, {}
                if evaluates_val(epoch, config):
                    val, seconds['val'] = timed(evaluate_split, model, datasets['val'], config, device, autocast, kept)
                    improved = val['r_mean'] > state.best_r_mean  # on every rank alike (same matrices)
                    # Test only when its result is kept (log.txt holds the best epoch's test, as the original's).
                    if improved or config['eval_test_every_epoch']:
                        test, seconds['test'] = timed(evaluate_split, model, datasets['test'], config, device,
                                                      autocast, kept)
                    if improved:
                        state.best_r_mean, state.best_epoch, state.best_test = val['r_mean'], epoch, test
                        state.best_test_seconds = seconds['test']
                        if utils.is_main_process():
                            save_best(best_path, model, optimizer, config, epoch, val['r_mean'])
                            report_path = write_report(output_dir, kept, datasets, config, epoch) or report_path
                del kept
                if utils.is_main_process():
                    record = {**{f'train_{k}': v for k, v in train_stats.items()},
                              **{f'val_{k}': v for k, v in val.items()},
                              **{f'test_{k}': v for k, v in state.best_test.items()},
                              'epoch': epoch, 'best_epoch': state.best_epoch}
                    kept_seconds = {'val': seconds.get('val'), 'test': state.best_test_seconds}  # as val_*, test_*
                    append_json(log_path, {**record, **result_fields(config, device, kept_seconds, datasets)})
                    # Same x axis as the train curves: the global step at the end of the epoch.
                    epoch_end = (epoch + 1) * state.steps_per_epoch
                    writer.add_scalars({**{f'val/{k}': v for k, v in val.items()},
                                        **{f'test/{k}': v for k, v in test.items()}}, epoch_end)
                    _logger.info('Epoch %d: %s', epoch, epoch_line(val, test, state.best_epoch, config))
                state.epoch, state.step, state.train_meters = epoch + 1, 0, {}
                save()
                # A signal that came during evaluation: the epoch is saved, stop before the next one.
                if state.epoch < config['max_epoch'] and agree([stop.requested], device)[0]:
                    raise Preempted()
        except Preempted:
            save()
            warn_once('Stopped by %s at epoch %d step %d of %d; saved %s. Continue with:\n  %s',
                      stop.reason or 'another rank', state.epoch, state.step, state.steps_per_epoch, last_path,
                      resume_command(args.argv))
            return stop.exit_code
        finally:
            writer.close()
    existing = os.path.join(output_dir, REPORT_DIR, 'index.html')
    report_path = report_path or (existing if config['report'] and os.path.exists(existing) else None)
    if utils.is_main_process():  # a resumed run may have written the report before it stopped
        _logger.info('%s', training_summary(state, datasets, output_dir, report_path, config['k_test']),
                     extra=utils.BARE)
    return 0


if __name__ == '__main__':
    sys.exit(main())
