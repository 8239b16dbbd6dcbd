"""Export any checkpoint `pretrained` takes to a folder that `transformers.BlipForImageTextRetrieval` loads.

    python -m models.hf_export SOURCE OUT_DIR [--with-training-state] [--config CONFIG] [--options KEY=VALUE ...]

SOURCE: our checkpoint_best.pth / checkpoint_last.pth, an official .pth (path or URL), a save_pretrained folder
or a Hub id (`owner/name[@revision]`). OUT_DIR gets config.json, model.safetensors, the tokenizer files (with
`[DEC]` and `[ENC]`), preprocessor_config.json (our evaluation transform), a README.md model card and, with
--with-training-state, training_state.pth (momentum encoders, queues, temp: HF has no place for them; importing
the folder back with `pretrained: OUT_DIR` then restores the model bit for bit). The folder is written next to
OUT_DIR and renamed into place: never half a folder.

The architecture (ViT and BERT sizes, image size, embed_dim, tokenizer) comes from, in this order:
  1. --config CONFIG (a training YAML, `--options` applied as train_retrieval.py applies them);
  2. else what SOURCE carries: our checkpoints' `config`, a folder's config.json (with BLIP's values where the
     published Hub configs are wrong: 12 text heads on a 768-wide BERT), and `--options` on top of it;
  3. else the shapes of the weights, with 64-wide attention heads (BLIP's ViT-B 12, ViT-L 16, BERT 12), the
     default med_config's other values and the default tokenizer. Head counts are not stored in weights: give
     --options vit=... med_config=... for a model trained with other heads.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from transformers import BlipConfig, BlipImageProcessor
from transformers.image_utils import PILImageResampling

from atomic import atomic_folder
from config import DEFAULTS, REPO_ROOT, ConfigError, apply_overrides, load_config
from models import hf
from models.blip_retrieval import BLIP_Retrieval, blip_retrieval
from models.checkpoint import (BEST_CHECKPOINT, EVALUATE_LOG, LAST_CHECKPOINT, TRAIN_LOG, CheckpointError,
                               model_state_dict, read_checkpoint)
from models.tokenizer import MAX_TEXT_LENGTH
from transform import NORMALIZE_MEAN, NORMALIZE_STD
from utils import EXIT_USER_ERROR

_logger = logging.getLogger('models.hf_export')

ARCH_KEYS = ('vit', 'med_config', 'image_size', 'embed_dim', 'tokenizer', 'queue_size')
READ_KEYS = ('sha256', 'allow_unsafe_checkpoint')  # how SOURCE is read
EXPORT_KEYS = ARCH_KEYS + READ_KEYS
HEAD_WIDTH = 64  # BLIP's attention heads are 64 wide (ViT-B 12 heads, ViT-L 16, BERT-base 12)
DEFAULT_QUEUE_SIZE = 57600
MED_CONFIG_FIELDS = ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size', 'vocab_size',
                     'max_position_embeddings', 'layer_norm_eps', 'hidden_dropout_prob',
                     'attention_probs_dropout_prob', 'hidden_act', 'pad_token_id', 'initializer_range')
TOKENIZER_FILES = ('tokenizer.json', 'vocab.txt')
RECALL_COLUMNS = (('txt_r1', 'TR@1'), ('txt_r5', 'TR@5'), ('txt_r10', 'TR@10'), ('img_r1', 'IR@1'),
                  ('img_r5', 'IR@5'), ('img_r10', 'IR@10'), ('r_mean', 'mean'))


# ---------------------------------------------------------------------------------------------- architecture
def _default_med_config() -> dict:
    with open(os.path.join(REPO_ROOT, DEFAULTS['med_config'])) as f:
        return json.load(f)


def _heads(width: int, what: str) -> int:
    if width % HEAD_WIDTH:
        raise CheckpointError(f'the {what} is {width} wide, not a multiple of {HEAD_WIDTH}: its head count cannot '
                              'be assumed; give it with --options (vit=... / med_config=...) or --config')
    return width // HEAD_WIDTH


def _vit_setting(width: int, depth: int, heads: int, patch: int, mlp: int) -> Any:
    shapes = (width, depth, heads, patch, mlp)
    if shapes == (768, 12, 12, 16, 3072):
        return 'base'
    if shapes == (1024, 24, 16, 16, 4096):
        return 'large'
    return {'embed_dim': width, 'depth': depth, 'num_heads': heads, 'patch_size': patch, 'mlp_ratio': mlp / width}


def settings_from_shapes(shapes: hf.BlipShapes) -> dict:
    """Architecture of weights that carry no config: 64-wide heads, the default med_config's other values."""
    med_config = _default_med_config()
    med_config.update(hidden_size=shapes.text_width, num_hidden_layers=shapes.text_layers,
                      num_attention_heads=_heads(shapes.text_width, 'text encoder'),
                      intermediate_size=shapes.text_intermediate, vocab_size=shapes.vocab_size,
                      max_position_embeddings=shapes.text_positions, encoder_width=shapes.vision_width)
    vit = _vit_setting(shapes.vision_width, shapes.vision_depth, _heads(shapes.vision_width, 'ViT'),
                       shapes.patch_size, shapes.vision_mlp)
    return {'vit': vit, 'med_config': med_config, 'image_size': shapes.image_size, 'embed_dim': shapes.embed_dim,
            'tokenizer': DEFAULTS['tokenizer'], 'queue_size': DEFAULT_QUEUE_SIZE}


