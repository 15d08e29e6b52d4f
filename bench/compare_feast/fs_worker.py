"""One featurestream client measured by ``loop.py`` (runs in the project's virtual environment).

``python fs_worker.py CONFIG_JSON`` with CONFIG ``{"target": "grpc" | "rest" | "inprocess",
"cases": {case: [feature refs]}, "grpc": "host:port", "http_port": N, "redis_url", "postgres_url",
"project", "cache_ttl_ms", "memo_entries" (null: the default), "freeze_gc"}``.

* ``grpc``: ``featurestream.Client.get_online`` (answers decoded to dicts, as users get them);
* ``rest``: POST ``/v1/features/online`` with ``http.client``, JSON decoded;
* ``inprocess``: ``featurestream.OnlineReader.get_rows`` (the serving layer called directly; if
  this installation has no ``OnlineReader``, ``OnlineService.get_online`` over a registry
  snapshot, which is what the reader wraps).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any

from loop import HttpJson, serve


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return round(value.timestamp() * 1000)
    return value


class GrpcTarget:
    def __init__(self, config: dict[str, Any]) -> None:
        from featurestream.serving.client import Client

        self.features = config["cases"]
        self.client = Client(config["grpc"], timeout=30.0)
        self.client.wait_ready(30.0)

    def call(self, case: str, users: list[str]) -> Any:
        return self.client.get_online([{"user_id": u} for u in users], features=self.features[case])

    def values(self, case: str, users: list[str]) -> list[list[Any]]:
        result = self.call(case, users)
        return [[row["features"][n]["value"] for n in result.feature_names] for row in result.results]

    def close(self) -> None:
        self.client.close()


class RestTarget:
    def __init__(self, config: dict[str, Any]) -> None:
        self.features = config["cases"]
        self.http = HttpJson("127.0.0.1", config["http_port"])

    def call(self, case: str, users: list[str]) -> Any:
        return self.http.post(
            "/v1/features/online", {"entities": [{"user_id": u} for u in users], "features": self.features[case]}
        )

    def values(self, case: str, users: list[str]) -> list[list[Any]]:
        result = self.call(case, users)
        names = self.features[case]
        return [[row["features"][n]["value"] for n in names] for row in result["results"]]

    def close(self) -> None:
        self.http.close()


def open_reader(config: dict[str, Any]) -> tuple[Any, str]:
    """``featurestream.OnlineReader`` if this installation has it, else ``OnlineService`` directly."""
    import featurestream

    reader_class = getattr(featurestream, "OnlineReader", None)
    how = "featurestream.OnlineReader"
    if reader_class is None:
        try:
            from featurestream.serving.reader import OnlineReader as reader_class
        except ImportError:
            reader_class = None
        how = "featurestream.serving.reader.OnlineReader (not exported as featurestream.OnlineReader)"
    if reader_class is not None:
        memo = {} if config.get("memo_entries") is None else {"memo_entries": config["memo_entries"]}
        reader = reader_class(
            config["redis_url"], postgres_url=config["postgres_url"], project=config["project"],
            cache_ttl_ms=config["cache_ttl_ms"], **memo,
        )
        return reader.get_rows, how
    from featurestream.registry import Registry
    from featurestream.serving.service import OnlineService

    snapshot = Registry(config["postgres_url"]).snapshot(config["project"])
    service = OnlineService(lambda: snapshot, config["redis_url"], cache_ttl_ms=config["cache_ttl_ms"])
    return service.get_online, "featurestream.serving.service.OnlineService (no OnlineReader here)"


class InProcessTarget:
    def __init__(self, config: dict[str, Any]) -> None:
        self.features = config["cases"]
        self.get_rows, self.how = open_reader(config)
        print(f"in-process reader: {self.how}", file=sys.stderr, flush=True)

    def call(self, case: str, users: list[str]) -> Any:
        return self.get_rows([{"user_id": u} for u in users], self.features[case])

    def values(self, case: str, users: list[str]) -> list[list[Any]]:
        rows = self.call(case, users)
        return [[_plain(v.value) for v in row.values] for row in rows.rows]


TARGETS = {"grpc": GrpcTarget, "rest": RestTarget, "inprocess": InProcessTarget}


def main() -> None:
    config = json.loads(sys.argv[1])
    serve(lambda: TARGETS[config["target"]](config), freeze_gc=config.get("freeze_gc", True))


if __name__ == "__main__":
    main()
