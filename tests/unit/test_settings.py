from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from galsift.settings import Settings


def test_defaults_are_embedded_and_local(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.database_url is None
    assert s.data_dir == (tmp_path / "var").resolve()
    assert s.pixel_store_url == (tmp_path / "var" / "objects").as_uri()
    assert s.bootstrap_servers == ["localhost:9092"]


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GALSIFT_KAFKA_BOOTSTRAP", "k1:9092, k2:9093")
    monkeypatch.setenv("GALSIFT_TOPIC_RAW", "survey.raw")
    monkeypatch.setenv("GALSIFT_DATABASE_URL", "postgresql://u@db/galsift")
    s = Settings()
    assert s.bootstrap_servers == ["k1:9092", "k2:9093"]
    assert s.topics.raw == "survey.raw"
    assert s.database_url == "postgresql://u@db/galsift"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kafka_bootstrap", "localhost"),
        ("kafka_bootstrap", "localhost:port"),
        ("database_url", "sqlite:///x.db"),
        ("batch_size", 0),
        ("log_level", "LOUD"),
    ],
)
def test_invalid_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        Settings(**{field: value})
