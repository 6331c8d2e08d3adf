"""No command writes into its inputs, leaves a killed write's leftovers, or writes files other users cannot read."""

from __future__ import annotations

import ctypes
import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from inference_support import make_plan, save_model

import medseg
from medseg.cli import main
from medseg.data.synthetic import write_synthetic_dataset
from medseg.errors import CheckpointError, DatasetError, OutputExistsError
from medseg.io.atomic import STALE_TEMP_SECONDS
from medseg.model_folder import load_model_folder

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "data.num_workers=0", "train.num_threads=1", "data.num_folds=2", "train.device=cpu", "train.max_epochs=1",
    "train.iterations_per_epoch=1", "model.options={base_features: 4, max_features: 8}", "augment.enabled=false",
]


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``folder`` with its size and modification time: proof that nothing changed."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "Phantoms", num_cases=4, kind="ct", seed=1, shape=(24, 24, 16)
    )


# --------------------------------------------------------------------------- item 2: never write inside a dataset
@pytest.mark.parametrize(("inside", "relation"), [("", "is"), ("imagesTr/run", "is inside"), ("run", "is inside")])
def test_train_refuses_a_run_folder_in_the_dataset_before_writing_anything(dataset, capsys, inside, relation):
    before = tree(dataset)
    out = dataset / inside if inside else dataset
    assert main(["train", str(dataset), "-o", str(out), "--set", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"run folder {out} {relation} the dataset folder {dataset}" in err[0]
    assert tree(dataset) == before


def test_default_run_folder_inside_the_dataset_is_refused(dataset, monkeypatch):
    before = tree(dataset)
    monkeypatch.chdir(dataset)  # runs/ would be created inside the dataset
    with pytest.raises(OutputExistsError, match=r"run folder runs/Phantoms_unet_3d is inside the dataset folder"):
        medseg.train(dataset, overrides=FAST)
    assert tree(dataset) == before


def test_cache_folder_inside_the_dataset_is_refused_before_the_run_folder_is_made(dataset, tmp_path):
    with pytest.raises(OutputExistsError, match=r"cache folder .*cache is inside the dataset folder"):
        medseg.train(dataset, output_dir=tmp_path / "run", overrides=[*FAST, f"data.cache_dir={dataset / 'cache'}"])
    assert not (tmp_path / "run").exists() and not (dataset / "cache").exists()


# --------------------------------------------------------------------------- item 3: leftovers of killed saves
def test_training_start_removes_leftovers_of_a_killed_save(tmp_path):
    broken = write_synthetic_dataset(tmp_path / "Broken", num_cases=3, kind="ct", seed=2, shape=(16, 16, 12))
    label = next((broken / "labelsTr").glob("*.nii.gz"))
    label.write_bytes(gzip.compress(b"not a nifti"))  # the check fails: training stops right after its start
    run = tmp_path / "run"
    leftovers = [run / ".plan.json.99999999-0123abcd.tmp", run / "fold_0" / ".checkpoint_last.pt.99999999-4567cdef.tmp",
                 run / "fold_0" / ".checkpoint_last.pt.89abcdef.tmp"]  # the last: medseg 0.1.0's naming
    (run / "fold_0").mkdir(parents=True)
    for path in leftovers:
        path.write_bytes(b"half a checkpoint")
        old = time.time() - max(2 * STALE_TEMP_SECONDS, 7200)
        os.utime(path, (old, old))
    (run / "fold_0" / ".mine.tmp").write_text("not medseg's")
    with pytest.raises(DatasetError, match=r"problem.* in .*Broken"):
        medseg.train(broken, output_dir=run, overrides=FAST)
    assert sorted(p.name for p in run.rglob("*")) == [".mine.tmp", "fold_0"]


# --------------------------------------------------------------------------- item 12: permissions
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_model_folder_files_share_one_mode_that_honours_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        model = save_model(tmp_path / "model", make_plan())
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in model.iterdir()} == {
        "model.json": 0o666 & ~umask, "weights.safetensors": 0o666 & ~umask}
    assert model.stat().st_mode & 0o777 == 0o777 & ~umask


def _without_file_permission_override() -> None:
    """In the child: drop root's CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so file modes apply to it."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH; PR_CAPBSET_DROP = 24, effective after exec
            if libc.prctl(24, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def as_another_user(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run Python code in a process that file permissions apply to (root loses its override)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          preexec_fn=_without_file_permission_override, env=env, cwd=cwd)


@pytest.fixture
def permissions_apply(tmp_path):
    """Skip where a child process still reads a file of mode 0 (root without the right to drop capabilities)."""
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    try:
        result = as_another_user(f"open({str(probe)!r}).read()", tmp_path)
    except OSError as err:
        pytest.skip(f"cannot drop file-permission capabilities here ({err})")
    probe.unlink()
    if result.returncode == 0:
        pytest.skip("file permissions do not apply to a child process here")


def test_another_user_can_load_a_model_folder(tmp_path, permissions_apply):
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the model folder to another user")
    old = os.umask(0o022)
    try:
        model = save_model(tmp_path / "model", make_plan())
    finally:
        os.umask(old)
    for path in [model, *model.iterdir()]:
        os.chown(path, 65534, 65534)  # the folder now belongs to another user; this process reads as "others"
    result = as_another_user(
        "import inference_support\nfrom medseg.model_folder import load_model_folder\n"
        f"print(load_model_folder({str(model)!r}).model_name)", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "test_threshold"


@pytest.mark.parametrize("unreadable", ["weights.safetensors", "model.json"])
def test_an_unreadable_model_file_is_one_line_naming_it(tmp_path, permissions_apply, unreadable):
    model = save_model(tmp_path / "model", make_plan())
    (model / unreadable).chmod(0)
    result = as_another_user(
        "import sys, inference_support\nfrom medseg.cli import main\n"
        f"sys.exit(main(['export', {str(model)!r}, '--format', 'torchscript', '-o', 'out']))", tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"cannot read {model / unreadable}: permission denied" in lines[0]


def test_any_permission_error_in_the_cli_is_one_line_naming_the_file(tmp_path, permissions_apply):
    (tmp_path / "locked").mkdir(mode=0o555)  # a folder this user may not write into
    result = as_another_user(
        "import sys\nfrom medseg.cli import main\nsys.exit(main(['demo', '-o', 'locked/demo']))", tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "locked/demo" in lines[0] and "ermission denied" in lines[0]


def test_unreadable_weights_raise_a_checkpoint_error_in_python(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file; covered by test_an_unreadable_model_file_is_one_line_naming_it")
    model = save_model(tmp_path / "model", make_plan())
    (model / "weights.safetensors").chmod(0)
    with pytest.raises(CheckpointError, match=r"cannot read .*weights\.safetensors: permission denied"):
        load_model_folder(model)
