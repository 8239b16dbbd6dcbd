"""What the report keeps of an evaluated split: every query's ground-truth rank and top-10 candidates.

Ranks follow `evaluation`'s order exactly (`np.argsort(score)[::-1]` per row, ties included), so Recall@K
computed from `ranks_<split>.npz` equals `evaluation.recall_metrics` of the same matrices.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Optional

import numpy as np

from evaluation import SCORE_FILL, SplitScores
from report.plots import recall_at_k

TOP_IDS = 10
ROW_CHUNK = 256  # rows sorted at a time: bounds the (rows x candidates) index arrays (COCO: 25,000 columns)
RANKS_FILE = 'ranks_{split}.npz'


@dataclass
class SplitSummary:
    """Per query: ground-truth rank, top-10 candidates with their scores (score -100: not re-ranked)."""
    split: str
    images: list[str]          # the annotation's image paths (image index order)
    texts: list[str]           # the cleaned captions (text index order)
    txt2img: np.ndarray        # (T,) image of each text
    metrics: dict
    k_test: int
    i2t_rank: np.ndarray       # (N,) 0-based rank of each image's best-ranked caption
    t2i_rank: np.ndarray       # (T,) 0-based rank of each text's image
    i2t_top10: np.ndarray      # (N, min(10, T)) best texts of each image, best first
    t2i_top10: np.ndarray      # (T, min(10, N)) best images of each text
    i2t_top10_score: np.ndarray
    i2t_top10_sim: np.ndarray
    t2i_top10_score: np.ndarray
    t2i_top10_sim: np.ndarray
    i2t_gt: np.ndarray         # (N,) each image's best-ranked caption
    i2t_gt_score: np.ndarray
    i2t_gt_sim: np.ndarray
    t2i_gt_score: np.ndarray   # (T,) score and similarity of each text's own image
    t2i_gt_sim: np.ndarray

    def score(self, value: float) -> Optional[float]:
        """A score to show: None where the pair was not re-ranked (-100), and everywhere under protocol itc."""
        return None if self.k_test == 0 else score_or_none(value)

    @property
    def curve_length(self) -> int:
        """Recall@K is plotted for K = 1..k_test (at least 1..10, so that R@1/5/10 are on it)."""
        return max(self.k_test, 10)

    @property
    def txt_recall_at_k(self) -> np.ndarray:
        return recall_at_k(self.i2t_rank, self.curve_length)

    @property
    def img_recall_at_k(self) -> np.ndarray:
        return recall_at_k(self.t2i_rank, self.curve_length)


def _descending(rows: np.ndarray) -> np.ndarray:
    """Candidates of each row, best first: the very call `evaluation._ranks_of` ranks with (same tie order)."""
    return np.argsort(rows, axis=1)[:, ::-1]


def _ranks_and_top(scores: np.ndarray, is_target) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: rank of its first target, that target, and the top-10 candidates; a chunk of rows at a time."""
    ranks, targets, tops = [], [], []
    for start in range(0, scores.shape[0], ROW_CHUNK):
        order = _descending(scores[start:start + ROW_CHUNK])
        rank = is_target(order, start).argmax(axis=1)
        ranks.append(rank)
        targets.append(order[np.arange(len(order)), rank])
        tops.append(order[:, :TOP_IDS])
    if not ranks:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros((0, min(TOP_IDS, scores.shape[1])), dtype=np.int64)
    return np.concatenate(ranks), np.concatenate(targets), np.concatenate(tops)


def summarize(split: str, scores: SplitScores, images: list[str], texts: list[str], txt2img: dict,
              k_test: int) -> SplitSummary:
    """The summary of one split from its matrices (rank 0 only: cheap next to the evaluation itself)."""
    n_images, n_texts = scores.i2t.shape
    text_image = np.array([txt2img[t] for t in range(n_texts)], dtype=np.int64)
    i2t_rank, i2t_gt, i2t_top = _ranks_and_top(
        scores.i2t, lambda order, start: text_image[order] == np.arange(start, start + len(order))[:, None])
    t2i_rank, _, t2i_top = _ranks_and_top(
        scores.t2i, lambda order, start: order == text_image[start:start + len(order), None])
    image_rows, text_rows = np.arange(n_images), np.arange(n_texts)
    return SplitSummary(
        split=split, images=list(images), texts=list(texts), txt2img=text_image, metrics=dict(scores.metrics),
        k_test=k_test,
        i2t_rank=i2t_rank.astype(np.int64), t2i_rank=t2i_rank.astype(np.int64),
        i2t_top10=i2t_top.astype(np.int64), t2i_top10=t2i_top.astype(np.int64),
        i2t_top10_score=np.take_along_axis(scores.i2t, i2t_top, axis=1),
        i2t_top10_sim=np.take_along_axis(scores.sims, i2t_top, axis=1),
        t2i_top10_score=np.take_along_axis(scores.t2i, t2i_top, axis=1),
        t2i_top10_sim=scores.sims.T[text_rows[:, None], t2i_top],
        i2t_gt=i2t_gt.astype(np.int64), i2t_gt_score=scores.i2t[image_rows, i2t_gt],
        i2t_gt_sim=scores.sims[image_rows, i2t_gt],
        t2i_gt_score=scores.t2i[text_rows, text_image], t2i_gt_sim=scores.sims[text_image, text_rows])


def ranks_arrays(summary: SplitSummary) -> dict[str, np.ndarray]:
    """The arrays of `ranks_<split>.npz` (strings as numpy unicode: loadable with allow_pickle=False).

    Ranks, ids and text only, no scores: scores differ in the last bits with the number of processes (texts
    and pairs are batched differently), ranks do not, so the file is the same bytes for any launch.
    """
    return {
        'i2t_rank': summary.i2t_rank, 't2i_rank': summary.t2i_rank,
        'i2t_top10': summary.i2t_top10, 't2i_top10': summary.t2i_top10,
        'i2t_gt': summary.i2t_gt, 'txt2img': summary.txt2img, 'images': np.array(summary.images, dtype=str),
        'texts': np.array(summary.texts, dtype=str), 'k_test': np.array(summary.k_test, dtype=np.int64),
        'txt_recall_at_k': summary.txt_recall_at_k, 'img_recall_at_k': summary.img_recall_at_k,
    }


REQUIRED_ARRAYS = ('i2t_rank', 't2i_rank', 'i2t_top10', 't2i_top10', 'i2t_gt', 'txt2img', 'images', 'texts')


def load_ranks(path: str) -> dict[str, np.ndarray]:
    """A `ranks_<split>.npz` as a dict of arrays; a clear error when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f'{path} is not a readable ranks file ({error}); write it again with --evaluate') from None
    missing = [name for name in REQUIRED_ARRAYS if name not in arrays]
    if missing:
        raise ValueError(f'{path} lacks the arrays {missing}: it was not written by this report; '
                         'evaluate the run again with --evaluate')
    return arrays


def score_or_none(score: float) -> Optional[float]:
    """A matrix entry as a score, or None where the entry was not re-ranked (exactly SCORE_FILL)."""
    return None if score == SCORE_FILL else float(score)


def ranks_path(report_dir: str, split: str) -> str:
    return os.path.join(report_dir, RANKS_FILE.format(split=split))
