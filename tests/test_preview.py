"""The preview PNG: legend volumes, crop to the body, thin series, orientation letters, slice choice."""

from __future__ import annotations

import struct

import nibabel as nib
import numpy as np
import pytest
from conftest import require_shared_data

from medseg.inference.preview import (
    _panel_2d,
    _panels_3d,
    best_slices,
    body_box,
    crop_box,
    legend_entries,
    plane_layout,
    render_preview,
    thin_axes,
)
from medseg.inference.stats import label_statistics
from medseg.io.geometry import Geometry


def _geometry(shape, spacing=(1.0, 1.0, 1.0), code="RAS") -> Geometry:
    """A grid whose array axes point along ``code`` (e.g. LPS), with the given spacing."""
    ornt = nib.orientations.axcodes2ornt(tuple(code))
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for i, (axis, sign) in enumerate(ornt):
        affine[int(axis), i] = sign * spacing[i]
    affine[:3, 3] = [-10.0, 20.0, 30.0]
    return Geometry(shape=shape, affine=affine)


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


def _boxes(mask: np.ndarray) -> dict[int, tuple[slice, ...]]:
    from scipy import ndimage

    return {v + 1: b for v, b in enumerate(ndimage.find_objects(mask)) if b is not None}


# --------------------------------------------------------------------------- legend


def test_legend_gives_each_structure_volume_in_ml_from_the_spacing():
    mask = np.zeros((20, 20, 20), dtype=np.uint8)
    mask[2:12, 2:12, 2:12] = 1  # 1000 voxels of 1 x 2 x 3 mm = 6 mL
    mask[15:17, 15:17, 15:17] = 3  # 8 voxels = 0.048 mL
    geometry = _geometry(mask.shape, spacing=(1.0, 2.0, 3.0))
    stats = label_statistics(mask, geometry, {0: "background", 1: "liver", 2: "tumour", 3: "cyst"})
    entries, missing = legend_entries(stats)
    assert entries == [(1, "liver  6.00 mL"), (3, "cyst  0.05 mL")]
    assert missing == ["tumour"]


def test_legend_of_2d_images_gives_pixels_and_area_only_with_a_pixel_size():
    rows = [{"label": 1, "name": "lesion", "voxels": 400, "volume_ml": 0.4}]  # 400 mm² = 4 cm²
    assert legend_entries(rows, spatial_dims=2) == ([(1, "lesion  400 px · 4.00 cm²")], [])
    assert legend_entries(rows, spatial_dims=2, physical=False) == ([(1, "lesion  400 px")], [])


# --------------------------------------------------------------------------- crop


def _ct_phantom() -> np.ndarray:
    """Air around a soft-tissue body, and a CT table below it (a separate, smaller part)."""
    image = np.full((80, 70, 40), -1000, dtype=np.int16)
    x, y = np.ogrid[:80, :70]
    image[((x - 40) / 25.0) ** 2 + ((y - 38) / 18.0) ** 2 < 1, 5:35] = 40  # body: x 16-64, y 21-55, z 5-34
    image[10:70, 5:8, :] = 200  # the table, behind the body (low y is posterior in RAS), the whole length
    return image


def test_crop_box_holds_the_body_and_is_smaller_than_a_padded_scan():
    image = _ct_phantom()
    box = body_box(image)
    body = np.argwhere(image == 40)
    for axis, b in enumerate(box):
        assert b.start <= body[:, axis].min() and body[:, axis].max() < b.stop
    assert all(b.stop - b.start < n for b, n in zip(box, image.shape))  # air cropped away on every axis
    assert box[1].start > 8  # the table is a separate, smaller part: left out
    # the labels always stay in view, even outside the body; 10 mm margin at 1 mm spacing
    labelled = {1: (slice(5, 8), slice(66, 69), slice(0, 3))}
    shown = crop_box(image, (1.0, 1.0, 1.0), labelled)
    assert shown[0].start == 0 and shown[1].stop == 70
    assert crop_box(image, (1.0, 1.0, 1.0), {})[0] == slice(box[0].start - 10, box[0].stop + 10)


def test_crop_falls_back_to_the_whole_scan_without_a_body():
    image = np.full((30, 30, 30), -1000.0, dtype=np.float32)
    assert body_box(image, ct=True) == (slice(0, 30),) * 3


