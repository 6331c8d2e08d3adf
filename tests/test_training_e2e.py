"""End to end: dataset folder -> run folder -> a model that segments, on tiny SYNTHETIC phantoms."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import medseg
from medseg.cli import main
from medseg.data.synthetic import write_synthetic_dataset
from medseg.errors import ConfigError
from medseg.metrics import dice_per_class
from medseg.model_folder import find_model_dirs, load_model_folder, read_model_json

ROOT = Path(__file__).resolve().parents[1]

# tiny and fast: 1 thread (this machine's 2 cores are shared), no loader workers, a slim U-Net
FAST = [
    "data.num_workers=0",
    "train.num_threads=1",
    "data.num_folds=3",
    "train.device=cpu",
    "model.options={base_features: 8, max_features: 32}",
    "augment.enabled=false",
]


@pytest.fixture(scope="module")
def ct_dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "Phantoms", num_cases=6, kind="ct", seed=3, shape=(32, 32, 24)
    )


def _untrained_and_trained_dice(run: medseg.Run) -> tuple[float, float]:
    """Mean organ Dice on the fold's validation cases: fresh weights vs the trained model."""
    from medseg.data.cache import PreprocessedCache
    from medseg.inference.sliding_window import WindowOptions, predict_logits
    from medseg.models import create_model_from_plan

    loaded = load_model_folder(run.model_dir)
    torch.manual_seed(0)
    fresh = create_model_from_plan(loaded.model_name, loaded.plan, **loaded.meta["model"]["options"]).eval()
    splits = json.loads((run.run_dir / "splits.json").read_text())
    cache = PreprocessedCache(run.run_dir.parent / ".cache", loaded.plan)
    scores = {"fresh": [], "trained": []}
    for case_id in splits[0]["val"]:
        case = cache.load(case_id)
        image = torch.from_numpy(np.array(case.image))
        for name, net in (("fresh", fresh), ("trained", loaded.model)):
            with torch.inference_mode():
                pred = predict_logits(net, image, loaded.plan, WindowOptions(overlap=0.25)).argmax(0).numpy()
            scores[name].append(dice_per_class(pred, np.asarray(case.label)[0], loaded.plan.num_classes)[0])
    return float(np.nanmean(scores["fresh"])), float(np.nanmean(scores["trained"]))


@pytest.mark.slow
def test_3d_training_writes_a_run_folder_and_beats_an_untrained_model(ct_dataset, tmp_path):
    out = tmp_path / "runs" / "ct3d"
    run = medseg.train(
        ct_dataset,
        ROOT / "configs" / "cpu_quick.yaml",
        output_dir=out,
        overrides=[*FAST, "train.max_epochs=4", "train.iterations_per_epoch=25", "train.val_every=2",
                   "data.spatial_dims=3"],
    )
    assert run.status == "completed" and run.run_dir == out
    assert run.model_dir == out / "fold_0" / "model"
    for name in ("config.yaml", "plan.json", "splits.json", "labels.json", "fingerprint.json"):
        assert (out / name).is_file(), name
    fold = out / "fold_0"
    for name in ("metrics.csv", "train.log", "checkpoint_last.pt", "model/model.json", "model/weights.safetensors",
                 "model_last/model.json"):
        assert (fold / name).exists(), name
    assert any((fold / "events").iterdir())
    assert json.loads((out / "labels.json").read_text()) == {"0": "background", "1": "organ", "2": "tumour"}
    assert sorted(p.name for p in run.model_dir.iterdir()) == ["model.json", "weights.safetensors"]
    meta = read_model_json(run.model_dir)
    assert meta["fold"] == 0 and meta["model"]["name"] == "unet" and meta["plan"]["spatial_dims"] == 3
    assert set(meta["training"]["val_dice"]) == {"organ", "tumour"}
    rows = (fold / "metrics.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("epoch,train_loss,lr,dice_organ,dice_tumour,mean_fg_dice")
    assert find_model_dirs(out) == [run.model_dir]

    fresh, trained = _untrained_and_trained_dice(run)
    assert trained > fresh + 0.2, (fresh, trained)
    assert run.metrics["val_dice"]["organ"] == pytest.approx(trained, abs=1e-6)

    # medseg infer uses the folder as it is
    from medseg.inference.segmenter import Segmenter
    from medseg.io import read_volume

    scan = sorted((ct_dataset / "imagesTr").glob("*.nii.gz"))[0]
    prediction = Segmenter.load(run.model_dir, device="cpu").predict(scan)
    assert prediction.mask.shape == read_volume(scan).array.shape[1:]


@pytest.mark.slow
def test_2d_training_on_slices_beats_an_untrained_model(ct_dataset, tmp_path):
    run = medseg.train(
        ct_dataset,
        ROOT / "configs" / "unet2d.yaml",
        output_dir=tmp_path / "ct2d",
        overrides=[*FAST, "train.max_epochs=6", "train.iterations_per_epoch=25", "train.val_every=3",
                   "data.batch_size=8", "data.patch_size=[32, 32]", "train.learning_rate=0.01"],
    )
    assert run.status == "completed"
    assert read_model_json(run.model_dir)["plan"]["spatial_dims"] == 2
    fresh, trained = _untrained_and_trained_dice(run)
    assert trained > fresh + 0.2, (fresh, trained)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "weights.safetensors"))


