"""The README's Python snippet runs verbatim as a plain script (no ``if __name__ == "__main__":`` guard).

The one substitution: the snippet's config name ``"cpu_quick"`` (minutes of training) is replaced
by ``"tiny.yaml"``, a config that trains one step of a 4-feature U-Net. Every path the snippet
names (``data/MyCT``, ``scan.nii.gz``, ``masks/``, ``reference_masks/``) is made in the script's
working folder from SYNTHETIC phantoms, so the snippet's text is run as written.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medseg.data.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
SNIPPET_CONFIG = '"cpu_quick"'
"""The text in the README snippet that the test replaces (and nothing else)."""
TINY = {
    "data": {"num_workers": 0, "num_folds": 2},
    "model": {"options": {"base_features": 4, "max_features": 8}},
    "augment": {"enabled": False},
    "train": {"device": "cpu", "num_threads": 1, "max_epochs": 1, "iterations_per_epoch": 1, "val_every": 1},
}

pytestmark = pytest.mark.slow


def readme_snippet() -> str:
    """The README's only ```python block."""
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(encoding="utf-8"), re.M | re.S)
    assert len(blocks) == 1, f"README.md has {len(blocks)} python blocks; this test runs exactly one"
    return blocks[0]


def run_script(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` as a script file run by this Python (the project's .venv/bin/python under `make test`)."""
    script = cwd / "script.py"
    script.write_text(code, encoding="utf-8")
    return subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A folder holding every path the snippet names, plus tiny.yaml."""
    write_synthetic_dataset(tmp_path / "data" / "MyCT", num_cases=4, seed=0, shape=(24, 20, 16))
    test = write_synthetic_dataset(tmp_path / "test", layout="plain", num_cases=3, seed=1, shape=(24, 20, 16))
    images = sorted((test / "images").glob("*.nii.gz"))
    shutil.copy(images[0], tmp_path / "scan.nii.gz")
    shutil.copytree(test / "labels", tmp_path / "reference_masks")
    shutil.copytree(test / "labels", tmp_path / "masks")  # "predictions": 3 cases, so evaluate scores them in parallel
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY), encoding="utf-8")
    return tmp_path


def test_readme_python_snippet_runs_as_a_plain_script_and_shows_progress(workdir):
    code = readme_snippet()
    assert code.count(SNIPPET_CONFIG) == 1, f"the snippet no longer names {SNIPPET_CONFIG}; update this test"
    result = run_script(code.replace(SNIPPET_CONFIG, '"tiny.yaml"'), workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (workdir / "scan_mask.nii.gz").is_file()
    assert (workdir / "runs" / "MyCT_unet_3d" / "fold_0" / "model").is_dir()
    # the progress medseg train prints on the CLI, here from Python with no logging configured
    assert re.search(r"^checking .*MyCT \(4 cases\)", result.stderr, re.M)
    assert re.search(r"^epoch 1/1: loss ", result.stderr, re.M)


def test_train_is_silent_with_verbose_false_and_leaves_configured_logging_alone(workdir):
    code = (
        "import logging, sys\n"
        "import medseg\n"
        "medseg.train('data/MyCT', 'tiny.yaml', output_dir='quiet', verbose=False)\n"
        "print('--- configured ---', file=sys.stderr)\n"
        "logging.basicConfig(level=logging.INFO, format='CALLER %(name)s %(message)s')\n"
        "medseg.train('data/MyCT', 'tiny.yaml', output_dir='configured')\n"
    )
    result = run_script(code, workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    quiet, configured = result.stderr.split("--- configured ---\n")
    assert not re.search(r"epoch \d+/\d+: loss", quiet)
    epoch_lines = [line for line in configured.splitlines() if re.search(r"epoch 1/1: loss", line)]
    assert len(epoch_lines) == 1 and epoch_lines[0].startswith("CALLER medseg.training.trainer ")  # once, theirs


def test_evaluate_with_workers_runs_in_an_unguarded_script(workdir):
    code = (
        "import medseg\n"
        "report = medseg.evaluate('masks/', 'reference_masks/', num_workers=2)\n"
        "print(len(report.cases))\n"
    )
    result = run_script(code, workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["3"]
