"""medseg.io.atomic: all or nothing, no-clobber on request, no temporary file left behind."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from medseg.errors import OutputExistsError, OutputWriteError
from medseg.io.atomic import atomic_dir, atomic_path, write_bytes_atomic, write_json_atomic, write_text_atomic


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_text_creates_the_file_and_leaves_no_temporary(tmp_path):
    out = write_text_atomic("a,b\r\n1,2\n", tmp_path / "t.csv")
    assert out == tmp_path / "t.csv"
    assert out.read_bytes() == b"a,b\r\n1,2\n"  # exactly as given: no newline translation
    assert names(tmp_path) == ["t.csv"]


def test_written_file_has_normal_permissions_not_private_temp_ones(tmp_path):
    old = os.umask(0o022)
    try:
        out = write_bytes_atomic(b"x", tmp_path / "f.bin")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


def test_json_writes_numpy_values_and_paths(tmp_path):
    out = write_json_atomic({"a": np.arange(3), "b": np.float32(0.5), "p": tmp_path}, tmp_path / "x.json")
    assert json.loads(out.read_text()) == {"a": [0, 1, 2], "b": 0.5, "p": str(tmp_path)}
    assert out.read_text().endswith("}\n")


def test_existing_file_is_kept_without_overwrite(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(OutputExistsError, match=r"x\.json already exists; pass overwrite=True \(CLI: --overwrite\)"):
        write_json_atomic({"new": 1}, target)
    assert target.read_text() == "old" and names(tmp_path) == ["x.json"]
    write_json_atomic({"new": 1}, target, overwrite=True)
    assert json.loads(target.read_text()) == {"new": 1} and names(tmp_path) == ["x.json"]


def test_file_that_appears_while_writing_is_not_clobbered(tmp_path):
    target = tmp_path / "race.txt"

    def write_while_another_process_wins_the_race():
        with atomic_path(target) as temp:
            temp.write_text("mine")
            target.write_text("theirs")

    with pytest.raises(OutputExistsError, match=r"race\.txt already exists"):
        write_while_another_process_wins_the_race()
    assert target.read_text() == "theirs" and names(tmp_path) == ["race.txt"]


def test_error_while_writing_removes_the_temporary_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")

    def fail_half_way():
        with atomic_path(target, overwrite=True) as temp:
            temp.write_bytes(b"half")
            raise ValueError("serialisation failed half way")

    with pytest.raises(ValueError, match="serialisation failed half way"):
        fail_half_way()
    assert target.read_bytes() == b"old" and names(tmp_path) == ["state.pt"]


def test_os_error_while_writing_becomes_output_write_error_naming_the_file(tmp_path):
    target = tmp_path / "out.json"

    def fill_the_disk():
        with atomic_path(target) as temp:
            temp.write_bytes(b"half")
            raise OSError(28, "No space left on device")  # what a full disk raises mid-write

    with pytest.raises(OutputWriteError, match=r"writing .*out\.json failed \(.*No space left on device\); nothing was"):
        fill_the_disk()
    assert not target.exists() and names(tmp_path) == []


def test_missing_folder_is_named_with_the_fix(tmp_path):
    with pytest.raises(OutputWriteError, match=r"the folder .*no_such_dir does not exist; create it first"):
        write_text_atomic("x", tmp_path / "no_such_dir" / "f.txt")


def test_folder_that_refuses_new_files_is_reported():
    # /proc refuses new files even for root
    with pytest.raises(OutputWriteError, match=r"the folder /proc does not accept new files"):
        write_text_atomic("x", "/proc/medseg-test.txt")


def test_atomic_dir_builds_a_folder_and_replaces_an_old_one_without_leftovers(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as temp:
        (temp / "a.txt").write_text("1")
        assert not target.exists()  # nothing visible before the end
    assert names(target) == ["a.txt"] and target.stat().st_mode & 0o777 == 0o755

    def build_again():
        with atomic_dir(target) as temp:
            (temp / "b.txt").write_text("2")

    with pytest.raises(OutputExistsError, match=r"model already exists; pass overwrite=True"):
        build_again()
    with atomic_dir(target, overwrite=True) as temp:
        (temp / "b.txt").write_text("2")
    assert names(target) == ["b.txt"] and names(tmp_path) == ["model"]


def test_atomic_dir_failure_keeps_the_old_folder_and_removes_the_temporary(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def export_fails():
        with atomic_dir(target, overwrite=True) as temp:
            (temp / "half.onnx").write_bytes(b"\0")
            raise RuntimeError("exporter failed")

    with pytest.raises(RuntimeError, match="exporter failed"):
        export_fails()
    assert names(target) == ["old.txt"] and names(tmp_path) == ["export"]
