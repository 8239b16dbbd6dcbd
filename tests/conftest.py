"""Shared fixtures: the golden tiny model rebuilt from its recipe, and the golden reference outputs."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, 'tests', 'fixtures')
if REPO not in sys.path:
    sys.path.insert(0, REPO)

VOCAB = os.path.join(REPO, 'models', 'bert-base-uncased-vocab.txt')  # the bundled default vocabulary
TINY_MED_CONFIG = os.path.join(FIXTURES, 'tiny_med_config.json')
TINY_KWARGS = dict(med_config=TINY_MED_CONFIG, image_size=32, vit={'embed_dim': 64, 'depth': 2, 'num_heads': 2},
                   vit_grad_ckpt=False, vit_ckpt_layer=0, embed_dim=16, queue_size=16, momentum=0.995,
                   negative_all_rank=False, tokenizer=VOCAB)
LAYERNORM_SUFFIXES = ('LayerNorm.weight', 'norm.weight', 'norm1.weight', 'norm2.weight')


def recipe_state_dict(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The golden weights, regenerated key by key from the recipe in the golden README."""
    out = {}
    for key, value in reference.items():
        g = torch.Generator().manual_seed(zlib.crc32(key.encode('utf-8')))
        shape = value.shape
        if key == 'temp':
            out[key] = torch.full(shape, 0.07)
        elif key == 'ptr_queue':
            out[key] = torch.zeros(shape, dtype=torch.long)
        elif key == 'idx_queue':
            out[key] = torch.full(shape, -100, dtype=torch.long)
        elif key in ('image_queue', 'text_queue'):
            out[key] = F.normalize(torch.randn(shape, generator=g), dim=0)
        elif key.endswith('embeddings.position_ids'):
            out[key] = torch.arange(shape[-1]).view(shape)
        else:
            out[key] = torch.randn(shape, generator=g) * 0.02
            if key.endswith(LAYERNORM_SUFFIXES):
                out[key] = out[key] + 1
    return out


@pytest.fixture(scope='session')
def golden() -> dict:
    with open(os.path.join(FIXTURES, 'tiny_golden.json')) as f:
        return json.load(f)


@pytest.fixture(scope='session')
def golden_checkpoint(tmp_path_factory) -> str:
    """`tiny_blip_retrieval.pth` rebuilt from the recipe (not committed: 18 MB)."""
    from models import BLIP_Retrieval
    model = BLIP_Retrieval(**TINY_KWARGS)
    path = tmp_path_factory.mktemp('golden') / 'tiny_blip_retrieval.pth'
    torch.save({'model': recipe_state_dict(model.state_dict())}, path)
    return str(path)


@pytest.fixture
def tiny_model(golden_checkpoint):
    from models import blip_retrieval
    return blip_retrieval(golden_checkpoint, **TINY_KWARGS).eval()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_torchrun(args: list[str], nproc: int = 2, timeout: int = 300, cwd: str = REPO, env_extra: dict | None = None):
    """Launch `python -m torch.distributed.run --nproc_per_node=N ARGS` (gloo on CPU); returns CompletedProcess."""
    import subprocess
    # REPO first, any PYTHONPATH kept after it (a GPU machine may get extra packages that way).
    path = os.pathsep.join(entry for entry in (REPO, os.environ.get('PYTHONPATH')) if entry)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.update(env_extra or {})
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_addr=127.0.0.1',
           f'--master_port={free_port()}', *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def recall_fields(record: dict) -> dict:
    """A log.txt or evaluate.txt record without the fields that describe the run (run.results.RUN_FIELDS: times,
    processes, device, checkpoint): what two launches of the same evaluation must agree on."""
    from run.results import RUN_FIELDS
    return {key: value for key, value in record.items() if key not in RUN_FIELDS}


def without_times(path) -> list[dict]:
    """The records of a log.txt or evaluate.txt without `eval_seconds`, which differ between any two runs."""
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k != 'eval_seconds'} for line in f]


SCORE_FILL = -100.0  # evaluation's value for pairs it never scored


def assert_close(actual, expected, digits: float, msg: str = '') -> None:
    """`actual` equals `expected` to `digits` significant decimal digits of the values' scale.

    fp32 carries about 7.2 digits. The same math in another order (fused or explicit attention, keys/values shared
    or repeated, trimmed padding, another batch split) keeps about 6; another implementation through a dozen layers
    (the original's recorded outputs) about 5. A sum's rounding error grows with its terms, not with its result, so
    the absolute part of the tolerance follows the largest expected value and the relative part each entry.
    Entries equal to SCORE_FILL (never scored) must be exactly where they were.
    """
    actual, expected = (torch.as_tensor(x).detach().cpu().double() for x in (actual, expected))
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    unscored = expected == SCORE_FILL
    assert torch.equal(actual == SCORE_FILL, unscored), f'{msg}: unscored entries differ'
    actual, expected = actual[~unscored], expected[~unscored]
    if expected.numel() == 0:
        return
    tolerance = 10.0 ** -digits
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()),
                               msg=lambda m: f'{msg} ({digits} digits): {m}')


