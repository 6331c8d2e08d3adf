"""Training and inference settings: one YAML file, frozen dataclasses, validated on load.

What the user asks for lives here; what the data implies lives in the plan
(``medseg.data.plan``). A config may pin single plan fields (``data.patch_size``,
``data.target_spacing`` ...); ``None`` means "derive it from the data".

Every field carries its documentation in ``field(metadata={"doc": ...})``;
``docs/config.md`` is generated from it and a test keeps the two in step.

Example::

    cfg = load_config("configs/unet3d.yaml", overrides=["train.max_epochs=5"])
    cfg.train.max_epochs  # 5
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medseg.errors import ConfigError
from medseg.records import match_type, type_name

__all__ = [
    "BUILTIN_CONFIG_DIR",
    "AugmentConfig",
    "Config",
    "DataConfig",
    "InferConfig",
    "LossConfig",
    "ModelConfig",
    "TrainConfig",
    "builtin_configs",
    "config_from_dict",
    "describe_config",
    "load_config",
    "resolve_config_path",
    "save_config",
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


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything ``medseg train`` needs besides the dataset folder."""

    data: DataConfig = _doc("Dataset, plan and loader settings.", factory=DataConfig)
    augment: AugmentConfig = _doc("Augmentation.", factory=AugmentConfig)
    model: ModelConfig = _doc("Network.", factory=ModelConfig)
    loss: LossConfig = _doc("Loss.", factory=LossConfig)
    train: TrainConfig = _doc("Training loop.", factory=TrainConfig)
    infer: InferConfig = _doc("Inference defaults stored with the model.", factory=InferConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


# --------------------------------------------------------------------------- loading

BUILTIN_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The YAML configs shipped inside the package (``configs/`` in the repository links here)."""


def builtin_configs() -> dict[str, Path]:
    """``{name: path}`` of the built-in configs, e.g. ``{"cpu_quick": .../medseg/configs/cpu_quick.yaml}``."""
    return {p.stem: p for p in sorted(BUILTIN_CONFIG_DIR.glob("*.yaml"))}


def describe_config(path: str | Path) -> str:
    """The first comment line of a YAML config (its one-line description), or ``""``."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def resolve_config_path(path: str | Path) -> Path:
    """An existing config file as given, else the built-in config of that name (``cpu_quick`` or ``cpu_quick.yaml``).

    Raises:
        ConfigError: neither a file nor a built-in config name (with the closest name).
    """
    path = Path(path)
    if path.exists():
        return path
    builtins = builtin_configs()
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if len(path.parts) == 1 and name in builtins:
        return builtins[name]
    close = difflib.get_close_matches(name, list(builtins), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"config {str(path)!r} is neither a file nor a built-in config.{hint} Pass a YAML file or one of the "
        f"built-in names: {', '.join(builtins)} (`medseg configs` describes them)."
    )




def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (``yaml.safe_load``), apply ``section.key=value`` overrides, validate.

    ``path`` is a YAML file or the name of a built-in config (``"cpu_quick"``, see
    :func:`builtin_configs`).

    Raises:
        ConfigError: unknown keys (with the closest valid one), wrong types, bad YAML,
            a path that is neither a file nor a built-in config name.
    """
    import yaml

    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = resolve_config_path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror or err}.") from err
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config {path} is not valid YAML: {err}".replace("\n", " ")) from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of sections, got {type(loaded).__name__}.")
        data = loaded
    for item in overrides or []:
        apply_override(data, item)
    return config_from_dict(data, source=source)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` override (value parsed as YAML) to a raw config dict.

    Raises:
        ConfigError: naming ``--set`` and the override (not the YAML file) for a malformed
            item, an unknown section or key (with the closest valid one) or a value of the wrong type.
    """
    import yaml

    where = f"--set {item}"
    if "=" not in item:
        raise ConfigError(f"{where}: expected section.key=value, e.g. --set train.max_epochs=5.")
    key, _, raw = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{where}: the key must be section.key, e.g. train.max_epochs; sections: {', '.join(SECTIONS)}.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: the value is not valid YAML.") from err
    if parts[0] not in SECTIONS:
        raise ConfigError(_unknown(parts[0], list(SECTIONS), f"section {parts[0]!r} in {where}"))
    hints = _hints(_section_class(parts[0]))
    if parts[1] not in hints:
        raise ConfigError(_unknown(parts[1], list(hints), f"key '{parts[0]}.{parts[1]}' in {where}"))
    _coerce(value, hints[parts[1]], f"{parts[0]}.{parts[1]}", where)
    section = data.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"override {item!r}: section {parts[0]!r} is not a mapping in the config.")
    section[parts[1]] = value


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> Config:
    """Build a validated :class:`Config` from plain data (e.g. a parsed YAML file)."""
    sections = {}
    for name, value in data.items():
        if name not in SECTIONS:
            raise ConfigError(_unknown(name, list(SECTIONS), f"section {name!r} in {source}"))
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"section {name!r} in {source} must be a mapping, got {type(value).__name__}.")
        cls = _section_class(name)
        sections[name] = _build(cls, value, f"{name}", source)
    return _validate(Config(**sections), source)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically, replacing an existing file)."""
    import yaml

    from medseg.io.atomic import write_text_atomic

    text = "# medseg config (resolved)\n" + yaml.safe_dump(config.to_dict(), sort_keys=False)
    write_text_atomic(text, path, overwrite=True)


def field_docs() -> list[tuple[str, str, Any, str]]:
    """``(key, type, default, doc)`` for every field, for docs/config.md and `--help`."""
    rows = []
    for section in dataclasses.fields(Config):
        cls = _section_class(section.name)
        instance = cls()
        for f in dataclasses.fields(cls):
            rows.append(
                (f"{section.name}.{f.name}", type_name(_hints(cls)[f.name]), getattr(instance, f.name), f.metadata["doc"])
            )
    return rows


# --------------------------------------------------------------------------- helpers


def _section_class(name: str) -> type:
    return typing.get_type_hints(Config)[name]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, valid: list[str], what: str) -> str:
    """``unknown <what>. Did you mean '<closest>'? Valid: ...`` (``what`` names the key and where it is)."""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {what}.{hint} Valid: {', '.join(valid)}."


def _build(cls: type, values: dict[str, Any], prefix: str, source: str) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(_unknown(key, names, f"key '{prefix}.{key}' in {source}"))
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}", source)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    ok, converted = match_type(value, tp)
    if not ok:
        raise ConfigError(
            f"{key} in {source} must be {type_name(tp)}, got {value!r} ({type(value).__name__})."
        )
    return converted


def _validate(cfg: Config, source: str) -> Config:
    problems = []
    d, t, i, a = cfg.data, cfg.train, cfg.infer, cfg.augment
    if d.spatial_dims not in (None, 2, 3):
        problems.append(f"data.spatial_dims must be 2, 3 or null, got {d.spatial_dims}")
    n = d.spatial_dims
    for name in ("target_spacing", "patch_size"):
        value = getattr(d, name)
        if value is not None:
            if n is not None and len(value) != n:
                problems.append(f"data.{name} must have {n} entries for spatial_dims={n}, got {value}")
            if any(v <= 0 for v in value):
                problems.append(f"data.{name} entries must be > 0, got {value}")
    if d.batch_size is not None and d.batch_size < 1:
        problems.append(f"data.batch_size must be >= 1, got {d.batch_size}")
    if not 0.0 <= d.foreground_oversample <= 1.0:
        problems.append(f"data.foreground_oversample must be in [0, 1], got {d.foreground_oversample}")
    if d.num_folds < 1:
        problems.append(f"data.num_folds must be >= 1, got {d.num_folds}")
    if d.slice_context < 0:
        problems.append(f"data.slice_context must be >= 0, got {d.slice_context}")
    if t.max_epochs < 1 or t.iterations_per_epoch < 1:
        problems.append("train.max_epochs and train.iterations_per_epoch must be >= 1")
    if t.learning_rate <= 0:
        problems.append(f"train.learning_rate must be > 0, got {t.learning_rate}")
    if t.val_every < 1:
        problems.append(f"train.val_every must be >= 1, got {t.val_every}")
    if isinstance(t.fold, int) and t.fold < 0:
        problems.append(f"train.fold must be >= 0 or 'all', got {t.fold}")
    if not 0.0 <= i.overlap < 1.0:
        problems.append(f"infer.overlap must be in [0, 1), got {i.overlap}")
    if i.batch_size < 1:
        problems.append(f"infer.batch_size must be >= 1, got {i.batch_size}")
    if i.postprocess not in ("none", "largest") and not _is_min_size(i.postprocess):
        problems.append(f"infer.postprocess must be none, largest or min-size=N, got {i.postprocess!r}")
    for f in dataclasses.fields(a):
        value = getattr(a, f.name)
        if f.name.endswith("_prob") and not 0.0 <= value <= 1.0:
            problems.append(f"augment.{f.name} must be in [0, 1], got {value}")
        if f.name.endswith(("_range", "_sigma")) and (len(value) != 2 or value[0] > value[1]):
            problems.append(f"augment.{f.name} must be [low, high] with low <= high, got {value}")
    if a.ct_shift_hu < 0 or a.ct_noise_hu < 0:
        problems.append(f"augment.ct_shift_hu and augment.ct_noise_hu must be >= 0, got {a.ct_shift_hu}, {a.ct_noise_hu}")
    if isinstance(cfg.loss.class_weights, list) and any(w < 0 for w in cfg.loss.class_weights):
        problems.append("loss.class_weights must be >= 0")
    if cfg.loss.ignore_label is not None and cfg.loss.ignore_label < 1:
        problems.append(
            f"loss.ignore_label must be a label value >= 1 that is no class (e.g. 255), got {cfg.loss.ignore_label}"
        )
    if problems:
        raise ConfigError(f"invalid config {source}: " + "; ".join(problems) + ".")
    return cfg


def _is_min_size(text: str) -> bool:
    prefix = "min-size="
    return text.startswith(prefix) and text[len(prefix) :].isdigit() and int(text[len(prefix) :]) > 0
