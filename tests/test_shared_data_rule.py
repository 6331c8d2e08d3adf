"""Tests that need the real scans fail under CI when the scans are missing, and skip (with the reason) elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import SHARED_DATA_ENV

TESTS = Path(__file__).resolve().parent

NEEDS_SCANS = textwrap.dedent(
    """
    from conftest import require_shared_data, shared_data  # noqa: F401 (shared_data is the fixture)


    def test_through_the_fixture(shared_data):
        assert shared_data.is_dir()


    def test_through_a_direct_call():
        assert require_shared_data("ct_dicom_series").is_dir()
    """
)


def run_pytest(tmp_path: Path, data: Path, ci: str | None) -> subprocess.CompletedProcess:
    """pytest in a subprocess on a two-test file that needs the scans, with the scans' folder at ``data``."""
    (tmp_path / "test_needs_scans.py").write_text(NEEDS_SCANS)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env.update({SHARED_DATA_ENV: str(data), "PYTHONPATH": str(TESTS)})
    if ci is not None:
        env["CI"] = ci
    cmd = [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
           str(tmp_path / "test_needs_scans.py")]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_scans_fail_under_ci(tmp_path, ci):
    proc = run_pytest(tmp_path, tmp_path / "missing", ci)
    assert proc.returncode == 1, proc.stdout
    # a fixture that fails is reported as an error of the test, a direct call as a failure; both fail the run
    assert "1 failed, 1 error" in proc.stdout and "skipped" not in proc.stdout, proc.stdout
    assert f"real scans not found at {tmp_path / 'missing'}" in proc.stdout
    assert "CI is set, so this is a failure, not a skip" in proc.stdout


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_missing_scans_skip_with_the_reason_on_a_users_machine(tmp_path, ci):
    proc = run_pytest(tmp_path, tmp_path / "missing", ci)
    assert proc.returncode == 0, proc.stdout
    assert "2 skipped" in proc.stdout and "failed" not in proc.stdout, proc.stdout
    assert f"real scans not found at {tmp_path / 'missing' / 'ct_dicom_series'}" in proc.stdout  # -rA shows why


def test_scans_found_through_the_override_pass_under_ci(tmp_path):
    data = tmp_path / "scans"
    (data / "ct_dicom_series").mkdir(parents=True)
    proc = run_pytest(tmp_path, data, "true")
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout
