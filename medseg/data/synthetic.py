"""SYNTHETIC phantoms for tests, the demo and examples. NOT real patient data.

Everything here is made up by a random number generator: smooth deformed
blobs with plausible intensities, so that code paths (reading, geometry,
planning, training, inference) can be exercised quickly and reproducibly.
A model trained on these phantoms is useless on real scans.

* CT-like (``kind="ct"``): air outside the body (-1000 HU), a soft-tissue body
  (~40 HU) with a fat rim (~-90 HU) and a bony spine (~500 HU), one organ
  (liver-like, ~60 HU, label 1) and tumours inside it (hypo-dense, ~25 HU,
  label 2). Stored as int16 HU, like real CT.
* MR-like (``kind="mr"``): a head-like ellipsoid on a zero background with a
  smooth bias field; 1 channel (``MR``) or 4 BraTS-like sequences (FLAIR, T1w,
  T1gd, T2w) with nested tumour regions: 1 edema, 2 non-enhancing core,
  3 enhancing tumour (the MSD brain-tumour label convention).

Spacing is random and anisotropic (thin in-plane, thick slices) and the voxel
axes are stored in non-trivial orientations (axis permutations and flips,
occasionally an oblique rotation), so geometry handling is exercised.

Example::

    root = write_synthetic_dataset(tmp / "Phantoms", layout="msd", num_cases=6, kind="mr", channels=4)
    index = medseg.data.scan_dataset(root)
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

__all__ = ["ORIENTATIONS", "Phantom", "make_phantom", "write_synthetic_dataset"]

ORIENTATIONS = ("RAS", "LPS", "LAS", "PIR", "ASL", "SRA")
"""Axis codes a phantom may be stored in (``orientation="random"`` also draws "oblique")."""

CT_LABELS = {0: "background", 1: "organ", 2: "tumour"}
MR_LABELS = {0: "background", 1: "edema", 2: "non_enhancing_core", 3: "enhancing_tumour"}
MR4_CHANNELS = ["FLAIR", "T1w", "T1gd", "T2w"]


@dataclass(frozen=True, eq=False)
class Phantom:
    """A SYNTHETIC scan and its label map.

    Attributes:
        image: ``(C, *shape)`` voxels (int16 HU for CT, float32 for MR).
        label: ``shape`` uint8 label map.
        affine: 4x4 voxel -> RAS+ mm.
        channel_names: modality per channel.
        labels: label value -> name.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    channel_names: list[str]
    labels: dict[int, str]

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def _smooth_field(shape: Sequence[int], rng: np.random.Generator, scale: float) -> np.ndarray:
    """Smooth random field in [-1, 1]: coarse noise, blurred and upsampled."""
    coarse = rng.standard_normal([max(3, round(s / scale)) for s in shape])
    coarse = ndimage.gaussian_filter(coarse, 1.0)
    field = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=1)
    field = field[tuple(slice(0, s) for s in shape)]
    peak = np.max(np.abs(field)) or 1.0
    return (field / peak).astype(np.float32)


def _blob(coords: list[np.ndarray], center, radii, field: np.ndarray, amount: float) -> np.ndarray:
    r = np.sqrt(sum(((c - m) / a) ** 2 for c, m, a in zip(coords, center, radii)))
    return (r + amount * field) < 1.0


def _random_spacing(rng: np.random.Generator) -> tuple[float, float, float]:
    inplane = float(rng.uniform(0.7, 1.3))
    return (inplane, inplane * float(rng.uniform(0.95, 1.05)), float(rng.uniform(1.5, 4.0)))


