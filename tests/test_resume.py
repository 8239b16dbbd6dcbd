"""Never lose a run: exact resume after a stop or SIGTERM, crash-safe checkpoint writes, and bad input refused
before any compute or output.

The stop after epoch 0 uses the BLIP_STOP_AFTER_STEPS hook of train_retrieval.py (the same code path as a signal);
the mid-epoch stop is a real SIGTERM sent to torchrun, which forwards it to the workers' process groups.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY_KWARGS, free_port, run_torchrun, without_times
from synthetic import write_colour_dataset
from test_train_retrieval import base_args, run_main_error, tiny_options

import atomic
from run import checkpoints, output
from run.failures import SetupError
import train_retrieval
import utils
from models import BLIP_Retrieval

SCRIPT = os.path.join(REPO, 'train_retrieval.py')
STEPS_PER_EPOCH = 7  # 24 images x 5 captions = 120 samples, 60 per rank, batches of 8


def run_options(data: dict, num_workers: int, **extra) -> list[str]:
    return tiny_options(data, '', init_lr=3e-3, momentum=0.9, batch_size_train=8, queue_size=32, k_test=4,
                        max_epoch=2, num_workers=num_workers, **extra)


def read_trace(prefix: str, rank: int, with_pid: bool = False) -> list[dict]:
    """The BLIP_STEP_TRACE records of one rank (complete lines only: the run may be writing), without the
    writing process's id unless asked for."""
    path = f'{prefix}.rank{rank}.jsonl'
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.endswith('\n')]
    return records if with_pid else [{k: v for k, v in r.items() if k != 'pid'} for r in records]


