"""GPU checks (marker ``gpu``): mixed-precision training, CUDA inference equal to the CPU's, the GPU-resident
sliding-window accumulators and ``medseg infer --device cuda:0``, on the real CT in ``../shared/data/ct_organs``.

Without a CUDA device every test here is skipped by ``tests/conftest.py`` with the reason (the default run
stays CPU-only and never autocasts on the CPU). ``benchmarks/gpu_check.sh`` runs them on a GPU machine.

One small model is trained per module, on the GPU through ``medseg.train`` (float16 autocast + GradScaler,
``train.device=cuda``), on two halves of patient A's CT with liver, spleen and kidneys as classes; the
inference tests compare that model's CUDA output with its CPU output on the whole scan.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import require_shared_data

import medseg
from medseg.cli import main
from medseg.data.preprocess import preprocess_case
from medseg.inference.segmenter import Segmenter
from medseg.inference.sliding_window import (
    WindowOptions,
    _choose_accumulator_device,
    iter_logit_slabs,
    predict_logits,
)
from medseg.io import read_volume
from medseg.losses import build_loss
from medseg.model_folder import load_model_folder
from medseg.models import create_model_from_plan
from medseg.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.gpu

# label values of TotalSegmentator's map in organs.nii.gz -> the classes trained here
CLASSES = {"liver": (1, [5]), "spleen": (2, [1]), "kidneys": (3, [2, 3])}
EPOCHS = 10
TRAIN = [
    "train.device=cuda",
    "train.mixed_precision=auto",
    f"train.max_epochs={EPOCHS}",
    "train.iterations_per_epoch=20",
    f"train.val_every={EPOCHS}",
    "data.num_workers=0",
    "augment.enabled=false",
]


def write_ct_organs_dataset(ct_organs: Path, dest: Path) -> Path:
    """A dataset folder from patient A's real CT: lower and upper halves (15 slices each) as two cases.

    Classes: liver 1, spleen 2, kidneys 3 (every other TotalSegmentator label is background).
    """
    ct = nib.load(ct_organs / "ct.nii.gz")
    image = np.asarray(ct.dataobj).astype(np.int16)
    raw = np.asarray(nib.load(ct_organs / "organs.nii.gz").dataobj)
    label = np.zeros(raw.shape, np.uint8)
    for value, sources in CLASSES.values():
        label[np.isin(raw, sources)] = value
    dataset = dest / "PatientA_halves"
    for sub in ("imagesTr", "labelsTr"):
        (dataset / sub).mkdir(parents=True, exist_ok=True)
    half = image.shape[2] // 2
    for name, (z0, z1) in {"lower": (0, half), "upper": (half, image.shape[2])}.items():
        affine = ct.affine.copy()
        affine[:3, 3] = ct.affine[:3, :3] @ np.array([0, 0, z0]) + ct.affine[:3, 3]
        for array, path in ((image, f"imagesTr/A_{name}_0000.nii.gz"), (label, f"labelsTr/A_{name}.nii.gz")):
            out = nib.Nifti1Image(np.ascontiguousarray(array[..., z0:z1]), affine)
            out.set_qform(affine, code=1)
            out.set_sform(affine, code=1)
            nib.save(out, dataset / path)
    (dataset / "dataset.json").write_text(json.dumps({
        "name": "PatientA_halves",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: value for name, (value, _) in CLASSES.items()}},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }, indent=2))
    return dataset


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _assert_masks_agree(reference: np.ndarray, other: np.ndarray, label_values, what: str) -> None:
    """Dice >= 0.99 for every foreground label; the reference must hold a real segmentation."""
    counts = {v: int((reference == v).sum()) for v in label_values}
    assert max(counts.values()) >= 1000, f"the model trained here segments too little to compare ({counts})"
    dice = {v: _dice(reference == v, other == v) for v in label_values}
    assert min(dice.values()) >= 0.99, f"{what}: Dice per label {dice} (voxels in the reference {counts})"


@pytest.fixture(scope="module")
def ct_path() -> Path:
    return require_shared_data("ct_organs", "ct.nii.gz")


@pytest.fixture(scope="module")
def gpu_run(ct_path, tmp_path_factory) -> medseg.Run:
    """A small U-Net trained on the GPU with float16 autocast (the built-in ``cpu_quick`` sizes)."""
    dataset = write_ct_organs_dataset(ct_path.parent, tmp_path_factory.mktemp("data"))
    return medseg.train(
        dataset, "cpu_quick", output_dir=tmp_path_factory.mktemp("runs") / "gpu",
        fold="all", overrides=TRAIN,
    )


@pytest.fixture(scope="module")
def plan_image(gpu_run, ct_path) -> torch.Tensor:
    """The whole real CT on the trained plan's grid (``(C, *spatial)`` float32, CPU)."""
    case = preprocess_case(read_volume(ct_path), gpu_run.plan)
    return torch.from_numpy(np.ascontiguousarray(case.image))


