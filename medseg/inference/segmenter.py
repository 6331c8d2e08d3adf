"""Segment scans with a trained model folder: the predictor behind ``medseg infer``.

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
3. sliding-window logits (``medseg.inference.sliding_window``, settings in one
   :class:`~medseg.inference.sliding_window.WindowOptions`), with mirroring TTA
   if asked; several folds are averaged in probability space;
4. restore to the scan's grid (``medseg.inference.restore``: resample back in
   slabs, argmax, un-crop, un-orient, grid check);
5. postprocess (``largest`` / ``min-size=N``), map class indices to the label
   values of the training data, per-label statistics.

This module predicts; it names and writes no files except :meth:`Prediction.save`.
Output files (names, checks, writing) are :class:`~medseg.inference.outputs.OutputSpec`'s;
running many scans (read-ahead, background writes, manifest, resuming) is
:mod:`medseg.inference.jobs`' (:meth:`Segmenter.predict_many` calls
:func:`~medseg.inference.jobs.predict_many`).

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
from medseg.errors import CheckpointError, ConfigError, GeometryError, ScanReadError
from medseg.inference.postprocess import PostprocessSpec, parse_postprocess, postprocess
from medseg.inference.provenance import check_output_path, hash_input, make_provenance
from medseg.inference.sliding_window import WindowOptions
from medseg.io.geometry import Geometry
from medseg.io.images2d import refuse_palette_image
from medseg.io.volume import Volume

if TYPE_CHECKING:
    import torch

    from medseg.data.plan import Plan
    from medseg.data.preprocess import PreprocessedCase
    from medseg.inference.outputs import OutputSpec
    from medseg.model_folder import LoadedModel, ModelBuilder

__all__ = [
    "FLOAT32_SCORES_LIMIT",
    "Prediction",
    "PreparedScan",
    "Segmenter",
]

log = logging.getLogger(__name__)

#: Plan-grid scores with more values than this are stored as float16 (512 MiB as float32).
FLOAT32_SCORES_LIMIT = 1 << 27

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


# --------------------------------------------------------------------------- the segmenter


@dataclass
class PreparedScan:
    """A scan read, checked and preprocessed (:meth:`Segmenter.prepare`), waiting for the network.

    Attributes:
        volume: the scan as read.
        case: the preprocessed image and its record (released by :meth:`Segmenter.predict_prepared`).
        timings: seconds of reading and preprocessing so far.
        input_hash: sha256 of the input file(s), or a future of it while it is computed.
    """

    volume: Volume
    case: PreprocessedCase | None
    timings: dict[str, float]
    input_hash: concurrent.futures.Future | str | None


class Segmenter:
    """A loaded model (or fold ensemble) that segments scans; keeps the networks in memory.

    Build it with :meth:`load`. Settings not given fall back to the ``infer``
    section stored with the model (``InferConfig``).

    Args:
        models: loaded model folders (one per fold); their plans must be identical.
        device: where the networks run.
        window: overlap, batch size, mirroring TTA and window skipping of the sliding window.
        postprocess: ``none``, ``largest`` or ``min-size=N``.
        backend: how the networks run (``medseg.inference.backends``: torch, channels-last,
            compile, onnxruntime, openvino or auto); each is checked against PyTorch when set up.
    """

    def __init__(
        self,
        models: Sequence[LoadedModel],
        *,
        device: torch.device,
        window: WindowOptions,
        postprocess: str | PostprocessSpec = "none",
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
        self.models = list(models)
        self.device = device
        self.window = window
        self.postprocess = parse_postprocess(postprocess)
        from medseg.inference.backends import prepare_network

        #: what the sliding window runs, one per model (the network itself for ``torch``)
        self.networks = [
            prepare_network(m.model, m.plan, backend, device=device, batch_size=window.batch_size)
            for m in self.models
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
            backend: ``auto`` (default: PyTorch, see ``medseg.inference.backends.AUTO_ORDER``),
                ``torch``, ``channels-last``, ``compile``, ``onnxruntime`` or ``openvino``
                (1.5x faster on CPUs, masks within 0.999 Dice; ``medseg.inference.backends``).

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
        window = WindowOptions(
            overlap=defaults.overlap if overlap is None else overlap,
            batch_size=defaults.batch_size if batch_size is None else batch_size,
            tta=tta_on,
            skip_empty=defaults.skip_empty_windows if skip_empty_windows is None else skip_empty_windows,
        )
        return cls(
            models,
            device=dev,
            window=window,
            postprocess=defaults.postprocess if postprocess is None else postprocess,
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
            "overlap": self.window.overlap,
            "tta": self.window.tta,
            "batch_size": self.window.batch_size,
            "postprocess": str(self.postprocess),
            "skip_empty_windows": self.window.skip_empty,
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

    def prepare(
        self,
        scan: Any,
        *,
        series_uid: str | None = None,
        resample_tilt: bool = False,
        hash_pool: concurrent.futures.Executor | None = None,
    ) -> PreparedScan:
        """Read, check and preprocess a scan (steps 1-2); :meth:`predict_prepared` does the rest.

        Arguments as in :meth:`predict`; ``hash_pool`` computes the input's sha256 in the
        background. A job runner prepares the next scan while the network works on this one.
        """
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
        return PreparedScan(volume=volume, case=case, timings=timings, input_hash=input_hash)

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
        axis = plan_windows(shape, plan, self.window.overlap).stream_axis
        ensemble = len(self.models) > 1
        scores = (torch.zeros if ensemble else torch.empty)((k, *shape), dtype=dtype)
        t0 = time.perf_counter()
        for network in self.networks:
            for start, stop, slab in iter_logit_slabs(
                network, image, plan, self.window, device=self.device, timings=timings
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

    def predict_prepared(
        self, prepared: PreparedScan, *, probabilities: bool = False, confidence: bool = False
    ) -> Prediction:
        """Segment a scan from :meth:`prepare` (steps 3-5); frees its plan-grid image.

        ``confidence`` also computes :attr:`Prediction.confidence` (for the QC flags).
        """
        from medseg.inference.restore import restore_prediction
        from medseg.inference.stats import label_statistics

        timings = prepared.timings
        record = prepared.case.record
        image = prepared.case.image
        prepared.case = None  # free the plan-grid image after the network
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
            prepared = self.prepare(scan, series_uid=series_uid, resample_tilt=resample_tilt, hash_pool=pool)
            return self.predict_prepared(prepared, probabilities=probabilities)

    def predict_many(
        self,
        scans: Sequence[str | os.PathLike] | Sequence[tuple[Path, str]],
        out_dir: str | os.PathLike | OutputSpec,
        *,
        series_uid: str | None = None,
        resample_tilt: bool = False,
        prefetch: bool = True,
        **outputs: Any,
    ) -> list[dict[str, Path]]:
        """Segment several scans and write their outputs: :func:`medseg.inference.jobs.predict_many`.

        Args:
            scans: paths, or ``(path, case name)`` pairs from
                :func:`~medseg.inference.jobs.collect_inputs`.
            out_dir: output folder, or a whole :class:`~medseg.inference.outputs.OutputSpec`.
            series_uid, resample_tilt: as in :meth:`predict`.
            prefetch: read the next scan while segmenting the current one (holds two scans in memory).
            **outputs: with a folder, the other :class:`~medseg.inference.outputs.OutputSpec`
                fields: ``probabilities``, ``statistics``, ``preview``, ``overwrite``,
                ``mask_path``, ``anonymize``, ``formats``, ``dicom_seg_type``.

        Returns:
            Per case, output kind -> path written.
        """
        from medseg.inference.jobs import predict_many
        from medseg.inference.outputs import OutputSpec

        if isinstance(out_dir, OutputSpec):
            if outputs:
                raise ConfigError(
                    f"predict_many got an OutputSpec and {', '.join(sorted(outputs))}: set them in the OutputSpec."
                )
            spec = out_dir
        else:
            spec = OutputSpec(Path(out_dir), **outputs)
        return predict_many(self, scans, spec, series_uid=series_uid, resample_tilt=resample_tilt, prefetch=prefetch)

