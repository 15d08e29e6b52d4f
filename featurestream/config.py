"""Where the services are: environment variables, else a project config file, else the dev stack.

Resolution order for each address (first hit wins):
1. ``FEATURESTREAM_KAFKA_BOOTSTRAP`` / ``FEATURESTREAM_REDIS_URL`` / ``FEATURESTREAM_POSTGRES_URL``;
2. ``featurestream.yaml`` in the current directory (or the file named by ``FEATURESTREAM_CONFIG``),
   keys ``kafka_bootstrap``, ``redis_url``, ``postgres_url``;
3. the state file written by ``featurestream dev up`` (``$FEATURESTREAM_HOME/dev/stack.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

ENV_KAFKA = "FEATURESTREAM_KAFKA_BOOTSTRAP"
ENV_REDIS = "FEATURESTREAM_REDIS_URL"
ENV_POSTGRES = "FEATURESTREAM_POSTGRES_URL"
ENV_CONFIG = "FEATURESTREAM_CONFIG"
ENV_HOME = "FEATURESTREAM_HOME"


class ServiceAddresses(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kafka_bootstrap: str | None = None
    redis_url: str | None = None
    postgres_url: str | None = None


class MissingServiceError(RuntimeError):
    """A command needs a service whose address is known from nowhere."""


def featurestream_home() -> Path:
    return Path(os.environ.get(ENV_HOME, Path.home() / ".featurestream"))


def dev_state_path() -> Path:
    return featurestream_home() / "dev" / "stack.json"


def _from_config_file() -> ServiceAddresses:
    path = Path(os.environ.get(ENV_CONFIG, "featurestream.yaml"))
    if not path.is_file():
        return ServiceAddresses()
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of service addresses")
    return ServiceAddresses.model_validate(data)


def _from_dev_state() -> ServiceAddresses:
    path = dev_state_path()
    if not path.is_file():
        return ServiceAddresses()
    data = json.loads(path.read_text())
    return ServiceAddresses.model_validate(data.get("addresses", {}))


def _layers() -> list[tuple[str, ServiceAddresses]]:
    """Each source of addresses with a label for messages, highest precedence first."""
    env = ServiceAddresses(
        kafka_bootstrap=os.environ.get(ENV_KAFKA) or None,
        redis_url=os.environ.get(ENV_REDIS) or None,
        postgres_url=os.environ.get(ENV_POSTGRES) or None,
    )
    config_file = Path(os.environ.get(ENV_CONFIG, "featurestream.yaml"))
    return [
        ("environment", env),
        (str(config_file), _from_config_file()),
        (f"dev stack ({dev_state_path()})", _from_dev_state()),
    ]


def address_sources() -> dict[str, str | None]:
    """Where each address comes from (``"environment"``, a config file path, the dev stack), or None."""
    layers = _layers()
    return {
        field: next((label for label, layer in layers if getattr(layer, field)), None)
        for field in ServiceAddresses.model_fields
    }


def resolve_addresses() -> ServiceAddresses:
    layers = [layer for _, layer in _layers()]
    merged: dict[str, str | None] = {}
    for field in ServiceAddresses.model_fields:
        merged[field] = next((getattr(layer, field) for layer in layers if getattr(layer, field)), None)
    return ServiceAddresses(**merged)


def require(name: str) -> str:
    """The address of one service (``kafka_bootstrap``, ``redis_url``, ``postgres_url``) or a clear error."""
    value: str | None = getattr(resolve_addresses(), name)
    if not value:
        env = {"kafka_bootstrap": ENV_KAFKA, "redis_url": ENV_REDIS, "postgres_url": ENV_POSTGRES}[name]
        raise MissingServiceError(
            f"no {name} configured: set {env}, add '{name}' to featurestream.yaml, "
            "or start the embedded stack with 'featurestream dev up'"
        )
    return value
