"""Vectors with the structure of real LVM embeddings, in any number, for benchmarks.

A search benchmark needs hundreds of thousands of vectors, far more than the images on a
development machine. Uniform random unit vectors would be the wrong stand-in: in 256 dimensions
they are all nearly orthogonal, with no clusters and no low-dimensional structure, which makes
an approximate index look either hopeless or trivially good. Instead (:func:`synthetic_embeddings`):

1. **embed real images** with a checkpoint (the same :class:`encoder.service.Embedder` the
   embedding service runs): every image of the ``labels.csv`` folders (or plain image/FITS
   folders) under the data directory, exact duplicates dropped, each seen in several random
   colour-preserving augmented views (:class:`encoder.augment.Augment`: rotations, zooms, shifts,
   brightness, seeing and noise), plus a few GalSim/lenstronomy simulations
   (:func:`encoder.sim.simulate_batch`) in augmented views;
2. **fit a Gaussian mixture** to those embeddings (:func:`fit_mixture`): PCA to the dimensions
   that carry :data:`PCA_VARIANCE` of the variance, a full-covariance mixture there, and
   independent Gaussians with the embeddings' own PCA variances along the remaining directions
   (so the whole eigenvalue spectrum, tail included, is that of the real embeddings);
3. **sample** as many vectors as wanted from it and L2-normalise them
   (:meth:`EmbeddingMixture.sample`), as the model's embeddings are.

The sample is cached under ``<data_dir>/cache/synthetic/`` keyed by the checkpoint's checksum, the
data directory, the number of vectors, the seed and :data:`RECIPE_VERSION`, so reruns (and other
benchmarks) reuse it. :func:`sky_positions`, :func:`second_version` and :func:`detector_scores`
make the metadata a benchmark table needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: bump when the recipe below changes: it keys the cache
RECIPE_VERSION = "1"
#: share of the embeddings' variance kept in the PCA space the mixture is fitted in
PCA_VARIANCE = 0.99
#: bounds of the PCA space's dimension
PCA_DIMS = (8, 32)
#: mixture components (fewer when there are few embeddings: at least 24 embeddings each)
COMPONENTS = 48
#: embeddings per component the mixture needs at least
PER_COMPONENT = 24
#: added to the mixture covariances' diagonal, relative to the mean PCA variance
REG_COVAR = 1e-3


class SyntheticError(ValueError):
    """The data directory or the recipe's parameters cannot make vectors."""


# --------------------------------------------------------------------------- real images
def _image_files(folder: Path) -> list[Path]:
    from encoder.data import FITS_SUFFIXES, IMAGE_SUFFIXES

    suffixes = IMAGE_SUFFIXES + FITS_SUFFIXES
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))


def dataset_folders(data: Path) -> list[Path]:
    """The image folders of ``data``: itself if it holds ``labels.csv``, else its sub-folders.

    Sub-folders count when they hold a ``labels.csv`` or any JPEG/PNG/FITS file; ``data`` itself
    counts when it holds image files directly and no sub-folder does.

    Raises
    ------
    SyntheticError
        If nothing under ``data`` is an image folder.
    """
    data = Path(data)
    if (data / "labels.csv").is_file():
        return [data]
    if not data.is_dir():
        raise SyntheticError(f"{data}: not a directory")
    subs = [
        p for p in sorted(data.iterdir()) if p.is_dir() and ((p / "labels.csv").is_file() or _image_files(p))
    ]
    if subs:
        return subs
    if _image_files(data):
        return [data]
    raise SyntheticError(f"{data}: no labels.csv folder and no JPEG/PNG/FITS files")


