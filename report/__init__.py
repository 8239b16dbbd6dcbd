"""What the model retrieves, to look at in a browser: the report of an evaluation, the comparison of two runs.

- `write_evaluation_report` (train_retrieval.py): `output_dir/report/` after `--evaluate` and for a
  fine-tune's best epoch: index.html, Recall@K and rank plots, galleries, thumbnails, `ranks_<split>.npz`.
- `python -m report.compare RUN_A RUN_B [--out DIR]`: the queries one run fixed and the other broke.
- `python -m report.table RUN ... --out DIR`: one table of many runs' results (CSV, Markdown, a sortable page).
- The gallery blocks (`report.html`) are shared with `search.py --html`.

A package of its own: HTML, plots, thumbnails and the compare command are used by two entry points.
"""
from report.summary import SplitScores, SplitSummary, load_ranks, summarize
from report.writer import REPORT_DIR, write_evaluation_report

__all__ = ['REPORT_DIR', 'SplitScores', 'SplitSummary', 'load_ranks', 'summarize', 'write_evaluation_report']
