"""Hugging Face BLIP weights in and out, against transformers' BlipForImageTextRetrieval (random weights, offline)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoTokenizer, BlipConfig, BlipForImageTextRetrieval

from conftest import REPO, TINY_KWARGS, TINY_MED_CONFIG, VOCAB, recall_fields, run_torchrun
from synthetic import write_colour_dataset
from test_train_retrieval import base_args, read_jsonl, tiny_options

import train_retrieval
import utils
from models import BLIP_Retrieval, blip_retrieval, hf, hf_export
from models.checkpoint import CheckpointError
from transform import build_eval_transform

# fp32 through a few layers: the two implementations differ only in the order of their sums (about 1e-6).
ATOL = RTOL = 1e-5
CAPTIONS = ['a dog runs on the grass', 'two cats play with a red ball in the garden near a tree', 'a car',
            'people are walking down a busy city street at night under bright lights']
TINY_OPTIONS = ['vit={embed_dim: 64, depth: 2, num_heads: 2}', f'med_config={TINY_MED_CONFIG}', f'tokenizer={VOCAB}',
                'embed_dim=16']


# ---------------------------------------------------------------------------------------------- helpers
def hf_config(vision_width: int, vision_heads: int, text_width: int, text_heads: int, embed_dim: int,
              vision_eps: float = 1e-6) -> BlipConfig:
    """Two layers on each side, 32 px images: tiny or base width at a small CPU cost."""
    return BlipConfig(
        vision_config=dict(hidden_size=vision_width, intermediate_size=4 * vision_width, num_hidden_layers=2,
                           num_attention_heads=vision_heads, image_size=32, patch_size=16, layer_norm_eps=vision_eps),
        text_config=dict(vocab_size=30524, hidden_size=text_width, intermediate_size=4 * text_width,
                         num_hidden_layers=2, num_attention_heads=text_heads, max_position_embeddings=512),
        image_text_hidden_size=embed_dim)


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Weights of BLIP's scale, one generator per name (HF's own init gives its ViT near-zero embeddings)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            param.copy_(torch.randn(param.shape, generator=g) * 0.02)
            if name.endswith('weight') and ('norm' in name.lower()):
                param.add_(1.0)
    return model.eval()


def inputs(model: BLIP_Retrieval):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids, mask = model.tokenize(CAPTIONS)
    return images, ids, mask


@torch.no_grad()
def our_outputs(model: BLIP_Retrieval, images, ids, mask) -> dict:
    image_embeds, image_feat = model.encode_image(images)
    itm_ids = ids.clone()
    itm_ids[:, 0] = model.enc_token_id
    match = torch.stack([model.match_logits(itm_ids, mask, image_embeds=image_embeds[i:i + 1].expand(len(ids), -1, -1))
                         for i in range(len(images))])
    return {'vision': image_embeds, 'itc': image_feat @ model.encode_text(ids, mask).t(), 'itm': match}


@torch.no_grad()
def hf_outputs(model: BlipForImageTextRetrieval, images, ids, mask, enc_token_id: int) -> dict:
    itm_ids = ids.clone()
    itm_ids[:, 0] = enc_token_id
    match = torch.stack([model(itm_ids, images[i:i + 1].expand(len(ids), -1, -1, -1), attention_mask=mask).itm_score
                         for i in range(len(images))])
    return {'vision': model.vision_model(pixel_values=images).last_hidden_state,
            'itc': model(ids, images, attention_mask=mask, use_itm_head=False).itm_score, 'itm': match}


def assert_outputs_close(got: dict, want: dict) -> None:
    for name in ('vision', 'itc', 'itm'):
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=RTOL, msg=lambda m: f'{name}: {m}')


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:10]


def hf_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == 'models.hf' and r.levelno >= logging.WARNING]


@pytest.fixture(scope='module')
def base_med_config(tmp_path_factory) -> str:
    """configs/med_config.json (BLIP's BERT, 768 wide, 12 heads) with 2 layers."""
    with open(os.path.join(REPO, 'configs', 'med_config.json')) as f:
        config = json.load(f)
    config['num_hidden_layers'] = 2
    path = tmp_path_factory.mktemp('med') / 'med_config_2_layers.json'
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope='module')
def base_kwargs(base_med_config) -> dict:
    return dict(TINY_KWARGS, vit={'embed_dim': 768, 'depth': 2, 'num_heads': 12}, med_config=base_med_config,
                embed_dim=256)