def assert_same(a, b, where: str = 'checkpoint') -> None:
    """Bit-identical nested checkpoints: torch.equal on every tensor, == on everything else."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for key in a:
            assert_same(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{where}[{i}]')
    else:
        assert a == b, (where, a, b)


def load(path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


# ---------------------------------------------------------------------------------------------- exact resume
@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> dict:
    """Run A: two epochs straight (num_workers 0). Run B: the same, stopped by the hook after epoch 0's last
    step (num_workers 2), resumed and stopped by SIGTERM early in epoch 1 (num_workers 2), resumed to the end
    (num_workers 0). Both runs trace every step of every rank."""
    root = tmp_path_factory.mktemp('resume')
    data = write_colour_dataset(str(root / 'data'), n_train=24, n_val=6, n_test=6)
    a_out, b_out = root / 'A', root / 'B'
    a_trace, b_trace = str(root / 'A_trace'), str(root / 'B_trace')
    result = {'root': root, 'data': data, 'A': a_out, 'B': b_out, 'A_trace': a_trace, 'B_trace': b_trace}

    done = run_torchrun([SCRIPT] + base_args() + ['--output_dir', str(a_out)] + run_options(data, 0),
                        env_extra={'BLIP_STEP_TRACE': a_trace})
    assert done.returncode == 0, done.stderr[-3000:]

    # B1: a stop requested during the last step of epoch 0 (its evaluation has not run yet).
    b1 = run_torchrun([SCRIPT] + base_args() + ['--output_dir', str(b_out)] + run_options(data, 2),
                      env_extra={'BLIP_STEP_TRACE': b_trace, 'BLIP_STOP_AFTER_STEPS': str(STEPS_PER_EPOCH)})
    assert b1.returncode == 0, b1.stderr[-3000:]
    result['B1_stdout'] = b1.stdout
    result['B1_checkpoint'] = load(b_out / 'checkpoint_last.pth')
    result['B1_log'] = (b_out / 'log.txt').read_text() if (b_out / 'log.txt').exists() else ''

    # B2: resumed, then SIGTERM to torchrun once rank 0 has done the first step of epoch 1.
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', BLIP_STEP_TRACE=b_trace)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_addr=127.0.0.1',
           f'--master_port={free_port()}', SCRIPT, *base_args(), '--output_dir', str(b_out), '--resume', 'auto',
           *run_options(data, 2)]
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600  # a generous bound: 2-core CI machines can be busy
        while not any(r['epoch'] == 1 for r in read_trace(b_trace, 0)):
            assert process.poll() is None and time.time() < deadline, 'run B2 ended before epoch 1'
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        result['B2_output'], _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    result['B2_checkpoint_path'] = root / 'B2_checkpoint_last.pth'
    shutil.copy(b_out / 'checkpoint_last.pth', result['B2_checkpoint_path'])

    # What a hard kill in the middle of a checkpoint write leaves behind; the next start removes it.
    (b_out / '.checkpoint_last.pth.12345.0badf00d.tmp').write_bytes(b'half a checkpoint')
    b3 = run_torchrun([SCRIPT] + base_args() + ['--output_dir', str(b_out), '--resume', 'auto']
                      + run_options(data, 0), env_extra={'BLIP_STEP_TRACE': b_trace})
    assert b3.returncode == 0, b3.stderr[-3000:]
    return result


def test_stops_save_where_they_happened(runs):
    first = runs['B1_checkpoint']
    assert (first['epoch'], first['step']) == (0, STEPS_PER_EPOCH)  # stopped before epoch 0's evaluation
    assert runs['B1_log'] == ''
    assert f'Stopped by BLIP_STOP_AFTER_STEPS={STEPS_PER_EPOCH} at epoch 0 step 7' in runs['B1_stdout']

    second = load(runs['B2_checkpoint_path'])
    assert second['epoch'] == 1 and 1 <= second['step'] < STEPS_PER_EPOCH, (second['epoch'], second['step'])
    assert f"Stopped by SIGTERM at epoch 1 step {second['step']} of 7" in runs['B2_output']
    assert '--resume auto' in runs['B2_output'].split('Continue with:')[1].splitlines()[1]
    # Both ranks saved the same step: all of them agreed on when to stop.
    assert len(second['rng_states']) == 2 and second['world_size'] == 2


def test_resumed_run_has_bit_identical_weights_optimizer_and_log(runs):
    a, b = load(runs['A'] / 'checkpoint_last.pth'), load(runs['B'] / 'checkpoint_last.pth')
    assert (a['epoch'], a['step']) == (b['epoch'], b['step']) == (2, 0)
    assert_same(a['model'], b['model'], 'model')  # queues included
    assert any(k.endswith('queue') for k in a['model'])
    assert_same(a['optimizer'], b['optimizer'], 'optimizer')
    assert_same(a['rng_states'], b['rng_states'], 'rng_states')
    assert_same(load(runs['A'] / 'checkpoint_best.pth')['model'], load(runs['B'] / 'checkpoint_best.pth')['model'])
    a_log, b_log = without_times(runs['A'] / 'log.txt'), without_times(runs['B'] / 'log.txt')
    assert [record['epoch'] for record in a_log] == [0, 1]
    assert a_log == b_log  # every value but the evaluation times
    assert not [name for name in os.listdir(runs['B']) if name.endswith('.tmp')]


def test_logged_train_losses_average_over_both_ranks(runs):
    """log.txt's train_* are means over every step of every rank (the original synchronizes its meters)."""
    traces = [read_trace(runs['A_trace'], rank) for rank in (0, 1)]
    log = [json.loads(line) for line in (runs['A'] / 'log.txt').read_text().splitlines()]
    for record in log:
        for name in ('loss_ita', 'loss_itm'):
            per_rank = [[r[name] for r in trace if r['epoch'] == record['epoch']] for trace in traces]
            assert len(per_rank[0]) == len(per_rank[1]) == STEPS_PER_EPOCH
            assert per_rank[0] != per_rank[1]  # the ranks see different samples
            expected = sum(map(sum, per_rank)) / (2 * STEPS_PER_EPOCH)
            assert record[f'train_{name}'] == pytest.approx(expected, rel=1e-6, abs=1e-7), (record['epoch'], name)


