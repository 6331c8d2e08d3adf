"""What ``medseg infer`` writes for each case: names, checks before any work, and the writing itself.

::

    spec = OutputSpec(Path("out"), statistics=True, preview=True)
    spec.paths("liver_01")      # {"mask": out/liver_01_mask.nii.gz, "statistics": ..., "provenance": ...}
    spec.write(prediction, spec.paths("liver_01"), volume=volume)

An :class:`OutputSpec` is immutable and holds everything about the outputs:
the folder (or one mask file name), which kinds to write, ``overwrite`` and
``anonymize``. Adding an output kind means one entry in
:data:`OUTPUT_SUFFIXES`, a field, and its branch in :meth:`OutputSpec.write`
and :func:`output_bytes`, all in this module; the job runner
(:mod:`medseg.inference.jobs`) and the CLI only pass the spec along.

Names: ``<case>_mask.nii.gz`` (``<case>_mask.png`` for a 2D image) and
optionally ``<case>_probs.nii.gz``, ``<case>_stats.json``/``.csv``,
``<case>_preview.png``, ``<case>_seg.dcm``, ``<case>_rtstruct.dcm``;
``<case>_provenance.json`` always. Masks go through ``medseg.io.write_mask``
(atomic, geometry checked before the rename); the other files through
``medseg.io.atomic``. An output never replaces an input
(:func:`~medseg.inference.provenance.check_output_path`, the one owner of that rule).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.errors import ConfigError, OutputWriteError
from medseg.inference.dicom_outputs import check_output_formats, output_size_bound, parse_formats
from medseg.inference.provenance import anonymize_provenance, check_output_path, write_json_atomic
from medseg.io.atomic import make_folder
from medseg.io.formats import MASK_IMAGE_SUFFIXES, MASK_SUFFIXES, NIFTI_SUFFIXES, has_suffix, strip_suffix
from medseg.io.images2d import is_image_path

if TYPE_CHECKING:
    from medseg.data.plan import Plan
    from medseg.inference.segmenter import Prediction
    from medseg.io.geometry import Geometry
    from medseg.io.volume import Volume

__all__ = [
    "OUTPUT_SUFFIXES",
    "OutputSpec",
    "check_output_space",
    "output_bytes",
]

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

@dataclass(frozen=True)
class OutputSpec:
    """The outputs of a job: where, which kinds, and whether existing files may be replaced.

    Attributes:
        out_dir: output folder (created when the first output is written).
        probabilities: also ``<case>_probs.nii.gz`` (uint8, 255 = probability 1; not for 2D images).
        statistics: also ``<case>_stats.json`` and ``.csv``.
        preview: also ``<case>_preview.png``.
        formats: ``nifti`` (always) plus ``dicom-seg`` and/or ``rtstruct`` for DICOM series inputs
            (:mod:`~medseg.inference.dicom_outputs`); a comma-separated string is accepted.
        dicom_seg_type: DICOM-SEG encoding, ``binary`` (default) or ``labelmap``.
        mask_path: the mask file of a single case (``-o liver.nii.gz``); the other outputs go
            beside it with its stem, and ``out_dir`` is its folder.
        overwrite: replace existing outputs (never an input).
        anonymize: write no input or model path into any output (the job runner also names
            the cases anonymously).
    """

    out_dir: Path = Path(".")
    probabilities: bool = False
    statistics: bool = False
    preview: bool = False
    formats: tuple[str, ...] = ("nifti",)
    dicom_seg_type: str | None = None
    mask_path: Path | None = None
    overwrite: bool = False
    anonymize: bool = False

    def __post_init__(self) -> None:
        mask_path = Path(self.mask_path) if self.mask_path is not None else None
        object.__setattr__(self, "mask_path", mask_path)
        object.__setattr__(self, "out_dir", mask_path.parent if mask_path is not None else Path(self.out_dir))
        object.__setattr__(self, "formats", parse_formats(self.formats))

    @property
    def kinds(self) -> tuple[str, ...]:
        """The output kinds written besides the mask (keys of :data:`OUTPUT_SUFFIXES`)."""
        wanted = {
            "probabilities": self.probabilities,
            "statistics": self.statistics,
            "statistics_csv": self.statistics,
            "preview": self.preview,
            "provenance": True,
            "dicom_seg": "dicom-seg" in self.formats,
            "rtstruct": "rtstruct" in self.formats,
        }
        return tuple(kind for kind, on in wanted.items() if on)

    @classmethod
    def to(cls, target: str | os.PathLike, **fields: object) -> OutputSpec:
        """The outputs of ``-o TARGET``: a folder, or the mask file of one case (``.nii.gz``, or ``.png`` ... for 2D).

        ``fields`` are the other attributes (``statistics=True`` ...).
        """
        target = Path(target)
        if has_suffix(target, NIFTI_SUFFIXES + MASK_IMAGE_SUFFIXES):  # one file; 2D masks may be images
            return cls(target.parent, mask_path=target, **fields)  # type: ignore[arg-type]
        return cls(target, **fields)  # type: ignore[arg-type]

    # ----------------------------------------------------------------- names
    def paths(self, case: str, source: str | os.PathLike | None = None) -> dict[str, Path]:
        """Output files of one case, kind -> path (kinds as in :data:`OUTPUT_SUFFIXES`).

        A ``source`` that is a 2D image (``.png``, ``.jpg``, ``.tif`` ...) gets its mask
        as ``<case>_mask.png`` (a lossless greyscale PNG; :mod:`medseg.io.images2d`).

        Raises:
            ConfigError: ``probabilities`` for a 2D image.
        """
        stem = case
        if self.mask_path is not None:
            name = self.mask_path.name
            stem = strip_suffix(name, MASK_SUFFIXES) if has_suffix(self.mask_path, MASK_SUFFIXES) else self.mask_path.stem
            stem = stem[: -len("_mask")] if stem.endswith("_mask") else stem
        mask_suffix = OUTPUT_SUFFIXES["mask"]
        if source is not None and is_image_path(source):
            mask_suffix = "_mask.png"
            if self.probabilities:
                raise ConfigError(
                    f"{Path(source).name}: --probs is not available for 2D images (the per-class probabilities of an "
                    "image have no single-file form that viewers read); leave --probs out."
                )
        paths = {"mask": self.mask_path if self.mask_path is not None else self.out_dir / (stem + mask_suffix)}
        for kind in self.kinds:
            paths[kind] = self.out_dir / (stem + OUTPUT_SUFFIXES[kind])
        return paths

    # ----------------------------------------------------------------- checks before any work
    def check_formats(self, cases: Sequence[tuple[Path | Sequence[Path], str]]) -> None:
        """Refuse DICOM formats for inputs that are not DICOM series folders, or with ``anonymize``.

        Raises:
            ConfigError: which input, why, and how to fix it.
        """
        check_output_formats([(_first(inputs), name) for inputs, name in cases], self.formats, anonymize=self.anonymize)

    def plan(self, cases: Sequence[tuple[Path | Sequence[Path], str]], *, check_existing: bool = True) -> list[dict[str, Path]]:
        """Output paths of every case (:meth:`paths`), checked before any work starts.

        ``cases`` are ``(input or inputs, case name)`` pairs. No output may land on an
        input; with ``check_existing`` (and without ``overwrite``) none may exist.

        Raises:
            ConfigError: ``mask_path`` with more than one case.
            OutputExistsError: an output exists or would land on an input.
        """
        if self.mask_path is not None and len(cases) != 1:
            raise ConfigError(f"an output file name ({self.mask_path}) needs exactly one input; got {len(cases)}.")
        plans = []
        for inputs, name in cases:
            sources = (Path(inputs),) if isinstance(inputs, (str, os.PathLike)) else tuple(Path(p) for p in inputs)
            paths = self.paths(name, sources[0])
            for p in paths.values():  # never onto an input; an existing file only with overwrite (or resume)
                check_output_path(p, overwrite=self.overwrite or not check_existing, inputs=sources, need_folder=False)
            plans.append(paths)
        return plans

    @staticmethod
    def check_folders(plans: Sequence[dict[str, Path]]) -> None:
        """Refuse output folders that cannot be created or written, without creating them.

        Raises:
            OutputWriteError: the folder, what is wrong, and to pass another ``-o``.
        """
        for folder in sorted({paths["mask"].parent for paths in plans}):
            existing = folder
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
            if not existing.is_dir():
                raise OutputWriteError(
                    f"cannot write into {folder}: {existing} is a file, not a folder; pass another -o/--output."
                )
            if not os.access(existing, os.W_OK | os.X_OK):
                raise OutputWriteError(f"cannot write into {folder}: {existing} is not writable; pass another -o/--output.")

    @staticmethod
    def make_folder(paths: dict[str, Path]) -> None:
        """Create the folder of a case's outputs.

        Raises:
            OutputWriteError: it cannot be created.
        """
        make_folder(paths["mask"].parent, "output folder")

    # ----------------------------------------------------------------- writing
    def write(self, prediction: Prediction, paths: dict[str, Path], *, volume: Volume | None = None) -> dict[str, Path]:
        """Write a prediction's outputs named in ``paths``; returns what was written, kind -> path.

        ``volume`` (the scan as read) is needed for the preview and the DICOM outputs.
        With ``anonymize`` the provenance holds no input or model path
        (:func:`~medseg.inference.provenance.anonymize_provenance`); the other outputs
        hold no path, only the case name of ``paths``.

        Raises:
            OutputExistsError: an output exists (without ``overwrite``) or is the input.
            ConfigError: probabilities not computed, or no ``volume`` for a preview/DICOM output.
        """
        from medseg.io import write_mask, write_volume

        overwrite = self.overwrite
        written: dict[str, Path] = {}
        like: Volume | Geometry = volume if volume is not None else prediction.geometry
        inputs = (prediction.source,) if prediction.source is not None else ()
        for path in paths.values():
            check_output_path(path, overwrite=overwrite, inputs=inputs)
        case = paths["mask"].name.removesuffix(OUTPUT_SUFFIXES["mask"])
        written["mask"] = write_mask(prediction.mask, like, paths["mask"], overwrite=overwrite)
        if "dicom_seg" in paths or "rtstruct" in paths:
            from medseg.inference.dicom_outputs import write_dicom_outputs

            written.update(write_dicom_outputs(
                prediction, paths, volume=volume, seg_type=self.dicom_seg_type, overwrite=overwrite,
                anonymize=self.anonymize,
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
                        prediction.statistics, paths[kind], overwrite=overwrite, extra={"case": case}
                    )
        if "preview" in paths:
            from medseg.inference.preview import write_preview

            if volume is None:
                raise ConfigError("a preview needs the scan: pass volume= to OutputSpec.write().")
            written["preview"] = write_preview(
                volume.array[0], prediction.mask, prediction.geometry, paths["preview"],
                labels=prediction.labels, title=case, statistics=prediction.statistics, overwrite=overwrite,
            )
        if "provenance" in paths:
            record = anonymize_provenance(prediction.provenance) if self.anonymize else dict(prediction.provenance)
            record["outputs"] = {k: p.name for k, p in written.items()}
            record["timings_s"] = {k: round(v, 4) for k, v in prediction.timings.items()}
            written["provenance"] = write_json_atomic(record, paths["provenance"], overwrite=overwrite)
        return written


def _first(inputs: Path | Sequence[Path]) -> Path:
    return Path(inputs) if isinstance(inputs, (str, os.PathLike)) else Path(inputs[0])


# --------------------------------------------------------------------------- disk space


def output_bytes(paths: dict[str, Path], shape: Sequence[int], plan: Plan, *, num_models: int = 1) -> dict[str, int]:
    """Upper bound in bytes of each output in ``paths`` for a scan of spatial ``shape``.

    NIfTI outputs are bounded by their uncompressed size (gzip guarantees
    nothing: see :func:`medseg.io.writers.nifti_size_bound`); the small side
    outputs by generous constants (the provenance grows by 1 KiB per model).
    """
    from medseg.io.writers import nifti_size_bound

    spatial = tuple(shape)
    mask_itemsize = 1 if max(plan.label_values) <= 255 else 2
    sizes = {}
    for kind, path in paths.items():
        gz = path.name.lower().endswith(".gz")
        if kind == "mask":
            sizes[kind] = nifti_size_bound(spatial, mask_itemsize, gz=gz)
        elif kind == "probabilities":
            sizes[kind] = nifti_size_bound((*spatial, plan.num_classes), 1, gz=gz)
        elif kind in ("statistics", "statistics_csv"):
            sizes[kind] = (4 << 10) + STATS_MAX_BYTES_PER_LABEL * len(plan.label_values)
        elif kind == "preview":
            sizes[kind] = PREVIEW_MAX_BYTES
        elif kind in ("dicom_seg", "rtstruct"):
            sizes[kind] = output_size_bound(kind, spatial, len(plan.label_values) - 1)
        else:
            sizes[kind] = PROVENANCE_MAX_BYTES + (1 << 10) * num_models
    return sizes


def check_output_space(
    paths: dict[str, Path], shape: Sequence[int], plan: Plan, *, num_models: int = 1, pending: int = 0
) -> None:
    """Refuse a case whose outputs (bounded by :func:`output_bytes`) do not fit on the disk.

    ``pending``: bytes of earlier outputs still being written to the same disk.

    Raises:
        OutputWriteError: needed vs free space, the folder, and how to fix it.
    """
    from medseg.io.writers import check_free_space, format_bytes

    sizes = output_bytes(paths, shape, plan, num_models=num_models)
    by_folder: dict[Path, int] = {}
    for kind, size in sizes.items():
        by_folder[paths[kind].parent] = by_folder.get(paths[kind].parent, 0) + size
    parts = ", ".join(f"{kind} {format_bytes(size)}" for kind, size in sizes.items())
    still = f", plus {format_bytes(pending)} of earlier outputs still being written" if pending else ""
    for folder, needed in by_folder.items():
        check_free_space(folder, needed + pending, what=f"the outputs of {paths['mask'].name} ({parts}{still})")
