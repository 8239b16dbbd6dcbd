"""python -m data.prepare_pairs: your own pairs (CSV, JSONL, COCO JSON) to BLIP's files, checked, split, configured."""
from __future__ import annotations

import csv
import json
import os
import random
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, recall_fields, run_torchrun
from synthetic import write_colour_dataset
from test_train_retrieval import base_args, read_jsonl, tiny_options

import train_retrieval
from data import prepare_pairs as prep
from data.annotations import load_annotation

SPLITS = ('train', 'val', 'test')
# Every pair re-ranked (k_test is clamped to the candidates): with fewer, the pairs left unscored tie at one score
# and R@K for K > k_test depends on the order of the files, which preparing changes.
K_TEST = 128


@pytest.fixture(scope='module')
def colours(tmp_path_factory) -> dict:
    """The colour dataset (BLIP files flickr30k_*.json) and its pairs, one (image, caption, split) per caption."""
    root = tmp_path_factory.mktemp('colours')
    data = write_colour_dataset(str(root / 'data'), n_train=16, n_val=6, n_test=7)
    pairs = []
    for split in SPLITS:
        for record in load_annotation(os.path.join(data['ann_root'], f'flickr30k_{split}.json'), split):
            captions = record['caption'] if isinstance(record['caption'], list) else [record['caption']]
            pairs += [(record['image'], caption, split) for caption in captions]
    return {**data, 'pairs': pairs, 'root': root}


@pytest.fixture(scope='module')
def original_recall(colours, golden_checkpoint, tmp_path_factory) -> dict:
    """The recall fields of evaluate.txt of the golden tiny model on the original BLIP-format files."""
    out = tmp_path_factory.mktemp('original_eval')
    assert train_retrieval.main(base_args() + ['--evaluate', '--output_dir', str(out)]
                                + tiny_options(colours, golden_checkpoint, k_test=K_TEST)) == 0
    (record,) = read_jsonl(out / 'evaluate.txt')
    assert record['recall_unit'] == '%' and record['dataset'] == 'flickr'
    return recall_fields(record)


