"""Results worth comparing: the contrastive-only protocol (k_test 0), test evaluated only when val improves, the
fields every evaluate.txt / log.txt record carries, and `python -m report.table` over several runs."""
from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from conftest import REPO, TINY_KWARGS, run_torchrun
from synthetic import write_colour_dataset
from test_train_retrieval import base_args, naive_recall, read_jsonl, tiny_options

import train_retrieval
from data import create_datasets, create_eval_loader
from evaluation import evaluate_scores
from models import blip_retrieval
from models import checkpoint as checkpoint_module
from report.table import build_table
from run.results import RUN_FIELDS, checkpoint_identity, cpu_model

RECALL = ('txt_r1', 'txt_r5', 'txt_r10', 'txt_r_mean', 'img_r1', 'img_r5', 'img_r10', 'img_r_mean', 'r_mean')
ORIGINAL_EVALUATE_KEYS = {f'{split}_{key}' for split in ('val', 'test') for key in RECALL}


def original(record: dict) -> dict:
    """The keys records had before the result fields (recall, train_*, epoch, best_epoch)."""
    return {k: v for k, v in record.items() if k not in RUN_FIELDS}


def assert_result_fields(record: dict, *, protocol: str, k_test: int, world_size: int, checkpoint: str,
                         seconds_of: tuple[str, ...] = ('val', 'test')) -> None:
    """Every result field is there, of its type, with the run's values."""
    assert set(RUN_FIELDS) <= set(record), set(RUN_FIELDS) - set(record)
    assert record['recall_unit'] == '%'
    assert set(record['eval_seconds']) == set(seconds_of)
    assert all(isinstance(s, float) and s > 0 for s in record['eval_seconds'].values()), record['eval_seconds']
    assert record['device'] == cpu_model() and isinstance(record['device'], str) and record['device']
    assert record['world_size'] == world_size and record['precision'] == 'fp32'
    assert (record['protocol'], record['k_test']) == (protocol, k_test) and isinstance(record['k_test'], int)
    assert record['dataset'] == 'flickr'
    assert record['images'] == {'val': 6, 'test': 7} and record['texts'] == {'val': 30, 'test': 35}
    assert record['pretrained'] == checkpoint
    assert record['checkpoint_bytes'] == os.path.getsize(checkpoint) and isinstance(record['checkpoint_bytes'], int)
    with open(checkpoint, 'rb') as f:
        assert record['checkpoint_sha256'] == hashlib.sha256(f.read()).hexdigest()
    assert record['checkpoint_revision'] is None  # a local file has no Hub revision


def datasets_of(data: dict) -> dict:
    config = {'image_root': data['image_root'], 'ann_root': data['ann_root'], 'dataset': 'flickr', 'image_size': 32}
    return create_datasets(config, ('val', 'test'))


def itc_similarity(model, dataset) -> torch.Tensor:
    """images x texts contrastive similarity from the model's public encoders, all at once (no evaluation module)."""
    with torch.no_grad():
        _, image_feat = model.encode_image(torch.stack([dataset[i][0] for i in range(len(dataset))]))
        ids, mask = model.tokenize(dataset.text)
        return image_feat @ model.encode_text(ids, mask).t()


# ---------------------------------------------------------------------------------------------- must show 1
def test_itc_only_recall_equals_recall_by_hand_from_the_similarity_under_one_and_two_processes(result_runs,
                                                                                              tmp_path):
    (record,) = read_jsonl(result_runs['runs']['itc'] / 'evaluate.txt')
    golden = result_runs['checkpoints']['golden']
    model = blip_retrieval(golden, **TINY_KWARGS).eval()
    for split, dataset in datasets_of(result_runs['data']).items():
        sims = itc_similarity(model, dataset)
        want = naive_recall(sims.numpy(), sims.t().numpy(), dataset.txt2img, dataset.img2txt)
        assert {key: record[f'{split}_{key}'] for key in RECALL} == pytest.approx(want, abs=1e-9), split
        # The score matrices are the similarity itself, both ways, and nothing else (no -100: no top-k).
        i2t, t2i = evaluate_scores(model, create_eval_loader(dataset, 4, 0), dataset.text, {'k_test': 0},
                                   torch.device('cpu'))
        torch.testing.assert_close(torch.from_numpy(i2t), sims, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(t2i), sims.t(), rtol=1e-5, atol=1e-6)
    assert_result_fields(record, protocol='itc', k_test=0, world_size=1, checkpoint=golden)
    page = (result_runs['runs']['itc'] / 'report' / 'index.html').read_text()
    assert 'data-protocol="itc"' in page and 'protocol: itc' in page
    assert 'not re-ranked' in page and 'score ' not in page.split('</h1>')[1].split('<section class="gallery')[1]

    two = tmp_path / 'two'
    result = run_torchrun([os.path.join(REPO, 'train_retrieval.py')] + base_args()
                          + ['--evaluate', '--output_dir', str(two)]
                          + tiny_options(result_runs['data'], golden, k_test=0, report=False), nproc=2)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert 'protocol: itc' in result.stdout
    (record_two,) = read_jsonl(two / 'evaluate.txt')
    assert original(record_two) == original(record)  # the same recall, bit for bit
    assert_result_fields(record_two, protocol='itc', k_test=0, world_size=2, checkpoint=golden)


