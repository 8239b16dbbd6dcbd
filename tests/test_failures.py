"""A fresh machine and a failing worker: every requirement imports from a clean install, a rank that fails alone
stops the whole job within seconds (under torchrun and under a plain env:// launch), an image that disappears
during training is named with its step, and a full or read-only disk never costs the last checkpoint."""
from __future__ import annotations

import ast
import errno
import importlib.metadata
import multiprocessing
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from conftest import REPO, free_port, run_torchrun
from synthetic import write_colour_dataset
from test_train_retrieval import base_args, tiny_options

import atomic
import train_retrieval
import utils
from data.loaders import ResumableDistributedSampler
from run.failures import write_torchrun_error_file

SCRIPT = os.path.join(REPO, 'train_retrieval.py')

def local_modules() -> set[str]:
    """The project's own modules: top-level files and packages, and the benchmarks' shared module."""
    names = {os.path.splitext(n)[0] for n in os.listdir(REPO) if n.endswith('.py') or
             os.path.isfile(os.path.join(REPO, n, '__init__.py'))}
    return names | {os.path.splitext(n)[0] for n in os.listdir(os.path.join(REPO, 'benchmarks'))} | {'benchmarks'}


# ---------------------------------------------------------------------------------------------- dependencies
def third_party_imports() -> set[str]:
    """Every module the project's own code (not its tests) imports from outside the standard library."""
    found = set()
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('tests', 'output', '__pycache__')]
        for name in files:
            if not name.endswith('.py'):
                continue
            with open(os.path.join(folder, name), encoding='utf-8') as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module)
    return {m for m in found if m.split('.')[0] not in sys.stdlib_module_names | local_modules()}


def declared_requirements() -> set[str]:
    names = set()
    with open(os.path.join(REPO, 'requirements.txt')) as f:
        for line in f:
            line = line.split('#')[0].strip()
            if line:
                names.add(re.split(r'[<>=!~\[; ]', line)[0].lower().replace('_', '-'))
    return names


def test_every_runtime_import_works_in_a_fresh_interpreter_and_is_declared():
    """Catches a package that is installed here by hand but missing from requirements.txt (kaggle needs six)."""
    modules = sorted(third_party_imports())
    assert {'torch', 'timm.layers', 'transformers', 'ruamel.yaml', 'kaggle.api.kaggle_api_extended'} <= set(modules), modules
    # torch.utils.tensorboard needs the tensorboard package, which no import names.
    code = 'import importlib\nfor m in %r + ["torch.utils.tensorboard"]: importlib.import_module(m)\n' % modules
    env = {k: v for k, v in os.environ.items() if not k.startswith('KAGGLE')}
    env.update(HOME=os.path.join(REPO, '.cache', 'no-home'), KAGGLE_CONFIG_DIR=os.path.join(REPO, '.cache', 'none'))
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    distributions = importlib.metadata.packages_distributions()
    declared = declared_requirements()
    for module in modules:
        owners = {d.lower().replace('_', '-') for d in distributions.get(module.split('.')[0], [])}
        assert owners & declared, f'{module} comes from {owners or "nowhere"}, not declared in requirements.txt'


def test_a_kaggle_dependency_that_fails_to_import_is_named(tmp_path):
    code = ("import sys; sys.modules['six'] = None\n"  # installed, but unimportable, as on a fresh virtualenv
            "from data.prepare_flickr30k import main; main(['--root', %r])" % str(tmp_path / 'data'))
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: the 'kaggle' package is installed but fails to import: importing 'six' failed")
    assert 'pip install six' in message and '--zip PATH' in message


# ---------------------------------------------------------------------------------------------- a rank that fails
def fail_options(data: dict) -> list[str]:
    return tiny_options(data, '', init_lr=3e-3, momentum=0.9, batch_size_train=4, queue_size=16, max_epoch=1,
                        save_every_steps=2)


