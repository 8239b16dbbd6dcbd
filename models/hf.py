"""Hugging Face BLIP retrieval weights in and out: `BlipForImageTextRetrieval` folders and Hub ids.

The two layouts differ by key names only (the ViT's); the text encoder, `vision_proj`, `text_proj` and `itm_head`
keep their names. HF has no momentum encoders, queues or `temp`: on import the momentum encoders start as copies of
the online weights (as `BLIP_Retrieval.__init__` makes them), the queues fresh and `temp` 0.07, unless the folder
holds a `training_state.pth` (written by `python -m models.hf_export --with-training-state`).

The architecture is read from the weights (widths, depths, image size from the position embeddings) and must agree
with the model built from the run's config; config.json values that contradict BLIP (HF's vision LayerNorm eps 1e-5
instead of 1e-6, 8 text heads instead of 12, `is_decoder` false, which drops HF's cross-attention) are named in one
warning, and the model keeps BLIP's values.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
import torch.nn as nn
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download, try_to_load_from_cache
from huggingface_hub.utils import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                   RevisionNotFoundError)
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors_file
from transformers import BlipConfig

from models.checkpoint import (BEST_CHECKPOINT, LAST_CHECKPOINT, MOMENTUM_PAIRS, QUEUE_KEYS, CheckpointError,
                               LoadReport, adapt_state_dict, model_state_dict, raise_unless_fits, read_checkpoint,
                               verify_sha256)

_logger = logging.getLogger(__name__)

CONFIG_NAME = 'config.json'
SAFETENSORS_NAME = 'model.safetensors'
SAFETENSORS_INDEX_NAME = 'model.safetensors.index.json'
BIN_NAME = 'pytorch_model.bin'
BIN_INDEX_NAME = 'pytorch_model.bin.index.json'
TRAINING_STATE_NAME = 'training_state.pth'
TRAINING_STATE_FORMAT = 'blip_retrieval_training_state'
# What an import needs from a Hub repository: safetensors first; the .bin files only where there are none.
HUB_PATTERNS = [CONFIG_NAME, TRAINING_STATE_NAME, SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, 'model-*.safetensors']
HUB_BIN_PATTERNS = [CONFIG_NAME, TRAINING_STATE_NAME, BIN_NAME, BIN_INDEX_NAME, 'pytorch_model-*.bin']
HF_ARCHITECTURE = 'BlipForImageTextRetrieval'

# `owner/name` or `owner/name@revision`, the Hub's rules for names (no leading `.`, `/` or `-`).
_HUB_ID = re.compile(r'^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?$')
_CHECKPOINT_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors', '.ckpt', '.tar', '.zip', '.json', '.yaml')

# ViT key names: ours (timm's) -> HF's. Within a block: timm's suffix -> HF's suffix.
_VISION_KEYS = {
    'visual_encoder.cls_token': 'vision_model.embeddings.class_embedding',
    'visual_encoder.pos_embed': 'vision_model.embeddings.position_embedding',
    'visual_encoder.patch_embed.proj.weight': 'vision_model.embeddings.patch_embedding.weight',
    'visual_encoder.patch_embed.proj.bias': 'vision_model.embeddings.patch_embedding.bias',
    'visual_encoder.norm.weight': 'vision_model.post_layernorm.weight',
    'visual_encoder.norm.bias': 'vision_model.post_layernorm.bias',
}
_BLOCK_PARTS = {'attn.qkv': 'self_attn.qkv', 'attn.proj': 'self_attn.projection', 'norm1': 'layer_norm1',
                'norm2': 'layer_norm2', 'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2'}
_OURS_BLOCK = re.compile(r'^visual_encoder\.blocks\.(\d+)\.(.+)\.(weight|bias)$')
_HF_BLOCK = re.compile(r'^vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$')
_SAME_NAME_PREFIXES = ('text_encoder.', 'vision_proj.', 'text_proj.', 'itm_head.')
# Keys that HF's BlipForImageTextRetrieval has no place for (they go to training_state.pth).
MOMENTUM_PREFIXES = tuple(momentum + '.' for _, momentum in MOMENTUM_PAIRS)
TRAINING_STATE_KEYS = QUEUE_KEYS + ('temp',)


# ---------------------------------------------------------------------------------------------- key names
def hf_key(key: str) -> Optional[str]:
    """HF name of one of our online keys; None for keys HF has no place for (momentum, queues, temp, position ids)."""
    if key in _VISION_KEYS:
        return _VISION_KEYS[key]
    block = _OURS_BLOCK.match(key)
    if block and block.group(2) in _BLOCK_PARTS:
        return f'vision_model.encoder.layers.{block.group(1)}.{_BLOCK_PARTS[block.group(2)]}.{block.group(3)}'
    if key.startswith(_SAME_NAME_PREFIXES) and not key.endswith('embeddings.position_ids'):
        return key
    return None


_HF_VISION_KEYS = {hf: ours for ours, hf in _VISION_KEYS.items()}
_HF_BLOCK_PARTS = {hf: ours for ours, hf in _BLOCK_PARTS.items()}


def blip_key(key: str) -> Optional[str]:
    """Our name of an HF `BlipForImageTextRetrieval` key; None for a key our model does not have."""
    if key in _HF_VISION_KEYS:
        return _HF_VISION_KEYS[key]
    block = _HF_BLOCK.match(key)
    if block and block.group(2) in _HF_BLOCK_PARTS:
        return f'visual_encoder.blocks.{block.group(1)}.{_HF_BLOCK_PARTS[block.group(2)]}.{block.group(3)}'
    if key.startswith(_SAME_NAME_PREFIXES) or key == 'temp':  # temp: only in files that kept it
        return key
    return None


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split our state_dict into (HF weights, training state: momentum encoders, queues, temp).

    The text encoder's constant position ids are dropped: HF keeps them in a non-persistent buffer.
    """
    weights, training_state = {}, {}
    for key, value in state_dict.items():
        name = hf_key(key)
        if name is not None:
            weights[name] = value
        elif key.startswith(MOMENTUM_PREFIXES) or key in TRAINING_STATE_KEYS:
            training_state[key] = value
    return weights, training_state


