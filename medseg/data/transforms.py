"""MONAI dictionary transforms that turn preprocessed cases into training patches.

The input of :func:`build_train_transforms` is a preprocessed case (keys
``"image"`` float32 ``(C, *spatial)``, ``"label"`` class indices
``(1, *spatial)``, optional ``"locations"``: class index -> ``(N, ndim)``
voxel coordinates, as stored by :class:`~medseg.data.cache.PreprocessedCache`).
The steps:

1. :class:`RandBalancedPatchd`: with probability ``plan.foreground_oversample``
   the patch is centred on a voxel of a foreground class, the class drawn with
   ``plan.class_sampling_ratios`` among the classes present in the case (so a
   600-voxel pancreas is centred as often as the plan says, however large the
   liver next to it); otherwise the patch lies anywhere. Cases without
   foreground always get a random patch. Patches reaching past the case are
   zero-padded (image 0, label background), so every patch has the plan's size.
   2D plans on 3D data cut one slice along ``plan.slice_axis``; with
   ``plan.slice_context = k`` the ``k`` neighbouring slices on each side are
   stacked as extra channels, channel-major (``[c0 s-k .. c0 s+k, c1 s-k ..]``,
   edge slices repeated at the volume's ends).
2. Augmentation (``AugmentConfig``; nnU-Net's set): rotation, scaling, flips
   per axis, Gaussian noise, Gaussian blur, brightness, contrast, low-resolution
   simulation, gamma. Label maps are interpolated with nearest neighbour.
   CT channels (``plan.normalization[c].scheme == "ct"``) get two more
   intensity transforms, on the HU scale, right after patch sampling:
   :class:`RandLabelIntensityOffsetd` (each labelled structure its own HU
   offset: contrast phases) and :class:`RandCTIntensityd` (a global shift,
   scale about water and noise in HU, then a clip to the plan's window).
   MR and other channels are never touched by them.
3. Conversion to tensors: image float32, label int64.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandomizableTransform,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    RandZoomd,
    Transform,
)

from medseg.data.plan import ChannelNorm, Plan
from medseg.settings import AugmentConfig
from medseg.spatial import thick_axis

__all__ = [
    "RandBalancedPatchd",
    "RandCTIntensityd",
    "RandLabelIntensityOffsetd",
    "ToTensorsd",
    "build_train_transforms",
    "build_val_transforms",
    "extract_patch",
]


def extract_patch(array: np.ndarray, start: Sequence[int], size: Sequence[int], *, fill: float = 0) -> np.ndarray:
    """Channel-first patch ``array[:, start:start+size]`` with ``fill`` where it reaches past the array."""
    spatial = array.shape[1:]
    out = np.full((array.shape[0], *size), fill, dtype=array.dtype)
    src, dst = [slice(None)], [slice(None)]
    for s, n, p in zip(start, spatial, size):
        a, b = max(s, 0), min(s + p, n)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


class RandBalancedPatchd(Randomizable, MapTransform):
    """Crop one patch, centred on a chosen class with the configured probabilities.

    Args:
        patch_size: patch in voxels (``spatial_dims`` entries).
        foreground_oversample: probability that the patch is centred on foreground.
        class_ratios: per class index, the relative chance of being the centre
            class of a foreground patch (entry 0 ignored); renormalised over the
            classes present in the case.
        slice_axis: 2D patches from 3D cases: the axis that is sliced.
        slice_context: 2D only: neighbouring slices each side as channels.
        image_key, label_key, locations_key: dictionary keys.

    The chosen class (0 for a random patch) is stored under ``"patch_class"``
    and the patch start (in case voxels) under ``"patch_start"``.
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        *,
        foreground_oversample: float,
        class_ratios: Sequence[float],
        slice_axis: int | None = None,
        slice_context: int = 0,
        image_key: str = "image",
        label_key: str = "label",
        locations_key: str = "locations",
    ) -> None:
        MapTransform.__init__(self, [image_key, label_key], allow_missing_keys=True)
        self.patch_size = [int(p) for p in patch_size]
        self.foreground_oversample = float(foreground_oversample)
        self.class_ratios = np.asarray(class_ratios, dtype=float)
        self.slice_axis = slice_axis
        self.slice_context = int(slice_context)
        self.image_key, self.label_key, self.locations_key = image_key, label_key, locations_key
        self._start: list[int] = []
        self._class = 0

    def randomize(self, data: Mapping[Hashable, Any]) -> None:
        """Choose the class and the patch start for this case."""
        image = data[self.image_key]
        spatial = list(image.shape[1:])
        locations = data.get(self.locations_key)
        label = data.get(self.label_key)
        full_patch = list(self.patch_size)
        if self.slice_axis is not None:
            full_patch.insert(self.slice_axis, 1)
        self._class = 0
        center = None
        if self.R.random_sample() < self.foreground_oversample:
            if locations is None and label is not None:
                locations = {int(c): np.argwhere(np.asarray(label[0]) == c) for c in np.unique(label) if c != 0}
            present = [c for c, v in (locations or {}).items() if c != 0 and len(v) and c < len(self.class_ratios)]
            weights = np.array([self.class_ratios[c] for c in present], dtype=float)
            if present and weights.sum() <= 0:
                weights = np.ones(len(present))
            if present:
                self._class = int(present[self.R.choice(len(present), p=weights / weights.sum())])
                coords = locations[self._class]
                center = [int(v) for v in coords[self.R.randint(len(coords))]]
        start = []
        for axis, (n, p) in enumerate(zip(spatial, full_patch)):
            lo, hi = min(0, n - p), max(0, n - p)
            if center is None:
                start.append(int(self.R.randint(lo, hi + 1)))
            else:
                start.append(int(np.clip(center[axis] - p // 2, lo, hi)))
        self._start = start

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(d)
        image = d[self.image_key]
        label = d.get(self.label_key)
        if self.slice_axis is None:
            d[self.image_key] = extract_patch(np.asarray(image), self._start, self.patch_size).astype(np.float32)
            if label is not None:
                d[self.label_key] = extract_patch(np.asarray(label), self._start, self.patch_size)
        else:
            d[self.image_key] = self._slices(image, context=self.slice_context).astype(np.float32)
            if label is not None:
                d[self.label_key] = self._slices(label, context=0)
        d.pop(self.locations_key, None)
        d["patch_class"] = self._class
        d["patch_start"] = list(self._start)
        return d

    def _slices(self, array: np.ndarray, *, context: int) -> np.ndarray:
        axis = int(self.slice_axis or 0)
        n = array.shape[1 + axis]
        s = self._start[axis]
        in_plane_start = [v for a, v in enumerate(self._start) if a != axis]
        out = []
        for offset in range(-context, context + 1):
            index = int(np.clip(s + offset, 0, n - 1))
            plane = np.take(array, index, axis=1 + axis)
            out.append(extract_patch(np.asarray(plane), in_plane_start, self.patch_size))
        stacked = np.stack(out, axis=1)  # (C, 2k+1, H, W): channel-major
        return stacked.reshape(array.shape[0] * (2 * context + 1), *self.patch_size)


def _ct_channels(norms: Sequence[ChannelNorm | None]) -> list[tuple[int, ChannelNorm]]:
    """``(channel, norm)`` per input channel that holds CT normalised by the plan."""
    return [(c, norm) for c, norm in enumerate(norms) if norm is not None and norm.scheme == "ct"]


def _with_values(image: Any, values: np.ndarray) -> Any:
    """``values`` in the container of ``image``: a tensor (MetaTensor: same meta and affine) or an array."""
    if isinstance(image, torch.Tensor):
        out = image.clone()
        out.copy_(torch.as_tensor(values, dtype=out.dtype))
        return out
    return values.astype(np.asarray(image).dtype, copy=False)


def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x.numpy()
    return np.asarray(x)


class RandLabelIntensityOffsetd(RandomizableTransform, MapTransform):
    """Shift each labelled structure's intensity by its own random HU offset (simulated contrast phases).

    With probability ``prob``, every foreground class index ``k`` (``1..num_classes-1``)
    draws an offset ``o_k`` uniformly from ``offset_range_hu`` and every voxel of
    that class in the label map gets ``o_k`` HU added in each CT channel
    (through the channel's :class:`ChannelNorm`, so the offset is in HU).
    Background, the ignore index and non-CT channels are unchanged. Voxels at a
    bound of the plan's clip window (gas, dense bone: they do not enhance) are
    left as they are, and the result is clipped to the window again. With
    ``smooth`` the offset map is averaged over a 3-voxel box so structure edges
    blend over about one voxel instead of forming a step that no scan has.

    The label map, the geometry (a MetaTensor's affine and meta) and the shape
    are never changed.

    Args:
        keys: image key(s).
        channel_norms: per input channel, the plan's :class:`ChannelNorm` (``None``
            or a non-CT scheme: channel untouched). 2D with slice context: one
            entry per stacked channel (the centre slice's label map is used for
            its neighbours too).
        num_classes: classes of the label map (background included).
        offset_range_hu: ``(low, high)`` offset in HU.
        prob: probability of applying the offsets to a sample.
        smooth: soften the offset map's edges.
        label_key: key of the class-index label map ``(1, *spatial)``.
    """

    def __init__(
        self,
        keys: str | Sequence[str] = "image",
        *,
        channel_norms: Sequence[ChannelNorm | None],
        num_classes: int,
        offset_range_hu: Sequence[float] = (-30.0, 300.0),
        prob: float = 0.5,
        smooth: bool = True,
        label_key: str = "label",
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.channels = _ct_channels(channel_norms)
        self.num_classes = int(num_classes)
        self.offset_range_hu = (float(offset_range_hu[0]), float(offset_range_hu[1]))
        self.smooth = bool(smooth)
        self.label_key = label_key
        self.offsets_hu = np.zeros(self.num_classes)

    def randomize(self, data: Any = None) -> None:
        """Decide whether to apply, and draw one HU offset per class (entry 0, background, stays 0)."""
        super().randomize(None)
        offsets = self.R.uniform(*self.offset_range_hu, size=self.num_classes)
        offsets[0] = 0.0
        self.offsets_hu = offsets

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform or not self.channels or d.get(self.label_key) is None:
            return d
        label = _as_array(d[self.label_key])[0].astype(np.int64)
        table = np.append(self.offsets_hu, 0.0)  # index num_classes (ignore label) and beyond: no offset
        offset_map = table[np.clip(label, 0, self.num_classes)]
        if self.smooth:
            from scipy.ndimage import uniform_filter

            offset_map = uniform_filter(offset_map, size=3, mode="nearest")
        for key in self.key_iterator(d):
            image = d[key]
            values = _as_array(image).astype(np.float32, copy=True)
            for c, norm in self.channels:
                x = values[c]
                lo, hi = norm.clip if norm.clip is not None else (-np.inf, np.inf)
                hu = norm.units_to_hu(x)
                eps = 1e-2  # HU
                inside = (hu > lo + eps) & (hu < hi - eps) & (offset_map != 0)
                values[c] = np.where(inside, norm.hu_to_units(hu + offset_map), x)
            d[key] = _with_values(image, values)
        return d


class RandCTIntensityd(RandomizableTransform, MapTransform):
    """A global intensity change on the HU scale for CT channels: shift, scale about water, noise.

    With probability ``prob``, in HU: ``hu' = clip(hu * scale + shift)`` to the
    plan's window, then Gaussian noise with a standard deviation drawn from
    ``[0, noise_hu]`` is added. ``scale`` from ``scale_range`` models tube
    voltage (iodine and bone change their HU, water stays 0), ``shift`` from
    ``[-shift_hu, shift_hu]`` scanner calibration, the noise dose. Non-CT
    channels and the label map are unchanged.

    Args:
        keys: image key(s).
        channel_norms: per input channel, the plan's :class:`ChannelNorm` (non-CT: untouched).
        shift_hu: largest shift in HU.
        scale_range: ``(low, high)`` scale factor about 0 HU.
        noise_hu: largest noise standard deviation in HU.
        prob: probability of applying the change to a sample.
    """

    def __init__(
        self,
        keys: str | Sequence[str] = "image",
        *,
        channel_norms: Sequence[ChannelNorm | None],
        shift_hu: float = 15.0,
        scale_range: Sequence[float] = (0.9, 1.1),
        noise_hu: float = 20.0,
        prob: float = 0.3,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.channels = _ct_channels(channel_norms)
        self.shift_hu = float(shift_hu)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.noise_hu = float(noise_hu)
        self._shift, self._scale, self._noise = 0.0, 1.0, 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._shift = float(self.R.uniform(-self.shift_hu, self.shift_hu))
        self._scale = float(self.R.uniform(*self.scale_range))
        self._noise = float(self.R.uniform(0.0, self.noise_hu))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform or not self.channels:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            values = _as_array(image).astype(np.float32, copy=True)
            for c, norm in self.channels:
                lo, hi = norm.clip if norm.clip is not None else (-np.inf, np.inf)
                hu = np.clip(norm.units_to_hu(values[c]) * self._scale + self._shift, lo, hi)
                if self._noise > 0:
                    hu = hu + self.R.standard_normal(hu.shape).astype(np.float32) * self._noise
                values[c] = norm.hu_to_units(hu)
            d[key] = _with_values(image, values)
        return d


def _input_channel_norms(plan: Plan) -> list[ChannelNorm | None]:
    """The plan's normalisation of each network input channel (2D slice context: channel-major copies)."""
    per = 2 * plan.slice_context + 1 if (plan.spatial_dims == 2 and plan.data_dims == 3) else 1
    return [norm for norm in plan.normalization for _ in range(per)]


class ToTensorsd(Transform):
    """Image -> float32 tensor, label -> int64 tensor (plain ``torch.Tensor``, no metadata)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, dtype in (("image", torch.float32), ("label", torch.int64)):
            if key in d and d[key] is not None:
                value = d[key]
                if hasattr(value, "as_tensor"):
                    value = value.as_tensor()
                d[key] = torch.as_tensor(np.asarray(value) if isinstance(value, np.ndarray) else value).to(dtype).contiguous()
        return d


def _sampler(plan: Plan) -> RandBalancedPatchd:
    slice_axis = plan.slice_axis if (plan.spatial_dims == 2 and plan.data_dims == 3) else None
    return RandBalancedPatchd(
        plan.patch_size,
        foreground_oversample=plan.foreground_oversample,
        class_ratios=plan.class_sampling_ratios,
        slice_axis=slice_axis,
        slice_context=plan.slice_context,
    )


def build_train_transforms(plan: Plan, augment_config: AugmentConfig | None = None) -> Compose:
    """Patch sampling, augmentation and tensor conversion for training.

    Args:
        plan: patch size, sampling ratios, dimensionality.
        augment_config: the ``augment`` settings (``None``: defaults).

    Returns:
        A MONAI ``Compose``; call ``set_random_state(seed=...)`` for reproducible draws.
    """
    a = augment_config if augment_config is not None else AugmentConfig()
    n = plan.spatial_dims
    steps: list[Any] = [_sampler(plan)]
    if a.enabled:
        norms = _input_channel_norms(plan)
        if any(n is not None and n.scheme == "ct" for n in norms):
            if a.label_intensity_prob > 0:
                steps.append(RandLabelIntensityOffsetd(
                    "image", channel_norms=norms, num_classes=plan.num_classes, prob=a.label_intensity_prob,
                    offset_range_hu=tuple(a.label_intensity_range), smooth=a.label_intensity_smooth))
            if a.ct_intensity_prob > 0:
                steps.append(RandCTIntensityd("image", channel_norms=norms, shift_hu=a.ct_shift_hu,
                                              scale_range=tuple(a.ct_scale_range), noise_hu=a.ct_noise_hu,
                                              prob=a.ct_intensity_prob))
        keys = ["image", "label"]
        angle = math.radians(a.rotation_degrees)
        if n == 3:
            spacing = np.asarray([plan.target_spacing[i] for i in range(3)], dtype=float)
            if thick_axis(spacing) is not None:
                # thick slices: rotate in-plane only (about the thick axis), as nnU-Net
                rotate = [angle if i == int(np.argmax(spacing)) else 0.0 for i in range(3)]
            else:
                rotate = [angle] * 3
        else:
            rotate = [angle]
        interp = "bilinear"
        if a.rotation_prob > 0:
            steps.append(RandAffined(keys, prob=a.rotation_prob, rotate_range=rotate, mode=(interp, "nearest"),
                                     padding_mode="zeros"))
        if a.scale_prob > 0:
            steps.append(RandZoomd(keys, prob=a.scale_prob, min_zoom=a.scale_range[0], max_zoom=a.scale_range[1],
                                   mode=("bilinear" if n == 2 else "trilinear", "nearest"),
                                   padding_mode="constant", keep_size=True))
        if a.noise_prob > 0:
            steps.append(RandGaussianNoised("image", prob=a.noise_prob, std=a.noise_std, sample_std=True))
        if a.blur_prob > 0:
            sigma = tuple(a.blur_sigma)
            steps.append(RandGaussianSmoothd("image", sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=a.blur_prob))
        if a.brightness_prob > 0:
            lo, hi = a.brightness_range
            steps.append(RandScaleIntensityd("image", factors=(lo - 1.0, hi - 1.0), prob=a.brightness_prob))
        if a.contrast_prob > 0:
            lo, hi = a.contrast_range
            steps.append(RandScaleIntensityFixedMeand("image", factors=(lo - 1.0, hi - 1.0), preserve_range=True,
                                                      prob=a.contrast_prob))
        if a.lowres_prob > 0:
            steps.append(RandSimulateLowResolutiond("image", prob=a.lowres_prob, zoom_range=tuple(a.lowres_range),
                                                    upsample_mode="bilinear" if n == 2 else "trilinear"))
        if a.gamma_prob > 0:
            steps.append(RandAdjustContrastd("image", prob=a.gamma_prob, gamma=tuple(a.gamma_range), retain_stats=True))
        if a.flip_prob > 0:
            steps.extend(RandFlipd(keys, prob=a.flip_prob, spatial_axis=axis) for axis in range(n))
    steps.append(ToTensorsd())
    return Compose(steps, map_items=False)


def build_val_transforms(plan: Plan) -> Compose:
    """Patch sampling (same foreground share and class ratios) without augmentation, then tensors."""
    return Compose([_sampler(plan), ToTensorsd()], map_items=False)
