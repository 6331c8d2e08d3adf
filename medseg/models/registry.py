"""The model registry: names -> builders, and building a model from a plan.

A builder is a function (or an ``nn.Module`` class) called as
``builder(spatial_dims=..., in_channels=..., num_classes=..., **options)``;
:func:`register_model` adds it under a name. Its signature lists the options
the model accepts (unknown ones are refused with the closest valid name). An
optional ``plan_options(plan, spacing)`` hook derives the options a model
understands from a plan (U-Net topology, the thick-slice axis, a fixed image
size) for :func:`create_model_from_plan`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from medseg.errors import ConfigError
from medseg.spatial import thick_axis

__all__ = [
    "PlanLike",
    "anisotropic_axis_from_spacing",
    "anisotropic_plan_options",
    "check_options",
    "create_model",
    "create_model_from_plan",
    "list_models",
    "network_spacing",
    "register_model",
]



class PlanLike(Protocol):
    """The plan attributes the model factory reads (``medseg.data.plan.Plan`` has them all)."""

    spatial_dims: int
    in_channels: int
    num_classes: int
    patch_size: Sequence[int]
    target_spacing: Sequence[float]
    kernel_sizes: Sequence[Sequence[int]] | None
    strides: Sequence[Sequence[int]] | None


Builder = Callable[..., nn.Module]
PlanOptions = Callable[[Any, list[float]], dict[str, Any]]


@dataclass(frozen=True)
class _Entry:
    name: str
    builder: Builder
    plan_options: PlanOptions | None


_REGISTRY: dict[str, _Entry] = {}
_BUILTIN_MODULES = ("medseg.models.unet", "medseg.models.deeplab", "medseg.models.fcn", "medseg.models.monai_nets")
_builtins_state = "not loaded"


def _load_builtins() -> None:
    """Import the modules that register medseg's own models (once, on first use of the registry)."""
    global _builtins_state
    if _builtins_state != "not loaded":
        return
    _builtins_state = "loading"
    try:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
    except BaseException:
        _builtins_state = "not loaded"
        raise
    _builtins_state = "loaded"


def register_model(name: str, *, plan_options: PlanOptions | None = None) -> Callable[[Builder], Builder]:
    """Register a model builder under ``name`` (decorator).

    Args:
        name: the name users pass to :func:`create_model` (and ``model.name`` in configs).
        plan_options: optional ``f(plan, spacing) -> dict`` giving the options
            :func:`create_model_from_plan` derives from a plan; ``spacing`` is the
            plan's spacing along the network's axes (mm).

    Raises:
        ConfigError: ``name`` is already registered.

    Example::

        @register_model("my_net")
        def my_net(*, spatial_dims: int, in_channels: int, num_classes: int, width: int = 16) -> nn.Module:
            return MyNet(spatial_dims, in_channels, num_classes, width=width)

        create_model("my_net", spatial_dims=3, in_channels=1, num_classes=4, width=8)
    """

    _load_builtins()

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            old = _REGISTRY[name].builder
            raise ConfigError(
                f"model name {name!r} is already registered (by {old.__module__}.{old.__qualname__}); "
                "register yours under another name."
            )
        _REGISTRY[name] = _Entry(name, builder, plan_options)
        return builder

    return decorator


