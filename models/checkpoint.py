"""Reading official BLIP checkpoints (URL or path) safely and loading them with a key-by-key report; the layout
constants of the state dict (momentum pairs, queues) and the file names of a run folder.

Hugging Face folders and Hub ids are read by models.hf; models.blip_retrieval picks the loader for `pretrained`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from urllib.parse import urlparse

import torch
import torch.nn as nn

from models.vit import resize_pos_embed

_logger = logging.getLogger(__name__)

CHECKPOINT_URL_ROOT = 'https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/'
OFFICIAL_CHECKPOINTS = {
    name: CHECKPOINT_URL_ROOT + name + '.pth'
    for name in ('model_base_14M', 'model_base', 'model_base_capfilt_large', 'model_large',
                 'model_base_retrieval_flickr', 'model_large_retrieval_flickr',
                 'model_base_retrieval_coco', 'model_large_retrieval_coco')
}

# (online, momentum) module names; the momentum copies follow their online twins by EMA.
MOMENTUM_PAIRS = (('visual_encoder', 'visual_encoder_m'), ('vision_proj', 'vision_proj_m'),
                  ('text_encoder', 'text_encoder_m'), ('text_proj', 'text_proj_m'))
QUEUE_KEYS = ('image_queue', 'text_queue', 'idx_queue', 'ptr_queue')
# What a run folder holds (run.output writes them; models.hf_export reads the recall back for the model card).
LAST_CHECKPOINT = 'checkpoint_last.pth'
BEST_CHECKPOINT = 'checkpoint_best.pth'
TRAIN_LOG = 'log.txt'
EVALUATE_LOG = 'evaluate.txt'
RUN_CONFIG = 'config.yaml'
TENSORBOARD_DIR = 'tensorboard'
POS_EMBED_KEYS = ('visual_encoder.pos_embed', 'visual_encoder_m.pos_embed')
# Keys a checkpoint may lack or carry on purpose (pre-training checkpoints have a captioning decoder, no id
# queue, and name their queue pointer `queue_ptr`; newer transformers stopped saving position_ids).
EXPECTED_MISSING = re.compile(r'^(image_queue|text_queue|idx_queue|ptr_queue|.*embeddings\.position_ids)$')
EXPECTED_UNEXPECTED = re.compile(r'^(text_decoder\..*|queue_ptr)$')


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


@dataclass
class LoadReport:
    """What happened to every key that did not load one-to-one."""
    resized: list[str] = field(default_factory=list)
    expected_missing: list[str] = field(default_factory=list)
    expected_unexpected: list[str] = field(default_factory=list)
    skipped_queue: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # 'key: checkpoint shape -> model shape'

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def _is_url(path: str) -> bool:
    return urlparse(path).scheme in ('http', 'https')


# sha256 of the files this process hashed, by (real path, size, mtime): `sha256:` verifies a 900 MB checkpoint and the
# result records identify it, and the file is read once.
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_of(path: str) -> str:
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 20), b''):
                digest.update(chunk)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]


def local_checkpoint_path(url_or_path: str) -> str:
    """Where a checkpoint is on this machine: the path itself, or a URL's file in the torch hub cache."""
    if _is_url(url_or_path):
        return os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(urlparse(url_or_path).path))
    return url_or_path