def test_torchrun_restarts_a_killed_rank_and_finishes_bit_identical(runs, tmp_path):
    """`torchrun --max-restarts=1 ... --resume auto` with save_every_steps 1: rank 1 SIGKILLed in the middle of
    epoch 1 (no handler runs, as with the OOM killer); torchrun restarts both workers, which continue from the
    last step saved and end with run A's weights and log bit for bit."""
    out, trace = tmp_path / 'elastic', str(tmp_path / 'trace')
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', BLIP_STEP_TRACE=trace)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--max-restarts=1',
           '--master_addr=127.0.0.1', f'--master_port={free_port()}', SCRIPT, *base_args(), '--output_dir', str(out),
           '--resume', 'auto', *run_options(runs['data'], 0, save_every_steps=1)]
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while not [r for r in read_trace(trace, 1, with_pid=True) if (r['epoch'], r['step']) >= (1, 2)]:
            assert process.poll() is None and time.time() < deadline, 'the run ended before epoch 1'
            time.sleep(0.02)
        victim = read_trace(trace, 1, with_pid=True)[-1]['pid']
        os.kill(victim, signal.SIGKILL)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-4000:]
    pids = {r['pid'] for r in read_trace(trace, 1, with_pid=True)}
    assert victim in pids and len(pids) == 2  # rank 1 ran in two processes: the killed one and its restart
    a, b = load(runs['A'] / 'checkpoint_last.pth'), load(out / 'checkpoint_last.pth')
    assert (b['epoch'], b['step']) == (2, 0)
    assert_same(a['model'], b['model'], 'model')
    assert_same(a['optimizer'], b['optimizer'], 'optimizer')
    assert without_times(runs['A'] / 'log.txt') == without_times(out / 'log.txt')
    assert 'torchrun restart 1 of this job (TORCHELASTIC_RESTART_COUNT=1): continuing from the last checkpoint' \
        in (out / 'train.log').read_text()


@pytest.mark.parametrize('rank', [0, 1])
def test_resumed_run_sees_the_same_data_lr_and_alpha_at_every_step(runs, rank):
    """Every step, before and after each interruption: same samples, lr, alpha and losses, none repeated or skipped."""
    a, b = read_trace(runs['A_trace'], rank), read_trace(runs['B_trace'], rank)
    assert [(r['epoch'], r['step']) for r in a] == [(e, s) for e in range(2) for s in range(STEPS_PER_EPOCH)]
    assert [(r['epoch'], r['step']) for r in b] == [(r['epoch'], r['step']) for r in a]
    for x, y in zip(a, b):
        assert x == y, (x['epoch'], x['step'])
    assert a[0]['alpha'] == 0 and a[-1]['alpha'] == 0.4 and a[0]['lr'] > a[-1]['lr']


def test_resume_with_another_world_size_keeps_the_global_batches(runs, tmp_path, monkeypatch):
    """One process with batch 16 continues the two-process (2 x 8) mid-epoch checkpoint on the same samples."""
    checkpoint = load(runs['B2_checkpoint_path'])
    trace = str(tmp_path / 'trace')
    monkeypatch.setenv('BLIP_STEP_TRACE', trace)
    args = base_args() + ['--output_dir', str(tmp_path / 'out'), '--resume', str(runs['B2_checkpoint_path'])]
    options = run_options(runs['data'], 0)
    options[options.index('batch_size_train=8')] = 'batch_size_train=16'
    assert train_retrieval.main(args + options) == 0
    resumed = read_trace(trace, 0)
    assert [(r['epoch'], r['step']) for r in resumed] == [(1, s) for s in range(checkpoint['step'], STEPS_PER_EPOCH)]
    straight: dict[tuple[int, int], list[dict]] = {}
    for rank in (0, 1):
        for record in read_trace(runs['A_trace'], rank):
            straight.setdefault((record['epoch'], record['step']), []).append(record)
    for record in resumed:
        both_ranks = straight[(record['epoch'], record['step'])]
        assert sorted(zip(record['idx'], record['caption'])) == \
            sorted(pair for r in both_ranks for pair in zip(r['idx'], r['caption']))
        assert (record['lr'], record['alpha']) == (both_ranks[0]['lr'], both_ranks[0]['alpha'])
    final = load(tmp_path / 'out' / 'checkpoint_last.pth')
    assert (final['epoch'], final['step'], final['world_size']) == (2, 0, 1)


