"""Setting up: the README's two commands (and CI running the second), a torch/torchvision pair that does not go
together, and the modes of every file the project writes (a shared cluster's users must read them)."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

import pytest

from conftest import REPO, VOCAB
from synthetic import write_colour_dataset
from test_train_retrieval import base_args, tiny_options

import install_check
import search
import train_retrieval
from models import hf_export
from report import compare
from utils import EXIT_USER_ERROR


# ---------------------------------------------------------------------------------------------- the README
def readme_setup_commands() -> list[list[str]]:
    """The command lines (comments dropped) of the README's first two bash blocks: the set-up."""
    with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
        blocks = re.findall(r'```bash\n(.*?)```', f.read(), flags=re.S)[:2]
    return [[line for line in block.splitlines() if line.strip() and not line.lstrip().startswith('#')]
            for block in blocks]


def test_the_readme_sets_up_in_two_commands_and_ci_runs_the_second():
    first, second = readme_setup_commands()
    assert len(first) == 1 and len(second) == 1, (first, second)  # one line each: pasted, it runs as a whole
    first, second = first[0], second[0]
    steps = first.split(' && ')
    assert steps[:4] == ['python3 -m venv .venv', '. .venv/bin/activate', 'pip install -r requirements.txt',
                         'python train_retrieval.py --config configs/retrieval_demo.yaml --device cpu'], steps
    # The second works in a fresh shell too: it activates the virtualenv of the first.
    assert second == '. .venv/bin/activate && pip install -r requirements-dev.txt && python -m pytest'
    for command in (first, second):
        subprocess.run(['bash', '-n', '-c', command], check=True)  # valid shell
    with open(os.path.join(REPO, '.ci', 'run'), encoding='utf-8') as f:
        ci = f.read()
    # CI builds its virtualenv elsewhere (a clean clone stays clean), activates it, then runs the rest as it is.
    assert '\n' + second.split(' && ', 1)[1] + '\n' in ci
    # What the README's commands create in the clone is ignored by git: the virtualenv, runs, data, exports.
    with open(os.path.join(REPO, '.gitignore'), encoding='utf-8') as f:
        ignored = set(f.read().split())
    assert {'.venv/', 'output/', '.cache/', 'hf/'} <= ignored


# ---------------------------------------------------------------------------------------------- torch and torchvision
@pytest.mark.parametrize('torch_version, torchvision_version, expected', [
    ('2.14.1', '0.29.1', None),
    ('2.4.0+cu121', '0.19.0+cu121', None),
    ('2.13.0+cpu', '0.29.1', 'torch 2.13.0+cpu and torchvision 0.29.1 do not go together (torch 2.13 needs '
                             'torchvision 0.28); fix it with: pip install --force-reinstall torch===2.13.0 '
                             'torchvision===0.28.0 (or, to keep the cpu build: pip install --force-reinstall '
                             'torch==2.13.0+cpu torchvision==0.28.0+cpu --index-url '
                             'https://download.pytorch.org/whl/cpu)'),
    ('2.14.1', '0.28.0', 'torch 2.14.1 and torchvision 0.28.0 do not go together (torch 2.14 needs torchvision '
                         '0.29); fix it with: pip install --force-reinstall torch===2.14.1 torchvision===0.29.1'),
    ('2.5.1', None, 'torchvision is not installed (torch 2.5.1 needs torchvision 0.20.1); fix it with: pip install '
                    '--force-reinstall torch===2.5.1 torchvision===0.20.1'),
])
def test_torchvision_pairs_with_torch_by_version(torch_version, torchvision_version, expected):
    assert install_check.pair_problem(torch_version, torchvision_version) == expected


def test_a_version_mismatch_stops_before_torchvision_is_imported(monkeypatch, capsys):
    versions = {'torch': '2.14.1', 'torchvision': '0.28.0'}
    monkeypatch.setattr(install_check, 'installed_version', versions.get)
    imported = []
    monkeypatch.setattr(install_check.importlib, 'import_module', imported.append)
    with pytest.raises(SystemExit) as stopped:
        install_check.check_torch_pair()
    assert stopped.value.code == EXIT_USER_ERROR and imported == []
    assert capsys.readouterr().err == ('error: torch 2.14.1 and torchvision 0.28.0 do not go together (torch 2.14 '
                                       'needs torchvision 0.29); fix it with: pip install --force-reinstall '
                                       'torch===2.14.1 torchvision===0.29.1\n')