@pytest.fixture(scope='module')
def hf_folders(tmp_path_factory) -> dict:
    """save_pretrained folders of random BlipForImageTextRetrieval models: tiny and base width."""
    root = tmp_path_factory.mktemp('hf')
    folders = {}
    for name, config in (('tiny', hf_config(64, 2, 64, 2, 16)), ('base', hf_config(768, 12, 768, 12, 256))):
        model = randomize_(BlipForImageTextRetrieval(config))
        model.save_pretrained(root / name)
        folders[name] = (str(root / name), model)
    return folders


# ---------------------------------------------------------------------------------------------- HF -> ours
@pytest.mark.parametrize('size', ['tiny', 'base'])
def test_hf_folder_loads_with_the_outputs_of_transformers(size, hf_folders, base_kwargs, caplog):
    folder, hf_model = hf_folders[size]
    kwargs = TINY_KWARGS if size == 'tiny' else base_kwargs
    caplog.set_level(logging.INFO)
    model = blip_retrieval(folder, **kwargs).eval()
    assert hf_warnings(caplog) == []  # a correct config.json: nothing to warn about
    images, ids, mask = inputs(model)
    assert_outputs_close(our_outputs(model, images, ids, mask), hf_outputs(hf_model, images, ids, mask,
                                                                           model.enc_token_id))
    report = model.load_report
    assert isinstance(report, hf.HFLoadReport) and report.clean
    assert report.origin['visual_encoder.blocks.1.attn.qkv.weight'] == \
        'model.safetensors:vision_model.encoder.layers.1.self_attn.qkv.weight'
    assert report.origin['visual_encoder.pos_embed'] == 'model.safetensors:vision_model.embeddings.position_embedding'
    assert report.origin['text_encoder_m.encoder.layer.0.crossattention.self.key.weight'] == \
        'copy of text_encoder.encoder.layer.0.crossattention.self.key.weight'
    assert report.origin['temp'] == 'initialised (0.07)' and report.origin['image_queue'].startswith('initialised')
    assert set(report.origin) == set(model.state_dict())  # every key of the model has an origin
    # Momentum encoders are copies of the online weights, temp is 0.07, queues are fresh (normalised columns).
    for online, momentum in (('visual_encoder', 'visual_encoder_m'), ('text_encoder', 'text_encoder_m'),
                             ('vision_proj', 'vision_proj_m'), ('text_proj', 'text_proj_m')):
        for p, p_m in zip(getattr(model, online).parameters(), getattr(model, momentum).parameters()):
            assert torch.equal(p, p_m)
    assert model.temp.item() == pytest.approx(0.07)
    torch.testing.assert_close(model.image_queue.norm(dim=0), torch.ones(16))