def test_signal_during_evaluation_stops_at_the_epoch_boundary_and_resumes_exactly(tmp_path, monkeypatch):
    """One process, in-process: SIGUSR1 while epoch 0 is evaluated; the run saves (epoch 1, step 0) and stops."""
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=8, n_val=3, n_test=3)
    options = tiny_options(data, init_lr=3e-3, momentum=0.9, max_epoch=2)
    handler_before = signal.getsignal(signal.SIGUSR1)
    assert train_retrieval.main(base_args() + ['--output_dir', str(tmp_path / 'A')] + options) == 0

    real_evaluate = train_retrieval.evaluate_split
    signalled = []

    def evaluate_and_get_preempted(*args, **kwargs):
        if not signalled:
            signalled.append(True)
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_retrieval, 'evaluate_split', evaluate_and_get_preempted)
    assert train_retrieval.main(base_args() + ['--output_dir', str(tmp_path / 'B')] + options) == 0
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGUSR1) is handler_before
    stopped = load(tmp_path / 'B' / 'checkpoint_last.pth')
    assert (stopped['epoch'], stopped['step']) == (1, 0)
    assert len((tmp_path / 'B' / 'log.txt').read_text().splitlines()) == 1

    assert train_retrieval.main(base_args() + ['--output_dir', str(tmp_path / 'B'), '--resume', 'auto'] + options) == 0
    a, b = load(tmp_path / 'A' / 'checkpoint_last.pth'), load(tmp_path / 'B' / 'checkpoint_last.pth')
    assert (b['epoch'], b['step']) == (2, 0)
    assert_same(a['model'], b['model'], 'model')
    assert_same(a['optimizer'], b['optimizer'], 'optimizer')
    assert without_times(tmp_path / 'A' / 'log.txt') == without_times(tmp_path / 'B' / 'log.txt')


def test_resume_drops_log_records_of_epochs_it_redoes(tmp_path):
    log = tmp_path / 'log.txt'
    log.write_text('{"epoch": 0, "val_r_mean": 50.0}\n{"epoch": 1, "val_r_mean": 60.0}\n{"epoch": 2, "val_')
    output.trim_log(str(log), 1)  # killed after epoch 1 was logged but before it was saved
    assert log.read_text() == '{"epoch": 0, "val_r_mean": 50.0}\n'
    output.trim_log(str(log), 1)
    assert log.read_text() == '{"epoch": 0, "val_r_mean": 50.0}\n'
    assert os.listdir(tmp_path) == ['log.txt']


def test_overwrite_replaces_the_old_run(tmp_path, caplog):
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=4, n_val=2, n_test=2)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'checkpoint_last.pth').write_bytes(b'old run')
    (out / 'checkpoint_best.pth').write_bytes(b'old run')
    (out / 'log.txt').write_text('{"epoch": 0, "val_r_mean": 99.0}\n{"epoch": 1, "val_r_mean": 99.0}\n')
    message = run_main_error(base_args() + ['--output_dir', str(out), '--resume', 'auto', '--overwrite']
                             + tiny_options(data), caplog)
    assert '--resume' in message and '--overwrite' in message and 'only one' in message
    assert train_retrieval.main(base_args() + ['--output_dir', str(out), '--overwrite']
                                + tiny_options(data, batch_size_train=4, max_epoch=1)) == 0
    assert load(out / 'checkpoint_last.pth')['epoch'] == 1
    assert load(out / 'checkpoint_best.pth')['epoch'] == 0
    assert [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()] == [0]


