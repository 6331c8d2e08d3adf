"""Segment scans with a trained model folder: the library behind ``medseg infer``.

::

    seg = Segmenter.load("runs/spleen", device="auto")        # all folds: an ensemble
    pred = seg.predict("scan.nii.gz")                           # or a Volume, or (array, affine)
    pred.save("scan_mask.nii.gz")                               # same shape and affine as the scan
    seg.predict_many(["a.nii.gz", "dicom_dir/"], "out/", statistics=True)

Pipeline per scan (``docs/inference.md``):

1. read (``medseg.io.read_volume``) and check the scan against the model
   (dimensionality, channels);
2. preprocess exactly as in training (``medseg.data.preprocess.preprocess_case``:
   re-orient, crop, normalise, resample to the plan grid);
3. sliding-window logits (``medseg.inference.sliding_window``), with mirroring
   TTA if asked; several folds are averaged in probability space;
4. restore to the scan's grid (``medseg.inference.restore``: resample back in
   slabs, argmax, un-crop, un-orient, grid check);
5. postprocess (``largest`` / ``min-size=N``), map class indices to the label
   values of the training data, per-label statistics.

Writing (:meth:`Segmenter.write` / :meth:`Segmenter.predict_many`) goes through
``medseg.io.write_mask`` (atomic, geometry checked before the rename). Output
names: ``<case>_mask.nii.gz`` and optionally ``<case>_probs.nii.gz``,
``<case>_stats.json``/``.csv``, ``<case>_preview.png``; ``<case>_provenance.json``
always. A case is named after its file without extension, or after its DICOM
folder (never after DICOM tags); with ``anonymize=True`` it is named
``case_<12 hex digits of its content's sha256>`` and no sidecar holds a path
(``medseg.inference.provenance.anonymous_case_name``).

Plan-grid scores are held as float32 up to :data:`FLOAT32_SCORES_LIMIT` values
and as float16 beyond that (halving the largest buffer of a big CT).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from medseg.device import resolve_device
from medseg.errors import (
    CheckpointError,
    ConfigError,
    GeometryError,
    OutputExistsError,
    OutputWriteError,
    ScanReadError,
)
from medseg.inference.postprocess import PostprocessSpec, parse_postprocess, postprocess
from medseg.inference.provenance import (
    anonymize_provenance,
    anonymous_case_name,
    check_output_path,
    hash_input,
    make_provenance,
    write_json_atomic,
)
from medseg.io.formats import MASK_SUFFIXES, NIFTI_SUFFIXES, SCAN_SUFFIXES, has_suffix, strip_suffix
from medseg.io.geometry import Geometry
from medseg.io.images2d import is_image_path, refuse_palette_image
from medseg.io.volume import Volume
from medseg.settings import check_overlap

if TYPE_CHECKING:
    import torch

    from medseg.data.plan import Plan
    from medseg.data.preprocess import PreprocessedCase
    from medseg.model_folder import LoadedModel, ModelBuilder

__all__ = [
    "FLOAT32_SCORES_LIMIT",
    "OUTPUT_SUFFIXES",
    "Prediction",
    "Segmenter",
    "case_name",
    "collect_inputs",
    "output_paths",
    "plan_outputs",
]

log = logging.getLogger(__name__)

#: Plan-grid scores with more values than this are stored as float16 (512 MiB as float32).
FLOAT32_SCORES_LIMIT = 1 << 27

#: Output kind -> file name suffix after the case name.
OUTPUT_SUFFIXES = {
    "mask": "_mask.nii.gz",
    "probabilities": "_probs.nii.gz",
    "statistics": "_stats.json",
    "statistics_csv": "_stats.csv",
    "preview": "_preview.png",
    "provenance": "_provenance.json",
    "dicom_seg": "_seg.dcm",  # --format dicom-seg (medseg.inference.dicom_outputs)
    "rtstruct": "_rtstruct.dcm",  # --format rtstruct
}


#: Upper bounds of the small side outputs, in bytes (the NIfTI outputs are bounded from their shape).
PROVENANCE_MAX_BYTES = 64 << 10  # plus 1 KiB per model
STATS_MAX_BYTES_PER_LABEL = 1 << 10  # per file (JSON and CSV), plus 4 KiB
PREVIEW_MAX_BYTES = 8 << 20  # preview.MAX_WIDTH_PX x MAX_HEIGHT_PX: 1200 x 1600 RGBA is 7.7 MB uncompressed

# --------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class Prediction:
    """The segmentation of one scan, on the scan's own voxel grid.

    Attributes:
        mask: label values of the training data (``plan.label_values``), uint8
            (uint16 above 255), shape ``geometry.shape``.
        geometry: the scan's grid (write the mask with it to overlay the scan exactly).
        probabilities: ``(K, *shape)`` uint8, ``round(255 * p)`` per class index,
            or None when not asked for.
        statistics: per-label voxels, mL, bounding box, centroid (``medseg.inference.stats``).
        provenance: medseg version, model(s) and weights sha256, input sha256, settings.
        labels: label value -> name.
        timings: seconds per stage (read, preprocess, network, sliding_window, restore, postprocess).
        source: the scan's path, if it was read from disk (the first channel's, for per-channel files).
        confidence: mean largest class probability over the voxels predicted as foreground
            (network grid; ``medseg.inference.quality.foreground_confidence``), when computed.
    """

    mask: np.ndarray
    geometry: Geometry
    probabilities: np.ndarray | None
    statistics: list[dict[str, Any]]
    provenance: dict[str, Any]
    labels: dict[int, str]
    timings: dict[str, float] = field(default_factory=dict)
    source: Path | None = None
    confidence: float | None = None

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the mask as NIfTI on the scan's grid (atomic, geometry-checked)."""
        from medseg.io import write_mask

        target = Path(path)
        if self.source is not None:
            check_output_path(target, overwrite=overwrite, inputs=(self.source,))
        return write_mask(self.mask, self.geometry, target, overwrite=overwrite)


