"""Images in, model input out: the one preprocessing used by training, evaluation and serving.

Two kinds of pixels arrive:

* **colour composites** (JPEG/PNG, ``uint8``, channels already red/green/blue) are divided by 255;
* **flux** (FITS cutouts or stored tiles, float nanomaggies per band, e.g. DR9 g,r,z) go through a
  colour-preserving arcsinh stretch (Lupton et al. 2004, PASP 116, 133) with *fixed* per-band
  scales: the same number always maps to the same value, so brightness and colour survive.
  Nothing is normalised per image.

Which bands are accepted and which plane feeds which of the model's 3 channels is the band
contract of :mod:`galsift.bands` (shared with ingest, which refuses everything else): g,r,z flux
(native), g,r,i flux (i shown in the z channel) and R,G,B colour composites; a tile with more
bands is shown the first of these sets it holds. Channels are in red/green/blue order (reddest
band first, e.g. g,r,z -> z,r,g), the order survey colour composites use, so a FITS cutout and the
JPEG made from it land in the same channels.

Both are first resized (antialiased, in linear units) so the shorter side is ``size`` and then
centre-cropped to ``size`` × ``size``.

The stretch, for per-band scales :math:`a_b` (:data:`BAND_SCALES`, each channel with the scale of
the band that feeds it) and softening ``Q`` (:data:`ASINH_Q`)::

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

from galsift.bands import (
    BAND_SCALES,
    DEFAULT_FLUX_BANDS,
    BandError,
    BandMapping,
    Kind,
    resolve_bands,
)

log = logging.getLogger(__name__)

#: bump when the preprocessing changes: it keys the on-disk cache and is written into model cards;
#: loading a checkpoint whose card names another version is refused (encoder.checkpoint)
PREPROCESS_VERSION = "1"
#: default side of the square model input, in pixels
DEFAULT_SIZE = 128
#: softening of the arcsinh stretch (linear below ~1/Q, logarithmic above)
ASINH_Q = 20.0
#: band names of a colour composite that does not name its planes (JPEG/PNG: red, green, blue)
DEFAULT_COLOUR_BANDS = ("R", "G", "B")
# BAND_SCALES (per-band stretch scales) and DEFAULT_FLUX_BANDS (bands assumed for a float array
# that does not name them) live in galsift.bands with the band contract, and are imported above
#: file suffixes read as colour composites and as FITS flux
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fz")


class DataError(ValueError):
    """Input that cannot become model input."""


class NonFiniteInputError(DataError):
    """Pixels containing NaN or infinity (masked or missing data): refused, never imputed."""


class InputShapeError(DataError):
    """Pixels that are not a 3-channel (C, H, W) array of a supported dtype."""


class UnknownBandError(DataError, BandError):
    """Bands outside the band contract of :mod:`galsift.bands` (e.g. no fixed stretch scale)."""


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
    """The colour-preserving arcsinh stretch of the module docstring.

    ``flux`` planes are already in model-channel order (red first) and ``bands[i]`` names the band
    feeding channel ``i``, whose scale it gets.
    """
    scales = np.asarray([BAND_SCALES[b] for b in bands], dtype=np.float64)[:, None, None]
    x = flux.astype(np.float64) * scales
    intensity = x.mean(axis=0)
    qi = ASINH_Q * intensity
    small = np.abs(qi) < 1e-4
    # asinh(q)/q -> 1 - q²/6 near 0; the series avoids 0/0 on empty sky
    safe = np.where(small, 1.0, qi)
    gain = np.where(small, 1.0 - qi**2 / 6.0, np.arcsinh(safe) / safe) * math.sqrt(ASINH_Q)
    return (x * gain[None]).astype(np.float32)


def band_mapping(bands: Sequence[str] | None, *, kind: Kind, planes: int) -> BandMapping:
    """Which plane feeds which model channel, for pixels of ``kind`` with ``planes`` planes.

    Parameters
    ----------
    bands
        Band names of the planes; None means :data:`DEFAULT_FLUX_BANDS` for flux and
        :data:`DEFAULT_COLOUR_BANDS` for colour composites (3 planes only).
    kind
        ``flux`` or ``colour``.
    planes
        Number of planes of the pixel array.

    Raises
    ------
    InputShapeError
        If ``bands`` is None and there are not exactly 3 planes.
    UnknownBandError
        If ``bands`` does not match the planes or is outside the contract of :mod:`galsift.bands`.
    """
    if bands is None:
        if planes != 3:
            raise InputShapeError(f"expected 3 planes when no bands are named, got {planes}")
        bands = DEFAULT_COLOUR_BANDS if kind == "colour" else DEFAULT_FLUX_BANDS
    names = tuple(bands)
    if len(names) != planes:
        raise UnknownBandError(f"{len(names)} bands {list(names)} for {planes} planes")
    try:
        return resolve_bands(names, kind=kind)
    except BandError as exc:
        raise UnknownBandError(str(exc)) from exc


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
        (C, H, W) array: ``uint8`` colour composite or float flux in nanomaggies (any float dtype
        or byte order). C = 3 unless ``bands`` names the planes and holds an accepted set.
    bands
        Band names of the C planes, e.g. ``("g", "r", "z")`` or ``("R", "G", "B")``; planes are
        picked and ordered by name following :mod:`galsift.bands`. Default:
        :data:`DEFAULT_FLUX_BANDS` for flux, red/green/blue for ``uint8``.
    size
        Side of the square output.

    Returns
    -------
    numpy.ndarray
        ``float32`` (3, size, size), channels red first: colour composites in [0, 1]; flux
        stretched as in the module docstring, each channel with its band's scale.

    Raises
    ------
    InputShapeError
        If ``pixels`` is not (C, H, W), is neither ``uint8`` nor float, or has C != 3 without
        ``bands``.
    NonFiniteInputError
        If the flux planes used contain NaN or infinity.
    UnknownBandError
        If ``bands`` does not match the number of planes or is outside the band contract.
    """
    if size < 1:
        raise InputShapeError(f"size must be positive, got {size}")
    arr = np.asarray(pixels)
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise InputShapeError(f"expected a (3, H, W) array, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        kind: Kind = "colour"
    elif np.issubdtype(arr.dtype, np.floating):
        kind = "flux"
    else:
        raise InputShapeError(f"expected uint8 colour or float flux, got dtype {arr.dtype}")
    mapping = band_mapping(bands, kind=kind, planes=arr.shape[0])
    picked = arr[list(mapping.planes)]
    if kind == "colour":
        return _resize_crop(picked.astype(np.float32) / np.float32(255.0), size)
    bad = ~np.isfinite(picked)
    if bad.any():
        raise NonFiniteInputError(
            f"{int(bad.sum())} of {picked.size} pixels are NaN or infinite; fill or mask them first"
        )
    # resize in linear flux (flux is additive), then stretch: the stretch keeps exact colours
    return _flux_stretch(_resize_crop(picked.astype(np.float32), size), mapping.channels)


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
        Band names of the tile's planes (the ``bands`` of the tile row or ``tiles.accepted``
        message): planes are picked, ordered and stretched by band (see :mod:`galsift.bands`).
        None assumes g,r,z for float tiles and R,G,B for ``uint8`` tiles.
    size
        Side of the model input.

    Raises
    ------
    OSError
        If the stored bytes do not match ``checksum``.
    UnknownBandError
        If ``bands`` is outside the band contract.
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