# ---------------------------------------------------------------------------------------------- crash-safe files
def test_crash_inside_a_checkpoint_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model, path = torch.nn.Linear(4, 3), tmp_path / 'checkpoint_last.pth'
    optimizer = torch.optim.AdamW(model.parameters())
    config = {'seed': 3, 'batch_size_train': 2}
    checkpoints.save_last(str(path), model, optimizer, config, checkpoints.RunState(epoch=1, step=2))
    good_bytes, good_weight = path.read_bytes(), model.weight.detach().clone()

    real_save = torch.save

    def write_half_then_fail(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        f.flush()
        raise OSError(28, 'No space left on device')

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(torch, 'save', write_half_then_fail)
    with pytest.raises(atomic.DiskWriteError, match='No space left') as error:
        checkpoints.save_last(str(path), model, optimizer, config, checkpoints.RunState(epoch=1, step=3))
    assert 'the previous file is unchanged' in str(error.value)
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ['checkpoint_last.pth']  # no temp file left
    assert path.read_bytes() == good_bytes
    checkpoint = checkpoints.read_resume_checkpoint(str(path), allow_unsafe=False)  # weights_only load
    assert (checkpoint['epoch'], checkpoint['step']) == (1, 2)
    assert torch.equal(checkpoint['model']['weight'], good_weight)


class _MkdirOnLoad:
    """A pickle payload: unpickling it calls os.mkdir(path) (a stand-in for arbitrary code)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_tampered_checkpoint_is_refused_by_resume_and_by_pretrained(tmp_path, caplog):
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=4, n_val=2, n_test=2)
    marker = tmp_path / 'payload_ran'
    evil = tmp_path / 'checkpoint_last.pth'
    looks_valid = {key: 0 for key in checkpoints.RESUME_KEYS}
    looks_valid.update(model={'temp': torch.ones(1)}, config={}, best_test={}, train_meters={})
    torch.save({**looks_valid, 'payload': _MkdirOnLoad(str(marker))}, evil)
    out = tmp_path / 'out'
    for args in (['--resume', str(evil)] + tiny_options(data), tiny_options(data, str(evil))):
        message = run_main_error(base_args() + ['--output_dir', str(out)] + args, caplog)
        assert str(evil) in message and 'refused' in message and 'allow_unsafe_checkpoint: True' in message
        assert not marker.exists() and not out.exists()
    # The refusal is what kept the payload from running.
    run_main_error(base_args() + ['--output_dir', str(out), '--resume', str(evil)]
                   + tiny_options(data, allow_unsafe_checkpoint=True), caplog)
    assert marker.exists() and not out.exists()


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, caplog, monkeypatch):
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=8, n_val=2, n_test=2)
    calls = []
    real_forward = BLIP_Retrieval.forward

    def nan_on_third_step(self, *args, **kwargs):
        loss_ita, loss_itm = real_forward(self, *args, **kwargs)
        calls.append(1)
        return (loss_ita * float('nan') if len(calls) == 3 else loss_ita), loss_itm

    monkeypatch.setattr(BLIP_Retrieval, 'forward', nan_on_third_step)
    out = tmp_path / 'out'
    caplog.clear()
    code = train_retrieval.main(base_args() + ['--output_dir', str(out)]
                                + tiny_options(data, batch_size_train=4, save_every_steps=2, max_epoch=1))
    assert code == utils.EXIT_FAILED
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    assert 'non-finite loss at epoch 0 step 2' in message and 'loss_ita nan' in message
    assert 'checkpoint_last.pth is left as it was' in message and 'lower init_lr' in message
    checkpoint = load(out / 'checkpoint_last.pth')
    assert (checkpoint['epoch'], checkpoint['step']) == (0, 2)
    assert all(torch.isfinite(v).all() for v in checkpoint['model'].values() if v.is_floating_point())
    assert not (out / 'log.txt').exists()


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def data(tmp_path) -> dict:
    return write_colour_dataset(str(tmp_path / 'data'), n_train=4, n_val=3, n_test=3)


def train_args(tmp_path, *extra: str) -> list[str]:
    return base_args() + ['--output_dir', str(tmp_path / 'out'), *extra]


def test_mistyped_config_key(tmp_path, caplog, data):
    message = run_main_error(train_args(tmp_path) + tiny_options(data, init_lrr=1e-4), caplog)
    assert "'init_lrr'" in message and "did you mean 'init_lr'" in message
    assert not (tmp_path / 'out').exists()


def test_queue_size_not_divisible_by_the_batch(tmp_path, caplog, data):
    message = run_main_error(train_args(tmp_path) + tiny_options(data, queue_size=20), caplog)
    assert 'queue_size 20 is not divisible by the global batch size 8' in message and 'use queue_size=16 or 24' in message
    assert not (tmp_path / 'out').exists()


def test_queue_size_not_divisible_by_the_global_batch_of_two_processes(tmp_path, data):
    result = run_torchrun([SCRIPT] + train_args(tmp_path) + tiny_options(data, queue_size=40), nproc=2)
    assert result.returncode != 0
    assert ('queue_size 40 is not divisible by the global batch size 16 (batch_size_train 8 x 2 processes); '
            'use queue_size=32 or 48') in result.stdout + result.stderr
    assert 'Traceback' not in result.stdout
    assert not (tmp_path / 'out').exists()


def test_batch_larger_than_the_dataset(tmp_path, caplog, data):
    message = run_main_error(train_args(tmp_path) + tiny_options(data, batch_size_train=32, queue_size=32), caplog)
    assert 'global batch size 32' in message and 'larger than the 20 training samples' in message
    assert 'lower batch_size_train to at most 20' in message
    assert not (tmp_path / 'out').exists()


def test_missing_and_unreadable_images_are_all_listed(tmp_path, caplog, data):
    images = os.path.join(data['image_root'], 'flickr30k-images')
    os.remove(os.path.join(images, 'train0001.jpg'))
    open(os.path.join(images, 'val0002.jpg'), 'wb').close()
    with open(os.path.join(images, 'test0001.jpg'), 'w') as f:
        f.write('<html>Not Found</html>')
    message = run_main_error(train_args(tmp_path) + tiny_options(data), caplog)
    assert '  train: 1 of 4 images\n    flickr30k-images/train0001.jpg: missing\n' in message
    assert '  val: 1 of 3 images\n    flickr30k-images/val0002.jpg: empty file (0 bytes)\n' in message
    assert "flickr30k-images/test0001.jpg: not an image file (starts with b'<html>No')" in message
    assert 'image_root' in message and 'data.prepare_flickr30k' in message
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('content, problem, fix', [
    ('', 'flickr30k_train.json is not valid JSON (line 1, column 1', 'delete it and download it again'),
    ('[]', 'flickr30k_train.json is an empty list', 'expected a JSON list of {"image"'),
    ('[{"image": "flickr30k-images/train0000.jpg", "image_id": "x"}]',
     "flickr30k_train.json, record 0: field 'caption' is missing", 'train files must be a JSON list of'),
])
def test_empty_or_malformed_annotation(tmp_path, caplog, data, content, problem, fix):
    with open(os.path.join(data['ann_root'], 'flickr30k_train.json'), 'w') as f:
        f.write(content)
    message = run_main_error(train_args(tmp_path) + tiny_options(data), caplog)
    assert problem in message and fix in message
    assert not (tmp_path / 'out').exists()


def test_checkpoint_of_another_architecture_as_pretrained(tmp_path, caplog, data, golden_checkpoint):
    message = run_main_error(train_args(tmp_path) + tiny_options(data, golden_checkpoint, embed_dim=32), caplog)
    assert 'does not fit this model' in message
    assert 'vision_proj.weight: (16, 64) -> (32, 64)' in message and 'embed_dim' in message
    assert not (tmp_path / 'out').exists()


def test_checkpoint_of_another_architecture_with_resume(tmp_path, caplog, data):
    model = BLIP_Retrieval(**TINY_KWARGS)
    config = {**TINY_KWARGS, 'seed': 42, 'batch_size_train': 8}
    path = tmp_path / 'other' / 'checkpoint_last.pth'
    checkpoints.save_last(str(path), model, torch.optim.AdamW(model.parameters()), config,
                              checkpoints.RunState(epoch=1))
    message = run_main_error(train_args(tmp_path, '--resume', str(path)) + tiny_options(data, embed_dim=32), caplog)
    assert f'{path} is of another architecture' in message
    assert 'shape: vision_proj.weight: (16, 64) in the checkpoint, (32, 64) in the model' in message
    assert 'embed_dim=16' in message
    assert not (tmp_path / 'out').exists()


def test_output_dir_of_another_run_is_refused(tmp_path, caplog, data):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'checkpoint_last.pth').write_bytes(b'another run')
    (out / 'log.txt').write_text('{"epoch": 0}\n')
    message = run_main_error(train_args(tmp_path) + tiny_options(data), caplog)
    assert 'checkpoint_last.pth, log.txt' in message and '--resume auto' in message and '--overwrite' in message
    assert sorted(os.listdir(out)) == ['checkpoint_last.pth', 'log.txt']
    assert (out / 'checkpoint_last.pth').read_bytes() == b'another run'


def test_resume_of_a_missing_file(tmp_path, caplog, data):
    message = run_main_error(train_args(tmp_path, '--resume', str(tmp_path / 'nope.pth')) + tiny_options(data),
                             caplog)
    assert 'nope.pth: file not found' in message and '--resume auto' in message
    assert not (tmp_path / 'out').exists()


def test_queue_suggestions_are_valid_sizes():
    # 16 per GPU on 7 GPUs: 57600 is not a multiple of 112; the nearest multiples are offered.
    with pytest.raises(SetupError, match=r'use queue_size=57568 or 57680 \(any multiple of 112\)'):
        train_retrieval.check_batch_sizes({'batch_size_train': 16, 'queue_size': 57600}, 145000, 7)
    for queue_size in (57568, 57680):
        train_retrieval.check_batch_sizes({'batch_size_train': 16, 'queue_size': queue_size}, 145000, 7)