@pytest.mark.slow
def test_resume_continues_bitwise_exactly(ct_dataset, tmp_path):
    tiny = [*FAST, "model.options={base_features: 4, max_features: 8}", "train.iterations_per_epoch=3",
            "train.val_every=1", "train.lr_schedule=constant", "data.patch_size=[16, 16, 16]",
            "train.deterministic=true", "augment.enabled=true"]
    straight = medseg.train(ct_dataset, None, output_dir=tmp_path / "a", overrides=[*tiny, "train.max_epochs=4"])
    first = medseg.train(ct_dataset, None, output_dir=tmp_path / "b", overrides=[*tiny, "train.max_epochs=2"])
    assert first.folds[0].epochs == 2
    resumed = medseg.train(ct_dataset, None, output_dir=tmp_path / "b", resume=True, overrides=["train.max_epochs=4"])
    assert resumed.folds[0].epochs == 4
    expected = _weights(straight.run_dir / "fold_0" / "model_last")
    got = _weights(resumed.run_dir / "fold_0" / "model_last")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    rows = (tmp_path / "b" / "fold_0" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "1", "2", "3", "4"]


@pytest.mark.slow
def test_resume_with_a_config_that_changes_training_is_refused(ct_dataset, tmp_path):
    tiny = [*FAST, "model.options={base_features: 4, max_features: 8}", "train.iterations_per_epoch=2",
            "train.max_epochs=1", "data.patch_size=[16, 16, 16]"]
    medseg.train(ct_dataset, None, output_dir=tmp_path / "r", overrides=tiny)
    other = medseg.load_config(ROOT / "configs" / "cpu_quick.yaml")
    with pytest.raises(
        ConfigError,
        match=r"--resume: the config differs from the run's .*config\.yaml: .*model\.options: "
        r"\{'base_features': 4, 'max_features': 8\} \(run\) != \{'base_features': 8, 'max_features': 64\} \(given\)",
    ):
        medseg.train(ct_dataset, other, output_dir=tmp_path / "r", resume=True)
    with pytest.raises(ConfigError, match="already holds a trained fold; pass --resume"):
        medseg.train(ct_dataset, None, output_dir=tmp_path / "r", overrides=tiny)
    with pytest.raises(ConfigError, match=r"holds a run with another config \(train\.learning_rate: 0\.01 \(run\) != 0\.5 \(now\)\)"):
        medseg.train(ct_dataset, None, output_dir=tmp_path / "r", fold=1, overrides=[*tiny, "train.learning_rate=0.5"])


