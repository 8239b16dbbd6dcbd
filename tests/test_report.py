"""The visual report of an evaluation (report/) and the comparison of two runs (python -m report.compare).

The page's numbers are checked against evaluate.txt and against score matrices computed here; the ranks file
against evaluation.retrieval_ranks; the report under two processes against one, byte for byte.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY_KWARGS, run_torchrun
from synthetic import write_colour_dataset
from test_train_retrieval import base_args, read_jsonl, tiny_options

import train_retrieval
from config import ConfigError, load_config
from data import create_datasets, create_eval_loader
from evaluation import chance_recall, evaluate_scores, recall_metrics, retrieval_ranks
from models import blip_retrieval
from report import summary as report_summary
from report.files import npz_bytes
from report.paper import paper_numbers
from report.summary import SplitScores, summarize
from report.writer import pick_queries

K_TEST = 6
THUMB_PX = 24  # below the 32-px images: every thumbnail is actually shrunk
NUMBERS = re.compile(r'score (-?\d+\.\d{3}) = itm (-?\d+\.\d{3}) \+ sim (-?\d+\.\d{3})')
# Shown numbers have 3 decimals: a value and its display differ by at most half a unit of the last digit.
DISPLAY_TOL = 0.0005 + 1e-6


class ReportPage(HTMLParser):
    """The parts of a report (or compare) page the tests check, read from its data-* attributes."""

    def __init__(self):
        super().__init__()
        self.recall = {}    # (split, metric) -> value
        self.chance = {}    # (split, metric) -> the value of a random ranking
        self.queries = []   # {'split', 'direction', 'query', 'gt', 'gt_rank', 'hits': [...]} in page order
        self.images = []    # every <img src>
        self.split = None
        self.hit = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get('class') or '').split()
        if tag == 'section' and 'split' in classes:
            self.split = attrs['data-split']
        if tag == 'td' and 'data-metric' in attrs:
            self.recall[(self.split, attrs['data-metric'])] = float(attrs['data-value'])
        if tag == 'td' and 'data-chance' in attrs:
            self.chance[(self.split, attrs['data-chance'])] = float(attrs['data-value'])
        if tag == 'img':
            self.images.append(attrs['src'])
        if tag == 'div' and 'query' in classes:
            self.queries.append({'split': self.split, 'direction': 't2i' if 't2i' in classes else 'i2t',
                                 'query': int(attrs['data-query']), 'gt': int(attrs['data-gt']),
                                 'gt_rank': int(attrs['data-gt-rank']), 'hits': []})
        if tag in ('figure', 'li') and 'hit' in classes:
            self.hit = {'index': int(attrs['data-index']), 'rank': int(attrs['data-rank']),
                        'correct': 'correct' in classes, 'extra': 'extra' in classes, 'text': ''}
            self.queries[-1]['hits'].append(self.hit)

    def handle_endtag(self, tag):
        if tag in ('figure', 'li'):
            self.hit = None

    def handle_data(self, data):
        if self.hit is not None:
            self.hit['text'] += data


def parse_page(path) -> ReportPage:
    page = ReportPage()
    page.feed(Path(path).read_text(encoding='utf-8'))
    return page


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def descending(row: np.ndarray) -> list[int]:
    """The evaluation's order of a row (np.argsort(score)[::-1]: ties as the original)."""
    return [int(c) for c in np.argsort(row)[::-1]]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_colour_dataset(str(tmp_path_factory.mktemp('colours')), n_train=16, n_val=6, n_test=12)


def evaluate_args(data, checkpoint, out, **extra) -> list[str]:
    return (base_args() + ['--evaluate', '--output_dir', str(out)]
            + tiny_options(data, checkpoint, k_test=K_TEST, report_thumb_px=THUMB_PX, **extra))