# --------------------------------------------------------------------------- inputs and names


def case_name(path: str | os.PathLike) -> str:
    """Case name of a scan path: the file name without its extension, or the DICOM folder's name."""
    path = Path(path)
    if path.is_dir():
        return path.resolve().name if path.name in ("", ".", "..") else path.name
    return strip_suffix(path.name)


def collect_inputs(inputs: Sequence[str | os.PathLike], *, anonymize: bool = False) -> list[tuple[Path, str]]:
    """Expand ``medseg infer`` inputs into ``(path, case name)`` pairs.

    A file is one case. A folder holding scan files (``.nii.gz`` ...) is a folder
    of scans: each file is a case, and each sub-folder a DICOM series case. Any
    other folder is one DICOM series, named after the folder. With ``anonymize``
    every case is named by :func:`~medseg.inference.provenance.anonymous_case_name`.

    Raises:
        ScanReadError: a path does not exist, or a folder holds nothing to segment.
        ConfigError: two inputs would give the same case name (and output file).
    """
    cases: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise ScanReadError(f"input {path}: no such file or folder. Check the path.")
        if path.is_file():
            cases.append((path, case_name(path)))
            continue
        children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        scans = [p for p in children if p.is_file() and p.name.lower().endswith(SCAN_SUFFIXES)]
        if scans:
            cases.extend((p, case_name(p)) for p in scans)
            cases.extend((p, case_name(p)) for p in children if p.is_dir() and any(p.iterdir()))
        elif any(p.is_file() for p in children):
            cases.append((path, case_name(path)))
        else:
            subdirs = [p for p in children if p.is_dir() and any(p.iterdir())]
            if not subdirs:
                raise ScanReadError(f"input folder {path} is empty: expected scans or a DICOM series.")
            cases.extend((p, case_name(p)) for p in subdirs)
    return _named(cases, anonymize=anonymize)


def _named(cases: list[tuple[Path, str]], *, anonymize: bool) -> list[tuple[Path, str]]:
    """Cases with anonymous names if asked; refuse two cases with one name (one output file)."""
    if anonymize:
        cases = [(path, anonymous_case_name(path)) for path, _name in cases]
    seen: dict[str, Path] = {}
    for path, name in cases:
        if name in seen and anonymize:
            raise ConfigError(
                f"inputs {seen[name]} and {path} have identical content (anonymous case name {name!r}); "
                "segment only one of them."
            )
        if name in seen:
            raise ConfigError(
                f"inputs {seen[name]} and {path} both give case name {name!r} (output {name}_mask.nii.gz); "
                "segment them into different -o folders."
            )
        seen[name] = path
    return cases


