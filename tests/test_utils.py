"""Tests for utils.py: schedules, no-process-group helpers, atomic save, progress
logging, and a real two-process gloo run of the collectives under torchrun."""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import atomic  # noqa: E402
import utils  # noqa: E402
from run import tensorboard  # noqa: E402
from run.progress import ProgressLogger, SmoothedValue  # noqa: E402


# --------------------------------------------------------------------------- #
# Schedules
# --------------------------------------------------------------------------- #
def test_cosine_lr_start_middle_end() -> None:
    assert utils.cosine_lr(0, 6, 1e-5, 0.0) == pytest.approx(1e-5)
    assert utils.cosine_lr(3, 6, 1e-5, 0.0) == pytest.approx(5e-6)
    assert utils.cosine_lr(6, 6, 1e-5, 0.0) == pytest.approx(0.0, abs=1e-20)
    assert utils.cosine_lr(3, 6, 1e-5, 1e-6) == pytest.approx(5.5e-6)
    assert utils.cosine_lr(1, 6, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 6)))


def test_set_lr_sets_every_group() -> None:
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1.0)
    utils.set_lr(optimizer, 0.25)
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.25]


def test_ramp_alpha() -> None:
    assert utils.ramp_alpha(0.4, 0, 0, 100) == 0.0
    assert utils.ramp_alpha(0.4, 0, 50, 100) == pytest.approx(0.2)
    assert utils.ramp_alpha(0.4, 0, 150, 100) == pytest.approx(0.4)
    assert utils.ramp_alpha(0.4, 1, 0, 100) == 0.4


# --------------------------------------------------------------------------- #
# Without a process group
# --------------------------------------------------------------------------- #
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID", "MASTER_ADDR", "MASTER_PORT", "SLURM_LAUNCH_NODE_IPADDR",
                "SLURM_NODELIST", "SLURM_JOB_NODELIST")


@pytest.fixture
def clean_launch_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_helpers_without_process_group(clean_launch_env) -> None:
    info = utils.init_distributed(device="cpu")
    assert info == utils.DistInfo(rank=0, world_size=1, local_rank=0,
                                  device=torch.device("cpu"), distributed=False)
    assert not utils.is_dist_initialized()
    assert (utils.get_rank(), utils.get_world_size(), utils.is_main_process()) == (0, 1, True)
    utils.barrier()
    t = torch.arange(6.0).reshape(3, 2)
    assert utils.all_gather_cat(t) is t
    assert utils.all_gather_with_grad(t) is t
    assert utils.all_reduce_sum_(t) is t and torch.equal(t, torch.arange(6.0).reshape(3, 2))
    assert utils.broadcast_object({"a": 1}) == {"a": 1}
    assert utils.all_gather_object("x") == ["x"]
    utils.destroy_distributed()


def test_cuda_requested_without_cuda_suggests_cpu(clean_launch_env) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(RuntimeError, match="--device cpu"):
        utils.init_distributed(device="cuda")


def test_slurm_single_task_is_not_distributed(clean_launch_env) -> None:
    clean_launch_env.setenv("SLURM_PROCID", "0")
    clean_launch_env.setenv("SLURM_NTASKS", "1")
    info = utils.init_distributed(device="cpu")
    assert info.distributed is False and info.world_size == 1


def test_slurm_env_fills_master_addr_and_requires_port(clean_launch_env) -> None:
    clean_launch_env.setenv("SLURM_PROCID", "3")
    clean_launch_env.setenv("SLURM_NTASKS", "8")
    clean_launch_env.setenv("SLURM_LOCALID", "1")
    clean_launch_env.setenv("SLURM_LAUNCH_NODE_IPADDR", "10.1.2.3")
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        utils.init_distributed(device="cpu")
    assert os.environ["MASTER_ADDR"] == "10.1.2.3"
    clean_launch_env.setenv("MASTER_PORT", "29500")
    assert utils._read_launch_env() == (3, 8, 1, "slurm")


def test_torchrun_env_takes_priority(clean_launch_env) -> None:
    clean_launch_env.setenv("SLURM_PROCID", "5")
    clean_launch_env.setenv("SLURM_NTASKS", "8")
    clean_launch_env.setenv("RANK", "1")
    clean_launch_env.setenv("WORLD_SIZE", "2")
    clean_launch_env.setenv("LOCAL_RANK", "1")
    assert utils._read_launch_env() == (1, 2, 1, "torchrun")


