"""The benchmark scripts at a small size: both paths agree, and the last line is the one scripts read.

Speed is not asserted here (timings belong to the benchmarks themselves, run on a quiet machine).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO

LAST_LINE = re.compile(r'^speedup (\d+\.\d+)x max_abs_diff (\S+)$')


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
    (check,) = [line for line in lines if line.startswith('bf16 vs fp32')]
    assert float(re.search(r'max_abs_diff (\S+)', check).group(1)) < 0.1


def test_bench_train_variants_start_from_the_same_losses():
    lines = run_benchmark('bench_train.py', '--batch', '2', '--steps', '1', '--warmup', '0',
                          '--variants', 'straightforward:fp32,fast:fp32')
    assert [line.split()[0] for line in lines[1:3]] == ['straightforward', 'fast']
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    assert float(match.group(2)) < 1e-4  # same weights, same inputs, fp32: the fast path changes no loss


def test_bench_report_writes_a_report_of_the_asked_size():
    result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'bench_report.py'), '--images', '20',
                             '--k_test', '8', '--image_px', '120x90', '--queries', '4'],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.match(r'^report \d+\.\d+ s for one split of 20 images / 100 captions, \d+\.\d+ MB$', last), last


def test_bench_protocol_itc_scores_are_the_similarity_of_the_itm_run():
    lines = run_benchmark('bench_protocol.py', '--images', '5', '--texts', '12', '--k_test', '4')
    assert [line.split()[0] for line in lines[1:3]] == ['itc', 'itm']
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    assert float(match.group(2)) < 1e-6  # the same features, the same product: itc stops where itm starts