def write_csv(path, rows, header=('image', 'caption', 'split')) -> str:
    with open(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def shuffled(pairs, seed=0) -> list:
    pairs = list(pairs)
    random.Random(seed).shuffle(pairs)
    return pairs


def prepare(source, image_root, ann_root, *extra) -> int:
    return prep.main([str(source), '--image-root', str(image_root), '--ann-root', str(ann_root), '--name', 'mine',
                      *map(str, extra)])


def captions_by_image(ann_root, name) -> dict:
    """{split: {image: sorted captions}} of BLIP files, checked to be in BLIP's format as the datasets read it.

    Prepared files only (name 'mine'): one numeric image_id per image (the colour dataset gives one per colour).
    """
    out = {}
    for split in SPLITS:
        records = load_annotation(os.path.join(ann_root, f'{name}_{split}.json'), split)
        by_image = {}
        for record in records:
            texts = record['caption'] if isinstance(record['caption'], list) else [record['caption']]
            by_image.setdefault(record['image'], []).extend(texts)
        if split == 'train' and name == 'mine':
            ids = {record['image']: record['image_id'] for record in records}
            assert all(isinstance(i, int) for i in ids.values()) and len(set(ids.values())) == len(ids)
            assert all(record['image_id'] == ids[record['image']] for record in records)
        elif split != 'train':
            assert len(by_image) == len(records)  # one record per image
        out[split] = {image: sorted(texts) for image, texts in by_image.items()}
    return out


def evaluate_prepared(ann_root, colours, checkpoint, out, nproc=1) -> dict:
    """The recall fields of evaluate.txt after evaluating the prepared files (the run's own fields, such as
    dataset, world_size and eval_seconds, differ from the original files' run by design)."""
    args = base_args() + ['--evaluate', '--output_dir', str(out)] + tiny_options(
        {'image_root': colours['image_root'], 'ann_root': str(ann_root)}, checkpoint, dataset='mine', k_test=K_TEST)
    if nproc == 1:
        assert train_retrieval.main(args) == 0
    else:
        result = run_torchrun([os.path.join(REPO, 'train_retrieval.py')] + args, nproc=nproc)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (record,) = read_jsonl(out / 'evaluate.txt')
    assert record['recall_unit'] == '%' and record['dataset'] == 'mine' and record['world_size'] == nproc
    return recall_fields(record)


# ---------------------------------------------------------------------------------------------- 1. same recall
def test_csv_with_a_split_column_gives_the_recall_of_the_original_files_under_one_and_two_processes(
        tmp_path, colours, golden_checkpoint, original_recall):
    source = write_csv(tmp_path / 'pairs.csv', shuffled(colours['pairs']))
    assert prepare(source, colours['image_root'], tmp_path / 'ann') == 0
    assert captions_by_image(tmp_path / 'ann', 'mine') == captions_by_image(colours['ann_root'], 'flickr30k')
    assert 0 < original_recall['val_r_mean'] < 100
    assert evaluate_prepared(tmp_path / 'ann', colours, golden_checkpoint, tmp_path / 'one') == original_recall
    assert evaluate_prepared(tmp_path / 'ann', colours, golden_checkpoint, tmp_path / 'two', nproc=2) == \
        original_recall


def test_jsonl_with_other_columns_caption_lists_and_absolute_paths_gives_the_same_recall(
        tmp_path, colours, golden_checkpoint, original_recall):
    by_image = {}
    for image, caption, split in colours['pairs']:
        by_image.setdefault((image, split), []).append(caption)
    lines = []
    for number, ((image, split), captions) in enumerate(by_image.items()):
        path = os.path.join(colours['image_root'], image) if number % 2 else image  # absolute under the root
        if split == 'train':  # one row per caption
            lines += [{'file': path, 'text': caption, 'part': split.upper()} for caption in captions]
        else:  # one row per image, its captions as a list
            lines.append({'file': path, 'text': captions, 'part': split})
    source = tmp_path / 'pairs.jsonl'
    source.write_text('\n'.join(json.dumps(line) for line in shuffled(lines)) + '\n')
    assert prepare(source, colours['image_root'], tmp_path / 'ann', '--image-column', 'file', '--caption-column',
                   'text', '--split-column', 'part') == 0
    assert captions_by_image(tmp_path / 'ann', 'mine') == captions_by_image(colours['ann_root'], 'flickr30k')
    assert evaluate_prepared(tmp_path / 'ann', colours, golden_checkpoint, tmp_path / 'eval') == original_recall


def test_coco_captions_json_gives_the_same_recall(tmp_path, colours, golden_checkpoint, original_recall):
    images, annotations = {}, []
    for image, caption, split in shuffled(colours['pairs'], seed=1):
        entry = images.setdefault(image, {'id': 1000 + len(images), 'file_name': image, 'split': split})
        annotations.append({'id': len(annotations), 'image_id': entry['id'], 'caption': caption})
    source = tmp_path / 'captions.json'
    source.write_text(json.dumps({'info': {}, 'images': list(images.values()), 'annotations': annotations}, indent=1))
    assert prepare(source, colours['image_root'], tmp_path / 'ann') == 0
    summary = json.loads((tmp_path / 'ann' / 'mine_summary.json').read_text())
    assert summary['format'] == 'coco' and summary['split_by'] == "column 'split'"
    assert captions_by_image(tmp_path / 'ann', 'mine') == captions_by_image(colours['ann_root'], 'flickr30k')
    assert evaluate_prepared(tmp_path / 'ann', colours, golden_checkpoint, tmp_path / 'eval') == original_recall


# ---------------------------------------------------------------------------------------------- 2. bad rows
def test_bad_rows_stop_the_real_command_naming_their_lines_and_skip_bad_rows_drops_and_counts_them(
        tmp_path, colours):
    image_root = tmp_path / 'images'  # a copy: the module's dataset stays clean
    shutil.copytree(os.path.join(colours['image_root'], 'flickr30k-images'), image_root / 'flickr30k-images')
    whole = (image_root / colours['pairs'][0][0]).read_bytes()
    (image_root / 'truncated.jpg').write_bytes(whole[:len(whole) // 2])  # a JPEG header, then nothing
    good = list(colours['pairs'])
    first_train = next(p for p in good if p[2] == 'train')
    bad = [('flickr30k-images/missing.jpg', 'a red photo', 'train'),  # line 2
           (first_train[0], '   ', 'train'),  # line 3: empty caption
           ('truncated.jpg', 'a cut photo', 'train'),  # line 4
           first_train]  # line 5: a duplicate of a row further down
    many_missing = [(f'flickr30k-images/gone{i}.jpg', 'a photo', 'train') for i in range(22)]
    long_caption = ' '.join(['word'] * 40)
    non_english = [(first_train[0], f'ภาพถ่ายสีแดงสวยงาม {i}', 'train') for i in range(30)]
    rows = bad + good + [(first_train[0], long_caption, 'train')] + non_english + many_missing
    source = write_csv(tmp_path / 'pairs.csv', rows)
    ann_root, config = tmp_path / 'ann', tmp_path / 'mine.yaml'

    env = dict(os.environ, PYTHONPATH=REPO)
    command = [sys.executable, '-m', 'data.prepare_pairs', source, '--image-root', str(image_root),
               '--ann-root', str(ann_root), '--name', 'mine', '--write-config', str(config)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr
    assert f'{source}:2: image flickr30k-images/missing.jpg not found' in message
    assert f'{source}:3: empty caption' in message
    assert f'{source}:4: image truncated.jpg cannot be decoded' in message
    line_of_original = 1 + len(bad) + 1 + good.index(first_train)
    assert f'{source}:{line_of_original}: duplicate of line 5' in message
    assert 'problem(s)' in message and '... and 6 more' in message  # 26 problems, 20 listed
    assert '--skip-bad-rows' in message
    assert not ann_root.exists() and not config.exists() and not list(tmp_path.glob('.mine.yaml*'))

    assert prepare(source, image_root, ann_root, '--write-config', config, '--skip-bad-rows') == 0
    summary = json.loads((ann_root / 'mine_summary.json').read_text())
    assert summary['dropped'] == {'rows': 26, 'captions': 26, 'by_problem': {
        'missing image': 23, 'empty caption': 1, 'unreadable image': 1, 'duplicate': 1}}
    prepared = captions_by_image(ann_root, 'mine')
    images = {image for split in prepared.values() for image in split}
    assert 'flickr30k-images/missing.jpg' not in images and 'truncated.jpg' not in images
    assert prepared['train'][first_train[0]].count(first_train[1]) == 1
    warnings = '\n'.join(summary['warnings'])
    assert '1 of ' in warnings and 'longer than max_words=30 words' in warnings  # the 40-word caption
    assert 'are [UNK] under tokenizer' in warnings  # the Thai captions
    assert 'smaller than image_size=384 px' in warnings  # 32-px images


# ---------------------------------------------------------------------------------------------- 3. random split
def test_without_a_split_column_the_split_is_by_image_with_the_counts_asked_and_follows_the_seed(tmp_path, colours):
    source = write_csv(tmp_path / 'pairs.csv', [(image, caption) for image, caption, _ in colours['pairs']],
                       header=('image', 'caption'))
    n_images = len({image for image, _, _ in colours['pairs']})

    def split_of(ann_root, *extra, source=source) -> dict:
        assert prepare(source, colours['image_root'], ann_root, *extra) == 0
        prepared = captions_by_image(ann_root, 'mine')
        return {split: set(images) for split, images in prepared.items()}

    first = split_of(tmp_path / 'a', '--val', 4, '--test', 3, '--seed', 7)
    assert [len(first[s]) for s in SPLITS] == [n_images - 7, 4, 3]
    assert not (first['train'] & first['val'] or first['train'] & first['test'] or first['val'] & first['test'])
    assert split_of(tmp_path / 'b', '--val', 4, '--test', 3, '--seed', 7) == first
    for split in SPLITS:
        assert (tmp_path / 'a' / f'mine_{split}.json').read_bytes() == \
            (tmp_path / 'b' / f'mine_{split}.json').read_bytes()
    reordered = write_csv(tmp_path / 'reordered.csv', shuffled([(i, c) for i, c, _ in colours['pairs']], seed=3),
                          header=('image', 'caption'))
    assert split_of(tmp_path / 'b2', '--val', 4, '--test', 3, '--seed', 7, source=reordered) == first
    other = split_of(tmp_path / 'c', '--val', 4, '--test', 3, '--seed', 8)
    assert other != first and [len(other[s]) for s in SPLITS] == [n_images - 7, 4, 3]
    # Every caption of an image goes with it: the 5 captions of each.
    prepared = captions_by_image(tmp_path / 'a', 'mine')
    assert all(len(texts) == 5 for split in prepared.values() for texts in split.values())

    # Defaults: 5% each for a small set (at least one image); --test 0: train and val only, test repeats val.
    defaults = split_of(tmp_path / 'd')
    assert [len(defaults[s]) for s in ('val', 'test')] == [1, 1]
    no_test = split_of(tmp_path / 'e', '--val', 3, '--test', 0)
    summary = json.loads((tmp_path / 'e' / 'mine_summary.json').read_text())
    assert summary['splits']['test'] == {'images': 0, 'captions': 0}
    assert no_test['test'] == no_test['val'] and len(no_test['train']) == n_images - 3
    # A split left empty without being asked for is an error, and nothing is written.
    assert prepare(source, colours['image_root'], tmp_path / 'f', '--val', 0, '--test', 2) == 2
    assert not (tmp_path / 'f').exists()
    assert prepare(source, colours['image_root'], tmp_path / 'g', '--val', 20, '--test', 20) == 2


def test_a_split_column_without_test_rows_needs_test_0_and_an_image_in_two_splits_is_refused(tmp_path, colours,
                                                                                             capsys):
    no_test = [p for p in colours['pairs'] if p[2] != 'test']
    source = write_csv(tmp_path / 'pairs.csv', no_test)
    assert prepare(source, colours['image_root'], tmp_path / 'a') == 2
    assert 'split test has no images (no row has split = test); pass --test 0' in capsys.readouterr().err
    assert prepare(source, colours['image_root'], tmp_path / 'a', '--test', 0) == 0

    image, caption, _ = next(p for p in colours['pairs'] if p[2] == 'train')
    leak = write_csv(tmp_path / 'leak.csv', colours['pairs'] + [(image, caption + ' again', 'test')])
    assert prepare(leak, colours['image_root'], tmp_path / 'b', '--skip-bad-rows') == 2
    assert "is in split 'test' here but in 'train' on line" in capsys.readouterr().err
    assert not (tmp_path / 'b').exists()


# ---------------------------------------------------------------------------------------------- 4. end to end
def test_the_written_tiny_config_fine_tunes_one_epoch_and_its_checkpoint_evaluates(tmp_path, colours, monkeypatch):
    source = write_csv(tmp_path / 'pairs.csv', shuffled(colours['pairs']))
    config = tmp_path / 'retrieval_mine.yaml'
    assert prepare(source, colours['image_root'], tmp_path / 'ann', '--base-config', 'configs/retrieval_tiny.yaml',
                   '--write-config', config) == 0
    summary = json.loads((tmp_path / 'ann' / 'mine_summary.json').read_text())
    commands = summary['commands']
    assert commands['evaluate_zero_shot'] is None  # the tiny model has no checkpoint to evaluate as it is
    assert summary['queue_size'] == 32 and 'queue_size: 32' in config.read_text()

    monkeypatch.chdir(tmp_path)  # the commands' output folders are relative
    quiet = ['max_epoch=1', 'tensorboard=False', 'num_workers=0', 'report=False']
    fine_tune = shlex.split(commands['fine_tune'])
    assert fine_tune[:2] == ['python', 'train_retrieval.py'] and '--device' in fine_tune
    assert train_retrieval.main(fine_tune[2:] + ['--options'] + quiet) == 0
    (logged,) = read_jsonl(tmp_path / 'output' / 'mine' / 'log.txt')
    assert logged['epoch'] == 0 and logged['recall_unit'] == '%'

    evaluate = shlex.split(commands['evaluate_fine_tuned'])
    assert evaluate[evaluate.index('--options') + 1] == 'pretrained=output/mine/checkpoint_best.pth'
    assert train_retrieval.main(evaluate[2:] + quiet[1:]) == 0
    (evaluated,) = read_jsonl(tmp_path / 'output' / 'mine_eval' / 'evaluate.txt')
    metrics = {k: v for k, v in logged.items() if k.startswith(('val_', 'test_'))}
    assert {k: v for k, v in evaluated.items() if k in metrics} == pytest.approx(metrics)
    assert evaluated['recall_unit'] == '%'


def test_the_demo_models_vocabulary_points_at_the_tiny_config(tmp_path, colours):
    from config import load_config
    from models.tokenizer import TokenizerError, check_vocab_size, init_tokenizer
    tokenizer = init_tokenizer('bert-base-uncased')
    with pytest.raises(TokenizerError, match='configs/retrieval_tiny.yaml'):
        check_vocab_size(tokenizer, 55, 'bert-base-uncased')  # configs/demo_med_config.json with real captions
    tiny = load_config(os.path.join(REPO, 'configs', 'retrieval_tiny.yaml'))
    with open(tiny['med_config']) as f:
        check_vocab_size(tokenizer, json.load(f)['vocab_size'], tiny['tokenizer'])  # fits
    source = write_csv(tmp_path / 'pairs.csv', colours['pairs'])
    assert prepare(source, colours['image_root'], tmp_path / 'ann', '--base-config', 'configs/retrieval_demo.yaml') == 0
    summary = json.loads((tmp_path / 'ann' / 'mine_summary.json').read_text())
    assert any('vocabulary of 55 tokens' in w and 'configs/retrieval_tiny.yaml' in w for w in summary['warnings'])
