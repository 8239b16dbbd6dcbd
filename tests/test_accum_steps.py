"""accum_steps: P processes x accum_steps N train exactly as P x N processes do (models/virtual_ranks.py).

Tiny model with dropout on, 2 epochs, compared step by step (BLIP_STEP_TRACE: every rank's samples and losses) and at
the end (every weight and buffer of checkpoint_last.pth, the optimizer, log.txt). Every process runs one thread, and
so do the runs in this process: the same kernels in the same order, so that where the float sums are the same the
results are the same bit for bit. They are for 2 processes against 1 x accum_steps 2: each gradient, loss and
negative's gradient sums two terms, and a sum of two is the same in either order. 2 x 2 against 1 x 4 sums four
terms in another order ((a + b) + (c + d) against ((a + b) + c) + d): equal to rounding.
"""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from conftest import REPO, TINY_KWARGS, assert_close, recall_fields, run_torchrun
from synthetic import write_colour_dataset
from test_train_retrieval import base_args, run_main_error, tiny_options

import train_retrieval
import utils
from models.virtual_ranks import VirtualStep
from run import hooks
from run.checkpoints import RankStreams
from run.training import accumulated_step

SCRIPT = os.path.join(REPO, 'train_retrieval.py')


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> dict:
    # 12 images x 5 captions: 7 steps per epoch for 2 ranks of 4, 3 for 4 ranks.
    return write_colour_dataset(str(tmp_path_factory.mktemp('accum') / 'data'), n_train=12, n_val=2, n_test=2)


def options(data: dict, **extra) -> list[str]:
    settings = dict(init_lr=3e-3, momentum=0.9, batch_size_train=4, queue_size=32, max_epoch=2, report=False)
    return tiny_options(data, '', **{**settings, **extra})


def torchrun(out, data: dict, nproc: int, *args: str, **extra) -> None:
    result = run_torchrun([SCRIPT] + base_args() + ['--output_dir', str(out), *args] + options(data, **extra),
                          nproc=nproc, env_extra={hooks.STEP_TRACE_ENV: f'{out}.trace'})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def here(out, data: dict, *args: str, **extra) -> int:
    """train_retrieval.main in this process, with one thread as each torchrun worker has."""
    threads, trace = torch.get_num_threads(), os.environ.get(hooks.STEP_TRACE_ENV)
    torch.set_num_threads(1)
    os.environ[hooks.STEP_TRACE_ENV] = f'{out}.trace'
    try:
        return train_retrieval.main(base_args() + ['--output_dir', str(out), *args] + options(data, **extra))
    finally:
        torch.set_num_threads(threads)
        if trace is None:
            os.environ.pop(hooks.STEP_TRACE_ENV)
        else:
            os.environ[hooks.STEP_TRACE_ENV] = trace


def load(out) -> dict:
    return torch.load(os.path.join(out, 'checkpoint_last.pth'), map_location='cpu', weights_only=True)


def trace(out, rank: int) -> list[dict]:
    with open(f'{out}.trace.rank{rank}.jsonl') as f:
        return [{k: v for k, v in json.loads(line).items() if k != 'pid'} for line in f]


def log(out) -> list[dict]:
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line) for line in f]


def assert_bit_identical(a, b, ranks: int) -> None:
    """Every rank's samples and losses at every step, every weight and buffer, the optimizer, the RNG streams of
    every rank, log.txt."""
    for rank in range(ranks):
        assert trace(a, rank) == trace(b, rank), rank
    first, second = load(a), load(b)
    assert (first['epoch'], first['step']) == (second['epoch'], second['step']) == (2, 0)
    assert first['model'].keys() == second['model'].keys()
    for key, value in first['model'].items():  # both queues, idx_queue and ptr_queue included
        assert torch.equal(value, second['model'][key]), key
    for key, value in first['optimizer']['state'].items():
        assert all(torch.equal(value[name], second['optimizer']['state'][key][name]) for name in value), key
    assert len(first['rng_states']) == len(second['rng_states']) == ranks
    for x, y in zip(first['rng_states'], second['rng_states']):
        assert torch.equal(x['torch'], y['torch']) and x['python'] == y['python']
    # log.txt, every value of it but the fields that describe the launch (processes, times, device: run.results)
    assert [json.dumps(recall_fields(r)) for r in log(a)] == [json.dumps(recall_fields(r)) for r in log(b)]