# --------------------------------------------------------------------------- #
# Atomic save
# --------------------------------------------------------------------------- #
class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom while pickling")


def test_atomic_torch_save_writes_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "model.pth"
    atomic.atomic_torch_save({"w": torch.ones(2)}, path)
    atomic.atomic_torch_save({"w": torch.zeros(3)}, str(path))
    assert torch.equal(torch.load(path)["w"], torch.zeros(3))
    assert os.listdir(path.parent) == ["model.pth"]


def test_atomic_torch_save_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    atomic.atomic_torch_save({"epoch": 1, "w": torch.arange(4)}, path)
    before = path.read_bytes()
    big = torch.randn(1000)  # the temp file is already partly written when pickling fails
    with pytest.raises(RuntimeError, match="boom while pickling"):
        atomic.atomic_torch_save({"w": big, "bad": _Unpicklable()}, path)
    assert path.read_bytes() == before
    assert torch.load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["model.pth"]  # no temp file left behind


# --------------------------------------------------------------------------- #
# Logging, progress, seeding, TensorBoard
# --------------------------------------------------------------------------- #
@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def test_setup_logging_is_idempotent_and_writes_file(tmp_path: Path, restore_root_logger) -> None:
    root = restore_root_logger
    count = len(root.handlers)
    utils.setup_logging(str(tmp_path), rank=0)
    utils.setup_logging(str(tmp_path), rank=0)
    assert len(root.handlers) == count + 2  # stdout + train.log, not duplicated
    assert root.level == logging.INFO
    logging.getLogger("some.module").info("hello %d", 42)
    for handler in root.handlers:
        handler.flush()
    line = (tmp_path / "train.log").read_text().strip().splitlines()[-1]
    assert line.endswith("INFO some.module: hello 42") and line[:2] == "20"  # timestamp
    utils.setup_logging(None, rank=1)
    assert len(root.handlers) == count + 1 and root.level == logging.WARNING


def test_lines_before_the_output_folder_open_train_log_and_a_summary_is_bare_on_the_console(
        tmp_path: Path, restore_root_logger, capsys) -> None:
    utils.setup_logging(None, rank=0)  # the folder may not be written yet
    logging.getLogger("train_retrieval").info("Output folder: %s", tmp_path)
    utils.setup_logging(str(tmp_path), rank=0)
    logging.getLogger("train_retrieval").info("%s", "Training done\n  val r_mean 1.00", extra=utils.BARE)
    console = capsys.readouterr().out.splitlines()
    log = (tmp_path / "train.log").read_text().splitlines()
    assert console[0].endswith(f"INFO train_retrieval: Output folder: {tmp_path}") and log[0] == console[0]
    assert console[1:] == ["Training done", "  val r_mean 1.00"]  # as printed, without the log prefix
    assert log[1].endswith(" INFO train_retrieval: Training done") and log[2:] == ["  val r_mean 1.00"]
    assert len(log) == 3


def test_progress_logger_line(caplog) -> None:
    progress = ProgressLogger(total_steps=906, header="Train Epoch [0]", log_every=50)
    with caplog.at_level(logging.INFO, logger="run.progress"):
        for step, _ in enumerate(progress.iter(range(3))):
            progress.update(loss_ita=torch.tensor(float(step + 1)), lr=1e-5)
            progress.log(step)  # explicit calls must not duplicate the automatic ones
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4  # steps 0, 1, 2 (explicit) and the total-time line
    first = lines[0]
    assert first.startswith("Train Epoch [0] [  0/906] eta ")
    assert "loss_ita 1.0000 (1.0000)" in first and "lr 0.000010" in first
    assert first.endswith(" s/it")
    assert lines[2].split(" eta ")[0] == "Train Epoch [0] [  2/906]"
    assert "loss_ita 2.0000 (2.0000)" in lines[2]
    assert lines[3].startswith("Train Epoch [0] total time ")


def test_progress_iter_logs_every_n_and_last(caplog) -> None:
    progress = ProgressLogger(total_steps=7, header="Eval", log_every=3)
    with caplog.at_level(logging.INFO, logger="run.progress"):
        for _ in progress.iter(range(7)):
            progress.update(x=1)
    steps = [r.getMessage().split("]")[0] for r in caplog.records[:-1]]
    assert steps == ["Eval [0/7", "Eval [3/7", "Eval [6/7"]


