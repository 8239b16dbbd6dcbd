"""train_retrieval.py end to end: --evaluate, fine-tuning, recall metrics, and clear errors on bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_KWARGS, TINY_MED_CONFIG, VOCAB, assert_close, recall_fields, run_torchrun
from synthetic import write_colour_dataset

import train_retrieval
import utils
from data import create_datasets
from evaluation import evaluate_scores, recall_metrics
from models import blip_retrieval


def tiny_options(data: dict, pretrained: str = '', **extra) -> list[str]:
    options = {
        'image_root': data['image_root'], 'ann_root': data['ann_root'], 'pretrained': pretrained,
        'vit': '{embed_dim: 64, depth: 2, num_heads: 2}', 'med_config': TINY_MED_CONFIG, 'tokenizer': VOCAB,
        'image_size': 32, 'embed_dim': 16, 'queue_size': 16, 'batch_size_train': 8, 'batch_size_test': 4,
        'k_test': 4, 'num_workers': 0, 'vit_grad_ckpt': False, 'vit_ckpt_layer': 0, 'precision': 'fp32',
        'log_every': 5, 'tensorboard': False}
    options.update(extra)
    return ['--options'] + [f'{k}={v}' for k, v in options.items()]


def base_args(config: str = 'configs/retrieval_flickr.yaml') -> list[str]:
    return ['--config', os.path.join(REPO, config), '--device', 'cpu']


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------- metrics
def naive_recall(scores_i2t, scores_t2i, txt2img, img2txt) -> dict:
    """The protocol's definition, one query at a time (ranks from a stable sort; no ties here)."""
    tr, ir = [], []
    for i, row in enumerate(scores_i2t):
        order = sorted(range(len(row)), key=lambda c: -row[c])
        tr.append(min(order.index(t) for t in img2txt[i]))
    for t, row in enumerate(scores_t2i):
        order = sorted(range(len(row)), key=lambda c: -row[c])
        ir.append(order.index(txt2img[t]))
    out = {}
    for name, ranks in (('txt', tr), ('img', ir)):
        for k in (1, 5, 10):
            out[f'{name}_r{k}'] = 100.0 * sum(r < k for r in ranks) / len(ranks)
        out[f'{name}_r_mean'] = (out[f'{name}_r1'] + out[f'{name}_r5'] + out[f'{name}_r10']) / 3
    out['r_mean'] = (out['txt_r_mean'] + out['img_r_mean']) / 2
    return out