# ---------------------------------------------------------------------------------------------- must show 4
def test_every_evaluate_record_keeps_the_original_keys_and_adds_typed_result_fields(result_runs):
    for name, (checkpoint, k_test) in {'itm': ('golden', 4), 'official_name': ('model_base_retrieval_flickr.pth', 4),
                                       'itc': ('golden', 0)}.items():
        (record,) = read_jsonl(result_runs['runs'][name] / 'evaluate.txt')
        assert set(record) == ORIGINAL_EVALUATE_KEYS | set(RUN_FIELDS)
        assert list(record)[:len(ORIGINAL_EVALUATE_KEYS)] == [f'{s}_{k}' for s in ('val', 'test') for k in RECALL]
        assert_result_fields(record, protocol='itc' if k_test == 0 else 'itm', k_test=k_test, world_size=1,
                             checkpoint=result_runs['checkpoints'][checkpoint])


def test_checkpoint_identity_of_a_hub_id_url_and_folder_and_one_hash_per_file(tmp_path, monkeypatch,
                                                                              golden_checkpoint):
    from huggingface_hub import constants
    cache = tmp_path / 'hub'
    repo = cache / 'models--Salesforce--blip-itm-base-flickr'
    for ref, commit in (('main', 'a' * 40), ('v1', 'b' * 40)):
        (repo / 'refs').mkdir(parents=True, exist_ok=True)
        (repo / 'refs' / ref).write_text(commit)
        (repo / 'snapshots' / commit).mkdir(parents=True)
        (repo / 'snapshots' / commit / 'config.json').write_text('{}')
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    identity = checkpoint_identity('Salesforce/blip-itm-base-flickr')
    assert identity == {'pretrained': 'Salesforce/blip-itm-base-flickr', 'checkpoint_bytes': None,
                        'checkpoint_sha256': None, 'checkpoint_revision': 'a' * 40}
    assert checkpoint_identity('Salesforce/blip-itm-base-flickr@v1')['checkpoint_revision'] == 'b' * 40
    assert checkpoint_identity('Salesforce/not-downloaded')['checkpoint_revision'] is None
    assert checkpoint_identity('') == {'pretrained': '', 'checkpoint_bytes': None, 'checkpoint_sha256': None,
                                       'checkpoint_revision': None}

    # A URL: its copy in the torch hub cache (none yet: null, nothing downloaded), then hashed once.
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'torch_hub'))
    url = 'https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base_retrieval_coco.pth'
    assert checkpoint_identity(url)['checkpoint_sha256'] is None
    (tmp_path / 'torch_hub' / 'checkpoints').mkdir(parents=True)
    copy = tmp_path / 'torch_hub' / 'checkpoints' / 'model_base_retrieval_coco.pth'
    copy.write_bytes(b'weights' * 1000)
    hashed = []
    real_sha256 = checkpoint_module.hashlib.sha256
    monkeypatch.setattr(checkpoint_module.hashlib, 'sha256', lambda: hashed.append(1) or real_sha256())
    for _ in range(2):
        assert checkpoint_identity(url) == {'pretrained': url, 'checkpoint_bytes': 7000, 'checkpoint_sha256':
                                            hashlib.new('sha256', b'weights' * 1000).hexdigest(),
                                            'checkpoint_revision': None}
    checkpoint_module.verify_sha256(str(copy), hashlib.new('sha256', b'weights' * 1000).hexdigest())
    assert len(hashed) == 1  # the file was read once for the record and the `sha256:` check
    # A save_pretrained folder: its weights file.
    folder = tmp_path / 'hf'
    folder.mkdir()
    (folder / 'model.safetensors').write_bytes(b'x' * 10)
    assert checkpoint_identity(str(folder))['checkpoint_bytes'] == 10


