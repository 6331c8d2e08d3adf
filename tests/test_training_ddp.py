"""torchrun with 2 CPU processes (gloo): one run folder, one checkpoint, the shapes of a single-process run."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from medseg.data.synthetic import write_synthetic_dataset
from medseg.training.checkpoint import load_checkpoint
from medseg.training.model_folder import load_model_folder

TINY = [
    "data.num_workers=0",
    "train.num_threads=1",
    "data.num_folds=3",
    "model.options={base_features: 4, max_features: 8}",
    "data.patch_size=[16, 16, 16]",
    "train.iterations_per_epoch=2",
    "train.val_every=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _medseg_train(prefix: list[str], dataset: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [*prefix, "train", str(dataset), "-o", str(out), "--device", "cpu", "--max-epochs", "2", "--set", *TINY]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.slow
def test_two_gloo_processes_write_one_checkpoint_with_single_process_shapes(tmp_path):
    dataset = write_synthetic_dataset(tmp_path / "Phantoms", num_cases=6, kind="ct", seed=3, shape=(32, 32, 24))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "-m", "medseg"]
    ddp = _medseg_train(torchrun, dataset, tmp_path / "ddp", tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "distributed: rank 0 of 2 (cpu, backend gloo)" in ddp.stderr
    single = _medseg_train([sys.executable, "-m", "medseg"], dataset, tmp_path / "single", tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]

    fold = tmp_path / "ddp" / "fold_0"
    checkpoints = sorted(p.name for p in fold.rglob("*.pt"))
    assert checkpoints == ["checkpoint_last.pt"]
    assert sorted(p.name for p in (tmp_path / "ddp").rglob("model.json")) == ["model.json", "model.json"]  # model/, model_last/
    assert not list((tmp_path / "ddp").rglob(".*.tmp*"))
    assert load_checkpoint(fold / "checkpoint_last.pt")["epoch"] == 2
    assert len(list((fold / "events").iterdir())) == 1  # rank 0 only
    assert (fold / "metrics.csv").read_text().count("\n") == 3

    a = load_model_folder(fold / "model").model.state_dict()
    b = load_model_folder(tmp_path / "single" / "fold_0" / "model").model.state_dict()
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
