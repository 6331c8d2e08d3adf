"""Saved records that load but are incomplete or damaged are refused with the file and the field named.

Checkpoints, model.json, plan.json and the preprocessing cache are each built for
real (a trainer's checkpoint, a saved model folder, a prepared cache), then damaged
the way an edit, a bad copy or a disk fault would: the error is a MedsegError
naming the file and the field, through the Python API and through the CLI (one
line, exit status 2) -- never a KeyError/TypeError/AttributeError traceback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_affine
from inference_support import make_plan as make_infer_plan
from inference_support import save_model
from test_training_checkpoint import make_trainer

import medseg
from medseg.cli import main
from medseg.config import load_config
from medseg.data.cache import PreprocessedCache
from medseg.data.fingerprint import compute_fingerprint
from medseg.data.folders import scan_dataset
from medseg.data.plan import load_plan, save_plan
from medseg.data.synthetic import write_synthetic_dataset
from medseg.errors import CheckpointError, ConfigError, DatasetError
from medseg.model_folder import load_model_folder, read_model_json
from medseg.training.run import plan_from_config

# ---------------------------------------------------------------------------------------- checkpoints


def _saved_checkpoint(tmp_path: Path) -> Path:
    trainer = make_trainer(tmp_path / "fold_0", max_epochs=1)
    return trainer.save()


def _edit_checkpoint(path: Path, edit) -> None:
    data = torch.load(path, weights_only=True)
    edit(data)
    torch.save(data, path)  # still loads with weights_only=True: only the record is wrong


def _set(data: dict, keys: str, value) -> None:
    """Set ``data[k1][k2]...`` for ``keys`` = "k1/k2/..."."""
    *parents, last = keys.split("/")
    for key in parents:
        data = data[key]
    data[last] = value


def _delete(data: dict, keys: str) -> None:
    *parents, last = keys.split("/")
    for key in parents:
        data = data[key]
    del data[last]


CHECKPOINT_DAMAGE = {
    "no identity": (lambda d: _delete(d, "identity"), r"is incomplete or damaged: identity is missing"),
    "epoch a string": (lambda d: _set(d, "epoch", "2"), r"epoch='2' \(expected an integer\)"),
    "no numpy rng position": (lambda d: _delete(d, "rng/numpy/pos"), r"rng\.numpy\.pos is missing"),
    "label names a string": (
        lambda d: _set(d, "identity/label_names", "abc"), r"identity\.label_names='abc' \(expected a list of strings\)"
    ),
    "optimizer without groups": (lambda d: _delete(d, "optimizer/param_groups"), r"optimizer\.param_groups is missing"),
    "unknown trainer field": (lambda d: _set(d, "trainer/bogus", 1), r"trainer\.bogus is not a known field"),
    "trainer field of wrong type": (
        lambda d: _set(d, "trainer/best_epoch", "x"), r"trainer\.best_epoch='x' \(expected an integer or null\)"
    ),
    "torch rng cut short": (
        lambda d: _set(d, "rng/torch", torch.zeros(10, dtype=torch.uint8)), r"rng\.torch has torch\.uint8 \(10,\)"
    ),
    "python rng cut short": (lambda d: _set(d, "rng/python", [3, [1, 2], None]), r"rng\.python is not a Python"),
    "model tensor missing": (lambda d: _delete(d, "model/head.bias"), r"do not fit the network .*missing keys \[head\.bias\]"),
    "model tensor of another shape": (
        lambda d: _set(d, "model/head.weight", torch.zeros(3, 2, 1, 1, 1)),
        r"do not fit the network .*shape mismatches .*head\.weight: \(3, 2, 1, 1, 1\) != \(3, 4, 1, 1, 1\)",
    ),
    "first model tensor resized": (
        lambda d: _set(d, "model/" + next(iter(d["model"])), torch.zeros(1)),
        r"do not fit the network .*shape mismatches \(file != network\) \[\S+: \(1,\) != \(.*belong to this run",
    ),
    "model entry not a tensor": (lambda d: _set(d, "model/head.bias", [0.0, 0.0, 0.0]), r"\[head\.bias\] are not tensors"),
    "optimizer groups of another size": (
        lambda d: d["optimizer"]["param_groups"][0].update(params=[0, 1]),
        r"parameter groups of sizes \[2\], this run's optimizer \[4\]",
    ),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint_is_refused_on_resume_naming_file_and_field(tmp_path, damage):
    edit, problem = CHECKPOINT_DAMAGE[damage]
    path = _saved_checkpoint(tmp_path)
    _edit_checkpoint(path, edit)
    trainer = make_trainer(tmp_path / "fold_0", max_epochs=1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + problem):
        trainer.resume(path)
    # refused before anything was restored
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.state.epoch == 0


def test_intact_checkpoint_still_resumes(tmp_path):
    path = _saved_checkpoint(tmp_path)
    trainer = make_trainer(tmp_path / "fold_0", max_epochs=1)
    trainer.resume(path)
    assert trainer.state.epoch == 0 and trainer.state.iteration == 0


# ---------------------------------------------------------------------------------------- model.json


def _model_folder(tmp_path: Path) -> Path:
    return save_model(tmp_path / "model", make_infer_plan())


def _edit_model_json(model_dir: Path, edit) -> None:
    meta = json.loads((model_dir / "model.json").read_text())
    edit(meta)
    (model_dir / "model.json").write_text(json.dumps(meta))


MODEL_JSON_DAMAGE = {
    "fold a fraction": (lambda m: _set(m, "fold", 1.5), r"fold=1\.5 \(expected an integer or one of 'all'\)"),
    "infer a string": (lambda m: _set(m, "infer", "fast"), r"infer='fast' \(expected a mapping\)"),
    "plan a list": (lambda m: _set(m, "plan", []), r"plan=\[\] \(expected a mapping\)"),
    "no weights digest": (lambda m: _delete(m, "weights_sha256"), r"weights_sha256 is missing"),
    "digest a number": (lambda m: _set(m, "weights_sha256", 7), r"weights_sha256=7 \(expected a string\)"),
    "no model name": (lambda m: _delete(m, "model/name"), r"model\.name is missing"),
}


@pytest.mark.parametrize("damage", list(MODEL_JSON_DAMAGE))
def test_damaged_model_json_is_refused_naming_file_and_field(tmp_path, damage):
    edit, problem = MODEL_JSON_DAMAGE[damage]
    model_dir = _model_folder(tmp_path)
    _edit_model_json(model_dir, edit)
    expected = re.escape(str(model_dir / "model.json")) + " is incomplete or damaged: " + problem
    with pytest.raises(CheckpointError, match=expected):
        read_model_json(model_dir)
    with pytest.raises(CheckpointError, match=expected):
        load_model_folder(model_dir)


def test_model_json_plan_without_a_field_is_refused_naming_the_file(tmp_path):
    model_dir = _model_folder(tmp_path)
    _edit_model_json(model_dir, lambda m: _delete(m, "plan/normalization"))
    with pytest.raises(
        CheckpointError, match=re.escape(str(model_dir / "model.json")) + r" has an invalid plan .*normalization=None"
    ):
        load_model_folder(model_dir)


def _scan(path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((20, 18, 12), dtype=np.int16), make_affine("RAS")), path)
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("damage", ["plan a list", "infer a string", "fold a fraction"])
def test_cli_infer_with_a_damaged_model_json_exits_2_with_one_line(tmp_path, capsys, damage):
    edit, problem = MODEL_JSON_DAMAGE[damage]
    model_dir = _model_folder(tmp_path)
    _edit_model_json(model_dir, edit)
    scan = _scan(tmp_path / "scan.nii.gz")
    assert main(["infer", str(scan), "-m", str(model_dir), "-o", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys)
    assert re.search(re.escape(str(model_dir / "model.json")) + ".*" + problem, line), line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- plan.json


@pytest.mark.parametrize(
    ("text", "problem"),
    [("[1, 2]", r"expected a JSON object, got list"), ('{"format_version": 1', r"Expecting")],
)
def test_damaged_plan_json_is_refused_naming_the_file(tmp_path, text, problem):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*" + problem):
        load_plan(path)


def test_plan_json_without_a_field_names_the_file_and_field(tmp_path):
    path = tmp_path / "plan.json"
    save_plan(make_infer_plan(), path)
    data = json.loads(path.read_text())
    del data["patch_size"]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=re.escape(str(path)) + r".*patch_size is missing"):
        load_plan(path)


# ---------------------------------------------------------------------------------------- cache


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = write_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "Phantoms", num_cases=4, kind="ct", seed=5, shape=(24, 24, 16)
    )
    index = scan_dataset(root)
    return root, index, plan_from_config(compute_fingerprint(index), load_config(None))


def _prepared(tmp_path, dataset) -> tuple[PreprocessedCache, object]:
    _, index, plan = dataset
    cache = PreprocessedCache(tmp_path / "cache", plan, dataset_root=index.root)
    cache.prepare(index.cases[:1])
    return cache, index.cases[0]


def _not_an_array(path: Path) -> None:
    path.write_bytes(b"this is not a numpy file at all" * 4)


def _object_array(path: Path) -> None:
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)


def _cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


CACHE_DAMAGE = {
    "json cut short": ("json", lambda p: p.write_text(p.read_text()[:40]), r"\.json is unreadable"),
    "json garbage": ("json", lambda p: p.write_bytes(b"\xff\xfe garbage"), r"\.json is unreadable"),
    "json a list": ("json", lambda p: p.write_text("[1, 2]"), r"\.json is damaged: expected a mapping, got list"),
    "json without record": (
        "json", lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "record"})),
        r"\.json is damaged: record is missing",
    ),
    "has_label a string": (
        "json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "has_label": "yes"})),
        r"has_label='yes' \(expected true/false\)",
    ),
    "record without geometry": (
        "json",
        lambda p: p.write_text(json.dumps({**(m := json.loads(p.read_text())),
                                           "record": {k: v for k, v in m["record"].items() if k != "final_geometry"}})),
        r"\.json has a damaged 'record' \(KeyError: 'final_geometry'\)",
    ),
    "image not an array": ("image", _not_an_array, r"\.image\.npy is not a readable array"),
    "image an object array": ("image", _object_array, r"\.image\.npy is not a readable array"),
    "image cut short": ("image", _cut_short, r"\.image\.npy is not a readable array"),
    "label of another shape": (
        "label", lambda p: np.save(p, np.zeros((1, 3, 3, 3), dtype=np.uint8)), r"\.label\.npy holds uint8 \(1, 3, 3, 3\)"
    ),
    "locations of another width": (
        "locs", lambda p: np.save(p, np.zeros((5, 2), dtype=np.int32)), r"\.locs\.npy holds int32 \(5, 2\)"
    ),
}


@pytest.mark.parametrize("damage", list(CACHE_DAMAGE))
def test_damaged_cache_entry_is_refused_naming_the_file(tmp_path, dataset, damage):
    which, edit, problem = CACHE_DAMAGE[damage]
    cache, case = _prepared(tmp_path, dataset)
    path = cache.paths(case.case_id)[which]
    edit(path)
    expected = re.escape(str(cache.folder)) + ".*" + problem + r".*delete .* \(it is rebuilt"
    with pytest.raises(DatasetError, match=expected):
        cache.load(case.case_id)
    with pytest.raises(DatasetError, match=expected):
        cache.get(case)


def test_damaged_cache_json_is_not_silently_rebuilt_by_prepare(tmp_path, dataset):
    cache, case = _prepared(tmp_path, dataset)
    path = cache.paths(case.case_id)["json"]
    path.write_text("{")
    with pytest.raises(DatasetError, match=re.escape(str(path)) + " is unreadable"):
        cache.prepare([case])
    assert path.read_text() == "{"


# ---------------------------------------------------------------------------------------- CLI: train --resume

TINY = [
    "data.num_workers=0", "train.num_threads=1", "data.num_folds=3", "train.device=cpu", "augment.enabled=false",
    "model.options={base_features: 4, max_features: 8}", "train.iterations_per_epoch=1", "train.max_epochs=1",
    "train.val_every=1", "data.patch_size=[16, 16, 16]",
]


@pytest.fixture(scope="module")
def trained_run(dataset, tmp_path_factory) -> tuple[Path, Path]:
    root, _, _ = dataset
    run = medseg.train(root, None, output_dir=tmp_path_factory.mktemp("runs") / "run", overrides=TINY)
    return root, run.run_dir


def _resume(root: Path, run_dir: Path) -> list[str]:
    return ["train", str(root), "-o", str(run_dir), "--resume", "--set", "train.max_epochs=2"]


def _damaging(path: Path, edit):
    """Apply ``edit`` to ``path`` for one test; the module's trained run is restored afterwards."""
    original = path.read_bytes()

    class _Restore:
        def __enter__(self):
            edit(path)

        def __exit__(self, *exc):
            path.write_bytes(original)

    return _Restore()


