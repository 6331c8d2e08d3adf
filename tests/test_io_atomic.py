"""medseg.io.atomic: all or nothing, no-clobber on request, no temporary file left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from medseg.errors import OutputExistsError, OutputWriteError
from medseg.io import atomic
from medseg.io.atomic import (
    STALE_TEMP_SECONDS,
    atomic_dir,
    atomic_path,
    clean_stale_temps,
    refuse_output_over_inputs,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


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
        (temp / "a.txt").write_text("3")  # overwrite replaces a folder that holds only what is written again
        (temp / "b.txt").write_text("2")
    assert names(target) == ["a.txt", "b.txt"] and names(tmp_path) == ["model"]
    assert (target / "a.txt").read_text() == "3"


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


# --------------------------------------------------------------------------- overwrite never deletes other contents
def test_overwrite_refuses_a_folder_holding_entries_it_does_not_write(tmp_path):
    target = tmp_path / "export"
    (target / "notes").mkdir(parents=True)
    (target / "model.onnx").write_bytes(b"old")
    (target / "notes" / "mine.txt").write_text("the user's own file")

    def export_again():
        with atomic_dir(target, overwrite=True) as temp:
            (temp / "model.onnx").write_bytes(b"new")

    with pytest.raises(OutputExistsError, match=r"export holds 2 entries that this write does not produce "
                       r"\(notes, notes/mine\.txt\); --overwrite replaces only the files medseg writes there"):
        export_again()
    assert (target / "model.onnx").read_bytes() == b"old"
    assert (target / "notes" / "mine.txt").read_text() == "the user's own file"
    assert names(tmp_path) == ["export"]  # no temporary folder left


def test_overwrite_may_replace_the_names_the_writer_declares_as_its_own(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "model.torchscript.pt").write_bytes(b"earlier export")
    with atomic_dir(target, overwrite=True, also_replaces=["model.torchscript.pt"]) as temp:
        (temp / "model.onnx").write_bytes(b"new")
    assert names(target) == ["model.onnx"] and names(tmp_path) == ["export"]


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_overwrite_never_replaces_a_file_or_link_by_a_folder(tmp_path, kind):
    target = tmp_path / "model"
    if kind == "file":
        target.write_text("a file")
    else:
        (tmp_path / "real").mkdir()
        target.symlink_to(tmp_path / "real")

    def build():
        with atomic_dir(target, overwrite=True) as temp:
            (temp / "a.txt").write_text("1")

    with pytest.raises(OutputExistsError, match=rf"model exists and is a {'file' if kind == 'file' else 'symbolic link'}"):
        build()
    assert os.path.lexists(target) and names(tmp_path) == (["model"] if kind == "file" else ["model", "real"])


@pytest.mark.parametrize(
    ("output", "relation"),
    [("run", "is"), ("run/fold_0/model/sub", "is inside"), (".", "contains"), ("link_to_run", "is")],
)
def test_an_output_over_an_input_is_refused(tmp_path, output, relation):
    run = tmp_path / "run"
    (run / "fold_0" / "model").mkdir(parents=True)
    (tmp_path / "link_to_run").symlink_to(run)
    with pytest.raises(OutputExistsError, match=rf"export folder .* {relation} the model folder .*; medseg never writes"):
        refuse_output_over_inputs(
            tmp_path / output, {"model folder": run / "fold_0" / "model" if relation != "is" else run},
            what="export folder",
        )


def test_an_output_beside_or_around_inputs_is_allowed_when_asked(tmp_path):
    data = tmp_path / "data" / "Spleen"
    data.mkdir(parents=True)
    refuse_output_over_inputs(tmp_path / "data" / "Spleen_run", {"dataset folder": data})  # a sibling whose name
    refuse_output_over_inputs(tmp_path / "data", {"dataset folder": data}, around=False)  # starts alike is not inside
    with pytest.raises(OutputExistsError, match="contains the dataset folder"):
        refuse_output_over_inputs(tmp_path / "data", {"dataset folder": data})


# --------------------------------------------------------------------------- leftovers of killed writes
KILLED_WRITER = """
import os, signal, sys
from medseg.io.atomic import atomic_dir, atomic_path
folder = sys.argv[1]
with atomic_dir(os.path.join(folder, "model"), overwrite=True) as tmp:
    with atomic_path(os.path.join(folder, "checkpoint_last.pt"), overwrite=True) as t:
        open(t, "wb").write(b"x" * 1000)
        open(os.path.join(tmp, "weights"), "wb").write(b"w")
        os.kill(os.getpid(), signal.SIGKILL)
