"""2D images (PNG/TIFF/JPEG) end to end: reading rules, refusals, dataset layouts, check, infer, evaluate, training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from inference_support import make_plan, one_error_line, save_model
from PIL import Image

import medseg
from medseg.cli import main
from medseg.data import check_dataset, scan_dataset
from medseg.data.folders import read_case
from medseg.errors import GeometryError, OutputExistsError, ScanReadError
from medseg.io import read_volume, write_mask
from medseg.io.images2d import image_geometry

H, W = 20, 30  # rows, columns: deliberately different so that a transposed axis shows


def _rgb(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


# --------------------------------------------------------------------------- reading


def test_rgb_png_is_three_channels_on_a_width_by_height_unit_grid(tmp_path):
    pixels = _rgb()
    Image.fromarray(pixels).save(tmp_path / "x.png")
    volume = read_volume(tmp_path / "x.png")
    assert volume.spatial_dims == 2 and volume.num_channels == 3
    assert volume.geometry.shape == (W, H)  # (x = column, y = row), as SimpleITK reads a PNG
    np.testing.assert_array_equal(volume.array[:, 7, 3], pixels[3, 7])  # array[c, x, y] == pixels[y, x, c]
    assert volume.geometry.spacing == (1.0, 1.0)
    np.testing.assert_array_equal(volume.geometry.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert volume.meta["format"] == "png" and volume.name == "x"
    # the same grid SimpleITK gives the file
    itk = sitk.ReadImage(str(tmp_path / "x.png"))
    assert tuple(itk.GetSize()) == volume.geometry.shape


def test_16_bit_grey_png_and_tiff_keep_their_values(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 65536, (H, W), dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "g.png")
    tifffile.imwrite(tmp_path / "g.tif", pixels)
    for name in ("g.png", "g.tif"):
        volume = read_volume(tmp_path / name)
        assert volume.array.dtype == np.uint16 and volume.num_channels == 1
        np.testing.assert_array_equal(volume.array[0].T, pixels)


def test_16_bit_colour_png_keeps_all_16_bits(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 65536, (H, W, 3), dtype=np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=True), str(tmp_path / "c16.png"))
    volume = read_volume(tmp_path / "c16.png")
    assert volume.array.dtype == np.uint16
    np.testing.assert_array_equal(np.transpose(volume.array, (2, 1, 0)), pixels)  # Pillow alone would keep 8 bits


def test_rgb_tiff_is_three_channels_interleaved_or_planar(tmp_path):
    pixels = _rgb(3)
    tifffile.imwrite(tmp_path / "x.tiff", pixels, photometric="rgb")
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(pixels, -1, 0), photometric="rgb", planarconfig="separate")
    for name in ("x.tiff", "planar.tif"):
        np.testing.assert_array_equal(np.transpose(read_volume(tmp_path / name).array, (2, 1, 0)), pixels)


def test_opaque_alpha_is_dropped_and_transparency_refused(tmp_path):
    rgba = np.concatenate([_rgb(), np.full((H, W, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    volume = read_volume(tmp_path / "opaque.png")
    assert volume.num_channels == 3 and volume.meta["alpha_dropped"] is True
    rgba[4, 5, 3] = 128
    Image.fromarray(rgba).save(tmp_path / "see_through.png")
    with pytest.raises(ScanReadError, match=r"see_through.png: 1 pixel\(s\) are \(partly\) transparent"):
        read_volume(tmp_path / "see_through.png")


def test_palette_png_reads_indices_and_is_refused_as_an_image(tmp_path):
    indices = _disc(H, W, 10, 15, 6) * 2
    image = Image.fromarray(indices).convert("P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    image.save(tmp_path / "pal.png")
    volume = read_volume(tmp_path / "pal.png")
    assert volume.meta["palette"] is True
    np.testing.assert_array_equal(volume.array[0].T, indices)  # the indices, not the colours
    with pytest.raises(ScanReadError, match="a palette \\(indexed-colour\\) PNG as image"):
        medseg.io.images2d.refuse_palette_image(volume)


def test_multi_page_tiff_animated_and_truncated_files_are_refused(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((4, H, W), np.uint8), photometric="minisblack")
    with pytest.raises(ScanReadError, match=r"stack.tif: a multi-page TIFF \(4 pages"):
        read_volume(tmp_path / "stack.tif")
    frames = [Image.fromarray(np.full((H, W), v, np.uint8)) for v in (0, 9)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    with pytest.raises(ScanReadError, match=r"anim\.png: an animated image with 2 frames"):
        read_volume(tmp_path / "anim.png")
    Image.fromarray(_rgb()).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ScanReadError, match=r"cut\.png: cannot be read as an image, the file is corrupt, truncated"):
        read_volume(tmp_path / "cut.png")


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize(("name", "top", "dtype"), [("m.png", 3, np.uint8), ("m.png", 300, np.uint16),
                                                     ("m.tif", 300, np.uint16)])
def test_mask_image_round_trip_keeps_size_and_labels(tmp_path, name, top, dtype):
    mask = np.zeros((W, H), np.int64)
    mask[2:9, 3:7] = top
    mask[20, 1] = 1
    path = write_mask(mask, image_geometry(W, H), tmp_path / name)
    if name.endswith(".png"):
        with Image.open(path) as written:
            assert written.size == (W, H)  # PIL: (width, height)
    back = read_volume(path)
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array[0], mask)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_mask_image_refuses_3d_grids_existing_files_and_the_input(tmp_path):
    from medseg.io.geometry import Geometry

    with pytest.raises(GeometryError, match=r"a 3D mask \(4, 4, 4\) cannot be a 2D image; write it as .nii.gz"):
        write_mask(np.zeros((4, 4, 4), np.uint8), Geometry(shape=(4, 4, 4), affine=np.eye(4)), tmp_path / "m.png")
    Image.fromarray(_rgb()).save(tmp_path / "in.png")
    volume = read_volume(tmp_path / "in.png")
    with pytest.raises(OutputExistsError, match="it is the input scan itself"):
        write_mask(np.zeros((W, H), np.uint8), volume, tmp_path / "in.png", overwrite=True)
    write_mask(np.zeros((W, H), np.uint8), volume, tmp_path / "out.png")
    with pytest.raises(OutputExistsError, match=r"out\.png already exists"):
        write_mask(np.ones((W, H), np.uint8), volume, tmp_path / "out.png")
    with pytest.raises(GeometryError, match=r"mask shape \(20, 30\) does not match the scan's spatial shape \(30, 20\)"):
        write_mask(np.zeros((H, W), np.uint8), volume, tmp_path / "t.png")


# --------------------------------------------------------------------------- datasets


def write_png_dataset(root: Path, *, num_cases: int = 6, seed: int = 0) -> Path:
    """nnU-Net 2D layout: RGB imagesTr/CASE_0000.png, integer labelsTr/CASE.png; sizes differ per case."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(num_cases):
        h, w = 36 + 4 * (i % 3), 40 + 2 * i
        label = _disc(h, w, h / 2 + rng.integers(-4, 5), w / 2 + rng.integers(-4, 5), 8 + i % 3)
        label[: h // 5, : w // 5] = 2  # a second class in a corner
        base = np.where(label == 1, 200, np.where(label == 2, 90, 30))
        pixels = np.clip(base[..., None] + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        pixels[..., 2] //= 2  # channels differ
        Image.fromarray(pixels).save(root / "imagesTr" / f"case{i}_0000.png")
        Image.fromarray(label).save(root / "labelsTr" / f"case{i}.png")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, "disc": 1, "corner": 2},
        "numTraining": num_cases,
        "file_ending": ".png",
    }))
    return root


