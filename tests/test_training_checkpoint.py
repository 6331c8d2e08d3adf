"""Checkpoints: atomic writes, weights-only loading, RNG state, exact resume, refusing mismatches."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_model_folder import tiny_plan
from torch import nn

from medseg.config import config_from_dict
from medseg.errors import CheckpointError, TrainingError
from medseg.training.checkpoint import (
    capture_rng_state,
    check_identity,
    load_checkpoint,
    make_identity,
    restore_rng_state,
    save_checkpoint,
)
from medseg.training.distributed import configure_determinism, seed_everything
from medseg.training.trainer import Trainer, ValCase, learning_rate_at

PATCH = 8


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 3, width: int = 4):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv3d(width, num_classes, 1)

    def forward(self, x):
        return self.head(self.encoder(x))


def ce_loss(logits, target):
    return F.cross_entropy(logits, target[:, 0])


def make_batches(seed: int, *, nan_at: int | None = None):
    """A deterministic stream per epoch: random images, labels from intensity thresholds."""

    def batches(epoch: int, start: int):
        step = start
        while True:
            g = torch.Generator().manual_seed(seed * 100_000 + epoch * 1000 + step)
            x = torch.rand(2, 1, PATCH, PATCH, PATCH, generator=g)
            y = (x > 0.4).long() + (x > 0.8).long()
            if nan_at is not None and epoch == nan_at:
                x = x * float("nan")
            yield {"image": x, "label": y}
            step += 1

    return batches


def val_cases() -> list[ValCase]:
    g = torch.Generator().manual_seed(99)
    cases = []
    for i in range(2):
        x = torch.rand(1, 12, 12, 12, generator=g)
        cases.append(ValCase(f"v{i}", x, ((x > 0.4).long() + (x > 0.8).long())[0].numpy()))
    return cases


def make_trainer(fold_dir: Path, *, max_epochs: int = 4, nan_at: int | None = None, net: type[nn.Module] = TinyNet,
                 **train) -> Trainer:
    cfg = config_from_dict(
        {
            "train": {"max_epochs": max_epochs, "iterations_per_epoch": 3, "val_every": 2, "deterministic": True, **train},
            "infer": {"overlap": 0.25},
        }
    )
    seed_everything(cfg.train.seed)
    configure_determinism(True, torch.device("cpu"))
    plan = tiny_plan(3)
    plan = type(plan)(**{**plan.__dict__, "patch_size": [PATCH] * 3})
    return Trainer(
        model=net(),
        loss_fn=ce_loss,
        plan=plan,
        train=cfg.train,
        infer=cfg.infer,
        fold_dir=fold_dir,
        batches=make_batches(7, nan_at=nan_at),
        val_cases=val_cases(),
        device=torch.device("cpu"),
        fold=0,
        model_name="tiny",
        model_options={"width": 4},
        encoder_parameter_names=["encoder.0.weight", "encoder.0.bias"],
    )


def test_checkpoint_round_trip_is_weights_only_and_keeps_tensors(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "nested": {"a": [1, 2.5, "x", None, (1, 2)]}}
    path = save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert loaded["epoch"] == 3 and loaded["nested"]["a"][:4] == [1, 2.5, "x", None]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temp files left


def test_checkpoint_with_arbitrary_objects_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        torch.save({"kind": "medseg-training-state", "format_version": 1, "x": Payload()}, fh)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_checkpoint_is_reported_as_corrupt(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"w": torch.zeros(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_rng_state_round_trip_restores_python_numpy_torch_and_generators(tmp_path):
    g = torch.Generator().manual_seed(5)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng_state({"loader": g})
    path = save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    g.manual_seed(9)
    restore_rng_state(load_checkpoint(path)["rng"], {"loader": g})
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item()) == expected


def test_identity_mismatch_lists_field_differences(tmp_path):
    plan = tiny_plan(3)
    other = type(plan)(**{**plan.__dict__, "patch_size": [32, 32, 32], "label_names": ["background", "liver", "x"]})
    saved = make_identity(model_name="unet", model_options={}, plan=plan)
    current = make_identity(model_name="deeplabv3plus", model_options={}, plan=other)
    with pytest.raises(CheckpointError, match=r"model_name: 'unet' != 'deeplabv3plus'.*label_names.*plan\.patch_size: \[16, 16, 16\] != \[32, 32, 32\]"):
        check_identity(saved, current, source="ckpt.pt")


def test_learning_rate_schedules():
    assert learning_rate_at(0, base=0.01, max_epochs=10, schedule="poly") == 0.01
    assert learning_rate_at(5, base=0.01, max_epochs=10, schedule="poly") == pytest.approx(0.01 * 0.5**0.9)
    assert learning_rate_at(5, base=0.01, max_epochs=10, schedule="cosine") == pytest.approx(0.005)
    assert learning_rate_at(7, base=0.01, max_epochs=10, schedule="constant") == 0.01


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_after_two_epochs_gives_bitwise_the_weights_of_four_straight(tmp_path):
    straight = make_trainer(tmp_path / "straight")
    result = straight.fit()
    assert result.status == "completed" and result.epochs == 4
    expected = _weights(straight.model)

    first = make_trainer(tmp_path / "resumed", max_epochs=4)
    _run_epochs(first, 2)  # two epochs of the 4-epoch schedule, checkpoint saved at the epoch end
    del first

    torch.manual_seed(12345 + 1)  # fresh objects, other RNG state: the checkpoint must restore it
    second = make_trainer(tmp_path / "resumed")
    second.resume()
    assert second.state.epoch == 2
    result = second.fit()
    assert result.epochs == 4
    for key, value in expected.items():
        assert torch.equal(second.model.state_dict()[key], value), key


def _run_epochs(trainer: Trainer, n: int) -> None:
    """Run ``n`` epochs of the trainer's schedule, then save (what Ctrl-C at an epoch end leaves)."""
    from medseg.training.monitor import Monitor
    from medseg.training.trainer import _StopRequest

    monitor = Monitor(trainer.fold_dir, trainer.class_names)
    try:
        with _StopRequest() as stop:
            for _ in range(n):
                assert not trainer._train_epoch(stop, monitor, None)
                trainer._end_epoch(monitor)
    finally:
        monitor.close()