def settings_from_hf_config(config, folder: str) -> dict:
    """Architecture of a save_pretrained folder, from its config.json, with BLIP's head count where it is wrong."""
    vision, text = config.vision_config, config.text_config
    size = lambda value: value[0] if isinstance(value, (list, tuple)) else value  # noqa: E731 (int or (h, w))
    text_heads = text.num_attention_heads
    if text.hidden_size == 768 and text_heads != 12:  # the published Hub configs' bug (transformers #22625)
        text_heads = 12
    med_config = _default_med_config()
    med_config.update({name: getattr(text, name) for name in MED_CONFIG_FIELDS})
    med_config.update(num_attention_heads=text_heads, encoder_width=vision.hidden_size)
    has_tokenizer = any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)
    return {'vit': _vit_setting(vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads,
                                size(vision.patch_size), vision.intermediate_size),
            'med_config': med_config, 'image_size': size(vision.image_size), 'embed_dim': config.image_text_hidden_size,
            'tokenizer': folder if has_tokenizer else DEFAULTS['tokenizer'],
            'queue_size': _training_state_queue_size(folder) or DEFAULT_QUEUE_SIZE}


def _training_state_queue_size(folder: str) -> Optional[int]:
    """The queue size saved in a folder's training_state.pth (memory-mapped: only one shape is read)."""
    path = os.path.join(folder, hf.TRAINING_STATE_NAME)
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        return int(saved['model']['image_queue'].shape[1])
    except Exception as error:  # unreadable: the import reports it properly
        _logger.warning('could not read the queue size from %s (%s)', path, error)
        return None


def source_settings(source: str, sha256: Optional[str], allow_unsafe: bool
                    ) -> tuple[dict, str, Optional[dict], str]:
    """(architecture settings, where they came from, the run config SOURCE carries, what to load) of SOURCE."""
    if hf.is_hf_source(source):
        folder = hf.hf_folder(source)
        return settings_from_hf_config(hf.read_hf_config(folder), folder), 'config.json', None, folder
    checkpoint = read_checkpoint(source, sha256, allow_unsafe)
    state_dict = model_state_dict(checkpoint, source)
    settings = settings_from_shapes(hf.BlipShapes.of(state_dict, source))
    if 'image_queue' in state_dict:
        settings['queue_size'] = int(state_dict['image_queue'].shape[1])
    saved = checkpoint.get('config') if isinstance(checkpoint.get('config'), dict) else None
    origin = 'the shapes of the weights (64-wide attention heads)'
    if saved:
        carried = {key: saved[key] for key in ARCH_KEYS if saved.get(key) is not None}
        if isinstance(carried.get('med_config'), str) and not os.path.isfile(carried['med_config']):
            raise CheckpointError(f"{source}'s config names med_config {carried['med_config']}, which is not here: "
                                  'pass --options med_config=PATH (the BERT config it was trained with)')
        settings.update(carried)
        origin = f"the checkpoint's config ({', '.join(carried)})" if carried else origin
    return settings, origin, saved, source


