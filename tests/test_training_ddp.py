"""torchrun with 2 CPU processes (gloo): one run folder, one checkpoint, gradients synchronised across the ranks."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medseg.data.synthetic import write_synthetic_dataset
from medseg.model_folder import load_model_folder
from medseg.training.checkpoint import load_checkpoint

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
    cmd = [*prefix, "train", str(dataset), "-o", str(out), "--device", "cpu", "--max-epochs", "2", "--deterministic",
           "--set", *TINY]
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
    # rank 0 samples the single process's patches (same seed); rank 1's gradients must change its weights
    assert any(not torch.equal(a[k], b[k]) for k in a), "the DDP model is the single-process one: rank 1 was ignored"


# --------------------------------------------------------------------------- gradient synchronisation

# Each process trains a tiny network with medseg's Trainer. Under torchrun every rank draws its own data
# (seeded by its rank); alone, the process trains on rank 0's data, or on both ranks' data in one batch.
TRAINER_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    import torch.nn.functional as F
    from torch import nn

    from medseg.config import config_from_dict
    from medseg.data.plan import ChannelNorm, Plan
    from medseg.training.distributed import (
        configure_determinism, destroy_distributed, dist_info_from_env, init_distributed, seed_everything,
    )
    from medseg.training.trainer import Trainer

    out, data = Path(sys.argv[1]), sys.argv[2]  # data: "rank" (this rank's), "0" (rank 0's), "0+1" (both)
    info = dist_info_from_env()
    device = torch.device("cpu")
    torch.set_num_threads(1)
    init_distributed(info, device)
    seed_everything(0)
    configure_determinism(True, device)

    def draw(seed, epoch, step):
        g = torch.Generator().manual_seed(seed * 100_000 + epoch * 1000 + step)
        x = torch.rand(2, 1, 8, 8, 8, generator=g)
        return x, (x > 0.4).long() + (x > 0.8).long()

    seeds = [info.rank] if data == "rank" else [int(s) for s in data.split("+")]

    def batches(epoch, start):
        step = start
        while True:
            pairs = [draw(s, epoch, step) for s in seeds]
            yield {"image": torch.cat([p[0] for p in pairs]), "label": torch.cat([p[1] for p in pairs])}
            step += 1

    plan = Plan(
        spatial_dims=3, data_dims=3, image_channels=1, in_channels=1, channel_names=["CT"],
        label_values=[0, 1, 2], label_names=["background", "a", "b"], target_spacing=[1.0, 1.0, 1.0],
        normalization=[ChannelNorm(scheme="ct", clip=(-100.0, 200.0), mean=40.0, std=50.0)],
        patch_size=[8, 8, 8], batch_size=2, kernel_sizes=[[3, 3, 3]], strides=[[1, 1, 1]],
        class_weights=[1.0] * 3, class_sampling_ratios=[1.0] * 3,
    )
    cfg = config_from_dict({"train": {"max_epochs": 2, "iterations_per_epoch": 3, "deterministic": True}})
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 1))
    trainer = Trainer(
        model=model, loss_fn=lambda logits, y: F.cross_entropy(logits, y[:, 0]), plan=plan, train=cfg.train,
        infer=cfg.infer, fold_dir=out / "fold", batches=batches, val_cases=[], device=device, fold=0,
        model_name="tiny", model_options={}, dist=info,
    )
    assert trainer.fit().status == "completed"
    torch.save(model.state_dict(), out / f"weights_{data}_{info.rank}.pt")
    destroy_distributed()
    """
)


def _train_with_trainer(out: Path, data: str, *, ranks: int | None) -> None:
    launcher = [] if ranks is None else ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                                         "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    script = out / "train_tiny.py"
    script.write_text(TRAINER_SCRIPT)
    proc = subprocess.run([sys.executable, *launcher, str(script), str(out), data],
                          capture_output=True, text=True, timeout=300, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_gloo_ranks_on_different_data_keep_identical_weights_that_average_their_gradients(tmp_path):
    _train_with_trainer(tmp_path, "rank", ranks=2)  # rank r trains on data r
    _train_with_trainer(tmp_path, "0", ranks=None)  # one process, rank 0's data only
    _train_with_trainer(tmp_path, "0+1", ranks=None)  # one process, both ranks' data in one batch
    load = lambda name: torch.load(tmp_path / f"weights_{name}.pt", weights_only=True)  # noqa: E731
    rank0, rank1, alone, both = load("rank_0"), load("rank_1"), load("0_0"), load("0+1_0")

    for key in rank0:  # DDP all-reduces the gradients: every rank takes the same steps
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the ranks: gradients not synchronised"
    assert any(not torch.allclose(rank0[k], alone[k], atol=1e-4) for k in rank0), "rank 0 ignored rank 1's data"
    for key in rank0:  # the mean of the ranks' gradients is the gradient of the mean loss over both batches
        torch.testing.assert_close(rank0[key], both[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_time_budget_under_torchrun_sizes_both_ranks_alike_and_ends_in_time(tmp_path):
    """The ranks agree on one plan (a deadlock or a rank-dependent step count would hang or fail)."""
    dataset = write_synthetic_dataset(tmp_path / "Phantoms", num_cases=6, kind="ct", seed=3, shape=(32, 32, 24))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "medseg", "train", str(dataset), "-o", str(tmp_path / "ddp"),
           "--device", "cpu", "--time-budget", "45s", "--set", *TINY, "data.spatial_dims=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed: rank 0 of 2 (cpu, backend gloo)" in proc.stderr
    assert proc.stderr.count("budget 45s: ") == 1  # rank 0 speaks for the job
    state = load_checkpoint(tmp_path / "ddp" / "fold_0" / "checkpoint_last.pt")["trainer"]
    assert state["budget_total_steps"] >= 50 and state["elapsed_s"] <= 47.0
