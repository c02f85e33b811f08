"""deploy/: broker configuration and settings hand-down (no services, no subprocesses).

The ``galsift up`` supervisor, which starts stand-in service processes, is tested in
``tests/integration/test_up_supervisor.py``.
"""

from __future__ import annotations

import os
import socket
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
        alert_webhooks=["http://127.0.0.1:9/hook", "https://hooks.example.org/T/B/x"],
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
