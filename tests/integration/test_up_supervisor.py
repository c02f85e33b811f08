"""The ``galsift up`` supervisor with stand-in services: real child processes, no Kafka or database.

Moved out of the unit tests because every test here starts subprocesses and signals this process.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from deploy import cli
from galsift.settings import Settings

pytestmark = pytest.mark.integration


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path, **kw)  # type: ignore[call-arg, arg-type]


# -- the `galsift up` supervisor, with stand-in services ------------------------------------
_SERVICE = """
import pathlib, signal, sys, time
mark = pathlib.Path(sys.argv[1])
exit_code = int(sys.argv[2])
siblings = [pathlib.Path(p) for p in sys.argv[3:]]
def stop(signum, frame):
    mark.with_suffix(".stopped").write_text(str(signum))
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if exit_code == -2 else stop)
mark.with_suffix(".started").write_text("")
if exit_code >= 0:
    # exit only once the others run, so that they are there to be stopped
    while not all(p.exists() for p in siblings):
        time.sleep(0.05)
    sys.exit(exit_code)
while True:
    time.sleep(0.05)
"""


def _fake_services(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, codes: dict[str, int]) -> None:
    """Services named by ``codes``: -1 runs until SIGTERM, -2 ignores SIGTERM, else exits with it."""
    monkeypatch.setattr(cli, "SERVICES", [[name] for name in codes])
    monkeypatch.setattr(
        cli,
        "service_command",
        lambda argv: [
            sys.executable,
            "-c",
            _SERVICE,
            str(tmp_path / argv[0]),
            str(codes[argv[0]]),
            *(str(tmp_path / f"{other}.started") for other in codes if other != argv[0]),
        ],
    )


def _up_args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {"demo": False, "rate": 5.0, "no_stack": True, "down_on_exit": False}
    return argparse.Namespace(**{**base, **kw})


def _sigterm_when(paths: list[Path], timeout_s: float = 30.0, times: int = 1) -> threading.Thread:
    """SIGTERM this process ``times`` times (0.5 s apart) once every path exists."""

    def run() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not all(p.exists() for p in paths):
            time.sleep(0.05)
        for i in range(times):
            if i:
                time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_up_stops_every_service_with_sigterm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_services(monkeypatch, tmp_path, {"alpha": -1, "beta": -1})
    s = _settings(tmp_path / "data")
    before = signal.getsignal(signal.SIGTERM)
    _sigterm_when([tmp_path / "alpha.started", tmp_path / "beta.started"])
    assert cli._up(_up_args(), s) == 0
    for name in ("alpha", "beta"):
        assert (tmp_path / f"{name}.stopped").read_text() == str(int(signal.SIGTERM))
        assert (s.data_dir / "logs" / f"{name}.log").exists()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_signal_kills_a_service_that_will_not_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_services(monkeypatch, tmp_path, {"stubborn": -2})
    monkeypatch.setattr(cli, "STOP_GRACE_S", 120.0)
    _sigterm_when([tmp_path / "stubborn.started"], times=2)
    started = time.monotonic()
    assert cli._up(_up_args(), _settings(tmp_path / "data")) == 0
    assert time.monotonic() - started < 60  # not the 120 s grace period
    assert not (tmp_path / "stubborn.stopped").exists()


def test_up_fails_and_stops_the_rest_when_a_service_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_services(monkeypatch, tmp_path, {"steady": -1, "crashy": 3})
    assert cli._up(_up_args(), _settings(tmp_path / "data")) == 1
    assert (tmp_path / "steady.stopped").exists()
    assert "crashy exited with status 3" in capsys.readouterr().err


def test_up_runs_the_demo_feed_as_a_service_until_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_services(monkeypatch, tmp_path, {"svc": -1, "feed": -1})
    monkeypatch.setattr(cli, "SERVICES", [["svc"]])  # the feed comes from --demo
    commands: list[list[str]] = []
    fake = cli.service_command
    monkeypatch.setattr(cli, "service_command", lambda argv: commands.append(argv) or fake(argv))
    s = _settings(tmp_path / "data")
    _sigterm_when([tmp_path / "svc.started", tmp_path / "feed.started"])
    assert cli._up(_up_args(demo=True, rate=2.5), s) == 0
    assert ["feed", "--rate", "2.5"] in commands
    assert (tmp_path / "svc.stopped").exists() and (tmp_path / "feed.stopped").exists()
    assert (s.data_dir / "logs" / "feed.log").exists()


def test_up_fails_when_the_demo_feed_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_services(monkeypatch, tmp_path, {"svc": -1, "feed": 2})
    monkeypatch.setattr(cli, "SERVICES", [["svc"]])
    assert cli._up(_up_args(demo=True), _settings(tmp_path / "data")) == 1
    assert "exited with status 2" in capsys.readouterr().err
    assert (tmp_path / "svc.stopped").exists()
