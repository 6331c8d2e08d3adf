"""Exported TorchScript and ONNX models give the same logits as PyTorch and run without medseg."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from inference_support import make_plan, save_model

from medseg.cli import main
from medseg.data.plan import load_plan
from medseg.errors import OutputExistsError
from medseg.inference.export import EXPORT_FILES, export_model, run_exported
from medseg.model_folder import load_model_folder


@pytest.fixture(scope="module")
def unet_model(tmp_path_factory):
    plan = dataclasses.replace(
        make_plan(num_classes=3, patch_size=(16, 16, 8)),
        kernel_sizes=[[3, 3, 3], [3, 3, 3]],
        strides=[[1, 1, 1], [2, 2, 2]],
    )
    return save_model(tmp_path_factory.mktemp("export") / "unet", plan, name="unet", options={"base_features": 4})


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_model_gives_the_same_logits(tmp_path, unet_model, fmt):
    out = export_model(unet_model, tmp_path / fmt, format=fmt)
    loaded = load_model_folder(unet_model)
    x = torch.randn(3, 1, 16, 16, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = loaded.model(x).numpy()
    got = run_exported(out / EXPORT_FILES[fmt], x.numpy())
    assert got.shape == (3, 3, 16, 16, 8)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert load_plan(out / "plan.json") == loaded.plan
    info = json.loads((out / "export.json").read_text())
    assert info["input"]["shape"] == ["N", 1, 16, 16, 8] and info["checked_max_abs_diff"] <= 1e-4


def test_onnx_export_runs_with_onnxruntime_alone(tmp_path, unet_model):
    out = export_model(unet_model, tmp_path / "onnx", format="onnx")
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(out / 'model.onnx')!r}, providers=['CPUExecutionProvider'])\n"
        "y = s.run(None, {'image': np.zeros((2, 1, 16, 16, 8), np.float32)})[0]\n"
        "assert 'medseg' not in sys.modules and 'torch' not in sys.modules\n"
        "print(y.shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 3, 16, 16, 8)"


def test_export_command_refuses_an_existing_folder(tmp_path, unet_model, capsys):
    assert main(["export", str(unet_model), "--format", "torchscript", "-o", str(tmp_path / "ts")]) == 0
    assert (tmp_path / "ts" / "model.torchscript.pt").is_file()
    assert main(["export", str(unet_model), "--format", "torchscript", "-o", str(tmp_path / "ts")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(OutputExistsError, match="exists"):
        export_model(unet_model, tmp_path / "ts", format="onnx")
    assert main(["export", str(unet_model), "--format", "onnx", "-o", str(tmp_path / "ts"), "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "ts").iterdir()) == ["export.json", "model.onnx", "plan.json"]


def test_exported_torchscript_matches_on_a_2d_model(tmp_path):
    plan = make_plan(spatial_dims=2, patch_size=(16, 16), slice_context=1, slice_axis=2)
    model_dir = save_model(tmp_path / "m2d", plan, name="test_skewed")
    out = export_model(model_dir, tmp_path / "ts", format="torchscript")
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = load_model_folder(model_dir).model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_exported(out / "model.torchscript.pt", x), expected, atol=1e-4, rtol=0)


def _tree(folder):
    """Every entry under ``folder`` with its bytes (folders as None): a snapshot to prove nothing changed."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


@pytest.fixture
def run_folder(tmp_path):
    """A run folder as `medseg train --fold all` leaves it: run files, a checkpoint and the model folder."""
    run = tmp_path / "run"
    plan = make_plan(num_classes=2, patch_size=(16, 16, 8))
    save_model(run / "fold_all" / "model", plan, name="test_skewed", fold="all")
    (run / "config.yaml").write_text("model: {name: test_skewed}\n")
    (run / "fold_all" / "checkpoint_last.pt").write_bytes(b"training state")
    return run


@pytest.mark.parametrize(
    ("output", "relation"),
    [("run", "contains"), ("run/fold_all", "contains"), ("run/fold_all/model", "is"),
     ("run/fold_all/model/export", "is inside")],
)
@pytest.mark.parametrize("overwrite", [True, False])
def test_export_never_writes_over_or_into_its_model(tmp_path, run_folder, capsys, output, relation, overwrite):
    before = _tree(run_folder)
    argv = ["export", str(run_folder / "fold_all" / "model"), "--format", "torchscript", "-o", str(tmp_path / output)]
    assert main(argv + (["--overwrite"] if overwrite else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{relation} the model folder" in err[0] and "never writes over or into its inputs" in err[0]
    assert _tree(run_folder) == before


def test_export_overwrite_keeps_a_folder_with_other_contents(tmp_path, unet_model, capsys):
    out = tmp_path / "shared"
    out.mkdir()
    (out / "report.pdf").write_bytes(b"someone's report")
    assert main(["export", str(unet_model), "--format", "torchscript", "-o", str(out), "--overwrite"]) == 2
    assert "holds 1 entry that this write does not produce (report.pdf)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["report.pdf"]


def test_export_default_folder_is_beside_the_model_folder_not_inside(run_folder, capsys):
    before = _tree(run_folder / "fold_all" / "model")
    assert main(["export", str(run_folder), "--format", "torchscript"]) == 0
    assert capsys.readouterr().out.strip() == str(run_folder / "fold_all" / "export_torchscript")
    assert (run_folder / "fold_all" / "export_torchscript" / "model.torchscript.pt").is_file()
    assert _tree(run_folder / "fold_all" / "model") == before