def test_wrong_hub_config_is_named_in_one_warning_and_blip_values_are_used(hf_folders, base_kwargs, tmp_path, caplog):
    """The published Hub configs' values: vision eps 1e-5 and 8 text heads on a 768-wide BERT (transformers #22625)."""
    good_folder, good_hf = hf_folders['base']
    folder = tmp_path / 'wrong'
    shutil.copytree(good_folder, folder)
    config = json.loads((folder / 'config.json').read_text())
    config['vision_config']['layer_norm_eps'] = 1e-5
    config['text_config']['num_attention_heads'] = 8
    (folder / 'config.json').write_text(json.dumps(config))

    caplog.set_level(logging.INFO)
    model = blip_retrieval(str(folder), **base_kwargs).eval()
    (warning,) = hf_warnings(caplog)
    assert 'vision_config.layer_norm_eps = 1e-05 (used: 1e-06' in warning
    assert 'text_config.num_attention_heads = 8 (used: 12' in warning
    assert model.load_report.config_warnings and len(model.load_report.config_warnings) == 2

    images, ids, mask = inputs(model)
    want = hf_outputs(good_hf, images, ids, mask, model.enc_token_id)
    assert_outputs_close(our_outputs(model, images, ids, mask), want)
    # The test has teeth: transformers itself, reading the wrong config, gives other matching logits.
    wrong_hf = BlipForImageTextRetrieval.from_pretrained(str(folder)).eval()
    got_wrong = hf_outputs(wrong_hf, images, ids, mask, model.enc_token_id)
    assert (got_wrong['itm'] - want['itm']).abs().max() > 1e-3
    assert (got_wrong['vision'] - want['vision']).abs().max() > 1e-4

    # Exporting that folder writes a config.json with BLIP's values, which transformers then reads right.
    out = tmp_path / 'fixed'
    assert hf_export.main([str(folder), str(out), '--options', f'tokenizer={VOCAB}']) == 0
    fixed = json.loads((out / 'config.json').read_text())
    assert (fixed['vision_config']['layer_norm_eps'], fixed['text_config']['num_attention_heads']) == (1e-6, 12)
    check_export(str(out), model)


def test_is_decoder_false_is_named_and_cross_attention_kept(hf_folders, tmp_path, caplog):
    folder = tmp_path / 'encoder_only'
    shutil.copytree(hf_folders['tiny'][0], folder)
    config = json.loads((folder / 'config.json').read_text())
    config['text_config']['is_decoder'] = False
    (folder / 'config.json').write_text(json.dumps(config))
    model = blip_retrieval(str(folder), **TINY_KWARGS).eval()
    (warning,) = hf_warnings(caplog)
    assert 'text_config.is_decoder = False (used: True' in warning
    images, ids, mask = inputs(model)
    assert_outputs_close(our_outputs(model, images, ids, mask),
                         hf_outputs(hf_folders['tiny'][1], images, ids, mask, model.enc_token_id))


def test_bin_and_sharded_folders_load_the_same_weights(hf_folders, tmp_path):
    folder, hf_model = hf_folders['tiny']
    want = blip_retrieval(folder, **TINY_KWARGS).state_dict()
    bin_folder = tmp_path / 'bin'
    bin_folder.mkdir()
    shutil.copy(os.path.join(folder, 'config.json'), bin_folder)
    torch.save(hf_model.state_dict(), bin_folder / 'pytorch_model.bin')
    sharded = tmp_path / 'sharded'
    hf_model.save_pretrained(sharded, max_shard_size='2MB')
    assert (sharded / 'model.safetensors.index.json').exists()
    for other in (bin_folder, sharded):
        got = blip_retrieval(str(other), **TINY_KWARGS).state_dict()
        online = [k for k in want if not k.endswith('_queue')]
        assert_same_state({k: want[k] for k in online}, {k: got[k] for k in online})

    torch.save({'weights': NotATensor()}, bin_folder / 'pytorch_model.bin')  # needs a full pickle load
    with pytest.raises(CheckpointError, match='(?s)weights_only=True.*allow_unsafe_checkpoint'):
        blip_retrieval(str(bin_folder), **TINY_KWARGS)


class NotATensor:
    """An object a weights_only load refuses."""


