"""What a new user meets in the first hour: an offline machine, Ctrl-C, evaluating random weights by mistake, bad
files as `pretrained`, the usual config names of other code bases, and TensorBoard after a resume."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, free_port, run_torchrun
from synthetic import write_colour_dataset
from test_train_retrieval import base_args, read_jsonl, run_main_error, tiny_options

import train_retrieval
import utils
from models.tokenizer import BUNDLED_VOCAB

SCRIPT = os.path.join(REPO, 'train_retrieval.py')


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> dict:
    return write_colour_dataset(str(tmp_path_factory.mktemp('colours')), n_train=24, n_val=4, n_test=4)


def without(options: list[str], key: str) -> list[str]:
    return [o for o in options if not o.startswith(f'{key}=')]


# ---------------------------------------------------------------------------------------------- offline tokenizer
NO_NETWORK = '''
import socket, sys
attempts = []
def refuse(self, address, *args, **kwargs):
    attempts.append(address)
    raise OSError(101, 'Network is unreachable (blocked by the test)')
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
sys.path.insert(0, {repo!r})
import train_retrieval
code = train_retrieval.main({argv!r})
print('NETWORK ATTEMPTS', len(attempts), attempts[:3])
sys.exit(code)
'''


def run_offline(argv: list[str], tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    """train_retrieval.main(argv) in a fresh interpreter whose every socket connection fails at once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    env.update(HF_HOME=str(tmp_path / 'empty_hf_home'), PYTHONUNBUFFERED='1')  # nothing cached
    script = NO_NETWORK.format(repo=REPO, argv=argv)
    return subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_bundled_vocabulary_is_bert_base_uncased():
    with open(BUNDLED_VOCAB, 'rb') as f:
        assert hashlib.sha256(f.read()).hexdigest() == \
            '07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3'


