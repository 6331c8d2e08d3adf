"""2D images (PNG, JPEG, TIFF, BMP): read into a :class:`Volume`, write label masks as PNG/TIFF.

Rules (``docs/datasets.md``, "2D images", has the same list for users):

* **Grid.** A 2D image is a 2D :class:`Volume` (``spatial_dims == 2``, no dummy
  axis). Its array follows the geometry convention of ``medseg.io.geometry``:
  axis 0 is the column (x, width), axis 1 the row (y, height), as SimpleITK reads
  a PNG; so ``Geometry.shape == (width, height)``. The grid is the one SimpleITK
  gives a PNG: spacing 1 per pixel, origin 0, identity direction (LPS), i.e. the
  RAS affine ``diag(-1, -1, 1, 1)``. Physical pixel sizes (TIFF resolution tags,
  DPI) are ignored: images of a dataset are never resampled, and distances
  computed on them (HD95, ASSD, NSD) are in pixels.
* **Channels.** Greyscale is 1 channel, RGB 3 channels (as nnU-Net: one file,
  three channels), whatever their values (a grey image stored as RGB stays 3
  channels). An alpha channel is dropped when every pixel is fully opaque (it
  then carries nothing); an image with any transparent pixel is refused (what
  transparency should mean is not guessed). CMYK, YCbCr-only, HSV and other
  colour spaces are refused.
* **Palette PNGs** (Pillow mode ``P``) are read as their palette *indices*, one
  channel: this is how label PNGs of e.g. PASCAL VOC store their classes. As a
  training or inference *image* a palette PNG is refused
  (:func:`refuse_palette_image`): convert it to RGB.
* **Bit depth.** 1-bit images become 0/1 uint8; 8- and 16-bit greyscale and RGB
  are kept exactly (16-bit colour PNGs are decoded with SimpleITK, since Pillow
  reduces them to 8 bits); 32-bit integer and float TIFFs are kept (NaN/Inf
  refused).
* **One image per file.** Animated PNG/GIF and multi-page TIFF stacks are refused.
* **Masks** are written as PNG (``.png``) or TIFF (``.tif``/``.tiff``), uint8, or
  uint16 when a label is above 255, greyscale (no palette), atomically, and read
  back and compared with the mask before the rename.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medseg.errors import GeometryError, OutputWriteError, ScanReadError
from medseg.io.formats import IMAGE_SUFFIXES, MASK_IMAGE_SUFFIXES
from medseg.io.geometry import Geometry, affine_from_lps
from medseg.io.volume import Volume

__all__ = [
    "IMAGE_SUFFIXES",
    "MASK_IMAGE_SUFFIXES",
    "image_geometry",
    "is_image_path",
    "read_image",
    "refuse_palette_image",
    "write_mask_image",
]


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_SUFFIXES = (".tif", ".tiff")


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the name ends in a 2D image suffix (``.png``, ``.jpg``, ``.tif`` ...)."""
    return Path(path).name.lower().endswith(IMAGE_SUFFIXES)


def image_geometry(width: int, height: int, *, source: str = "png") -> Geometry:
    """The grid of a ``width`` x ``height`` image: spacing 1, origin 0, identity LPS direction."""
    return Geometry(shape=(int(width), int(height)), affine=affine_from_lps(np.eye(3), [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]),
                    source=source)