def _resolve_path(path: str) -> str:
    """A config path as train_retrieval takes it: from the current directory, else from the repository root."""
    return path if os.path.exists(path) else os.path.join(REPO_ROOT, path)


def export_settings(source: str, config_path: Optional[str], options: list[str]
                    ) -> tuple[dict, str, Optional[dict], str]:
    """The architecture to build for SOURCE (see the module docstring for the order)."""
    if config_path:
        config = load_config(config_path, options)
        settings = {key: config[key] for key in EXPORT_KEYS}
        _, _, carried, load_from = source_settings(source, settings['sha256'], settings['allow_unsafe_checkpoint'])
        return settings, config_path, carried, load_from
    overrides = apply_overrides({}, options)
    unknown = sorted(set(overrides) - set(EXPORT_KEYS))
    if unknown:
        raise ConfigError(f'--options {", ".join(unknown)}: without --config, hf_export takes only '
                          f'{", ".join(EXPORT_KEYS)} (the architecture and how SOURCE is read)')
    sha256, allow_unsafe = overrides.get('sha256'), bool(overrides.get('allow_unsafe_checkpoint', False))
    settings, origin, carried, load_from = source_settings(source, sha256, allow_unsafe)
    if isinstance(settings.get('vit'), dict) and isinstance(overrides.get('vit'), dict):
        overrides['vit'] = {**settings['vit'], **overrides['vit']}
    settings.update(overrides, sha256=sha256, allow_unsafe_checkpoint=allow_unsafe)
    if isinstance(settings['med_config'], str):
        settings['med_config'] = _resolve_path(settings['med_config'])
    if overrides:
        origin += f"; --options {', '.join(overrides)}"
    return settings, origin, carried, load_from


# ---------------------------------------------------------------------------------------------- the folder
def hf_config_for(model: BLIP_Retrieval) -> BlipConfig:
    """transformers' BlipConfig of `model`, with BLIP's values (eps 1e-6, the real head counts, is_decoder)."""
    shapes = hf.BlipShapes.of(model.state_dict(), 'the model')
    block = model.visual_encoder.blocks[0]
    text = model.text_encoder.config
    tokenizer = model.tokenizer
    vision_config = dict(hidden_size=shapes.vision_width, intermediate_size=shapes.vision_mlp,
                         num_hidden_layers=shapes.vision_depth, num_attention_heads=block.attn.num_heads,
                         image_size=shapes.image_size, patch_size=shapes.patch_size, hidden_act='gelu',
                         layer_norm_eps=block.norm1.eps, attention_dropout=0.0)
    text_config = dict(vocab_size=shapes.vocab_size, hidden_size=shapes.text_width,
                       encoder_hidden_size=shapes.vision_width, intermediate_size=shapes.text_intermediate,
                       num_hidden_layers=shapes.text_layers, num_attention_heads=text.num_attention_heads,
                       max_position_embeddings=shapes.text_positions, hidden_act=text.hidden_act,
                       layer_norm_eps=text.layer_norm_eps, hidden_dropout_prob=text.hidden_dropout_prob,
                       attention_probs_dropout_prob=text.attention_probs_dropout_prob,
                       initializer_range=text.initializer_range, is_decoder=True,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id)
    config = BlipConfig(text_config=text_config, vision_config=vision_config,
                        image_text_hidden_size=shapes.embed_dim)
    config.architectures = [hf.HF_ARCHITECTURE]
    return config