def check_stopped_job(out, outputs: list[str], elapsed_after_failure: float) -> None:
    """Rank 1 failed in global step 5: both ranks are gone, its error is in train.log, the checkpoint of step 4
    (saved every 2 steps) is intact."""
    assert elapsed_after_failure < 60, elapsed_after_failure
    train_log = (out / 'train.log').read_text()
    assert 'Rank 0 stops because rank 1 failed: InjectedFailure: BLIP_FAIL_AT' in train_log, train_log[-2000:]
    assert 'BLIP_FAIL_AT: injected failure on rank 1 at epoch 0 step 4' in train_log, train_log[-2000:]
    assert any('BLIP_FAIL_AT: injected failure on rank 1' in output for output in outputs)
    checkpoint = torch.load(out / 'checkpoint_last.pth', map_location='cpu', weights_only=True)
    assert (checkpoint['epoch'], checkpoint['step']) == (0, 4)
    assert not [name for name in os.listdir(out) if name.endswith('.tmp')]


def test_a_rank_that_fails_alone_stops_the_job_under_torchrun(tmp_path):
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=24, n_val=2, n_test=2)
    out = tmp_path / 'out'
    trace = str(tmp_path / 'trace')
    result = run_torchrun([SCRIPT] + base_args() + ['--output_dir', str(out)] + fail_options(data),
                          env_extra={'BLIP_FAIL_AT': '1:5', 'BLIP_STEP_TRACE': trace}, timeout=240)
    ended = time.time()
    assert result.returncode != 0
    check_stopped_job(out, [result.stdout + result.stderr], ended - os.path.getmtime(f'{trace}.rank1.jsonl'))
    # torchrun's failure summary names our message as the root cause, not "To enable traceback see ...".
    assert 'Root Cause' in result.stderr and 'BLIP_FAIL_AT' in result.stderr.split('Root Cause')[1], result.stderr[-3000:]


def test_a_rank_that_fails_alone_stops_the_job_without_torchrun(tmp_path):
    """Two processes started by hand with env:// (as srun does): no agent to stop the survivor."""
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=24, n_val=2, n_test=2)
    out = tmp_path / 'out'
    trace = str(tmp_path / 'trace')
    port = free_port()
    processes = []
    for rank in (0, 1):
        env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port),
                   BLIP_FAIL_AT='1:5', BLIP_STEP_TRACE=trace)
        processes.append(subprocess.Popen([sys.executable, SCRIPT] + base_args() + ['--output_dir', str(out)]
                                          + fail_options(data), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    outputs, ended = [], []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=240)[0])
            ended.append(time.time())
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert [p.returncode for p in processes] == [1, 1], outputs
    assert 'Rank 0 stops because rank 1 failed: InjectedFailure: BLIP_FAIL_AT' in outputs[0], outputs[0][-3000:]
    assert 'Traceback' in outputs[1] and 'Rank 1 failed' in outputs[1]  # the bug's own rank shows where it was
    check_stopped_job(out, outputs, max(ended) - os.path.getmtime(f'{trace}.rank1.jsonl'))


def first_step_of_image(dataset, image: str, batch: int, seed: int) -> int:
    order = list(ResumableDistributedSampler(dataset, 1, 0, seed))
    return next(i for i, index in enumerate(order) if dataset.annotation[index]['image'] == image) // batch


@pytest.mark.parametrize('num_workers', [0, 2])
def test_an_image_deleted_during_training_is_named_with_its_step(tmp_path, monkeypatch, caplog, num_workers):
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=16, n_val=2, n_test=2)
    victim = 'flickr30k-images/train0007.jpg'
    real_check = train_retrieval.check_images
    seen = {}

    def check_then_delete(datasets, image_root):
        real_check(datasets, image_root)  # passes: the image is there
        seen['step'] = first_step_of_image(datasets['train'], victim, batch=4, seed=42)
        os.remove(os.path.join(image_root, victim))

    monkeypatch.setattr(train_retrieval, 'check_images', check_then_delete)
    monkeypatch.setattr('data.retrieval_dataset.RETRY_DELAY_S', 0.01)
    out = tmp_path / 'out'
    caplog.clear()
    code = train_retrieval.main(base_args() + ['--output_dir', str(out)]
                                + tiny_options(data, batch_size_train=4, queue_size=16, max_epoch=1,
                                               num_workers=num_workers))
    assert code == utils.EXIT_FAILED
    errors = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"epoch 0 step {seen['step']} (global step {seen['step']}): image '{victim}' not found")
    assert 'not replaced by another one' in errors[0] and '--resume auto' in errors[0]
    assert 'Traceback' not in errors[0] and 'DataLoader worker' not in errors[0]
    if num_workers == 0:  # the retry warning is logged by the process that loads (workers log elsewhere)
        assert any('trying again' in r.getMessage() for r in caplog.records)
    # The workers ignore SIGTERM: one left running would keep the interpreter from exiting (it joins every child).
    assert not multiprocessing.active_children()