# ---------------------------------------------------------------------------------------------- P x N = 2
@pytest.fixture(scope='module')
def local_runs(data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp('local')
    torchrun(root / 'two', data, 2)
    assert here(root / 'one_x2', data, accum_steps=2) == 0
    return {'two': root / 'two', 'one_x2': root / 'one_x2'}


def test_local_negatives_two_processes_equal_one_process_with_accum_steps_2(local_runs):
    assert_bit_identical(local_runs['two'], local_runs['one_x2'], ranks=2)
    records = log(local_runs['one_x2'])
    assert [r['epoch'] for r in records] == [0, 1] and records[0]['train_itm_negatives_left_out'] == 0
    assert trace(local_runs['one_x2'], 0)[0]['idx'] != trace(local_runs['one_x2'], 1)[0]['idx']


@pytest.fixture(scope='module')
def all_rank_runs(data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp('all_rank')
    torchrun(root / 'two', data, 2, negative_all_rank=True)
    assert here(root / 'one_x2', data, accum_steps=2, negative_all_rank=True) == 0
    return {'root': root, 'two': root / 'two', 'one_x2': root / 'one_x2'}


def test_all_rank_negatives_two_processes_equal_one_process_with_accum_steps_2(all_rank_runs):
    """Negatives from the whole step's batch; a negative's gradient reaches the micro-batch of its image."""
    assert_bit_identical(all_rank_runs['two'], all_rank_runs['one_x2'], ranks=2)


# ---------------------------------------------------------------------------------------------- P x N = 4
def assert_weights_equal_to_rounding(first: dict, second: dict, lr_sum: float) -> None:
    """Every weight to 5 significant digits of its tensor's scale, but for two things AdamW does to rounding noise.

    A key bias gets no gradient (softmax ignores a shift shared by all keys): its steps are AdamW's normalized
    rounding noise of a zero, unrelated in two runs that round differently, and no output depends on it (the ViT's
    qkv bias holds it as its middle third). The same holds for the rare element whose gradient cancelled down to its
    rounding error at some step: AdamW divides the step by the gradient's own size, so each run moves it by an
    unrelated fraction of the learning rate. The arithmetic bounds those only by the sum of the steps' learning
    rates; they must be rare (here 2 of 4.5 million elements, 1 in 100,000 allowed per tensor).
    """
    assert first.keys() == second.keys()
    for key, a in first.items():
        if key.endswith('.key.bias') or not a.is_floating_point():
            continue
        a, b = a.double(), second[key].double()
        if key.endswith('.qkv.bias'):
            a, b = a.view(3, -1)[[0, 2]], b.view(3, -1)[[0, 2]]
        difference = (a - b).abs()
        beyond = difference > 1e-5 * (a.abs().max() + a.abs())
        assert int(beyond.sum()) <= a.numel() // 100_000, (key, int(beyond.sum()))
        assert float(difference.max()) <= lr_sum, key


def test_four_virtual_ranks_two_processes_x_2_equal_one_process_x_4(data, tmp_path):
    torchrun(tmp_path / 'two_x2', data, 2, accum_steps=2, negative_all_rank=True)
    assert here(tmp_path / 'one_x4', data, accum_steps=4, negative_all_rank=True) == 0
    for rank in range(4):
        a, b = trace(tmp_path / 'two_x2', rank), trace(tmp_path / 'one_x4', rank)
        assert [(r['epoch'], r['step'], r['idx'], r['caption']) for r in a] == \
            [(r['epoch'], r['step'], r['idx'], r['caption']) for r in b]
        for name in ('loss_ita', 'loss_itm'):
            assert_close([r[name] for r in b], [r[name] for r in a], 5, f'rank {rank} {name}')
    first, second = load(tmp_path / 'two_x2'), load(tmp_path / 'one_x4')
    assert len(first['rng_states']) == 4 and (first['world_size'], first['accum_steps']) == (2, 2)
    for key in ('idx_queue', 'ptr_queue'):
        assert torch.equal(first['model'][key], second['model'][key])
    for key in ('image_queue', 'text_queue'):  # momentum features: what the weights compute, to 5 digits
        assert_close(second['model'][key], first['model'][key], 5, key)
    assert_weights_equal_to_rounding(first['model'], second['model'], lr_sum=3 * 3e-3 + 3 * 1.5e-3)
    for a, b in zip(log(tmp_path / 'two_x2'), log(tmp_path / 'one_x4')):
        for name in ('train_loss_ita', 'train_loss_itm'):
            assert b[name] == pytest.approx(a[name], rel=1e-5)


# ---------------------------------------------------------------------------------------------- stops
def test_sigterm_in_the_middle_of_a_step_then_resume_is_bit_identical(data, all_rank_runs):
    """SIGTERM while the second micro-batch of epoch 0 step 3 runs: the whole step is applied and saved. The
    resumed run is stopped the same way in epoch 1, then finished by 2 processes x accum_steps 1: the same 2 ranks,
    so the same run, bit for bit."""
    out = all_rank_runs['root'] / 'stopped'
    # Micro-batch 1's forward of epoch 0 step 3 and of epoch 1 step 2 (7 steps per epoch, 2 micro-batches each;
    # the count goes on over both runs).
    at = [2 * (0 * 7 + 3) + 2, 2 * (1 * 7 + 2) + 2]
    calls = []
    real_rank = VirtualStep.rank

    def signalled(step, j):
        calls.append(j)
        if len(calls) in at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_rank(step, j)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VirtualStep, 'rank', signalled)
        assert here(out, data, accum_steps=2, negative_all_rank=True) == utils.EXIT_PREEMPTED
        stopped = load(out)
        assert (stopped['epoch'], stopped['step']) == (0, 4)
        assert here(out, data, '--resume', 'auto', accum_steps=2, negative_all_rank=True) == utils.EXIT_PREEMPTED
        assert (load(out)['epoch'], load(out)['step']) == (1, 3)
    torchrun(out, data, 2, '--resume', 'auto', negative_all_rank=True)
    assert_bit_identical(all_rank_runs['one_x2'], out, ranks=2)


# ---------------------------------------------------------------------------------------------- errors
def test_queue_size_must_take_whole_global_batches_of_every_rank(tmp_path, caplog, data):
    message = run_main_error(base_args() + ['--output_dir', str(tmp_path / 'out')]
                             + options(data, accum_steps=3), caplog)
    assert message == ('queue_size 32 is not divisible by the global batch size 12 (batch_size_train 4 x 1 processes '
                       'x accum_steps 3); use queue_size=24 or 36 (any multiple of 12), or accum_steps=2 or 4')
    assert not (tmp_path / 'out').exists()


def test_resume_under_another_split_is_refused_and_evaluate_ignores_accum_steps(tmp_path, caplog, data, local_runs,
                                                                               golden_checkpoint):
    checkpoint = os.path.join(local_runs['one_x2'], 'checkpoint_last.pth')
    message = run_main_error(base_args() + ['--output_dir', str(tmp_path / 'out'), '--resume', checkpoint]
                             + options(data, accum_steps=4), caplog)
    assert message == (f'--resume {checkpoint}: that run has 1 process(es) x accum_steps 2 = 2 ranks of '
                       'batch_size_train 4; this one 1 x 4 = 4 ranks of 4, so every rank\'s share of the data would '
                       'differ. Resume with accum_steps=2 with 1 process(es) and batch_size_train=4 (the same run, step '
                       'for step), or start a new run in another --output_dir.')
    assert not (tmp_path / 'out').exists()

    caplog.clear()
    assert train_retrieval.main(base_args() + ['--evaluate', '--output_dir', str(tmp_path / 'eval')]
                                + tiny_options(data, golden_checkpoint, accum_steps=3)) == 0
    ignored = [r.getMessage() for r in caplog.records if 'accum_steps' in r.getMessage()]
    assert ignored == ['accum_steps 3 is ignored with --evaluate (it only changes how training steps are computed)']


# ---------------------------------------------------------------------------------------------- no negative
def test_micro_batches_of_one_image_leave_their_negatives_out_and_log_the_count(tmp_path):
    """One training image (its 5 captions): no micro-batch has a negative. The run trains on the positives and
    log.txt counts the left-out pairs: 2 per sample, 4 samples per step (2 x 2)."""
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=1, n_val=2, n_test=2)
    assert here(tmp_path / 'out', data, accum_steps=2, batch_size_train=2, max_epoch=1) == 0
    (record,) = log(tmp_path / 'out')
    assert record['train_itm_negatives_left_out'] == 2 * 4
    assert 0 < record['train_loss_itm'] < 10


