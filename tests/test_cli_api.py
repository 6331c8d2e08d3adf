"""The CLI and Python API as a newcomer meets them (issue 13, "The Python API and packaging").

Built-in configs by name (also from an installed wheel, outside the repository),
`medseg configs`, refusals of a bad --model/--fold before any work, --set errors that
name --set, one fold-list syntax for train and infer, a misspelled command, and
training progress on stderr from Python.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import sphere_mask

import medseg
from medseg.cli import build_parser, main
from medseg.config import BUILTIN_CONFIG_DIR, load_config
from medseg.data.synthetic import write_synthetic_dataset
from medseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.num_workers=0", "train.num_threads=1", "data.num_folds=2", "train.device=cpu", "train.max_epochs=1",
    "train.iterations_per_epoch=1", "train.val_every=1", "model.options={base_features: 4, max_features: 8}",
    "augment.enabled=false",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "Phantoms", num_cases=4, seed=3, shape=(24, 20, 16))


# --------------------------------------------------------------------------- built-in configs


def test_a_built_in_config_loads_by_name_with_or_without_yaml():
    by_path = load_config(REPO / "configs" / "cpu_quick.yaml")
    assert load_config("cpu_quick") == by_path
    assert load_config("cpu_quick.yaml") == by_path


def test_a_misspelled_config_name_suggests_the_built_in_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"config 'cpu_quik' is neither a file nor a built-in config\. "
                                          r"Did you mean 'cpu_quick'\?.*`medseg configs`"):
        load_config("cpu_quik")


def test_a_local_file_wins_over_a_built_in_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cpu_quick.yaml").write_text("train:\n  max_epochs: 7\n")
    assert load_config("cpu_quick.yaml").train.max_epochs == 7
    assert load_config("cpu_quick").train.max_epochs == load_config(BUILTIN_CONFIG_DIR / "cpu_quick.yaml").train.max_epochs


def test_medseg_configs_lists_every_built_in_config_with_its_description(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shipped = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    described = {line.split()[0]: line.split(maxsplit=1)[1] for line in lines if not line.startswith("(")}
    assert sorted(described) == shipped
    first_comment = (REPO / "configs" / "cpu_quick.yaml").read_text().splitlines()[0].lstrip("# ")
    assert described["cpu_quick"] == first_comment


@pytest.mark.slow
def test_configs_ship_in_the_wheel_and_load_by_name_outside_the_repository(tmp_path):
    """`pip wheel` of the project, unpacked on sys.path in an empty folder: `-c cpu_quick` and `medseg configs` work."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((REPO / name).read_bytes())
    subprocess.run(["cp", "-r", str(REPO / "medseg"), str(src / "medseg")], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("medseg-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    shipped = {f"medseg/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    assert shipped <= names
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    code = (
        "import sys, medseg; from medseg.cli import main; from medseg.config import load_config\n"
        "print(medseg.__file__)\n"
        "print(load_config('cpu_quick').train.max_epochs)\n"
        "sys.exit(main(['configs']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run([sys.executable, "-c", code], cwd=empty, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith(str(tmp_path / "site"))  # the unpacked wheel, not the repository
    assert int(out[1]) == load_config(REPO / "configs" / "cpu_quick.yaml").train.max_epochs
    assert any(line.startswith("cpu_quick ") for line in out)


# --------------------------------------------------------------------------- refusals before any work


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "unett"], "unknown model 'unett' (--model / model.name); registered models: "),
        (["--fold", "7"], "fold 7 does not exist: there are 2 folds (0..1, data.num_folds)"),
        (["--folds", "0", "2"], "fold 2 does not exist: there are 2 folds (0..1, data.num_folds)"),
    ],
)
def test_bad_model_or_fold_is_refused_before_check_plan_or_any_folder(dataset, tmp_path, monkeypatch, caplog, capsys,
                                                                       flags, message):
    monkeypatch.chdir(tmp_path)  # the default run folder would be runs/ here
    caplog.set_level(logging.INFO, logger="medseg")
    out = tmp_path / "run"
    code = main(["train", str(dataset), "-o", str(out), "--set", *TINY, *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert not out.exists() and not (tmp_path / "runs").exists()
    assert "checking" not in caplog.text and "fingerprint" not in caplog.text


def test_python_train_refuses_a_bad_fold_before_any_work(dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"fold 5 does not exist: there are 2 folds"):
        medseg.train(dataset, output_dir=tmp_path / "run", folds=[0, 5], overrides=TINY)
    with pytest.raises(ConfigError, match=r"fold 1 is given more than once"):
        medseg.train(dataset, output_dir=tmp_path / "run", folds=[1, 1], overrides=TINY)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.max_epocs=1", "unknown key 'train.max_epocs' in --set train.max_epocs=1. Did you mean 'max_epochs'?"),
        ("data.batch_size=two", "data.batch_size in --set data.batch_size=two must be an integer or null"),
        ("trian.seed=1", "unknown section 'trian' in --set trian.seed=1. Did you mean 'train'?"),
    ],
)
def test_set_errors_name_set_not_the_config_file(tmp_path, capsys, item, message):
    config = REPO / "configs" / "cpu_quick.yaml"
    code = main(["train", str(tmp_path), "-c", str(config), "--set", item])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "cpu_quick.yaml" not in err


