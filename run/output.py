"""The output folder of a run: what is in it, whether a run may use it, and cleaning up after a hard kill."""
from __future__ import annotations

import json
import logging
import os
import shlex
import tempfile
from typing import Optional

from atomic import atomic_write_text
from evaluation import chance_recall, describe_protocol, format_recall
from models.checkpoint import BEST_CHECKPOINT, EVALUATE_LOG, LAST_CHECKPOINT, TENSORBOARD_DIR, TRAIN_LOG
from run.checkpoints import RunState
from run.failures import SetupError

_logger = logging.getLogger('train_retrieval')

RUN_FILES = (LAST_CHECKPOINT, BEST_CHECKPOINT, TRAIN_LOG)


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
        atomic_write_text(path, ''.join(kept))
        _logger.warning('%s: dropped %d record(s) of epoch %d on; the resumed run writes them again',
                        path, len(lines) - len(kept), epoch)


def remove_stale_temp_files(output_dir: str) -> None:
    """Temp files of writes that a hard kill interrupted (the files they were to replace are intact)."""
    # atomic.temp_name's `.NAME.PID.RANDOM.tmp`; `log.txt.PID.tmp` is what versions before it left.
    prefixes = tuple(f'.{name}.' for name in RUN_FILES) + (TRAIN_LOG + '.',)
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
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.relpath(os.path.join(repo, 'train_retrieval.py'))
    launcher = 'torchrun <the same options>' if 'TORCHELASTIC_RUN_ID' in os.environ else 'python'
    return ' '.join([launcher, shlex.quote(script), *map(shlex.quote, args), '--resume', 'auto'])


def default_output_dir(config_path: str) -> str:
    """output/<config name>: the demo's run lands in output/retrieval_demo, not in a Flickr-named folder."""
    return os.path.join('output', os.path.splitext(os.path.basename(config_path))[0])


def evaluation_summary(config: dict, results: dict, seconds: dict, datasets: dict, output_dir: str) -> str:
    """What --evaluate prints: the protocol, each split's recall against chance, its size and time, the file."""
    lines = [f'Evaluated {config["pretrained"] or "random weights"}; {describe_protocol(config["k_test"])}']
    for split in ('val', 'test'):
        dataset = datasets[split]
        chance = chance_recall(dataset.txt2img, dataset.img2txt)['r_mean']
        lines.append(f'  {split:<4} {format_recall(results[split])}  (chance r_mean {chance:.2f}; '
                     f'{len(dataset)} images, {len(dataset.text)} texts; {seconds[split]:.1f} s)')
    lines.append(f'  written to {os.path.join(output_dir, EVALUATE_LOG)}')
    return '\n'.join(lines)


def training_summary(state: RunState, datasets: dict, output_dir: str, report_path: Optional[str],
                     k_test: Optional[int] = None) -> str:
    """The last lines of a fine-tune: the best epoch's recall against chance, and where its files are."""
    log = os.path.join(output_dir, TRAIN_LOG)
    with open(log) as f:
        records = [json.loads(line) for line in f]
    best = [r for r in records if r.get('epoch') == state.best_epoch][-1:]
    val = {k[len('val_'):]: v for k, v in best[0].items() if k.startswith('val_')} if best else {}
    protocol = f'; {describe_protocol(k_test)}' if k_test is not None else ''
    lines = [f'Training done: best epoch {state.best_epoch} (by val r_mean){protocol}']
    for split, metrics in (('val', val), ('test', state.best_test)):
        dataset = datasets[split]
        chance = chance_recall(dataset.txt2img, dataset.img2txt)['r_mean']
        if metrics:
            lines.append(f'  {split:<4} {format_recall(metrics)}  (chance r_mean {chance:.2f})')
    lines.append(f'  checkpoint: {os.path.join(output_dir, BEST_CHECKPOINT)}')
    lines.append(f'  log: {log} (one line per epoch), TensorBoard: tensorboard --logdir '
                 f'{os.path.join(output_dir, TENSORBOARD_DIR)}')
    if report_path:  # last, where the eye lands: the page to open
        lines.append(f'  report of the best epoch ({state.best_epoch}): {report_path}')
    return '\n'.join(lines)
