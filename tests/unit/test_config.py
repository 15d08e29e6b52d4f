"""Address resolution: environment, then featurestream.yaml, then the dev stack's state file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from featurestream import config

FIELDS = ("kafka_bootstrap", "redis_url", "postgres_url")
ENV = {"kafka_bootstrap": config.ENV_KAFKA, "redis_url": config.ENV_REDIS, "postgres_url": config.ENV_POSTGRES}


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ENV.values():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(config.ENV_HOME, str(tmp_path / "home"))
    monkeypatch.setenv(config.ENV_CONFIG, str(tmp_path / "featurestream.yaml"))
    return tmp_path


def write_dev_state(**addresses: str) -> None:
    path = config.dev_state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "addresses": addresses, "services": {}}))


def write_yaml(tmp_path: Path, text: str) -> None:
    (tmp_path / "featurestream.yaml").write_text(text)


def test_nothing_configured(isolated: Path) -> None:
    assert config.resolve_addresses() == config.ServiceAddresses()
    assert config.address_sources() == dict.fromkeys(FIELDS)


def test_dev_state_path_follows_home(isolated: Path) -> None:
    assert config.featurestream_home() == isolated / "home"
    assert config.dev_state_path() == isolated / "home" / "dev" / "stack.json"


def test_home_defaults_to_user_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(config.ENV_HOME, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config.featurestream_home() == tmp_path / ".featurestream"


def test_dev_state_alone(isolated: Path) -> None:
    write_dev_state(kafka_bootstrap="dev:1", redis_url="redis://dev/0", postgres_url="postgresql://dev/db")
    got = config.resolve_addresses()
    assert (got.kafka_bootstrap, got.redis_url, got.postgres_url) == ("dev:1", "redis://dev/0", "postgresql://dev/db")
    assert all(source and source.startswith("dev stack") for source in config.address_sources().values())


def test_yaml_beats_dev_state_per_field(isolated: Path) -> None:
    write_dev_state(kafka_bootstrap="dev:1", redis_url="redis://dev/0")
    write_yaml(isolated, "kafka_bootstrap: yaml:2\n")
    got = config.resolve_addresses()
    assert got.kafka_bootstrap == "yaml:2"
    assert got.redis_url == "redis://dev/0"  # not in the file: falls through to the dev stack
    assert got.postgres_url is None
    sources = config.address_sources()
    assert sources["kafka_bootstrap"] == str(isolated / "featurestream.yaml")
    assert sources["redis_url"] is not None and sources["redis_url"].startswith("dev stack")


def test_environment_beats_everything(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_dev_state(kafka_bootstrap="dev:1", redis_url="redis://dev/0", postgres_url="postgresql://dev/db")
    write_yaml(isolated, "kafka_bootstrap: yaml:2\nredis_url: redis://yaml/0\n")
    monkeypatch.setenv(config.ENV_KAFKA, "env:3")
    got = config.resolve_addresses()
    assert (got.kafka_bootstrap, got.redis_url, got.postgres_url) == (
        "env:3",
        "redis://yaml/0",
        "postgresql://dev/db",
    )
    assert config.address_sources()["kafka_bootstrap"] == "environment"


def test_empty_environment_variable_counts_as_unset(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_yaml(isolated, "postgres_url: postgresql://yaml/db\n")
    monkeypatch.setenv(config.ENV_POSTGRES, "")
    assert config.resolve_addresses().postgres_url == "postgresql://yaml/db"


def test_config_file_defaults_to_current_directory(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(config.ENV_CONFIG)
    project = tmp_path / "project"
    project.mkdir()
    (project / "featurestream.yaml").write_text("redis_url: redis://cwd/0\n")
    monkeypatch.chdir(project)
    assert config.resolve_addresses().redis_url == "redis://cwd/0"


def test_config_file_must_be_a_mapping(isolated: Path) -> None:
    write_yaml(isolated, "- just\n- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        config.resolve_addresses()


def test_config_file_rejects_unknown_keys(isolated: Path) -> None:
    write_yaml(isolated, "kafka: localhost:9092\n")
    with pytest.raises(ValidationError):
        config.resolve_addresses()


def test_require_returns_the_resolved_address(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.ENV_REDIS, "redis://env/1")
    assert config.require("redis_url") == "redis://env/1"


@pytest.mark.parametrize("name", FIELDS)
def test_require_says_how_to_configure(isolated: Path, name: str) -> None:
    with pytest.raises(config.MissingServiceError) as info:
        config.require(name)
    message = str(info.value)
    assert ENV[name] in message
    assert "featurestream.yaml" in message
    assert "featurestream dev up" in message