# ---------------------------------------------------------------------------------------------- must show 2
@pytest.fixture(scope='module')
def finetune_data(tmp_path_factory):
    return write_colour_dataset(str(tmp_path_factory.mktemp('finetune')), n_train=8, n_val=6, n_test=7)


def finetune(out, data, checkpoint, monkeypatch, **extra) -> tuple[list[dict], Counter]:
    """A 3-epoch fine-tune in this process; (its log.txt records, evaluations per split)."""
    evaluated = Counter()
    real = train_retrieval.evaluate_split

    def counting(model, dataset, *args, **kwargs):
        evaluated['test' if dataset.name.endswith('_test.json') else 'val'] += 1
        return real(model, dataset, *args, **kwargs)

    monkeypatch.setattr(train_retrieval, 'evaluate_split', counting)
    settings = {'init_lr': FINETUNE_LR, 'max_epoch': 3, 'momentum': 0.9, 'report': False, **extra}
    options = tiny_options(data, checkpoint, **settings)
    assert train_retrieval.main(base_args() + ['--output_dir', str(out)] + options) == 0
    monkeypatch.undo()
    return read_jsonl(out / 'log.txt'), evaluated


FINETUNE_LR = 1e-3  # val r_mean 55.56, 58.33, 58.33: better at epochs 0 and 1, not at 2


def test_test_is_evaluated_only_when_val_improves_and_log_txt_is_the_same(tmp_path, finetune_data, monkeypatch,
                                                                         golden_checkpoint):
    # lr 0: the online weights, hence val, stay as they are, so val improves at epoch 0 only (whatever the random
    # streams); the losses still move with the queue, the dropout and the negatives drawn.
    frozen = {'init_lr': 0, 'min_lr': 0}
    log, evaluated = finetune(tmp_path / 'default', finetune_data, golden_checkpoint, monkeypatch, **frozen)
    every_log, every = finetune(tmp_path / 'every', finetune_data, golden_checkpoint, monkeypatch,
                                eval_test_every_epoch=True, **frozen)
    improved = [r['epoch'] for r in log if r['best_epoch'] == r['epoch']]
    assert every == {'val': 3, 'test': 3}
    assert evaluated == {'val': 3, 'test': len(improved)}
    assert improved == [0], ('val improved after epoch 0 with lr 0', log)
    # log.txt holds the best epoch's test either way: every record is the same but for the evaluation times.
    assert [{k: v for k, v in r.items() if k != 'eval_seconds'} for r in log] == \
        [{k: v for k, v in r.items() if k != 'eval_seconds'} for r in every_log]
    for record, every_record in zip(log, every_log):
        assert set(record) == set(every_record)
        assert_result_fields(record, protocol='itm', k_test=4, world_size=1, checkpoint=golden_checkpoint)
        best = next(r for r in log if r['epoch'] == record['best_epoch'])
        assert record['eval_seconds']['test'] == best['eval_seconds']['test']  # the time of the test it holds
        train_keys = ('loss_ita', 'loss_itm', 'lr', 'itm_negatives_left_out')  # the last: accum_steps' issue
        assert set(original(record)) == {f'train_{k}' for k in train_keys} | {'epoch', 'best_epoch'} \
            | ORIGINAL_EVALUATE_KEYS

    # report.table takes a fine-tune's folder too: its best epoch.
    rows, skipped = build_table([str(tmp_path / 'default')], str(tmp_path / 'table'))
    best = next(r for r in log if r['epoch'] == log[-1]['best_epoch'])
    assert skipped == [] and [(row['split'], row['r_mean'], row['eval_seconds']) for row in rows] == \
        [(split, best[f'{split}_r_mean'], best['eval_seconds'][split]) for split in ('val', 'test')]
    assert rows[0]['source'] == f'log.txt: fine-tune, best epoch {best["epoch"]}'


def test_eval_every_evaluates_val_every_n_epochs_and_after_the_last(tmp_path, finetune_data, monkeypatch,
                                                                   golden_checkpoint):
    log, evaluated = finetune(tmp_path / 'run', finetune_data, golden_checkpoint, monkeypatch, eval_every=2)
    assert evaluated['val'] == 2  # after the second epoch and after the last (the third)
    assert [r['epoch'] for r in log] == [0, 1, 2]
    assert [any(k.startswith('val_') for k in r) for r in log] == [False, True, True]
    assert log[0]['best_epoch'] == -1 and not any(k.startswith('test_') for k in log[0])
    assert log[0]['eval_seconds'] == {} and set(log[1]['eval_seconds']) == {'val', 'test'}
    assert log[1]['best_epoch'] == 1 and log[2]['best_epoch'] in (1, 2)
    assert log[2]['eval_seconds']['test'] == log[log[2]['best_epoch']]['eval_seconds']['test']