def write_tokenizer(tokenizer, folder: str, max_length: int) -> None:
    """tokenizer.json / tokenizer_config.json with `[DEC]` (bos) and `[ENC]` as added tokens, plus vocab.txt."""
    saved_max_length = tokenizer.model_max_length
    tokenizer.model_max_length = max_length
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.model_max_length = saved_max_length
    # vocab.txt by hand: transformers 5's save_vocabulary fails for a tokenizer built from a vocab file, and
    # transformers 4's slow BertTokenizer (and our `tokenizer:` key on it) reads vocab.txt.
    vocab = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    with open(os.path.join(folder, 'vocab.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(vocab) + '\n')


def write_image_processor(folder: str, image_size: int) -> None:
    """preprocessor_config.json of our evaluation transform: bicubic resize to a square, /255, CLIP mean/std."""
    BlipImageProcessor(size={'height': image_size, 'width': image_size}, resample=PILImageResampling.BICUBIC,
                       do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                       image_mean=list(NORMALIZE_MEAN), image_std=list(NORMALIZE_STD),
                       do_convert_rgb=True).save_pretrained(folder)


def write_hf_folder(model: BLIP_Retrieval, folder: str, with_training_state: bool, model_card: str) -> list[str]:
    """Every file of the export into `folder` (an empty temp folder); returns their names."""
    weights, training_state = hf.to_hf_state_dict(model.state_dict())
    config = hf_config_for(model)
    config.to_json_file(os.path.join(folder, hf.CONFIG_NAME), use_diff=False)  # every value, defaults included
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, os.path.join(folder, hf.SAFETENSORS_NAME),
              metadata={'format': 'pt'})
    write_tokenizer(model.tokenizer, folder, config.text_config.max_position_embeddings)
    write_image_processor(folder, model.image_size)
    if with_training_state:
        torch.save({'format': hf.TRAINING_STATE_FORMAT, 'version': 1,
                    'model': {k: v.detach().clone() for k, v in training_state.items()}},
                   os.path.join(folder, hf.TRAINING_STATE_NAME))
    with open(os.path.join(folder, 'README.md'), 'w', encoding='utf-8') as f:
        f.write(model_card)
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------------------- model card
def find_results(source: str) -> Optional[tuple[dict, str]]:
    """(val_* / test_* recall, where from) in log.txt or evaluate.txt next to a local checkpoint file."""
    if not os.path.isfile(source):
        return None
    directory, name = os.path.split(os.path.abspath(source))
    log_path, eval_path = os.path.join(directory, TRAIN_LOG), os.path.join(directory, EVALUATE_LOG)
    try:
        if name in (BEST_CHECKPOINT, LAST_CHECKPOINT) and os.path.isfile(log_path):
            with open(log_path) as f:
                records = [json.loads(line) for line in f if line.strip()]
            last = records[-1]
            if name == BEST_CHECKPOINT:
                record = next(r for r in records if r.get('epoch') == last['best_epoch'])
                return record, f'{TRAIN_LOG}, best epoch {record["epoch"]}'
            keep_test = last.get('best_epoch') == last.get('epoch')  # log.txt's test_* are the best epoch's
            return ({k: v for k, v in last.items() if keep_test or not k.startswith('test_')},
                    f'{TRAIN_LOG}, last epoch {last.get("epoch")}')
        if os.path.isfile(eval_path):
            with open(eval_path) as f:
                lines = [line for line in f if line.strip()]
            return json.loads(lines[-1]), EVALUATE_LOG
    except (OSError, ValueError, KeyError, IndexError, StopIteration) as error:
        _logger.warning('could not read the recall next to %s (%s); the model card will have none', source, error)
    return None


def recall_table(results: dict) -> str:
    rows = ['| split | ' + ' | '.join(title for _, title in RECALL_COLUMNS) + ' |',
            '| --- |' + ' --- |' * len(RECALL_COLUMNS)]
    for split in ('val', 'test'):
        if any(f'{split}_{key}' in results for key, _ in RECALL_COLUMNS):
            cells = [f'{results[f"{split}_{key}"]:.2f}' if f'{split}_{key}' in results else '' for key, _ in
                     RECALL_COLUMNS]
            rows.append(f'| {split} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows)


def model_card(model: BLIP_Retrieval, source: str, settings: dict, origin: str, run_config: Optional[dict],
               results: Optional[tuple[dict, str]], with_training_state: bool) -> str:
    """README.md: recall, architecture, config, and how to use it with transformers."""
    config = hf_config_for(model)
    vision, text = config.vision_config, config.text_config
    k_test = (run_config or {}).get('k_test', 128)
    protocol = ('the ITC similarity alone: k_test 0' if k_test == 0 else f'ITM re-ranking of the ITC top {k_test}')
    dataset = (run_config or {}).get('dataset')
    lines = ['---', 'library_name: transformers', 'tags:', '- blip', '- image-text-retrieval',
             '- image-text-matching', '---', '',
             f'# BLIP image-text retrieval{f" ({dataset})" if dataset else ""}', '',
             f'BLIP ([Li et al., 2022](https://arxiv.org/abs/2201.12086)) for image-text retrieval, exported from '
             f'`{source}` with `python -m models.hf_export`. It loads with '
             f'`transformers.BlipForImageTextRetrieval.from_pretrained`.', '', '## Recall', '']
    if results:
        lines += [f'From {results[1]} (TR: text retrieval, image to its captions; IR: image retrieval; in '
                  f'percent; {protocol}):', '', recall_table(results[0]), '']
    else:
        lines += ['No evaluation was found next to the checkpoint (log.txt or evaluate.txt).', '']
    lines += ['## Architecture', '',
              f'- ViT: width {vision.hidden_size}, {vision.num_hidden_layers} layers, {vision.num_attention_heads} '
              f'heads, patch {vision.patch_size}, {vision.image_size} px images, LayerNorm eps '
              f'{vision.layer_norm_eps:g}',
              f'- BERT with cross-attention in every layer: width {text.hidden_size}, {text.num_hidden_layers} layers, '
              f'{text.num_attention_heads} heads, vocabulary {text.vocab_size} (`[DEC]` = {text.bos_token_id}, '
              f'`[ENC]` = {model.enc_token_id})',
              f'- contrastive projections to {config.image_text_hidden_size}; architecture from {origin}',
              '- ' + ('`training_state.pth`: momentum encoders, feature queues and `temp`, which the Hugging Face '
                      'format has no place for (`pretrained: <this folder>` in the BLIP retrieval trainer restores '
                      'them)' if with_training_state else
                      'momentum encoders, queues and `temp` not included (an import starts them afresh)'), '']
    shown = run_config if run_config else {k: v for k, v in settings.items() if k in ARCH_KEYS}
    lines += ['## Config', '', 'The training run\'s config:' if run_config else 'The export\'s architecture:', '',
              '```json', json.dumps(shown, indent=2, sort_keys=False, default=str), '```', '']
    lines += ['## Usage with transformers', '',
              'Tokenize captions as BLIP does (lower case; `.!"()*#:;~` replaced by spaces; at most 30 words; '
              f'padded or cut to {MAX_TEXT_LENGTH} tokens). Contrastive (ITC) scores use the ids as they come, '
              'with `[CLS]` first; for matching (ITM) put `[ENC]` first instead, as BLIP was trained: with '
              '`[CLS]` the matching logits change. `preprocessor_config.json` is our evaluation transform '
              f'(bicubic resize to {model.image_size} x {model.image_size}, /255, CLIP mean and std); '
              'transformers 5 resizes tensors by default (up to one grey level apart), and `backend="pil"` '
              '(transformers 4: `use_fast=False`) reproduces our pixels exactly.', '',
              '```python', 'import torch', 'from PIL import Image',
              'from transformers import AutoImageProcessor, AutoTokenizer, BlipForImageTextRetrieval', '',
              'folder = "path/or/hub-id"',
              'model = BlipForImageTextRetrieval.from_pretrained(folder).eval()',
              'tokenizer = AutoTokenizer.from_pretrained(folder)',
              'processor = AutoImageProcessor.from_pretrained(folder, backend="pil")',
              'pixels = processor(images=Image.open("image.jpg").convert("RGB"), return_tensors="pt").pixel_values',
              f'text = tokenizer(["a dog runs on the grass"], padding="max_length", truncation=True, '
              f'max_length={MAX_TEXT_LENGTH}, return_tensors="pt")',
              'with torch.no_grad():',
              '    itc = model(text.input_ids, pixels, attention_mask=text.attention_mask,',
              '                use_itm_head=False).itm_score  # (1, 1) cosine',
              '    itm_ids = text.input_ids.clone()',
              '    itm_ids[:, 0] = tokenizer.convert_tokens_to_ids("[ENC]")',
              '    itm = model(itm_ids, pixels, attention_mask=text.attention_mask).itm_score  # (1, 2)',
              'match_logit = itm[:, 1]  # class 1 = match', '```', '',
              f'**The paper\'s numbers** come from re-ranking, not from either head alone: compute the ITC cosine of '
              f'every image-text pair; for each image keep its top {k_test or 128} texts (`k_test`) and score each as '
              'match logit (`itm_score[:, 1]`, before any softmax) + cosine; do the same for each text over the '
              'images; every other pair scores -100. Recall@K: an image counts as found at K when any of its '
              'captions ranks in the top K.', '']
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------- export
def export(source: str, out_dir: str, with_training_state: bool = False, config_path: Optional[str] = None,
           options: Optional[list[str]] = None, overwrite: bool = False) -> BLIP_Retrieval:
    """Build the model SOURCE needs, load SOURCE as `pretrained` would, and write OUT_DIR; returns the model."""
    out_abs = os.path.abspath(out_dir)
    if os.path.isdir(out_abs) and os.listdir(out_abs) and not overwrite:  # fail before any work
        raise CheckpointError(f'{out_dir} is not empty: pass --overwrite to replace it, or choose another OUT_DIR')
    if os.path.exists(out_abs) and not os.path.isdir(out_abs):
        raise CheckpointError(f'{out_dir} is a file, not a folder: choose another OUT_DIR')
    settings, origin, run_config, load_from = export_settings(source, config_path, options or [])
    _logger.info('Architecture from %s: vit %s, image_size %s, embed_dim %s', origin, settings['vit'],
                 settings['image_size'], settings['embed_dim'])
    kwargs = {key: settings[key] for key in ARCH_KEYS}
    model = blip_retrieval(load_from, sha256=settings['sha256'],
                           allow_unsafe_checkpoint=settings['allow_unsafe_checkpoint'], **kwargs).eval()
    card = model_card(model, source, settings, origin, run_config, find_results(source), with_training_state)
    try:
        with atomic_folder(out_dir, replace=overwrite) as folder:
            files = write_hf_folder(model, folder, with_training_state, card)
    except FileExistsError:  # filled by someone else while the export ran
        raise CheckpointError(f'{out_dir} is not empty: pass --overwrite to replace it') from None
    _logger.info('Wrote %s: %s', out_dir, ', '.join(files))
    return model


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m models.hf_export', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('source', metavar='SOURCE', help='anything `pretrained` takes: .pth path or URL, '
                        'save_pretrained folder, Hub id owner/name[@revision]')
    parser.add_argument('out_dir', metavar='OUT_DIR', help='the folder to write (must be empty or absent)')
    parser.add_argument('--with-training-state', action='store_true',
                        help='also write training_state.pth (momentum encoders, queues, temp)')
    parser.add_argument('--config', default=None, help='training YAML giving the architecture')
    parser.add_argument('--options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='override config keys (vit, med_config, image_size, embed_dim, tokenizer, queue_size, '
                             'sha256, allow_unsafe_checkpoint), e.g. --options vit=large')
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty OUT_DIR')
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    try:
        export(args.source, args.out_dir, args.with_training_state, args.config, args.options, args.overwrite)
    except (CheckpointError, ConfigError, ValueError, OSError) as error:
        _logger.error('%s', error)
        return EXIT_USER_ERROR
    return 0


if __name__ == '__main__':
    sys.exit(main())