def test_smoothed_value() -> None:
    meter = SmoothedValue(window=3)
    for v in [10.0, 1.0, 2.0, 3.0]:
        meter.update(v)
    assert meter.value == 3.0 and meter.median == 2.0 and meter.avg == 2.0
    assert meter.global_avg == 4.0


def test_seed_everything_repeats() -> None:
    import random
    import numpy as np
    utils.seed_everything(123)
    first = (random.random(), np.random.rand(), torch.rand(2))
    utils.seed_everything(123)
    second = (random.random(), np.random.rand(), torch.rand(2))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_tensorboard_writer(tmp_path: Path) -> None:
    disabled = tensorboard.TensorboardWriter(None)
    disabled.add_scalars({"loss": 1.0}, 0)  # no-op
    assert not disabled.enabled
    pytest.importorskip("tensorboard")
    writer = tensorboard.TensorboardWriter(str(tmp_path))
    assert writer.enabled
    writer.add_scalars({"loss": torch.tensor(1.5), "lr": 1e-5}, step=3)
    writer.add_scalars({"loss": 0.25}, step=7)
    writer.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path))
    events.Reload()  # what TensorBoard itself reads back
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(3, 1.5), (7, 0.25)]
    assert [(e.step, pytest.approx(e.value, rel=1e-7)) for e in events.Scalars("lr")] == [(3, 1e-5)]


# --------------------------------------------------------------------------- #
# Real two-process run (gloo on CPU) under torchrun
# --------------------------------------------------------------------------- #
_WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    import utils

    info = utils.init_distributed(device="cpu")
    rank, world = utils.get_rank(), utils.get_world_size()
    out = {"info": [info.rank, info.world_size, info.local_rank, str(info.device),
                    info.distributed],
           "rank": rank, "world": world, "main": utils.is_main_process()}

    # Unequal first dims (including an empty shard); row values identify rank and row.
    sizes = [1, 3] if rank == 0 else [3, 0]
    for i, n in enumerate(sizes):
        local = torch.stack([torch.tensor([rank, j, 7.0]) for j in range(n)]) if n \\
            else torch.zeros(0, 3)
        local.requires_grad_(True)
        gathered = utils.all_gather_cat(local)
        out[f"cat{i}"] = gathered.tolist()
        out[f"cat{i}_requires_grad"] = gathered.requires_grad

    equal = torch.tensor([[rank, 0.0], [rank, 1.0]], requires_grad=True)
    out["cat_equal"] = utils.all_gather_cat(equal, equal_sizes=True).tolist()

    # Each rank owns 2 rows of ones; rank r weights gathered row i by (r + 1) * (i + 1).
    # Summed over ranks, d(loss)/d(row i) = (1 + 2) * (i + 1), whichever rank owns row i.
    x = torch.ones(2, 3, requires_grad=True)
    gathered = utils.all_gather_with_grad(x * (rank + 1))
    out["gathered"] = gathered.tolist()
    weights = (rank + 1) * torch.arange(1.0, 5.0).unsqueeze(1)
    (gathered * weights).sum().backward()
    out["grad"] = x.grad.tolist()

    t = torch.tensor([float(rank + 1)])
    out["sum"] = utils.all_reduce_sum_(t).tolist()
    out["bcast"] = utils.broadcast_object({"from": rank})
    out["objects"] = utils.all_gather_object(rank * 10)

    utils.barrier()
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    utils.destroy_distributed()
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_collectives_under_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
           "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, res in enumerate(results):
        assert res["info"] == [rank, 2, rank, "cpu", True]
        assert (res["rank"], res["world"], res["main"]) == (rank, 2, rank == 0)
        assert res["cat0"] == [[0, 0, 7], [1, 0, 7], [1, 1, 7], [1, 2, 7]]
        assert res["cat1"] == [[0, 0, 7], [0, 1, 7], [0, 2, 7]]
        assert res["cat0_requires_grad"] is False
        assert res["cat_equal"] == [[0, 0], [0, 1], [1, 0], [1, 1]]
        assert res["gathered"] == [[1] * 3, [1] * 3, [2] * 3, [2] * 3]
        assert res["sum"] == [3.0]
        assert res["bcast"] == {"from": 0}
        assert res["objects"] == [0, 10]
    # Gradient = sum over ranks of weights for the owned rows, times d(x*(rank+1))/dx.
    assert results[0]["grad"] == [[3.0] * 3, [6.0] * 3]              # rows 0, 1; factor 1
    assert results[1]["grad"] == [[9.0 * 2] * 3, [12.0 * 2] * 3]     # rows 2, 3; factor 2
