"""What an evaluation record says besides recall: how long each split took, on what, with which weights.

Every `evaluate.txt` record and every `log.txt` record carries these fields after the original keys (`val_*`,
`test_*`, `train_*`, `epoch`, `best_epoch`, whose names and values are unchanged), so that
`python -m report.table` can put runs side by side:

    recall_unit      '%': the recall keys are percentages
    eval_seconds     {split: seconds} of the evaluation whose recall the record holds (log.txt: this epoch's val,
                     the best epoch's test)
    device           the GPU's name, or the CPU's model
    world_size       processes that evaluated
    precision        the config's `precision`
    protocol, k_test 'itm' with the candidates re-ranked per query, or 'itc' with k_test 0 (no matching head)
    dataset          the config's `dataset`; images / texts: {split: count}
    pretrained       the config's `pretrained` ('' for random weights; a fine-tune's starting point)
    checkpoint_bytes, checkpoint_sha256    of a local file (a URL's downloaded copy, a folder's weights file)
    checkpoint_revision                    of a Hub id: the commit it resolved to
                                           (each null where it does not apply or the file is gone)
"""
from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable, Mapping, Optional

import torch

import utils
from evaluation import format_recall, protocol
from models.checkpoint import local_checkpoint_path, sha256_of
from models.hf import BIN_NAME, SAFETENSORS_NAME, hub_revision, is_hf_source

RUN_FIELDS = ('recall_unit', 'eval_seconds', 'device', 'world_size', 'precision', 'protocol', 'k_test', 'dataset',
              'images', 'texts', 'pretrained', 'checkpoint_bytes', 'checkpoint_sha256', 'checkpoint_revision')
EVAL_SPLITS = ('val', 'test')


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo on Linux (platform.processor() there says only 'x86_64'), else platform."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
            for line in f:
                if line.lower().startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'unknown CPU'


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_model()


def _weights_file(pretrained: str) -> Optional[str]:
    """The one local file that holds `pretrained`'s weights, or None (a Hub id, a sharded folder, a file gone)."""
    if os.path.isdir(pretrained):
        files = [os.path.join(pretrained, name) for name in (SAFETENSORS_NAME, BIN_NAME)]
        return next((path for path in files if os.path.isfile(path)), None)
    path = local_checkpoint_path(pretrained)
    return path if os.path.isfile(path) else None


def checkpoint_identity(pretrained: Optional[str]) -> dict:
    """`pretrained` with its file's size and sha256 (hashed once per process), or the commit of a Hub id."""
    pretrained = pretrained or ''
    identity = {'pretrained': pretrained, 'checkpoint_bytes': None, 'checkpoint_sha256': None,
                'checkpoint_revision': None}
    if not pretrained:
        return identity
    if is_hf_source(pretrained) and not os.path.isdir(pretrained):
        identity['checkpoint_revision'] = hub_revision(pretrained)
        return identity
    path = _weights_file(pretrained)
    if path is not None:
        identity['checkpoint_bytes'] = os.path.getsize(path)
        identity['checkpoint_sha256'] = sha256_of(path)
    return identity


def result_fields(config: Mapping, device: torch.device, eval_seconds: Mapping[str, Optional[float]],
                  datasets: Mapping) -> dict:
    """The fields above for a record of this run (call on rank 0: it may hash the checkpoint).

    `eval_seconds`: split -> seconds, None for a split the record holds no recall of.
    """
    splits = [split for split in EVAL_SPLITS if split in datasets]
    return {'recall_unit': '%', 'eval_seconds': {split: round(seconds, 3) for split, seconds in eval_seconds.items()
                                                 if seconds is not None},
            'device': device_name(device), 'world_size': utils.get_world_size(), 'precision': config['precision'],
            'protocol': protocol(config['k_test']), 'k_test': config['k_test'], 'dataset': config['dataset'],
            'images': {split: len(datasets[split]) for split in splits},
            'texts': {split: len(datasets[split].text) for split in splits},
            **checkpoint_identity(config['pretrained'])}


def timed(fn: Callable, *args) -> tuple[Any, float]:
    """(fn(*args), the seconds it took)."""
    began = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - began


# ---------------------------------------------------------------------------------------------- fine-tuning
def evaluates_val(epoch: int, config: Mapping) -> bool:
    """`eval_every` N: val after every N-th epoch, and always after the last one."""
    return (epoch + 1) % config['eval_every'] == 0 or epoch + 1 == config['max_epoch']


def epoch_line(val: dict, test: dict, best_epoch: int, config: Mapping) -> str:
    """What an epoch's evaluation found (an empty dict: that split was not evaluated)."""
    if not val:
        return f'trained; val is evaluated every {config["eval_every"]} epochs (eval_every) and after the last'
    if not test:
        return (f'val {format_recall(val)} | not better than epoch {best_epoch}: test not evaluated '
                '(eval_test_every_epoch: true evaluates it every time)')
    return (f'val {format_recall(val)} | test (this epoch) {format_recall(test)} | log.txt keeps the test of the best '
            f'epoch ({best_epoch})')