def read_image(path: str | os.PathLike) -> Volume:
    """Read a PNG, JPEG, TIFF or BMP file as a 2D :class:`Volume` (module rules).

    Returns:
        ``Volume`` with array ``(C, width, height)`` and ``meta`` ``{"format": ...,
        "mode": ...}`` (plus ``"palette": True`` for a palette PNG and
        ``"alpha_dropped": True`` when an opaque alpha channel was dropped).

    Raises:
        ScanReadError: unreadable, truncated, animated/multi-page, transparent,
            unsupported colour space, NaN/Inf values.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    fmt = "tiff" if suffix in _TIFF_SUFFIXES else "jpeg" if suffix in (".jpg", ".jpeg") else suffix.lstrip(".")
    if suffix in _TIFF_SUFFIXES:
        pixels, meta = _read_tiff(path)
    else:
        pixels, meta = _read_pillow(path)
    meta = {"format": fmt, **meta}
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    pixels = _drop_opaque_alpha(path, pixels, meta)
    if pixels.dtype.kind == "f" and not np.all(np.isfinite(pixels)):
        count = int(np.count_nonzero(~np.isfinite(pixels)))
        raise ScanReadError(f"{path}: {count} pixel(s) are NaN or Inf; images must hold finite values.")
    if pixels.dtype == np.bool_:
        pixels = pixels.astype(np.uint8)
    # (rows, columns, C) -> channel-first (C, x = column, y = row)
    array = np.ascontiguousarray(np.transpose(pixels, (2, 1, 0)))
    geometry = image_geometry(array.shape[1], array.shape[2], source=fmt)
    return Volume(array=array, geometry=geometry, path=path, meta=meta)


def refuse_palette_image(volume: Volume, what: str = "image") -> None:
    """Refuse a palette (indexed-colour) PNG used as an input image rather than a label.

    Raises:
        ScanReadError: ``volume`` was read from a palette PNG.
    """
    if volume.meta.get("palette"):
        raise ScanReadError(
            f"{volume.path}: a palette (indexed-colour) PNG as {what}: medseg reads palette PNGs as their indices, "
            "which suits label maps, not images. Convert it to RGB (Pillow: Image.open(p).convert('RGB').save(p))."
        )


def _read_pillow(path: Path) -> tuple[np.ndarray, dict]:
    from PIL import Image, UnidentifiedImageError

    with open(path, "rb") as f:
        head = f.read(26)
    if head[:8] == _PNG_SIGNATURE and len(head) >= 26 and head[24] == 16 and head[25] in (2, 6):
        return _read_png16_colour(path), {"mode": "RGB;16" if head[25] == 2 else "RGBA;16"}
    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise ScanReadError(
                    f"{path}: an animated image with {frames} frames; medseg reads one 2D image per file. "
                    "Save each frame as its own file."
                )
            image.load()
            mode = image.mode
            meta: dict = {"mode": mode}
            if mode == "P":
                meta["palette"] = True
                pixels = np.asarray(image)
            elif mode == "PA":
                raise ScanReadError(
                    f"{path}: a palette PNG with transparency (mode PA); save it as a greyscale or palette PNG "
                    "without alpha."
                )
            elif mode in ("1", "L", "LA", "RGB", "RGBA", "F"):
                pixels = np.asarray(image)
            elif mode.startswith("I;16") or mode == "I":
                pixels = np.asarray(image)
                if mode.startswith("I;16"):
                    pixels = pixels.astype(np.uint16)
            else:
                raise ScanReadError(
                    f"{path}: colour mode {mode} is not supported; expected greyscale (L, 16-bit), RGB or RGBA "
                    "pixels. Convert it, e.g. Pillow: Image.open(p).convert('RGB')."
                )
    except ScanReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ScanReadError(
            f"{path}: cannot be read as an image, the file is corrupt, truncated or not a {path.suffix} image "
            f"({type(err).__name__}: {err})."
        ) from err
    return np.array(pixels), meta


def _read_png16_colour(path: Path) -> np.ndarray:
    """A 16-bit-per-channel colour PNG, exactly (Pillow would keep 8 bits)."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        last = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise ScanReadError(f"{path}: cannot be read as a 16-bit colour PNG, the file is corrupt ({last}).") from err
    pixels = sitk.GetArrayFromImage(image)  # (rows, columns, C)
    if pixels.ndim != 3:
        raise ScanReadError(f"{path}: expected a colour image, SimpleITK read shape {pixels.shape}.")
    return pixels.astype(np.uint16, copy=False)