# --------------------------------------------------------------------------- thin series


def test_thin_series_lose_their_sagittal_and_coronal_views():
    assert thin_axes(_geometry((64, 64, 5))) == [2]  # 5 slices
    assert thin_axes(_geometry((64, 64, 12), spacing=(1.0, 1.0, 1.5))) == [2]  # 18 mm
    assert thin_axes(_geometry((512, 512, 20), spacing=(0.98, 0.98, 2.0))) == [2]  # 40 mm under a 500 mm field
    assert thin_axes(_geometry((100, 100, 30), spacing=(3.0, 3.0, 3.0))) == []
    image = np.zeros((64, 64, 5), dtype=np.float32)
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[20:30, 20:30, 1:4] = 1
    panels, note = _panels_3d(image, mask, _geometry(image.shape), _boxes(mask), False)
    assert [p.name for p in panels] == ["axial"]
    assert note == "sagittal and coronal views left out: the series is only 5 slices (5 mm) thick"
    thick = np.zeros((40, 40, 40), dtype=np.float32)
    panels, note = _panels_3d(thick, np.zeros(thick.shape, np.uint8), _geometry(thick.shape), {}, False)
    assert [p.name for p in panels] == ["axial", "sagittal", "coronal"] and note == ""
    thin_png, thick_png = (
        render_preview(img, np.zeros(img.shape, np.uint8), _geometry(img.shape)) for img in (image, thick)
    )
    assert _png_size(thin_png)[0] < _png_size(thick_png)[0]  # one panel wide, not three


def test_a_depth_one_volume_and_a_2d_image_render_one_panel():
    image = np.arange(30 * 20, dtype=np.float32).reshape(30, 20, 1)
    mask = (image > 300).astype(np.uint8)
    assert _png_size(render_preview(image, mask, _geometry(image.shape), labels={1: "x"}))[0] > 0
    flat = Geometry(shape=(30, 20), affine=np.diag([-1.0, -1.0, 1.0, 1.0]))  # a PNG's grid: LPS identity
    panel = _panel_2d(image[..., 0], mask[..., 0], flat, _boxes(mask[..., 0]), False)
    # a photo stays upright: display rows are the image's rows (axis 1), columns its columns (axis 0)
    assert panel.image.shape == (20, 30) and panel.image[0, 1] == image[1, 0, 0] and panel.letters is None
    assert _png_size(render_preview(image[..., 0], mask[..., 0], flat))[0] > 0


# --------------------------------------------------------------------------- orientation


def test_plane_layout_puts_the_patients_right_on_the_left_for_a_flipped_axis():
    # axial slice of a RAS grid: first axis towards R, second towards A
    ras = plane_layout(((0, 1), (1, 1)))
    assert ras.letters == ("R", "L", "A", "P") and ras.transpose and ras.flip_cols and ras.flip_rows
    # the same slice of an LPS grid: no flips needed (index already grows towards L and P)
    lps = plane_layout(((0, -1), (1, -1)))
    assert lps.letters == ("R", "L", "A", "P") and lps.transpose and not lps.flip_cols and not lps.flip_rows
    assert plane_layout(((1, 1), (2, 1))).letters == ("A", "P", "S", "I")  # sagittal: anterior on the left
    assert plane_layout(((2, -1), (0, 1))).letters == ("R", "L", "S", "I")  # coronal, axes swapped


@pytest.mark.parametrize("code", ["RAS", "LPS", "PIR", "LAI", "SRA"])
def test_a_structure_on_the_patients_right_front_top_appears_left_top_in_every_view(code):
    shape = (24, 20, 16)
    geometry = _geometry(shape, code=code)
    ras = nib.orientations.apply_orientation(
        np.zeros(shape), nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(tuple(code)),
                                                         nib.orientations.axcodes2ornt(("R", "A", "S")))
    ).shape
    # a block at the right, anterior, superior corner, found in RAS index space and mapped back
    mask_ras = np.zeros(ras, dtype=np.uint8)
    mask_ras[-5:, -5:, -5:] = 1
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                           nib.orientations.axcodes2ornt(tuple(code)))
    mask = nib.orientations.apply_orientation(mask_ras, back).astype(np.uint8)
    assert mask.shape == shape
    panels, _ = _panels_3d(np.zeros(shape, np.float32), mask, geometry, _boxes(mask), False)
    for panel in panels:
        rows, cols = np.nonzero(panel.mask)
        h, w = panel.mask.shape
        left, right, top, bottom = panel.letters
        assert (top, bottom) in (("A", "P"), ("S", "I")) and rows.mean() < h / 2, (panel.name, panel.letters)
        assert (left, right) in (("R", "L"), ("A", "P")) and cols.mean() < w / 2, (panel.name, panel.letters)