@pytest.fixture
def deterministic_cudnn():
    """Same cuDNN algorithm on every call, so two runs differ only in what the test changes."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def test_fp16_autocast_training_on_cuda_gives_a_finite_decreasing_loss(gpu_run):
    assert gpu_run.status == "completed"
    fold_dir = gpu_run.folds[0].fold_dir
    with (fold_dir / "metrics.csv").open() as fh:
        losses = [float(row["train_loss"]) for row in csv.DictReader(fh)]
    assert len(losses) == EPOCHS
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], f"train loss per epoch did not decrease: {losses}"
    # the GradScaler's state is saved only when autocast + GradScaler were on (never on the CPU)
    scaler = load_checkpoint(fold_dir / "checkpoint_last.pt")["scaler"]
    assert scaler is not None and scaler["scale"] > 0, f"mixed precision was not used on CUDA: scaler {scaler}"


def test_bf16_autocast_training_steps_on_cuda_give_a_finite_decreasing_loss(gpu_run, plan_image, ct_path):
    """medseg has no bfloat16 option: this runs medseg's network and loss under bf16 autocast in a plain loop."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} does not support bfloat16")
    loaded = load_model_folder(gpu_run.model_dir, device="cpu")
    plan = gpu_run.plan
    raw = np.asarray(nib.load(ct_path.parent / "organs.nii.gz").dataobj)
    label = np.zeros(raw.shape, np.uint8)
    for value, sources in CLASSES.values():
        label[np.isin(raw, sources)] = value
    case = preprocess_case(read_volume(ct_path), plan, label=label)
    # one fixed batch: the patch at the scan's centre (overfitting it must lower the loss)
    patch = [min(p, s) for p, s in zip(plan.patch_size, case.image.shape[1:])]
    lo = [(s - p) // 2 for p, s in zip(patch, case.image.shape[1:])]
    region = tuple(slice(a, a + p) for a, p in zip(lo, patch))
    x = torch.from_numpy(np.ascontiguousarray(case.image[(slice(None), *region)]))[None].cuda()
    y = torch.from_numpy(np.ascontiguousarray(case.label[(slice(None), *region)]).astype(np.int64))[None].cuda()
    torch.manual_seed(0)
    model = create_model_from_plan(loaded.model_name, plan, **loaded.meta["model"]["options"]).cuda().train()
    loss_fn = build_loss(gpu_run.config.loss, plan)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses), losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), f"bf16 loss did not decrease: {losses}"


def test_cuda_inference_gives_the_cpu_mask_on_the_real_ct(gpu_run, ct_path):
    masks = {}
    for device in ("cpu", "cuda"):
        segmenter = Segmenter.load(gpu_run.model_dir, device=device, tta="off")
        assert segmenter.device.type == device
        masks[device] = segmenter.predict(ct_path).mask
    _assert_masks_agree(masks["cpu"], masks["cuda"], gpu_run.plan.label_values[1:], "CUDA vs CPU mask")