# ---------------------------------------------------------------------------------------------- must show 1
def test_evaluate_report_equals_the_metrics_and_the_score_matrices_and_two_processes(tmp_path, data,
                                                                                     golden_checkpoint):
    one, two = tmp_path / 'one', tmp_path / 'two'
    assert train_retrieval.main(evaluate_args(data, golden_checkpoint, one, report_queries=6)) == 0
    result = run_torchrun([os.path.join(REPO, 'train_retrieval.py')]
                          + evaluate_args(data, golden_checkpoint, two, report_queries=6), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    report = one / 'report'
    assert f'report: {two / "report" / "index.html"}' in result.stdout
    files = tree_bytes(report)
    assert tree_bytes(two / 'report') == files  # rank 0 wrote it from the same matrices: the same bytes
    assert {'index.html', 'ranks_val.npz', 'ranks_test.npz', 'recall_val.png', 'ranks_test.png'} <= set(files)

    (record,) = read_jsonl(one / 'evaluate.txt')
    page = parse_page(report / 'index.html')
    assert page.recall == {(split, key[len(split) + 1:]): value for key, value in record.items()
                           for split in ('val', 'test') if key.startswith(split + '_')
                           and key[len(split) + 1:] in ('txt_r1', 'txt_r5', 'txt_r10', 'img_r1', 'img_r5',
                                                        'img_r10', 'r_mean')}

    model = blip_retrieval(golden_checkpoint, **TINY_KWARGS).eval()
    config = {'image_root': data['image_root'], 'ann_root': data['ann_root'], 'dataset': 'flickr', 'image_size': 32}
    datasets = create_datasets(config, ('val', 'test'))
    for split, dataset in datasets.items():
        loader = create_eval_loader(dataset, 4, 0)
        i2t, t2i, sims = evaluate_scores(model, loader, dataset.text, {'k_test': K_TEST}, torch.device('cpu'),
                                         with_similarity=True)
        ranks_i2t, ranks_t2i = retrieval_ranks(i2t, t2i, dataset.txt2img, dataset.img2txt)
        metrics = recall_metrics(i2t, t2i, dataset.txt2img, dataset.img2txt)
        # Beside the recall table, chance: what a random ranking of this split scores.
        chance = chance_recall(dataset.txt2img, dataset.img2txt)
        assert {key: value for (s, key), value in page.chance.items() if s == split} == \
            {key: chance[key] for key in ('txt_r1', 'txt_r5', 'txt_r10', 'img_r1', 'img_r5', 'img_r10', 'r_mean')}

        # ranks_<split>.npz: the protocol's ranks (ties as evaluation orders them) and top-10 ids.
        with np.load(report / f'ranks_{split}.npz', allow_pickle=False) as npz:
            np.testing.assert_array_equal(npz['i2t_rank'], ranks_i2t)
            np.testing.assert_array_equal(npz['t2i_rank'], ranks_t2i)
            np.testing.assert_array_equal(npz['i2t_top10'], [descending(row)[:10] for row in i2t])
            np.testing.assert_array_equal(npz['t2i_top10'], [descending(row)[:10] for row in t2i])
            # Recall@K at 1, 5 and 10 from the curves equals the metrics, exactly.
            assert [npz['txt_recall_at_k'][k - 1] for k in (1, 5, 10)] == [metrics[f'txt_r{k}'] for k in (1, 5, 10)]
            assert [npz['img_recall_at_k'][k - 1] for k in (1, 5, 10)] == [metrics[f'img_r{k}'] for k in (1, 5, 10)]
            assert len(npz['txt_recall_at_k']) == 10  # K = 1..max(k_test, 10)
            assert list(npz['texts']) == dataset.text and list(npz['images']) == dataset.image

        # Every gallery query: its top 5 are the top 5 of the matrix, the outlined one is the annotation's.
        shown = [q for q in page.queries if q['split'] == split]
        assert {q['direction'] for q in shown} == {'t2i', 'i2t'}
        for q in shown:
            scores, top = (t2i, descending(t2i[q['query']])) if q['direction'] == 't2i' else \
                (i2t, descending(i2t[q['query']]))
            ranked = [h for h in q['hits'] if not h['extra']]
            assert [h['index'] for h in ranked] == top[:5]
            assert [h['rank'] for h in ranked] == list(range(5))
            if q['direction'] == 't2i':
                image = dataset.txt2img[q['query']]
                assert q['gt'] == image and q['gt_rank'] == ranks_t2i[q['query']]
                assert [h['correct'] for h in ranked] == [c == image for c in top[:5]]
                pair_sims = [sims[h['index'], q['query']] for h in q['hits']]
            else:
                own = dataset.img2txt[q['query']]
                assert q['gt'] in own and q['gt_rank'] == ranks_i2t[q['query']]
                assert [h['correct'] for h in ranked] == [c in own for c in top[:5]]
                assert all(f' {dataset.text[c]} ' in h['text'] for h, c in zip(ranked, top))
                pair_sims = [sims[q['query'], h['index']] for h in q['hits']]
            # The ground truth appears (outlined, with its rank) also when it is not in the top 5.
            gt_hits = [h for h in q['hits'] if h['index'] == q['gt']]
            assert gt_hits and gt_hits[0]['correct'] and gt_hits[0]['extra'] == (q['gt_rank'] >= 5)
            # Each re-ranked result: score = itm + sim, as the matrices have them.
            for h, sim in zip(q['hits'], pair_sims):
                score = scores[q['query'], h['index']]
                found = NUMBERS.search(h['text'])
                if score == -100:
                    assert found is None and 'not re-ranked' in h['text']
                    continue
                shown_score, shown_itm, shown_sim = map(float, found.groups())
                assert abs(shown_score - score) <= DISPLAY_TOL and abs(shown_sim - sim) <= DISPLAY_TOL
                assert abs(shown_itm - (score - sim)) <= DISPLAY_TOL
        # The random half of the gallery is seeded: the same queries as pick_queries gives.
        worst, sample = pick_queries(ranks_t2i, 6)
        assert [q['query'] for q in shown if q['direction'] == 't2i'] == worst + sample

    # Image ids count from 0 and say so, beside the file they name (whose own number may count from 1).
    sections = re.findall(r'<section class="split" id="split-(\w+)"(.*?)(?=<section class="split"|</body>)',
                          (report / 'index.html').read_text(), flags=re.S)
    assert [split for split, _ in sections] == ['val', 'test']
    for split, section in sections:
        noted = re.findall(r'image (\d+) \(0-based id; file ([^)]+)\): its best caption ranks', section)
        assert noted and all(datasets[split].image[int(i)] == path for i, path in noted), noted
    # Thumbnails: small JPEGs inside the report, one per image shown, nothing linked outside the folder.
    assert page.images and all(not src.startswith(('/', 'http', 'file:', '..')) for src in page.images)
    thumbs = sorted({src for src in page.images if src.startswith('thumbs/')})
    assert sorted(f'thumbs/{p.name}' for p in (report / 'thumbs').iterdir()) == thumbs
    for src in thumbs:
        with Image.open(report / src) as thumb:
            assert thumb.format == 'JPEG' and max(thumb.size) == THUMB_PX
    for png in ('recall_val.png', 'ranks_val.png', 'recall_test.png', 'ranks_test.png'):
        assert files[png].startswith(b'\x89PNG') and b'atplotlib' not in files[png]  # no version string


def test_report_false_writes_no_report(tmp_path, data, golden_checkpoint):
    assert train_retrieval.main(evaluate_args(data, golden_checkpoint, tmp_path, report=False)) == 0
    assert (tmp_path / 'evaluate.txt').exists() and not (tmp_path / 'report').exists()


@pytest.mark.parametrize('override, message', [('report_queries=0', "'report_queries' must be >= 1"),
                                               ('report_thumb_px=8', "'report_thumb_px' must be between 16"),
                                               ('report=yes', "'report' must be a bool")])
def test_report_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(os.path.join(REPO, 'configs', 'retrieval_demo.yaml'), [override])


# ---------------------------------------------------------------------------------------------- pieces
def test_summary_ranks_and_top_ids_follow_evaluation_with_ties(monkeypatch):
    """Random matrices with many -100 ties (k_test 3 of 12): ranks equal retrieval_ranks, in chunks of rows too."""
    rng = np.random.default_rng(0)
    n_images, per_image = 8, 3
    txt2img = {t: t // per_image for t in range(n_images * per_image)}
    img2txt = {i: [t for t in txt2img if txt2img[t] == i] for i in range(n_images)}

    def sparse(rows, cols):
        scores = np.full((rows, cols), -100.0, dtype=np.float32)
        for r in range(rows):
            scores[r, rng.choice(cols, 3, replace=False)] = rng.normal(size=3)
        return scores
    i2t, t2i = sparse(n_images, len(txt2img)), sparse(len(txt2img), n_images)
    sims = rng.normal(size=(n_images, len(txt2img))).astype(np.float32)
    scores = SplitScores(i2t, t2i, sims, recall_metrics(i2t, t2i, txt2img, img2txt))
    monkeypatch.setattr(report_summary, 'ROW_CHUNK', 5)  # chunk boundaries inside the matrices
    summary = summarize('val', scores, [f'{i}.jpg' for i in range(n_images)], [str(t) for t in txt2img], txt2img, 3)
    want_i2t, want_t2i = retrieval_ranks(i2t, t2i, txt2img, img2txt)
    np.testing.assert_array_equal(summary.i2t_rank, want_i2t)
    np.testing.assert_array_equal(summary.t2i_rank, want_t2i)
    np.testing.assert_array_equal(summary.t2i_top10, [descending(row)[:10] for row in t2i])
    np.testing.assert_array_equal(summary.i2t_top10, [descending(row)[:10] for row in i2t])
    assert summary.t2i_top10.shape == (len(txt2img), n_images)  # fewer than 10 candidates: all of them
    for i in range(n_images):  # the best-ranked own caption and its numbers
        assert txt2img[summary.i2t_gt[i]] == i and descending(i2t[i]).index(summary.i2t_gt[i]) == want_i2t[i]
        assert summary.i2t_gt_sim[i] == sims[i, summary.i2t_gt[i]]
    np.testing.assert_array_equal(summary.t2i_top10_sim, np.take_along_axis(sims.T, summary.t2i_top10, axis=1))
    assert [summary.txt_recall_at_k[k - 1] for k in (1, 5, 10)] == [scores.metrics[f'txt_r{k}'] for k in (1, 5, 10)]


def test_pick_queries_worst_first_then_a_seeded_sample():
    ranks = np.array([0, 7, 0, 3, 9, 0, 1, 7, 0, 0])
    worst, sample = pick_queries(ranks, 6)
    assert worst == [4, 1, 7]  # highest rank first, ties by query id
    assert len(sample) == 3 and not set(sample) & set(worst) and sample == sorted(sample)
    assert pick_queries(ranks, 6) == (worst, sample)
    assert pick_queries(ranks, 100) == ([4, 1, 7, 3, 6], [0, 2, 5, 8, 9])  # more asked than there are


def test_npz_bytes_are_deterministic_and_load_without_pickle(tmp_path):
    arrays = {'ranks': np.arange(5), 'texts': np.array(['a dog', 'two cats'])}
    first = npz_bytes(arrays)
    assert npz_bytes(arrays) == first
    (tmp_path / 'r.npz').write_bytes(first)
    with np.load(tmp_path / 'r.npz', allow_pickle=False) as loaded:
        assert list(loaded['texts']) == ['a dog', 'two cats'] and loaded['ranks'].tolist() == [0, 1, 2, 3, 4]


def test_paper_numbers_only_for_known_checkpoints_on_the_flickr_test_split():
    url = 'https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base_retrieval_flickr.pth'
    assert paper_numbers(url, 'flickr', 'test', fine_tune=False)[1] == {'txt_r1': 97.3, 'img_r1': 87.3}
    assert paper_numbers('/ckpt/model_base_retrieval_coco.pth', 'flickr', 'test', False)[1] == \
        {'txt_r1': 96.0, 'img_r1': 85.0}  # the zero-shot row
    assert paper_numbers('/ckpt/model_base_14M.pth', 'flickr', 'test', fine_tune=True)[1]['txt_r1'] == 96.6
    assert paper_numbers('/ckpt/model_base_14M.pth', 'flickr', 'test', fine_tune=False) is None
    assert paper_numbers(url, 'flickr', 'val', False) is None and paper_numbers(url, 'coco', 'test', False) is None
    assert paper_numbers('/runs/my_model.pth', 'flickr', 'test', False) is None and \
        paper_numbers('', 'flickr', 'test', False) is None


# ---------------------------------------------------------------------------------------------- must show 4
def test_compare_counts_equal_a_direct_comparison_of_the_ranks_files(tmp_path, data, golden_checkpoint):
    """Two checkpoints on the same split: the golden one and a perturbed copy of it."""
    checkpoint = torch.load(golden_checkpoint, weights_only=True)
    generator = torch.Generator().manual_seed(1)
    perturbed = {k: v + 0.02 * torch.randn(v.shape, generator=generator) if v.is_floating_point() and v.dim() > 1
                 else v for k, v in checkpoint['model'].items()}
    torch.save({'model': perturbed}, tmp_path / 'perturbed.pth')
    run_a, run_b = tmp_path / 'A', tmp_path / 'B'
    assert train_retrieval.main(evaluate_args(data, golden_checkpoint, run_a)) == 0
    assert train_retrieval.main(evaluate_args(data, str(tmp_path / 'perturbed.pth'), run_b)) == 0
    out = tmp_path / 'compare'
    result = subprocess.run([sys.executable, '-m', 'report.compare', str(run_a), str(run_b), '--out', str(out),
                             '--queries', '3'], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / 'compare.json').read_text())
    page = (out / 'index.html').read_text()
    moved = 0
    for split in ('val', 'test'):
        with np.load(run_a / 'report' / f'ranks_{split}.npz') as a, np.load(run_b / 'report' / f'ranks_{split}.npz') as b:
            for direction in ('t2i', 'i2t'):
                rank_a, rank_b = a[f'{direction}_rank'], b[f'{direction}_rank']
                fixed = np.flatnonzero((rank_a > 0) & (rank_b == 0))
                broken = np.flatnonzero((rank_a == 0) & (rank_b > 0))
                counts = summary['splits'][split][direction]
                assert (counts['fixed'], counts['broken']) == (len(fixed), len(broken))
                assert sorted(counts['fixed_ids']) == fixed.tolist() and sorted(counts['broken_ids']) == broken.tolist()
                assert counts['both_right'] + counts['both_wrong'] + len(fixed) + len(broken) == len(rank_a)
                assert f'{split} {direction}: fixed {len(fixed)}, broken {len(broken)}' in result.stdout
                moved += len(fixed) + len(broken)
        for kind in ('fixed', 'broken'):  # the page's counts table
            for direction in ('t2i', 'i2t'):
                assert re.search(rf'<table class="counts" data-split="{split}">.*?<tr data-direction="{direction}">'
                                 rf'.*?data-count="{kind}">{summary["splits"][split][direction][kind]}<', page)
    assert moved > 0  # the two checkpoints disagree somewhere: the counts are not trivially zero
    shown = parse_page(out / 'index.html')
    assert shown.images and all((out / src).is_file() for src in shown.images)

    # Runs of different splits are refused with a message, not compared.
    (run_b / 'report' / 'ranks_test.npz').write_bytes(npz_bytes({
        **dict(np.load(run_b / 'report' / 'ranks_test.npz')), 'texts': np.array(['another caption'] * 60)}))
    result = subprocess.run([sys.executable, '-m', 'report.compare', str(run_a), str(run_b), '--out',
                             str(tmp_path / 'c2')], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and 'different test sets' in result.stderr, result.stderr


def test_finetune_writes_the_report_of_its_best_epoch_and_the_demo_prints_its_path(demo_run):
    """The shared demo fine-tune: report/ holds its best epoch's val and test, and the run ends with its path."""
    log = read_jsonl(demo_run['out'] / 'log.txt')
    best = log[-1]['best_epoch']
    index = demo_run['out'] / 'report' / 'index.html'
    assert demo_run['stdout'].rstrip().splitlines()[-1].strip() == f'report of the best epoch ({best}): {index}'
    page = parse_page(index)
    best_record = next(r for r in log if r['epoch'] == best)
    for split in ('val', 'test'):
        for metric in ('txt_r1', 'txt_r5', 'txt_r10', 'img_r1', 'img_r5', 'img_r10', 'r_mean'):
            assert page.recall[(split, metric)] == best_record[f'{split}_{metric}']
    assert f'best epoch {best} (by val r_mean)' in index.read_text()
    assert {(q['split'], q['direction']) for q in page.queries} == {(s, d) for s in ('val', 'test') for d in ('t2i', 'i2t')}
    assert len([q for q in page.queries if q['split'] == 'test' and q['direction'] == 't2i']) == 24  # report_queries
    size = sum(p.stat().st_size for p in (demo_run['out'] / 'report').rglob('*') if p.is_file())
    assert size < 2_000_000, size  # small enough to copy off a cluster (the Flickr test split is no bigger)
