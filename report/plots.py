"""The report's PNG plots (matplotlib, Agg canvas): Recall@K curves and the histogram of ground-truth ranks.

The object API (Figure + FigureCanvasAgg) is used instead of pyplot: no global backend switch in the
caller's process, no figure left open. PNG metadata is emptied so that the bytes do not name the
matplotlib version.
"""
from __future__ import annotations

import io

import numpy as np
# Imported here, not when the first plot is drawn: a missing matplotlib fails at start, not after an epoch.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

TR_COLOUR, IR_COLOUR = '#1f77b4', '#d62728'
# Histogram buckets of 1-based ranks: (first, last); the last bucket is open-ended.
_BUCKETS = ((1, 1), (2, 2), (3, 3), (4, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, 1000), (1001, None))


def recall_at_k(ranks: np.ndarray, k_max: int) -> np.ndarray:
    """Recall@K in percent for K = 1..k_max, computed as `evaluation.recall_metrics` does (ranks < K)."""
    return np.array([100.0 * float(np.mean(ranks < k)) for k in range(1, k_max + 1)])


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', metadata={'Software': None})
    return buffer.getvalue()


def recall_curve_png(txt_recall: np.ndarray, img_recall: np.ndarray, title: str) -> bytes:
    """Recall@K for K = 1..len(curve) of text retrieval (image -> text) and image retrieval (text -> image)."""
    figure = _figure(5.2, 3.4)
    axes = figure.add_subplot()
    k = np.arange(1, len(txt_recall) + 1)
    axes.plot(k, txt_recall, color=TR_COLOUR, label='TR: image -> text')
    axes.plot(k, img_recall, color=IR_COLOUR, label='IR: text -> image')
    for mark in (1, 5, 10):
        if mark <= len(k):
            axes.axvline(mark, color='#bbbbbb', linewidth=0.6, zorder=0)
    if len(k) > 1:
        axes.set_xscale('log')
        ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500) if t < len(k)] + [len(k)]
        axes.set_xticks(ticks)
        axes.set_xticklabels([str(t) for t in ticks])
        axes.set_xlim(1, len(k))
    axes.set_ylim(0, 101)
    axes.set_xlabel('K (candidates re-ranked: k_test)')
    axes.set_ylabel('Recall@K (%)')
    axes.set_title(title, fontsize=10)
    axes.grid(True, axis='y', color='#eeeeee')
    axes.legend(loc='lower right', fontsize=8)
    figure.tight_layout()
    return _png(figure)


def rank_histogram_png(ranks_i2t: np.ndarray, ranks_t2i: np.ndarray, title: str) -> bytes:
    """Share of queries whose ground truth lands in each rank bucket (1, 2, 3, 4-5, 6-10, ...), both directions."""
    figure = _figure(5.2, 3.4)
    axes = figure.add_subplot()
    largest = int(max(ranks_i2t.max(initial=0), ranks_t2i.max(initial=0))) + 1
    buckets = [(first, last) for first, last in _BUCKETS if first <= largest]
    labels = [str(first) if first == last else f'{first}-{last}' if last else f'>{first - 1}'
              for first, last in buckets]
    x = np.arange(len(buckets))
    for offset, ranks, colour, label in ((-0.2, ranks_i2t, TR_COLOUR, 'TR: image -> text'),
                                         (0.2, ranks_t2i, IR_COLOUR, 'IR: text -> image')):
        one_based = ranks + 1
        shares = [100.0 * float(np.mean((one_based >= first) & (one_based <= (last or np.inf))))
                  for first, last in buckets]
        axes.bar(x + offset, shares, width=0.4, color=colour, label=label)
    axes.set_xticks(x)
    axes.set_xticklabels(labels, fontsize=8)
    axes.set_xlabel('rank of the ground truth')
    axes.set_ylabel('queries (%)')
    axes.set_title(title, fontsize=10)
    axes.legend(loc='upper right', fontsize=8)
    figure.tight_layout()
    return _png(figure)