@pytest.mark.parametrize("damage", ["no identity", "first model tensor resized", "unknown trainer field"])
def test_cli_resume_of_a_damaged_checkpoint_exits_2_with_one_line(trained_run, capsys, damage):
    root, run_dir = trained_run
    edit, problem = CHECKPOINT_DAMAGE[damage]
    checkpoint = run_dir / "fold_0" / "checkpoint_last.pt"
    with _damaging(checkpoint, lambda p: _edit_checkpoint(p, edit)):
        capsys.readouterr()
        assert main(_resume(root, run_dir)) == 2
        line = _one_error_line(capsys)
    assert re.search(re.escape(str(checkpoint)) + ".*" + problem, line), line


def _val_case(run_dir: Path) -> str:
    return json.loads((run_dir / "splits.json").read_text())[0]["val"][0]


@pytest.mark.parametrize("damage", ["json cut short", "json without record", "image not an array"])
def test_cli_resume_with_a_damaged_cache_exits_2_with_one_line(trained_run, capsys, damage):
    root, run_dir = trained_run
    which, edit, problem = CACHE_DAMAGE[damage]
    (folder,) = (run_dir.parent / ".cache").glob("plan-*")
    stem = _val_case(run_dir)
    path = folder / f"{stem}.{'json' if which == 'json' else which + '.npy'}"
    assert path.is_file()
    with _damaging(path, edit):
        capsys.readouterr()
        assert main(_resume(root, run_dir)) == 2
        line = _one_error_line(capsys)
    assert re.search(re.escape(str(folder)) + ".*" + problem, line), line