# The CPU demo, fine-tuned once per session and shared by the tests that need a trained model (the demo learns,
# search finds the image of a caption, the report opens in a browser): training it takes most of a minute.
DEMO_CONFIG = os.path.join(REPO, 'configs', 'retrieval_demo.yaml')
DEMO_EPOCHS = 5
DEMO_SEED = 42


@pytest.fixture(scope='session')
def demo_run(tmp_path_factory) -> dict:
    """configs/retrieval_demo.yaml trained for DEMO_EPOCHS epochs (seed 42, BLIP_STEP_TRACE on).

    Returns the paths: `data` (the generated dataset), `out` (output_dir: log.txt, checkpoint_best.pth,
    report/), `checkpoint`, `trace` (the step trace of rank 0), `vocab`; and `stdout`, what the run printed.
    """
    from run import hooks
    import train_retrieval
    from data import demo
    root = tmp_path_factory.mktemp('demo_run')
    data, out, trace = root / 'demo_data', root / 'run', str(root / 'trace')
    saved_env = {name: os.environ.get(name) for name in (hooks.STEP_TRACE_ENV, hooks.STOP_AFTER_STEPS_ENV)}
    os.environ[hooks.STEP_TRACE_ENV] = trace
    os.environ.pop(hooks.STOP_AFTER_STEPS_ENV, None)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            code = train_retrieval.main(['--config', DEMO_CONFIG, '--device', 'cpu', '--seed', str(DEMO_SEED),
                                         '--output_dir', str(out), '--options', f'image_root={data}',
                                         f'tokenizer={data / demo.VOCAB_FILENAME}', f'max_epoch={DEMO_EPOCHS}',
                                         'tensorboard=False'])
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    assert code == 0, printed.getvalue()[-3000:]
    return {'data': data, 'out': out, 'checkpoint': out / 'checkpoint_best.pth', 'trace': f'{trace}.rank0.jsonl',
            'vocab': data / demo.VOCAB_FILENAME, 'stdout': printed.getvalue()}


# Three evaluated runs and one broken folder, shared by the results-table tests and the browser test: the golden
# tiny checkpoint (protocol itm), another checkpoint named as the official Flickr one (so that its test rows get the
# paper's numbers), and the golden checkpoint under the contrastive-only protocol (k_test 0).
RESULT_RUNS = {'itm': ('golden', 4), 'official_name': ('model_base_retrieval_flickr.pth', 4), 'itc': ('golden', 0)}


@pytest.fixture(scope='session')
def result_runs(tmp_path_factory, golden_checkpoint) -> dict:
    """{'data', 'checkpoints': {name: path}, 'runs': {name: output_dir}, 'broken': folder} (in-process --evaluate)."""
    from synthetic import write_colour_dataset
    from test_train_retrieval import base_args, tiny_options
    import train_retrieval
    root = tmp_path_factory.mktemp('result_runs')
    data = write_colour_dataset(str(root / 'data'), n_train=16, n_val=6, n_test=7)
    other = torch.load(golden_checkpoint, weights_only=True)['model']
    for key in ('vision_proj.weight', 'text_proj.weight'):  # another checkpoint: other features, other ranks
        other[key] = other[key] + 0.05 * torch.randn(other[key].shape, generator=torch.Generator().manual_seed(1))
    official = 'model_base_retrieval_flickr.pth'
    checkpoints = {'golden': golden_checkpoint, official: str(root / official)}
    torch.save({'model': other}, checkpoints[official])
    runs = {}
    for name, (checkpoint, k_test) in RESULT_RUNS.items():
        runs[name] = root / name
        args = base_args() + ['--evaluate', '--output_dir', str(runs[name])] + tiny_options(
            data, checkpoints[checkpoint], k_test=k_test, report_queries=4)
        assert train_retrieval.main(args) == 0
    broken = root / 'broken'
    broken.mkdir()
    (broken / 'evaluate.txt').write_text('{"val_txt_r1": 50.0, "val_r_m')  # a run killed while writing
    return {'data': data, 'checkpoints': checkpoints, 'runs': runs, 'broken': broken}