"""


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


def test_temporaries_of_a_killed_writer_are_removed_on_the_next_write(tmp_path):
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    left = names(tmp_path)
    assert len(left) == 2 and all(n.startswith((".checkpoint_last.pt.", ".model.")) for n in left), left
    for name in left:
        _age(tmp_path / name, 2 * STALE_TEMP_SECONDS)
    # what medseg must not touch: other hidden files, a temporary of a live writer, a fresh leftover
    keep = [".notes.tmp", ".x.0123abcd.tmp.bak", f".live.{os.getpid()}-0123abcd.tmp", ".fresh.99999999-0123abcd.tmp"]
    for name in keep:
        (tmp_path / name).write_text("keep")
    _age(tmp_path / keep[2], 3600)
    (tmp_path / ".older_version.0123abcd.tmp").write_text("legacy leftover")  # medseg 0.1.0 naming, 2 hours old
    _age(tmp_path / ".older_version.0123abcd.tmp", 7200)
    write_json_atomic({"epoch": 1}, tmp_path / "state.json")
    assert names(tmp_path) == sorted([*keep, "state.json"])


def test_a_folder_moved_aside_by_an_interrupted_swap_is_put_back(tmp_path):
    aside = tmp_path / ".model.99999999-0123abcd.old"  # a writer killed between its two renames
    aside.mkdir()
    (aside / "model.json").write_text("{}")
    _age(aside, 2 * STALE_TEMP_SECONDS)
    assert clean_stale_temps(tmp_path) == [aside]
    assert names(tmp_path) == ["model"] and names(tmp_path / "model") == ["model.json"]


def test_a_failed_commit_leaves_no_temporary(tmp_path):
    (tmp_path / "out.json").mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(OutputWriteError, match=r"writing .*out\.json failed"):
        write_json_atomic({"a": 1}, tmp_path / "out.json", overwrite=True)
    with pytest.raises(OutputExistsError, match=r"out\.json already exists; pass overwrite=True"):
        write_json_atomic({"a": 1}, tmp_path / "out.json")
    assert names(tmp_path) == ["out.json"] and names(tmp_path / "out.json") == []


# --------------------------------------------------------------------------- swaps and no-clobber without windows
def _exchange_supported(tmp_path) -> bool:
    a, b = tmp_path / "probe_a", tmp_path / "probe_b"
    a.mkdir()
    b.mkdir()
    try:
        return atomic._renameat2(a, b, atomic._RENAME_EXCHANGE)
    finally:
        a.rmdir()
        b.rmdir()


def test_replacing_a_folder_never_leaves_its_path_missing(tmp_path, monkeypatch):
    if not _exchange_supported(tmp_path):
        pytest.skip("this file system has no renameat2(RENAME_EXCHANGE): the documented two-rename fallback applies")
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    missing_during_a_rename = []
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def spy(src, dst, *args, _real=real, **kwargs):
            missing_during_a_rename.append(not os.path.lexists(target))
            return _real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, spy)
    with atomic_dir(target, overwrite=True) as temp:
        (temp / "weights").write_text("new")
    monkeypatch.undo()
    assert not any(missing_during_a_rename)
    assert (target / "weights").read_text() == "new" and names(tmp_path) == ["model"]


def test_no_clobber_without_hard_links_keeps_a_file_created_after_the_check(tmp_path, monkeypatch):
    if not _exchange_supported(tmp_path):
        pytest.skip("this file system has no renameat2: the documented check-then-rename fallback applies")
    target = tmp_path / "mask.nii.gz"

    def no_hard_links(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")  # what FAT/SMB mounts answer to link()

    monkeypatch.setattr(os, "link", no_hard_links)
    # another process creates the target right after our existence check: make every check miss it
    monkeypatch.setattr(os.path, "lexists", lambda p: False)
    monkeypatch.setattr(type(target), "exists", lambda self, **kw: False)

    def write_while_another_process_wins_the_race():
        with atomic_path(target) as temp:
            temp.write_text("mine")
            target.write_text("theirs")

    with pytest.raises(OutputExistsError, match=r"mask\.nii\.gz already exists"):
        write_while_another_process_wins_the_race()
    monkeypatch.undo()
    assert target.read_text() == "theirs" and names(tmp_path) == ["mask.nii.gz"]


# --------------------------------------------------------------------------- permissions
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_every_written_file_gets_the_umask_mode_even_if_written_privately(tmp_path, umask):
    from safetensors.numpy import save_file

    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "f.bin") as temp:
            temp.unlink()
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT, 0o600))  # a library that makes its own private file
        with atomic_dir(tmp_path / "model") as temp:
            save_file({"w": np.zeros(2, np.float32)}, str(temp / "weights.safetensors"))  # safetensors writes 0600
            (temp / "sub").mkdir(mode=0o700)
            (temp / "sub" / "model.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    for file in [tmp_path / "model" / "weights.safetensors", tmp_path / "model" / "sub" / "model.json"]:
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file
    for folder in [tmp_path / "model", tmp_path / "model" / "sub"]:
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, folder
