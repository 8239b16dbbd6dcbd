"""The results of many runs in one table: checkpoints, protocols and times side by side.

    python -m report.table RUN [RUN ...] --out DIR

RUN: a run's output folder (its evaluate.txt, else the best epoch of its log.txt), an evaluate.txt or log.txt file,
or a glob of either (quote it: 'output/eval_*'). An evaluate.txt's last record is read (the latest --evaluate).
Writes DIR/results.csv (every value as the run wrote it), DIR/results.md and DIR/index.html (a static table in the
report's style that sorts by any column on a click: inline CSS and script, nothing fetched). One row per (run,
split): the checkpoint, the dataset and split with its images and texts, the protocol and k_test, TR@1/5/10,
IR@1/5/10 and r_mean, the evaluation time, device, processes and precision, and for the official checkpoints on
Flickr30k test the paper's TR@1 / IR@1 and the difference from them; each row links to its run's report. A run that
cannot be read is named (here and on the page) and skipped; the others are still written. Exit code 0, or 2 when
no run could be read.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import sys
from typing import Optional

from ruamel.yaml import YAML

from atomic import atomic_write_text
from models.checkpoint import EVALUATE_LOG, RUN_CONFIG, TRAIN_LOG
import report.html as html
from report.html import esc
from report.paper import paper_numbers
from report.writer import INDEX, REPORT_DIR

SPLITS = ('val', 'test')
RECALL_KEYS = ('txt_r1', 'txt_r5', 'txt_r10', 'img_r1', 'img_r5', 'img_r10', 'r_mean')
# results.csv's columns, in order; (column, heading on the page and in results.md, display format).
COLUMNS = (
    ('run', 'run', 's'), ('source', 'from', 's'), ('checkpoint', 'checkpoint', 's'),
    ('checkpoint_sha256', 'sha256', 'hash'), ('checkpoint_revision', 'revision', 'hash'),
    ('dataset', 'dataset', 's'), ('split', 'split', 's'), ('images', 'images', 'd'), ('texts', 'texts', 'd'),
    ('protocol', 'protocol', 's'), ('k_test', 'k_test', 'd'),
    ('txt_r1', 'TR@1', '.2f'), ('txt_r5', 'TR@5', '.2f'), ('txt_r10', 'TR@10', '.2f'),
    ('img_r1', 'IR@1', '.2f'), ('img_r5', 'IR@5', '.2f'), ('img_r10', 'IR@10', '.2f'), ('r_mean', 'r_mean', '.2f'),
    ('eval_seconds', 'eval s', '.1f'), ('device', 'device', 's'), ('world_size', 'processes', 'd'),
    ('precision', 'precision', 's'), ('paper_txt_r1', 'paper TR@1', '.1f'), ('paper_img_r1', 'paper IR@1', '.1f'),
    ('txt_r1_minus_paper', 'TR@1 - paper', '+.2f'), ('img_r1_minus_paper', 'IR@1 - paper', '+.2f'),
    ('report', 'report', 's'),
)
FIELDS = tuple(name for name, _, _ in COLUMNS)
GLOB_CHARS = ('*', '?', '[')
# Click a heading to sort by it (again: the other way); numbers by value, empty cells last. The one script of the
# report pages: a static page cannot sort itself.
SORT_SCRIPT = """
document.querySelectorAll('table.results th').forEach(function (th, column) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var descending = th.getAttribute('data-order') === 'asc';
    var key = function (row) { return row.cells[column].getAttribute('data-value'); };
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === '' || y === '') { return (x === '') - (y === ''); }
      var order = (isNaN(x) || isNaN(y)) ? x.localeCompare(y) : Number(x) - Number(y);
      return descending ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    th.closest('tr').querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-order'); });
    th.setAttribute('data-order', descending ? 'desc' : 'asc');
  });
});
"""


class RunError(ValueError):
    """A run that cannot be read; the message says why."""


# ---------------------------------------------------------------------------------------------- reading runs
def expand(runs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(paths in order, [(pattern, why)] for the globs that match nothing); duplicates dropped."""
    paths, unmatched = [], []
    for run in runs:
        matches = sorted(glob.glob(run)) if any(c in run for c in GLOB_CHARS) and not os.path.exists(run) else [run]
        if not matches:
            unmatched.append((run, 'the pattern matches nothing'))
        paths += [path for path in matches if path not in paths]
    return paths, unmatched