# ---------------------------------------------------------------------------------------------- sources
def is_hf_source(pretrained: str) -> bool:
    """A local folder, or a Hub id `owner/name[@revision]` that is no file or folder here."""
    if os.path.isdir(pretrained):
        return True
    if os.path.exists(pretrained) or pretrained.lower().endswith(_CHECKPOINT_SUFFIXES):
        return False
    return _HUB_ID.match(pretrained) is not None


def hf_folder(pretrained: str) -> str:
    """The local folder of `pretrained`: the folder itself, or the Hub snapshot (downloaded into the HF cache)."""
    if os.path.isdir(pretrained):
        return pretrained
    match = _HUB_ID.match(pretrained)
    if match is None:
        raise CheckpointError(f'`pretrained: {pretrained}` is neither a file, a folder nor a Hub id (owner/name)')
    return download_hub_model(match.group('repo'), match.group('revision'))


def hub_revision(pretrained: str) -> Optional[str]:
    """The commit a Hub id (`owner/name[@revision]`) resolves to in the Hugging Face cache; None if not cached."""
    match = _HUB_ID.match(pretrained)
    if match is None or os.path.exists(pretrained):
        return None
    path = try_to_load_from_cache(match.group('repo'), CONFIG_NAME, revision=match.group('revision'))
    return os.path.basename(os.path.dirname(path)) if isinstance(path, str) else None  # .../snapshots/<commit>/


def _weight_files(folder: str) -> list[str]:
    return [name for name in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, BIN_NAME, BIN_INDEX_NAME)
            if os.path.isfile(os.path.join(folder, name))]


def download_hub_model(repo_id: str, revision: Optional[str] = None) -> str:
    """Snapshot of the files an import needs, in huggingface_hub's cache (HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT
    are huggingface_hub's own settings); any failure becomes one message that says how to bring the files."""
    name = repo_id + (f'@{revision}' if revision else '')
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
        if not _weight_files(folder):  # an older repository with .bin weights only
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_BIN_PATTERNS)
        return folder
    except GatedRepoError:
        reason = 'the repository is gated: accept its terms on the Hub and log in with `hf auth login`'
    except RepositoryNotFoundError:
        reason = ('no such repository on the Hub (or it is private: log in with `hf auth login`); a local '
                  'folder of this name does not exist either')
    except RevisionNotFoundError:
        reason = f'the repository has no revision {revision!r}'
    except LocalEntryNotFoundError as error:
        if hub_constants.HF_HUB_OFFLINE:  # read by huggingface_hub from the environment
            reason = (f'HF_HUB_OFFLINE is set and it is not in the Hugging Face cache '
                      f'({hub_constants.HF_HUB_CACHE})')
        else:
            reason = f'the Hub could not be reached and it is not in the cache ({str(error).splitlines()[0]})'
    except Exception as error:  # network, proxy and HTTP errors, bad ids: each library layer has its own types
        reason = f'{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}'
    revision_flag = f' --revision {revision}' if revision else ''
    raise CheckpointError(
        f'could not get the Hugging Face model {name}: {reason}.\nOn a machine with internet, run '
        f'`hf download {repo_id}{revision_flag} --local-dir DIR` (huggingface_hub < 1.0: `huggingface-cli '
        f'download ...`), copy DIR to this node and set `pretrained: DIR`; or copy the Hugging Face cache there '
        '(HF_HOME) and set HF_HUB_OFFLINE=1.')


