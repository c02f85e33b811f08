"""The HITL search engine: sessions, rounds, labels and saved searches over the vector table.

One round (:meth:`SearchEngine.next_round`):

1. **fit** the light learner (:mod:`hitl.learner`) on the session's seeds and the owner's
   effective labels of the concept (labels from earlier sessions count too);
2. **retrieve** candidates with pgvector HNSW queries around the seeds and the newest positives
   (:meth:`hitl.learner.Learner.directions`), filtered to the session's model version and to
   tiles neither shown in this session nor labelled (iterative index scans keep ``k`` rows coming back under that filter);
3. **select** the page with :func:`hitl.acquisition.select` and store it with the strategy that
   chose each tile.

A session without seeds starts from the anomaly ranking (:func:`hitl.anomaly.rank`), as a
scientist exploring what is unusual would. The engine works without any UI: ``galsift hitl``,
``galsift eval hitl`` and the dashboard all drive this class.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from sqlalchemy import Engine

from db import hitl as store
from db.models import HitlLabelCreate, HitlSessionCreate, HitlSessionPublic, SavedSearch
from galsift.constants import EMBEDDING_DIM, HEALPIX_ORDER
from hitl import anomaly
from hitl.acquisition import Acquisition, select
from hitl.learner import Learner, fit


class HitlError(ValueError):
    """A request the engine cannot serve (unknown session or tile, no embedding, bad seed)."""


@dataclass(frozen=True)
class ShownTile:
    """A tile on a round's page."""

    tile_id: uuid.UUID
    rank: int
    strategy: str
    score: float


@dataclass(frozen=True)
class Round:
    """One round's page, the learner that ranked it and where the time went (milliseconds)."""

    session_id: int
    round_no: int
    shown: list[ShownTile]
    learner: str
    n_pos: int
    n_neg: int
    candidates: int
    timings_ms: dict[str, float] = field(default_factory=dict)