def test_cuda_logits_match_cpu_logits_on_the_real_ct(gpu_run, plan_image):
    plan = gpu_run.plan
    nets = {d: load_model_folder(gpu_run.model_dir, device=d).model.eval() for d in ("cpu", "cuda")}
    with torch.inference_mode():
        cpu = predict_logits(nets["cpu"], plan_image, plan, WindowOptions(overlap=0.5), device="cpu")
        gpu = predict_logits(nets["cuda"], plan_image, plan, WindowOptions(overlap=0.5), device="cuda")
    scale = float(cpu.abs().max())
    err = (gpu - cpu).abs()
    # medseg runs the network under float16 autocast on CUDA: ~1e-3 relative per layer, summed over the net
    assert float(err.max()) <= 0.05 * scale and float(err.mean()) <= 0.005 * scale, (
        f"float16 CUDA logits vs float32 CPU: max |diff| {float(err.max()):.4g}, mean {float(err.mean()):.4g}, "
        f"max |logit| {scale:.4g}"
    )

    # float32 on both devices (no autocast, TF32 off): the same network, one window, within 1e-3 relative
    window = tuple(slice(0, min(p, s)) for p, s in zip(plan.patch_size, plan_image.shape[1:]))
    x = plan_image[(slice(None), *window)][None]
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            out = {d: nets[d](x.to(d)) for d in ("cpu", "cuda")}
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    out = {d: (o[0] if isinstance(o, (list, tuple)) else o).float().cpu() for d, o in out.items()}
    scale32 = float(out["cpu"].abs().max())
    err32 = float((out["cuda"] - out["cpu"]).abs().max())
    assert err32 <= 1e-3 * scale32, f"float32 CUDA vs CPU: max |diff| {err32:.4g}, max |logit| {scale32:.4g}"


@pytest.mark.parametrize("stream", [True, False], ids=["ring", "whole_volume"])
def test_gpu_resident_accumulators_equal_cpu_accumulators(gpu_run, plan_image, deterministic_cudnn, stream):
    plan = gpu_run.plan
    cuda = torch.device("cuda")
    assert _choose_accumulator_device(cuda, 1 << 20, "auto") == cuda  # 1 MiB fits: auto keeps it on the GPU
    net = load_model_folder(gpu_run.model_dir, device=cuda).model.eval()
    logits = {}
    with torch.inference_mode():
        for accumulate, where in (("device", "cuda"), ("cpu", "cpu")):
            window = WindowOptions(overlap=0.5, stream=stream, accumulate=accumulate)
            slabs = list(iter_logit_slabs(net, plan_image, plan, window, device=cuda))
            assert {slab.device.type for _, _, slab in slabs} == {where}, f"accumulate={accumulate}"
            logits[accumulate] = predict_logits(net, plan_image, plan, window, device=cuda)
    scale = float(logits["cpu"].abs().max())
    torch.testing.assert_close(logits["device"], logits["cpu"], rtol=1e-4, atol=1e-4 * scale)


def test_cli_infer_on_cuda_0_writes_the_cpu_mask(gpu_run, ct_path, tmp_path):
    base = ["infer", str(ct_path), "-m", str(gpu_run.model_dir), "--no-tta"]
    allocations = torch.cuda.memory_stats(0).get("allocation.all.allocated", 0)
    assert main([*base, "-o", str(tmp_path / "cuda.nii.gz"), "--device", "cuda:0"]) == 0
    assert torch.cuda.memory_stats(0).get("allocation.all.allocated", 0) > allocations, "nothing ran on cuda:0"
    assert main([*base, "-o", str(tmp_path / "cpu.nii.gz"), "--device", "cpu"]) == 0
    masks = {d: np.asarray(nib.load(tmp_path / f"{d}.nii.gz").dataobj) for d in ("cpu", "cuda")}
    _assert_masks_agree(masks["cpu"], masks["cuda"], gpu_run.plan.label_values[1:], "medseg infer --device cuda:0")