# ---------------------------------------------------------------------------------------------- reading a folder
@dataclass
class HFCheckpoint:
    """What a save_pretrained folder holds, read without pickle where possible."""
    folder: str
    config: BlipConfig
    weights: dict[str, torch.Tensor]
    weight_files: list[str]
    training_state: Optional[dict[str, torch.Tensor]] = None


def read_hf_config(folder: str):
    """config.json as transformers' BlipConfig: missing values get HF's defaults, as transformers would load them."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        ours = [name for name in (BEST_CHECKPOINT, LAST_CHECKPOINT)
                if os.path.isfile(os.path.join(folder, name))]
        hint = f'; for a training run, set `pretrained` to {os.path.join(folder, ours[0])}' if ours else ''
        raise CheckpointError(
            f'{folder} has no {CONFIG_NAME}: a Hugging Face BLIP folder holds {CONFIG_NAME} and {SAFETENSORS_NAME} '
            f'(or {BIN_NAME}), as `save_pretrained` and `python -m models.hf_export` write them{hint}')
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f'{path} is not readable JSON: {error}') from None
    if not isinstance(raw, dict) or raw.get('model_type') != 'blip':
        model_type = raw.get('model_type') if isinstance(raw, dict) else None
        raise CheckpointError(f'{path} has model_type {model_type!r}, not a BLIP model ("blip"); use a '
                              f'{HF_ARCHITECTURE} folder such as Salesforce/blip-itm-base-coco')
    try:
        return BlipConfig.from_dict(raw)
    except Exception as error:  # transformers' strict config classes raise several types
        raise CheckpointError(f'{path} is not a valid BLIP config: {error}') from None


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_file(path, device='cpu')
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f'{path} is not a readable safetensors file ({error}); it may be truncated: '
                              'download or copy it again') from None


def _load_bin(path: str, allow_unsafe: bool) -> dict[str, torch.Tensor]:
    return model_state_dict(read_checkpoint(path, allow_unsafe=allow_unsafe), path)  # the .pth weights_only rule


def _load_sharded(folder: str, index_name: str, load) -> dict[str, torch.Tensor]:
    index_path = os.path.join(folder, index_name)
    try:
        with open(index_path) as f:
            shards = sorted(set(json.load(f)['weight_map'].values()))
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise CheckpointError(f'{index_path} is not a readable shard index ({error})') from None
    weights = {}
    for shard in shards:
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise CheckpointError(f'{index_path} names {shard}, which is not in {folder}: copy the whole folder')
        weights.update(load(path))
    return weights


def read_hf_folder(folder: str, sha256: Optional[str] = None, allow_unsafe: bool = False) -> HFCheckpoint:
    """config.json, the weights (safetensors without pickle; .bin with weights_only) and training_state.pth."""
    config = read_hf_config(folder)
    files = _weight_files(folder)
    if not files:
        raise CheckpointError(f'{folder} has {CONFIG_NAME} but no weights ({SAFETENSORS_NAME}, {BIN_NAME} or a '
                              f'sharded index); it holds: {", ".join(sorted(os.listdir(folder))[:20])}')
    first = files[0]
    if sha256:
        if first.endswith('.index.json'):
            raise CheckpointError(f'`sha256` verifies one weights file, but {folder} is sharded ({first}); '
                                  'remove `sha256` from the config')
        verify_sha256(os.path.join(folder, first), sha256)
    if first == SAFETENSORS_NAME:
        weights = _load_safetensors(os.path.join(folder, first))
    elif first == SAFETENSORS_INDEX_NAME:
        weights = _load_sharded(folder, first, _load_safetensors)
    elif first == BIN_NAME:
        weights = _load_bin(os.path.join(folder, first), allow_unsafe)
    else:
        weights = _load_sharded(folder, first, lambda path: _load_bin(path, allow_unsafe))
    training_state = None
    state_path = os.path.join(folder, TRAINING_STATE_NAME)
    if os.path.isfile(state_path):
        saved = read_checkpoint(state_path, allow_unsafe=allow_unsafe)
        if saved.get('format') != TRAINING_STATE_FORMAT:
            raise CheckpointError(f'{state_path} is not a training state written by models.hf_export '
                                  f'(format {saved.get("format")!r}); remove it to import the weights alone')
        training_state = model_state_dict(saved, state_path)
    return HFCheckpoint(folder, config, weights, [first], training_state)


# ---------------------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class BlipShapes:
    """What the weights say about the architecture (attention head counts are not in them)."""
    vision_width: int
    vision_depth: int
    patch_size: int
    image_size: int
    vision_mlp: int
    text_width: int
    text_layers: int
    text_intermediate: int
    vocab_size: int
    text_positions: int
    embed_dim: int

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor], source: str = 'the checkpoint') -> 'BlipShapes':
        """Read from a state_dict in our layout."""
        def shape(key: str) -> torch.Size:
            if key not in state_dict:
                raise CheckpointError(f'{source} has no {hf_key(key) or key}: not a BLIP image-text retrieval '
                                      f'checkpoint ({HF_ARCHITECTURE}: vision_model, text_encoder, vision_proj, '
                                      'text_proj, itm_head)')
            return state_dict[key].shape

        def count(prefix: str) -> int:
            pattern = re.compile(re.escape(prefix) + r'(\d+)\.')
            return len({m.group(1) for m in map(pattern.match, state_dict) if m})

        width, _, patch, _ = shape('visual_encoder.patch_embed.proj.weight')
        positions = shape('visual_encoder.pos_embed')[1]
        grid = math.isqrt(positions - 1)
        if grid * grid != positions - 1:
            raise CheckpointError(f'{source}: {positions} vision position embeddings are not 1 + a square grid')
        vocab, text_width = shape('text_encoder.embeddings.word_embeddings.weight')
        shape('itm_head.weight')
        shape('text_proj.weight')
        return cls(vision_width=width, vision_depth=count('visual_encoder.blocks.'), patch_size=patch,
                   image_size=grid * patch, vision_mlp=shape('visual_encoder.blocks.0.mlp.fc1.weight')[0],
                   text_width=text_width, text_layers=count('text_encoder.encoder.layer.'),
                   text_intermediate=shape('text_encoder.encoder.layer.0.intermediate.dense.weight')[0],
                   vocab_size=vocab, text_positions=shape('text_encoder.embeddings.position_embeddings.weight')[0],
                   embed_dim=shape('vision_proj.weight')[0])

    def vit_description(self) -> str:
        return (f'width {self.vision_width}, depth {self.vision_depth}, patch {self.patch_size}, '
                f'MLP {self.vision_mlp}')

    def text_description(self) -> str:
        return (f'width {self.text_width}, {self.text_layers} layers, intermediate {self.text_intermediate}, '
                f'vocab {self.vocab_size}, {self.text_positions} positions')

    def vit_setting(self, num_heads: int) -> str:
        """The `vit` config value that builds this ViT."""
        if (self.vision_width, self.vision_depth, self.patch_size, self.vision_mlp) == (768, 12, 16, 3072):
            return 'base'
        if (self.vision_width, self.vision_depth, self.patch_size, self.vision_mlp) == (1024, 24, 16, 4096):
            return 'large'
        return (f'{{embed_dim: {self.vision_width}, depth: {self.vision_depth}, num_heads: {num_heads}, '
                f'patch_size: {self.patch_size}, mlp_ratio: {self.vision_mlp / self.vision_width:g}}}')


def architecture_disagreements(weights: BlipShapes, model: BlipShapes, vision_heads: int) -> list[str]:
    """One line per config key whose model does not fit the weights."""
    lines = []
    vit_fields = ('vision_width', 'vision_depth', 'patch_size', 'vision_mlp')
    if any(getattr(weights, f) != getattr(model, f) for f in vit_fields):
        lines.append(f'`vit`: the weights hold a ViT of {weights.vit_description()}, the config builds '
                     f'{model.vit_description()}; set vit: {weights.vit_setting(vision_heads)}')
    elif weights.image_size != model.image_size:
        lines.append(f'`image_size`: the weights are for {weights.image_size} px images (position embeddings of a '
                     f'{weights.image_size // weights.patch_size}-patch grid), the config says {model.image_size}; '
                     f'set image_size: {weights.image_size}')
    text_fields = ('text_width', 'text_layers', 'text_intermediate', 'vocab_size', 'text_positions')
    if any(getattr(weights, f) != getattr(model, f) for f in text_fields):
        lines.append(f'`med_config`: the weights hold a text encoder of {weights.text_description()}, '
                     f'med_config builds {model.text_description()}; point med_config at a BERT config of that '
                     'size (configs/med_config.json for the official base and large models)')
    if weights.embed_dim != model.embed_dim:
        lines.append(f'`embed_dim`: the weights project to {weights.embed_dim}, the config says {model.embed_dim}; '
                     f'set embed_dim: {weights.embed_dim}')
    return lines


def config_contradictions(config, weights: BlipShapes, model: nn.Module) -> list[str]:
    """Effective config.json values that the model does not use, each with the value it uses instead."""
    vision, text = config.vision_config, config.text_config
    block = model.visual_encoder.blocks[0]
    ours = model.text_encoder.config
    checks = [
        ('vision_config.layer_norm_eps', vision.layer_norm_eps, block.norm1.eps, "BLIP's ViT"),
        ('vision_config.num_attention_heads', vision.num_attention_heads, block.attn.num_heads, 'config `vit`'),
        ('vision_config.hidden_act', vision.hidden_act, 'gelu', "BLIP's ViT"),
        ('vision_config.hidden_size', vision.hidden_size, weights.vision_width, 'the weights'),
        ('vision_config.num_hidden_layers', vision.num_hidden_layers, weights.vision_depth, 'the weights'),
        ('vision_config.intermediate_size', vision.intermediate_size, weights.vision_mlp, 'the weights'),
        ('vision_config.patch_size', vision.patch_size, weights.patch_size, 'the weights'),
        ('vision_config.image_size', vision.image_size, weights.image_size, 'the position embeddings'),
        ('text_config.num_attention_heads', text.num_attention_heads, ours.num_attention_heads, 'med_config'),
        ('text_config.layer_norm_eps', text.layer_norm_eps, ours.layer_norm_eps, 'med_config'),
        ('text_config.hidden_act', text.hidden_act, ours.hidden_act, 'med_config'),
        ('text_config.is_decoder', text.is_decoder, True,
         "BLIP: cross-attention to the image in every layer; HF builds none when false"),
        ('text_config.hidden_size', text.hidden_size, weights.text_width, 'the weights'),
        ('text_config.num_hidden_layers', text.num_hidden_layers, weights.text_layers, 'the weights'),
        ('text_config.intermediate_size', text.intermediate_size, weights.text_intermediate, 'the weights'),
        ('text_config.vocab_size', text.vocab_size, weights.vocab_size, 'the weights'),
        ('text_config.max_position_embeddings', text.max_position_embeddings, weights.text_positions, 'the weights'),
        ('image_text_hidden_size', config.image_text_hidden_size, weights.embed_dim, 'the weights'),
    ]
    lines = []
    for name, found, used, origin in checks:
        if isinstance(found, (list, tuple)):  # image_size / patch_size may be given as (height, width)
            found = found[0] if len(set(found)) == 1 else found
        if found != used:
            lines.append(f'{name} = {found!r} (used: {used!r}, from {origin})')
    return lines


# ---------------------------------------------------------------------------------------------- import
@dataclass
class HFLoadReport(LoadReport):
    """A LoadReport that also says where each of our keys came from (`origin`) and what config.json got wrong."""
    folder: str = ''
    weight_files: list[str] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)
    config_warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """'N from model.safetensors, M copied from the online weights, ...' over every key of the model."""
        kinds = ['copied from the online weights' if where.startswith('copy of ') else
                 'from ' + where.split(':', 1)[0] if ':' in where else where for where in self.origin.values()]
        return ', '.join(f'{n} {kind}' for kind, n in Counter(kinds).items())  # in order of first appearance


def hf_state_dict_to_blip(weights: Mapping[str, torch.Tensor], label: str
                          ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Rename HF keys to ours: (state_dict, origin of each key, HF keys our model has no place for)."""
    state_dict, origin, unused = {}, {}, []
    for key, value in weights.items():
        name = blip_key(key)
        if name is None:
            unused.append(key)
        else:
            state_dict[name] = value
            origin[name] = f'{label}:{key}'
    return state_dict, origin, unused


