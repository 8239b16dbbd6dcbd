"""The CPU demo learns, and learns the same way every time: shortened runs of configs/retrieval_demo.yaml.

One in-process fine-tune of the real demo config (synthetic data generated into tmp_path, three
epochs instead of the config's max_epoch) through `train_retrieval.main`, then checks on its
log.txt and per-step trace: recall well above chance on val and test, the contrastive loss far
below its starting value, the matching loss below its starting value. A regression in the model's
losses, the optimizer, the schedule or the demo config shows up here as "no learning".
A second run of the first epoch, on a machine made busy on purpose, must repeat it bit for bit.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO

import run_state
import train_retrieval
from data import demo
from evaluation import chance_recall, recall_metrics

CONFIG = os.path.join(REPO, 'configs', 'retrieval_demo.yaml')
EPOCHS = 3
SEED = 42
# Steps averaged at the start and at the end of training when comparing the per-step losses.
WINDOW = 20


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def demo_run(root: Path, data: Path, epochs: int, output_dir: Path | None = None) -> tuple[int, str]:
    """One in-process demo fine-tune with the step trace on; (exit code, trace prefix)."""
    trace_prefix = str(root / f'trace{epochs}')
    argv = ['--config', CONFIG, '--device', 'cpu', '--seed', str(SEED)]
    argv += ['--output_dir', str(output_dir)] if output_dir else []
    argv += ['--options', f'image_root={data}', f'tokenizer={data / demo.VOCAB_FILENAME}', f'max_epoch={epochs}',
             'tensorboard=False']
    os.environ[train_retrieval.STEP_TRACE_ENV] = trace_prefix
    try:
        return train_retrieval.main(argv), trace_prefix
    finally:
        del os.environ[train_retrieval.STEP_TRACE_ENV]


@pytest.fixture(scope='module')
def demo_first(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp('demo')
    os.environ.pop(run_state.STOP_AFTER_STEPS_ENV, None)
    code, trace = demo_run(root, root / 'demo_data', EPOCHS, root / 'run')
    assert code == 0
    return {'root': root, 'data': root / 'demo_data', 'out': root / 'run', 'trace': trace}


def chance_r_mean(n_images: int, captions_per_image: int) -> float:
    img2txt = {i: list(range(i * captions_per_image, (i + 1) * captions_per_image)) for i in range(n_images)}
    return chance_recall({t: i for i, texts in img2txt.items() for t in texts}, img2txt)['r_mean']


def test_chance_r_mean_matches_random_scores():
    """evaluation.chance_recall (printed beside every result) agrees with the recall of random score matrices."""
    n_images, per_image = 100, demo.CAPTIONS_PER_IMAGE
    img2txt = {i: list(range(i * per_image, (i + 1) * per_image)) for i in range(n_images)}
    txt2img = {t: i for i, texts in img2txt.items() for t in texts}
    rng = np.random.default_rng(0)
    draws = [recall_metrics(rng.random((n_images, n_images * per_image)), rng.random((n_images * per_image, n_images)),
                            txt2img, img2txt)['r_mean'] for _ in range(200)]
    # Text R@1/5/10 = 1.0/4.9/9.6 %, image R@1/5/10 = 1/5/10 %: r_mean 5.26.
    assert chance_r_mean(n_images, per_image) == pytest.approx(5.26, abs=0.005)
    assert float(np.mean(draws)) == pytest.approx(chance_r_mean(n_images, per_image), abs=0.2)


def test_demo_finetune_learns(demo_first):
    data, out, trace_prefix = demo_first['data'], demo_first['out'], demo_first['trace']
    log = read_jsonl(out / 'log.txt')
    assert [record['epoch'] for record in log] == list(range(EPOCHS))
    manifest = json.loads((data / demo.MANIFEST_FILENAME).read_text(encoding='utf-8'))
    chance = chance_r_mean(manifest['counts']['val_images'], demo.CAPTIONS_PER_IMAGE)
    assert manifest['counts']['test_images'] == manifest['counts']['val_images']

    # Recall: the first epoch is still near chance, the last far above it on both splits.
    # (Measured at seed 42: val r_mean 9 after epoch 0 and 49 after epoch 2, test 50; chance 5.26.)
    last = log[-1]
    summary = [{k: round(v, 3) for k, v in r.items() if k.endswith('r_mean') or k.startswith('train_loss')}
               for r in log]
    assert last['val_r_mean'] > 4 * chance, summary
    assert last['test_r_mean'] > 4 * chance, summary
    assert last['val_txt_r_mean'] > 2.5 * chance and last['val_img_r_mean'] > 2.5 * chance, summary
    assert last['val_r_mean'] > log[0]['val_r_mean'] + 2 * chance, summary
    assert last['best_epoch'] == max(log, key=lambda r: r['val_r_mean'])['epoch'], summary

    # Losses, per epoch: the contrastive loss falls by far more than noise (4.13 -> 2.57 at seed 42).
    assert last['train_loss_ita'] < 0.8 * log[0]['train_loss_ita'], summary
    assert all(math.isfinite(r['train_loss_ita']) and math.isfinite(r['train_loss_itm']) for r in log), summary

    # Losses, per step (the BLIP_STEP_TRACE hook): both end below where they started
    # (seed 42, first vs last 20 steps: contrastive 4.11 -> 2.37, matching 0.638 -> 0.592).
    trace = read_jsonl(Path(f'{trace_prefix}.rank0.jsonl'))
    steps_per_epoch = len(trace) // EPOCHS
    assert len(trace) == EPOCHS * steps_per_epoch and steps_per_epoch > 2 * WINDOW, len(trace)
    start = {name: mean([r[name] for r in trace[:WINDOW]]) for name in ('loss_ita', 'loss_itm')}
    end = {name: mean([r[name] for r in trace[-WINDOW:]]) for name in ('loss_ita', 'loss_itm')}
    assert end['loss_ita'] < 0.7 * start['loss_ita'], (start, end)
    assert end['loss_itm'] < start['loss_itm'] - 0.01, (start, end)
    # The cosine schedule ran: one learning rate per epoch, decreasing.
    lrs = [trace[e * steps_per_epoch]['lr'] for e in range(EPOCHS)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])), lrs


def test_demo_repeats_bit_for_bit_on_a_busy_machine(demo_first, tmp_path, monkeypatch, capsys):
    """The same seed gives the same run: every step's losses and the epoch's recall are identical, here with two
    CPU-bound processes competing for the two cores. Also the demo's own output folder and closing summary."""
    monkeypatch.chdir(tmp_path)
    hogs = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(2)]
    try:
        code, trace = demo_run(tmp_path, demo_first['data'], 1)  # no --output_dir: output/retrieval_demo
    finally:
        for hog in hogs:
            hog.kill()
    assert code == 0
    out = tmp_path / 'output' / 'retrieval_demo'
    first, again = read_jsonl(Path(f"{demo_first['trace']}.rank0.jsonl")), read_jsonl(Path(f'{trace}.rank0.jsonl'))
    strip = lambda r: {k: v for k, v in r.items() if k != 'pid'}
    assert [strip(r) for r in again] == [strip(r) for r in first[:len(again)]]  # losses compared as exact floats
    assert read_jsonl(out / 'log.txt')[0] == read_jsonl(demo_first['out'] / 'log.txt')[0]

    printed = capsys.readouterr().out
    summary = printed[printed.index('Training done: best epoch 0'):]
    assert f'checkpoint: {os.path.join("output", "retrieval_demo", "checkpoint_best.pth")}' in summary
    record = read_jsonl(out / 'log.txt')[0]
    assert f"val  r_mean {record['val_r_mean']:.2f} | TR@1/5/10 {record['val_txt_r1']:.2f}" in summary
    assert '(chance r_mean 5.26)' in summary
    assert not re.findall(r'\d+\.\d{3,}', summary)  # recalls are rounded (no 28.999999999999996)
