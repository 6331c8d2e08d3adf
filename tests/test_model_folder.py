"""The model folder contract: atomic save, verified load, discovery of folds and runs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from medseg.config import InferConfig
from medseg.data.plan import ChannelNorm, Plan
from medseg.errors import CheckpointError
from medseg.model_folder import (
    find_model_dirs,
    load_model_folder,
    newest_run,
    read_model_json,
    save_model_folder,
)


def tiny_plan(num_classes: int = 3, spatial_dims: int = 3) -> Plan:
    return Plan(
        spatial_dims=spatial_dims,
        data_dims=3,
        image_channels=1,
        in_channels=1,
        channel_names=["CT"],
        label_values=list(range(num_classes)),
        label_names=["background", *[f"organ{i}" for i in range(1, num_classes)]],
        target_spacing=[1.0, 1.0, 1.0],
        normalization=[ChannelNorm(scheme="ct", clip=(-100.0, 200.0), mean=40.0, std=50.0)],
        patch_size=[16] * spatial_dims,
        batch_size=2,
        kernel_sizes=[[3] * spatial_dims] * 2,
        strides=[[1] * spatial_dims, [2] * spatial_dims],
        class_weights=[1.0] * num_classes,
        class_sampling_ratios=[1.0] * num_classes,
    )


def build(name: str, plan: Plan, options: dict) -> nn.Module:
    """A tiny conv net standing in for the registry (the format does not depend on the architecture)."""
    conv = nn.Conv3d if plan.spatial_dims == 3 else nn.Conv2d
    width = options.get("width", 4)
    return nn.Sequential(conv(plan.in_channels, width, 3, padding=1), nn.ReLU(), conv(width, plan.num_classes, 1))


def save(tmp_path: Path, model: nn.Module, plan: Plan, where: str = "model", fold: int | str = 0) -> Path:
    return save_model_folder(
        tmp_path / where,
        model=model,
        model_name="tiny",
        model_options={"width": 4},
        plan=plan,
        infer_config=InferConfig(overlap=0.25),
        fold=fold,
        training_info={"epoch": 3, "best_epoch": 2, "val_dice": {"organ1": 0.5, "organ2": 0.25}},
    )


def test_model_folder_round_trip_restores_weights_plan_and_infer_config(tmp_path):
    torch.manual_seed(0)
    plan = tiny_plan()
    model = build("tiny", plan, {"width": 4})
    model_dir = save(tmp_path, model, plan)
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "weights.safetensors"]
    loaded = load_model_folder(model_dir, build_model=build)
    assert loaded.plan == plan
    assert loaded.infer_config.overlap == 0.25
    assert loaded.meta["training"]["val_dice"]["organ1"] == 0.5
    assert loaded.fold == 0 and loaded.model_name == "tiny"
    assert not loaded.model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key])


def test_model_folder_save_replaces_existing_folder_without_leftovers(tmp_path):
    plan = tiny_plan()
    save(tmp_path, build("tiny", plan, {}), plan)
    second = build("tiny", plan, {})
    save(tmp_path, second, plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    loaded = load_model_folder(tmp_path / "model", build_model=build)
    assert torch.equal(loaded.model[0].weight, second[0].weight)


def test_truncated_weights_are_refused_as_corrupt(tmp_path):
    plan = tiny_plan()
    model_dir = save(tmp_path, build("tiny", plan, {}), plan)
    weights = model_dir / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model weights .*weights.safetensors are corrupt"):
        load_model_folder(model_dir, build_model=build)


def test_unknown_format_version_is_refused(tmp_path):
    plan = tiny_plan()
    model_dir = save(tmp_path, build("tiny", plan, {}), plan)
    meta = json.loads((model_dir / "model.json").read_text())
    meta["format_version"] = 99
    (model_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version 99"):
        read_model_json(model_dir)


def test_weights_of_another_network_are_refused_with_shape_differences(tmp_path):
    plan = tiny_plan()
    model_dir = save(tmp_path, build("tiny", plan, {"width": 4}), plan)
    meta = json.loads((model_dir / "model.json").read_text())
    meta["model"]["options"] = {"width": 8}
    (model_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"shape mismatches .*0\.weight: \(4, 1, 3, 3, 3\) != \(8, 1, 3, 3, 3\)"):
        load_model_folder(model_dir, build_model=build)


def test_weights_path_outside_the_folder_is_refused(tmp_path):
    plan = tiny_plan()
    model_dir = save(tmp_path, build("tiny", plan, {}), plan)
    meta = json.loads((model_dir / "model.json").read_text())
    meta["weights"] = "../other.safetensors"
    (model_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="must be a file name inside the folder"):
        read_model_json(model_dir)


@pytest.mark.parametrize(
    ("model_entry", "problem"),
    [
        ("unet", r"model='unet' \(expected a mapping\)"),
        ({"options": {}}, r"model\.name is missing"),
        ({"name": "tiny", "options": [4]}, r"model\.options=\[4\] \(expected a mapping or null\)"),
    ],
)
def test_hand_edited_model_entry_is_refused_as_corrupt(tmp_path, model_entry, problem):
    plan = tiny_plan()
    model_dir = save(tmp_path, build("tiny", plan, {}), plan)
    meta = json.loads((model_dir / "model.json").read_text())
    meta["model"] = model_entry
    (model_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model.json is incomplete or damaged: " + problem):
        read_model_json(model_dir)


def test_find_model_dirs_accepts_model_fold_and_run_folders(tmp_path):
    plan = tiny_plan()
    run = tmp_path / "run"
    for fold in (2, 0, 1):
        save(run / f"fold_{fold}", build("tiny", plan, {}), plan, fold=fold)
    save(run / "fold_all", build("tiny", plan, {}), plan, fold="all")
    assert find_model_dirs(run) == [run / f"fold_{k}" / "model" for k in (0, 1, 2)]
    assert find_model_dirs(run, folds=[2, "all"]) == [run / "fold_2" / "model", run / "fold_all" / "model"]
    assert find_model_dirs(run / "fold_1") == [run / "fold_1" / "model"]
    assert find_model_dirs(run / "fold_1" / "model") == [run / "fold_1" / "model"]
    with pytest.raises(CheckpointError, match=r"fold\(s\) 4 not trained"):
        find_model_dirs(run, folds=[4])
    with pytest.raises(CheckpointError, match="no medseg model in"):
        find_model_dirs(tmp_path / "nothing")


def test_newest_run_picks_latest_model_and_explains_minus_m_when_none(tmp_path):
    plan = tiny_plan()
    with pytest.raises(CheckpointError, match="Pass one with -m"):
        newest_run(tmp_path / "runs")
    old = save(tmp_path / "runs" / "a" / "fold_0", build("tiny", plan, {}), plan)
    save(tmp_path / "runs" / "b" / "fold_0", build("tiny", plan, {}), plan)
    past = time.time() - 100
    os.utime(old / "model.json", (past, past))
    assert newest_run(tmp_path / "runs") == tmp_path / "runs" / "b"