def _orient(
    image: np.ndarray, label: np.ndarray, spacing: Sequence[float], origin: np.ndarray, orientation: str,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Store RAS-ordered arrays in ``orientation`` (axis codes, or 'oblique')."""
    import nibabel as nib

    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = origin
    oblique = orientation == "oblique"
    codes = str(rng.choice(ORIENTATIONS)) if oblique else orientation
    transform = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(tuple(codes))
    )
    spatial = label.shape
    image = np.stack([nib.orientations.apply_orientation(ch, transform) for ch in image])
    label = nib.orientations.apply_orientation(label, transform)
    affine = affine @ nib.orientations.inv_ornt_aff(transform, spatial)
    if oblique:
        a, b = np.radians(rng.uniform(8.0, 20.0, size=2))
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        rot = np.eye(4)
        rot[:3, :3] = rz @ rx
        affine = rot @ affine
    return np.ascontiguousarray(image), np.ascontiguousarray(label), affine


def make_phantom(
    kind: Literal["ct", "mr"] = "ct",
    *,
    shape: Sequence[int] = (48, 48, 32),
    spacing: Sequence[float] | None = None,
    orientation: str = "random",
    seed: int = 0,
    num_tumours: int = 1,
    channels: int = 1,
) -> Phantom:
    """Make one SYNTHETIC CT-like or MR-like volume with its label map.

    Args:
        kind: ``"ct"`` (HU, labels organ/tumour) or ``"mr"`` (labels edema,
            non-enhancing core, enhancing tumour).
        shape: voxels along the R, A, S axes before re-orientation.
        spacing: mm along R, A, S; ``None`` draws a random anisotropic one
            (0.7-1.3 mm in-plane, 1.5-4 mm slices).
        orientation: axis codes (``"RAS"``, ``"LPS"``, ``"PIR"`` ...),
            ``"oblique"`` (codes plus a rotation), or ``"random"`` (one of
            :data:`ORIENTATIONS`, oblique one time in five).
        seed: random seed; the same seed gives the same phantom.
        num_tumours: tumours inside the organ (CT) or tumour sites (MR); 0 for
            none (an empty foreground in MR, organ only in CT).
        channels: 1, or 4 for BraTS-like MR sequences.

    Returns:
        The :class:`Phantom` (arrays in the stored orientation plus its affine).
    """
    if kind not in ("ct", "mr"):
        raise ValueError(f"kind must be 'ct' or 'mr', got {kind!r}.")
    if channels not in (1, 4) or (kind == "ct" and channels != 1):
        raise ValueError(f"channels must be 1 (CT or MR) or 4 (MR), got {channels} for kind {kind!r}.")
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in (spacing if spacing is not None else _random_spacing(rng)))
    if orientation == "random":
        orientation = "oblique" if rng.random() < 0.2 else str(rng.choice(ORIENTATIONS))
    extent = [n * s for n, s in zip(shape, spacing)]
    coords = list(
        np.meshgrid(*[(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    )
    field = _smooth_field(shape, rng, scale=6.0)
    if kind == "ct":
        image, label = _ct(coords, extent, shape, field, rng, num_tumours)
        names, labels = ["CT"], dict(CT_LABELS)
    else:
        image, label = _mr(coords, extent, shape, field, rng, num_tumours, channels)
        names, labels = (MR4_CHANNELS if channels == 4 else ["MR"]), dict(MR_LABELS)
    origin = np.array([-extent[0] / 2, -extent[1] / 2, -extent[2] / 2]) + rng.uniform(-30, 30, size=3)
    image, label, affine = _orient(image, label, spacing, origin, orientation, rng)
    return Phantom(image=image, label=label, affine=affine, channel_names=list(names), labels=labels)


def _ct(coords, extent, shape, field, rng, num_tumours):
    x, y, _z = coords
    body = (x / (0.46 * extent[0])) ** 2 + (y / (0.40 * extent[1])) ** 2 < 1.0 + 0.05 * field
    inner = (x / (0.42 * extent[0])) ** 2 + (y / (0.36 * extent[1])) ** 2 < 1.0 + 0.05 * field
    spine = (x / (0.06 * extent[0])) ** 2 + ((y + 0.24 * extent[1]) / (0.07 * extent[1])) ** 2 < 1.0
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[body] = -90.0
    hu[inner] = 40.0
    hu[spine & inner] = 500.0
    center = [rng.uniform(0.08, 0.16) * extent[0], rng.uniform(-0.05, 0.08) * extent[1], rng.uniform(-0.08, 0.08) * extent[2]]
    radii = [rng.uniform(0.17, 0.22) * extent[0], rng.uniform(0.18, 0.22) * extent[1], rng.uniform(0.28, 0.36) * extent[2]]
    organ = _blob(coords, center, radii, field, 0.3) & inner & ~spine
    hu[organ] = 60.0 + rng.uniform(-5, 5)
    label = organ.astype(np.uint8)
    tumour_field = _smooth_field(shape, rng, scale=3.0)
    for _ in range(num_tumours):
        tumour = _tumour_in(organ, coords, radii, tumour_field, rng, size=(0.2, 0.35))
        hu[tumour] = rng.uniform(15.0, 35.0)
        label[tumour] = 2
    hu += rng.normal(0.0, 12.0, size=shape).astype(np.float32)
    hu = ndimage.gaussian_filter(hu, 0.5)
    hu[~body] = -1000.0 + rng.normal(0.0, 5.0, size=int((~body).sum()))
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)[np.newaxis], label


def _tumour_in(region, coords, radii, field, rng, size) -> np.ndarray:
    """A small deformed blob centred on a voxel well inside ``region``."""
    inside = np.argwhere(ndimage.binary_erosion(region, iterations=2))
    if len(inside) == 0:
        inside = np.argwhere(region)
    if len(inside) == 0:
        return np.zeros_like(region)
    center_index = inside[rng.integers(len(inside))]
    center = [c[tuple(center_index)] for c in coords]
    t_radii = [max(r * rng.uniform(*size), 1e-3) for r in radii]
    # at least ~1.5 voxels: tiny tumours stay visible on thick slices
    return _blob(coords, center, t_radii, field, 0.25) & region


def _mr(coords, extent, shape, field, rng, num_tumours, channels):
    head = _blob(coords, [0, 0, 0], [0.42 * e for e in extent], field, 0.05)
    brain = _blob(coords, [0, 0, 0], [0.37 * e for e in extent], field, 0.08)
    label = np.zeros(shape, dtype=np.uint8)
    tumour_field = _smooth_field(shape, rng, scale=3.0)
    brain_radii = [0.37 * e for e in extent]
    for _ in range(num_tumours):
        edema = _tumour_in(brain, coords, brain_radii, tumour_field, rng, size=(0.35, 0.5))
        if not edema.any():
            continue
        dist = ndimage.distance_transform_edt(edema)
        depth = dist / max(float(dist.max()), 1.0)
        label[edema] = 1
        label[edema & (depth > 0.35)] = 3
        label[edema & (depth > 0.65)] = 2
    # intensity per tissue: [outside brain (scalp), brain, edema, non-enhancing, enhancing]
    table = {
        "FLAIR": [150, 300, 600, 350, 500],
        "T1w": [450, 500, 400, 300, 420],
        "T1gd": [450, 500, 420, 320, 900],
        "T2w": [250, 400, 700, 800, 600],
        "MR": [250, 400, 700, 800, 600],
    }
    names = MR4_CHANNELS if channels == 4 else ["MR"]
    bias = 1.0 + 0.15 * _smooth_field(shape, rng, scale=12.0)
    tissue = np.zeros(shape, dtype=np.int8)
    tissue[head] = 0
    tissue[brain] = 1
    tissue[label == 1] = 2
    tissue[label == 2] = 3
    tissue[label == 3] = 4
    out = []
    for name in names:
        values = np.asarray(table[name], dtype=np.float32)
        img = values[tissue] * bias + rng.normal(0.0, 15.0, size=shape).astype(np.float32)
        img = ndimage.gaussian_filter(img, 0.6)
        img[~head] = 0.0
        out.append(np.maximum(img, 0.0))
    return np.stack(out).astype(np.float32), label


# --------------------------------------------------------------------------- writing


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def write_synthetic_dataset(
    root: str | Path,
    *,
    layout: Literal["msd", "nnunet", "plain", "list"] = "msd",
    num_cases: int = 10,
    kind: Literal["ct", "mr"] = "ct",
    seed: int = 0,
    channels: int = 1,
    shape: Sequence[int] = (40, 40, 24),
    num_tumours: int = 1,
    orientation: str = "random",
    num_test_cases: int = 0,
    metadata: bool = True,
) -> Path:
    """Write a SYNTHETIC dataset folder in one of the recognised layouts.

    Args:
        root: folder to create (must not exist or be empty).
        layout: ``msd`` (dataset.json + imagesTr/labelsTr, 4D multi-channel
            images), ``nnunet`` (``CASE_0000.nii.gz`` per channel), ``plain``
            (images/ + labels/) or ``list`` (dataset.csv with image,label).
        num_cases: training cases (ids ``phantom_000``, ...).
        kind, channels, num_tumours, orientation: see :func:`make_phantom`.
        seed: base seed; case ``i`` uses ``seed * 1000 + i``.
        shape: base shape; each case varies it by up to +-15 %.
        num_test_cases: extra unlabelled cases (imagesTs / test entries).
        metadata: plain/list layouts: also write a ``dataset.json`` with
            ``labels`` and ``channel_names`` (they are then declared).

    Returns:
        The dataset root.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not empty; pick a new folder for the synthetic dataset.")
    if layout not in ("msd", "nnunet", "plain", "list"):
        raise ValueError(f"layout must be msd, nnunet, plain or list, got {layout!r}.")
    folders = {"msd": ("imagesTr", "labelsTr"), "nnunet": ("imagesTr", "labelsTr"), "plain": ("images", "labels"),
               "list": ("scans", "masks")}[layout]
    img_dir, lab_dir = root / folders[0], root / folders[1]
    img_dir.mkdir(parents=True)
    lab_dir.mkdir()
    test_dir = root / ("imagesTs" if layout in ("msd", "nnunet") else "test")
    if num_test_cases:
        test_dir.mkdir()
    rng = np.random.default_rng(seed)
    entries: list[dict[str, str]] = []
    test_entries: list[str] = []
    phantom = None
    for i in range(num_cases + num_test_cases):
        case_shape = [max(8, round(s * rng.uniform(0.85, 1.15))) for s in shape]
        phantom = make_phantom(
            kind, shape=case_shape, orientation=orientation, seed=seed * 1000 + i, num_tumours=num_tumours,
            channels=channels,
        )
        is_test = i >= num_cases
        case_id = f"phantom_{i:03d}"
        out_dir = test_dir if is_test else img_dir
        if layout == "nnunet":
            for c, ch in enumerate(phantom.image):
                _save_nifti(ch, phantom.affine, out_dir / f"{case_id}_{c:04d}.nii.gz")
        else:
            data = phantom.image[0] if phantom.image.shape[0] == 1 else np.moveaxis(phantom.image, 0, -1)
            _save_nifti(data, phantom.affine, out_dir / f"{case_id}.nii.gz")
        if is_test:
            test_entries.append(f"./{out_dir.name}/{case_id}.nii.gz")
            continue
        _save_nifti(phantom.label, phantom.affine, lab_dir / f"{case_id}.nii.gz")
        entries.append({"image": f"./{img_dir.name}/{case_id}.nii.gz", "label": f"./{lab_dir.name}/{case_id}.nii.gz"})
    names = phantom.channel_names if phantom is not None else ["CT"]
    labels = phantom.labels if phantom is not None else dict(CT_LABELS)
    description = "SYNTHETIC phantoms made by medseg.data.synthetic (not patient data)"
    if layout == "msd":
        meta = {
            "name": root.name, "description": description, "tensorImageSize": "4D" if channels > 1 else "3D",
            "modality": {str(c): n for c, n in enumerate(names)},
            "labels": {str(v): n for v, n in labels.items()},
            "numTraining": num_cases, "numTest": num_test_cases,
            "training": entries, "test": test_entries,
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    elif layout == "nnunet":
        meta = {
            "name": root.name, "description": description,
            "channel_names": {str(c): n for c, n in enumerate(names)},
            "labels": {n: v for v, n in labels.items()},
            "numTraining": num_cases, "file_ending": ".nii.gz",
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    else:
        if layout == "list":
            with (root / "dataset.csv").open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=["image", "label"])
                writer.writeheader()
                writer.writerows(entries)
        if metadata:
            meta = {"name": root.name, "description": description,
                    "channel_names": {str(c): n for c, n in enumerate(names)},
                    "labels": {str(v): n for v, n in labels.items()}}
            (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
