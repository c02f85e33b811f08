"""Images in, model input out: the one preprocessing used by training, evaluation and serving.

Two kinds of pixels arrive:

* **colour composites** (JPEG/PNG, ``uint8``, channels already red/green/blue) are divided by 255;
* **flux** (FITS cutouts or stored tiles, float nanomaggies per band, e.g. DR9 g,r,z) go through a
  colour-preserving arcsinh stretch (Lupton et al. 2004, PASP 116, 133) with *fixed* per-band
  scales: the same number always maps to the same value, so brightness and colour survive.
  Nothing is normalised per image.

Both are first resized (antialiased, in linear units) so the shorter side is ``size`` and then
centre-cropped to ``size`` × ``size``. Flux bands are put in red/green/blue order (reddest band
first, e.g. g,r,z -> z,r,g), the order survey colour composites use, so a FITS cutout and the JPEG
made from it land in the same channels.

The stretch, for per-band scales :math:`a_b` (:data:`BAND_SCALES`) and softening ``Q``
(:data:`ASINH_Q`)::

    x_b = a_b * flux_b                      # per-band scaling, fixed
    I   = mean_b(x_b)                       # total intensity
    out_b = x_b * asinh(Q * I) / (sqrt(Q) * I)

Every band is multiplied by the same positive factor, so ``out_g / out_r == x_g / x_r`` (colour is
exact), and ``asinh`` is increasing, so a brighter copy of an image stays brighter everywhere. The
scales and ``Q`` are those of the Legacy Surveys viewer's DECam composites; a bright galaxy core
comes out near 1 like a colour composite, sky noise near 0. Values are not clipped (negative sky
noise stays slightly negative; very bright cores grow like a logarithm).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

#: bump when the preprocessing changes: it keys the on-disk cache (and belongs in model cards)
PREPROCESS_VERSION = "1"
#: default side of the square model input, in pixels
DEFAULT_SIZE = 128
#: per-band flux scale (per nanomaggy) of the arcsinh stretch; g, r, z as in the Legacy Surveys
#: viewer's DECam composites; i is interpolated between r and z (no survey default exists)
BAND_SCALES: dict[str, float] = {"g": 6.0, "r": 3.4, "i": 2.7, "z": 2.2}
#: softening of the arcsinh stretch (linear below ~1/Q, logarithmic above)
ASINH_Q = 20.0
#: effective wavelengths in nm, used only to order flux bands red -> green -> blue
_BAND_WAVELENGTH_NM: dict[str, float] = {"g": 480.0, "r": 620.0, "i": 770.0, "z": 910.0}
#: bands assumed for a float array that does not name its bands (DR9 cutouts, stored tiles)
DEFAULT_FLUX_BANDS = ("g", "r", "z")
#: file suffixes read as colour composites and as FITS flux
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fz")


class DataError(ValueError):
    """Input that cannot become model input."""


class NonFiniteInputError(DataError):
    """Pixels containing NaN or infinity (masked or missing data): refused, never imputed."""


class InputShapeError(DataError):
    """Pixels that are not a 3-channel (C, H, W) array of a supported dtype."""


class UnknownBandError(DataError):
    """A flux band with no fixed stretch scale in :data:`BAND_SCALES`."""


class LabelsError(DataError):
    """A ``labels.csv`` folder that does not match the dataset contract."""


@dataclass(frozen=True)
class ImageSet:
    """Images of a ``labels.csv`` folder, ready for a model.

    Attributes
    ----------
    images
        ``float32`` array of shape (N, 3, size, size), from :func:`to_model_input`.
    labels
        One label per image (``float64`` when numeric, ``int64`` once binarised or when every
        value is an integer, ``str`` otherwise), or None when no label column was asked for.
    files
        File names relative to the folder, as in ``labels.csv``.
    table
        The ``labels.csv`` rows that were kept, as dicts of strings.
    """

    images: np.ndarray
    labels: np.ndarray | None
    files: list[str]
    table: list[dict[str, str]]

    def __len__(self) -> int:
        return len(self.files)


def _flux_stretch(flux: np.ndarray, bands: Sequence[str]) -> np.ndarray:
    """The colour-preserving arcsinh stretch of the module docstring, bands in red-first order."""
    scales = np.asarray([BAND_SCALES[b] for b in bands], dtype=np.float64)[:, None, None]
    x = flux.astype(np.float64) * scales
    intensity = x.mean(axis=0)
    qi = ASINH_Q * intensity
    small = np.abs(qi) < 1e-4
    # asinh(q)/q -> 1 - q²/6 near 0; the series avoids 0/0 on empty sky
    safe = np.where(small, 1.0, qi)
    gain = np.where(small, 1.0 - qi**2 / 6.0, np.arcsinh(safe) / safe) * math.sqrt(ASINH_Q)
    out = x * gain[None]
    order = sorted(range(len(bands)), key=lambda i: -_BAND_WAVELENGTH_NM[bands[i]])
    return out[order].astype(np.float32)


def _resize_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear resize of the shorter side to ``size``, then a centre crop."""
    _, h, w = pixels.shape
    if h == size and w == size:
        return pixels.astype(np.float32, copy=False)
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    t = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None]
    t = torch.nn.functional.interpolate(
        t, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
    )[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return t[:, top : top + size, left : left + size].numpy().copy()


def to_model_input(
    pixels: np.ndarray, *, bands: Sequence[str] | None = None, size: int = DEFAULT_SIZE
) -> np.ndarray:
    """Turn a colour composite or a flux cutout into model input.

    Parameters
    ----------
    pixels
        (C, H, W) array with C = 3: ``uint8`` colour composite (red, green, blue) or float flux
        in nanomaggies (any float dtype or byte order).
    bands
        Flux bands of the C planes, e.g. ``("g", "r", "z")``; default :data:`DEFAULT_FLUX_BANDS`.
        Ignored for colour composites, whose channels are already red, green, blue.
    size
        Side of the square output.

    Returns
    -------
    numpy.ndarray
        ``float32`` (3, size, size): colour composites in [0, 1]; flux stretched as in the module
        docstring, bands ordered reddest first.

    Raises
    ------
    InputShapeError
        If ``pixels`` is not (3, H, W), or is neither ``uint8`` nor float.
    NonFiniteInputError
        If flux contains NaN or infinity.
    UnknownBandError
        If a band has no fixed scale, or ``bands`` does not match the number of planes.
    """
    if size < 1:
        raise InputShapeError(f"size must be positive, got {size}")
    arr = np.asarray(pixels)
    if arr.ndim != 3 or arr.shape[0] != 3 or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise InputShapeError(f"expected a (3, H, W) array, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return _resize_crop(arr.astype(np.float32) / np.float32(255.0), size)
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputShapeError(f"expected uint8 colour or float flux, got dtype {arr.dtype}")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise NonFiniteInputError(
            f"{int(bad.sum())} of {arr.size} pixels are NaN or infinite; fill or mask them first"
        )
    band_names = tuple(b.strip().lower() for b in (bands or DEFAULT_FLUX_BANDS))
    if len(band_names) != arr.shape[0]:
        raise UnknownBandError(f"{len(band_names)} bands {band_names} for {arr.shape[0]} planes")
    unknown = [b for b in band_names if b not in BAND_SCALES]
    if unknown:
        raise UnknownBandError(f"no stretch scale for band(s) {unknown}; known: {list(BAND_SCALES)}")
    # resize in linear flux (flux is additive), then stretch: the stretch keeps exact colours
    return _flux_stretch(_resize_crop(arr.astype(np.float32), size), band_names)


def _fits_bands(header: Any, planes: int) -> tuple[str, ...] | None:
    """Band names from a Legacy-Surveys-style header (``BANDS = 'grz'`` or ``BAND0`` ...)."""
    names = [str(header.get(f"BAND{i}", "")).strip() for i in range(planes)]
    if all(names):
        return tuple(names)
    joined = str(header.get("BANDS", "")).strip()
    if len(joined) == planes:
        return tuple(joined)
    return None


def load_pixels(path: Path) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Read one image file as (C, H, W) pixels.

    Parameters
    ----------
    path
        A JPEG/PNG colour composite or a FITS cutout (first HDU with a 3-D image).

    Returns
    -------
    tuple
        ``(pixels, bands)``: ``uint8`` RGB and None for colour images; native-endian ``float32``
        flux and the band names from the header (None if it names none) for FITS.

    Raises
    ------
    DataError
        If the file type is not supported or a FITS file has no 3-D image.
    """
    name = path.name.lower()
    if name.endswith(IMAGE_SUFFIXES):
        from PIL import Image

        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return np.ascontiguousarray(rgb.transpose(2, 0, 1)), None
    if name.endswith(FITS_SUFFIXES):
        from astropy.io import fits

        with fits.open(path, memmap=False) as hdul:
            for hdu in hdul:
                if hdu.data is not None and getattr(hdu.data, "ndim", 0) == 3:
                    data = np.asarray(hdu.data, dtype=np.float32)
                    return data, _fits_bands(hdu.header, data.shape[0])
        raise DataError(f"{path}: no 3-D image HDU (expected bands x height x width)")
    raise DataError(f"{path}: unsupported image type (JPEG, PNG or FITS expected)")


def _cache_key(path: Path, size: int) -> str:
    stat = path.stat()
    text = f"{PREPROCESS_VERSION}|{path.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{size}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load_model_input(path: Path, *, size: int = DEFAULT_SIZE, cache_dir: Path | None = None) -> np.ndarray:
    """:func:`load_pixels` then :func:`to_model_input`, memoised on disk when ``cache_dir`` is set.

    The cache key is the preprocessing version, the resolved path, the file's modification time and
    size, and ``size``; editing or replacing a file invalidates its entry.
    """
    cached: Path | None = None
    if cache_dir is not None:
        cached = cache_dir / f"{_cache_key(path, size)}.npy"
        if cached.exists():
            try:
                return np.load(cached, allow_pickle=False)
            except (OSError, ValueError):
                log.warning("unreadable cache entry %s, recomputing", cached)
    pixels, bands = load_pixels(path)
    out = to_model_input(pixels, bands=bands, size=size)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # write then rename, so a concurrent reader never sees half a file
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("wb") as fh:
            np.save(fh, out, allow_pickle=False)
        tmp.replace(cached)
    return out


def _parse_labels(values: list[str], column: str, threshold: float | None) -> np.ndarray:
    try:
        numbers = np.asarray([float(v) for v in values], dtype=np.float64)
    except ValueError:
        if threshold is not None:
            raise LabelsError(f"--threshold needs a numeric column; {column!r} is not") from None
        return np.asarray(values, dtype=str)
    if threshold is not None:
        return (numbers >= threshold).astype(np.int64)
    if numbers.size and np.all(numbers == np.round(numbers)):
        return numbers.astype(np.int64)
    return numbers


def read_folder(
    path: Path,
    *,
    label: str | None = None,
    threshold: float | None = None,
    size: int = DEFAULT_SIZE,
    limit: int | None = None,
    cache_dir: Path | None = None,
) -> ImageSet:
    """Read a ``labels.csv`` dataset folder into model input.

    Parameters
    ----------
    path
        Folder with ``labels.csv`` whose ``file`` column names images relative to the folder.
    label
        Label column to return; rows where it is empty are skipped. None keeps every row.
    threshold
        Binarise a fractional label column: ``value >= threshold`` -> 1, else 0.
    size
        Side of the model input.
    limit
        Keep at most this many rows (the first ones, after skipping empty labels).
    cache_dir
        Directory of the on-disk preprocessing cache (see :func:`load_model_input`); None: off.

    Returns
    -------
    ImageSet
        Images, labels and file names in ``labels.csv`` order.

    Raises
    ------
    LabelsError
        If ``labels.csv`` or its ``file`` or ``label`` column is missing, or a named file is absent.
    """
    folder = Path(path)
    csv_path = folder / "labels.csv"
    if not csv_path.is_file():
        raise LabelsError(f"{folder}: no labels.csv")
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    if "file" not in columns:
        raise LabelsError(f"{csv_path}: no 'file' column (columns: {columns})")
    if label is not None and label not in columns:
        raise LabelsError(f"{csv_path}: no label column {label!r} (columns: {columns})")
    if threshold is not None and label is None:
        raise LabelsError("threshold given without a label column")
    if label is not None:
        rows = [r for r in rows if (r.get(label) or "").strip() != ""]
    if limit is not None:
        rows = rows[: max(0, limit)]
    files = [r["file"] for r in rows]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise LabelsError(f"{len(missing)} file(s) named in {csv_path} are missing, e.g. {missing[0]}")
    images = np.empty((len(files), 3, size, size), dtype=np.float32)
    for i, f in enumerate(files):
        images[i] = load_model_input(folder / f, size=size, cache_dir=cache_dir)
    labels = None
    if label is not None:
        labels = _parse_labels([r[label].strip() for r in rows], label, threshold)
    return ImageSet(images=images, labels=labels, files=files, table=rows)


def read_stored_tile(
    uri: str, *, checksum: str | None, bands: Sequence[str] | None = None, size: int = DEFAULT_SIZE
) -> np.ndarray:
    """Read a ``.npy`` tile from the object store and turn it into model input.

    Parameters
    ----------
    uri
        Object store URI (``file://…``, ``s3://…``) as kept in the tiles table.
    checksum
        sha256 of the stored file; verified when given.
    bands
        Flux bands of the tile's planes (the tile row's ``bands``); ignored for ``uint8`` tiles.
    size
        Side of the model input.

    Raises
    ------
    OSError
        If the stored bytes do not match ``checksum``.
    DataError
        If the pixels cannot become model input (see :func:`to_model_input`).
    """
    from galsift.objectstore import read_array

    return to_model_input(read_array(uri, checksum=checksum), bands=bands, size=size)


class ImageDataset(Dataset[Any]):
    """A torch dataset over model-input images, optionally labelled.

    ``dataset[i]`` is a ``float32`` tensor (3, size, size), or ``(image, label)`` with a
    ``float32`` scalar label when labels are given. ``transform`` (augmentation, simulations)
    is applied to the image tensor on every access.

    Parameters
    ----------
    images
        (N, 3, size, size) model input, e.g. :attr:`ImageSet.images`.
    labels
        Numeric labels, one per image, or None.
    transform
        Callable tensor -> tensor applied per item, or None.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputShapeError(f"expected (N, 3, H, W) images, got {images.shape}")
        if labels is not None and len(labels) != len(images):
            raise DataError(f"{len(labels)} labels for {len(images)} images")
        self.images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.float32))
        self.transform = transform

    @classmethod
    def from_image_set(
        cls, image_set: ImageSet, *, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> ImageDataset:
        """A dataset over an :class:`ImageSet` (with its labels, if numeric)."""
        labels = image_set.labels
        if labels is not None and not np.issubdtype(labels.dtype, np.number):
            raise DataError("labels are not numeric; pass --threshold or choose a numeric column")
        return cls(image_set.images, labels, transform=transform)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index]
        if self.transform is not None:
            x = self.transform(x)
        if self.labels is None:
            return x
        return x, self.labels[index]