def _fill_training_state(model: nn.Module, state_dict: dict, origin: dict,
                         training_state: Optional[Mapping[str, torch.Tensor]]) -> None:
    """Momentum encoders, queues and temp: from training_state.pth, else as BLIP_Retrieval's constructor makes them."""
    if training_state is not None:
        for key, value in training_state.items():
            state_dict[key] = value
            origin[key] = f'{TRAINING_STATE_NAME}:{key}'
    for online, momentum in MOMENTUM_PAIRS:
        for key in [k for k in state_dict if k.startswith(online + '.')]:
            momentum_key = momentum + key[len(online):]
            if momentum_key not in state_dict:  # the same tensor: load_state_dict copies it into both parameters
                state_dict[momentum_key] = state_dict[key]
                origin[momentum_key] = f'copy of {key}'
    if 'temp' not in state_dict:
        state_dict['temp'] = model.temp.detach().clone()
        origin['temp'] = f'initialised ({model.temp.item():g})'
    for key in QUEUE_KEYS:
        origin.setdefault(key, 'initialised (fresh queue)')
    for key in model.state_dict():
        if key.endswith('embeddings.position_ids'):
            origin.setdefault(key, 'initialised (0 .. n-1)')


def load_hf_pretrained(model: nn.Module, pretrained: str, sha256: Optional[str] = None,
                       allow_unsafe: bool = False) -> HFLoadReport:
    """Load a Hub id or a save_pretrained folder of `BlipForImageTextRetrieval` into `model`, strictly."""
    folder = hf_folder(pretrained)
    return load_hf_checkpoint(model, read_hf_folder(folder, sha256, allow_unsafe), pretrained)