def _last_record(path: str) -> dict:
    with open(path, encoding='utf-8') as f:
        lines = [line for line in f if line.strip()]
    if not lines:
        raise RunError(f'{os.path.basename(path)} is empty')
    try:
        record = json.loads(lines[-1])
    except json.JSONDecodeError as error:
        raise RunError(f'the last line of {os.path.basename(path)} is not JSON ({error.msg}): a run killed while '
                       'writing it?') from None
    if not isinstance(record, dict):
        raise RunError(f'the last line of {os.path.basename(path)} is not a JSON object')
    return record


def _best_epoch_record(path: str) -> dict:
    """The log.txt record of the best epoch (its val_* and test_* are that epoch's)."""
    last = _last_record(path)
    with open(path, encoding='utf-8') as f:
        records = [json.loads(line) for line in f if line.strip()]
    best = [r for r in records if isinstance(r, dict) and r.get('epoch') == last.get('best_epoch')]
    if not best:
        raise RunError(f'{TRAIN_LOG}: no epoch has been evaluated yet (best_epoch {last.get("best_epoch")})')
    return best[-1]


def read_run(path: str) -> tuple[str, str, dict]:
    """(run folder, what the record is, record) of an output folder, evaluate.txt or log.txt; RunError if none."""
    if os.path.isdir(path):
        folder = path
        files = [os.path.join(path, name) for name in (EVALUATE_LOG, TRAIN_LOG)]
        file = next((f for f in files if os.path.isfile(f)), None)
        if file is None:
            raise RunError(f'neither {EVALUATE_LOG} nor {TRAIN_LOG} here (not a run folder, or a run that never '
                           'finished an evaluation)')
    elif os.path.isfile(path):
        folder, file = os.path.dirname(path) or '.', path
    else:
        raise RunError('no such file or folder')
    try:
        if os.path.basename(file) == TRAIN_LOG:
            record = _best_epoch_record(file)
            source = f'{TRAIN_LOG}: fine-tune, best epoch {record["epoch"]}'
        else:
            record, source = _last_record(file), EVALUATE_LOG
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f'{os.path.basename(file)} cannot be read ({error})') from None
    if not any(f'{split}_{key}' in record for split in SPLITS for key in RECALL_KEYS):
        raise RunError(f'the record of {os.path.basename(file)} has no val_* or test_* recall')
    return folder, source, record


def _config_value(folder: str, key: str) -> Optional[str]:
    """A key of the run's config.yaml (records written before the result fields lack `dataset`, `pretrained`)."""
    path = os.path.join(folder, RUN_CONFIG)
    try:
        with open(path, encoding='utf-8') as f:
            value = (YAML(typ='safe', pure=True).load(f) or {}).get(key)
    except Exception:  # noqa: BLE001 - a missing or broken config.yaml only leaves the cell empty
        return None
    return value if isinstance(value, str) else None


def rows_of(folder: str, source: str, record: dict, out: str) -> list[dict]:
    """One row per split the record holds recall of."""
    dataset = record.get('dataset', _config_value(folder, 'dataset'))
    pretrained = record.get('pretrained', _config_value(folder, 'pretrained'))
    report = os.path.join(folder, REPORT_DIR, INDEX)
    rows = []
    for split in SPLITS:
        if f'{split}_r_mean' not in record:
            continue
        row = {'run': folder, 'source': source, 'checkpoint': pretrained, 'dataset': dataset, 'split': split,
               'report': os.path.relpath(report, out) if os.path.isfile(report) else None}
        for name in ('checkpoint_sha256', 'checkpoint_revision', 'protocol', 'k_test', 'device', 'world_size',
                     'precision'):
            row[name] = record.get(name)
        for name in ('images', 'texts', 'eval_seconds'):
            row[name] = (record.get(name) or {}).get(split)
        row.update({key: record.get(f'{split}_{key}') for key in RECALL_KEYS})
        paper = paper_numbers(pretrained, dataset or '', split, fine_tune=source != EVALUATE_LOG)
        if paper is not None:
            _, numbers = paper
            row['paper_txt_r1'], row['paper_img_r1'] = numbers['txt_r1'], numbers['img_r1']
            for key in ('txt_r1', 'img_r1'):
                if isinstance(row[key], (int, float)):
                    row[f'{key}_minus_paper'] = row[key] - numbers[key]
        rows.append({name: row.get(name) for name in FIELDS})
    return rows