def test_resume_from_a_mid_epoch_interrupt_is_bitwise_exact(tmp_path):
    straight = make_trainer(tmp_path / "straight", max_epochs=2)
    straight.fit()
    expected = _weights(straight.model)

    first = make_trainer(tmp_path / "resumed", max_epochs=2)
    calls = {"n": 0}
    original = first._step

    def step_then_signal(network, x, y, stop):
        value = original(network, x, y, stop)
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 2, step 1
            os.kill(os.getpid(), signal.SIGTERM)
        return value

    first._step = step_then_signal
    result = first.fit()
    assert result.status == "interrupted"
    ckpt = load_checkpoint(tmp_path / "resumed" / "checkpoint_last.pt")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 1)

    second = make_trainer(tmp_path / "resumed", max_epochs=2)
    second.resume()
    assert second.fit().status == "completed"
    for key, value in expected.items():
        assert torch.equal(second.model.state_dict()[key], value), key
    lines = (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["epoch", "1", "2"]


def test_training_writes_metrics_log_events_and_best_and_last_models(tmp_path):
    trainer = make_trainer(tmp_path / "fold_0", max_epochs=2, val_every=1)
    result = trainer.fit()
    fold = tmp_path / "fold_0"
    assert result.best_epoch in (1, 2) and set(result.val_dice) == {"organ1", "organ2"}
    header = (fold / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == ["epoch", "train_loss", "lr", "dice_organ1", "dice_organ2", "mean_fg_dice",
                      "data_wait_s", "compute_s", "epoch_s"]
    assert "validation (2 cases" in (fold / "train.log").read_text()
    assert any((fold / "events").iterdir())
    assert (fold / "model" / "model.json").is_file() and (fold / "model_last" / "model.json").is_file()


def test_model_folder_carries_the_training_volume_ranges_of_the_runs_fingerprint(tmp_path):
    from medseg.inference.quality import training_volume_ranges

    run = tmp_path / "run"
    run.mkdir()
    (run / "fingerprint.json").write_text(json.dumps({
        "label_values": [0, 1, 2], "spacings": [[1.0, 1.0, 2.0], [1.0, 1.0, 2.0]],
        "class_voxels": [[9000, 1000, 0], [8000, 2000, 500]],
    }))
    trainer = make_trainer(run / "fold_0", max_epochs=1, val_every=1)
    assert trainer.fit().status == "completed"
    expected = {"1": {"min_ml": 2.0, "max_ml": 4.0, "present": 2, "cases": 2},
                "2": {"min_ml": 1.0, "max_ml": 1.0, "present": 1, "cases": 2}}
    for name in ("model", "model_last"):
        assert json.loads((run / "fold_0" / name / "model.json").read_text())["volume_ranges"] == expected
    copy = tmp_path / "elsewhere" / "model"  # a copied model folder: no fingerprint.json around it
    shutil.copytree(run / "fold_0" / "model", copy)
    assert training_volume_ranges(copy, trainer.plan) == {int(k): v for k, v in expected.items()}
    outside = make_trainer(tmp_path / "alone" / "fold_0", max_epochs=1, val_every=1)  # no run: no field
    outside.fit()
    assert "volume_ranges" not in json.loads((tmp_path / "alone" / "fold_0" / "model" / "model.json").read_text())


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path / "fold_0", max_epochs=3, nan_at=1)
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2, step 1.*last good checkpoint is kept.*epoch 1"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "fold_0" / "checkpoint_last.pt")["epoch"] == 1


def test_frozen_encoder_does_not_change_during_freeze_epochs(tmp_path):
    trainer = make_trainer(tmp_path / "fold_0", max_epochs=2, freeze_encoder_epochs=1)
    before = trainer.model.encoder[0].weight.clone()
    head_before = trainer.model.head.weight.clone()
    _run_epochs(trainer, 1)
    assert torch.equal(trainer.model.encoder[0].weight, before)
    assert not torch.equal(trainer.model.head.weight, head_before)
    _run_epochs(trainer, 1)
    assert not torch.equal(trainer.model.encoder[0].weight, before)


class TracedNet(TinyNet):
    """TinyNet that notes each time torch.compile traces its forward."""

    traced: ClassVar[list[int]] = []

    def forward(self, x):
        if torch.compiler.is_compiling():
            TracedNet.traced.append(1)
        return super().forward(x)


def test_train_compile_runs_compiled_steps_with_the_weights_of_eager_steps(tmp_path):
    eager = make_trainer(tmp_path / "eager", max_epochs=2)
    eager.fit()
    TracedNet.traced.clear()
    torch._dynamo.reset()
    compiled = make_trainer(tmp_path / "compiled", max_epochs=2, net=TracedNet, compile=True)
    assert compiled.fit().status == "completed"
    assert TracedNet.traced, "train.compile: true did not run the training step through torch.compile"
    for key, value in eager.model.state_dict().items():  # the same steps, within fp32 tolerance
        torch.testing.assert_close(compiled.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    assert "_orig_mod" not in "".join(compiled.model.state_dict())  # checkpoints keep the plain keys


def test_train_compile_without_a_cpu_compiler_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no c++, g++ or clang++ to find
    with pytest.raises(TrainingError, match=r"train.compile: true needs a C\+\+ compiler on CPU"):
        make_trainer(tmp_path / "fold_0", compile=True)


def test_checkpoint_survives_sigkill_during_repeated_saves(tmp_path):
    script = textwrap.dedent(
        f"""
        import torch
        from medseg.training.checkpoint import save_checkpoint
        big = torch.randn(2_000_000)
        i = 0
        while True:
            save_checkpoint({str(tmp_path / 'c.pt')!r}, {{"weights": big + i, "epoch": i}})
            i += 1
            print(i, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # let a few saves complete, then kill in the middle of the next ones
            proc.stdout.readline()
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["weights"].shape == (2_000_000,)
    assert ckpt["epoch"] >= 2


def test_resuming_a_checkpoint_of_another_model_is_refused_field_by_field(tmp_path):
    make_trainer(tmp_path / "fold_0", max_epochs=1).fit()
    other = make_trainer(tmp_path / "other", max_epochs=1)
    other.model_name = "deeplabv3plus"
    other.identity = make_identity(model_name="deeplabv3plus", model_options={"width": 4}, plan=other.plan)
    with pytest.raises(CheckpointError, match=r"made for a different model; differences .*model_name: 'tiny' != 'deeplabv3plus'"):
        other.resume(tmp_path / "fold_0" / "checkpoint_last.pt")


def test_init_from_a_model_of_another_architecture_is_refused(tmp_path):
    from medseg.config import InferConfig
    from medseg.model_folder import save_model_folder, transfer_weights

    plan = tiny_plan(3)
    source = save_model_folder(
        tmp_path / "model", model=nn.Sequential(nn.Conv3d(1, 2, 1)), model_name="seq", model_options={}, plan=plan,
        infer_config=InferConfig(), fold=0, training_info={},
    )
    with pytest.raises(CheckpointError, match="no layer of its 'seq' network matches this TinyNet"):
        transfer_weights(TinyNet(), source, label_names=plan.label_names)


def test_init_from_copies_matching_layers_and_keeps_a_fresh_head_for_new_classes(tmp_path):
    from medseg.config import InferConfig
    from medseg.model_folder import save_model_folder, transfer_weights

    source_net = TinyNet(num_classes=3)
    source = save_model_folder(
        tmp_path / "model", model=source_net, model_name="tiny", model_options={}, plan=tiny_plan(3),
        infer_config=InferConfig(), fold=0, training_info={},
    )
    target = TinyNet(num_classes=5)
    target.HEAD_PREFIXES = ("head.",)
    fresh_head = target.head.weight.clone()
    report = transfer_weights(target, source, label_names=tiny_plan(5).label_names)
    assert report.loaded == ["encoder.0.weight", "encoder.0.bias"]
    assert report.new_head == ["head.weight", "head.bias"]
    assert torch.equal(target.encoder[0].weight, source_net.encoder[0].weight)
    assert torch.equal(target.head.weight, fresh_head)
    assert "initialised 2 tensors" in report.summary() and "new head (2 tensors" in report.summary()


# --------------------------------------------------------------------------- resume with dropout and augmentation


def _train_cli(dataset: Path, out: Path, *extra: str, workers: int = 0) -> int:
    """``medseg train`` in this process: a tiny DeepLabV3+ (ASPP dropout 0.5) on augmented patches, deterministic."""
    from medseg.cli import main

    return main([
        "train", str(dataset), "-o", str(out), "--model", "deeplabv3plus", "--device", "cpu", "--max-epochs", "4",
        "--deterministic", *extra, "--set",
        "model.deep_supervision=false",
        "model.options={encoder_depth: 10, encoder_width: 4, decoder_channels: 8, low_level_channels: 4, "
        "aspp_dropout: 0.5}",
        "data.patch_size=[16, 16, 16]", "data.batch_size=2", "data.num_folds=2", f"data.num_workers={workers}",
        "train.iterations_per_epoch=3", "train.val_every=2", "train.num_threads=1",
        "augment.noise_prob=1.0", "augment.brightness_prob=1.0", "augment.flip_prob=0.5",
    ])


@pytest.mark.slow
@pytest.mark.parametrize(("stop_at", "workers"), [("epoch_end", 1), ("mid_epoch", 0)])
def test_resume_with_dropout_and_augmentation_is_bitwise_the_uninterrupted_run(tmp_path, monkeypatch, stop_at, workers):
    """2 (or 2 1/3) + the rest of 4 epochs == 4 straight: dropout draws from torch's global generator, so the
    checkpoint's RNG states must be restored on resume (a fresh run reseeds to the start-of-run state); the
    augmentation (flips, noise, brightness, ...) runs in a loader worker or in this process."""
    from medseg.data.synthetic import write_synthetic_dataset

    dataset = write_synthetic_dataset(tmp_path / "Phantoms", num_cases=4, kind="ct", seed=5, shape=(24, 24, 20))
    assert _train_cli(dataset, tmp_path / "straight", workers=workers) == 0
    expected = load_checkpoint(tmp_path / "straight" / "fold_0" / "checkpoint_last.pt")
    assert expected["epoch"] == 4

    steps = {"n": 0}
    original_step, original_end = Trainer._step, Trainer._end_epoch

    def step(self, network, x, y, stop):  # SIGTERM after step 1 of epoch 3
        value = original_step(self, network, x, y, stop)
        steps["n"] += 1
        if stop_at == "mid_epoch" and steps["n"] == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return value

    def end_epoch(self, monitor):  # SIGTERM once epoch 2 is checkpointed
        stop = original_end(self, monitor)
        if stop_at == "epoch_end" and self.state.epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return stop

    monkeypatch.setattr(Trainer, "_step", step)
    monkeypatch.setattr(Trainer, "_end_epoch", end_epoch)
    _train_cli(dataset, tmp_path / "resumed", workers=workers)
    monkeypatch.undo()
    stopped = load_checkpoint(tmp_path / "resumed" / "fold_0" / "checkpoint_last.pt")
    assert (stopped["epoch"], stopped["iteration"]) == ((2, 0) if stop_at == "epoch_end" else (2, 1))

    assert _train_cli(dataset, tmp_path / "resumed", "--resume", workers=workers) == 0
    got = load_checkpoint(tmp_path / "resumed" / "fold_0" / "checkpoint_last.pt")
    assert got["epoch"] == 4
    assert any("aspp.dropout" in name for name, _ in _dropout_modules(tmp_path / "resumed"))
    for key, value in expected["model"].items():
        assert torch.equal(got["model"][key], value), key
    for a, b in zip(got["optimizer"]["state"].values(), expected["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    # the main process's generators continue as if never stopped (the loader's own generator is not compared:
    # persistent workers draw their base seed once per loader, so a resumed run draws it once more)
    assert torch.equal(got["rng"]["torch"], expected["rng"]["torch"])
    assert got["rng"]["python"] == expected["rng"]["python"]
    assert torch.equal(got["rng"]["numpy"]["keys"], expected["rng"]["numpy"]["keys"])


def _dropout_modules(run: Path) -> list[tuple[str, nn.Module]]:
    """The trained network's active dropout layers (the test is void without them)."""
    from medseg.model_folder import load_model_folder

    model = load_model_folder(run / "fold_0" / "model_last").model
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
