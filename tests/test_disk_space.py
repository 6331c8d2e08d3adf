"""A full disk is refused before any computing, and a write that still fails leaves nothing partial.

The free-space check is made to fail without filling a disk: by asking for more
than the real free space (measured with ``shutil.disk_usage`` in the test), or by
a scan whose header declares more voxels than the disk could hold. A real
``ENOSPC`` comes from ``/dev/full`` and from a tiny tmpfs in a private mount
namespace (where the system allows one).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_affine, sphere_mask
from inference_support import make_plan, one_error_line, save_model

from medseg.cli import main
from medseg.errors import OutputWriteError
from medseg.inference.jobs import collect_inputs
from medseg.inference.outputs import OutputSpec, check_output_space, output_bytes
from medseg.inference.segmenter import Segmenter
from medseg.io.atomic import atomic_path
from medseg.io.writers import check_free_space, write_mask, write_volume

SHAPE = (26, 22, 14)
TIB = 1 << 40


def _scan(path: Path) -> Path:
    image = np.zeros(SHAPE, dtype=np.int16)
    image[1:25, 1:21, 1:13] = 30
    image[sphere_mask(SHAPE, center=(12, 10, 6), radius=5.0, spacing=(0.8, 1.1, 2.5))] = 800
    nib.save(nib.Nifti1Image(image, make_affine("PIR")), path)
    return path


def _header_only_scan(path: Path, voxels: int) -> Path:
    """A small .nii.gz whose NIfTI-2 header declares at least ``voxels`` int16 voxels (and holds none)."""
    side = round(voxels ** (1 / 3)) + 1
    header = nib.Nifti2Header()
    header.set_data_shape((side, side, side))
    header.set_data_dtype(np.int16)
    header.set_sform(np.diag([0.8, 0.8, 2.5, 1.0]), code=1)
    header.set_qform(np.diag([0.8, 0.8, 2.5, 1.0]), code=1)
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4)
    return path


@pytest.fixture
def model(tmp_path):
    return save_model(tmp_path / "model", make_plan(target_spacing=(1.2, 1.2, 2.5)))


def test_check_free_space_refuses_more_than_is_free_and_names_the_folder(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    target = tmp_path / "not_yet" / "out"  # a folder to be created: its existing parent is measured
    with pytest.raises(OutputWriteError, match=r"not enough free space in .*not_yet/out: the masks need up to") as info:
        check_free_space(target, free + TIB, what="the masks")
    message = str(info.value)
    assert "is free" in message and "pass another output folder (-o)" in message
    assert "\n" not in message
    assert not (tmp_path / "not_yet").exists()  # checking creates nothing
    assert check_free_space(target, 1) > 0


def test_infer_refuses_a_scan_whose_outputs_cannot_fit_before_reading_it(tmp_path, model, capsys):
    free = shutil.disk_usage(tmp_path).free
    scan = _header_only_scan(tmp_path / "huge.nii.gz", free + TIB)  # the mask alone: 1 byte per voxel
    out = tmp_path / "out"
    assert main(["infer", str(scan), "-m", str(model), "-o", str(out)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"medseg infer: OutputWriteError: not enough free space in {out}: the outputs of huge_mask")
    assert "mask " in line and "is free" in line
    assert not out.exists()


def test_segmenter_job_refuses_before_computing_and_counts_pending_writes(tmp_path, model):
    seg = Segmenter.load(model, device="cpu")
    free = shutil.disk_usage(tmp_path).free
    scan = _header_only_scan(tmp_path / "huge.nii.gz", free + TIB)
    with pytest.raises(OutputWriteError, match=r"not enough free space in .*out: the outputs of huge_mask.nii.gz"):
        seg.predict_many([scan], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the per-case check before the network adds the outputs still being written
    paths = OutputSpec(tmp_path / "out").plan(collect_inputs([_scan(tmp_path / "small.nii.gz")]))[0]
    check_output_space(paths, SHAPE, seg.plan)
    with pytest.raises(OutputWriteError, match=r"plus [\d.]+ TiB of earlier outputs still being written\) need up to [\d.]+ TiB"):
        check_output_space(paths, SHAPE, seg.plan, pending=free + TIB)


def test_output_size_bounds_hold_for_incompressible_outputs(tmp_path, model, rng):
    scan = _scan(tmp_path / "scan.nii.gz")
    seg = Segmenter.load(model, device="cpu")
    written = seg.predict_many([scan], tmp_path / "out", probabilities=True, statistics=True, preview=True)[0]
    bounds = output_bytes(written, SHAPE, seg.plan)
    assert set(bounds) == set(written)
    for kind, path in written.items():
        assert path.stat().st_size <= bounds[kind], kind
    # noise does not compress: the NIfTI bounds must hold for it too (gzip even grows such data)
    from medseg.io import read_volume

    geometry = read_volume(scan).geometry
    voxels = int(np.prod(SHAPE))
    noise = write_mask(rng.integers(0, 256, SHAPE, dtype=np.uint8), geometry, tmp_path / "n.nii.gz")
    k = seg.plan.num_classes
    probs = write_volume(rng.integers(0, 256, (k, *SHAPE), dtype=np.uint8), geometry, tmp_path / "p.nii.gz")
    assert voxels < noise.stat().st_size <= bounds["mask"]
    assert k * voxels < probs.stat().st_size <= bounds["probabilities"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_enospc_during_a_write_removes_the_temporary_file(tmp_path):
    target = tmp_path / "scan_mask.nii.gz"

    def write_until_the_disk_is_full() -> None:
        with atomic_path(target) as temp, open(temp, "wb") as out:
            out.write(b"\0" * 4096)  # a partial temporary file exists ...
            with open("/dev/full", "wb") as full:  # ... when the disk reports ENOSPC
                full.write(b"\0" * 4096)

    with pytest.raises(OutputWriteError) as info:
        write_until_the_disk_is_full()
    message = str(info.value)
    assert message.startswith(f"writing {target} failed") and "No space left on device" in message
    assert "\n" not in message and "nothing was written" in message
    assert os.listdir(tmp_path) == []


def _tiny_tmpfs_available(folder: Path) -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = subprocess.run(
        [unshare, "--mount", "--map-root-user", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {folder}"],
        capture_output=True,
    )
    return probe.returncode == 0


def test_a_real_full_disk_during_write_mask_leaves_no_partial_file(tmp_path):
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if not _tiny_tmpfs_available(mount):
        pytest.skip("unprivileged mount namespaces (unshare -rm) are not available here")
    script = textwrap.dedent(
        f"""
        import json, os, numpy as np
        from medseg.errors import OutputWriteError
        from medseg.io.geometry import Geometry
        from medseg.io.writers import write_mask
        noise = np.random.default_rng(0).integers(0, 256, (80, 80, 40), dtype=np.uint8)  # 256 KB > 64 KiB
        try:
            write_mask(noise, Geometry(shape=noise.shape, affine=np.eye(4)), {str(mount / 'case_mask.nii.gz')!r})
            print(json.dumps({{"error": None}}))
        except OutputWriteError as err:
            print(json.dumps({{"error": str(err), "left": os.listdir({str(mount)!r})}}))
        """
    )
    result = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c",
         f"mount -t tmpfs -o size=64k tmpfs {mount} && {sys.executable} -c \"$0\"", script],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["error"] is not None and "No space left on device" in report["error"]
    assert "\n" not in report["error"]
    assert report["left"] == []
