"""Static HTML for the report, compare, search and results pages: one self-contained page, inline CSS, no script
(the results table's sorting, report.table, is its one inline script).

Nothing is fetched from the network: images are relative links to the page's own `thumbs/` and plots,
so the folder opens from file:// on a machine offline. Machine-readable `data-*` attributes carry the
numbers shown (tests and scripts read them instead of scraping text).
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em auto; max-width: 1280px;
       padding: 0 1em; color: #222; background: #fff; font-size: 14px; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h3 { margin-top: 1.5em; } h4 { margin: 1em 0 .3em; color: #555; }
.meta { color: #555; } .meta code { background: #f4f4f4; padding: 0 .3em; }
table.recall, table.counts { border-collapse: collapse; margin: .5em 0; }
table.recall th, table.recall td, table.counts th, table.counts td { border: 1px solid #ccc; padding: .25em .6em;
       text-align: right; }
table.recall tr.paper td, table.recall tr.paper th, table.recall tr.chance td, table.recall tr.chance th {
       color: #666; font-style: italic; }
.plots img { max-width: 49%; height: auto; border: 1px solid #eee; }
.query { border: 1px solid #e3e3e3; border-radius: 6px; padding: .5em .7em; margin: .6em 0; background: #fafafa; }
.query .caption { font-size: 1.05em; margin: 0 0 .4em; }
.query .where { color: #777; font-size: .9em; }
.hits { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
/* 164 px: the thumbnail and the line '= itm -0.123 + sim 0.456'; a longer one widens its figure, never breaks. */
figure.hit { margin: 0; min-width: 164px; width: fit-content; border: 3px solid transparent; border-radius: 4px;
       padding: 2px; }
figure.hit img, figure.probe img { width: 140px; height: 140px; object-fit: contain; display: block;
       background: #f0f0f0; }
.noimg { width: 120px; height: 90px; background: #eee; color: #999; font-size: .8em; text-align: center;
         line-height: 90px; }
figure.hit.correct { border-color: #2ca02c; background: #eef8ee; }
figure.hit.extra { border-style: dashed; }
figcaption, .nums { font-size: .8em; color: #444; font-family: Menlo, Consolas, monospace; }
figcaption .nums { font-size: 1em; }
.nums { white-space: nowrap; }
/* A path takes the figure's width (set by the thumbnail and the number lines) and wraps anywhere in it. */
figcaption .path { display: block; width: 0; min-width: 100%; overflow-wrap: anywhere; }
.i2t-row { display: flex; gap: 12px; align-items: flex-start; }
figure.probe { margin: 0; }
ol.captions { margin: 0; padding-left: 0; list-style: none; }
ol.captions li { margin: .15em 0; padding: .1em .4em; border-left: 4px solid #d62728; }
ol.captions li.correct { border-left-color: #2ca02c; background: #eef8ee; }
ol.captions li.extra { border-left-style: dashed; }
.mark { font-weight: bold; } li.correct .mark { color: #2ca02c; } li.wrong .mark { color: #d62728; }
.side { display: flex; gap: 16px; } .side > div { flex: 1; min-width: 0; }
.side > div > h4 { margin-top: 0; }
nav a { margin-right: 1em; }
table.results { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
table.results th, table.results td { border: 1px solid #ccc; padding: .2em .45em; text-align: right;
       white-space: nowrap; }
table.results th { background: #f4f4f4; cursor: pointer; position: sticky; top: 0; }
table.results th[data-order="asc"]::after { content: " \\25B2"; }
table.results th[data-order="desc"]::after { content: " \\25BC"; }
table.results td[data-key="run"], table.results td[data-key="checkpoint"], table.results td[data-key="source"],
table.results td[data-key="device"] { text-align: left; }
table.results tbody tr:hover { background: #f6f9ff; }
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{esc(title)}</title>\n'
            f'<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n')


@dataclass
class Hit:
    """One ranked candidate shown in a gallery."""
    rank: int                      # 0-based position in the query's ranking
    index: int                     # candidate id (image or text index in the split's annotation order)
    sim: Optional[float]           # contrastive (ITC) similarity (None: not known, e.g. compare pages)
    score: Optional[float] = None  # matching logit + similarity; None: not re-ranked (outside the top k_test)
    correct: Optional[bool] = None  # is it a ground truth of the query (None: unknown, e.g. search)
    thumb: Optional[str] = None    # image candidates: src of its thumbnail (None: no image available)
    text: Optional[str] = None     # text candidates: the caption; image candidates: an optional label (path)

    @property
    def itm(self) -> Optional[float]:
        return None if self.score is None or self.sim is None else self.score - self.sim


def numbers(hit: Hit) -> tuple[str, ...]:
    """('score 1.234', '= itm 0.778 + sim 0.456') (3 decimals), or the similarity alone when not re-ranked: the
    parts of one formula, each shown unbroken (under a thumbnail, one per line)."""
    if hit.sim is None:
        return ()
    if hit.score is None:
        return f'sim {hit.sim:.3f}', '(not re-ranked)'
    return f'score {hit.score:.3f}', f'= itm {hit.itm:.3f} + sim {hit.sim:.3f}'


def query_label(kind: str, index: int, path: Optional[str] = None) -> str:
    """'image 51 (0-based id; file images/val_00052.jpg)': ids count from 0 in the split's annotation order, as in
    ranks_<split>.npz, while a dataset's file names may count from 1."""
    return f'{kind} {index} (0-based id' + (f'; file {path})' if path else ')')