# --------------------------------------------------------------------------- slice choice


def test_the_chosen_slices_hold_the_most_structures_then_the_largest_area():
    mask = np.zeros((30, 30, 30), dtype=np.uint8)
    mask[2:28, 2:28, 3] = 1  # a large single structure on z = 3
    mask[5:10, 5:10, 20] = 1  # two small ones together on z = 20
    mask[12:15, 12:15, 20] = 2
    assert best_slices(mask, _boxes(mask))[2] == 20
    assert best_slices(np.zeros_like(mask), {}) == [15, 15, 15]


def test_preview_of_a_real_lps_ct_angiography_with_its_masks():
    from medseg.io import read_volume

    folder = require_shared_data("ct_contrast_C")
    volume = read_volume(folder / "ct.nii.gz")
    mask = np.zeros(volume.geometry.shape, dtype=np.uint8)
    mask[read_volume(folder / "aorta.nii.gz").array[0] > 0] = 1
    mask[read_volume(folder / "vertebrae_T12.nii.gz").array[0] > 0] = 2
    panels, note = _panels_3d(volume.array[0], mask, volume.geometry, _boxes(mask), True)
    assert note == "" and [p.name for p in panels] == ["axial", "sagittal", "coronal"]
    assert set(np.unique(panels[0].mask)) == {0, 1, 2}  # the axial slice shows the aorta and T12
    png = render_preview(volume.array[0], mask, volume.geometry, labels={1: "aorta", 2: "T12"}, title="C")
    assert _png_size(png) == (1200, pytest.approx(1000, abs=150))


# --------------------------------------------------------------------------- TensorBoard overlay


def test_tensorboard_overlay_is_upright_radiological_coloured_per_class_and_enlarged():
    import torch

    from medseg.inference.dicom_outputs import structure_colour
    from medseg.training.trainer import _overlay

    image = torch.zeros(1, 32, 24, 8)  # RAS plan grid: x towards R, y towards A
    label = np.zeros((32, 24, 8), dtype=np.int64)
    label[26:30, 18:22, 4] = 1  # right, anterior
    label[2:6, 2:6, 4] = 2  # left, posterior
    rgb = _overlay(image, label, label.copy())
    assert rgb.dtype == np.uint8 and rgb.shape[0] >= 256  # 24 rows enlarged 11x
    factor = rgb.shape[0] // 24
    reference = rgb[:, 32 * factor + 4 : 64 * factor + 4]  # the middle panel
    colour = {v: np.asarray(structure_colour(v)) for v in (1, 2)}

    def where(value: int) -> np.ndarray:  # filled pixels: 45 % of the colour over black
        return np.argwhere(np.all(np.abs(reference - 0.45 * colour[value]) <= 1, axis=-1)).mean(axis=0)

    (r1, c1), (r2, c2) = where(1), where(2)
    h, w = reference.shape[:2]
    assert r1 < h / 2 and c1 < w / 2  # right-anterior: top left
    assert r2 > h / 2 and c2 > w / 2  # left-posterior: bottom right


def test_the_largest_preview_stays_within_the_size_the_free_space_check_counts():
    from medseg.inference.outputs import PREVIEW_MAX_BYTES

    image = np.zeros((20, 30, 200), dtype=np.float32)  # tall: 200 mm high, 20 mm wide
    mask = np.zeros(image.shape, dtype=np.uint8)
    labels = {}
    for v in range(1, 100):  # 99 structures with long names
        mask[v % 20, v % 30, v] = v
        labels[v] = f"structure_with_a_rather_long_anatomical_name_{v}"
    png = render_preview(image, mask, _geometry(image.shape), labels=labels)
    width, height = _png_size(png)
    assert width <= 1200 and height <= 1600 and width * height * 4 + 65536 <= PREVIEW_MAX_BYTES
