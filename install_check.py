"""Stop at start-up, in one line with the command that fixes it, when torch and torchvision do not go together.

A torchvision built for another torch (pip fell back to another index; a CPU build of torch beside PyPI's
torchvision) fails at import with `RuntimeError: operator torchvision::nms does not exist`, deep in a traceback,
and `pip install torch torchvision` then says "already satisfied". Importing this module checks the pair: the
versions first (package metadata, nothing imported), then torchvision's import itself. `models/` and `transform/`
import it before anything imports torchvision (timm does too), so every entry point passes here first.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from typing import Optional

from utils import EXIT_USER_ERROR

# torchvision 0.N is built for torch 2.(N - 15): 0.19 for 2.4, 0.28 for 2.13, 0.29 for 2.14 (torchvision's table).
TORCHVISION_MINOR_OFFSET = 15
PYTORCH_INDEX = 'https://download.pytorch.org/whl/'  # + a build's label: cpu, cu121, rocm6.1


def release(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); '2.6.0.dev20250101' -> (2, 6, 0)."""
    return tuple(int(part) for part in re.findall(r'\d+', version.split('+')[0])[:3])


def paired_torchvision(torch_version: str) -> Optional[str]:
    """The torchvision release built for `torch_version` ('2.13.0+cpu' -> '0.28.0'); None outside torch 2.x."""
    numbers = release(torch_version) + (0, 0)
    if numbers[0] != 2:
        return None
    return f'0.{numbers[1] + TORCHVISION_MINOR_OFFSET}.{numbers[2]}'


def fix_command(torch_version: str) -> str:
    """The pip command that installs torch `torch_version` with its own torchvision, both from PyPI.

    `===` matches the version string exactly: with `==`, pip prefers a local build of the same version (a
    `2.13.0+cpu` wheel in a --find-links folder) and would pair it with PyPI's torchvision again. A CPU or CUDA
    build from PyTorch's own index is offered too, with the torchvision of the same build.
    """
    plain = '.'.join(map(str, release(torch_version)))
    paired = paired_torchvision(torch_version)
    command = f'pip install --force-reinstall torch==={plain} torchvision==={paired}'
    build = torch_version.partition('+')[2]
    if re.fullmatch(r'cpu|cu\d+|rocm[\d.]+|xpu', build):
        command += (f' (or, to keep the {build} build: pip install --force-reinstall torch=={plain}+{build} '
                    f'torchvision=={paired}+{build} --index-url {PYTORCH_INDEX}{build})')
    return command


def pair_problem(torch_version: str, torchvision_version: Optional[str], import_error: str = '') -> Optional[str]:
    """The one line to print for a pair that cannot work (None when it can).

    `torchvision_version` None: not installed. `import_error`: what importing torchvision raised.
    """
    expected = paired_torchvision(torch_version)
    if expected is None:
        return None  # a torch this check does not know: let the import speak
    if torchvision_version is None:
        what = f'torchvision is not installed (torch {torch_version} needs torchvision {expected})'
    elif release(torchvision_version)[:2] != release(expected)[:2]:
        what = (f'torch {torch_version} and torchvision {torchvision_version} do not go together (torch '
                f'{".".join(map(str, release(torch_version)[:2]))} needs torchvision {expected.rsplit(".", 1)[0]})')
    elif import_error:
        what = (f'torch {torch_version} and torchvision {torchvision_version} are builds that do not go together '
                f'(importing torchvision: {import_error})')
    else:
        return None
    return f'{what}; fix it with: {fix_command(torch_version)}'


def installed_version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_torch_pair() -> None:
    """Exit with EXIT_USER_ERROR and one line on stderr when torch and torchvision cannot work together."""
    torch_version, torchvision_version = installed_version('torch'), installed_version('torchvision')
    if torch_version is None:
        return  # not a pip install (a source build): nothing to compare
    problem = pair_problem(torch_version, torchvision_version)
    if problem is None and torchvision_version is not None:
        try:
            importlib.import_module('torchvision')
        except RuntimeError as error:  # the C++ ops of another torch: `operator torchvision::nms does not exist`
            if 'torchvision::' not in str(error):
                raise
            problem = pair_problem(torch_version, torchvision_version, str(error).strip().splitlines()[0])
    if problem is not None:
        print(f'error: {problem}', file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR)


check_torch_pair()