def fetch_checkpoint(url_or_path: str, sha256: str | None = None) -> str:
    """Local path of a checkpoint; a URL is downloaded once into the torch hub cache (with progress)."""
    if _is_url(url_or_path):
        path = local_checkpoint_path(url_or_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            _logger.info('Downloading %s to %s', url_or_path, path)
            try:  # download_url_to_file writes a temporary file and renames it when complete
                torch.hub.download_url_to_file(url_or_path, path, progress=True)
            except Exception as error:
                raise CheckpointError(
                    f'could not download {url_or_path}: {error}\nOn a machine without internet, download it '
                    f'elsewhere and set `pretrained` to the local path (or copy it to {path}).') from error
    else:
        path = url_or_path
        if not os.path.isfile(path):
            raise CheckpointError(f'checkpoint file not found: {path} (set `pretrained` to an existing file or URL)')
    if sha256:
        verify_sha256(path, sha256)
    return path


def verify_sha256(path: str, expected: str) -> None:
    """Stop unless the file's sha256 is `expected` (the config's `sha256`)."""
    actual = sha256_of(path)
    if actual.lower() != expected.lower():
        raise CheckpointError(f'sha256 of {path} is {actual}, expected {expected}: the file is corrupt or not '
                              'the one the config names; delete it and download again')


def _not_a_torch_file(path: str) -> str | None:
    """Why the file cannot be a torch.save file, judged by its first bytes, or None.

    torch.save writes a zip archive (since PyTorch 1.6) or, in the legacy format, a pickle stream (protocol
    marker 0x80); anything else is some other file, whose unpickling errors (KeyError: 101 ...) say nothing.
    """
    with open(path, 'rb') as f:
        head = f.read(16)
    if head.startswith(b'PK\x03\x04') or head.startswith(b'\x80'):
        return None
    if not head:
        return 'it is empty'
    if head.lstrip().startswith(b'<'):
        return 'it is an HTML or XML page'
    try:
        return f'it is a text file starting with {head.decode("utf-8")!r}'
    except UnicodeDecodeError:
        return f'it starts with the bytes {head[:8]!r}, not those of a zip archive or a pickle'


def read_checkpoint(url_or_path: str, sha256: str | None = None, allow_unsafe: bool = False) -> dict:
    """Load a checkpoint file as a dict, with `weights_only=True` (plain tensors and containers).

    The official BLIP files are plain dicts of tensors and load this way. A file that needs arbitrary
    pickled objects is refused unless `allow_unsafe` is set (then it is loaded with a warning).
    """
    path = fetch_checkpoint(url_or_path, sha256)
    not_a_checkpoint = _not_a_torch_file(path)
    if not_a_checkpoint:
        raise CheckpointError(f'{path} is not a PyTorch checkpoint at all ({not_a_checkpoint}); point `pretrained` '
                              'at a .pth file written by torch.save (a failed download can leave an error page '
                              'instead: delete it and download again)')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        if not allow_unsafe:
            raise CheckpointError(
                f'{path} contains pickled objects other than tensors and was refused (weights_only=True): '
                f'{str(error).splitlines()[0]}\nIf you trust this file, set `allow_unsafe_checkpoint: True` '
                'in the config to load it anyway.') from None
        _logger.warning('Loading %s with weights_only=False (allow_unsafe_checkpoint): this can run code '
                        'stored in the file', path)
        try:
            checkpoint = torch.load(path, map_location='cpu', weights_only=False)
        except Exception as error:  # noqa: BLE001 - any failure of a full unpickling means a broken file
            raise CheckpointError(f'{path} is not a readable checkpoint ({type(error).__name__}: '
                                  f'{(str(error).splitlines() or [""])[0]})') from None
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError) as error:
        first_line = (str(error).splitlines() or [''])[0]
        raise CheckpointError(f'{path} is not a readable checkpoint ({type(error).__name__}: {first_line}); it may be '
                              'truncated: delete it and download or copy it again') from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{path} holds a {type(checkpoint).__name__}, expected a dict with a "model" state_dict')
    return checkpoint


def model_state_dict(checkpoint: dict, source: str = 'checkpoint') -> dict[str, torch.Tensor]:
    """The state_dict inside an official checkpoint (`{'model': ...}`) or a bare state_dict."""
    state_dict = checkpoint.get('model', checkpoint)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f'{source} has no "model" state_dict of tensors (keys: {sorted(checkpoint)[:10]})')
    return state_dict


def compare_keys(target: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor]
                 ) -> tuple[list[str], list[str], list[str]]:
    """`state_dict` against the model's `target`: (missing keys, unexpected keys, keys of another shape)."""
    missing = [key for key in target if key not in state_dict]
    unexpected = [key for key in state_dict if key not in target]
    other_shape = [key for key, value in state_dict.items() if key in target and value.shape != target[key].shape]
    return missing, unexpected, other_shape


