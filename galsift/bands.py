"""The band contract: which bands a tile may carry and how they become the LVM's 3 channels.

The LVM sees 3 channels in red, green, blue order. It was trained on Legacy Surveys g, r, z flux
(channels z, r, g) and on colour composites made from it, so the accepted inputs are:

=========  ========  ===================  ===========================================================
set        pixels    model channels       notes
           (dtype)   (red, green, blue)
=========  ========  ===================  ===========================================================
``g,r,z``  float32   z, r, g              native (Legacy Surveys DR9, DECaLS, DES g,r,z)
``g,r,i``  float32   i, r, g              i stands in for z: colours keep their blue -> red order;
                                          each band keeps its own stretch scale (i: 2.7)
``R,G,B``  uint8     R, G, B              colour composite (JPEG/PNG), shown as stored
=========  ========  ===================  ===========================================================

Band names are matched case-insensitively after stripping blanks, and planes may come in any
order (they are picked by name). A tile with more than 3 bands is accepted when it holds one of
the sets above; the first such set in table order is shown to the model (``u,g,r,i,z`` ->
``g,r,z``) and the other planes are stored but not used. Anything else is refused: 1 or 2 bands,
bands without a stretch scale (``y``, ``u`` alone, ``NUV``), other 3-band sets (``r,i,z`` would
put r in the blue channel), flux stored as ``uint8`` and colour composites stored as floats.

Ingest (:mod:`ingest.validate`) refuses tiles outside the contract with reason ``bands``, so they
reach ``tiles.dead`` instead of failing in the encoder; the encoder (:mod:`encoder.data`) uses
:func:`resolve_bands` to pick and order the planes and to stretch each with its band's scale.

This module must stay free of ``ingest``, ``encoder`` and ``db`` imports: all of them use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import DTypeLike

#: what a tile's pixels are: calibrated flux (float) or an 8-bit colour composite
Kind = Literal["flux", "colour"]

#: number of channels of the model input
MODEL_CHANNELS = 3
#: what the model's channels 0, 1, 2 (red, green, blue) meant in training: Legacy Surveys z, r, g.
#: Written into checkpoint cards; a card with other channels is refused on load.
NATIVE_CHANNELS: tuple[str, str, str] = ("z", "r", "g")
#: flux bands assumed for a float array that does not name its bands (DR9 cutouts)
DEFAULT_FLUX_BANDS: tuple[str, str, str] = ("g", "r", "z")
#: per-band flux scale (per nanomaggy) of the arcsinh stretch; g, r, z as in the Legacy Surveys
#: viewer's DECam composites; i is interpolated between r and z (no survey default exists)
BAND_SCALES: dict[str, float] = {"g": 6.0, "r": 3.4, "i": 2.7, "z": 2.2}
#: effective wavelengths in nm (DECam/SDSS-like filters), to document and check blue -> red order
BAND_WAVELENGTH_NM: dict[str, float] = {"g": 480.0, "r": 620.0, "i": 770.0, "z": 910.0}


class BandError(ValueError):
    """Bands (with their pixel type) that are outside the band contract."""


@dataclass(frozen=True)
class BandSet:
    """One accepted band set.

    Attributes
    ----------
    name
        Short name (``grz``, ``gri``, ``rgb``).
    kind
        ``flux`` (float pixels) or ``colour`` (``uint8`` composites).
    channels
        Normalised (lower-case) band feeding model channel 0, 1, 2 (red, green, blue).
    note
        What the mapping means, for error messages and documentation.
    """

    name: str
    kind: Kind
    channels: tuple[str, str, str]
    note: str

    @property
    def label(self) -> str:
        """Blue-first display name as surveys write it: ``g,r,z`` or ``R,G,B``."""
        if self.kind == "colour":
            return ",".join(b.upper() for b in self.channels)
        return ",".join(reversed(self.channels))


#: the accepted band sets, in order of preference when a tile holds more than one
ACCEPTED_BAND_SETS: tuple[BandSet, ...] = (
    BandSet("grz", "flux", ("z", "r", "g"), "native"),
    BandSet("gri", "flux", ("i", "r", "g"), "i shown as z"),
    BandSet("rgb", "colour", ("r", "g", "b"), "shown as stored"),
)


@dataclass(frozen=True)
class BandMapping:
    """How one tile's planes feed the model's channels.

    Attributes
    ----------
    band_set
        The accepted set the tile was matched to.
    planes
        Index of the tile plane feeding model channel 0, 1, 2 (red, green, blue).
    """

    band_set: BandSet
    planes: tuple[int, int, int]

    @property
    def channels(self) -> tuple[str, str, str]:
        """Normalised band of each model channel, red first."""
        return self.band_set.channels

    @property
    def native(self) -> bool:
        """Whether the tile's bands are the ones the model was trained on (no stand-in band)."""
        return self.band_set.kind == "colour" or self.band_set.channels == NATIVE_CHANNELS


