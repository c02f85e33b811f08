"""``galsift eval hitl`` and ``galsift bench hitl`` end to end on the real database (tiny data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, text

from galsift.cli import main
from galsift.settings import Settings

REPO = Path(__file__).resolve().parents[2]
#: 45 labelled CFHTLS cutouts in the repository, 20 of them lenses
LENS_DEMO = REPO / "ingest" / "demo_tiles" / "cfhtls_lens_candidates"


def _counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as c:
        return {
            t: int(c.execute(text(f"SELECT count(*) FROM {t}")).scalar_one())
            for t in ("tiles", "embeddings", "model_versions", "hitl_sessions", "hitl_labels")
        }


@pytest.fixture
def cli_env(stack_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Point ``galsift`` at the session's stack (the CLI reads its settings once per process)."""
    monkeypatch.setattr("galsift.cli.get_settings", lambda: stack_settings)
    return stack_settings


def test_eval_hitl_runs_the_engine_and_cleans_up(
    cli_env: Settings, engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _counts(engine)
    out = tmp_path / "hitl.json"
    status = main(
        [
            "eval", "hitl", "--data", str(LENS_DEMO), "--label", "lens", "--seeds", "3",
            "--rounds", "3", "--per-round", "4", "--draws", "2", "--json", str(out), "--no-progress",
        ]
    )  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "galsift_hitl" in printed and "Must" in printed

    doc = json.loads(out.read_text())
    assert doc["command"] == "eval hitl" and doc["data"] == str(LENS_DEMO)
    assert doc["model_version"].startswith("lvm_tiny")
    assert doc["pool"] == {**doc["pool"], "images": 45, "positives": 20}
    rows = doc["results"]
    assert {(r["model"], r["round"]) for r in rows} == {
        (m, r) for m in ("galsift_hitl", "knn", "random") for r in (1, 2, 3)
    }
    for r in rows:
        assert 0.0 <= r["precision"] <= 1.0 and r["draws"] == 2 and r["shown"] == 4
    for m in ("galsift_hitl", "knn", "random"):
        found = [r["found"] for r in sorted(rows, key=lambda r: r["round"]) if r["model"] == m]
        assert found == sorted(found) and found[-1] <= 12
        # found is the running sum of precision x page size
        prec = [r["precision"] for r in sorted(rows, key=lambda r: r["round"]) if r["model"] == m]
        assert np.isclose(found[-1], 4 * sum(prec), atol=0.05)
    # the engine really ran: every shown tile was chosen by a recorded strategy
    strategies = doc["engine"]["strategies"]
    assert sum(v["shown"] for v in strategies.values()) == 2 * 3 * 4
    assert set(strategies) <= {"exploit", "uncertain", "diverse"}
    assert set(doc["checks"]) == {"must", "precision_goal", "found_goal"}
    assert isinstance(doc["checks"]["must"]["holds"], bool)
    # sessions, labels, tiles, embeddings and the model version copy are gone again
    assert _counts(engine) == before


def test_bench_hitl_small_table(
    cli_env: Settings, engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "hitl", "--n", "2000", "--sessions", "2", "--rounds", "3", "--no-progress"]
    assert main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "galsift_hitl_hnsw" in printed and "exact_scan" in printed

    doc = json.loads(out.read_text())
    assert doc["command"] == "bench hitl" and doc["model_version"].startswith("lvm_tiny")
    assert {r["model"] for r in doc["results"]} == {"galsift_hitl_hnsw", "exact_scan"}
    for r in doc["results"]:
        assert r["rounds"] == 6 and r["n"] == 2000
        assert 0 < r["p50_ms"] <= r["p95_ms"]
        assert r["fit_p50_ms"] > 0 and r["retrieve_p50_ms"] > 0
    assert doc["must"]["holds"] == (doc["results"][0]["p95_ms"] <= 500)
    name = doc["table"]["model_version"]
    with engine.connect() as c:
        assert (
            c.execute(
                text("SELECT count(*) FROM embeddings WHERE model_version = :m"), {"m": name}
            ).scalar_one()
            == 2000
        )
        # the simulated sessions and their labels are deleted, the table is kept
        assert (
            c.execute(
                text("SELECT count(*) FROM hitl_sessions WHERE model_version = :m"), {"m": name}
            ).scalar_one()
            == 0
        )

    # a second run reuses the table
    assert main([*args, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["table"]["reused"] is True