def adapt_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[dict, LoadReport]:
    """Match a checkpoint's state_dict to the model, classifying every difference."""
    report = LoadReport()
    target = model.state_dict()
    missing, unexpected, other_shape = compare_keys(target, state_dict)
    for key in unexpected:
        (report.expected_unexpected if EXPECTED_UNEXPECTED.match(key) else report.unexpected).append(key)
    for key in missing:
        (report.expected_missing if EXPECTED_MISSING.match(key) else report.missing).append(key)
    adapted = {key: value for key, value in state_dict.items() if key in target and key not in other_shape}
    for key in other_shape:
        value = state_dict[key]
        if key in POS_EMBED_KEYS and value.shape[-1] == target[key].shape[-1]:
            value = resize_pos_embed(value, target[key].shape[1] - 1)
            report.resized.append(f'{key}: {tuple(state_dict[key].shape)} -> {tuple(value.shape)}')
        if value.shape == target[key].shape:
            adapted[key] = value
        elif key in QUEUE_KEYS:  # another queue_size: keep the model's freshly initialised queue
            report.skipped_queue.append(f'{key}: {tuple(value.shape)} -> {tuple(target[key].shape)}')
        else:
            report.mismatched.append(f'{key}: {tuple(value.shape)} -> {tuple(target[key].shape)}')
    return adapted, report


def raise_unless_fits(report: LoadReport, source: str, hint: str = '') -> None:
    """A CheckpointError listing every missing and every shape-mismatched key (40 at most), if there are any."""
    if not (report.missing or report.mismatched):
        return
    lines = [f'  missing: {k}' for k in report.missing] + [f'  shape: {k}' for k in report.mismatched]
    shown = '\n'.join(lines[:40]) + (f'\n  ... and {len(lines) - 40} more' if len(lines) > 40 else '')
    raise CheckpointError(f'{source} does not fit this model ({len(report.missing)} missing, {len(report.mismatched)} '
                          f'of another shape):\n{shown}' + (f'\n{hint}' if hint else ''))


def _log_report(report: LoadReport, source: str) -> None:
    for line in report.resized:
        _logger.info('resized %s', line)
    if report.expected_unexpected:
        _logger.info('%d keys not used, as expected (pre-training captioning decoder and queue pointer): %s ...',
                     len(report.expected_unexpected), report.expected_unexpected[0])
    if report.expected_missing:
        _logger.info('not in the checkpoint, as expected (fresh queues / constant position ids): %s',
                     ', '.join(report.expected_missing))
    if report.skipped_queue:
        _logger.info('queue of another size in the checkpoint, kept the new empty queue: %s',
                     '; '.join(report.skipped_queue))
    if report.unexpected:
        _logger.warning('%s has %d keys the model does not use: %s', source, len(report.unexpected),
                        ', '.join(report.unexpected[:20]))


def load_pretrained(model: nn.Module, url_or_path: str, sha256: str | None = None,
                    allow_unsafe: bool = False) -> LoadReport:
    """Load an official (or our own) checkpoint into `model`, strictly, with a report.

    Missing or shape-mismatched weights are an error that lists every key: they mean the checkpoint is
    of another architecture (e.g. ViT-L weights with `vit: base`, or another med_config).
    """
    checkpoint = read_checkpoint(url_or_path, sha256, allow_unsafe)
    state_dict, report = adapt_state_dict(model, model_state_dict(checkpoint, url_or_path))
    raise_unless_fits(report, url_or_path, 'Check `vit` (base/large), `med_config`, `embed_dim` and `image_size`.')
    model.load_state_dict(state_dict, strict=False)  # every omission was classified above
    _log_report(report, url_or_path)
    _logger.info('Loaded %s (%d tensors)', url_or_path, len(state_dict))
    return report
