"""Compare two evaluated runs on the same split: which queries one fixed and the other broke.

    python -m report.compare RUN_A RUN_B [--out DIR] [--k 1] [--queries 12]

RUN_A / RUN_B: a run's output_dir (holding report/) or a report/ folder itself. Every split whose
`ranks_<split>.npz` both runs have is compared. A query is right in a run when its ground truth ranks within the
first K (default 1: Recall@1); "fixed" = wrong in A, right in B; "broken" = right in A, wrong in B. Writes
DIR/index.html (counts, then the fixed and the broken queries with both runs' top 5 side by side),
DIR/thumbs/ and DIR/compare.json (the counts and the query ids), and prints the counts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import numpy as np
from ruamel.yaml import YAML

from atomic import atomic_write_text
from data.retrieval_dataset import ImagePathResolver
from models.checkpoint import RUN_CONFIG
import report.html as html
from report.html import Hit, esc
from report.summary import load_ranks
from report.thumbs import THUMB_DIR, write_thumbnails
from report.writer import GALLERY_TOP, REPORT_DIR, thumb_name

DIRECTIONS = (('t2i', 'Text \u2192 image (IR)', 't2i_rank', 't2i_top10'),
              ('i2t', 'Image \u2192 text (TR)', 'i2t_rank', 'i2t_top10'))


class CompareError(ValueError):
    """The two runs cannot be compared (missing files, different splits); the message says why."""


def report_dir(run: str) -> str:
    """The report folder of a run: `run/report/` or `run` itself."""
    for candidate in (os.path.join(run, REPORT_DIR), run):
        if os.path.isdir(candidate) and any(n.startswith('ranks_') and n.endswith('.npz') for n in os.listdir(candidate)):
            return candidate
    raise CompareError(f'{run}: no ranks_<split>.npz here or in {os.path.join(run, REPORT_DIR)}; evaluate the run '
                       'with --evaluate (config key report: true) first')


def splits_of(folder: str) -> list[str]:
    return sorted(name[len('ranks_'):-len('.npz')] for name in os.listdir(folder)
                  if name.startswith('ranks_') and name.endswith('.npz'))


def check_same_split(split: str, a: dict, b: dict, run_a: str, run_b: str) -> None:
    for name in ('texts', 'images', 'txt2img'):
        if a[name].shape != b[name].shape or not np.array_equal(a[name], b[name]):
            raise CompareError(f'{run_a} and {run_b} were evaluated on different {split} sets ({len(a["images"])} '
                               f'images / {len(a["texts"])} captions vs {len(b["images"])} / {len(b["texts"])}, or '
                               f'other {name}); compare two runs of the same split')


def count(rank_a: np.ndarray, rank_b: np.ndarray, k: int) -> dict:
    """Counts and ids of the queries each run gets right (ground truth within the first k) or wrong."""
    right_a, right_b = rank_a < k, rank_b < k
    fixed, broken = np.flatnonzero(~right_a & right_b), np.flatnonzero(right_a & ~right_b)
    # Most improved (worsened) first, then by query id.
    fixed = fixed[np.argsort(-(rank_a[fixed] - rank_b[fixed]), kind='stable')]
    broken = broken[np.argsort(-(rank_b[broken] - rank_a[broken]), kind='stable')]
    return {'queries': int(len(rank_a)), 'fixed': int(len(fixed)), 'broken': int(len(broken)),
            'both_right': int(np.sum(right_a & right_b)), 'both_wrong': int(np.sum(~right_a & ~right_b)),
            'fixed_ids': fixed.tolist(), 'broken_ids': broken.tolist()}


def _hits(arrays: dict, direction: str, query: int, thumbs: dict, split: str) -> tuple[list[Hit], Hit]:
    txt2img = arrays['txt2img']
    if direction == 't2i':
        image = int(txt2img[query])
        hits = [Hit(r, int(c), None, correct=int(c) == image, thumb=thumbs.get(thumb_name(split, int(c))))
                for r, c in enumerate(arrays['t2i_top10'][query, :GALLERY_TOP])]
        return hits, Hit(int(arrays['t2i_rank'][query]), image, None, correct=True,
                         thumb=thumbs.get(thumb_name(split, image)))
    hits = [Hit(r, int(c), None, correct=int(txt2img[c]) == query, text=str(arrays['texts'][c]))
            for r, c in enumerate(arrays['i2t_top10'][query, :GALLERY_TOP])]
    best = int(arrays['i2t_gt'][query])
    return hits, Hit(int(arrays['i2t_rank'][query]), best, None, correct=True, text=str(arrays['texts'][best]))


def query_pair(split: str, direction: str, query: int, a: dict, b: dict, thumbs: dict, names: tuple[str, str]
               ) -> str:
    """One query, run A's and run B's top 5 side by side."""
    columns = []
    for name, arrays in zip(names, (a, b)):
        hits, gt = _hits(arrays, direction, query, thumbs, split)
        if direction == 't2i':
            block = html.t2i_query(query, str(arrays['texts'][query]), hits, gt, note=f'rank {gt.rank + 1}')
        else:
            label = html.query_label('image', query, arrays['images'][query])
            block = html.i2t_query(query, thumbs.get(thumb_name(split, query)), hits, gt,
                                   note=f'{label}: best caption at rank {gt.rank + 1}')
        columns.append(f'<div><h4>{esc(name)}</h4>{block}</div>')
    return f'<div class="side" data-query="{query}">{"".join(columns)}</div>'


def image_sources(split: str, images: np.ndarray, shown: set[int], runs: tuple[str, str],
                  image_root: Optional[str]) -> dict[str, Optional[str]]:
    """Each shown image from a run's own thumbnail, else from the dataset (`image_root`), else none."""
    resolver = ImagePathResolver(image_root) if image_root else None
    sources = {}
    for image in sorted(shown):
        name = thumb_name(split, image)
        found = [os.path.join(folder, THUMB_DIR, name) for folder in runs
                 if os.path.isfile(os.path.join(folder, THUMB_DIR, name))]
        sources[name] = found[0] if found else resolver.resolve(str(images[image])) if resolver else None
    return sources


