"""The shipped configs load, and `medseg train` refuses bad configs before doing any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.cli import main
from medseg.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_all_required_configs_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"unet3d", "unet2d", "deeplabv3plus3d", "deeplabv3plus2d", "cpu_quick", "organ_ct", "tumour_mr"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_names_a_registered_model(path):
    from medseg.models import list_models

    cfg = load_config(path)
    assert cfg.model.name in list_models()
    if "2d" in path.stem:
        assert cfg.data.spatial_dims == 2
    if "3d" in path.stem:
        assert cfg.data.spatial_dims == 3


def test_default_config_follows_nnunet_training_recipe():
    cfg = load_config(CONFIGS[0].parent / "unet3d.yaml")
    t = cfg.train
    assert (t.optimizer, t.learning_rate, t.momentum, t.weight_decay, t.lr_schedule, t.grad_clip) == (
        "sgd", 0.01, 0.99, 3e-5, "poly", 12.0
    )
    assert (t.max_epochs, t.iterations_per_epoch) == (1000, 250)
    assert cfg.loss.name == "dice_ce" and cfg.model.deep_supervision


def test_unknown_key_is_refused_with_a_suggestion_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", str(tmp_path / "no_such_dataset"), "-o", str(out), "--set", "train.learnig_rate=0.1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "ConfigError" in err and "Did you mean 'learning_rate'?" in err
    assert not out.exists()


def test_wrong_type_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", str(tmp_path), "-o", str(out), "--max-epochs", "0"])
    assert code == 2
    assert "train.max_epochs and train.iterations_per_epoch must be >= 1" in capsys.readouterr().err
    code = main(["train", str(tmp_path), "-o", str(out), "--set", "data.batch_size=two"])
    assert code == 2
    assert "data.batch_size in --set data.batch_size=two must be an integer or null, got 'two' (str)" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_config_file_key_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_epoch: 5\n")
    code = main(["train", str(tmp_path), "-c", str(bad)])
    assert code == 2
    assert "Did you mean 'max_epochs'?" in capsys.readouterr().err


def test_bad_folds_flag_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it with the usage
        main(["train", str(tmp_path), "--folds", "0,x"])
    assert exit_info.value.code == 2
    assert "argument --folds: fold must be a number >= 0 or 'all', got 'x'" in capsys.readouterr().err