# --------------------------------------------------------------------------- one fold-list syntax


@pytest.mark.parametrize("command", ["train", "infer"])
@pytest.mark.parametrize("given", [["0,1,2"], ["0", "1", "2"], ["0,1", "2"]])
def test_train_and_infer_read_fold_lists_the_same_way(command, given):
    args = build_parser().parse_args([command, "x", "--folds", *given])
    assert args.folds == [0, 1, 2]


@pytest.mark.parametrize("command", ["train", "infer"])
def test_train_and_infer_refuse_the_same_bad_fold_lists(command, capsys):
    for bad, message in ((["0,x"], "fold must be a number >= 0 or 'all', got 'x'"), (["1", "1"], "fold 1 given more than once")):
        with pytest.raises(SystemExit, match=r"^2$"):
            build_parser().parse_args([command, "x", "--folds", *bad])
        assert f"argument --folds: {message}" in capsys.readouterr().err


# --------------------------------------------------------------------------- commands


def test_a_misspelled_command_is_one_line_with_the_closest_command(capsys):
    assert main(["trian", "data/x"]) == 2
    assert capsys.readouterr().err == "medseg: unknown command 'trian'; did you mean 'train'?\n"


def test_an_unknown_command_lists_the_commands(capsys):
    assert main(["--debug", "frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medseg: unknown command 'frobnicate'; commands: demo, train, infer") and err.count("\n") == 1


# --------------------------------------------------------------------------- evaluate's workers


def test_evaluate_threads_and_processes_give_the_serial_report(tmp_path):
    """Threads are the default (any script); processes are what `medseg evaluate` uses (its own __main__)."""
    for folder, radius in (("gt", 5.0), ("pred", 6.0)):
        (tmp_path / folder).mkdir()
        for i in range(3):
            mask = sphere_mask((24, 20, 16), radius=radius + i).astype(np.uint8)
            nib.save(nib.Nifti1Image(mask, np.diag([0.8, 1.1, 2.5, 1.0])), tmp_path / folder / f"c{i}.nii.gz")
    reports = [
        medseg.evaluate(tmp_path / "pred", tmp_path / "gt", metrics="dice,hd95", num_workers=n, parallel=kind).to_dict()
        for n, kind in ((0, "threads"), (2, "threads"), (2, "processes"))
    ]
    assert reports[0]["cases"] == reports[1]["cases"] == reports[2]["cases"]
    with pytest.raises(ConfigError, match=r"parallel must be 'threads' or 'processes', got 'fork'"):
        medseg.evaluate(tmp_path / "pred", tmp_path / "gt", num_workers=2, parallel="fork")
