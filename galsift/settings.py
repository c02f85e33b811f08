"""One typed, validated configuration for every galsift process.

Read once at start-up (:func:`get_settings`) from ``GALSIFT_*`` environment variables and an
optional ``.env`` file, then passed down explicitly. Nothing below this module reads the
environment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Topics(BaseSettings):
    """Kafka topic names, one per edge of the data flow in DESIGN.md."""

    model_config = SettingsConfigDict(env_prefix="GALSIFT_TOPIC_", extra="ignore")

    #: survey adapters publish new tiles here
    raw: str = "tiles.raw"
    #: ingest publishes tiles it stored; the encoder consumes them
    accepted: str = "tiles.accepted"
    #: invalid input, with the reason, never silently dropped
    dead: str = "tiles.dead"
    #: the encoder publishes tiles whose vectors are in pgvector
    embedded: str = "tiles.embedded"
    #: lens candidates for alerting
    alerts: str = "alerts.lens"
    #: the detector announces each tile whose detections are durable; the alert filters consume it
    detected: str = "tiles.detected"


class Settings(BaseSettings):
    """Settings for the whole service.

    Every field can be set as ``GALSIFT_<FIELD>`` (e.g. ``GALSIFT_DATABASE_URL``); topic names as
    ``GALSIFT_TOPIC_<NAME>``.
    """

    model_config = SettingsConfigDict(
        env_prefix="GALSIFT_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    #: where the embedded database, Kafka logs, the object store and caches live
    data_dir: Path = Path("var")
    #: Kafka bootstrap servers, comma-separated ``host:port``
    kafka_bootstrap: str = "localhost:9092"
    #: partitions for topics the local stack creates (consumer groups scale up to this)
    kafka_partitions: int = Field(default=4, ge=1, le=1024)
    #: producer-side batch compression. Off by default: survey pixels compress poorly (lz4 1.02x,
    #: zstd 1.38x on the demo tiles) and on a small machine the CPU is scarcer than the network;
    #: ``lz4`` pays off when brokers are across a real network
    kafka_compression: Literal["none", "lz4", "zstd", "gzip"] = "none"
    topics: Topics = Field(default_factory=Topics)
    #: SQLAlchemy URL of a PostgreSQL >= 14 with pgvector; unset -> embedded server in data_dir
    database_url: str | None = None
    #: fsspec URL of the pixel store (``s3://bucket/prefix`` in production); unset -> data_dir/objects
    object_store_url: str | None = None
    #: a local pixel store syncs each tile file and its directory to the disk before the batch's
    #: offsets are committed; false trades power-loss durability for speed (e.g. on a volume that
    #: is replicated or battery-backed below the filesystem)
    store_fsync: bool = True
    #: most records a consumer takes per batch (a poll returns what is there, up to this): large
    #: batches amortise the per-batch round trips (upsert, produce acknowledgement, commit)
    batch_size: int = Field(default=256, ge=1, le=10_000)
    #: longest a consumer waits to fill a batch, in milliseconds
    batch_timeout_ms: int = Field(default=1000, ge=10, le=60_000)
    #: log format: human-readable lines or one JSON object per line
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: torch device for the encoder: "auto" picks CUDA when present
    device: str = "auto"
    #: encoder checkpoint (safetensors + JSON card); unset -> the lvm_tiny shipped in encoder/checkpoints
    model_checkpoint: Path | None = None
    #: images per forward pass of the encoder (micro-batches of a consumed batch)
    encode_batch: int = Field(default=32, ge=1, le=4096)
    #: seconds between an encoder's looks for a newer promoted LVM (when it serves promotions:
    #: no ``--model`` and no ``model_checkpoint``); 0 looks before every batch
    promotion_check_s: float = Field(default=60.0, ge=0.0, le=86400.0)

    # -- detectors and alerts -----------------------------------------------------------------
    #: lens-finder checkpoint (safetensors + JSON card); unset -> the one shipped in detectors/checkpoints
    lens_checkpoint: Path | None = None
    #: the real-label lens head (JSON card) applied to the renderings it was trained on; unset ->
    #: the shipped detectors/checkpoints/lens_head.json
    lens_head_checkpoint: Path | None = None
    #: whether the detector service applies the lens head at all
    lens_head: bool = True
    #: lens score (top detection score) from which a tile becomes a lens-candidate alert
    alert_threshold: float = Field(default=0.9, gt=0.0, le=1.0)
    #: radius of the cross-match against known lenses, in arcseconds
    crossmatch_radius_arcsec: float = Field(default=5.0, gt=0.0, le=3600.0)
    #: webhooks (Slack-compatible incoming-webhook URLs) that receive every new alert
    alert_webhooks: list[str] = Field(default_factory=list)
    #: most webhook calls per target and hour; the rest wait in the outbox
    webhook_rate_per_hour: int = Field(default=60, ge=1, le=100_000)
    #: attempts before a delivery is marked failed (exponential back-off between them)
    webhook_max_attempts: int = Field(default=8, ge=1, le=100)

    # -- alert filters -------------------------------------------------------------------------
    #: statement timeout (seconds) of one alert filter's query over one batch, and of the check
    #: ``galsift filter add`` runs; a filter that exceeds it is recorded as failing and skipped
    filter_timeout_s: float = Field(default=5.0, gt=0.0, le=60.0)

    # -- HITL search, saved searches, scheduled jobs ---------------------------------------------
    #: seconds between the saved-search watcher's checks for new or retrained saved searches
    watch_refresh_s: float = Field(default=5.0, gt=0.0, le=3600.0)
    #: seconds beyond ``watch_refresh_s`` that a watcher looks back, when it first sees a saved
    #: search (a new one, or all of them after a restart), for tiles it may have passed over
    watch_catch_up_s: float = Field(default=60.0, ge=0.0, le=86400.0)
    #: seconds between runs of the retraining job (morphology heads and saved searches)
    retrain_every_s: int = Field(default=3600, ge=1)
    #: seconds between runs of the continual-pretraining job (weekly by default)
    pretrain_every_s: int = Field(default=7 * 24 * 3600, ge=1)
    #: tiles ingested within this many hours are re-scored when a model is retrained
    rescore_recent_hours: float = Field(default=24.0, gt=0.0)
    #: fewest new tiles the continual-pretraining job trains on (fewer: it refuses and says so)
    pretrain_min_tiles: int = Field(default=256, ge=1)

    # -- metrics and health ----------------------------------------------------------------------
    #: port of this process's /metrics (Prometheus) and /healthz endpoint; unset: not served
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    #: interface the endpoint listens on (0.0.0.0 in containers)
    metrics_host: str = "127.0.0.1"
    #: ``galsift up`` gives its services consecutive metrics ports from here
    metrics_port_base: int = Field(default=9310, ge=1024, le=65000)

    # -- dashboard -----------------------------------------------------------------------------
    #: port of the Streamlit dashboard (``galsift dashboard``, started by ``galsift up``)
    dashboard_port: int = Field(default=8501, ge=1, le=65535)
    #: when set, every dashboard page asks for this password first (a secret: never logged)
    dashboard_password: SecretStr | None = None
    #: OpenID Connect sign-in (Streamlit's ``st.login``): the provider's issuer URL or its
    #: ``.well-known/openid-configuration`` URL. When set, every page requires a login and the
    #: user is who the provider says (``dashboard_oidc_user_claim``); excludes the password
    dashboard_oidc_url: str | None = None
    #: client id and secret that the provider issued to this dashboard
    dashboard_oidc_client_id: str | None = None
    dashboard_oidc_client_secret: SecretStr | None = None
    #: the ID-token claim that names the user (owner of sessions, labels, filters)
    dashboard_oidc_user_claim: str = "email"
    #: the dashboard's address as the browser sees it; the provider redirects to
    #: ``<url>/oauth2callback``. Unset: ``http://localhost:<dashboard_port>``
    dashboard_public_url: str | None = None
    #: signs the login cookie; unset: a random one per start (logins end at a restart)
    dashboard_cookie_secret: SecretStr | None = None

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_ports(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"bootstrap server {server!r} is not host:port")
        return value

    @field_validator("alert_webhooks")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"webhook {url!r} is not an http(s) URL")
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgresql+psycopg://")):
            raise ValueError("database_url must be a postgresql:// URL (pgvector is required)")
        return value

    @field_validator("dashboard_oidc_url", "dashboard_public_url")
    @classmethod
    def _web_urls(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _one_dashboard_login(self) -> Settings:
        if self.dashboard_oidc_url is None:
            return self
        if not self.dashboard_oidc_client_id or self.dashboard_oidc_client_secret is None:
            raise ValueError(
                "dashboard_oidc_url needs dashboard_oidc_client_id and dashboard_oidc_client_secret"
            )
        if self.dashboard_password is not None:
            raise ValueError("set either dashboard_password or dashboard_oidc_url, not both")
        return self

    @property
    def dashboard_oidc_metadata_url(self) -> str | None:
        """The provider's discovery document (``<issuer>/.well-known/openid-configuration``)."""
        url = self.dashboard_oidc_url
        if url is None or url.endswith("/.well-known/openid-configuration"):
            return url
        return f"{url}/.well-known/openid-configuration"

    @model_validator(mode="after")
    def _absolute_data_dir(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        return self

    @property
    def bootstrap_servers(self) -> list[str]:
        """Kafka bootstrap servers as a list, as kafka-python wants them."""
        return [s.strip() for s in self.kafka_bootstrap.split(",")]

    @property
    def pixel_store_url(self) -> str:
        """The object store URL, defaulting to a local directory under ``data_dir``."""
        return self.object_store_url or (self.data_dir / "objects").as_uri()

    @property
    def embedded_db_dir(self) -> Path:
        """Directory of the embedded PostgreSQL cluster (used when ``database_url`` is unset)."""
        return self.data_dir / "pgdata"

    @property
    def kafka_dir(self) -> Path:
        """Directory of the local Kafka broker's logs and metadata."""
        return self.data_dir / "kafka"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read and validate the settings once per process."""
    return Settings()


def settings_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that gives a child ``galsift`` process exactly these settings.

    Parameters
    ----------
    settings : Settings
        The settings to hand down (as ``GALSIFT_*`` variables).
    base : mapping, optional
        Environment to start from (default: this process's).

    Returns
    -------
    dict
        ``base`` with every settings field set (lists and dicts as JSON, secrets unmasked) and
        unset fields (None) removed.
    """
    env = dict(os.environ if base is None else base)
    for name, value in settings.model_dump(exclude={"topics"}).items():
        key = f"GALSIFT_{name.upper()}"
        if value is None:
            env.pop(key, None)
        elif isinstance(value, list | dict):
            env[key] = json.dumps(value)  # how pydantic-settings reads complex fields
        elif isinstance(value, SecretStr):  # model_dump masks secrets; children need the value
            env[key] = value.get_secret_value()
        else:
            env[key] = str(value)
    for name, value in settings.topics.model_dump().items():
        env[f"GALSIFT_TOPIC_{name.upper()}"] = str(value)
    return env