@pytest.fixture(scope='module')
def broken_torchvision(tmp_path_factory) -> str:
    """A folder whose `torchvision` fails at import as one built for another torch does."""
    folder = tmp_path_factory.mktemp('broken_torchvision')
    (folder / 'torchvision').mkdir()
    (folder / 'torchvision' / '__init__.py').write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    return str(folder)


@pytest.mark.parametrize('command', [
    ['train_retrieval.py', '--config', 'configs/retrieval_demo.yaml', '--device', 'cpu'],
    ['search.py', '--config', 'configs/retrieval_demo.yaml', '--images', 'photos', '--query', 'a red circle'],
    ['-m', 'models.hf_export', 'output/retrieval_demo/checkpoint_best.pth', 'hf/demo'],
])
def test_a_torchvision_of_another_torch_stops_every_entry_point_in_one_line(broken_torchvision, tmp_path, command):
    env = dict(os.environ, PYTHONPATH=broken_torchvision)
    result = subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    lines = (result.stdout + result.stderr).splitlines()
    torch_version = install_check.installed_version('torch')
    plain = '.'.join(map(str, install_check.release(torch_version)))
    assert result.returncode == EXIT_USER_ERROR and len(lines) == 1, lines
    assert lines[0].startswith(f'error: torch {torch_version} and torchvision ')
    assert '(importing torchvision: operator torchvision::nms does not exist)' in lines[0]
    assert (f'fix it with: pip install --force-reinstall torch==={plain} '
            f'torchvision==={install_check.paired_torchvision(torch_version)}') in lines[0]


# ---------------------------------------------------------------------------------------------- file modes
@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def modes_under(folder) -> dict[str, str]:
    """Every path under `folder` (relative) -> its permission bits in octal."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = oct(stat.S_IMODE(os.lstat(path).st_mode))
    return found


def test_every_output_follows_the_umask(tmp_path, umask_022):
    """A run (checkpoints, logs, config, TensorBoard, report), its export, a search (index, JSON, page, thumbnails)
    and a comparison: under umask 022, folders 755 and files 644 for the others on a shared machine."""
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=8, n_val=4, n_test=4)
    outputs = tmp_path / 'outputs'
    run = outputs / 'run'
    assert train_retrieval.main(base_args() + ['--output_dir', str(run)] + tiny_options(
        data, max_epoch=1, tensorboard=True, report_thumb_px=16, report_queries=2)) == 0
    assert hf_export.main([str(run / 'checkpoint_best.pth'), str(outputs / 'hf' / 'tiny')]) == 0
    assert search.main(['--config', str(run / 'config.yaml'), '--device', 'cpu', '--images',
                        os.path.join(data['image_root'], 'flickr30k-images'), '--query', 'a red photo',
                        '--index', str(outputs / 'search' / 'index.npz'), '--json', str(outputs / 'search' / 'hits.json'),
                        '--html', str(outputs / 'search' / 'hits.html'), '--options',
                        f'pretrained={run / "checkpoint_best.pth"}', f'tokenizer={VOCAB}']) == 0
    assert compare.main([str(run), str(run), '--out', str(outputs / 'compare'), '--thumb_px', '16']) == 0

    modes = modes_under(outputs)
    expected = ['run/checkpoint_best.pth', 'run/checkpoint_last.pth', 'run/config.yaml', 'run/train.log',
                'run/log.txt', 'run/tensorboard', 'run/report/index.html', 'run/report/thumbs', 'hf/tiny',
                'hf/tiny/model.safetensors', 'hf/tiny/config.json', 'search/index.npz', 'search/hits.json',
                'search/hits.html', 'search/hits_thumbs', 'compare/index.html']
    assert set(expected) <= set(modes), sorted(modes)
    assert any(path.startswith('run/tensorboard/events.') for path in modes)
    wrong = {path: mode for path, mode in modes.items()
             if mode != ('0o755' if os.path.isdir(outputs / path) else '0o644')}
    assert wrong == {}
