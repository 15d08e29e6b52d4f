"""A small project written through the real stream processor, for the serving tests."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from featurestream.definitions.models import ProjectDefinition
from featurestream.registry import Registry
from featurestream.registry.records import ProjectSnapshot
from featurestream.storage.offline.postgres import PostgresOfflineStore
from featurestream.storage.online.redis_store import RedisOnlineStore
from featurestream.stream_jobs.processor import Record, SourceProcessor
from tests.support.stream import live_runtimes

T0 = int(datetime(2026, 11, 27, 10, 0, tzinfo=UTC).timestamp() * 1000)
MIN = 60_000


def shop_definition(project: str) -> ProjectDefinition:
    return ProjectDefinition.model_validate(
        {
            "project": {"name": project},
            "entities": [{"name": "user", "join_keys": ["user_id"]}, {"name": "shop", "join_keys": [{"name": "shop_id", "type": "int64"}]}],
            "sources": [
                {
                    "name": "orders",
                    "topic": f"orders-{project}",
                    "event_time_field": "ts",
                    "fields": [
                        {"name": "user_id", "type": "string"},
                        {"name": "shop_id", "type": "int64"},
                        {"name": "amount", "type": "float64", "min": 0},
                        {"name": "country", "type": "string", "pii": "personal"},
                        {"name": "card", "type": "string", "pii": "sensitive"},
                        {"name": "ts", "type": "timestamp"},
                    ],
                }
            ],
            "feature_views": [
                {
                    "name": "user_orders",
                    "entity": "user",
                    "source": "orders",
                    "features": [
                        {"name": "count_1h", "aggregation": "count", "window": "1h", "max_age": "30m", "validation": {"max": 3}},
                        {"name": "amount_sum_1h", "aggregation": "sum", "field": "amount", "window": "1h"},
                        {"name": "amount_mean_1h", "aggregation": "mean", "field": "amount", "window": "1h"},
                        {"name": "last_country", "aggregation": "last", "field": "country", "pii": "personal"},
                        {"name": "last_card", "aggregation": "last", "field": "card", "pii": "sensitive"},
                    ],
                },
                {
                    "name": "shop_orders",
                    "entity": "shop",
                    "source": "orders",
                    "features": [{"name": "count_1h", "aggregation": "count", "window": "1h"}],
                },
            ],
            "feature_services": [{"name": "checkout", "features": ["user_orders:count_1h", "shop_orders"]}],
        }
    )


def order(user: str, shop: int, amount: float, minutes: float, country: str = "DE") -> bytes:
    return json.dumps(
        {"user_id": user, "shop_id": shop, "amount": amount, "country": country, "card": f"4111-{user}", "ts": T0 + int(minutes * MIN)}
    ).encode()


@dataclass
class ServingProject:
    name: str
    definition: ProjectDefinition
    snapshot: ProjectSnapshot
    registry: Registry
    redis_url: str
    postgres_url: str
    processor: SourceProcessor

    def write(self, events: list[bytes], partition: int = 0, first_offset: int = 0) -> None:
        records = [Record(partition, first_offset + i, T0, e) for i, e in enumerate(events)]
        result = self.processor.process(records)
        assert not result.dead_letters, result.dead_letters


@pytest.fixture
def shop(fresh_pg_url: str, redis_url: str) -> Iterator[ServingProject]:
    name = f"shop{uuid.uuid4().hex[:8]}"
    definition = shop_definition(name)
    registry = Registry(fresh_pg_url)
    registry.apply(definition)
    snapshot = registry.snapshot(name)
    online = RedisOnlineStore(redis_url, name)
    offline = PostgresOfflineStore(fresh_pg_url)
    processor = SourceProcessor(definition.sources[0], live_runtimes(registry, definition), online, offline,
                                clock_ms=lambda: T0 + 30 * MIN)
    project = ServingProject(name, definition, snapshot, registry, redis_url, fresh_pg_url, processor)
    project.write(
        [
            order("u1", 7, 10.0, 1, "FR"),
            order("u1", 7, 20.0, 5, "DE"),
            order("u2", 7, 5.0, 2),
            order("u2", 8, 5.0, 3),
            order("u2", 8, 5.0, 4),
            order("u2", 8, 5.0, 6),
        ]
    )
    yield project
    online.close()
    offline.close()