def load_images(data: Path, *, size: int, cache_dir: Path | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """Model inputs of every image under ``data``, exact duplicates dropped.

    Folders with a ``labels.csv`` are read through :func:`encoder.data.read_folder` (labels are
    not used), other folders file by file; both use the one preprocessing of the services.

    Returns
    -------
    tuple
        ``(images, per_folder)``: float32 (N, 3, size, size) and the number of distinct images
        each folder added.
    """
    from encoder.data import load_model_input, read_folder

    seen: set[bytes] = set()
    kept: list[np.ndarray] = []
    per_folder: dict[str, int] = {}
    for folder in dataset_folders(data):
        if (folder / "labels.csv").is_file():
            images = read_folder(folder, size=size, cache_dir=cache_dir).images
        else:
            images = np.stack(
                [load_model_input(p, size=size, cache_dir=cache_dir) for p in _image_files(folder)]
            )
        added = 0
        for img in images:
            digest = hashlib.sha256(img.tobytes()).digest()
            if digest not in seen:
                seen.add(digest)
                kept.append(img)
                added += 1
        per_folder[folder.name] = added
    return np.stack(kept), per_folder


def augmented_views(images: np.ndarray, *, views: int, seed: int, batch: int = 64) -> np.ndarray:
    """``views`` random colour-preserving augmented copies of every image.

    The augmentations (:class:`encoder.augment.Augment`: dihedral turns, rotation by any angle,
    zoom into 70–100% crops, one brightness factor for all bands, shifts, extra seeing and noise)
    are the survey-like changes an object's embedding should tolerate, so the views spread
    around each galaxy like other galaxies of its kind would.

    Returns
    -------
    numpy.ndarray
        float32 (len(images) * views, 3, S, S), image-major.
    """
    import torch

    from encoder.augment import Augment

    aug = Augment(rotate=True, crop_scale=(0.7, 1.0), brightness=(0.8, 1.25), noise_sigma=0.03)
    g = torch.Generator().manual_seed(seed)
    src = np.repeat(images, views, axis=0)
    out = np.empty_like(src)
    with torch.no_grad():
        for start in range(0, len(src), batch):
            x = torch.from_numpy(src[start : start + batch])
            out[start : start + batch] = aug(x, g).numpy()
    return out


# --------------------------------------------------------------------------- the mixture
@dataclass(frozen=True)
class EmbeddingMixture:
    """A Gaussian mixture in a PCA space plus independent Gaussians along the other directions.

    Attributes
    ----------
    mean
        (D,) mean of the fitted embeddings.
    basis
        (d, D) leading orthonormal PCA directions (rows), where the mixture lives.
    weights
        (K,) mixture weights.
    means
        (K, d) component means in PCA coordinates.
    chol
        (K, d, d) lower Cholesky factors of the component covariances.
    tail_basis
        (D - d, D) the remaining PCA directions.
    tail_std
        (D - d,) standard deviation of the embeddings along each of them.
    info
        How it was fitted (sizes, explained variance, log-likelihoods), for reports.
    """

    mean: np.ndarray
    basis: np.ndarray
    weights: np.ndarray
    means: np.ndarray
    chol: np.ndarray
    tail_basis: np.ndarray
    tail_std: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        """Dimension of the sampled vectors."""
        return int(self.mean.shape[0])

    def sample(self, n: int, rng: np.random.Generator, *, chunk: int = 65536) -> np.ndarray:
        """``n`` L2-normalised float32 vectors drawn from the mixture.

        Parameters
        ----------
        n
            Number of vectors.
        rng
            Source of randomness; the sample is a pure function of its state.
        chunk
            Vectors drawn per step (bounds the memory used).
        """
        if n < 0:
            raise SyntheticError(f"cannot sample {n} vectors")
        d = self.basis.shape[0]
        out = np.empty((n, self.dim), np.float32)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            comp = rng.choice(len(self.weights), size=m, p=self.weights)
            z = rng.standard_normal((m, d))
            coords = self.means[comp] + np.einsum("nij,nj->ni", self.chol[comp], z)
            tail = rng.standard_normal((m, len(self.tail_std))) * self.tail_std
            x = self.mean + coords @ self.basis + tail @ self.tail_basis
            out[start : start + m] = normalise(x)
        return out


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def fit_mixture(
    x: np.ndarray,
    *,
    components: int = COMPONENTS,
    variance: float = PCA_VARIANCE,
    seed: int = 0,
    holdout: float = 0.2,
) -> EmbeddingMixture:
    """Fit :class:`EmbeddingMixture` to embeddings ``x`` (N, D).

    The PCA keeps the leading directions carrying ``variance`` of the total (within
    :data:`PCA_DIMS`) for a full-covariance mixture, with ``components`` reduced so that each has
    at least :data:`PER_COMPONENT` embeddings; the other directions keep their own variances. A
    random ``holdout`` share is fitted without and scored afterwards (mean log-likelihood in the
    PCA space, against a single Gaussian), so a report can say whether the mixture generalises;
    the returned mixture is refitted on everything.

    Raises
    ------
    SyntheticError
        If there are fewer than 2 * :data:`PER_COMPONENT` embeddings, or fewer than dimensions.
    """
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    x = np.asarray(x, dtype=np.float64)
    n, dim = x.shape
    if n < max(2 * PER_COMPONENT, dim):
        raise SyntheticError(f"{n} embeddings of dimension {dim} are too few to fit a mixture")
    pca = PCA(random_state=seed).fit(x)
    cumulative = np.cumsum(pca.explained_variance_ratio_)
    d = int(np.searchsorted(cumulative, variance) + 1)
    d = max(PCA_DIMS[0], min(PCA_DIMS[1], d, dim - 1))
    coords = (x - pca.mean_) @ pca.components_[:d].T
    k = max(1, min(components, n // PER_COMPONENT))
    reg = REG_COVAR * float(coords.var(axis=0).mean())

    def gmm(k_: int, data: np.ndarray) -> Any:
        return GaussianMixture(
            n_components=k_, covariance_type="full", reg_covar=reg, random_state=seed, max_iter=200
        ).fit(data)

    rng = np.random.default_rng(seed)
    test = np.asarray(rng.random(n) < holdout, dtype=bool)
    info: dict[str, Any] = {
        "embeddings": n,
        "pca_dims": d,
        "pca_variance": round(float(cumulative[d - 1]), 4),
        "components": k,
        "covariance": "full",
    }
    if np.count_nonzero(test) >= 10 and np.count_nonzero(~test) >= 2 * k:
        info["holdout_loglik"] = round(float(gmm(k, coords[~test]).score(coords[test])), 2)
        info["holdout_loglik_1_gaussian"] = round(float(gmm(1, coords[~test]).score(coords[test])), 2)
    model = gmm(k, coords)
    return EmbeddingMixture(
        mean=pca.mean_,
        basis=pca.components_[:d],
        weights=model.weights_ / model.weights_.sum(),
        means=model.means_,
        chol=np.linalg.cholesky(model.covariances_),
        tail_basis=pca.components_[d:],
        tail_std=np.sqrt(pca.explained_variance_[d:]),
        info=info,
    )


# --------------------------------------------------------------------------- metadata
def second_version(vectors: np.ndarray, *, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Another model version's embeddings of the same objects: ``normalise(v + scale * noise)``.

    The noise is isotropic Gaussian with ``scale`` per vector (``scale / sqrt(D)`` per
    dimension), i.e. a retrained model that moves every embedding a little and independently.
    """
    noise = rng.standard_normal(vectors.shape) * (scale / math.sqrt(vectors.shape[1]))
    return normalise(vectors + noise)


def sky_positions(
    n: int,
    *,
    rng: np.random.Generator,
    ra: tuple[float, float] = (0.0, 360.0),
    dec: tuple[float, float] = (-20.0, 35.0),
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` positions uniform on the sphere inside an RA/Dec box (degrees).

    The default box, all RA between Dec −20° and +35° (about 18,900 deg²), is roughly the
    footprint of the DESI Legacy Imaging Surveys.
    """
    lo, hi = np.sin(np.radians(dec[0])), np.sin(np.radians(dec[1]))
    ras = rng.uniform(ra[0], ra[1], n) % 360.0
    decs = np.degrees(np.arcsin(rng.uniform(lo, hi, n)))
    return ras, decs


def healpix_nested(ra: np.ndarray, dec: np.ndarray, *, order: int) -> np.ndarray:
    """Nested HEALPix indices (int64) of positions at ``order``, as ``tiles.healpix`` stores them."""
    import astropy.units as u
    from astropy_healpix import lonlat_to_healpix

    return np.asarray(lonlat_to_healpix(ra * u.deg, dec * u.deg, 2**order, order="nested"), dtype=np.int64)


def detector_scores(n: int, *, rng: np.random.Generator, a: float = 0.5, b: float = 3.0) -> np.ndarray:
    """Detector-like scores in [0, 1]: Beta(a, b), most near 0 and a tail of candidates."""
    return rng.beta(a, b, n).astype(np.float32)


# --------------------------------------------------------------------------- the whole recipe
@dataclass(frozen=True)
class SyntheticVectors:
    """Sampled vectors and a description of how they were made.

    Attributes
    ----------
    vectors
        float32 (n, 256), unit norm.
    info
        The recipe and its measured facts (what was embedded, the mixture fit), JSON-ready.
    """

    vectors: np.ndarray
    info: dict[str, Any]


def cache_key(*, checksum: str, data: Path, n: int, seed: int, recipe: str = "") -> str:
    """Cache key of a sample: checkpoint checksum, resolved data dir, n, seed and the recipe.

    ``recipe`` carries the recipe's parameters; :data:`RECIPE_VERSION` is always part of it.
    """
    text = f"{RECIPE_VERSION}|{checksum}|{Path(data).resolve()}|{n}|{seed}|{recipe}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def synthetic_embeddings(
    n: int,
    *,
    checkpoint: Path,
    data: Path,
    seed: int = 0,
    cache_dir: Path | None = None,
    target_embeddings: int = 1600,
    simulations: int = 48,
    sim_views: int = 4,
    device: str = "cpu",
    progress: bool = True,
) -> SyntheticVectors:
    """``n`` vectors sampled from a mixture fitted to a checkpoint's embeddings of real images.

    Parameters
    ----------
    n
        Number of vectors to sample.
    checkpoint
        LVM checkpoint (``.safetensors`` with its card).
    data
        A ``labels.csv`` folder or a folder of such folders (and plain image/FITS folders).
    seed
        Seed of every random choice (augmentations, simulations, the fit, the sample).
    cache_dir
        Directory of the sample cache (``<settings.data_dir>/cache``); None: no cache. The
        preprocessed images are cached in its ``model_input`` sub-folder, as ``galsift eval``
        does.
    target_embeddings
        About how many augmented views of real images to embed (at least 2 per image).
    simulations, sim_views
        Simulated galaxies and lenses (GalSim, lenstronomy) and augmented views of each.
    device
        Torch device of the embedder.
    progress
        Show progress bars.

    Returns
    -------
    SyntheticVectors
        The vectors and a JSON-ready description; ``info["cached"]`` says whether they came
        from the cache.
    """
    from encoder.checkpoint import file_sha256, read_card

    checksum = file_sha256(checkpoint)
    recipe = f"{target_embeddings}|{simulations}|{sim_views}"
    key = cache_key(checksum=checksum, data=data, n=n, seed=seed, recipe=recipe)
    cached = cache_dir / "synthetic" / f"{key}.npz" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                vectors, info = z["vectors"], json.loads(str(z["info"]))
            info["cached"] = True
            return SyntheticVectors(vectors, info)
        except (OSError, ValueError, KeyError):
            log.warning("unreadable cache entry %s, recomputing", cached)

    card = read_card(checkpoint)
    t0 = time.perf_counter()
    embeddings, made = embed_sources(
        checkpoint,
        data,
        seed=seed,
        cache_dir=cache_dir / "model_input" if cache_dir is not None else None,
        target_embeddings=target_embeddings,
        simulations=simulations,
        sim_views=sim_views,
        device=device,
        progress=progress,
    )
    mixture = fit_mixture(embeddings, seed=seed)
    vectors = mixture.sample(n, np.random.default_rng([seed, 1]))
    info = {
        "method": "gaussian_mixture_of_lvm_embeddings",
        "description": (
            f"{n} samples of a {mixture.info['components']}-component full-covariance Gaussian mixture "
            f"in the {mixture.info['pca_dims']}-d PCA space ({mixture.info['pca_variance']:.0%} of the "
            f"variance, the PCA tail's own variances in the other dimensions) fitted to {len(embeddings)} "
            f"embeddings by {card.get('version') or checkpoint.name} of {made['real_images']} real images "
            f"in {made['real_views']} augmented views and {made['simulations']} GalSim/lenstronomy "
            f"simulations in {made['sim_views']} views, L2-normalised"
        ),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": checksum,
        "model_version": card.get("version"),
        "data": str(data),
        "n": n,
        "seed": seed,
        "recipe_version": RECIPE_VERSION,
        **made,
        "mixture": mixture.info,
        "seconds": round(time.perf_counter() - t0, 1),
        "cached": False,
    }
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, vectors=vectors, info=np.asarray(json.dumps(info)))
        tmp.replace(cached)
    return SyntheticVectors(vectors, info)


def embed_sources(
    checkpoint: Path,
    data: Path,
    *,
    seed: int,
    cache_dir: Path | None,
    target_embeddings: int,
    simulations: int,
    sim_views: int,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Embeddings of augmented real images and simulations (step 1 of the recipe).

    Returns
    -------
    tuple
        ``(embeddings, made)``: float32 (M, 256) and counts of what was embedded.
    """
    from tqdm import tqdm

    from encoder.service import Embedder

    embedder = Embedder(checkpoint, device=device, batch=64)
    images, per_folder = load_images(data, size=embedder.img_size, cache_dir=cache_dir)
    views = max(2, math.ceil(target_embeddings / len(images)))
    parts = [("real", augmented_views(images, views=views, seed=seed))]
    if simulations > 0:
        from encoder.sim import simulate_batch

        sims = simulate_batch(simulations, rng=np.random.default_rng([seed, 2]), size=embedder.img_size)
        parts.append(("sim", augmented_views(sims.images, views=sim_views, seed=seed + 1)))
    out = []
    total = sum(len(p) for _, p in parts)
    with tqdm(total=total, desc="embed augmented views", unit="img", disable=not progress) as bar:
        for _, batch in parts:
            for start in range(0, len(batch), 256):
                chunk = batch[start : start + 256]
                out.append(embedder.embed(chunk))
                bar.update(len(chunk))
    made = {
        "real_images": len(images),
        "real_views": views,
        "folders": per_folder,
        "simulations": simulations,
        "sim_views": sim_views if simulations > 0 else 0,
        "embedded": total,
    }
    return np.concatenate(out).astype(np.float32), made
