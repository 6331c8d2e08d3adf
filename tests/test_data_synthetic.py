"""Synthetic phantoms: plausible intensities, nested labels, varied geometry, and honest labelling."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

import medseg.data.synthetic as synthetic
from medseg.data.synthetic import make_phantom, write_synthetic_dataset


def test_docstring_says_it_is_synthetic():
    assert "SYNTHETIC" in synthetic.__doc__ and "NOT real patient data" in synthetic.__doc__


def test_ct_phantom_has_hu_like_tissues_and_tumours_inside_the_organ():
    p = make_phantom("ct", shape=(40, 40, 24), seed=5, num_tumours=2, orientation="RAS")
    hu = p.image[0]
    assert p.image.dtype == np.int16 and p.label.dtype == np.uint8
    assert hu[0, 0].max() < -900  # air in the corners, outside the body
    assert 40 < np.median(hu[p.label == 1]) < 80
    assert np.median(hu[p.label == 2]) < np.median(hu[p.label == 1])  # hypo-dense tumour
    organ_or_tumour = p.label > 0
    tumour = p.label == 2
    assert tumour.any() and np.all(organ_or_tumour[tumour])
    assert p.labels == {0: "background", 1: "organ", 2: "tumour"}


def test_mr_phantom_has_four_contrasts_and_nested_tumour_regions():
    p = make_phantom("mr", shape=(40, 40, 24), seed=2, channels=4, orientation="LPS")
    assert p.image.shape == (4, 40, 40, 24) and p.channel_names == ["FLAIR", "T1w", "T1gd", "T2w"]
    assert set(np.unique(p.label)) == {0, 1, 2, 3}
    t1gd = p.image[2]
    assert t1gd[p.label == 3].mean() > t1gd[p.label == 1].mean()  # enhancing ring is bright on T1gd
    assert p.image.min() >= 0 and (p.image[:, p.label == 0] == 0).any()  # zero background outside the head


def test_spacing_is_anisotropic_and_orientations_vary():
    phantoms = [make_phantom("ct", shape=(24, 24, 12), seed=s) for s in range(12)]
    spacings = np.array([p.spacing for p in phantoms])
    assert np.all(spacings.max(axis=1) / spacings.min(axis=1) > 1.1)
    codes = {"".join(nib.aff2axcodes(p.affine)) for p in phantoms}
    assert len(codes) >= 3
    assert any(abs(abs(p.affine[:3, :3] / np.linalg.norm(p.affine[:3, :3], axis=0)).max() - 1) > 1e-3
               for p in phantoms)  # at least one oblique


def test_same_seed_same_phantom():
    a, b = make_phantom("mr", seed=9, shape=(20, 20, 12)), make_phantom("mr", seed=9, shape=(20, 20, 12))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.affine, b.affine)


def test_writer_refuses_a_non_empty_folder_and_bad_arguments(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        write_synthetic_dataset(tmp_path / "x")
    with pytest.raises(ValueError, match="channels must be 1"):
        make_phantom("ct", channels=4)