def test_png_cases_are_found_in_the_nnunet_plain_and_list_layouts(tmp_path):
    nnunet = write_png_dataset(tmp_path / "nn", num_cases=3)
    index = scan_dataset(nnunet)
    assert (index.layout, len(index.cases)) == ("nnunet", 3)
    image, label = read_case(index.cases[0])
    assert image.num_channels == 3 and label.num_channels == 1 and image.geometry.shape == label.geometry.shape
    plain = tmp_path / "plain"
    (plain / "images").mkdir(parents=True)
    (plain / "labels").mkdir()
    for i in range(3):
        (plain / "images" / f"x{i}.png").write_bytes((nnunet / "imagesTr" / f"case{i}_0000.png").read_bytes())
        (plain / "labels" / f"x{i}.png").write_bytes((nnunet / "labelsTr" / f"case{i}.png").read_bytes())
    assert scan_dataset(plain).case_ids == ["x0", "x1", "x2"]
    (plain / "dataset.csv").write_text("image,label\nimages/x0.png,labels/x0.png\nimages/x1.png,labels/x1.png\n")
    assert scan_dataset(plain / "dataset.csv").case_ids == ["x0", "x1"]


def test_check_reports_colour_labels_size_mismatch_undeclared_values_and_unreadable_files(tmp_path):
    root = write_png_dataset(tmp_path / "d", num_cases=5)
    assert check_dataset(scan_dataset(root), num_folds=None).ok
    labels = [np.asarray(Image.open(root / "labelsTr" / f"case{i}.png")) for i in range(3)]
    Image.fromarray(np.stack([labels[0] * 100] * 3, axis=-1)).save(root / "labelsTr" / "case0.png")  # colour-coded
    Image.fromarray(labels[1][:-2]).save(root / "labelsTr" / "case1.png")  # 2 rows short
    Image.fromarray(np.where(labels[2] == 1, 7, labels[2]).astype(np.uint8)).save(root / "labelsTr" / "case2.png")
    (root / "imagesTr" / "case3_0000.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "labelsTr" / "case4.png").unlink()
    report = check_dataset(scan_dataset(root), num_folds=None)
    text = report.format()
    assert "case 'case0': labelsTr/case0.png: the label image has 3 colour channels (RGB)" in text
    assert "case 'case1': label size 42 x 38 != image size 42 x 40 (width x height)" in text
    assert "case 'case2': label values {7} not in dataset.json labels {0, 1, 2}" in text
    assert "case 'case3': cannot read the image: imagesTr/case3_0000.png: cannot be read as an image" in text
    assert "case 'case4': label file labelsTr/case4.png does not exist" in text
    assert len(report.problems) == 5


def test_check_refuses_jpeg_labels(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.fromarray(_rgb()).save(root / "images" / "a.png")
    Image.fromarray(_disc(H, W, 10, 15, 5)).save(root / "labels" / "a.jpg")
    text = check_dataset(scan_dataset(root), num_folds=None).format()
    assert "case 'a': the label is a JPEG image: JPEG compression is lossy" in text


def test_check_cli_lists_a_size_mismatch_and_exits_2(tmp_path, capsys):
    root = write_png_dataset(tmp_path / "d", num_cases=2)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "labelsTr" / "case1.png")
    assert main(["check", str(root), "--folds", "2"]) == 2
    assert "label size 5 x 5 != image size 42 x 40 (width x height)" in capsys.readouterr().out


def test_fingerprint_and_plan_of_a_png_dataset_are_2d_from_the_median_size(tmp_path):
    from medseg.data.fingerprint import compute_fingerprint
    from medseg.data.plan import make_plan as plan_from

    fp = compute_fingerprint(scan_dataset(write_png_dataset(tmp_path / "d")))
    assert fp.data_dims == 2 and fp.channel_names == ["R", "G", "B"] and fp.spacings[0] == [1.0, 1.0]
    plan = plan_from(fp)
    assert plan.spatial_dims == 2 and plan.image_channels == 3 and plan.slice_axis is None
    assert plan.target_spacing == [1.0, 1.0] and [n.scheme for n in plan.normalization] == ["zscore"] * 3


# --------------------------------------------------------------------------- infer and evaluate


def _grey16_image_and_disc(path: Path, h: int, w: int) -> np.ndarray:
    disc = _disc(h, w, h * 0.4, w * 0.6, 6)
    Image.fromarray(np.where(disc == 1, 1000, 30).astype(np.uint16)).save(path)
    return disc


def test_infer_writes_a_png_mask_of_the_input_size(tmp_path, capsys):
    plan = make_plan(spatial_dims=2, data_dims=2, patch_size=(16, 16), target_spacing=(1.0, 1.0))
    model = save_model(tmp_path / "m", plan)  # class 1 where the grey value is above 500
    (tmp_path / "in").mkdir()
    discs = {name: _grey16_image_and_disc(tmp_path / "in" / f"{name}.png", h, w)
             for name, h, w in (("a", 27, 41), ("b", 33, 19))}
    assert main(["infer", str(tmp_path / "in"), "-m", str(model), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 0
    for name, disc in discs.items():
        with Image.open(tmp_path / "out" / f"{name}_mask.png") as written:
            assert written.size == (disc.shape[1], disc.shape[0]) and written.mode == "L"
            np.testing.assert_array_equal(np.asarray(written), disc)
    assert main(["infer", str(tmp_path / "in" / "a.png"), "-m", str(model), "-o", str(tmp_path / "one.png"),
                 "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "one.png")), discs["a"])
    capsys.readouterr()
    Image.fromarray(_rgb()).save(tmp_path / "rgb.png")
    assert main(["infer", str(tmp_path / "rgb.png"), "-m", str(model), "-o", str(tmp_path / "o2")]) == 2
    assert "rgb.png: found (30, 20, 3) with 3 channels; the model expects 1 channel (CT) of 2D images" in (
        one_error_line(capsys))


def test_continue_keeps_complete_png_masks_and_redoes_cut_or_resized_ones(tmp_path, capsys):
    plan = make_plan(spatial_dims=2, data_dims=2, patch_size=(16, 16), target_spacing=(1.0, 1.0))
    model = save_model(tmp_path / "m", plan)
    (tmp_path / "in").mkdir()
    for name, h, w in (("a", 27, 41), ("b", 33, 19), ("c", 20, 24)):
        _grey16_image_and_disc(tmp_path / "in" / f"{name}.png", h, w)
    out = tmp_path / "out"
    args = ["infer", str(tmp_path / "in"), "-m", str(model), "-o", str(out), "--device", "cpu"]
    assert main(args) == 0
    stamp = (out / "a_mask.png").stat().st_mtime_ns
    data = (out / "b_mask.png").read_bytes()
    (out / "b_mask.png").write_bytes(data[: len(data) // 2])  # cut short
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(out / "c_mask.png")  # another size
    capsys.readouterr()
    assert main([*args, "--continue"]) == 0
    assert sorted(Path(p).name for p in capsys.readouterr().out.split()) == ["b_mask.png", "c_mask.png"]
    assert (out / "a_mask.png").stat().st_mtime_ns == stamp
    with Image.open(out / "c_mask.png") as redone:
        assert redone.size == (24, 20)  # (width, height)


def test_probs_for_a_2d_image_is_refused_before_anything_is_written(tmp_path, capsys):
    plan = make_plan(spatial_dims=2, data_dims=2, patch_size=(16, 16), target_spacing=(1.0, 1.0))
    model = save_model(tmp_path / "m", plan)
    _grey16_image_and_disc(tmp_path / "a.png", 20, 24)
    out = tmp_path / "out"
    assert main(["infer", str(tmp_path / "a.png"), "-m", str(model), "-o", str(out), "--probs", "--device", "cpu"]) == 2
    assert "a.png: --probs is not available for 2D images" in one_error_line(capsys)
    assert not out.exists() or not any(out.iterdir())


def test_evaluate_png_masks_gives_dice_iou_and_pixel_accuracy(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    gt = np.zeros((10, 10), np.uint8)
    gt[0:4, 0:5] = 1  # 20 pixels of class 1
    gt[6:8, 6:8] = 2  # 4 pixels of class 2
    pred = gt.copy()
    pred[0:4, 4] = 0  # 4 pixels of class 1 missed
    pred[9, 9] = 2  # 1 false positive of class 2
    Image.fromarray(gt).save(tmp_path / "gt" / "c.png")
    Image.fromarray(pred).save(tmp_path / "pred" / "c_mask.png")
    report = medseg.evaluate(tmp_path / "pred", tmp_path / "gt", num_workers=0)
    assert report.metrics == ("dice", "iou", "pixel_accuracy", "precision", "recall")
    scores = report.cases[0].scores
    assert scores["1"]["dice"] == pytest.approx(2 * 16 / (16 + 20))
    assert scores["1"]["iou"] == pytest.approx(16 / 20)
    assert scores["2"]["iou"] == pytest.approx(4 / 5)
    assert scores["1"]["pixel_accuracy"] == scores["2"]["pixel_accuracy"] == pytest.approx(95 / 100)


# --------------------------------------------------------------------------- training


@pytest.mark.slow
def test_png_dataset_trains_infers_and_evaluates(tmp_path, capsys):
    root = write_png_dataset(tmp_path / "Discs", num_cases=6)
    run_dir = tmp_path / "run"
    assert main([
        "train", str(root), "-c", "cpu_quick", "-o", str(run_dir), "--set", "train.max_epochs=1",
        "train.iterations_per_epoch=3", "data.num_workers=0", "train.num_threads=1", "data.num_folds=3",
        "train.device=cpu", "augment.enabled=false",
    ]) == 0
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["spatial_dims"], plan["data_dims"], plan["image_channels"]) == (2, 2, 3)
    images = tmp_path / "test"
    images.mkdir()
    for i in (0, 4):
        (images / f"case{i}_0000.png").write_bytes((root / "imagesTr" / f"case{i}_0000.png").read_bytes())
    out = tmp_path / "pred"
    assert main(["infer", str(images), "-m", str(run_dir / "fold_0" / "model"), "-o", str(out), "--device", "cpu"]) == 0
    for i in (0, 4):
        with Image.open(out / f"case{i}_mask.png") as mask, Image.open(images / f"case{i}_0000.png") as image:
            assert mask.size == image.size and mask.mode == "L"
            assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 1, 2}
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in (0, 4):
        (refs / f"case{i}.png").write_bytes((root / "labelsTr" / f"case{i}.png").read_bytes())
    capsys.readouterr()
    assert main(["evaluate", str(out), str(refs), "--labels", str(root / "dataset.json"),
                 "-o", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())["summary"]
    assert set(summary["disc"]) == {"dice", "iou", "pixel_accuracy", "precision", "recall"}
    assert 0.0 <= summary["disc"]["pixel_accuracy"]["mean"] <= 1.0
