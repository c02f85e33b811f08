"""``galsift bench pipeline`` end to end at a small size: its table, its JSON contract, its clean-up."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from galsift.settings import Settings

pytestmark = pytest.mark.integration

N = 6


def _leftovers(settings: Settings, engine: Engine) -> dict[str, list[str]]:
    """Bench tiles, topics and consumer groups still present."""
    from deploy.stack import kafka_admin

    with engine.connect() as conn:
        surveys = [
            str(s)
            for s in conn.execute(
                text(r"SELECT DISTINCT survey FROM tiles WHERE survey LIKE 'bench\_%\_tiles'")
            ).scalars()
        ]
    with kafka_admin(settings) as admin:
        topics = [t for t in admin.list_topics() if t.startswith("bench.")]
        groups = [str(g["group_id"]) for g in admin.list_groups() if str(g["group_id"]).startswith("bench-")]
    return {"surveys": surveys, "topics": topics, "groups": groups}


def test_bench_pipeline_burst_reports_every_stage_and_cleans_up(
    stack_settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    from deploy.cli import service_command, service_env

    with engine.connect() as conn:
        stats_before = conn.execute(text("SELECT count(*) FROM stage_stats")).scalar_one()
    out = tmp_path / "pipeline.json"
    proc = subprocess.run(
        service_command(["bench", "pipeline", "--tiles", str(N), "--burst", "--json", str(out)]),
        env=service_env(stack_settings),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "bends first" in proc.stdout and "ceiling/s" in proc.stdout, proc.stdout

    doc = json.loads(out.read_text())
    assert doc["command"] == "bench pipeline"
    assert doc["data"].endswith("legacy_dr9_fits")
    assert str(doc["model_version"]).startswith("lvm_tiny")
    assert doc["mode"] == "burst"
    rows = doc["results"]
    assert all(isinstance(v, str | int | float | type(None)) for r in rows for v in r.values()), "flat rows"
    by_model = {r["model"]: r for r in rows if r["model"] != "kafka_raw_consume"}
    for stage in ("ingest", "encoder", "detector"):
        r = by_model[f"{stage}_stage"]
        assert r["n"] == N and r["workers"] == 1
        assert r["per_s"] > 0 and r["busy_per_s"] > 0
        assert r["p50_ms"] is not None and r["p50_ms"] <= r["p95_ms"]
        assert 0 <= r["first_s"] <= r["done_s"]
    # each stage's rows come after its upstream's
    assert by_model["ingest_stage"]["done_s"] <= by_model["detector_stage"]["done_s"]
    if "watch_stage" in by_model:  # the saved-search watcher, when this installation has it
        assert by_model["watch_stage"]["done_s"] is not None
    ceilings = {r["topic"]: r for r in rows if r["model"] == "kafka_raw_consume"}
    assert set(ceilings) >= {"raw", "accepted", "embedded"}
    assert all(r["n"] == N and r["per_s"] > 0 for r in ceilings.values())
    e2e = by_model["end_to_end"]
    assert e2e["n"] == N
    assert 0 < e2e["p50_ms"] <= e2e["p95_ms"] <= e2e["max_ms"]
    assert e2e["drain_s"] * 1000 >= e2e["max_ms"] * 0.99
    assert by_model["publish"]["per_s"] > 0
    assert doc["machine"]["cpus"] >= 1 and "bends first" in doc["verdict"]

    # nothing of the run is left: tiles, topics, groups, the workers' stage_stats rows
    assert _leftovers(stack_settings, engine) == {"surveys": [], "topics": [], "groups": []}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM stage_stats")).scalar_one() == stats_before