def test_folder_that_does_not_fit_the_config_names_the_key(hf_folders, tmp_path, caplog):
    folder = hf_folders['tiny'][0]
    for change, key, fix in ((dict(image_size=64), '`image_size`', 'set image_size: 32'),
                             (dict(vit={'embed_dim': 64, 'depth': 3, 'num_heads': 2}), '`vit`', 'depth 2'),
                             (dict(embed_dim=32), '`embed_dim`', 'set embed_dim: 16')):
        with pytest.raises(CheckpointError) as error:
            blip_retrieval(folder, **dict(TINY_KWARGS, **change))
        assert key in str(error.value) and fix in str(error.value)
    with open(TINY_MED_CONFIG) as f:
        three_layers = dict(json.load(f), num_hidden_layers=3)
    with pytest.raises(CheckpointError, match='`med_config`: the weights hold a text encoder of width 64, 2 layers'):
        blip_retrieval(folder, **dict(TINY_KWARGS, med_config=three_layers))

    # Through the command line: exit code 2, one message naming the key, nothing written.
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=8, n_val=2, n_test=2)
    caplog.clear()
    args = base_args() + ['--evaluate', '--output_dir', str(tmp_path / 'out')] + tiny_options(data, folder,
                                                                                               image_size=64)
    assert train_retrieval.main(args) == utils.EXIT_USER_ERROR
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    assert '`image_size`' in message
    assert not (tmp_path / 'out').exists()


