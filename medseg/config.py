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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError
from medseg.records import match_type, type_name
from medseg.settings import (
    AugmentConfig,
    DataConfig,
    InferConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
    _doc,
    check_overlap,
    parse_postprocess,
)

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
    for check in (lambda: check_overlap(i.overlap, "infer.overlap"), lambda: parse_postprocess(i.postprocess)):
        try:
            check()
        except ConfigError as err:
            problems.append(str(err).rstrip("."))
    if i.batch_size < 1:
        problems.append(f"infer.batch_size must be >= 1, got {i.batch_size}")
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
