"""Embed images for HITL search with the LVM *library* (never the encoder service).

A scientist may seed a search with an image that is not in the survey (an uploaded FITS/PNG/JPEG):
:func:`embed_file` turns it into the same 256-d unit vector the embedding service stores, with the
same preprocessing (:func:`encoder.data.load_model_input`) and the same model method
(:meth:`encoder.models.LVM.embed`). :func:`embed_folder` does the same for a ``labels.csv``
dataset folder (``galsift eval hitl``).

Which checkpoint, and its model version's name, follow :mod:`encoder.serving` (the rule the
embedding service uses), so vectors embedded here land in the same model version's space.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from encoder.models import LVM


class EmbedError(ValueError):
    """An image or checkpoint that cannot be embedded."""


@dataclass(frozen=True)
class FolderEmbeddings:
    """A ``labels.csv`` folder's images, embedded.

    Attributes
    ----------
    files
        File names relative to the folder, in ``labels.csv`` order.
    paths
        Absolute paths of the files.
    labels
        One label per file (as :func:`encoder.data.read_folder` parsed it), or None.
    embeddings
        ``float32`` (N, 256), unit norm.
    """

    files: list[str]
    paths: list[Path]
    labels: np.ndarray | None
    embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.files)


@functools.lru_cache(maxsize=2)
def _load(checkpoint: str, device: str) -> tuple[LVM, dict[str, Any]]:
    from encoder.checkpoint import load_model

    return load_model(Path(checkpoint), device=device)


def load_model(checkpoint: Path, *, device: str = "cpu") -> LVM:
    """The checkpoint's model in eval mode (kept loaded: a dashboard embeds many uploads)."""
    return _load(str(Path(checkpoint).resolve()), device)[0]


def embed_inputs(model: LVM, images: np.ndarray, *, device: str = "cpu", batch: int = 64) -> np.ndarray:
    """Embed (N, 3, S, S) model input with :meth:`LVM.embed` -> ``float32`` (N, 256), unit norm."""
    return model.to(device).embed_array(images, batch_size=batch)


def embed_file(path: Path, *, checkpoint: Path, device: str = "cpu") -> np.ndarray:
    """Embed one image file (JPEG/PNG colour composite or multi-band FITS cutout).

    Parameters
    ----------
    path
        The image.
    checkpoint
        LVM checkpoint (see :func:`resolve_checkpoint`).
    device
        Torch device.

    Returns
    -------
    numpy.ndarray
        ``float32`` (256,), unit norm: the vector the embedding service would store.

    Raises
    ------
    EmbedError
        If the file is missing or cannot become model input.
    """
    from encoder.data import DataError, load_model_input

    model = load_model(checkpoint, device=device)
    try:
        x = load_model_input(Path(path), size=int(model.img_size))
    except FileNotFoundError as exc:
        raise EmbedError(f"{path}: no such file") from exc
    except (DataError, OSError, ValueError) as exc:
        raise EmbedError(f"{path}: {exc}") from exc
    return embed_inputs(model, x[None], device=device)[0]


def embed_folder(
    folder: Path,
    *,
    checkpoint: Path,
    label: str | None = None,
    threshold: float | None = None,
    device: str = "cpu",
    batch: int = 64,
    cache_dir: Path | None = None,
) -> FolderEmbeddings:
    """Embed every image a ``labels.csv`` folder names (rows with an empty ``label`` skipped).

    Parameters
    ----------
    folder
        Dataset folder (``labels.csv`` + images).
    checkpoint
        LVM checkpoint.
    label, threshold
        Label column to return, and the threshold that binarises a fractional one.
    device, batch
        Torch device and images per forward pass.
    cache_dir
        Preprocessing cache (as ``galsift eval`` uses); None: off.

    Raises
    ------
    encoder.data.LabelsError
        If the folder does not match the dataset contract.
    """
    from encoder.data import read_folder

    model = load_model(checkpoint, device=device)
    data = read_folder(
        Path(folder), label=label, threshold=threshold, size=int(model.img_size), cache_dir=cache_dir
    )
    emb = embed_inputs(model, data.images, device=device, batch=batch)
    root = Path(folder).resolve()
    return FolderEmbeddings(
        files=list(data.files), paths=[root / f for f in data.files], labels=data.labels, embeddings=emb
    )


def image_files(folder: Path) -> list[Path]:
    """Every JPEG/PNG/FITS file under ``folder`` (recursively), sorted."""
    from encoder.data import FITS_SUFFIXES, IMAGE_SUFFIXES

    suffixes = IMAGE_SUFFIXES + FITS_SUFFIXES
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))


def embed_paths(
    paths: list[Path],
    *,
    checkpoint: Path,
    device: str = "cpu",
    batch: int = 64,
    cache_dir: Path | None = None,
) -> np.ndarray:
    """Embed image files -> ``float32`` (N, 256), unit norm (unreadable files raise :class:`EmbedError`)."""
    from encoder.data import DataError, load_model_input

    model = load_model(checkpoint, device=device)
    size = int(model.img_size)
    out = []
    for start in range(0, len(paths), batch):
        chunk = []
        for p in paths[start : start + batch]:
            try:
                chunk.append(load_model_input(p, size=size, cache_dir=cache_dir))
            except (DataError, OSError, ValueError) as exc:
                raise EmbedError(f"{p}: {exc}") from exc
        out.append(embed_inputs(model, np.stack(chunk), device=device, batch=batch))
    return np.concatenate(out) if out else np.zeros((0, 256), np.float32)