class SearchEngine:
    """HITL search over one database.

    Parameters
    ----------
    engine
        SQLAlchemy engine on the galsift database.
    policy
        Acquisition shares (see :class:`hitl.acquisition.Acquisition`).
    candidates_per_query
        Rows each HNSW query returns, as a multiple of the page size.
    exact
        Brute-force exact scans instead of the HNSW index (the reference of ``bench hitl``).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        policy: Acquisition | None = None,
        candidates_per_query: int = 3,
        exact: bool = False,
        dim: int = EMBEDDING_DIM,
    ) -> None:
        self.engine = engine
        self.policy = policy or Acquisition()
        self.candidates_per_query = candidates_per_query
        self.exact = exact
        self.dim = dim

    # -- sessions ----------------------------------------------------------------------------
    def new_session(
        self,
        *,
        owner: str,
        concept: str,
        model_version: str,
        name: str | None = None,
        tile_ids: Sequence[uuid.UUID | str] = (),
        images: Sequence[tuple[str, np.ndarray]] = (),
        coords: Sequence[SkyCoord] = (),
        radius: u.Quantity = 5 * u.arcsec,
    ) -> HitlSessionPublic:
        """Start a session from seeds: stored tiles, uploaded images' embeddings, sky positions.

        Parameters
        ----------
        owner, concept, model_version, name
            Who searches, for what (labels are keyed by it), in which model's embedding space.
        tile_ids
            Stored tiles to seed from.
        images
            ``(name, embedding)`` pairs of images embedded on the fly with ``model_version``'s
            model (see :func:`hitl.embed.embed_file`).
        coords
            Sky positions; each resolves to the nearest embedded tile within ``radius``.
        radius
            How far a position may be from its tile (keyword-only astropy angle).

        Raises
        ------
        HitlError
            If a seed tile has no embedding by ``model_version`` or a position no tile nearby.
        """
        ids = [uuid.UUID(str(t)) for t in tile_ids]
        found = store.embeddings_of(self.engine, ids, model_version, self.dim)
        missing = sorted(set(map(str, ids)) - set(map(str, found.tile_ids)))
        if missing:
            raise HitlError(f"no {model_version} embedding for seed tile(s): {', '.join(missing)}")
        resolved = [self.resolve_position(c, model_version=model_version, radius=radius) for c in coords]
        for label, vec in images:
            if np.asarray(vec).shape != (self.dim,):
                raise HitlError(
                    f"seed image {label}: embedding shape {np.asarray(vec).shape}, expected ({self.dim},)"
                )
        session = store.create_session(
            self.engine,
            HitlSessionCreate(
                owner=owner, concept=concept, model_version=model_version, name=name or f"{concept} search"
            ),
        )
        for tid, vec in zip(found.tile_ids, found.embeddings, strict=True):
            store.add_seed(self.engine, session.id, embedding=vec, source="tile", tile_id=tid)
        for (tid, sep), c in zip(resolved, coords, strict=True):
            vec = store.embeddings_of(self.engine, [tid], model_version, self.dim).embeddings[0]
            detail = {
                "ra": float(c.icrs.ra.deg),
                "dec": float(c.icrs.dec.deg),
                "separation_arcsec": sep * 3600,
            }
            store.add_seed(
                self.engine, session.id, embedding=vec, source="coords", tile_id=tid, detail=detail
            )
        for label, vec in images:
            store.add_seed(
                self.engine, session.id, embedding=np.asarray(vec), source="image", detail={"name": label}
            )
        return session

    def resolve_position(
        self, coord: SkyCoord, *, model_version: str, radius: u.Quantity = 5 * u.arcsec
    ) -> tuple[uuid.UUID, float]:
        """The embedded tile nearest ``coord`` within ``radius``: (tile id, separation in degrees).

        Raises
        ------
        HitlError
            If no embedded tile lies within ``radius``.
        """
        from astropy_healpix import HEALPix

        hp = HEALPix(nside=2**HEALPIX_ORDER, order="nested", frame="icrs")
        icrs = coord.icrs
        pixels = hp.cone_search_lonlat(icrs.ra, icrs.dec, radius=radius)
        hit = store.nearest_tile(
            self.engine,
            ra_deg=float(icrs.ra.deg),
            dec_deg=float(icrs.dec.deg),
            healpix=[int(p) for p in pixels],
            model_version=model_version,
        )
        if hit is None or hit[1] * u.deg > radius:
            raise HitlError(
                f"no embedded {model_version} tile within {radius.to(u.arcsec):.1f} of "
                f"{icrs.to_string('hmsdms', precision=1)}"
            )
        return hit

    def session(self, session_id: int) -> HitlSessionPublic:
        """The session, or :class:`HitlError`."""
        s = store.get_session(self.engine, session_id)
        if s is None:
            raise HitlError(f"no HITL session {session_id}")
        return s

    # -- learner and rounds --------------------------------------------------------------------
    def training_set(self, session: HitlSessionPublic) -> tuple[np.ndarray, np.ndarray, int]:
        """Positives (seeds + good labels), negatives (bad labels) and the newest label id."""
        seed_vecs, _ = store.seeds(self.engine, session.id, self.dim)
        labels = store.effective_labels(
            self.engine,
            concept=session.concept,
            model_version=session.model_version,
            dim=self.dim,
            author=session.owner,
        )
        pos = np.concatenate([seed_vecs.embeddings, labels.embeddings[labels.good]])
        neg = labels.embeddings[~labels.good]
        return pos, neg, labels.last_label_id

    def fit_learner(self, session: HitlSessionPublic) -> Learner:
        """The learner of the session's current labels."""
        pos, neg, _ = self.training_set(session)
        return fit(pos, neg)

    def next_round(self, session_id: int, *, k: int = 12) -> Round:
        """Fit, retrieve, select and store the next page of ``k`` tiles."""
        t0 = time.perf_counter()
        session = self.session(session_id)
        learner = self.fit_learner(session)
        t1 = time.perf_counter()
        exclude = store.excluded_tiles(self.engine, session_id, author=session.owner, concept=session.concept)
        if learner.n_pos == 0:
            ranked = anomaly.rank(self.engine, session.model_version, k=k, exclude=exclude, dim=self.dim)
            t2 = time.perf_counter()
            shown = [ShownTile(tid, i, "anomaly", float(s)) for i, (tid, s) in enumerate(ranked)]
            n_cand = len(ranked)
        else:
            per = max(k, 12) * self.candidates_per_query
            ids: dict[uuid.UUID, int] = {}
            vecs: list[np.ndarray] = []
            with self.engine.begin() as conn:
                for q in learner.directions():
                    # around the seeds and the newest positives (see hitl.learner on why not
                    # along the weight vector); the learner ranks what comes back
                    got = store.nearest_unseen(
                        conn,
                        q,
                        model_version=session.model_version,
                        k=per,
                        exclude=exclude,
                        dim=self.dim,
                        exact=self.exact,
                    )
                    for tid, v in zip(got.tile_ids, got.embeddings, strict=True):
                        if tid not in ids:
                            ids[tid] = len(vecs)
                            vecs.append(v)
            t2 = time.perf_counter()
            cand = np.asarray(vecs, np.float32).reshape(len(vecs), self.dim)
            scores = learner.score(cand)
            picks = select(
                cand,
                scores,
                k,
                policy=self.policy,
                has_boundary=learner.kind == "logistic",
                priority=learner.priority(cand),
            )
            order = list(ids)
            shown = [
                ShownTile(order[p.index], r, p.strategy, float(scores[p.index])) for r, p in enumerate(picks)
            ]
            n_cand = len(order)
        t3 = time.perf_counter()
        round_no = store.record_round(
            self.engine, session_id, [store.ShownRow(s.tile_id, s.rank, s.strategy, s.score) for s in shown]
        )
        t4 = time.perf_counter()
        return Round(
            session_id=session_id,
            round_no=round_no,
            shown=shown,
            learner=learner.kind,
            n_pos=learner.n_pos,
            n_neg=learner.n_neg,
            candidates=n_cand,
            timings_ms={
                "fit": 1e3 * (t1 - t0),
                "retrieve": 1e3 * (t2 - t1),
                "select": 1e3 * (t3 - t2),
                "store": 1e3 * (t4 - t3),
            },
        )

    # -- labels --------------------------------------------------------------------------------
    def label(
        self,
        session_id: int,
        labels: Sequence[tuple[uuid.UUID | str, bool]],
        *,
        interest: Sequence[int | None] | None = None,
        round_no: int | None = None,
    ) -> list[int]:
        """Save the owner's good/bad labels (optionally 0-5 interest scores) for tiles of a session.

        Raises
        ------
        HitlError
            If an interest score is outside 0-5 or the lengths differ.
        """
        session = self.session(session_id)
        grades = list(interest) if interest is not None else [None] * len(labels)
        if len(grades) != len(labels):
            raise HitlError("one interest score per label, or none")
        rows = []
        for (tid, good), grade in zip(labels, grades, strict=True):
            if grade is not None and not 0 <= int(grade) <= 5:
                raise HitlError(f"interest {grade} is outside 0-5")
            rows.append(
                HitlLabelCreate(
                    tile_id=uuid.UUID(str(tid)),
                    concept=session.concept,
                    author=session.owner,
                    good=bool(good),
                    interest=None if grade is None else int(grade),
                    session_id=session_id,
                    round_no=round_no if round_no is not None else session.rounds,
                )
            )
        return store.add_labels(self.engine, rows)

    def undo(self, session_id: int) -> dict[str, Any] | None:
        """Retract the owner's newest label in this session (kept in the history); None if none."""
        session = self.session(session_id)
        return store.retract_last(self.engine, session_id, author=session.owner)

    # -- saved searches ------------------------------------------------------------------------
    def save(self, session_id: int, *, threshold: float = 0.8, webhook_url: str | None = None) -> SavedSearch:
        """Keep the session as a standing query: new tiles scoring above ``threshold`` notify its owner.

        Raises
        ------
        HitlError
            If the threshold is outside [0, 1] or the session has no positives yet.
        """
        if not 0.0 <= threshold <= 1.0:
            raise HitlError(f"threshold {threshold} is outside [0, 1]")
        session = self.session(session_id)
        pos, neg, last = self.training_set(session)
        if len(pos) == 0:
            raise HitlError("a search needs at least one positive (a seed or a good label) to be saved")
        learner = fit(pos, neg)
        return store.save_search(
            self.engine,
            SavedSearch(
                session_id=session_id,
                owner=session.owner,
                name=session.name,
                concept=session.concept,
                model_version=session.model_version,
                threshold=threshold,
                webhook_url=webhook_url,
                learner=learner.to_json(),
                last_label_id=last,
            ),
        )

    def refit_saved(self, search: SavedSearch) -> tuple[int, Learner] | None:
        """Refit a saved search on its owner's labels if any came in since its last fit.

        Returns
        -------
        (learner version, learner) or None
            None when no label of the search's concept is newer than its learner.
        """
        session = self.session(search.session_id)
        pos, neg, last = self.training_set(session)
        if last <= search.last_label_id or len(pos) == 0:
            return None
        learner = fit(pos, neg)
        version = store.update_learner(
            self.engine, int(search.id or 0), learner=learner.to_json(), last_label_id=last
        )
        return version, learner