def _image_root(run: str) -> Optional[str]:
    """`image_root` from the run's config.yaml, if the run folder has one."""
    for path in (os.path.join(run, RUN_CONFIG), os.path.join(os.path.dirname(os.path.abspath(run)), RUN_CONFIG)):
        if os.path.isfile(path):
            with open(path, encoding='utf-8') as f:
                value = (YAML(typ='safe', pure=True).load(f) or {}).get('image_root')
            if isinstance(value, str) and os.path.isdir(value):
                return value
    return None


def compare(run_a: str, run_b: str, out: str, k: int = 1, queries: int = 12, thumb_px: int = 128,
            image_root: Optional[str] = None) -> dict:
    """Write the comparison page of every split both runs have; return the counts (as compare.json)."""
    dir_a, dir_b = report_dir(run_a), report_dir(run_b)
    splits = [s for s in splits_of(dir_a) if s in splits_of(dir_b)]
    if not splits:
        raise CompareError(f'{run_a} ({", ".join(splits_of(dir_a))}) and {run_b} ({", ".join(splits_of(dir_b))}) '
                           'have no split in common')
    names = (f'A: {run_a}', f'B: {run_b}')
    image_root = image_root or _image_root(run_b) or _image_root(run_a)
    summary = {'run_a': run_a, 'run_b': run_b, 'k': k, 'splits': {}}
    sections, thumb_sources, pending = [], {}, []
    for split in splits:
        a, b = load_ranks(os.path.join(dir_a, f'ranks_{split}.npz')), load_ranks(os.path.join(dir_b, f'ranks_{split}.npz'))
        check_same_split(split, a, b, run_a, run_b)
        counts = {direction: count(a[rank_key], b[rank_key], k) for direction, _, rank_key, _ in DIRECTIONS}
        summary['splits'][split] = counts
        shown: set[int] = set()
        for direction, _, _, top_key in DIRECTIONS:
            picked = counts[direction]['fixed_ids'][:queries] + counts[direction]['broken_ids'][:queries]
            for query in picked:
                if direction == 't2i':
                    shown.update(int(c) for arrays in (a, b) for c in arrays[top_key][query, :GALLERY_TOP])
                    shown.add(int(a['txt2img'][query]))
                else:
                    shown.add(query)
        thumb_sources.update(image_sources(split, a['images'], shown, (dir_a, dir_b), image_root))
        pending.append((split, a, b, counts))
    os.makedirs(out, exist_ok=True)
    thumbs = write_thumbnails(thumb_sources, out, thumb_px)
    for split, a, b, counts in pending:
        rows = ''.join(f'<tr data-direction="{d}"><th>{esc(title)}</th><td>{counts[d]["queries"]}</td>'
                       f'<td data-count="fixed">{counts[d]["fixed"]}</td><td data-count="broken">{counts[d]["broken"]}</td>'
                       f'<td>{counts[d]["both_right"]}</td><td>{counts[d]["both_wrong"]}</td></tr>'
                       for d, title, _, _ in DIRECTIONS)
        table = (f'<table class="counts" data-split="{esc(split)}"><tr><th></th><th>queries</th><th>fixed by B</th>'
                 f'<th>broken by B</th><th>right in both</th><th>wrong in both</th></tr>{rows}</table>')
        galleries = []
        for direction, title, _, _ in DIRECTIONS:
            for kind in ('fixed', 'broken'):
                ids = counts[direction][f'{kind}_ids']
                blocks = [query_pair(split, direction, q, a, b, thumbs, names) for q in ids[:queries]]
                heading = f'{title}: {kind} by B ({len(ids)} queries{", first " + str(queries) if len(ids) > queries else ""})'
                galleries.append(html.section(heading, blocks, f'gallery {direction} {kind}',
                                              attrs=f' data-split="{esc(split)}"'))
        sections.append(f'<section class="split" data-split="{esc(split)}"><h2>{esc(split)}</h2>{table}\n'
                        + '\n'.join(galleries) + '</section>')
    right = 'its ground truth ranks first' if k == 1 else f'its ground truth is in the top {k}'
    body = (f'<h1>Comparison of two runs</h1><p class="meta">A: <code>{esc(run_a)}</code><br>B: <code>{esc(run_b)}'
            f'</code><br>A query is right when {right} (Recall@{k}); fixed = wrong in A, right in B; broken = right '
            'in A, wrong in B.</p>\n' + '\n'.join(sections))
    atomic_write_text(os.path.join(out, 'index.html'), html.page('Comparison of two runs', body))
    atomic_write_text(os.path.join(out, 'compare.json'), json.dumps(summary, indent=1) + '\n')
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m report.compare', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('run_a', metavar='RUN_A', help='output_dir (or report folder) of the first run')
    parser.add_argument('run_b', metavar='RUN_B', help='output_dir (or report folder) of the second run')
    parser.add_argument('--out', help='folder for the page (default: RUN_B/compare_<name of RUN_A>)')
    parser.add_argument('--k', type=int, default=1, help='a query is right when its ground truth is in the top K (1)')
    parser.add_argument('--queries', type=int, default=12, help='fixed and broken queries shown per direction (12)')
    parser.add_argument('--thumb_px', type=int, default=128, help='longest side of the thumbnails (128)')
    parser.add_argument('--image_root', help="the dataset's images, for thumbnails the runs' reports lack "
                        "(default: image_root of the runs' config.yaml)")
    args = parser.parse_args(argv)
    if args.k < 1 or args.queries < 0 or not 16 <= args.thumb_px <= 1024:
        parser.error('--k must be >= 1, --queries >= 0 and --thumb_px between 16 and 1024')
    out = args.out or os.path.join(args.run_b, 'compare_' + os.path.basename(os.path.normpath(args.run_a)))
    try:
        summary = compare(args.run_a, args.run_b, out, args.k, args.queries, args.thumb_px, args.image_root)
    except (CompareError, ValueError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    for split, counts in summary['splits'].items():
        for direction, _, _, _ in DIRECTIONS:
            c = counts[direction]
            print(f'{split} {direction}: fixed {c["fixed"]}, broken {c["broken"]} (of {c["queries"]} queries; '
                  f'right in both {c["both_right"]}, wrong in both {c["both_wrong"]}; Recall@{args.k})')
    print(f'compare: {os.path.join(out, "index.html")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