def _classes(hit: Hit, extra: bool) -> str:
    names = ['hit']
    if hit.correct is True:
        names.append('correct')
    elif hit.correct is False:
        names.append('wrong')
    if extra:
        names.append('extra')
    return ' '.join(names)


def image_tag(src: Optional[str], alt: str) -> str:
    if src is None:
        return '<div class="noimg">no image</div>'
    return f'<img src="{esc(src)}" alt="{esc(alt)}" loading="eager">'


def image_hit(hit: Hit, extra: bool = False) -> str:
    """A thumbnail with its rank and numbers; the ground truth outlined; `extra`: shown outside the top 5."""
    label = f'ground truth at rank {hit.rank + 1}' if extra else f'#{hit.rank + 1}'
    parts = [f'<span class="nums">{esc(part)}</span>' for part in numbers(hit)]
    lines = [label] + parts if extra or not parts else [f'{label} {parts[0]}'] + parts[1:]
    path = f'<span class="path">{esc(hit.text)}</span>' if hit.text else ''
    return (f'<figure class="{_classes(hit, extra)}" data-index="{hit.index}" data-rank="{hit.rank}">'
            f'{image_tag(hit.thumb, f"image {hit.index}")}'
            f'<figcaption>{" <br>".join(lines)}{path}</figcaption></figure>')


def text_hit(hit: Hit, extra: bool = False) -> str:
    mark = {True: '&#10003;', False: '&#10007;', None: ''}[hit.correct]
    label = f'ground truth at rank {hit.rank + 1}:' if extra else f'#{hit.rank + 1}'
    return (f'<li class="{_classes(hit, extra)}" data-index="{hit.index}" data-rank="{hit.rank}">'
            f'<span class="mark">{mark}</span> {label} {esc(hit.text)} '
            f'<span class="nums">{esc(" ".join(numbers(hit)))}</span>'
            '</li>')


def t2i_query(query_id: Optional[int], caption: str, hits: Sequence[Hit], gt: Optional[Hit] = None,
              note: str = '') -> str:
    """Text -> image: the caption, its top images as thumbnails, and the ground truth when it is not among them."""
    attrs = f' data-query="{query_id}"' if query_id is not None else ''
    if gt is not None:
        attrs += f' data-gt="{gt.index}" data-gt-rank="{gt.rank}"'
    extra = '' if gt is None or any(h.index == gt.index for h in hits) else image_hit(gt, extra=True)
    where = f' <span class="where">{esc(note)}</span>' if note else ''
    return (f'<div class="query t2i"{attrs}><p class="caption">&ldquo;{esc(caption)}&rdquo;{where}</p>'
            f'<div class="hits">{"".join(image_hit(h) for h in hits)}{extra}</div></div>')


def i2t_query(query_id: Optional[int], thumb: Optional[str], hits: Sequence[Hit], gt: Optional[Hit] = None,
              note: str = '') -> str:
    """Image -> text: the image and its top captions marked correct or wrong (plus its best correct caption)."""
    attrs = f' data-query="{query_id}"' if query_id is not None else ''
    if gt is not None:
        attrs += f' data-gt="{gt.index}" data-gt-rank="{gt.rank}"'
    extra = '' if gt is None or any(h.index == gt.index for h in hits) else text_hit(gt, extra=True)
    where = f'<p class="where">{esc(note)}</p>' if note else ''
    return (f'<div class="query i2t"{attrs}><div class="i2t-row"><figure class="probe">'
            f'{image_tag(thumb, f"query image {query_id}")}</figure><div>{where}<ol class="captions">'
            f'{"".join(text_hit(h) for h in hits)}{extra}</ol></div></div></div>')


def section(title: str, blocks: Iterable[str], css_class: str, level: int = 3, attrs: str = '') -> str:
    return (f'<section class="{css_class}"{attrs}><h{level}>{esc(title)}</h{level}>\n'
            + '\n'.join(blocks) + '\n</section>')