def load_hf_checkpoint(model: nn.Module, checkpoint: HFCheckpoint, name: str) -> HFLoadReport:
    """Check the architecture against the model, convert, fill what HF lacks, load, and report each key's origin."""
    label = checkpoint.weight_files[0]
    state_dict, origin, unused = hf_state_dict_to_blip(checkpoint.weights, label)
    weights_shapes = BlipShapes.of(state_dict, name)
    model_shapes = BlipShapes.of(model.state_dict(), 'the model')
    problems = architecture_disagreements(weights_shapes, model_shapes,
                                          checkpoint.config.vision_config.num_attention_heads)
    if problems:
        raise CheckpointError(f"{name} does not fit the run's config (the architecture is read from the "
                              'weights):\n  ' + '\n  '.join(problems))
    contradictions = config_contradictions(checkpoint.config, weights_shapes, model)
    _fill_training_state(model, state_dict, origin, checkpoint.training_state)

    adapted, base = adapt_state_dict(model, state_dict)
    report = HFLoadReport(**vars(base), folder=checkpoint.folder, weight_files=checkpoint.weight_files,
                          origin=origin, config_warnings=contradictions)
    report.unexpected = unused + report.unexpected
    raise_unless_fits(report, name)
    for line in report.skipped_queue:
        origin[line.split(':', 1)[0]] = f'initialised (fresh queue: {TRAINING_STATE_NAME} holds another queue_size)'
    model.load_state_dict(adapted, strict=False)  # every omission was classified above
    for key in list(origin):
        if key not in model.state_dict():
            del origin[key]  # unexpected keys are listed in report.unexpected

    if contradictions:
        _logger.warning("%s: config.json contradicts BLIP; the model uses BLIP's values: %s", name,
                        '; '.join(contradictions))
    if report.unexpected:
        _logger.warning('%s has %d keys the model does not use: %s', name, len(report.unexpected),
                        ', '.join(report.unexpected[:20]))
    for line in report.skipped_queue:
        _logger.info('queue of another size in %s, kept the new empty queue: %s', TRAINING_STATE_NAME, line)
    _logger.info('Loaded Hugging Face BLIP %s (%s): %s', name, checkpoint.folder, report.summary())
    return report

