"""The public API's front door: one table, every name resolves to its real object, import stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

import medseg
import medseg.api as api

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_medseg_and_medseg_api_export_the_same_front_door():
    front = {*api.EXPORTS, *api.FUNCTIONS}
    assert set(api.__all__) == front
    assert set(medseg.__all__) == front | {"__version__"}
    assert dir(medseg) == sorted(medseg.__all__)


@pytest.mark.parametrize("name", sorted(api.EXPORTS))
def test_every_front_door_name_is_the_object_its_module_defines(name):
    module = __import__(api.EXPORTS[name], fromlist=[name])
    assert getattr(medseg, name) is getattr(module, name)
    assert getattr(api, name) is getattr(module, name)


def test_an_unknown_name_raises_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="module 'medseg' has no attribute 'trian'"):
        _ = medseg.trian


def test_import_medseg_does_not_import_torch_monai_or_simpleitk():
    code = (
        "import sys, medseg\n"
        "medseg.__version__; medseg.train; medseg.check_dataset\n"
        "print(sorted(m for m in ('torch', 'monai', 'SimpleITK') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


def test_check_dataset_takes_a_folder_and_reports_every_case(tmp_path):
    from medseg.data.synthetic import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "ds", layout="msd", num_cases=3, shape=(16, 16, 8), seed=0)
    report = medseg.check_dataset(root, num_folds=None)
    assert report.ok, report.format()
    assert report.cases_checked == 3