def _read_tiff(path: Path) -> tuple[np.ndarray, dict]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            pages = len(tif.pages)
            if pages != 1:
                raise ScanReadError(
                    f"{path}: a multi-page TIFF ({pages} pages: a stack, a pyramid or a time series); medseg reads "
                    "one 2D image per TIFF. Save 3D stacks as NIfTI, or each page as its own file."
                )
            series = tif.series[0]
            axes, pixels = series.axes, series.asarray()
            photometric = tif.pages[0].photometric
    except ScanReadError:
        raise
    except Exception as err:  # tifffile raises many types (TiffFileError, ValueError, struct.error ...)
        raise ScanReadError(
            f"{path}: cannot be read as a TIFF, the file is corrupt or truncated ({type(err).__name__}: {err})."
        ) from err
    mode = getattr(photometric, "name", str(photometric))
    if axes == "SYX" and pixels.shape[0] in (3, 4) and mode == "RGB":  # planar RGB: one plane per colour
        pixels, axes = np.moveaxis(pixels, 0, -1), "YXS"
    if axes == "YX":
        pass
    elif axes == "YXS" and pixels.shape[-1] in (1, 3, 4) and mode in ("RGB", "MINISBLACK"):
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
    else:
        raise ScanReadError(
            f"{path}: TIFF axes {axes!r} shape {pixels.shape} ({mode}) are not a single 2D greyscale or RGB image; "
            "expected axes YX or YXS with 3 or 4 samples."
        )
    if pixels.dtype.kind not in "biuf":
        raise ScanReadError(f"{path}: TIFF pixel type {pixels.dtype} is not supported; expected integers or floats.")
    return np.array(pixels), {"mode": mode}


def _drop_opaque_alpha(path: Path, pixels: np.ndarray, meta: dict) -> np.ndarray:
    """Grey+alpha / RGB+alpha: drop an alpha that is opaque everywhere, refuse any transparency."""
    channels = pixels.shape[-1]
    if channels not in (2, 4):
        return pixels
    alpha = pixels[..., -1]
    opaque = np.iinfo(alpha.dtype).max if alpha.dtype.kind in "iu" else 1.0
    transparent = int(np.count_nonzero(alpha != opaque))
    if transparent:
        raise ScanReadError(
            f"{path}: {transparent} pixel(s) are (partly) transparent (alpha channel below {opaque}); medseg does "
            "not guess what transparency means. Flatten the image onto a background and save it without alpha "
            "(Pillow: Image.open(p).convert('RGB'))."
        )
    meta["alpha_dropped"] = True
    return pixels[..., :-1]


# --------------------------------------------------------------------------- writing


def write_mask_image(data: np.ndarray, geometry: Geometry, target: Path, *, overwrite: bool) -> Path:
    """Write a 2D label mask as a greyscale PNG or TIFF; called by :func:`medseg.io.write_mask`.

    The caller has checked the target (name, folder, not the input, overwrite) and the labels
    (``data``: uint8 or uint16 of the grid's shape, from ``medseg.io.writers``).
    The mask (``geometry.shape == (width, height)``) is stored as rows x columns,
    uint8 (uint16 above 255), then read back and compared before the rename.

    Raises:
        GeometryError: a 3D grid, or a mask of another shape.
        ArrayValueError: labels that are not integers in 0..65535.
        OutputWriteError: the write failed.
    """
    from medseg.io.atomic import atomic_path

    if geometry.spatial_dims != 2:
        raise GeometryError(
            f"cannot write {target}: a {geometry.spatial_dims}D mask {geometry.shape} cannot be a 2D image; "
            "write it as .nii.gz."
        )
    pixels = np.ascontiguousarray(data.T)  # (x, y) -> (rows, columns)
    tiff = target.name.lower().endswith(_TIFF_SUFFIXES)
    with atomic_path(target, overwrite=overwrite) as temp:
        if tiff:
            import tifffile

            tifffile.imwrite(temp, pixels, photometric="minisblack", compression="zlib")
            back = tifffile.imread(temp)
        else:
            from PIL import Image

            image = Image.fromarray(pixels)  # uint8 -> mode L, uint16 -> I;16
            with open(temp, "wb") as f:
                image.save(f, format="PNG", compress_level=6)
            with Image.open(temp) as reread:
                back = np.asarray(reread)
        if back.shape != pixels.shape or not np.array_equal(back, pixels):
            raise OutputWriteError(
                f"refusing to write {target}: the image read back differs from the mask. Nothing was written; "
                "please report this as a medseg bug."
            )
    return target
