"""Pieces several pages share: the user-name check, tile grids, the model-version picker."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import streamlit as st

from dashboard import auth, data


def require_user(action: str) -> str:
    """The signed-in user name, or a message and ``st.stop()`` (``action`` says what needs it)."""
    user = auth.current_user()
    if user is None:
        st.info(f"Type your name in the sidebar to {action}: sessions and labels are kept under it.")
        st.stop()
    return str(user)


def version_picker(label: str = "Model version", *, key: str) -> str | None:
    """A select box of the model versions with embeddings (the serving/default one first)."""
    versions = data.embedding_versions()
    if not versions:
        st.warning("No embeddings yet: start the services (`galsift up`) and publish some tiles.")
        return None
    return st.selectbox(label, versions, key=key, help="neighbours are searched in this model's space")


def tile_caption(row: dict[str, Any], *, score_name: str = "", score: float | None = None) -> str:
    """``survey:external_id`` plus a score and the lens score when there is one."""
    parts = [f"{row.get('survey')}:{row.get('external_id')}"]
    if score is not None:
        parts.append(f"{score_name} {score:.3f}".strip())
    if row.get("lens_score") is not None:
        parts.append(f"lens {float(row['lens_score']):.2f}")
    return " · ".join(parts)


def grid(
    rows: Sequence[dict[str, Any]],
    *,
    columns: int = 6,
    caption: Callable[[dict[str, Any]], str],
    below: Callable[[int, dict[str, Any]], None] | None = None,
) -> None:
    """Cutouts in a grid, ``columns`` per line, each with a caption and optional widgets below."""
    for start in range(0, len(rows), columns):
        cols = st.columns(columns)
        for j, row in enumerate(rows[start : start + columns]):
            with cols[j]:
                st.image(data.tile_cutout(row), caption=caption(row), width="stretch")
                if below is not None:
                    below(start + j, row)


def to_table(rows: Sequence[dict[str, Any]]) -> Any:
    """An :class:`astropy.table.Table` of result rows (positions in degrees, missing values masked).

    Numbers stay numbers (a column of floats with gaps becomes a masked float column), ids and
    JSON documents become text; storage details (URI, checksum, band list) are left out.
    """
    import astropy.units as u
    import numpy as np
    from astropy.table import MaskedColumn, Table

    skip = {"pixels_uri", "checksum", "bands"}
    names = [c for c in (rows[0] if rows else {}) if c not in skip]
    table = Table()
    for name in names:
        values = [r.get(name) for r in rows]
        present = [v for v in values if v is not None]
        mask = [v is None for v in values]
        if present and all(isinstance(v, bool) for v in present):
            col = MaskedColumn([bool(v) for v in values], name=name, mask=mask, dtype=bool)
        elif present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
            col = MaskedColumn(
                [np.nan if v is None else float(v) for v in values], name=name, mask=mask, dtype=np.float64
            )
        else:
            col = MaskedColumn(["" if v is None else str(v) for v in values], name=name, mask=mask, dtype=str)
        if name in ("ra", "dec"):
            col.unit = u.deg
        table.add_column(col)
    return table


def votable_bytes(table: Any) -> bytes:
    """``table`` as a VOTable document (TABLEDATA, the same XML as ``table.write(format="votable")``).

    Written with astropy's pure-Python TABLEDATA writer, never its C one
    (``astropy.io.votable.tablewriter.write_tabledata``): that one writes a NUL byte one past the
    end of its row buffer whenever a row's XML is exactly a power of two bytes long (256, 512, ...;
    astropy issue 20419, fix proposed in PR 20428, not released). The stray byte lands in the next
    block of Python's small-object allocator and corrupts whatever object lives there: the process
    crashed later, far from the cause (SIGSEGV in the garbage collector, in ``gen_dealloc``, in
    ``ast.parse`` of the next Streamlit script run), which is how the dashboard's AppTest tests died.
    ``PYTHONMALLOC=debug`` shows it at once ("bad trailing pad byte" on a block ending in a
    ``</TR>`` line); ``tests/unit/test_dashboard_tables.py`` checks this export under it.
    """
    import io

    from astropy.io.votable import from_table

    buf = io.BytesIO()
    # _debug_python_based_parser: astropy's own switch (used by its tests) to the Python writer;
    # if a later astropy drops it this raises TypeError instead of silently using the C writer
    from_table(table).to_xml(buf, _debug_python_based_parser=True)
    return buf.getvalue()


def table_download(rows: Sequence[dict[str, Any]], *, name: str, key: str) -> None:
    """CSV and VOTable downloads of ``rows`` (see :func:`to_table`)."""
    import io

    if not rows:
        return
    table = to_table(rows)
    csv_buf = io.StringIO()
    table.write(csv_buf, format="ascii.csv")
    c1, c2 = st.columns(2)
    c1.download_button("CSV", csv_buf.getvalue(), file_name=f"{name}.csv", mime="text/csv", key=f"{key}_csv")
    c2.download_button(
        "VOTable",
        votable_bytes(table),
        file_name=f"{name}.xml",
        mime="application/x-votable+xml",
        key=f"{key}_vot",
    )