@pytest.mark.slow
def test_cross_validation_trains_folds_in_turn_and_writes_a_summary(ct_dataset, tmp_path):
    tiny = [*FAST, "model.options={base_features: 4, max_features: 8}", "train.iterations_per_epoch=2",
            "train.max_epochs=1", "data.patch_size=[16, 16, 16]"]
    run = medseg.train(ct_dataset, None, output_dir=tmp_path / "cv", folds=[0, 1], overrides=tiny)
    assert [f.fold for f in run.folds] == [0, 1]
    assert run.model_dir == tmp_path / "cv"
    summary = json.loads((tmp_path / "cv" / "cv_summary.json").read_text())
    assert summary["folds"] == ["0", "1"] and set(summary["per_fold"]) == {"0", "1"}
    assert set(summary["val_dice"]) == {"organ", "tumour"}
    assert find_model_dirs(run.model_dir) == [tmp_path / "cv" / "fold_0" / "model", tmp_path / "cv" / "fold_1" / "model"]


@pytest.mark.slow
def test_init_from_a_model_with_another_class_count_gets_a_new_head(ct_dataset, tmp_path):
    pinned = [*FAST, "model.options={base_features: 4, max_features: 8}", "train.iterations_per_epoch=2",
              "train.max_epochs=1", "data.patch_size=[16, 16, 16]", "data.target_spacing=[1.0, 1.0, 2.5]"]
    source = medseg.train(ct_dataset, None, output_dir=tmp_path / "src", overrides=pinned)
    mr = write_synthetic_dataset(tmp_path / "MR", num_cases=4, kind="mr", seed=5, shape=(32, 32, 24))
    target = medseg.train(mr, None, output_dir=tmp_path / "dst", init_from=source.model_dir,
                          overrides=[*pinned, "train.freeze_encoder_epochs=1", "data.num_folds=2"])
    assert target.plan.num_classes == 4 and source.plan.num_classes == 3
    log = (tmp_path / "dst" / "fold_0" / "train.log").read_text()
    assert f"from {source.model_dir}; new head" in log
    assert "encoder frozen" in log
    new = load_model_folder(target.model_dir).model.state_dict()
    old = load_model_folder(source.model_dir).model.state_dict()
    # frozen for the only epoch: every encoder tensor is the source's; the head has the new class count
    encoder = [k for k in new if k.startswith("encoder.") and k.endswith("weight")]
    assert encoder and all(torch.equal(new[k], old[k]) for k in encoder)
    assert new["head.conv.conv.weight"].shape[0] == 4 and old["head.conv.conv.weight"].shape[0] == 3


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_prints_the_resume_command(ct_dataset, tmp_path):
    out = tmp_path / "stop"
    args = [sys.executable, "-m", "medseg", "train", str(ct_dataset), "-o", str(out), "--max-epochs", "50",
            "--set", *FAST, "model.options={base_features: 4, max_features: 8}", "train.iterations_per_epoch=100000",
            "data.patch_size=[16, 16, 16]"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        log = out / "fold_0" / "events"
        while not log.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        time.sleep(3)  # some steps into epoch 1
        proc.send_signal(signal.SIGTERM)
        _stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "training stopped; resume with:" in stderr
    assert f"-o {out}" in stderr and stderr.rstrip().endswith("--resume")
    from medseg.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out / "fold_0" / "checkpoint_last.pt")
    assert ckpt["epoch"] == 0 and 0 < ckpt["iteration"] < 100000


def test_unwritable_run_folder_is_one_clear_line(ct_dataset, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = main(["train", str(ct_dataset), "-o", str(blocker / "run"), "--set", "data.num_workers=0"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "cannot create the run folder" in err[0]


def test_training_with_an_ignore_label_leaves_unlabeled_voxels_out(tmp_path):
    import nibabel as nib

    root = write_synthetic_dataset(tmp_path / "Partial", num_cases=3, kind="ct", seed=5, shape=(24, 24, 16))
    for path in sorted((root / "labelsTr").glob("*.nii.gz")):
        image = nib.load(path)
        data = np.asarray(image.dataobj).copy()
        data[:4] = 255  # a slab nobody annotated
        nib.save(nib.Nifti1Image(data, image.affine, image.header), path)
    run = medseg.train(
        root, None, output_dir=tmp_path / "run", fold="all",
        overrides=[*FAST, "loss.ignore_label=255", "train.max_epochs=1", "train.iterations_per_epoch=2",
                   "data.num_folds=1"],
    )
    assert run.status == "completed"
    assert run.plan.ignore_label == 255
    assert run.plan.label_values == [0, 1, 2]