# ---------------------------------------------------------------------------------------------- both paths
@pytest.mark.parametrize('negative_all_rank', [False, True], ids=['local', 'all_rank'])
def test_straightforward_path_accumulates_as_the_fast_path(golden_checkpoint, negative_all_rank):
    """One step of 2 virtual ranks in eval mode (no dropout) with the same negatives (with all-rank negatives, some
    from the other micro-batch): the straightforward path's losses, gradients and queue equal the fast path's."""
    from models import blip_retrieval
    captions = ['a dog', 'two cats on a sofa', 'a red car parked outside', 'people']
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    micro_batches = [(images[:2], captions[:2], torch.tensor([0, 1])), (images[2:], captions[2:], torch.tensor([2, 3]))]
    negatives = ([(torch.tensor([2, 0]), torch.tensor([3, 1])), (torch.tensor([0, 1]), torch.tensor([2, 0]))]
                 if negative_all_rank else [(torch.tensor([1, 0]), torch.tensor([1, 0]))] * 2)
    results = []
    for fast in (True, False):
        model = blip_retrieval(golden_checkpoint, **dict(TINY_KWARGS, negative_all_rank=negative_all_rank)).eval()
        model.fast_path = fast
        chosen = iter(negatives)
        model.sample_hard_negatives = lambda w_t2i, w_i2t: next(chosen)
        losses, _ = accumulated_step(model, model, micro_batches, 0.4, None, torch.device('cpu'),
                                     RankStreams.seeded(0, range(2)), lambda: None)
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((losses, grads, model.image_queue.clone(), model.ptr_queue.clone()))
    (fast_losses, fast_grads, fast_queue, fast_ptr), (ref_losses, ref_grads, ref_queue, ref_ptr) = results
    assert_close(fast_losses, ref_losses, 6)
    assert_close(fast_queue, ref_queue, 6)
    assert int(fast_ptr) == int(ref_ptr) == 4
    assert fast_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        if not name.endswith('.key.bias'):  # no gradient: rounding noise (test_model)
            assert_close(fast_grads[name], grad, 5, name)
