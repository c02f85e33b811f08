"""Search: nearest neighbours of a tile, a sky position, an uploaded image, or a random/unusual pick.

The query is one embedding; its neighbours come from one pgvector HNSW query per page (one model
version, optional filters: survey, a cone on the sky, a minimum lens score or morphology
probability), shown as a grid of cutouts with their cosine similarity and exported as CSV or
VOTable.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import streamlit as st

from dashboard import data, widgets

#: how the query is chosen
STARTS = ("Tile id", "Coordinates", "Upload an image", "Random tile", "Unusual tile")
#: neighbours per page
PAGE_SIZES = (12, 24, 48)


def main() -> None:
    """Render the page."""
    st.title("Search")
    st.caption("Nearest neighbours in the LVM's embedding space, from a tile, a position or an image.")
    version = widgets.version_picker(key="search_version")
    if version is None:
        return
    with st.sidebar:
        filters = _filters()
    start = st.radio("Start from", STARTS, horizontal=True, key="search_start")
    query = _query(start, version)
    if query is None:
        return
    label, vec, exclude = query
    st.subheader(f"Neighbours of {label}")
    c1, c2, _ = st.columns([1, 1, 3])
    per_page = c1.selectbox("Per page", PAGE_SIZES, index=1, key="search_per_page")
    page = int(c2.number_input("Page", min_value=1, max_value=100, value=1, step=1, key="search_page"))
    rows = data.neighbours(
        vec, version, k=int(per_page), offset=(page - 1) * int(per_page), filters=filters, exclude=exclude
    )
    if not rows:
        st.info("No tile matches these filters." if filters.active else "No neighbours found.")
        return
    widgets.grid(
        rows,
        columns=6,
        caption=lambda r: widgets.tile_caption(r, score_name="sim", score=float(r["similarity"])),
    )
    st.caption(f"{len(rows)} tiles on page {page}; similarity = 1 - cosine distance ({version}).")
    widgets.table_download(rows, name=f"neighbours_p{page}", key="search_export")
    with st.expander("As a table"):
        st.dataframe(widgets.to_table(rows).to_pandas(), hide_index=True)


def _filters() -> data.Filters:
    st.header("Filters")
    chosen = st.multiselect("Survey", data.surveys(), key="search_surveys")
    cone = None
    if st.toggle("Sky region (cone)", key="search_cone_on"):
        pos = st.text_input(
            "Centre", value="150.1 2.2", key="search_cone_centre", help="any format astropy reads"
        )
        radius = st.number_input("Radius (deg)", 0.001, 180.0, 1.0, key="search_cone_radius")
        try:
            from hitl.cli import parse_position

            c = parse_position(pos).icrs
            cone = (float(c.ra.deg), float(c.dec.deg), float(radius))
        except ValueError as exc:
            st.error(str(exc))
    lens_min = None
    if st.toggle("Minimum lens score", key="search_lens_on"):
        lens_min = st.slider("Lens score ≥", 0.0, 1.0, 0.5, 0.01, key="search_lens_min")
    morph = None
    classes = data.morphology_classes()
    if classes and st.toggle("Morphology", key="search_morph_on"):
        cls = st.selectbox("Class", classes, key="search_morph_class")
        p = st.slider("Probability ≥", 0.0, 1.0, 0.5, 0.01, key="search_morph_min")
        morph = (str(cls), float(p))
    return data.Filters(surveys=tuple(chosen), cone=cone, lens_min=lens_min, morphology=morph)


def _query(start: str, version: str) -> tuple[str, np.ndarray, tuple[str, ...]] | None:
    """(what the query is, its embedding, tile ids to leave out) or None with a message shown."""
    if start == "Tile id":
        ref = st.text_input("Tile id or survey:external_id", key="search_tile")
        if not ref.strip():
            st.info("Type a tile id (a UUID) or survey:external_id, or pick another start.")
            return None
        tid = data.find_tile(ref)
        if tid is None:
            st.error(f"No tile {ref!r}.")
            return None
        return _from_tile(str(tid), version)
    if start == "Coordinates":
        pos = st.text_input(
            "Position", key="search_pos", help="'150.1 2.2' (degrees), '10h00m24s +02d12m', 'J100024+021200'…"
        )
        radius = st.number_input("Match radius (arcsec)", 0.1, 3600.0, 5.0, key="search_pos_radius")
        if not pos.strip():
            st.info("Type a sky position; the nearest embedded tile within the radius is the query.")
            return None
        import astropy.units as u

        from hitl.cli import parse_position
        from hitl.engine import HitlError

        try:
            tid, sep = data.search_engine().resolve_position(
                parse_position(pos), model_version=version, radius=float(radius) * u.arcsec
            )
        except (ValueError, HitlError) as exc:
            st.error(str(exc))
            return None
        st.caption(f"nearest embedded tile: {sep * 3600:.2f}″ away")
        return _from_tile(str(tid), version)
    if start == "Upload an image":
        return _from_upload(version)
    if start == "Random tile":
        if st.button("Draw another", key="search_redraw") or "search_random" not in st.session_state:
            st.session_state["search_random"] = str(data.random_tile(version) or "")
        tid = st.session_state["search_random"]
        if not tid:
            st.info("No embedded tile to draw.")
            return None
        return _from_tile(tid, version)
    ranked = data.anomalous_tiles(version)
    if not ranked:
        st.info("No embedded tile to rank.")
        return None
    i = int(
        st.number_input(
            "Rank among the most unusual (isolation forest on a sample)",
            1,
            len(ranked),
            1,
            key="search_anomaly_rank",
        )
    )
    picked, score = ranked[i - 1]
    st.caption(f"anomaly score {score:.3f}")
    return _from_tile(picked, version)


def _from_tile(tid: str, version: str) -> tuple[str, np.ndarray, tuple[str, ...]] | None:
    vec = data.embedding(tid, version)
    row = data.tiles((tid,)).get(tid)
    if vec is None or row is None:
        st.error(f"Tile {tid} has no {version} embedding.")
        return None
    c1, c2 = st.columns([1, 5])
    c1.image(data.tile_cutout(row), width="stretch")
    c2.markdown(
        f"**{row['survey']}:{row['external_id']}**  \n`{tid}`  \n"
        + (f"RA {row['ra']:.5f}°, Dec {row['dec']:.5f}°" if row.get("ra") is not None else "no position")
        + (f"  \nlens score {row['lens_score']:.3f}" if row.get("lens_score") is not None else "")
    )
    return f"{row['survey']}:{row['external_id']}", vec, (tid,)


def _from_upload(version: str) -> tuple[str, np.ndarray, tuple[str, ...]] | None:
    upload = st.file_uploader(
        "FITS cutout (bands x height x width) or a PNG/JPEG colour composite",
        type=["fits", "fit", "fz", "png", "jpg", "jpeg"],
        key="search_upload",
    )
    if upload is None:
        return None
    vec = _embed_upload(upload.name, upload.getvalue(), version)
    if vec is None:
        return None
    return f"uploaded {upload.name}", vec, ()


@st.cache_data(show_spinner="embedding the image with the serving model…", max_entries=32)
def _embed_upload(name: str, content: bytes, version: str) -> np.ndarray | None:
    """The upload's embedding by ``version``'s checkpoint (same preprocessing as the encoder)."""
    from db import hitl as store

    try:
        from hitl.embed import EmbedError, embed_file
    except ImportError:  # pragma: no cover - depends on the optional torch stack
        st.error("Embedding uploads needs the LVM library (hitl.embed).")
        return None
    uri = store.checkpoint_of(data.engine(), version)
    if uri is None:
        st.error(f"Model version {version} is not registered.")
        return None
    checkpoint = _local_path(uri)
    suffix = "".join(Path(name).suffixes[-2:]) or ".png"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(content)
        try:
            return np.asarray(embed_file(path, checkpoint=checkpoint))
        except (EmbedError, FileNotFoundError) as exc:
            st.error(str(exc))
            return None


def _local_path(uri: str) -> Path:
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)


main()