def test_default_tokenizer_needs_no_network(tmp_path, data, golden_checkpoint):
    """The default `tokenizer: bert-base-uncased` is the bundled vocab.txt: no Hub call, no retries."""
    options = without(tiny_options(data, golden_checkpoint), 'tokenizer')
    began = time.time()
    result = run_offline(base_args() + ['--evaluate', '--output_dir', str(tmp_path / 'out')] + options, tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert 'NETWORK ATTEMPTS 0 []' in result.stdout
    assert time.time() - began < 120  # seconds (most of it importing torch), not minutes of Hub retries
    assert (tmp_path / 'out' / 'evaluate.txt').exists()


def test_a_tokenizer_that_cannot_be_loaded_is_one_line_naming_the_key(tmp_path, data, golden_checkpoint):
    options = tiny_options(data, golden_checkpoint, tokenizer='no-such-org/no-such-tokenizer')
    result = run_offline(base_args() + ['--evaluate', '--output_dir', str(tmp_path / 'out')] + options, tmp_path)
    assert result.returncode == utils.EXIT_USER_ERROR, (result.stdout + result.stderr)[-3000:]
    errors = [line for line in result.stdout.splitlines() if ' ERROR ' in line]
    assert len(errors) == 1 and 'Traceback' not in result.stdout + result.stderr, result.stdout[-3000:]
    assert "config key `tokenizer`: cannot load 'no-such-org/no-such-tokenizer'" in errors[0]
    assert "'bert-base-uncased' (bundled, no download)" in errors[0]
    assert not (tmp_path / 'out').exists()


def test_a_tokenizer_of_the_wrong_size_names_the_key(tmp_path, caplog, data, golden_checkpoint):
    vocab = tmp_path / 'vocab.txt'
    vocab.write_text('[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n')  # e.g. the demo's vocabulary with BLIP's med_config
    message = run_main_error(base_args() + ['--evaluate', '--output_dir', str(tmp_path / 'out')]
                             + tiny_options(data, golden_checkpoint, tokenizer=str(vocab)), caplog)
    assert message.startswith(f"config key `tokenizer` ('{vocab}') gives 7 tokens")
    assert 'vocab_size 30524' in message and "'bert-base-uncased'" in message


# ---------------------------------------------------------------------------------------------- random weights
def test_evaluate_without_pretrained_refuses_and_says_how_to_evaluate_a_run(tmp_path, caplog, data):
    out = tmp_path / 'finished_run'
    message = run_main_error(base_args() + ['--evaluate', '--output_dir', str(out)] + tiny_options(data), caplog)
    assert f'--options pretrained={out}/checkpoint_best.pth' in message and '--allow_random_weights' in message
    assert not out.exists()
    # Said on purpose, it runs.
    assert train_retrieval.main(base_args() + ['--evaluate', '--allow_random_weights', '--output_dir', str(out)]
                                + tiny_options(data)) == 0
    assert len(read_jsonl(out / 'evaluate.txt')) == 1


def test_evaluate_into_a_folder_of_its_own_points_at_the_default_folders_checkpoint(tmp_path, caplog, data,
                                                                                    monkeypatch):
    """The README's way: the fine-tune in output/<config name>, its evaluation in another folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'output' / 'retrieval_flickr').mkdir(parents=True)
    (tmp_path / 'output' / 'retrieval_flickr' / 'checkpoint_best.pth').write_bytes(b'')
    message = run_main_error(base_args() + ['--evaluate', '--output_dir', 'output/eval'] + tiny_options(data),
                             caplog)
    assert '--options pretrained=output/retrieval_flickr/checkpoint_best.pth' in message


# ---------------------------------------------------------------------------------------------- Ctrl-C
def interrupt_options(data: dict) -> list[str]:
    return tiny_options(data, '', init_lr=3e-3, momentum=0.9, batch_size_train=4, queue_size=16, max_epoch=1)


def wait_for_steps(trace: str, steps: int, process, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while True:
        if os.path.exists(trace):
            with open(trace) as f:
                if sum(line.endswith('\n') for line in f) >= steps:
                    return
        assert process.poll() is None and time.time() < deadline, 'the run ended before it could be interrupted'
        time.sleep(0.01)


def start(cmd: list[str], trace: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', BLIP_STEP_TRACE=trace)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_ctrl_c_saves_and_prints_the_resume_command_then_the_resume_finishes(tmp_path, data):
    out, trace = tmp_path / 'out', str(tmp_path / 'trace')
    args = base_args() + ['--output_dir', str(out)] + interrupt_options(data)
    process = start([sys.executable, SCRIPT] + args, trace)
    wait_for_steps(f'{trace}.rank0.jsonl', 2, process)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 130, output[-3000:]
    assert 'Traceback' not in output and 'KeyboardInterrupt' not in output, output[-3000:]
    checkpoint = torch.load(out / 'checkpoint_last.pth', map_location='cpu', weights_only=True)
    assert checkpoint['epoch'] == 0 and checkpoint['step'] >= 2
    assert f"Stopped by SIGINT at epoch 0 step {checkpoint['step']} of 30" in output
    assert 'SIGINT, stopping after this step (Ctrl-C again to abort without saving)' in output
    command = output.split('Continue with:\n')[1].splitlines()[0].strip()
    assert command.startswith('python ') and command.endswith(' --resume auto')
    resumed = shlex.split(command)[2:]  # drop 'python train_retrieval.py'
    assert train_retrieval.main(resumed) == 0
    assert torch.load(out / 'checkpoint_last.pth', weights_only=True)['epoch'] == 1


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path, data):
    out, trace = tmp_path / 'out', str(tmp_path / 'trace')
    process = start([sys.executable, SCRIPT] + base_args() + ['--output_dir', str(out)] + interrupt_options(data),
                    trace)
    wait_for_steps(f'{trace}.rank0.jsonl', 2, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 130, output[-3000:]
    assert 'Traceback' not in output, output[-3000:]
    assert 'Interrupted: stopped at once' in output, output[-3000:]
    assert not [name for name in os.listdir(out) if name.endswith('.tmp')]


def test_ctrl_c_under_torchrun_saves_one_checkpoint_for_both_ranks(tmp_path, data):
    out, trace = tmp_path / 'out', str(tmp_path / 'trace')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_addr=127.0.0.1',
           f'--master_port={free_port()}', SCRIPT] + base_args() + ['--output_dir', str(out)] \
        + interrupt_options(data)
    process = start(cmd, trace)
    wait_for_steps(f'{trace}.rank0.jsonl', 2, process)
    process.send_signal(signal.SIGINT)  # a terminal's Ctrl-C reaches torchrun, which forwards it to the workers
    output = process.communicate(timeout=300)[0]
    checkpoint = torch.load(out / 'checkpoint_last.pth', map_location='cpu', weights_only=True)
    assert checkpoint['world_size'] == 2 and checkpoint['epoch'] == 0 and checkpoint['step'] >= 2
    assert f"Stopped by SIGINT at epoch 0 step {checkpoint['step']} of 15" in output, output[-3000:]
    assert output.count('Continue with:') == 1
    assert 'torchrun <the same options>' in output.split('Continue with:\n')[1].splitlines()[0]


# ---------------------------------------------------------------------------------------------- errors, not tracebacks
def test_cuda_on_a_machine_without_it_is_one_line(tmp_path, caplog, data, golden_checkpoint):
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    args = [a for a in base_args() if a not in ('--device', 'cpu')]
    message = run_main_error(args + ['--evaluate', '--output_dir', str(tmp_path / 'o')]
                             + tiny_options(data, golden_checkpoint), caplog)
    assert message.startswith('--device cuda (the default) but CUDA is not available') and 'run with --device cpu' \
        in message


@pytest.mark.parametrize('content, what', [
    (os.urandom(4096), "it starts with the bytes"),
    (b'model weights are in the other folder\n', "it is a text file starting with 'model weights ar'"),
    (b'<!DOCTYPE html><html>403 Forbidden</html>', 'it is an HTML or XML page'),
])
@pytest.mark.parametrize('allow_unsafe', [False, True])
def test_a_file_that_is_no_checkpoint_says_so(tmp_path, caplog, data, content, what, allow_unsafe):
    path = tmp_path / 'model.pth'
    path.write_bytes(content)
    message = run_main_error(base_args() + ['--evaluate', '--output_dir', str(tmp_path / 'o')]
                             + tiny_options(data, str(path), allow_unsafe_checkpoint=allow_unsafe), caplog)
    assert message.startswith(f'{path} is not a PyTorch checkpoint at all ({what}')
    assert 'allow_unsafe_checkpoint' not in message


def test_a_user_error_under_torchrun_is_printed_once_and_named_as_the_root_cause(tmp_path, data):
    result = run_torchrun([SCRIPT] + base_args() + ['--output_dir', str(tmp_path / 'o')]
                          + tiny_options(data, batch_size_train=8, queue_size=40), nproc=2)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    message = ('queue_size 40 is not divisible by the global batch size 16 (batch_size_train 8 x 2 processes); '
               'use queue_size=32 or 48 (any multiple of 16), or batch_size_train=5 or 10')
    assert sum(' ERROR ' in line for line in result.stdout.splitlines()) == 1, result.stdout
    assert message in result.stdout
    root_cause = result.stderr.split('Root Cause (first observed failure):')[1]
    assert message in root_cause and 'rank      : 0' in root_cause, output[-3000:]
    assert 'Traceback' not in result.stdout


# ---------------------------------------------------------------------------------------------- config names
@pytest.mark.parametrize('key, meant', [('lr', 'init_lr'), ('epochs', 'max_epoch'), ('batch_size', 'batch_size_train'),
                                        ('learning_rate', 'init_lr')])
def test_names_from_other_code_bases_suggest_blips(tmp_path, caplog, data, key, meant):
    message = run_main_error(base_args() + ['--output_dir', str(tmp_path / 'o')] + tiny_options(data, **{key: 1}),
                             caplog)
    assert f"unknown config key '{key}'" in message and f"did you mean '{meant}'" in message
    assert 'init_lr (not lr), max_epoch (not epochs), batch_size_train / batch_size_test (not batch_size)' in message


def test_vit_of_an_unknown_size_shows_the_mapping_form(tmp_path, caplog, data):
    message = run_main_error(base_args() + ['--output_dir', str(tmp_path / 'o')] + tiny_options(data, vit='huge'),
                             caplog)
    assert "'base' (ViT-B/16), 'large' (ViT-L/16), or a mapping" in message and 'num_heads' in message


def test_resume_warns_only_about_keys_that_change_results(tmp_path, caplog, data, monkeypatch):
    out = tmp_path / 'out'
    monkeypatch.setenv('BLIP_STOP_AFTER_STEPS', '2')
    assert train_retrieval.main(base_args() + ['--output_dir', str(out)] + interrupt_options(data)) == 0
    monkeypatch.delenv('BLIP_STOP_AFTER_STEPS')
    caplog.clear()
    options = interrupt_options(data)
    options[options.index('log_every=5')] = 'log_every=50'
    assert train_retrieval.main(base_args() + ['--output_dir', str(out), '--resume', 'auto'] + options
                                + ['max_epoch=2']) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING' and 'Resuming' in r.getMessage()]
    assert len(warnings) == 1 and 'max_epoch: 1 -> 2' in warnings[0] and 'log_every' not in warnings[0], warnings
    infos = [r.getMessage() for r in caplog.records if 'change no result' in r.getMessage()]
    assert infos == ['Resuming with other settings that change no result: log_every: 5 -> 50']


# ---------------------------------------------------------------------------------------------- TensorBoard
def scalar_steps(log_dir) -> dict[str, list[int]]:
    """What TensorBoard shows: its own loader (which honours purge_step), every scalar tag's steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(log_dir), size_guidance={'scalars': 0})
    accumulator.Reload()
    return {tag: [event.step for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()['scalars']}


def test_tensorboard_after_a_crash_and_resume_has_each_step_once(tmp_path, data, monkeypatch):
    """Killed at step 13 with the last checkpoint at step 10: the resumed run replays 10-12 and the curves show
    them once. val/ and test/ share the train curves' x axis (global steps); test/ is the epoch's own (evaluated
    every epoch with eval_test_every_epoch: true, else only when val improves)."""
    out = tmp_path / 'out'
    options = tiny_options(data, '', init_lr=3e-3, momentum=0.9, batch_size_train=8, queue_size=16, max_epoch=2,
                           save_every_steps=5, log_every=1, tensorboard=True, eval_test_every_epoch=True)
    monkeypatch.setenv('BLIP_FAIL_AT', '0:14')  # a crash during global step 14 (0-based 13)
    assert train_retrieval.main(base_args() + ['--output_dir', str(out)] + options) == utils.EXIT_FAILED
    monkeypatch.delenv('BLIP_FAIL_AT')
    last = torch.load(out / 'checkpoint_last.pth', weights_only=True)
    assert (last['epoch'], last['step']) == (0, 10)
    assert train_retrieval.main(base_args() + ['--output_dir', str(out), '--resume', 'auto'] + options) == 0
    steps = scalar_steps(out / 'tensorboard')
    assert steps['train/loss_ita'] == list(range(30)), steps['train/loss_ita']
    assert steps['val/r_mean'] == steps['test/r_mean'] == [15, 30]
    log = read_jsonl(out / 'log.txt')
    assert [r['epoch'] for r in log] == [0, 1]


# ---------------------------------------------------------------------------------------------- what the demo says
def test_train_log_holds_the_first_console_line_and_the_closing_summary(demo_run):
    """The README says the log's first line names the output folder: train.log starts as the console does (the
    lines before the folder could be written are kept for it) and ends with the summary the console ends with."""
    console = demo_run['stdout'].splitlines()
    log = (demo_run['out'] / 'train.log').read_text().splitlines()
    assert console[0].endswith(f" INFO train_retrieval: Output folder: {demo_run['out']}"), console[:3]
    assert log[0] == console[0]
    first_logged = console.index(next(line for line in console if 'Building the model' in line))
    assert log[:first_logged + 1] == console[:first_logged + 1]  # every line before the folder existed, in order
    summary = console[console.index(next(line for line in console if line.startswith('Training done: '))):]
    assert summary[-1].startswith('  report of the best epoch') and len(summary) >= 5
    assert log[-len(summary):] == [log[-len(summary)]] + summary[1:]
    assert log[-len(summary)].endswith(f' INFO train_retrieval: {summary[0]}')


def test_the_captions_an_epoch_leaves_out_are_counted_at_start(demo_run):
    """The demo's 3,000 training captions in batches of 32: the step trace shows what an epoch used."""
    with open(demo_run['data'] / 'annotation' / 'demo_train.json') as f:
        captions = len(json.load(f))
    with open(demo_run['trace']) as f:
        used = sum(len(step['caption']) for step in map(json.loads, f) if step['epoch'] == 0)
    assert 0 < used < captions
    lines = [line for line in demo_run['stdout'].splitlines() if 'leaves out' in line]
    assert len(lines) == 1 and lines[0].endswith(
        f'INFO train_retrieval: Each epoch leaves out {captions - used} of the {captions} training captions (other '
        f'ones each epoch): the shuffled captions fill {used // 32} full batches of 32 and the last, partial batch is '
        'dropped (drop_last, as in the original)'), lines


def test_the_last_checkpoint_says_after_which_epoch_it_was_saved(demo_run):
    saved = [line.split(' INFO train_retrieval: ')[1] for line in demo_run['stdout'].splitlines()
             if 'checkpoint_last.pth' in line and 'Saved' in line]
    last = os.path.join(demo_run['out'], 'checkpoint_last.pth')
    assert saved[-1] == f'Saved {last} after epoch 4 (the last)'  # DEMO_EPOCHS = 5: epochs 0 to 4
    assert saved[0] == f"Saved {last} after epoch 0's training, before its evaluation" and \
        saved[1] == f'Saved {last} after epoch 0'