def output_paths(
    case: str,
    out_dir: str | os.PathLike,
    *,
    probabilities: bool = False,
    statistics: bool = False,
    preview: bool = False,
    mask_path: str | os.PathLike | None = None,
    formats: Sequence[str] = ("nifti",),
    source: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Output files of one case: ``<case>_mask.nii.gz`` and the asked-for side outputs.

    ``mask_path`` names the mask file explicitly (single-input ``-o file.nii.gz``);
    side outputs then go beside it with the mask's stem. ``formats`` adds the DICOM
    outputs (``dicom-seg``, ``rtstruct``; the NIfTI mask is always written).
    A ``source`` that is a 2D image (``.png``, ``.jpg``, ``.tif`` ...) gets its mask
    as ``<case>_mask.png`` (a lossless greyscale PNG; :mod:`medseg.io.images2d`).
    """
    out_dir = Path(out_dir)
    stem = case
    if mask_path is not None:
        mask_path = Path(mask_path)
        out_dir = mask_path.parent
        stem = strip_suffix(mask_path.name, MASK_SUFFIXES) if has_suffix(mask_path, MASK_SUFFIXES) else mask_path.stem
        stem = stem[: -len("_mask")] if stem.endswith("_mask") else stem
    mask_suffix = OUTPUT_SUFFIXES["mask"]
    if source is not None and is_image_path(source):
        mask_suffix = "_mask.png"
        if probabilities:
            raise ConfigError(
                f"{Path(source).name}: --probs is not available for 2D images (the per-class probabilities of an "
                "image have no single-file form that viewers read); leave --probs out."
            )
    paths = {"mask": Path(mask_path) if mask_path is not None else out_dir / (stem + mask_suffix)}
    wanted = {
        "probabilities": probabilities,
        "statistics": statistics,
        "statistics_csv": statistics,
        "preview": preview,
        "provenance": True,
    }
    for kind, on in wanted.items():
        if on:
            paths[kind] = out_dir / (stem + OUTPUT_SUFFIXES[kind])
    for kind in ("dicom_seg", "rtstruct"):
        if kind.replace("_", "-") in formats:
            paths[kind] = out_dir / (stem + OUTPUT_SUFFIXES[kind])
    return paths


# --------------------------------------------------------------------------- the segmenter


@dataclass
class _Prepared:
    volume: Volume
    case: PreprocessedCase
    timings: dict[str, float]
    input_hash: concurrent.futures.Future | str | None


class Segmenter:
    """A loaded model (or fold ensemble) that segments scans; keeps the networks in memory.

    Build it with :meth:`load`. Settings not given fall back to the ``infer``
    section stored with the model (``InferConfig``).

    Args:
        models: loaded model folders (one per fold); their plans must be identical.
        device: where the networks run.
        tta: mirroring test-time augmentation.
        overlap: sliding-window overlap in [0, 1).
        batch_size: windows per forward pass.
        postprocess: ``none``, ``largest`` or ``min-size=N``.
        skip_empty_windows: skip windows without a body voxel (same layout; see ``sliding_window``).
        backend: how the networks run (``medseg.inference.backends``: torch, channels-last,
            compile, onnxruntime, openvino or auto); each is checked against PyTorch when set up.
    """

    def __init__(
        self,
        models: Sequence[LoadedModel],
        *,
        device: torch.device,
        tta: bool,
        overlap: float,
        batch_size: int,
        postprocess: str | PostprocessSpec = "none",
        skip_empty_windows: bool = True,
        backend: str = "torch",
    ) -> None:
        if not models:
            raise CheckpointError("a Segmenter needs at least one model folder.")
        first = models[0].plan
        for m in models[1:]:
            diff = first.diff(m.plan)
            if diff:
                raise CheckpointError(
                    f"model folders {models[0].path} and {m.path} were trained with different plans "
                    f"({'; '.join(diff[:3])}); an ensemble needs folds of one run."
                )
        check_overlap(overlap)
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}.")
        self.models = list(models)
        self.device = device
        self.tta = bool(tta)
        self.overlap = float(overlap)
        self.batch_size = int(batch_size)
        self.postprocess = parse_postprocess(postprocess)
        self.skip_empty_windows = bool(skip_empty_windows)
        from medseg.inference.backends import prepare_network

        #: what the sliding window runs, one per model (the network itself for ``torch``)
        self.networks = [
            prepare_network(m.model, m.plan, backend, device=device, batch_size=self.batch_size) for m in self.models
        ]
        self.backend = getattr(self.networks[0], "backend", "torch")

    # ----------------------------------------------------------------- construction
    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike,
        *,
        device: str | torch.device = "auto",
        folds: Sequence[int | str] | None = None,
        tta: bool | Literal["auto", "on", "off"] | None = None,
        overlap: float | None = None,
        batch_size: int | None = None,
        postprocess: str | None = None,
        skip_empty_windows: bool | None = None,
        build_model: ModelBuilder | None = None,
        backend: str = "auto",
    ) -> Segmenter:
        """Load a model folder, fold folder or run folder (all its folds form an ensemble).

        Args:
            model_dir: see ``medseg.model_folder.find_model_dirs``.
            device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
            folds: folds of a run folder to use (default: all trained folds).
            tta: mirroring TTA; ``None``/``"auto"``: on for GPUs, off on the CPU (8x the
                network time in 3D; the accuracy gain is not measured by medseg).
            overlap, batch_size, postprocess, skip_empty_windows: override the model's defaults.
            build_model: custom ``(name, plan, options) -> nn.Module`` for networks
                outside the registry.
            backend: ``auto`` (default: OpenVINO on the CPU when installed and it reproduces
                PyTorch, else PyTorch), ``torch``, ``channels-last``, ``compile``,
                ``onnxruntime`` or ``openvino`` (``medseg.inference.backends``).

        Raises:
            CheckpointError: no model there, corrupt weights, folds with different plans.
            ConfigError: invalid settings, an unavailable device, or a backend that is not
                installed or does not reproduce PyTorch.
        """
        from medseg.model_folder import find_model_dirs, load_model_folder

        dev = resolve_device(device)
        dirs = find_model_dirs(model_dir, folds)
        models = [load_model_folder(d, device=dev, build_model=build_model) for d in dirs]
        defaults = models[0].infer_config
        tta_setting: Any = defaults.tta if tta is None else tta
        if isinstance(tta_setting, str):
            if tta_setting not in ("auto", "on", "off"):
                raise ConfigError(f"tta must be auto, on or off, got {tta_setting!r}.")
            tta_on = dev.type != "cpu" if tta_setting == "auto" else tta_setting == "on"
        else:
            tta_on = bool(tta_setting)
        return cls(
            models,
            device=dev,
            tta=tta_on,
            overlap=defaults.overlap if overlap is None else overlap,
            batch_size=defaults.batch_size if batch_size is None else batch_size,
            postprocess=defaults.postprocess if postprocess is None else postprocess,
            skip_empty_windows=defaults.skip_empty_windows if skip_empty_windows is None else skip_empty_windows,
            backend=backend,
        )

    @property
    def plan(self) -> Plan:
        return self.models[0].plan

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> name, as in the training data."""
        return self.plan.labels

    def settings(self) -> dict[str, Any]:
        """The settings that shape the result (recorded in the provenance)."""
        return {
            "overlap": self.overlap,
            "tta": self.tta,
            "batch_size": self.batch_size,
            "postprocess": str(self.postprocess),
            "skip_empty_windows": self.skip_empty_windows,
            "backend": self.backend,
            "folds": [m.fold for m in self.models],
            "ensemble": "mean of softmax probabilities" if len(self.models) > 1 else "single model",
        }

    # ----------------------------------------------------------------- stages
    def _read(self, scan: Any, series_uid: str | None, resample_tilt: bool = False) -> Volume:
        if isinstance(scan, Volume):
            return scan
        if isinstance(scan, list):  # one scan (path or Volume) per channel
            from medseg.io.channels import read_channels

            return read_channels(scan, series_uid=series_uid, resample_tilt=resample_tilt)
        if isinstance(scan, tuple):
            if len(scan) != 2:
                raise ScanReadError("an in-memory scan must be a pair (array, affine).")
            array, affine = np.asarray(scan[0]), np.asarray(scan[1], dtype=np.float64)
            data_dims = self.plan.data_dims
            if array.ndim == data_dims:
                array = array[np.newaxis]
            elif array.ndim != data_dims + 1:
                raise GeometryError(
                    f"in-memory scan has shape {array.shape}: expected {data_dims}D (*spatial) or "
                    f"channel-first (C, *spatial) for this {data_dims}D model."
                )
            return Volume(array=array, geometry=Geometry(shape=array.shape[1:], affine=affine))
        from medseg.io import read_volume

        return read_volume(scan, series_uid=series_uid, resample_tilt=resample_tilt)

    def check_volume(self, volume: Volume) -> None:
        """Refuse scans the model cannot segment, with one clear line.

        Raises:
            GeometryError: the scan's dimensionality differs from the model's data.
            ScanReadError: the channel count differs from the model's.
        """
        plan = self.plan
        name = volume.path.name if volume.path is not None else "the scan"
        n = plan.image_channels
        kind = "volumes" if plan.data_dims == 3 else "images"
        expects = f"the model expects {n} channel{'s' if n != 1 else ''} ({', '.join(plan.channel_names)}) of {plan.data_dims}D {kind}"
        if volume.spatial_dims != plan.data_dims:
            raise GeometryError(
                f"{name} is {volume.spatial_dims}D {volume.geometry.shape} but the model expects "
                f"{plan.data_dims}D {kind}; pass a {plan.data_dims}D scan or a model trained on "
                f"{volume.spatial_dims}D data."
            )
        refuse_palette_image(volume)
        if volume.num_channels != n:
            c = volume.num_channels
            if volume.path is not None:  # a file's own layout: channels on the last axis (NIfTI's 4th)
                found = (*volume.geometry.shape, c) if c > 1 else tuple(volume.geometry.shape)
            else:
                found = tuple(volume.array.shape)  # channel-first, as given
            raise ScanReadError(
                f"{name}: found {found} with {c} channel{'s' if c != 1 else ''}; {expects}. Pass one "
                f"{plan.data_dims}D scan per case with one channel per modality, in that order"
                + (" (a 4D file's 4th axis holds the channels: split a time series or multi-echo file first)."
                   if c > n else ".")
            )

    def _prepare(self, scan: Any, series_uid: str | None, *, hash_pool=None, resample_tilt: bool = False) -> _Prepared:
        from medseg.data.preprocess import preprocess_case

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        input_hash: concurrent.futures.Future | str | None = None
        source = Path(scan) if isinstance(scan, (str, os.PathLike)) else None
        channel_files = (
            [Path(s) for s in scan] if isinstance(scan, list) and all(isinstance(s, (str, os.PathLike)) for s in scan)
            else None
        )
        volume = self._read(scan, series_uid, resample_tilt)
        timings["read_s"] = time.perf_counter() - t0
        self.check_volume(volume)
        if source is not None:
            # hashing overlaps with the rest of the pipeline (hashlib releases the GIL)
            input_hash = hash_pool.submit(hash_input, source) if hash_pool is not None else hash_input(source)
        elif channel_files:  # per-channel files: their sha256 in channel order, comma-separated
            input_hash = ",".join(hash_input(p) for p in channel_files)
        t1 = time.perf_counter()
        case = preprocess_case(volume, self.plan)
        timings["preprocess_s"] = time.perf_counter() - t1
        return _Prepared(volume=volume, case=case, timings=timings, input_hash=input_hash)

    def output_bytes(self, paths: dict[str, Path], shape: Sequence[int]) -> dict[str, int]:
        """Upper bound in bytes of each output in ``paths`` (see :func:`output_paths`) for a scan of ``shape``.

        NIfTI outputs are bounded by their uncompressed size (gzip guarantees
        nothing: see :func:`medseg.io.writers.nifti_size_bound`); the small side
        outputs by generous constants.
        """
        from medseg.io.writers import nifti_size_bound

        spatial = tuple(shape)
        mask_itemsize = 1 if max(self.plan.label_values) <= 255 else 2
        sizes = {}
        for kind, path in paths.items():
            gz = path.name.lower().endswith(".gz")
            if kind == "mask":
                sizes[kind] = nifti_size_bound(spatial, mask_itemsize, gz=gz)
            elif kind == "probabilities":
                sizes[kind] = nifti_size_bound((*spatial, self.plan.num_classes), 1, gz=gz)
            elif kind in ("statistics", "statistics_csv"):
                sizes[kind] = (4 << 10) + STATS_MAX_BYTES_PER_LABEL * len(self.plan.label_values)
            elif kind == "preview":
                sizes[kind] = PREVIEW_MAX_BYTES
            elif kind in ("dicom_seg", "rtstruct"):
                from medseg.inference.dicom_outputs import output_size_bound

                sizes[kind] = output_size_bound(kind, spatial, len(self.plan.label_values) - 1)
            else:
                sizes[kind] = PROVENANCE_MAX_BYTES + (1 << 10) * len(self.models)
        return sizes

    def check_free_space(self, paths: dict[str, Path], shape: Sequence[int], *, pending: int = 0) -> None:
        """Refuse a case whose outputs (bounded by :meth:`output_bytes`) do not fit on the disk.

        ``pending``: bytes of earlier outputs still being written to the same disk.

        Raises:
            OutputWriteError: needed vs free space, the folder, and how to fix it.
        """
        from medseg.io.writers import check_free_space, format_bytes

        sizes = self.output_bytes(paths, shape)
        by_folder: dict[Path, int] = {}
        for kind, size in sizes.items():
            by_folder[paths[kind].parent] = by_folder.get(paths[kind].parent, 0) + size
        parts = ", ".join(f"{kind} {format_bytes(size)}" for kind, size in sizes.items())
        still = f", plus {format_bytes(pending)} of earlier outputs still being written" if pending else ""
        for folder, needed in by_folder.items():
            check_free_space(
                folder, needed + pending, what=f"the outputs of {paths['mask'].name} ({parts}{still})"
            )

    def predict_scores(self, image: np.ndarray, *, timings: dict[str, float] | None = None) -> tuple[torch.Tensor, str]:
        """Plan-grid scores of a preprocessed image: logits (one model) or mean probabilities (ensemble).

        Returns:
            ``(scores, kind)`` with ``scores`` ``(K, *spatial)`` on the CPU and
            ``kind`` ``"logits"`` or ``"probs"``.
        """
        import torch

        from medseg.inference.sliding_window import iter_logit_slabs, plan_windows

        plan = self.plan
        shape = tuple(image.shape[1:])
        k = plan.num_classes
        dtype = torch.float32 if k * int(np.prod(shape)) <= FLOAT32_SCORES_LIMIT else torch.float16
        axis = plan_windows(shape, plan, self.overlap).stream_axis
        ensemble = len(self.models) > 1
        scores = (torch.zeros if ensemble else torch.empty)((k, *shape), dtype=dtype)
        t0 = time.perf_counter()
        for network in self.networks:
            for start, stop, slab in iter_logit_slabs(
                network,
                image,
                plan,
                overlap=self.overlap,
                batch_size=self.batch_size,
                tta=self.tta,
                device=self.device,
                skip_empty=self.skip_empty_windows,
                timings=timings,
            ):
                index = [slice(None)] * len(shape)
                index[axis] = slice(start, stop)
                target = scores[(slice(None), *index)]
                if ensemble:
                    target.add_(torch.softmax(slab, dim=0).to("cpu", dtype=dtype))
                else:
                    target.copy_(slab.to("cpu", dtype=dtype))
        if ensemble:
            scores.div_(len(self.models))
        if timings is not None:
            timings["sliding_window_s"] = time.perf_counter() - t0
        return scores, ("probs" if ensemble else "logits")

    def _finish(self, prepared: _Prepared, *, probabilities: bool, confidence: bool = False) -> Prediction:
        from medseg.inference.restore import restore_prediction
        from medseg.inference.stats import label_statistics

        timings = prepared.timings
        record = prepared.case.record
        image = prepared.case.image
        prepared.case = None  # type: ignore[assignment]  # free the plan-grid image after the network
        scores, kind = self.predict_scores(image, timings=timings)
        del image
        if confidence:
            from medseg.inference.quality import foreground_confidence

            fg_confidence = foreground_confidence(scores, kind)
        t0 = time.perf_counter()
        classes, probs = restore_prediction(scores, record, kind=kind, probabilities=probabilities)
        del scores
        timings["restore_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        classes = postprocess(classes, self.postprocess)
        values = np.asarray(self.plan.label_values)
        lut = values.astype(np.uint8 if values.max() <= 255 else np.uint16)
        if classes.dtype == lut.dtype and np.array_equal(values, np.arange(len(values))):
            mask = classes  # label values are the class indices: no look-up pass over the scan
        else:
            mask = lut[classes]
        statistics = label_statistics(mask, prepared.volume.geometry, self.labels)
        timings["postprocess_s"] = time.perf_counter() - t1
        input_hash = prepared.input_hash
        if isinstance(input_hash, concurrent.futures.Future):
            input_hash = input_hash.result()
        volume = prepared.volume
        provenance = make_provenance(
            models=[
                {"path": str(m.path), "name": m.model_name, "fold": m.fold, "weights_sha256": m.meta["weights_sha256"]}
                for m in self.models
            ],
            settings=self.settings(),
            input_path=volume.path,
            input_sha256=input_hash,
            device=str(self.device),
        )
        return Prediction(
            mask=mask,
            geometry=volume.geometry,
            probabilities=probs,
            statistics=statistics,
            provenance=provenance,
            labels=self.labels,
            timings=timings,
            source=volume.path,
            confidence=fg_confidence if confidence else None,
        )

    # ----------------------------------------------------------------- public
    def predict(
        self,
        scan: str | os.PathLike | Volume | tuple[np.ndarray, np.ndarray],
        *,
        probabilities: bool = False,
        series_uid: str | None = None,
        resample_tilt: bool = False,
    ) -> Prediction:
        """Segment one scan.

        Args:
            scan: a NIfTI/MetaImage/NRRD file, a DICOM series folder, a
                :class:`~medseg.io.Volume`, or ``(array, affine)`` with ``array``
                ``(*spatial)`` or channel-first ``(C, *spatial)`` and a 4x4
                voxel-to-RAS affine; or a *list* with one single-channel scan
                (path or Volume) per model channel, in the model's channel order
                (nnU-Net's ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz`` ...), all on one grid.
            probabilities: also return per-class probabilities (uint8, p * 255).
            series_uid: which series of a DICOM folder holding several.
            resample_tilt: read a gantry-tilted DICOM series onto a regular grid
                (:func:`~medseg.io.read_volume`); the mask is on that corrected grid.

        Returns:
            A :class:`Prediction` on the scan's grid.

        Raises:
            ScanReadError: unreadable scan, wrong channel count.
            GeometryError: a 2D scan for a 3D model (or the reverse).
        """
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            prepared = self._prepare(scan, series_uid, hash_pool=pool, resample_tilt=resample_tilt)
            return self._finish(prepared, probabilities=probabilities)

    def write(
        self,
        prediction: Prediction,
        paths: dict[str, Path],
        *,
        volume: Volume | None = None,
        overwrite: bool = False,
        anonymize: bool = False,
        dicom_seg_type: str | None = None,
    ) -> dict[str, Path]:
        """Write a prediction's outputs (kinds as in :func:`output_paths`); returns what was written.

        The mask is written with ``medseg.io.write_mask`` (atomic, geometry
        checked). ``volume`` (the scan) is needed for the preview and the DICOM
        outputs (``dicom_seg_type``: ``binary`` or ``labelmap``, see
        :mod:`medseg.inference.dicom_outputs`). ``anonymize``
        writes the provenance without input and model paths
        (:func:`~medseg.inference.provenance.anonymize_provenance`); the other
        outputs hold no path, only the case name of ``paths``.
        """
        from medseg.io import write_mask, write_volume

        written: dict[str, Path] = {}
        like: Volume | Geometry = volume if volume is not None else prediction.geometry
        inputs = (prediction.source,) if prediction.source is not None else ()
        for path in paths.values():
            check_output_path(path, overwrite=overwrite, inputs=inputs)
        written["mask"] = write_mask(prediction.mask, like, paths["mask"], overwrite=overwrite)
        if "dicom_seg" in paths or "rtstruct" in paths:
            from medseg.inference.dicom_outputs import write_dicom_outputs

            written.update(write_dicom_outputs(
                prediction, paths, volume=volume, seg_type=dicom_seg_type, overwrite=overwrite, anonymize=anonymize
            ))
        if "probabilities" in paths:
            if prediction.probabilities is None:
                raise ConfigError("probabilities were not computed: call predict(..., probabilities=True).")
            written["probabilities"] = write_volume(
                prediction.probabilities, like, paths["probabilities"], overwrite=overwrite
            )
        if "statistics" in paths or "statistics_csv" in paths:
            from medseg.inference.stats import write_statistics

            for kind in ("statistics", "statistics_csv"):
                if kind in paths:
                    written[kind] = write_statistics(
                        prediction.statistics,
                        paths[kind],
                        overwrite=overwrite,
                        extra={"case": paths["mask"].name.removesuffix(OUTPUT_SUFFIXES["mask"])},
                    )
        if "preview" in paths:
            from medseg.inference.preview import write_preview

            if volume is None:
                raise ConfigError("a preview needs the scan: pass volume= to Segmenter.write().")
            title = paths["mask"].name.removesuffix(OUTPUT_SUFFIXES["mask"])
            written["preview"] = write_preview(
                volume.array[0], prediction.mask, prediction.geometry, paths["preview"],
                labels=prediction.labels, title=title, statistics=prediction.statistics, overwrite=overwrite,
            )
        if "provenance" in paths:
            record = anonymize_provenance(prediction.provenance) if anonymize else dict(prediction.provenance)
            record["outputs"] = {k: p.name for k, p in written.items()}
            record["timings_s"] = {k: round(v, 4) for k, v in prediction.timings.items()}
            written["provenance"] = write_json_atomic(record, paths["provenance"], overwrite=overwrite)
        return written

    def predict_many(
        self,
        scans: Sequence[str | os.PathLike] | Sequence[tuple[Path, str]],
        out_dir: str | os.PathLike,
        *,
        probabilities: bool = False,
        statistics: bool = False,
        preview: bool = False,
        overwrite: bool = False,
        series_uid: str | None = None,
        mask_path: str | os.PathLike | None = None,
        prefetch: bool = True,
        anonymize: bool = False,
        resample_tilt: bool = False,
        formats: Sequence[str] = ("nifti",),
        dicom_seg_type: str | None = None,
    ) -> list[dict[str, Path]]:
        """Segment several scans and write their outputs into ``out_dir``.

        Reading + preprocessing of the next scan and writing of the previous
        one run in background threads while the network works on the current
        one. Every output path is checked before any work starts, so an
        existing output (without ``overwrite``) stops the run with nothing
        written; a bad scan stops it before that scan's outputs are written.

        Args:
            scans: paths, or ``(path, case name)`` pairs from :func:`collect_inputs`.
            out_dir: output folder (created when the first output is written).
            probabilities, statistics, preview: side outputs to write.
            overwrite: replace existing outputs (never an input).
            series_uid: series to read from DICOM folders holding several.
            resample_tilt: read gantry-tilted DICOM series onto a regular grid
                (:func:`~medseg.io.read_volume`); their masks are on that corrected grid.
            mask_path: explicit mask file for a single scan.
            prefetch: read the next scan while segmenting the current one
                (holds two scans in memory).
            anonymize: name every case ``case_<12 hex digits of its content's sha256>``
                (:func:`~medseg.inference.provenance.anonymous_case_name`; names given
                in ``(path, name)`` pairs are replaced) and write no input or model
                path into any output.
            formats: also ``dicom-seg`` and/or ``rtstruct`` for DICOM series inputs
                (:mod:`~medseg.inference.dicom_outputs`), with ``dicom_seg_type``
                ``binary`` (default) or ``labelmap``.

        Returns:
            Per case, output kind -> path written.
        """
        from medseg.inference.dicom_outputs import check_output_formats, parse_formats

        cases = [(Path(s[0]), s[1]) if isinstance(s, tuple) else (Path(s), case_name(s)) for s in scans]
        formats = parse_formats(formats)
        check_output_formats(cases, formats, anonymize=anonymize)
        if anonymize:
            cases = _named(cases, anonymize=True)
        plans = plan_outputs(
            cases, out_dir, probabilities=probabilities, statistics=statistics, preview=preview,
            overwrite=overwrite, mask_path=mask_path, formats=formats,
        )
        if not cases:
            return []
        for folder in sorted({paths["mask"].parent for paths in plans}):
            _check_output_dir(folder)  # before any compute: an unusable -o fails at once
        for (path, _name), paths in zip(cases, plans):  # before any scan is read: shapes from the headers
            shape = _declared_shape(path, self.plan.data_dims)
            if shape is not None:
                self.check_free_space(paths, shape)
        with (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-read") as reader,
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-write") as writer,
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-hash") as hasher,
        ):
            writes: list[tuple[concurrent.futures.Future, int]] = []  # (write, its outputs' size bound)

            def read(i: int) -> concurrent.futures.Future:
                return reader.submit(
                    self._prepare, cases[i][0], series_uid, hash_pool=hasher, resample_tilt=resample_tilt
                )

            # A scan is read in the reader thread only to overlap with the network on the previous
            # one; otherwise (the first scan, prefetch=False) in this thread: nothing to overlap
            # with, and a scan read in a worker thread leaves its transient read buffers in that
            # thread's malloc arena (+0.3-0.5 GB peak RSS on a 512 x 512 x 1000 CT).
            upcoming: concurrent.futures.Future | None = None
            for i, (path, name) in enumerate(cases):
                if upcoming is not None:
                    prepared = upcoming.result()
                else:
                    prepared = self._prepare(path, series_uid, hash_pool=hasher, resample_tilt=resample_tilt)
                upcoming = read(i + 1) if prefetch and i + 1 < len(cases) else None
                for done, _size in writes:  # surface a failed write before going on
                    if done.done():
                        done.result()
                # the disk may have filled since the start: check again before the network runs
                shape = prepared.volume.geometry.shape
                self.check_free_space(plans[i], shape, pending=sum(size for f, size in writes if not f.done()))
                log.info("segmenting %s (%d/%d)", name, i + 1, len(cases))
                prediction = self._finish(prepared, probabilities=probabilities)
                _make_output_dir(plans[i]["mask"].parent)
                write = writer.submit(
                    self.write, prediction, plans[i], volume=prepared.volume, overwrite=overwrite, anonymize=anonymize,
                    dicom_seg_type=dicom_seg_type,
                )
                writes.append((write, sum(self.output_bytes(plans[i], shape).values())))
                del prepared, prediction
            return [f.result() for f, _size in writes]


def _declared_shape(path: Path, data_dims: int) -> tuple[int, ...] | None:
    """Spatial shape a scan file's header declares, without reading its voxels (None: not known).

    NIfTI headers are read with nibabel, MetaImage/NRRD headers with SimpleITK;
    DICOM folders and unreadable headers give None (the reader reports those).
    """
    lower = path.name.lower()
    try:
        if path.is_file() and lower.endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            shape = tuple(int(s) for s in nib.load(path).header.get_data_shape())
        elif path.is_file() and lower.endswith((".mha", ".mhd", ".nrrd", ".nhdr")):
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            shape = tuple(int(s) for s in reader.GetSize())
        else:
            return None
    except Exception:  # a broken header is reported by the reader, with its own message
        return None
    return shape[:data_dims] if len(shape) >= data_dims else None


def _check_output_dir(folder: Path) -> None:
    """Refuse an output folder that cannot be created or written, without creating it."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputWriteError(f"cannot write into {folder}: {existing} is a file, not a folder; pass another -o/--output.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputWriteError(f"cannot write into {folder}: {existing} is not writable; pass another -o/--output.")


def _make_output_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputWriteError(
            f"cannot create the output folder {folder}: {err.strerror or err}; pass another -o/--output."
        ) from err


def plan_outputs(
    cases: Sequence[tuple[Path, str]],
    out_dir: str | os.PathLike,
    *,
    probabilities: bool = False,
    statistics: bool = False,
    preview: bool = False,
    overwrite: bool = False,
    mask_path: str | os.PathLike | None = None,
    formats: Sequence[str] = ("nifti",),
) -> list[dict[str, Path]]:
    """Output paths of every case (see :func:`output_paths`), checked before any work starts.

    Raises:
        ConfigError: ``mask_path`` with more than one case.
        OutputExistsError: an output exists (without ``overwrite``) or would land on an input.
    """
    if mask_path is not None and len(cases) != 1:
        raise ConfigError(f"an output file name ({mask_path}) needs exactly one input; got {len(cases)}.")
    plans = []
    for path, name in cases:
        paths = output_paths(
            name, out_dir, probabilities=probabilities, statistics=statistics, preview=preview, mask_path=mask_path,
            formats=formats, source=path,
        )
        for p in paths.values():
            _check_planned_output(p, path, overwrite=overwrite)
        plans.append(paths)
    return plans


def _check_planned_output(path: Path, source: Path, *, overwrite: bool) -> None:
    """Refuse an output that would land on the input or replace a file without ``overwrite``."""
    resolved, src = path.resolve(), source.resolve()
    if resolved == src or (src.is_dir() and src in resolved.parents):
        raise OutputExistsError(f"output {path} would write onto the input {source}; choose another -o folder.")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} exists; pass --overwrite (overwrite=True) to replace it.")