# ---------------------------------------------------------------------------------------------- writing
def _shown(value, kind: str) -> str:
    if value is None or value == '':
        return ''
    if kind == 'hash':
        return str(value)[:12]
    if kind != 's' and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, kind)
    return str(value)


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator='\n')
    writer.writeheader()
    for row in rows:
        writer.writerow({k: '' if v is None else v for k, v in row.items()})  # floats as repr: exact round trip
    return buffer.getvalue()


def markdown_text(rows: list[dict], skipped: list[tuple[str, str]]) -> str:
    cell = lambda text: text.replace('|', '\\|')
    lines = ['| ' + ' | '.join(title for _, title, _ in COLUMNS) + ' |', '|' + ' --- |' * len(COLUMNS)]
    for row in rows:
        cells = [_shown(row[name], kind) for name, _, kind in COLUMNS]
        if row['report']:
            cells[-1] = f'[report]({row["report"]})'
        lines.append('| ' + ' | '.join(cell(c) for c in cells) + ' |')
    lines += [''] + [f'- skipped `{path}`: {why}' for path, why in skipped]
    return '\n'.join(lines).rstrip() + '\n'


def html_text(rows: list[dict], skipped: list[tuple[str, str]]) -> str:
    head = ''.join(f'<th data-key="{name}" title="click to sort">{esc(title)}</th>' for name, title, _ in COLUMNS)
    body = []
    for row in rows:
        cells = []
        for name, _, kind in COLUMNS:
            value = row[name]
            raw = '' if value is None else repr(value) if isinstance(value, float) else str(value)
            shown = esc(_shown(value, kind))
            if name == 'report' and value:
                shown = f'<a href="{esc(value)}">report</a>'
            elif name in ('checkpoint', 'run', 'checkpoint_sha256', 'checkpoint_revision') and value:
                short = _short(value) if kind == 's' else _shown(value, kind)
                shown = f'<span title="{esc(value)}">{esc(short)}</span>'
            cells.append(f'<td data-key="{name}" data-value="{esc(raw)}">{shown}</td>')
        body.append(f'<tr data-run="{esc(row["run"])}" data-split="{esc(row["split"])}">{"".join(cells)}</tr>')
    notes = ''.join(f'<li data-run="{esc(path)}"><code>{esc(path)}</code>: {esc(why)}</li>' for path, why in skipped)
    runs = len({row['run'] for row in rows})
    content = (f'<h1>Retrieval results</h1>\n<p class="meta">{runs} run(s), {len(rows)} row(s): one per run and '
               'split. Recall in percent; TR: image &rarr; text, IR: text &rarr; image. Click a heading to sort. '
               'Protocol itm: the matching head re-ranks each query\'s k_test best by similarity; itc: the '
               'similarity alone (k_test 0).</p>\n'
               f'<table class="results"><thead><tr>{head}</tr></thead><tbody>\n' + '\n'.join(body)
               + '\n</tbody></table>\n'
               + (f'<h2>Skipped</h2>\n<ul class="skipped">{notes}</ul>\n' if skipped else '')
               + f'<script>{SORT_SCRIPT}</script>')
    return html.page('Retrieval results', content)


def _short(value: str) -> str:
    """A path or URL by its last two parts (the full value is the cell's tooltip); a Hub id as it is."""
    parts = str(value).rstrip('/').split('/')
    return '/'.join(parts[-2:]) if len(parts) > 2 else str(value)


def build_table(runs: list[str], out: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """Write DIR/results.csv, results.md and index.html; return (rows, skipped runs with the reason)."""
    paths, skipped = expand(runs)
    rows = []
    for path in paths:
        try:
            rows += rows_of(*read_run(path), out)
        except RunError as error:
            skipped.append((path, str(error)))
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, 'results.csv'), csv_text(rows))
    atomic_write_text(os.path.join(out, 'results.md'), markdown_text(rows, skipped))
    atomic_write_text(os.path.join(out, 'index.html'), html_text(rows, skipped))
    return rows, skipped


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m report.table', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', metavar='RUN', help='output folder, evaluate.txt / log.txt, or a glob')
    parser.add_argument('--out', required=True, metavar='DIR', help='folder for results.csv, results.md, index.html')
    args = parser.parse_args(argv)
    rows, skipped = build_table(args.runs, args.out)
    for path, why in skipped:
        print(f'skipped {path}: {why}', file=sys.stderr)
    if not rows:
        print('error: no run could be read', file=sys.stderr)
        return 2
    print(f'{len({row["run"] for row in rows})} run(s), {len(rows)} row(s)'
          + (f', {len(skipped)} skipped' if skipped else '') + f': {os.path.join(args.out, "index.html")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