def list_models() -> list[str]:
    """Registered model names, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    _load_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(list_models())}.{hint}")
    return _REGISTRY[name]


def check_options(model: str, options: Iterable[str], valid: Iterable[str]) -> None:
    """Raise a :class:`ConfigError` naming the closest valid option for each unknown one."""
    valid = sorted(valid)
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"model {model!r} has no option {key!r}; valid options: {', '.join(valid)}.{hint}"
            )


def _builder_options(builder: Builder) -> tuple[set[str], bool]:
    params = inspect.signature(builder).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    return names - {"spatial_dims", "in_channels", "num_classes"}, var_kw


def create_model(name: str, *, spatial_dims: int, in_channels: int, num_classes: int, **options: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models` (``unet``, ``deeplabv3``, ``deeplabv3plus``, ``fcn``, ...).
        spatial_dims: 2 or 3.
        in_channels: input channels (e.g. MR sequences, or stacked neighbouring slices).
        num_classes: output channels, background included.
        **options: model-specific keyword arguments (see docs/models.md).

    Returns:
        An ``nn.Module`` mapping ``(B, in_channels, *spatial)`` to logits
        ``(B, num_classes, *spatial)`` for any spatial size.

    Raises:
        ConfigError: unknown name (valid names and the closest are listed), bad
            dimensions, or an option the model does not have.

    Example::

        >>> net = create_model("unet", spatial_dims=3, in_channels=1, num_classes=3)
    """
    entry = _entry(name)
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3 for model {name!r}, got {spatial_dims!r}.")
    for key, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer for model {name!r}, got {value!r}.")
    valid, var_kw = _builder_options(entry.builder)
    if not var_kw:
        check_options(name, options, valid)
    return entry.builder(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes, **options)


def network_spacing(plan: PlanLike) -> list[float]:
    """The plan's spacing along the network's axes.

    For a 2D network on 3D data, ``target_spacing`` has 3 entries: the sliced
    axis ``plan.slice_axis`` is dropped.
    """
    spacing = [float(s) for s in plan.target_spacing]
    dims = int(plan.spatial_dims)
    if len(spacing) == dims:
        return spacing
    slice_axis = getattr(plan, "slice_axis", None)
    if dims == 2 and len(spacing) == 3 and slice_axis in (0, 1, 2):
        return [s for axis, s in enumerate(spacing) if axis != slice_axis]
    raise ConfigError(
        f"plan target_spacing {spacing} does not match spatial_dims={dims} "
        f"(slice_axis={slice_axis!r}); a 2D plan on 3D data needs slice_axis 0, 1 or 2. Re-plan the dataset."
    )


def anisotropic_axis_from_spacing(spacing: Sequence[float]) -> int | None:
    """The thick-slice axis (:func:`medseg.spatial.thick_axis`: > 3x the finest spacing), else ``None``.

    Example::

        >>> anisotropic_axis_from_spacing([0.8, 0.8, 5.0])
        2
    """
    return thick_axis(spacing)


def anisotropic_plan_options(plan: PlanLike, spacing: Sequence[float]) -> dict[str, Any]:
    """``plan_options`` hook of models that only need the thick-slice axis (DeepLab, FCN)."""
    return {"anisotropic_axis": anisotropic_axis_from_spacing(spacing)}


def create_model_from_plan(name: str, plan: PlanLike, **options: Any) -> nn.Module:
    """Build a registered model with the options the plan implies.

    Plan-derived options (explicit ``options`` win):

    - ``unet``: ``kernel_sizes``/``strides`` from the plan, or computed with
      :func:`medseg.topology.unet_topology` from ``patch_size`` and the
      spacing when the plan has none;
    - ``deeplabv3``, ``deeplabv3plus``, ``fcn``: ``anisotropic_axis``, an axis at
      least 3x coarser than the finest, which is never strided or dilated;
    - ``unetr``: ``img_size`` = ``plan.patch_size``.

    ``deep_supervision`` is passed only to models whose builder names that
    argument and is dropped for the others (``model.deep_supervision`` in a
    config is U-Net only; a ``**options`` catch-all does not count).

    Args:
        name: registered model name.
        plan: a ``medseg.data.plan.Plan`` or any object with the attributes of :class:`PlanLike`.
        **options: model options; they override the plan-derived ones.
    """
    entry = _entry(name)
    valid, _ = _builder_options(entry.builder)
    if "deep_supervision" in options and "deep_supervision" not in valid:
        options = {k: v for k, v in options.items() if k != "deep_supervision"}
    derived = entry.plan_options(plan, network_spacing(plan)) if entry.plan_options else {}
    merged = {**derived, **options}
    return create_model(
        name,
        spatial_dims=int(plan.spatial_dims),
        in_channels=int(plan.in_channels),
        num_classes=int(plan.num_classes),
        **merged,
    )
