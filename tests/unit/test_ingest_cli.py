"""The ingest subcommands' wiring (the services behind them are tested elsewhere)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from galsift.cli import CommandGroups
from galsift.settings import Settings
from ingest import cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="galsift")
    top = parser.add_subparsers(dest="command", required=True)
    groups = CommandGroups(
        top=top,
        train=top.add_parser("train").add_subparsers(dest="train_command"),
        eval=top.add_parser("eval").add_subparsers(dest="eval_command"),
        bench=top.add_parser("bench").add_subparsers(dest="bench_command"),
    )
    cli.register(groups)
    return parser


def test_arguments() -> None:
    p = _parser()
    args = p.parse_args(["publish", "a", "b.fits", "--survey", "x", "--limit", "3"])
    assert args.paths == [Path("a"), Path("b.fits")] and args.survey == "x" and args.limit == 3
    args = p.parse_args(["ingest", "--group", "g", "--max-batches", "2", "--idle-exit", "1.5"])
    assert (args.group, args.max_batches, args.idle_exit) == ("g", 2, 1.5)
    args = p.parse_args(["bench", "ingest", "-n", "10", "--json", "out.json"])
    assert args.func is cli._bench and args.n == 10 and args.json == Path("out.json")
    with pytest.raises(SystemExit):
        p.parse_args(["publish", "a", "--limit", "0"])


def test_publish_command_reports_and_fails_on_bad_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sent: list[Any] = []

    class Producer:
        def send(self, topic: str, **kw: Any) -> Any:
            sent.append((topic, kw["key"]))
            return type("F", (), {"get": lambda self, timeout: None})()

        def flush(self, timeout: float | None = None) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setattr("ingest.publish.make_producer", lambda s: Producer())
    Image.new("RGB", (32, 32)).save(tmp_path / "J000411.19+020924.0.png")
    settings = Settings(_env_file=None, data_dir=tmp_path / "var")  # type: ignore[call-arg]
    args = _parser().parse_args(["publish", str(tmp_path), "--survey", "s"])
    assert args.func(args, settings) == 0
    assert sent == [(settings.topics.raw, b"s/J000411.19+020924.0")]
    assert "published 1 tiles" in capsys.readouterr().out
    (tmp_path / "broken.jpg").write_bytes(b"xx")
    assert args.func(args, settings) == 1
    assert "broken.jpg" in capsys.readouterr().err
    missing = _parser().parse_args(["publish", str(tmp_path / "nope")])
    assert missing.func(missing, settings) == 2


def test_fetch_dry_run_prints_the_requests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    args = _parser().parse_args(["fetch", "10.5", "-1.25", "--size", "64", "--bands", "gz", "--dry-run"])
    assert args.func(args, settings) == 0
    payloads = json.loads(capsys.readouterr().out)
    assert [p["hips"].rsplit("/", 1)[1] for p in payloads] == ["g", "z"]
    assert payloads[0]["ra"] == 10.5 and payloads[0]["width"] == 64


def test_bench_tiles_and_table(repo_data: Path) -> None:
    from ingest.bench import _row, format_table, load_bench_tiles

    tiles = load_bench_tiles(repo_data / "legacy_dr9_fits", n=45)  # 3 files, cycled 15 times
    assert len(tiles) == 45 and len({t.key for t in tiles}) == 45
    assert [t.external_id for t in tiles[:3]] == sorted(
        p.stem for p in (repo_data / "legacy_dr9_fits").glob("*.fits")
    )
    assert tiles[3].external_id == tiles[0].external_id + "~1"
    assert tiles[44].external_id == tiles[2].external_id + "~14"
    assert tiles[3].pixels is tiles[0].pixels  # cycled, not re-read
    row = _row("upsert_batched", [0.1, 0.2, 0.3], n=30)
    assert row["rows_per_call"] == 10.0 and row["per_s"] == pytest.approx(50.0)
    assert row["p50_ms"] == pytest.approx(200.0)
    table = format_table({"results": [row]})
    assert "upsert_batched" in table and "50.0" in table