def normalise_band(name: str) -> str:
    """The comparable form of a band name: blanks stripped, lower case."""
    return str(name).strip().lower()


def kind_of_dtype(dtype: DTypeLike) -> Kind:
    """``colour`` for ``uint8`` pixels, ``flux`` for floating-point pixels.

    Raises
    ------
    BandError
        For any other pixel type.
    """
    dt = np.dtype(dtype)
    if dt == np.uint8:
        return "colour"
    if dt.kind == "f":
        return "flux"
    raise BandError(f"pixels of type {dt} are neither uint8 colour nor float flux")


def describe_accepted() -> str:
    """One line listing the accepted band sets, for error messages."""
    parts = [
        f"{s.label} {'float flux' if s.kind == 'flux' else 'uint8 colour composite'} ({s.note})"
        for s in ACCEPTED_BAND_SETS
    ]
    return (
        "accepted: "
        + "; ".join(parts)
        + " - case-insensitive, planes in any order; more bands are fine if one of these sets is among them"
    )


def resolve_bands(bands: Sequence[str], *, kind: Kind) -> BandMapping:
    """Match a tile's bands to the contract and say which plane feeds which model channel.

    Parameters
    ----------
    bands
        Band names of the tile's planes, in plane order.
    kind
        ``flux`` or ``colour`` (see :func:`kind_of_dtype`).

    Returns
    -------
    BandMapping
        The first accepted set of that kind (table order) whose bands the tile holds.

    Raises
    ------
    BandError
        If the names are empty or repeated, or no accepted set of that kind is among them; the
        message lists what is accepted.
    """
    names = [normalise_band(b) for b in bands]
    shown = list(bands)
    if not names or not all(names):
        raise BandError(f"band names {shown} must be non-empty; {describe_accepted()}")
    if len(set(names)) != len(names):
        raise BandError(f"band names {shown} repeat a band (case-insensitively); {describe_accepted()}")
    position = {b: i for i, b in enumerate(names)}
    for band_set in ACCEPTED_BAND_SETS:
        if band_set.kind == kind and all(b in position for b in band_set.channels):
            c0, c1, c2 = band_set.channels
            return BandMapping(band_set, (position[c0], position[c1], position[c2]))
    other = next(
        (s for s in ACCEPTED_BAND_SETS if s.kind != kind and all(b in position for b in s.channels)), None
    )
    if other is not None:
        # the names fit, the pixel type does not: say so, it is the likelier mistake
        wanted = "uint8" if other.kind == "colour" else "float"
        raise BandError(
            f"bands {shown} are a {other.kind} set ({other.label}) and need {wanted} pixels, "
            f"not {'float' if kind == 'flux' else 'uint8'} ones; {describe_accepted()}"
        )
    raise BandError(f"{len(names)} band(s) {shown} hold no accepted {kind} band set; {describe_accepted()}")
