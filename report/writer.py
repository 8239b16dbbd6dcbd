"""`output_dir/report/`: the visual report of an evaluation, written by rank 0 from the score matrices.

Per split: the recall table (with the paper's numbers for an official checkpoint), Recall@K curves and a
histogram of ground-truth ranks (PNG), galleries of the worst-ranked queries plus a seeded random sample in
both directions, and `ranks_<split>.npz`. Thumbnails are made only for the images the page shows.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Mapping, Optional

import numpy as np

from atomic import atomic_folder, atomic_write_bytes
from evaluation import describe_protocol, protocol
from data.retrieval_dataset import ImagePathResolver
from evaluation import chance_recall
import report.html as html
from report.files import npz_bytes
from report.html import Hit, esc
from report.paper import paper_numbers
from report.plots import rank_histogram_png, recall_curve_png
from report.summary import SplitScores, SplitSummary, ranks_arrays, summarize
from report.thumbs import write_thumbnails

_logger = logging.getLogger(__name__)

REPORT_DIR = 'report'
INDEX = 'index.html'
GALLERY_TOP = 5
# The random half of each gallery: the same queries in every run of a split, so two reports can be compared.
SAMPLE_SEED = 0
METRIC_COLUMNS = (('txt_r1', 'R@1'), ('txt_r5', 'R@5'), ('txt_r10', 'R@10'),
                  ('img_r1', 'R@1'), ('img_r5', 'R@5'), ('img_r10', 'R@10'), ('r_mean', 'mean'))


def pick_queries(ranks: np.ndarray, count: int, seed: int = SAMPLE_SEED) -> tuple[list[int], list[int]]:
    """(the ceil(count/2) worst-ranked queries, worst first; a seeded random sample of the others, sorted).

    With fewer queries than `count`, half are the worst and the others the "sample" (all of them are shown).
    """
    n_worst = min((count + 1) // 2, (len(ranks) + 1) // 2)
    worst = np.argsort(-ranks, kind='stable')[:n_worst]
    rest = np.setdiff1d(np.arange(len(ranks)), worst)
    n_sample = min(len(rest), count - n_worst)
    sample = np.sort(np.random.default_rng(seed).choice(rest, size=n_sample, replace=False)) if n_sample else rest[:0]
    return [int(q) for q in worst], [int(q) for q in sample]


def thumb_name(split: str, image: int) -> str:
    return f'{split}_{image:06d}.jpg'


# ---------------------------------------------------------------------------------------------- gallery blocks
def t2i_block(summary: SplitSummary, text: int, thumbs: Mapping[str, str], top: int = GALLERY_TOP) -> str:
    """A caption, its top images (ground truth outlined), and its image with its rank when it is not among them."""
    split, image = summary.split, int(summary.txt2img[text])
    hits = [Hit(rank=r, index=int(c), sim=float(summary.t2i_top10_sim[text, r]),
                score=summary.score(summary.t2i_top10_score[text, r]), correct=int(c) == image,
                thumb=thumbs.get(thumb_name(split, int(c))))
            for r, c in enumerate(summary.t2i_top10[text, :top])]
    gt = Hit(rank=int(summary.t2i_rank[text]), index=image, sim=float(summary.t2i_gt_sim[text]),
             score=summary.score(summary.t2i_gt_score[text]), correct=True,
             thumb=thumbs.get(thumb_name(split, image)))
    return html.t2i_query(text, summary.texts[text], hits, gt,
                          note=f'{html.query_label("text", text)}: its image ranks {gt.rank + 1}')


def i2t_block(summary: SplitSummary, image: int, thumbs: Mapping[str, str], top: int = GALLERY_TOP) -> str:
    """An image, its top captions marked correct or wrong, and its best-ranked own caption when not among them."""
    hits = [Hit(rank=r, index=int(c), sim=float(summary.i2t_top10_sim[image, r]),
                score=summary.score(summary.i2t_top10_score[image, r]),
                correct=int(summary.txt2img[c]) == image, text=summary.texts[int(c)])
            for r, c in enumerate(summary.i2t_top10[image, :top])]
    best = int(summary.i2t_gt[image])
    gt = Hit(rank=int(summary.i2t_rank[image]), index=best, sim=float(summary.i2t_gt_sim[image]),
             score=summary.score(summary.i2t_gt_score[image]), correct=True, text=summary.texts[best])
    return html.i2t_query(image, thumbs.get(thumb_name(summary.split, image)), hits, gt,
                          note=f'{html.query_label("image", image, summary.images[image])}: its best caption ranks '
                               f'{gt.rank + 1}')


def images_shown(summary: SplitSummary, t2i: list[int], i2t: list[int], top: int = GALLERY_TOP) -> set[int]:
    shown = set(i2t)
    for text in t2i:
        shown.update(int(c) for c in summary.t2i_top10[text, :top])
        shown.add(int(summary.txt2img[text]))
    return shown


def recall_table(summary: SplitSummary, paper: Optional[tuple[str, dict]], chance: dict) -> str:
    """This run's recall, the paper's (an official checkpoint) and chance's (a random ranking of this split)."""
    head = ('<tr><th></th><th colspan="3">TR: image &rarr; text</th><th colspan="3">IR: text &rarr; image</th>'
            '<th>r_mean</th></tr><tr><th></th>' + ''.join(f'<th>{label}</th>' for _, label in METRIC_COLUMNS)
            + '</tr>')
    ours = ''.join(f'<td data-metric="{key}" data-value="{summary.metrics[key]!r}">{summary.metrics[key]:.2f}</td>'
                   for key, _ in METRIC_COLUMNS)
    rows = [head, f'<tr class="ours"><th>this run</th>{ours}</tr>']
    if paper is not None:
        label, values = paper
        cells = ''.join(f'<td>{values[key]:.1f}</td>' if key in values else '<td>&ndash;</td>'
                        for key, _ in METRIC_COLUMNS)
        rows.append(f'<tr class="paper"><th>{esc(label)}</th>{cells}</tr>')
    cells = ''.join(f'<td data-chance="{key}" data-value="{chance[key]!r}">{chance[key]:.2f}</td>'
                    for key, _ in METRIC_COLUMNS)
    rows.append(f'<tr class="chance"><th>chance (random ranking)</th>{cells}</tr>')
    return f'<table class="recall" data-split="{esc(summary.split)}">' + ''.join(rows) + '</table>'