@pytest.mark.parametrize('seed', range(5))
def test_recall_metrics_equal_a_naive_loop(seed):
    rng = np.random.default_rng(seed)
    n_images = 30
    txt2img = {t: t // 5 for t in range(5 * n_images)}
    img2txt = {i: list(range(5 * i, 5 * i + 5)) for i in range(n_images)}
    # Scores correlated with the truth so every recall level is exercised.
    truth = np.array([[float(txt2img[t] == i) for t in range(5 * n_images)] for i in range(n_images)])
    scores_i2t = (truth * 1.5 + rng.normal(size=truth.shape)).astype(np.float32)
    scores_t2i = (truth.T * 1.5 + rng.normal(size=truth.T.shape)).astype(np.float32)
    got = recall_metrics(scores_i2t, scores_t2i, txt2img, img2txt)
    want = naive_recall(scores_i2t, scores_t2i, txt2img, img2txt)
    assert got == pytest.approx(want, abs=1e-9)
    assert 0 < got['txt_r1'] < 100 and 0 < got['img_r10'] < 100


# ---------------------------------------------------------------------------------------------- --evaluate
@pytest.fixture(scope='module')
def eval_data(tmp_path_factory):
    return write_colour_dataset(str(tmp_path_factory.mktemp('colours')), n_train=16, n_val=6, n_test=7)


def direct_scores(model, dataset, k_test):
    """Score matrices computed pair by pair with the model's public methods (no evaluation module)."""
    with torch.no_grad():
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        image_embeds, image_feat = model.encode_image(images)
        ids, mask = model.tokenize(dataset.text)
        text_feat = model.encode_text(ids, mask)
        itm_ids = ids.clone()
        itm_ids[:, 0] = model.enc_token_id
        sims = image_feat @ text_feat.t()
        match = torch.zeros_like(sims)
        for i in range(sims.shape[0]):
            for t in range(sims.shape[1]):
                match[i, t] = model.match_logits(itm_ids[t:t + 1], mask[t:t + 1], image_embeds[i:i + 1])[0, 1]
    i2t = torch.full_like(sims, -100.0)
    t2i = torch.full_like(sims.t(), -100.0)
    for i in range(sims.shape[0]):
        top = sims[i].topk(min(k_test, sims.shape[1])).indices
        i2t[i, top] = match[i, top] + sims[i, top]
    for t in range(sims.shape[1]):
        top = sims[:, t].topk(min(k_test, sims.shape[0])).indices
        t2i[t, top] = match[top, t] + sims[top, t]
    return i2t.numpy(), t2i.numpy()


def test_evaluate_matches_direct_computation_and_is_identical_under_two_processes(
        tmp_path, eval_data, golden_checkpoint):
    options = tiny_options(eval_data, golden_checkpoint, k_test=4)
    out1, out2 = tmp_path / 'one', tmp_path / 'two'
    assert train_retrieval.main(base_args() + ['--evaluate', '--output_dir', str(out1)] + options) == 0
    (record,) = read_jsonl(out1 / 'evaluate.txt')

    model = blip_retrieval(golden_checkpoint, **TINY_KWARGS).eval()
    config = {'image_root': eval_data['image_root'], 'ann_root': eval_data['ann_root'], 'dataset': 'flickr',
              'image_size': 32}
    datasets = create_datasets(config, ('val', 'test'))
    for split in ('val', 'test'):
        dataset = datasets[split]
        want_i2t, want_t2i = direct_scores(model, dataset, k_test=4)
        for mode in ('fast', 'reference'):
            loader = [(torch.stack([dataset[i][0] for i in range(len(dataset))]), None)]
            got_i2t, got_t2i = evaluate_scores(model, loader, dataset.text, {'k_test': 4, 'eval_mode': mode},
                                               torch.device('cpu'))
            assert_close(got_i2t, want_i2t, 6, mode)  # the same math in other batches and order
            assert_close(got_t2i, want_t2i, 6, mode)
        metrics = recall_metrics(want_i2t, want_t2i, dataset.txt2img, dataset.img2txt)
        assert {k[len(split) + 1:]: v for k, v in record.items() if k.startswith(split)} == pytest.approx(metrics)

    result = run_torchrun([os.path.join(REPO, 'train_retrieval.py')] + base_args()
                          + ['--evaluate', '--output_dir', str(out2)] + options, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    (record2,) = read_jsonl(out2 / 'evaluate.txt')
    assert json.dumps(recall_fields(record2)) == json.dumps(recall_fields(record))  # the same bytes


def test_bf16_evaluate_is_identical_under_two_processes_with_an_empty_image_shard(tmp_path, golden_checkpoint):
    """bf16 keeps the image tokens in bf16: the rank with no val image must gather that dtype too."""
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=8, n_val=1, n_test=5)
    options = tiny_options(data, golden_checkpoint, precision='bf16', batch_size_test=2)
    out1, out2 = tmp_path / 'one', tmp_path / 'two'
    assert train_retrieval.main(base_args() + ['--evaluate', '--output_dir', str(out1)] + options) == 0
    result = run_torchrun([os.path.join(REPO, 'train_retrieval.py')] + base_args()
                          + ['--evaluate', '--output_dir', str(out2)] + options, nproc=2)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (one,), (two,) = read_jsonl(out1 / 'evaluate.txt'), read_jsonl(out2 / 'evaluate.txt')
    assert json.dumps(recall_fields(two)) == json.dumps(recall_fields(one))
    assert read_jsonl(out1 / 'evaluate.txt')[0]['val_txt_r1'] == 100.0  # one image: all its captions rank first


def test_evaluate_takes_a_queue_size_the_training_batch_does_not_divide(tmp_path, eval_data, golden_checkpoint):
    """Evaluation never fills the queue: batch_size_train 7 with the checkpoint's queue_size 16 must not matter."""
    records = []
    for batch in (8, 7):
        out = tmp_path / str(batch)
        options = tiny_options(eval_data, golden_checkpoint, batch_size_train=batch)
        assert train_retrieval.main(base_args() + ['--evaluate', '--output_dir', str(out)] + options) == 0
        records.append([recall_fields(r) for r in read_jsonl(out / 'evaluate.txt')])
    assert records[0] == records[1]


def test_k_test_larger_than_candidates_is_clamped(tmp_path, eval_data, golden_checkpoint):
    options = tiny_options(eval_data, golden_checkpoint, k_test=1000)
    assert train_retrieval.main(base_args() + ['--evaluate', '--output_dir', str(tmp_path)] + options) == 0
    (record,) = read_jsonl(tmp_path / 'evaluate.txt')
    assert set(recall_fields(record)) == {f'{s}_{k}' for s in ('val', 'test') for k in
                           ('txt_r1', 'txt_r5', 'txt_r10', 'txt_r_mean', 'img_r1', 'img_r5', 'img_r10',
                            'img_r_mean', 'r_mean')}
    assert record['recall_unit'] == '%'  # one of run.results.RUN_FIELDS, which recall_fields leaves out


# ---------------------------------------------------------------------------------------------- fine-tuning
def test_two_process_finetune_learns_and_best_checkpoint_reproduces_val_recall(tmp_path):
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=96, n_val=12, n_test=12)
    out = tmp_path / 'run'
    options = tiny_options(data, '', init_lr=3e-3, max_epoch=3, batch_size_train=8, queue_size=32, k_test=6, momentum=0.9,
                           med_config=os.path.join(REPO, 'tests', 'fixtures', 'tiny_med_config.json'))
    result = run_torchrun([os.path.join(REPO, 'train_retrieval.py')] + base_args()
                          + ['--output_dir', str(out)] + options, nproc=2, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    log = read_jsonl(out / 'log.txt')
    assert [r['epoch'] for r in log] == [0, 1, 2]
    assert log[2]['train_loss_ita'] < log[0]['train_loss_ita']
    assert log[2]['train_loss_itm'] < log[0]['train_loss_itm']
    best = max(log, key=lambda r: r['val_r_mean'])
    assert best['val_r_mean'] > 65, log  # chance is about 40 (12 images, 60 captions)
    assert log[-1]['best_epoch'] == best['epoch']
    for name in ('config.yaml', 'checkpoint_best.pth', 'checkpoint_last.pth'):
        assert (out / name).exists(), name

    # checkpoint_best.pth loads as `pretrained` and reproduces the logged val recall.
    eval_out = tmp_path / 'eval'
    eval_options = tiny_options(data, str(out / 'checkpoint_best.pth'), queue_size=32, k_test=6)
    assert train_retrieval.main(base_args() + ['--evaluate', '--output_dir', str(eval_out)] + eval_options) == 0
    (record,) = read_jsonl(eval_out / 'evaluate.txt')
    assert record['val_r_mean'] == pytest.approx(best['val_r_mean'])
    assert record['val_txt_r1'] == pytest.approx(best['val_txt_r1'])


def test_coco_config_two_processes_with_negatives_from_all_ranks(tmp_path):
    """configs/retrieval_coco.yaml as it is (negative_all_rank: True, k_test 256 > candidates) on COCO-named files."""
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=32, n_val=6, n_test=6, dataset='coco')
    out = tmp_path / 'run'
    options = tiny_options(data, '', init_lr=3e-3, max_epoch=1, batch_size_train=8, queue_size=32, momentum=0.9)
    options = [o for o in options if not o.startswith('k_test=')]  # the config's 256
    result = run_torchrun([os.path.join(REPO, 'train_retrieval.py')] + base_args('configs/retrieval_coco.yaml')
                          + ['--output_dir', str(out)] + options, nproc=2, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (record,) = read_jsonl(out / 'log.txt')
    assert np.isfinite(record['train_loss_ita']) and np.isfinite(record['train_loss_itm'])
    saved = (out / 'config.yaml').read_text()
    assert 'negative_all_rank: true' in saved and 'dataset: coco' in saved and 'k_test: 256' in saved

    # One process, the best checkpoint: the same test recall as the two-process run logged.
    eval_options = [o for o in tiny_options(data, str(out / 'checkpoint_best.pth'), queue_size=32)
                    if not o.startswith('k_test=')]
    assert train_retrieval.main(base_args('configs/retrieval_coco.yaml')
                                + ['--evaluate', '--output_dir', str(tmp_path / 'eval')] + eval_options) == 0
    (evaluated,) = read_jsonl(tmp_path / 'eval' / 'evaluate.txt')
    assert {k: v for k, v in evaluated.items() if k.startswith('test_')} == \
        pytest.approx({k: v for k, v in record.items() if k.startswith('test_')})


# ---------------------------------------------------------------------------------------------- bad input
def run_main_error(args, caplog) -> str:
    caplog.clear()
    assert train_retrieval.main(args) == utils.EXIT_USER_ERROR
    errors = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    assert len(errors) == 1, errors
    return errors[0]


def test_config_typo_names_the_key_and_the_fix(tmp_path, caplog, eval_data):
    message = run_main_error(base_args() + ['--evaluate', '--output_dir', str(tmp_path / 'o')]
                             + tiny_options(eval_data, batch_size_trian=4), caplog)
    assert 'batch_size_trian' in message and "did you mean 'batch_size_train'" in message
    assert not (tmp_path / 'o').exists()


def test_missing_image_is_named_before_anything_runs(tmp_path, caplog, golden_checkpoint):
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=8, n_val=3, n_test=3)
    os.remove(os.path.join(data['image_root'], 'flickr30k-images', 'val0001.jpg'))
    message = run_main_error(base_args() + ['--evaluate', '--output_dir', str(tmp_path / 'o')]
                             + tiny_options(data, golden_checkpoint), caplog)
    assert 'flickr30k-images/val0001.jpg' in message and 'image_root' in message
    assert not (tmp_path / 'o').exists()


def test_missing_annotation_without_network_gives_urls(tmp_path, caplog, monkeypatch):
    import data.annotations as annotations

    def offline(url, dest):
        raise OSError('network is unreachable')
    monkeypatch.setattr(annotations, '_download_file', offline)
    data = {'image_root': str(tmp_path), 'ann_root': str(tmp_path / 'annotation')}
    message = run_main_error(base_args() + ['--evaluate', '--allow_random_weights', '--output_dir',
                                            str(tmp_path / 'o')] + tiny_options(data), caplog)
    assert 'flickr30k_test.json' in message
    assert 'https://storage.googleapis.com/sfr-vision-language-research/datasets/flickr30k_test.json' in message
    assert not (tmp_path / 'o').exists()
