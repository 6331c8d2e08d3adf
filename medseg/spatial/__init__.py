"""Every grid operation of medseg and its inverse, in one place.

Preprocessing (:func:`medseg.data.preprocess.preprocess_case`) applies, and
restoring (:mod:`medseg.inference.restore`) undoes, the same chain with these
functions only:

* :mod:`~medseg.spatial.grid`: re-orientation (nibabel ``ornt``: axis permutation and
  flips) and cropping, both exact; their one inverse, :func:`cropped_view` (write
  through it to un-crop and un-orient without a copy); their affines.
* :mod:`~medseg.spatial.resample`: resampling with one grid convention
  (:func:`axis_weights`), whole arrays forward (:func:`resample_array`), slab by slab
  back (:func:`resample_slabs`), and its affine (:func:`resampling_affine`).
* :mod:`~medseg.spatial.anisotropy`: the thick-slice rule (:func:`thick_axis`) that the
  planner, the resampler and the networks share.

Only numpy is imported here; nibabel and torch are imported inside the functions that need them.
"""

from __future__ import annotations

from medseg.spatial.anisotropy import ANISOTROPY_THRESHOLD, separate_axis_for, thick_axis
from medseg.spatial.grid import (
    crop,
    crop_affine,
    cropped_view,
    nonzero_bbox,
    orientation_affine,
    orientation_transform,
    reorient,
    reoriented_view,
)
from medseg.spatial.resample import (
    DEFAULT_SLAB_ELEMENTS,
    axis_weights,
    resample_array,
    resample_axis,
    resample_slabs,
    resampling_affine,
)

__all__ = [
    "ANISOTROPY_THRESHOLD",
    "DEFAULT_SLAB_ELEMENTS",
    "axis_weights",
    "crop",
    "crop_affine",
    "cropped_view",
    "nonzero_bbox",
    "orientation_affine",
    "orientation_transform",
    "reorient",
    "reoriented_view",
    "resample_array",
    "resample_axis",
    "resample_slabs",
    "resampling_affine",
    "separate_axis_for",
    "thick_axis",
]
