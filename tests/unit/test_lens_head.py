"""The lens head: fit, version, card checks, the labelled-image loader and its row in eval lens."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detectors.lens_data import NegativeSpec, in_training_share
from detectors.lens_head import (
    LensHead,
    LensHeadError,
    Views,
    centre_view,
    domain_weights,
    fit_lens_head,
    in_folder,
    load_labelled,
    ring_profile,
    trained_files,
    views_of,
)


def _separable(n: int = 80, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    emb = rng.normal(size=(n, d))
    emb[:, 0] += 2.5 * (2 * y - 1)  # one informative dimension
    finder = rng.uniform(0.01, 0.99, n)  # an uninformative finder score
    return emb, finder, y


def _fit(**kw: object) -> LensHead:
    emb, finder, y = _separable()
    args = {
        "encoder_version": "enc-1",
        "detector_version": "lens-1",
        "data": [{"folder": "x", "files": ["a.jpg"]}],
    }
    return fit_lens_head(emb, finder, y, **{**args, **kw})  # type: ignore[arg-type]


def test_head_ranks_lenses_above_non_lenses_and_measures_itself_out_of_fold() -> None:
    head = _fit()
    emb, finder, y = _separable(seed=1)  # new images of the same kind
    p = head.predict(emb, finder)
    assert ((p >= 0) & (p <= 1)).all()
    assert p[y == 1].mean() > p[y == 0].mean() + 0.5
    m = head.card["metrics"]
    assert m["cross_fitted_auroc"] > 0.9 and m["n_lenses"] == m["n_non_lenses"] == 40
    from sklearn.metrics import roc_auc_score

    _, finder0, y0 = _separable()
    assert m["finder_auroc"] == pytest.approx(roc_auc_score(y0, finder0))


def test_saved_head_predicts_the_same_and_checks_what_it_reads(tmp_path: Path) -> None:
    head = _fit()
    path = tmp_path / "head.json"
    head.save(path)
    again = LensHead.load(path, encoder_version="enc-1", detector_version="lens-1")
    emb, finder, _ = _separable(seed=2)
    assert again.version == head.version and head.version.startswith("lens_head-")
    np.testing.assert_allclose(again.predict(emb, finder), head.predict(emb, finder))
    with pytest.raises(LensHeadError, match="encoder enc-1, not enc-2"):
        LensHead.load(path, encoder_version="enc-2")
    with pytest.raises(LensHeadError, match="lens finder lens-1, not lens-2"):
        LensHead.load(path, detector_version="lens-2")
    with pytest.raises(LensHeadError, match="dimensions"):
        head.predict(emb[:, :4], finder)
    # weights edited after the fact no longer give the card's version
    doc = json.loads(path.read_text())
    doc["weights"]["intercept"] += 1.0
    path.write_text(json.dumps(doc))
    with pytest.raises(LensHeadError, match="the card says"):
        LensHead.load(path)


def _ringed(n: int, seed: int, side: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, side, side) fields: a red disc at the centre of every one, a faint blue ring round half of them."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(0.0, 0.05, size=(n, 3, side, side))
    yy, xx = np.mgrid[:side, :side]
    r = np.hypot(yy - (side - 1) / 2, xx - (side - 1) / 2) / side
    x[:, 0, r < 0.03] += 1.0  # the red deflector
    ring = (r >= 0.06) & (r < 0.10)
    x[:, 2, ring] += 0.3 * y[:, None]  # the blue arc, in the B channel
    x[:, 2] += rng.normal(0.0, 0.05, size=(n, 1, 1))  # fields differ in overall colour far more
    return x, y


def _embed(x: np.ndarray) -> np.ndarray:
    # a stand-in encoder that sees only the field's overall colour, not where the light is (the
    # ring covers 2% of the field: its colour is lost in the fields' spread)
    return np.asarray(x, np.float64).mean(axis=(2, 3))


def test_centre_view_and_ring_profile_read_the_middle_of_the_field() -> None:
    x = np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
    centre = centre_view(x)
    assert centre.shape == (2, 3, 4, 4) and (centre == x[..., 2:6, 2:6]).all()
    with pytest.raises(LensHeadError, match="multiple of 4"):
        centre_view(x[..., :6, :6])
    fields, y = _ringed(20, seed=0)
    rings = ring_profile(fields)
    assert rings.shape == (20, 32)
    blue_minus_red = rings[:, 15:20]  # per ring, in RING_EDGES order
    # the blue ring is in the third ring, the red disc in the first
    assert blue_minus_red[y == 1, 2].mean() > blue_minus_red[y == 0, 2].mean() + 0.2
    assert (blue_minus_red[:, 0] < -0.5).all()


def test_a_head_that_reads_the_views_finds_what_the_field_embedding_misses(tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    train, y = _ringed(120, seed=1)
    test, y_test = _ringed(80, seed=2)
    finder = np.full(len(y), 0.5)
    args = {"encoder_version": "enc-1", "detector_version": "lens-1", "data": [{"folder": "x", "files": []}]}
    field_only = fit_lens_head(_embed(train), finder, y, **args)  # type: ignore[arg-type]
    with_views = fit_lens_head(_embed(train), finder, y, views=views_of(train, _embed), **args)  # type: ignore[arg-type]
    assert not field_only.reads_views and with_views.reads_views
    assert with_views.card["views"] == ["field", "centre", "rings"]
    views = views_of(test, _embed)
    auroc_views = roc_auc_score(y_test, with_views.predict(_embed(test), finder[: len(y_test)], views))
    auroc_field = roc_auc_score(y_test, field_only.predict(_embed(test), finder[: len(y_test)]))
    assert auroc_views > 0.95 and auroc_field < auroc_views - 0.2
    with pytest.raises(LensHeadError, match="views"):
        with_views.predict(_embed(test), finder[: len(y_test)])
    # the projection travels with the card and is part of the version
    path = tmp_path / "head.json"
    with_views.save(path)
    again = LensHead.load(path)
    assert again.version == with_views.version and again.reads_views
    np.testing.assert_allclose(
        again.predict(_embed(test), finder[: len(y_test)], views),
        with_views.predict(_embed(test), finder[: len(y_test)], views),
    )
    doc = json.loads(path.read_text())
    doc["weights"]["view_components"][0][0] += 1.0
    path.write_text(json.dumps(doc))
    with pytest.raises(LensHeadError, match="the card says"):
        LensHead.load(path)
    short = Views(views.centre[:, :1], views.rings)
    with pytest.raises(LensHeadError, match="dimensions"):
        with_views.predict(_embed(test), finder[: len(y_test)], short)


def test_the_target_survey_weighs_as_much_as_the_other_sources(tmp_path: Path) -> None:
    data = [
        {"folder": str(tmp_path / "cfhtls"), "files": ["a", "b"]},
        {"folder": str(tmp_path / "zoo"), "files": ["c", "d", "e", "f", "g", "h"]},
        {"folder": str(tmp_path / "cfhtls"), "files": ["i", "j"]},
    ]
    mask = in_folder(data, str(tmp_path / "cfhtls"))
    assert mask.tolist() == [True, True] + [False] * 6 + [True, True]
    w = domain_weights(mask)
    assert w[mask].sum() == pytest.approx(w[~mask].sum()) and (w[~mask] == 1).all()
    with pytest.raises(LensHeadError, match="need some of both"):
        domain_weights(np.zeros(4, bool))
    emb, finder, y = _separable(n=10)
    head = fit_lens_head(
        emb, finder, y, encoder_version="e", detector_version="d", data=data, target=str(tmp_path / "cfhtls")
    )
    assert head.card["target"] == str(tmp_path / "cfhtls")
    assert "cross_fitted_auroc_target" in head.card["metrics"]


def test_one_class_is_refused() -> None:
    emb, finder, _ = _separable()
    with pytest.raises(LensHeadError, match="lenses and non-lenses"):
        fit_lens_head(emb, finder, np.ones(len(emb), int), encoder_version="e", detector_version="d", data=[])


def test_labelled_images_take_the_hash_share_and_record_it(small_lenses: Path) -> None:
    pos = [NegativeSpec.parse(f"{small_lenses}:lens=1")]
    neg = [NegativeSpec.parse(f"{small_lenses}:lens=0")]
    got = load_labelled(pos, neg, size=32, fraction=0.5)
    rows = [r.split(",") for r in (small_lenses / "labels.csv").read_text().splitlines()[1:]]
    want = {f: int(lab) for f, lab in rows if in_training_share(small_lenses.name, f, 0.5)}
    assert sorted(f for rec in got.data for f in rec["files"]) == sorted(want)
    assert got.labels.tolist() == sorted(want.values(), reverse=True)  # positives first
    assert got.images.shape == (len(want), 3, 32, 32)
    assert all(rec["renderings"] == ["composite"] for rec in got.data)
    card = {"data": got.data}
    assert trained_files(card, small_lenses.name) == set(want) and not trained_files(card, "other")
    with pytest.raises(LensHeadError, match="no column"):
        load_labelled([NegativeSpec.parse(f"{small_lenses}:grade=1")], neg, size=32, fraction=0.5)


def test_eval_lens_scores_the_head_on_images_nobody_trained_on(small_lenses: Path) -> None:
    from detectors.lens_eval import HeadScorer, LensEvalError, run_lens_eval
    from detectors.lensfinder import DEFAULT_ENCODER_CHECKPOINT as DEFAULT_CHECKPOINT
    from detectors.lensfinder import LensFinder
    from encoder import checkpoint

    finder = LensFinder.load()
    model, card = checkpoint.load_model(DEFAULT_CHECKPOINT)
    pos, neg = [NegativeSpec.parse(f"{small_lenses}:lens=1")], [NegativeSpec.parse(f"{small_lenses}:lens=0")]
    train = load_labelled(pos, neg, size=model.img_size, fraction=0.5)
    head = fit_lens_head(
        model.eval().embed_array(train.images),
        finder.scores(train.images),
        train.labels,
        encoder_version=card["version"],
        detector_version=finder.version,
        data=train.data,
    )
    detail = load_labelled(pos, neg, size=2 * model.img_size, fraction=0.5)
    viewing = fit_lens_head(
        model.embed_array(train.images),
        finder.scores(train.images),
        train.labels,
        encoder_version=card["version"],
        detector_version=finder.version,
        data=train.data,
        views=views_of(detail.images, model.embed_array),
    )
    scorer = HeadScorer(head, model.embed_array, model.img_size)
    run = run_lens_eval(
        small_lenses,
        [finder],
        score_col="lens",
        positive_min=1,
        negative_max=0,
        heads=[scorer, HeadScorer(viewing, model.embed_array, model.img_size)],
    )
    finder_row, head_row, viewing_row = run.rows
    # the head that reads the centres is scored on the same images, with its views
    assert viewing_row["model"] == viewing.version and viewing.reads_views
    assert viewing_row["n_positive"] == head_row["n_positive"] and 0.0 <= viewing_row["auroc"] <= 1.0
    assert head_row["model"] == head.version and head_row["backbone"] == "lvm + real-label head"
    # both rows on the same held-out images: the head's training share is left out of both
    assert finder_row["n_excluded"] == head_row["n_excluded"] >= len(train.labels)
    assert head_row["n_positive"] + head_row["n_negative"] + head_row["n_excluded"] == 24
    assert 0.0 <= head_row["auroc"] <= 1.0
    other = HeadScorer(
        LensHead(head.mean, head.scale, head.coef, head.intercept, {**head.card, "detector_version": "x"}),
        scorer.embed,
        scorer.size,
    )
    with pytest.raises(LensEvalError, match="not loaded"):
        run_lens_eval(small_lenses, [finder], score_col="lens", positive_min=1, negative_max=0, heads=[other])


def _to_score(name: str, *, dtype: str, encoder: str = "enc-1", d: int = 8) -> Any:
    from db.detections import TileToScore

    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    return TileToScore(
        tile_id=str(uuid.uuid5(uuid.NAMESPACE_URL, name)),
        survey="s",
        external_id=name,
        ra=None,
        dec=None,
        bands=["R", "G", "B"] if dtype == "uint8" else ["g", "r", "z"],
        dtype=dtype,
        pixels_uri="file:///nowhere.npy",
        checksum="0" * 64,
        encoder_version=encoder,
        embedding=rng.normal(size=d),
    )


def test_the_service_scores_with_the_head_only_the_renderings_it_was_trained_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    from detectors.alerts import KnownLenses
    from detectors.lens_head import rendering_of
    from detectors.service import HEAD_DETECTOR, LENS_DETECTOR, DetectStage
    from galsift.settings import Settings

    assert rendering_of("uint8") == "composite" and rendering_of("float32") == "flux"
    head = _fit(data=[{"folder": "x", "files": ["a.jpg"], "renderings": ["composite"]}])
    assert head.renderings == {"composite"}
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    finder = SimpleNamespace(version="lens-1")
    known = KnownLenses([], np.zeros(0), np.zeros(0))
    stage = DetectStage(settings, None, lens=finder, morphology=None, known=known, head=head)  # type: ignore[arg-type]
    composite, flux = _to_score("c", dtype="uint8"), _to_score("f", dtype="float32")
    other = _to_score("o", dtype="uint8", encoder="enc-2")
    tiles = [composite, flux, other]
    scores = {t.tile_id: (0.3, "lens-1", LENS_DETECTOR) for t in tiles}
    rows: dict[str, list[Any]] = {t.tile_id: [] for t in tiles}
    got = stage._head_scores(tiles, scores, rows)
    # the composite of the head's encoder only: flux and another embedding space keep the finder's
    assert set(got) == {composite.tile_id}
    p, version, detector = got[composite.tile_id]
    assert version == head.version and detector == HEAD_DETECTOR
    assert p == pytest.approx(float(head.predict(composite.embedding[None], np.array([0.3]))[0]))
    (row,) = rows[composite.tile_id]
    assert (row.detector, row.label, row.model_version) == (HEAD_DETECTOR, "lens", head.version)
    assert row.extra == {"finder_score": 0.3, "finder_version": "lens-1"}
    assert rows[flux.tile_id] == rows[other.tile_id] == []
    # composites of another encoder (after a promotion) are named once, flux tiles never
    assert stage.head_passed_over == {"enc-2"}
    assert [r.message.count("enc-2") for r in caplog.records if "lens head" in r.message] == [1]
    stage._head_scores([other], scores, rows)
    assert sum("lens head" in r.message for r in caplog.records) == 1
    # a head that reads the tiles' centres needs its encoder to embed them
    fields, y = _ringed(40, seed=3)
    viewing = fit_lens_head(
        _embed(fields),
        np.full(len(y), 0.5),
        y,
        encoder_version="enc-1",
        detector_version="lens-1",
        data=[{"folder": "x", "files": ["a.jpg"], "renderings": ["composite"]}],
        views=views_of(fields, _embed),
    )
    with pytest.raises(ValueError, match="needs its encoder"):
        DetectStage(settings, None, lens=finder, morphology=None, known=known, head=viewing)  # type: ignore[arg-type]
    # a head reads its own finder's score: any other finder is refused at start-up
    with pytest.raises(ValueError, match="finder it was fitted on"):
        DetectStage(
            settings,
            None,  # type: ignore[arg-type]
            lens=SimpleNamespace(version="lens-2"),  # type: ignore[arg-type]
            morphology=None,
            known=known,
            head=head,
        )
