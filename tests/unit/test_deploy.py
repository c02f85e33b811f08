"""deploy/: broker configuration, settings hand-down and the ``galsift up`` supervisor (no services)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from deploy import cli, stack
from galsift.settings import Settings


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path, **kw)  # type: ignore[call-arg, arg-type]


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_server_properties_follow_the_settings(tmp_path: Path) -> None:
    s = _settings(tmp_path, kafka_bootstrap="localhost:29092,otherhost:9092", kafka_partitions=7)
    props = _props(stack._server_properties(s))
    assert props["listeners"] == "PLAINTEXT://localhost:29092,CONTROLLER://localhost:29093"
    assert props["advertised.listeners"] == "PLAINTEXT://localhost:29092"
    assert props["controller.quorum.voters"] == "1@localhost:29093"
    assert props["process.roles"] == "broker,controller"
    assert Path(props["log.dirs"]).parent == s.kafka_dir
    assert props["num.partitions"] == "7"
    assert props["auto.create.topics.enable"] == "false"
    assert int(props["message.max.bytes"]) == 16 * 1024 * 1024
    assert int(props["replica.fetch.max.bytes"]) == 16 * 1024 * 1024


@pytest.mark.parametrize(
    ("bootstrap", "address", "local"),
    [
        ("localhost:9092", ("localhost", 9092), True),
        ("127.0.0.1:19092,kafka-2:9092", ("127.0.0.1", 19092), True),
        ("[::1]:9094", ("::1", 9094), True),
        ("kafka.example.org:9092", ("kafka.example.org", 9092), False),
    ],
)
def test_bootstrap_address_and_locality(
    tmp_path: Path, bootstrap: str, address: tuple[str, int], local: bool
) -> None:
    s = _settings(tmp_path, kafka_bootstrap=bootstrap)
    assert stack.bootstrap_address(s) == address
    assert stack.is_local_kafka(s) is local


def test_cluster_ids_are_kafka_uuids() -> None:
    ids = {stack._new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for cid in ids:
        assert len(cid) == 22 and not cid.startswith("-")
        assert set(cid) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_kafka_up_refuses_a_remote_bootstrap(tmp_path: Path) -> None:
    s = _settings(tmp_path, kafka_bootstrap="kafka.example.org:9092")
    with pytest.raises(stack.StackError, match="not this machine"):
        stack.kafka_up(s)


def test_kafka_up_refuses_a_port_taken_by_someone_else(tmp_path: Path) -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        s = _settings(tmp_path, kafka_bootstrap=f"127.0.0.1:{port}")
        with pytest.raises(stack.StackError, match="already in use"):
            stack.kafka_up(s, timeout_s=5)
    assert not (s.kafka_dir / "broker.pid").exists()


def test_missing_maven_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack.shutil, "which", lambda name: None)
    with pytest.raises(stack.StackError, match="Maven"):
        stack.kafka_classpath(_settings(tmp_path))


def test_stale_pid_file_means_stopped(tmp_path: Path) -> None:
    s = _settings(tmp_path, kafka_bootstrap="localhost:1")
    s.kafka_dir.mkdir(parents=True)
    # this test process is alive but is not a Kafka broker
    (s.kafka_dir / "broker.pid").write_text(f"{os.getpid()}\n")
    status = stack.kafka_status(s)
    assert not status.running and status.pid is None
    assert not (s.kafka_dir / "broker.pid").exists()
    assert stack.kafka_down(s) is False


def test_service_env_hands_down_the_same_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from galsift.settings import Topics

    s = _settings(
        tmp_path,
        kafka_bootstrap="localhost:19999",
        kafka_partitions=3,
        batch_size=17,
        log_format="json",
        object_store_url="file:///somewhere",
        topics=Topics(raw="my.raw", dead="my.dead"),
    )
    base = {"GALSIFT_DATABASE_URL": "postgresql://x@y/z", "PATH": "/bin"}
    env = cli.service_env(s, base=base)
    assert env["PATH"] == "/bin"
    assert "GALSIFT_DATABASE_URL" not in env  # unset in s: the child must use the embedded one
    # a child process reads its settings from exactly this environment
    for key in [k for k in os.environ if k.startswith("GALSIFT_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("GALSIFT_"):
            monkeypatch.setenv(key, value)
    assert Settings(_env_file=None) == s  # type: ignore[call-arg]


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


def test_up_runs_the_demo_feed_until_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_services(monkeypatch, tmp_path, {"svc": -1})
    calls: list[dict[str, object]] = []
    running = tmp_path / "feed.running"

    def run_feed(
        settings: Settings, *, rate: float, loop: bool = True, stop: threading.Event | None = None
    ) -> int:
        calls.append({"rate": rate, "loop": loop, "data_dir": settings.data_dir})
        running.write_text("")
        if stop is None:
            raise AssertionError("the supervisor must hand the feed a stop event")
        stop.wait(30)
        return 0

    monkeypatch.setitem(sys.modules, "ingest.demo", types.SimpleNamespace(run_feed=run_feed))
    s = _settings(tmp_path / "data")
    _sigterm_when([tmp_path / "svc.started", running])
    assert cli._up(_up_args(demo=True, rate=2.5), s) == 0
    assert calls == [{"rate": 2.5, "loop": True, "data_dir": s.data_dir}]
    assert (tmp_path / "svc.stopped").exists()


def test_up_fails_when_the_demo_feed_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_services(monkeypatch, tmp_path, {"svc": -1})

    def run_feed(settings: Settings, **kw: object) -> int:
        deadline = time.monotonic() + 30
        while not (tmp_path / "svc.started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise OSError("no demo tiles")

    monkeypatch.setitem(sys.modules, "ingest.demo", types.SimpleNamespace(run_feed=run_feed))
    assert cli._up(_up_args(demo=True), _settings(tmp_path / "data")) == 1
    assert "demo feed failed: OSError: no demo tiles" in capsys.readouterr().err
    assert (tmp_path / "svc.stopped").exists()