def test_eval_scheduling_keys_change_on_resume_without_a_warning(caplog):
    from config import load_config
    from run.checkpoints import adopt_resumed_config
    saved = load_config(os.path.join(REPO, 'configs', 'retrieval_flickr.yaml'), ['seed=1'])
    caplog.set_level('INFO')
    adopt_resumed_config({**saved, 'eval_every': 3, 'eval_test_every_epoch': True}, {'config': saved}, 'last.pth')
    assert [r.levelname for r in caplog.records] == ['INFO'] and 'eval_every: 1 -> 3' in caplog.text
    caplog.clear()
    adopt_resumed_config({**saved, 'k_test': 0}, {'config': saved}, 'last.pth')  # the protocol changes results
    assert [r.levelname for r in caplog.records] == ['WARNING'] and 'k_test: 128 -> 0' in caplog.text


# ---------------------------------------------------------------------------------------------- must show 3
def test_results_table_equals_each_evaluate_txt_and_names_the_broken_run(result_runs, tmp_path):
    runs = result_runs['runs']
    out = tmp_path / 'table'
    # The command as users run it: two folders, a glob (quoted: expanded by report.table) and the broken folder.
    result = subprocess.run([sys.executable, '-m', 'report.table', str(runs['itm']), str(runs['official_name']),
                             str(runs['itc'].parent / 'it[c]'), str(result_runs['broken']), '--out', str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'skipped {result_runs["broken"]}: the last line of evaluate.txt is not JSON' in result.stderr
    assert sorted(os.listdir(out)) == ['index.html', 'results.csv', 'results.md']
    with open(out / 'results.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [(row['run'], row['split']) for row in rows] == [(str(runs[name]), split) for name in
                                                            ('itm', 'official_name', 'itc') for split in ('val', 'test')]
    for row in rows:
        (record,) = read_jsonl(os.path.join(row['run'], 'evaluate.txt'))
        split = row['split']
        for key in ('txt_r1', 'txt_r5', 'txt_r10', 'img_r1', 'img_r5', 'img_r10', 'r_mean'):
            assert float(row[key]) == record[f'{split}_{key}'], key  # the same float, not a rounded one
        assert float(row['eval_seconds']) == record['eval_seconds'][split]
        assert int(row['images']) == record['images'][split] and int(row['texts']) == record['texts'][split]
        for key in ('checkpoint_sha256', 'dataset', 'protocol', 'device', 'precision'):
            assert row[key] == record[key], key
        assert (row['checkpoint'], int(row['k_test']), int(row['world_size'])) == \
            (record['pretrained'], record['k_test'], record['world_size'])
        assert os.path.isfile(out / row['report']) and row['report'].endswith(os.path.join('report', 'index.html'))
        official = row['run'] == str(runs['official_name']) and split == 'test'
        if official:  # named as the official Flickr checkpoint: the paper's numbers and our difference from them
            assert (float(row['paper_txt_r1']), float(row['paper_img_r1'])) == (97.3, 87.3)
            assert float(row['txt_r1_minus_paper']) == record['test_txt_r1'] - 97.3
            assert float(row['img_r1_minus_paper']) == record['test_img_r1'] - 87.3
        else:
            assert row['paper_txt_r1'] == row['txt_r1_minus_paper'] == ''
    assert {row['protocol'] for row in rows if row['run'] == str(runs['itc'])} == {'itc'}

    markdown = (out / 'results.md').read_text()
    assert len([line for line in markdown.splitlines() if line.startswith('| ') and '| val |' in line]) == 3
    assert f'- skipped `{result_runs["broken"]}`' in markdown
    page = (out / 'index.html').read_text()
    assert page.count('<tr data-run=') == 6 and page.count('>report</a>') == 6
    assert f'<li data-run="{result_runs["broken"]}">' in page and 'http' not in page

    # Nothing readable: the pages are still written, the exit code says so.
    result = subprocess.run([sys.executable, '-m', 'report.table', str(result_runs['broken']), str(tmp_path / 'none*'),
                             '--out', str(tmp_path / 'empty')], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and 'no run could be read' in result.stderr
    assert f'skipped {tmp_path / "none*"}: the pattern matches nothing' in result.stderr
