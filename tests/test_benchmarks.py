"""The benchmark scripts at a small size: both paths agree, the measured lines are consistent with each other
(the ratio is that of the printed times, rates are counts over times, sizes are those of the files written), and
the last line is the one scripts read.

Speed is not asserted here (timings belong to the benchmarks themselves, run on a quiet machine).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

LAST_LINE = re.compile(r'^speedup (\d+\.\d+)x max_abs_diff (\S+)$')
NUMBER = r'(\d+(?:\.\d+)?)'


def measured(lines: list[str], pattern: str) -> tuple[float, ...]:
    """The numbers of the one line that matches `pattern` (NUMBER groups)."""
    found = [re.match(pattern, line) for line in lines]
    (match,) = [m for m in found if m]
    return tuple(float(g) for g in match.groups())


def assert_printed_ratio(ratio: float, numerator: float, denominator: float) -> None:
    """`ratio` (2 decimals) is numerator / denominator, both printed to 2 decimals: rounding bounds the error."""
    bound = 0.005 + (numerator / denominator) * (0.005 / numerator + 0.005 / denominator) * 1.01
    assert abs(ratio - numerator / denominator) <= bound, (ratio, numerator, denominator)


def run_benchmark(name: str, *args: str) -> list[str]:
    env = dict(os.environ, OMP_NUM_THREADS='2')
    result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', name), '--device', 'cpu',
                             '--image_size', '64', *args], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout.strip().splitlines()


def test_bench_eval_fast_equals_reference():
    lines = run_benchmark('bench_eval.py', '--images', '5', '--texts', '12', '--k_test', '4', '--batch', '8',
                          '--precision', 'bf16', '--compare_fp32')
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    assert float(match.group(2)) < 0.02  # bf16 on both paths: rounding only
    (entries,) = measured(lines, rf'^setup: .* {NUMBER} top-k entries')
    fast_s, fast_rate = measured(lines, rf'^fast:\s+wall\s+{NUMBER} s\s+{NUMBER} entries/s')
    reference_s, reference_rate = measured(lines, rf'^reference:\s+wall\s+{NUMBER} s\s+{NUMBER} entries/s')
    assert_printed_ratio(float(match.group(1)), reference_s, fast_s)
    assert fast_rate == pytest.approx(entries / fast_s, rel=0.01, abs=0.06)  # rate and wall each rounded
    assert reference_rate == pytest.approx(entries / reference_s, rel=0.01, abs=0.06)
    (check,) = [line for line in lines if line.startswith('bf16 vs fp32')]
    assert float(re.search(r'max_abs_diff (\S+)', check).group(1)) < 0.1


def test_bench_train_variants_start_from_the_same_losses():
    lines = run_benchmark('bench_train.py', '--batch', '2', '--steps', '1', '--warmup', '0',
                          '--variants', 'straightforward:fp32,fast:fp32')
    assert [line.split()[0] for line in lines[1:3]] == ['straightforward', 'fast']
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    assert float(match.group(2)) < 1e-4  # same weights, same inputs, fp32: the fast path changes no loss
    step_s, rate = {}, {}
    for path in ('straightforward', 'fast'):
        step_s[path], rate[path] = measured(lines, rf'^{path}\s+fp32:\s+{NUMBER} s/step\s+{NUMBER} samples/s')
        assert rate[path] == pytest.approx(2 / step_s[path], rel=0.01, abs=0.006)  # batch 2, each rounded
    assert_printed_ratio(float(match.group(1)), step_s['straightforward'], step_s['fast'])


def test_bench_report_measures_the_report_it_writes(tmp_path):
    kept = tmp_path / 'report'
    result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'bench_report.py'), '--images', '20',
                             '--k_test', '8', '--image_px', '120x90', '--queries', '4', '--keep', str(kept)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    report_s, mb = measured(lines[-1:], rf'^report {NUMBER} s for one split of 20 images / 100 captions, {NUMBER} MB$')
    size = sum(path.stat().st_size for path in kept.rglob('*') if path.is_file())
    assert mb == pytest.approx(size / 1e6, abs=0.005)  # the size printed is that of the report written
    summary_s, plots_s, thumbs_s, thumbs, each_ms = measured(
        lines, rf'^ranks and top-10 ids: {NUMBER} s; plots: {NUMBER} s; thumbnails: {NUMBER} s for {NUMBER} '
        rf'images \({NUMBER} ms each\)$')
    assert thumbs == len(list((kept / 'thumbs').glob('*.jpg')))  # the report shows the images timed
    assert each_ms == pytest.approx(1000 * thumbs_s / thumbs, abs=0.05 + 5 / thumbs)  # thumbs_s is rounded
    assert report_s > 0 and summary_s >= 0 and plots_s >= 0


def test_bench_protocol_itc_scores_are_the_similarity_of_the_itm_run():
    lines = run_benchmark('bench_protocol.py', '--images', '5', '--texts', '12', '--k_test', '4')
    assert [line.split()[0] for line in lines[1:3]] == ['itc', 'itm']
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    assert float(match.group(2)) < 1e-6  # the same features, the same product: itc stops where itm starts
    (itc_s,) = measured(lines, rf'^itc \(k_test 0\): wall\s+{NUMBER} s')
    (itm_s,) = measured(lines, rf'^itm \(k_test 4\): wall\s+{NUMBER} s')
    assert itc_s > 0 and itm_s > 0  # both encode the images and texts (at least some hundredths of a second)
    assert_printed_ratio(float(match.group(1)), itm_s, itc_s)