def test_folders_without_config_or_weights_are_explained(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(CheckpointError, match='has no config.json'):
        blip_retrieval(str(empty), **TINY_KWARGS)
    (empty / 'config.json').write_text(json.dumps({'model_type': 'clip'}))
    with pytest.raises(CheckpointError, match="model_type 'clip', not a BLIP model"):
        blip_retrieval(str(empty), **TINY_KWARGS)
    (empty / 'config.json').write_text(hf_config(64, 2, 64, 2, 16).to_json_string())
    with pytest.raises(CheckpointError, match='has config.json but no weights'):
        blip_retrieval(str(empty), **TINY_KWARGS)


def test_hub_ids_are_told_apart_from_paths(tmp_path):
    assert hf.is_hf_source('Salesforce/blip-itm-base-coco')
    assert hf.is_hf_source('Salesforce/blip-itm-base-coco@refs/pr/3')
    assert hf.is_hf_source(str(tmp_path))  # a folder
    for not_hub in ('output/checkpoint_best.pth', '/abs/owner/name', './owner/name', 'model_base.pth',
                    'https://storage.googleapis.com/x/model_base.pth', 'name-only'):
        assert not hf.is_hf_source(not_hub), not_hub


# ---------------------------------------------------------------------------------------------- Hub ids offline
def fake_hub_cache(cache: str, repo_id: str, revision: str, folder: str) -> str:
    """The layout huggingface_hub leaves after a download: refs/<revision> -> snapshots/<commit>/files."""
    commit = 'a' * 40
    storage = os.path.join(cache, 'models--' + repo_id.replace('/', '--'))
    os.makedirs(os.path.join(storage, 'refs'))
    with open(os.path.join(storage, 'refs', revision), 'w') as f:
        f.write(commit)
    shutil.copytree(folder, os.path.join(storage, 'snapshots', commit))
    return os.path.join(storage, 'snapshots', commit)


def test_hub_id_with_revision_loads_from_the_cache_offline(hf_folders, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE / HF_HOME are read by huggingface_hub at import: set the values it read, as they would be."""
    import huggingface_hub.constants as hub_constants
    cache = str(tmp_path / 'hub')
    snapshot = fake_hub_cache(cache, 'someone/tiny-blip', 'v1', hf_folders['tiny'][0])
    monkeypatch.setattr(hub_constants, 'HF_HUB_CACHE', cache)
    monkeypatch.setattr(hub_constants, 'HF_HUB_OFFLINE', True)
    model = blip_retrieval('someone/tiny-blip@v1', **TINY_KWARGS)
    assert os.path.realpath(model.load_report.folder) == os.path.realpath(snapshot)
    want = blip_retrieval(hf_folders['tiny'][0], **TINY_KWARGS).state_dict()
    assert all(torch.equal(want[k], v) for k, v in model.state_dict().items() if not k.endswith('_queue'))
    with pytest.raises(CheckpointError, match='someone/tiny-blip@v2: HF_HUB_OFFLINE is set'):
        blip_retrieval('someone/tiny-blip@v2', **TINY_KWARGS)


def test_offline_hub_id_not_in_cache_stops_with_one_message_and_writes_nothing(tmp_path):
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=8, n_val=2, n_test=2)
    out = tmp_path / 'out'
    args = (base_args() + ['--evaluate', '--output_dir', str(out)]
            + tiny_options(data, 'Salesforce/blip-itm-base-flickr'))
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf_home'), PYTHONPATH=REPO)
    env.pop('HF_HUB_CACHE', None)
    result = subprocess.run([sys.executable, os.path.join(REPO, 'train_retrieval.py')] + args, cwd=str(tmp_path),
                            env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert 'Traceback' not in output
    errors = [line for line in output.splitlines() if ' ERROR ' in line]
    assert len(errors) == 1, output[-3000:]
    assert 'Salesforce/blip-itm-base-flickr' in errors[0] and 'HF_HUB_OFFLINE is set' in errors[0]
    assert 'hf download Salesforce/blip-itm-base-flickr --local-dir DIR' in output
    assert 'set `pretrained: DIR`' in output
    assert not out.exists()
    assert not (tmp_path / 'hf_home' / 'hub' / 'models--Salesforce--blip-itm-base-flickr' / 'snapshots').exists()


# ---------------------------------------------------------------------------------------------- ours -> HF
def check_export(folder: str, model: BLIP_Retrieval) -> None:
    """transformers loads the folder with no missing or unexpected keys and gives our outputs."""
    hf_model, info = BlipForImageTextRetrieval.from_pretrained(folder, output_loading_info=True)
    assert info == {'missing_keys': set(), 'unexpected_keys': set(), 'mismatched_keys': set(), 'error_msgs': []}
    images, ids, mask = inputs(model)
    assert_outputs_close(hf_outputs(hf_model.eval(), images, ids, mask, model.enc_token_id),
                         our_outputs(model, images, ids, mask))


def test_golden_tiny_checkpoint_exports_and_round_trips_bit_for_bit(golden_checkpoint, golden, tmp_path):
    out = tmp_path / 'export'
    assert hf_export.main([golden_checkpoint, str(out), '--with-training-state', '--options', *TINY_OPTIONS]) == 0
    assert sorted(os.listdir(out)) == ['README.md', 'config.json', 'model.safetensors', 'preprocessor_config.json',
                                       'tokenizer.json', 'tokenizer_config.json', 'training_state.pth', 'vocab.txt']
    assert not [name for name in os.listdir(tmp_path) if name.startswith('.')]  # no temp folder left
    original = blip_retrieval(golden_checkpoint, **TINY_KWARGS).eval()
    check_export(str(out), original)

    config = json.loads((out / 'config.json').read_text())
    assert config['architectures'] == ['BlipForImageTextRetrieval']
    vision, text = config['vision_config'], config['text_config']
    assert (vision['layer_norm_eps'], vision['num_attention_heads'], vision['image_size'], vision['hidden_size']) == \
        (1e-6, 2, 32, 64)
    assert (text['num_attention_heads'], text['vocab_size'], text['is_decoder'], text['bos_token_id']) == \
        (2, 30524, True, 30522)
    assert config['image_text_hidden_size'] == 16

    # Ours -> HF -> ours: every tensor, the training state included, bit for bit.
    back = blip_retrieval(str(out), **TINY_KWARGS)
    assert_same_state(original.state_dict(), back.state_dict())
    assert back.load_report.origin['image_queue'] == 'training_state.pth:image_queue'

    # The tokenizer as transformers loads it: same ids, [DEC] bos, [ENC] added.
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert len(tokenizer) == 30524 and tokenizer.bos_token == '[DEC]'
    assert tokenizer.convert_tokens_to_ids('[ENC]') == original.enc_token_id == 30523
    encoded = tokenizer(golden['captions'], padding='max_length', truncation=True, max_length=35)
    assert encoded['input_ids'] == golden['input_ids']

    # The image processor reproduces the evaluation transform (PIL backend: exactly).
    processor_config = json.loads((out / 'preprocessor_config.json').read_text())
    assert processor_config['size'] == {'height': 32, 'width': 32} and processor_config['resample'] == 3
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (57, 83, 3), dtype=np.uint8))
    processor = AutoImageProcessor.from_pretrained(str(out), backend='pil')
    pixels = processor(images=image, return_tensors='pt')['pixel_values'][0]
    assert torch.equal(pixels, build_eval_transform(32)(image))

    # The model card's usage code runs as written and gives our matching logit and cosine.
    card = (out / 'README.md').read_text()
    assert 'top 128 texts' in card
    code = card.split('```python\n')[1].split('```')[0]
    image.save(tmp_path / 'image.jpg', quality=95)
    code = code.replace('"path/or/hub-id"', repr(str(out))).replace('"image.jpg"', repr(str(tmp_path / 'image.jpg')))
    namespace = {}
    exec(code, namespace)
    ids, mask = original.tokenize(['a dog runs on the grass'])
    pixels = build_eval_transform(32)(Image.open(tmp_path / 'image.jpg').convert('RGB'))[None]
    want = our_outputs(original, pixels, ids, mask)
    torch.testing.assert_close(namespace['match_logit'], want['itm'][0, :, 1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(namespace['itc'], want['itc'], atol=ATOL, rtol=RTOL)


def test_base_width_official_style_pth_exports_with_64_wide_heads(base_kwargs, tmp_path):
    """A .pth with weights only (as the official files): the architecture comes from the shapes."""
    torch.manual_seed(0)
    model = BLIP_Retrieval(**base_kwargs).eval()
    path = tmp_path / 'model_base_like.pth'
    torch.save({'model': model.state_dict()}, path)
    out = tmp_path / 'export'
    assert hf_export.main([str(path), str(out), '--options', f'tokenizer={VOCAB}']) == 0
    config = json.loads((out / 'config.json').read_text())
    assert (config['vision_config']['num_attention_heads'], config['text_config']['num_attention_heads']) == (12, 12)
    assert (config['vision_config']['layer_norm_eps'], config['vision_config']['image_size']) == (1e-6, 32)
    check_export(str(out), model)
    back = blip_retrieval(str(out), **base_kwargs).state_dict()
    original = model.state_dict()
    assert_same_state({k: v for k, v in original.items() if not k.endswith('_queue')},
                      {k: v for k, v in back.items() if not k.endswith('_queue')})


def test_export_of_a_training_run_has_its_recall_and_config_in_the_model_card(golden_checkpoint, tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    checkpoint = torch.load(golden_checkpoint, weights_only=True)
    config = {'vit': TINY_KWARGS['vit'], 'image_size': 32, 'med_config': TINY_MED_CONFIG, 'embed_dim': 16,
              'tokenizer': VOCAB, 'queue_size': 16, 'k_test': 64, 'dataset': 'flickr'}
    torch.save({'model': checkpoint['model'], 'config': config, 'epoch': 1}, run / 'checkpoint_best.pth')
    records = [{'val_txt_r1': 50.0, 'val_r_mean': 60.0, 'test_txt_r1': 40.0, 'test_img_r1': 30.0, 'test_r_mean': 45.0,
                'epoch': 0, 'best_epoch': 0},
               {'val_txt_r1': 70.0, 'val_r_mean': 80.0, 'test_txt_r1': 66.0, 'test_img_r1': 55.5, 'test_r_mean': 61.25,
                'epoch': 1, 'best_epoch': 1},
               {'val_txt_r1': 65.0, 'val_r_mean': 75.0, 'test_txt_r1': 66.0, 'test_img_r1': 55.5, 'test_r_mean': 61.25,
                'epoch': 2, 'best_epoch': 1}]
    (run / 'log.txt').write_text(''.join(json.dumps(r) + '\n' for r in records))
    out = tmp_path / 'export'
    assert hf_export.main([str(run / 'checkpoint_best.pth'), str(out)]) == 0  # the checkpoint's config suffices
    card = (out / 'README.md').read_text()
    assert 'log.txt, best epoch 1' in card
    assert '| val | 70.00 |' in card and '| test | 66.00 |' in card and '55.50' in card
    assert '"k_test": 64' in card and 'top 64 texts' in card
    check_export(str(out), blip_retrieval(golden_checkpoint, **TINY_KWARGS).eval())


def test_export_never_leaves_half_a_folder(golden_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / 'export'
    assert hf_export.main([golden_checkpoint, str(out), '--options', *TINY_OPTIONS]) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert hf_export.main([golden_checkpoint, str(out), '--options', *TINY_OPTIONS]) == 2  # not empty: kept

    def disk_full(folder, image_size):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(hf_export, 'write_image_processor', disk_full)  # fails halfway through the files
    assert hf_export.main([golden_checkpoint, str(out), '--overwrite', '--options', *TINY_OPTIONS]) == 2
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ['export']  # no temp folder left beside it
    assert hf_export.main([golden_checkpoint, str(tmp_path / 'new'), '--options', *TINY_OPTIONS]) == 2
    assert sorted(os.listdir(tmp_path)) == ['export']


def test_export_command_line_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'models.hf_export', str(tmp_path / 'missing.pth'),
                             str(tmp_path / 'out')], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, HF_HUB_OFFLINE='1'))
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert 'Traceback' not in output and 'checkpoint file not found' in output
    assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------------------------- the command line
def test_evaluate_from_exported_folder_equals_pth_and_finetune_starts_from_it(golden_checkpoint, tmp_path):
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=16, n_val=6, n_test=7)
    folder = tmp_path / 'hf_folder'
    assert hf_export.main([golden_checkpoint, str(folder), '--options', *TINY_OPTIONS]) == 0
    runs = {}
    for name, pretrained in (('pth', golden_checkpoint), ('folder', str(folder))):
        runs[name] = tmp_path / name
        args = base_args() + ['--evaluate', '--output_dir', str(runs[name])] + tiny_options(data, pretrained)
        assert train_retrieval.main(args) == 0
    two = tmp_path / 'folder_two_processes'
    result = run_torchrun([os.path.join(REPO, 'train_retrieval.py')] + base_args()
                          + ['--evaluate', '--output_dir', str(two)] + tiny_options(data, str(folder)), nproc=2)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    want = [recall_fields(r) for r in read_jsonl(runs['pth'] / 'evaluate.txt')]
    assert [recall_fields(r) for r in read_jsonl(runs['folder'] / 'evaluate.txt')] == want
    assert [recall_fields(r) for r in read_jsonl(two / 'evaluate.txt')] == want

    # Fine-tuning from the folder (no training state: momentum copies, fresh queues). With lr 0 the weights after
    # the epoch are still the folder's, bit for bit, so the run provably started from them.
    finetune = tmp_path / 'finetune'
    args = base_args() + ['--output_dir', str(finetune)] + tiny_options(data, str(folder), init_lr=0, min_lr=0,
                                                                         max_epoch=1)
    assert train_retrieval.main(args) == 0
    saved = torch.load(finetune / 'checkpoint_last.pth', weights_only=True)['model']
    weights = load_file(str(folder / 'model.safetensors'))
    for key, value in weights.items():
        assert torch.equal(saved[hf.blip_key(key)], value), key
    assert torch.equal(saved['text_encoder_m.encoder.layer.1.output.dense.weight'],
                       weights['text_encoder.encoder.layer.1.output.dense.weight'])
    (record,) = read_jsonl(finetune / 'log.txt')
    (evaluated,) = read_jsonl(runs['folder'] / 'evaluate.txt')
    assert {k: v for k, v in record.items() if k.startswith('val_')} == \
        {k: v for k, v in evaluated.items() if k.startswith('val_')}
