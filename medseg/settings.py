"""The typed settings of each part of medseg: one frozen dataclass per config section.

Library functions take the section they need (``make_plan(fingerprint, DataConfig(...))``,
``build_train_transforms(plan, AugmentConfig(...))``, ``build_loss(LossConfig(...), plan)``);
:mod:`medseg.config` assembles them into one :class:`~medseg.config.Config` from YAML and
``--set`` overrides and validates it. This module imports only :mod:`medseg.errors`, so every
layer may use it.

Every field carries its documentation in ``field(metadata={"doc": ...})``;
``docs/config.md`` is generated from it and a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from medseg.errors import ConfigError

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "InferConfig",
    "LossConfig",
    "ModelConfig",
    "PostprocessSpec",
    "TrainConfig",
    "check_overlap",
    "parse_postprocess",
]


def _doc(text: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How cases become training patches. ``None`` fields are planned from the data."""

    spatial_dims: int | None = _doc(
        "2 trains on slices, 3 on volumes; null: 3 for 3D data, 2 for 2D data.", None
    )
    target_spacing: list[float] | None = _doc(
        "Resample every case to this spacing in mm (canonical RAS axis order); null: median spacing, "
        "with nnU-Net's rule for thick slices.",
        None,
    )
    patch_size: list[int] | None = _doc("Training patch in voxels; null: from the median shape and memory budget.", None)
    batch_size: int | None = _doc("Patches per step; null: from the memory budget (at least 2).", None)
    memory_budget_gb: float | None = _doc(
        "Activation memory the planner may use per step; null: 8 on CUDA, 1.0 on CPU/MPS.", None
    )
    normalization: Literal["auto", "ct", "zscore", "none"] = _doc(
        "Intensity normalisation; auto: 'ct' for CT channels (clip to a HU window, see ct_clip, then z-score "
        "with the dataset's foreground mean/std), per-image z-score otherwise.",
        "auto",
    )
    ct_clip: Literal["contrast_robust", "foreground_percentiles"] = _doc(
        "CT clip window: contrast_robust widens the training foreground's 0.5/99.5 percentiles to at least "
        "[-200, +500] HU so contrast-enhanced organs and vessels are not saturated (docs/plan.md); "
        "foreground_percentiles is nnU-Net's window (the percentiles themselves).",
        "contrast_robust",
    )
    crop_to_nonzero: bool = _doc("Crop each case to the bounding box of non-zero (non-air) voxels first.", True)
    foreground_oversample: float = _doc(
        "Share of patches centred on a foreground voxel (nnU-Net: 0.33); the rest are random.", 0.33
    )
    class_sampling: Literal["balanced", "uniform"] = _doc(
        "How a foreground patch picks its class: 'uniform' picks among the classes present in the case "
        "evenly (nnU-Net); 'balanced' favours rare classes (ratios from the fingerprint's class frequencies).",
        "uniform",
    )
    slice_context: int = _doc("2D only: neighbouring slices on each side stacked as extra input channels.", 0)
    num_folds: int = _doc("Cross-validation folds (k-fold by case, fixed seed).", 5)
    split_seed: int = _doc("Seed of the k-fold split (nnU-Net uses 12345).", 12345)
    splits_file: str | None = _doc("JSON file with explicit splits ([{train: [...], val: [...]}, ...]).", None)
    group_by_patient: bool = _doc("Keep all cases of one patient in the same fold (when patient ids are known).", True)
    cache_dir: str | None = _doc(
        "Where preprocessed cases are cached (arrays + JSON geometry); null: <run folder>/../.cache.", None
    )
    num_workers: int | None = _doc("Data loader worker processes; null: chosen from the CPU count.", None)
    check_dataset: bool = _doc("Run `medseg check` before training and stop on problems.", True)
    resample_tilt: bool = _doc(
        "Resample DICOM series acquired with gantry tilt onto a regular grid perpendicular to the table "
        "(as dcm2niix does; labels must then lie on that corrected grid) instead of refusing them "
        "(docs/geometry.md).",
        False,
    )


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """Training augmentation (MONAI transforms); probabilities are per sample."""

    enabled: bool = _doc("Master switch for all augmentation.", True)
    rotation_prob: float = _doc("Probability of a random rotation.", 0.2)
    rotation_degrees: float = _doc("Maximum rotation angle (degrees, each axis in 3D).", 30.0)
    scale_prob: float = _doc("Probability of random zoom.", 0.2)
    scale_range: list[float] = _doc("Zoom factor range.", factory=lambda: [0.7, 1.4])
    flip_prob: float = _doc("Probability of mirroring, per spatial axis.", 0.5)
    gamma_prob: float = _doc("Probability of a gamma change.", 0.3)
    gamma_range: list[float] = _doc("Gamma range.", factory=lambda: [0.7, 1.5])
    contrast_prob: float = _doc("Probability of a contrast change.", 0.15)
    contrast_range: list[float] = _doc("Contrast factor range.", factory=lambda: [0.75, 1.25])
    brightness_prob: float = _doc("Probability of multiplicative brightness.", 0.15)
    brightness_range: list[float] = _doc("Brightness factor range.", factory=lambda: [0.75, 1.25])
    noise_prob: float = _doc("Probability of additive Gaussian noise.", 0.1)
    noise_std: float = _doc("Maximum noise standard deviation (normalised intensity units).", 0.1)
    blur_prob: float = _doc("Probability of Gaussian blur.", 0.2)
    blur_sigma: list[float] = _doc("Blur sigma range in voxels.", factory=lambda: [0.5, 1.0])
    lowres_prob: float = _doc("Probability of low-resolution simulation (down- then up-sampling).", 0.25)
    lowres_range: list[float] = _doc("Down-sampling factor range for low-resolution simulation.", factory=lambda: [0.5, 1.0])
    ct_intensity_prob: float = _doc(
        "CT only: probability of a global change on the HU scale (shift, scale about water, noise), then a "
        "clip to the plan's window.", 0.3
    )
    ct_shift_hu: float = _doc("CT only: largest global HU shift (scanner calibration; water is 0 +- 7 HU).", 15.0)
    ct_scale_range: list[float] = _doc(
        "CT only: HU scale factor about water (0 HU): tube voltage changes iodine/bone contrast.", factory=lambda: [0.9, 1.1]
    )
    ct_noise_hu: float = _doc("CT only: largest standard deviation of added noise in HU (low-dose CT: ~20-40).", 20.0)
    label_intensity_prob: float = _doc(
        "CT only: probability that each labelled structure gets its own HU offset (contrast phases); 0 disables.",
        0.5,
    )
    label_intensity_range: list[float] = _doc(
        "CT only: range of the per-structure offset in HU (enhancement of soft tissue and vessels: up to "
        "~+300; for contrast-enhanced training scans use e.g. [-300, 30]).", factory=lambda: [-30.0, 300.0]
    )
    label_intensity_smooth: bool = _doc("CT only: soften the offset map's edges over one voxel.", True)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which network to train (see `medseg.models.list_models()`)."""

    name: str = _doc("Registered model name: unet, deeplabv3, deeplabv3plus, fcn, segresnet, ...", "unet")
    deep_supervision: bool = _doc("U-Net only: auxiliary outputs at lower resolutions (nnU-Net default).", True)
    options: dict[str, Any] = _doc("Extra keyword arguments for the model's constructor.", factory=dict)


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Loss function; imbalance-aware options for small structures."""

    name: Literal["dice_ce", "dice_focal", "generalized_dice", "tversky", "focal_tversky", "ce"] = _doc(
        "dice_ce (nnU-Net default), dice_focal, generalized_dice, tversky, focal_tversky, or ce "
        "(cross-entropy, with class weights when class_weights is set).",
        "dice_ce",
    )
    include_background: bool = _doc("Whether the Dice-type terms include the background class.", False)
    batch_dice: bool = _doc("Dice over the whole batch instead of per sample (stabler for small structures).", True)
    class_weights: Literal["none", "auto"] | list[float] = _doc(
        "Cross-entropy/focal class weights: none, auto (inverse square root of the fingerprint's class "
        "frequencies, normalised and clipped to [0.1, 10] x the mean), or one weight per class.",
        "none",
    )
    ignore_label: int | None = _doc("Label value marking unlabeled voxels; they do not contribute to the loss.", None)
    dice_weight: float = _doc("Weight of the Dice-type term in compound losses.", 1.0)
    ce_weight: float = _doc("Weight of the cross-entropy/focal term in compound losses.", 1.0)
    focal_gamma: float = _doc("Focusing parameter of the focal loss.", 2.0)
    tversky_alpha: float = _doc("Tversky weight of false positives.", 0.3)
    tversky_beta: float = _doc("Tversky weight of false negatives (beta > alpha favours recall).", 0.7)
    tversky_gamma: float = _doc("Focal Tversky exponent: loss = (1 - TI) ** gamma.", 0.75)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop (defaults: nnU-Net's recipe)."""

    max_epochs: int = _doc("Number of epochs (ignored when time_budget is set).", 1000)
    time_budget: str | float | None = _doc(
        "Wall-clock budget per fold, e.g. 90s, 25m, 4h (a number: seconds). The run is sized from the measured "
        "step time so that the learning-rate schedule, the validations and the final model write fit inside it; "
        "max_epochs and iterations_per_epoch are then chosen by medseg (docs/training.md). null: use max_epochs.",
        None,
    )
    iterations_per_epoch: int = _doc("Optimizer steps per epoch.", 250)
    optimizer: Literal["sgd", "adamw"] = _doc("sgd (Nesterov momentum, nnU-Net) or adamw.", "sgd")
    learning_rate: float = _doc("Initial learning rate (sgd: 1e-2; use ~3e-4 for adamw).", 1e-2)
    momentum: float = _doc("SGD momentum.", 0.99)
    weight_decay: float = _doc("Weight decay.", 3e-5)
    lr_schedule: Literal["poly", "cosine", "constant"] = _doc("poly: lr * (1 - epoch/max_epochs) ** 0.9.", "poly")
    grad_clip: float | None = _doc("Clip the gradient norm to this value; null disables.", 12.0)
    mixed_precision: Literal["auto", "off"] = _doc("auto: autocast + GradScaler on CUDA only; never on CPU.", "auto")
    val_every: int = _doc("Validate on whole validation cases (sliding window) every N epochs.", 5)
    early_stopping_patience: int | None = _doc(
        "Stop after this many validations without improvement of the mean foreground Dice; null: never.", None
    )
    fold: int | Literal["all"] = _doc("Fold to train (0..num_folds-1), or 'all' to train on every case.", 0)
    seed: int = _doc("Seed of python, numpy and torch RNGs (always recorded).", 12345)
    deterministic: bool = _doc("Deterministic algorithms (bitwise on CPU, best effort on GPU); slower.", False)
    device: str = _doc("auto, cpu, cuda, cuda:N or mps.", "auto")
    freeze_encoder_epochs: int = _doc("With --init-from: keep the encoder frozen for this many epochs.", 0)
    num_threads: int | None = _doc("CPU threads for torch; null: all cores.", None)
    compile: bool = _doc(
        "Run the training step through torch.compile (inductor). Measured 1.13-1.19x faster 3D steps on CPU "
        "with the same losses, after 40-80 s of compiling per process (docs/performance.md): worth it for runs "
        "of an hour or more, not for short budgets. Needs a C++ compiler on CPU. Validation and the saved "
        "model stay eager.", False,
    )
    log_images_every: int = _doc("Write a validation overlay image to TensorBoard every N validations.", 1)


@dataclass(frozen=True, kw_only=True)
class InferConfig:
    """Sliding-window inference defaults (command-line flags override them)."""

    overlap: float = _doc("Fraction of overlap between neighbouring windows (0.5 = nnU-Net).", 0.5)
    tta: Literal["auto", "on", "off"] = _doc(
        "Mirroring test-time augmentation; auto: on for GPUs, off on CPU (8 forward passes per window in 3D).", "auto"
    )
    batch_size: int = _doc("Windows per forward pass.", 2)
    postprocess: str = _doc("none, largest (largest component per class) or min-size=N (voxels).", "none")
    skip_empty_windows: bool = _doc("Skip windows without a body voxel (CT: above -500 HU; MR: non-zero); the window "
        "layout stays the same, so the mask inside the body does not change. false runs every window.", True)


# --------------------------------------------------------------------------- grammars of single settings
# One parser per setting that several places accept (config file, --flag, Python argument).


def check_overlap(value: float, what: str = "overlap") -> float:
    """The sliding-window overlap as a float in [0, 1).

    Raises:
        ConfigError: ``what`` must be in [0, 1), with the value given.
    """
    overlap = float(value)
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"{what} must be in [0, 1), got {value}.")
    return overlap


@dataclass(frozen=True)
class PostprocessSpec:
    """A parsed ``--postprocess`` value: ``none``, ``largest`` or ``min-size=N``."""

    mode: Literal["none", "largest", "min-size"]
    min_size: int = 0

    def __str__(self) -> str:
        return f"min-size={self.min_size}" if self.mode == "min-size" else self.mode


def parse_postprocess(spec: str | PostprocessSpec | None) -> PostprocessSpec:
    """Parse ``none``, ``largest`` or ``min-size=N`` (N voxels, > 0).

    Raises:
        ConfigError: any other value.
    """
    if isinstance(spec, PostprocessSpec):
        return spec
    text = (spec or "none").strip().lower()
    if text in ("none", "largest"):
        return PostprocessSpec(text)  # type: ignore[arg-type]
    prefix = "min-size="
    if text.startswith(prefix) and text[len(prefix) :].isdigit() and int(text[len(prefix) :]) > 0:
        return PostprocessSpec("min-size", int(text[len(prefix) :]))
    raise ConfigError(
        f"postprocess {spec!r} is not valid; use none, largest (largest component per class) "
        "or min-size=N (remove components smaller than N voxels), e.g. min-size=50."
    )