def split_section(summary: SplitSummary, thumbs: Mapping[str, str], queries: dict[str, tuple[list, list]],
                  paper: Optional[tuple[str, dict]], chance: dict) -> str:
    split = summary.split
    n_images, n_texts = len(summary.images), len(summary.texts)
    galleries = []
    for direction, title, block in (('t2i', 'Text \u2192 image: top 5 images of a caption', t2i_block),
                                    ('i2t', 'Image \u2192 text: top 5 captions of an image', i2t_block)):
        worst, sample = queries[direction]
        blocks = ['<h4>Worst-ranked queries</h4>'] + [block(summary, q, thumbs) for q in worst]
        blocks += [f'<h4>Random sample (seed {SAMPLE_SEED})</h4>'] + [block(summary, q, thumbs) for q in sample]
        galleries.append(html.section(title, blocks, f'gallery {direction}', attrs=f' data-split="{esc(split)}"'))
    return (f'<section class="split" id="split-{esc(split)}" data-split="{esc(split)}">'
            f'<h2>{esc(split)}: {n_images} images, {n_texts} captions</h2>\n'
            f'{recall_table(summary, paper, chance)}\n'
            f'<p class="meta">Ranks of every query: <a href="ranks_{esc(split)}.npz">ranks_{esc(split)}.npz</a>. '
            + ('Protocol itc (k_test 0): the score is the contrastive similarity (sim); nothing is re-ranked. '
               if summary.k_test == 0 else
               'Score = matching logit (itm) + contrastive similarity (sim) for the top k_test candidates; '
               'the others are not re-ranked. ')
            + 'Ranks count from 1 (#1: the best); image and text ids from 0, in the '
              "split's annotation order, as in the ranks file.</p>\n"
            + f'<div class="plots"><img src="recall_{esc(split)}.png" alt="Recall@K, {esc(split)}">'
            f'<img src="ranks_{esc(split)}.png" alt="ranks of the ground truth, {esc(split)}"></div>\n'
            + '\n'.join(galleries) + '\n</section>')