# ---------------------------------------------------------------------------------------------- the disk
def test_a_full_disk_keeps_the_last_checkpoint_and_says_the_size_needed(tmp_path, monkeypatch, caplog):
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=16, n_val=2, n_test=2)
    out = tmp_path / 'out'
    real_save = torch.save
    saves = []

    def full_after_first_checkpoint(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and 'rng_states' in obj:  # a checkpoint_last.pth
            saves.append(obj['step'])
            if len(saves) == 2:
                f.write(b'partial')
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', full_after_first_checkpoint)
    caplog.clear()
    code = train_retrieval.main(base_args() + ['--output_dir', str(out)]
                                + tiny_options(data, batch_size_train=4, queue_size=16, max_epoch=1,
                                               save_every_steps=1))
    monkeypatch.undo()
    assert code == utils.EXIT_FAILED
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    checkpoint = torch.load(out / 'checkpoint_last.pth', map_location='cpu', weights_only=True)
    assert checkpoint['step'] == saves[0] == 1
    needed = atomic._tensor_bytes(checkpoint)  # the size of what was to be written, the same state a step later
    assert f'({needed:,} bytes)' in message and 'No space left on device' in message, message
    assert 'the previous file is unchanged' in message
    assert not [name for name in os.listdir(out) if name.endswith('.tmp')]


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only file system (a tmpfs mounted ro); skipped where mounting is not allowed."""
    mount_point = tmp_path / 'ro'
    mount_point.mkdir()
    result = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=64k', 'tmpfs', str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f'cannot mount a read-only tmpfs here: {result.stderr.strip()}')
    yield mount_point
    subprocess.run(['umount', str(mount_point)], check=True)


def test_an_output_dir_on_a_read_only_disk_fails_before_any_compute(tmp_path, read_only_dir, caplog,
                                                                     golden_checkpoint):
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=8, n_val=2, n_test=2)
    caplog.clear()
    code = train_retrieval.main(base_args() + ['--output_dir', str(read_only_dir / 'run')]
                                + tiny_options(data, golden_checkpoint))
    assert code == utils.EXIT_USER_ERROR
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    assert f'--output_dir {read_only_dir / "run"} cannot be written (Read-only file system' in message
    assert not any('Building the model' in r.getMessage() for r in caplog.records)


def test_a_repeated_error_is_dated_after_the_first_even_when_written_first(tmp_path, monkeypatch):
    """torchrun names the failure with the smallest error-file timestamp (whole seconds) as the root cause. The rank
    that repeats rank 0's error writes first here (at 100.9 s) and rank 0 in the next second (101.8 s): one second
    of margin tied them (both 101) and torchrun named rank 1."""
    failures = []
    for rank, now, later in ((1, 100.9, True), (0, 101.8, False)):
        path = tmp_path / f'{rank}.json'
        monkeypatch.setenv('TORCHELASTIC_ERROR_FILE', str(path))
        monkeypatch.setattr(time, 'time', lambda now=now: now)
        write_torchrun_error_file('the same error as rank 0' if later else 'queue_size 40 is not divisible',
                                  later=later)
        failures.append(ProcessFailure(local_rank=rank, pid=rank, exitcode=2, error_file=str(path)))
    monkeypatch.undo()
    first = min(failures, key=lambda failure: failure.timestamp)  # as torchrun's get_first_failure picks
    assert first.local_rank == 0 and first.message == 'queue_size 40 is not divisible'
    assert [f.timestamp for f in failures] == [105, 101]