# ---------------------------------------------------------------------------------------------- the report
def write_evaluation_report(output_dir: str, scores: Mapping[str, SplitScores], datasets: Mapping,
                            config: dict, epoch: Optional[int] = None) -> str:
    """Write `output_dir/report/` (replacing an older one) and return the path of its index.html.

    `scores`: split -> its matrices; `datasets`: split -> RetrievalEvalDataset; `epoch`: the best epoch of a
    fine-tune (None for `--evaluate`). Call on one rank only.
    """
    began = time.time()
    target = os.path.join(output_dir, REPORT_DIR)
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):  # left by a killed run (one rank writes: none is in progress)
        if name.startswith(f'.{REPORT_DIR}.') and name.endswith(('.tmp', '.old')) \
                or name.startswith(f'{REPORT_DIR}.') and name.endswith('.old'):  # the latter: older versions
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    with atomic_folder(target) as staging:
        sections, thumb_sources, pages = [], {}, []
        for split, split_scores in scores.items():
            dataset = datasets[split]
            summary = summarize(split, split_scores, dataset.image, dataset.text, dataset.txt2img, config['k_test'])
            atomic_write_bytes(os.path.join(staging, f'ranks_{split}.npz'), npz_bytes(ranks_arrays(summary)))
            atomic_write_bytes(os.path.join(staging, f'recall_{split}.png'), recall_curve_png(
                summary.txt_recall_at_k, summary.img_recall_at_k, f'{split}: Recall@K'))
            atomic_write_bytes(os.path.join(staging, f'ranks_{split}.png'), rank_histogram_png(
                summary.i2t_rank, summary.t2i_rank, f'{split}: rank of the ground truth'))
            queries = {'t2i': pick_queries(summary.t2i_rank, config['report_queries']),
                       'i2t': pick_queries(summary.i2t_rank, config['report_queries'])}
            resolver = ImagePathResolver(dataset.image_root)
            (t2i_worst, t2i_sample), (i2t_worst, i2t_sample) = queries['t2i'], queries['i2t']
            for image in sorted(images_shown(summary, t2i_worst + t2i_sample, i2t_worst + i2t_sample)):
                thumb_sources[thumb_name(split, image)] = resolver.resolve(dataset.image[image])
            pages.append((summary, queries, chance_recall(dataset.txt2img, dataset.img2txt)))
        thumbs_began = time.time()
        thumbs = write_thumbnails(thumb_sources, staging, config['report_thumb_px'])
        thumbs_took = time.time() - thumbs_began
        fine_tune = epoch is not None
        for summary, queries, chance in pages:
            paper = paper_numbers(config.get('pretrained'), config.get('dataset', ''), summary.split, fine_tune)
            sections.append(split_section(summary, thumbs, queries, paper, chance))
        body = (f'<h1>Retrieval report</h1>\n<p class="meta">{_run_line(config, epoch)}</p>\n'
                + '<nav>' + ''.join(f'<a href="#split-{esc(s.split)}">{esc(s.split)}</a>' for s, _, _ in pages)
                + '</nav>\n' + '\n'.join(sections))
        atomic_write_bytes(os.path.join(staging, INDEX), html.page('Retrieval report', body).encode('utf-8'))
    _logger.info('Report written to %s in %.2f s (%d thumbnails in %.2f s)', target, time.time() - began,
                 len(thumbs), thumbs_took)
    return os.path.join(target, INDEX)


def _run_line(config: dict, epoch: Optional[int]) -> str:
    checkpoint = config.get('pretrained') or 'random initialisation'
    what = f'fine-tune, best epoch {epoch} (by val r_mean)' if epoch is not None else 'evaluation (--evaluate)'
    k_test = int(config['k_test'])
    return (f'{esc(what)}; checkpoint <code>{esc(checkpoint)}</code>; dataset <code>{esc(config.get("dataset"))}'
            f'</code>; <span class="protocol" data-protocol="{protocol(k_test)}">{esc(describe_protocol(k_test))}'
            f'</span>; eval_mode {esc(config.get("eval_mode", "fast"))}; '
            f'precision {esc(config.get("precision", "tf32"))}')
