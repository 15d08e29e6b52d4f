"""Read-usage counts per feature: the hook the serving layer fills and ``describe`` shows.

Serving calls ``record_feature_usage`` (batched: one call per flush with the counts it gathered);
until it does, every count reads as zero. Rows are keyed by (project, view, version, feature,
client), where client is the token or team name the request was made with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from featurestream.registry.schema import SCHEMA


@dataclass(frozen=True)
class UsageIncrement:
    project: str
    view: str
    version: int
    feature: str
    client: str
    reads: int
    last_read_at: datetime


@dataclass(frozen=True)
class UsageRow:
    view: str
    version: int
    feature: str
    client: str
    reads: int
    last_read_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "client": self.client,
            "reads": self.reads,
            "last_read_at": self.last_read_at.isoformat() if self.last_read_at else None,
        }


def record_feature_usage(conn: psycopg.Connection[Any], increments: Iterable[UsageIncrement]) -> None:
    """Add read counts to the stored ones (call it from serving's periodic flush, not per request)."""
    rows = [
        (i.project, i.view, i.version, i.feature, i.client, i.reads, i.last_read_at) for i in increments
    ]
    if not rows:
        return
    with conn.cursor() as cur:
        cur.executemany(
            f"insert into {SCHEMA}.feature_usage as u (project, view, version, feature, client, reads, "
            "last_read_at) values (%s, %s, %s, %s, %s, %s, %s) "
            "on conflict (project, view, version, feature, client) do update set "
            "reads = u.reads + excluded.reads, "
            "last_read_at = greatest(u.last_read_at, excluded.last_read_at)",
            rows,
        )


def feature_usage(conn: psycopg.Connection[Any], project: str) -> dict[tuple[str, str], list[UsageRow]]:
    """(view, feature) -> usage rows of every version and client; absent means never read."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"select view, version, feature, client, reads, last_read_at from {SCHEMA}.feature_usage "
            "where project = %s order by view, feature, version, client",
            (project,),
        )
        out: dict[tuple[str, str], list[UsageRow]] = {}
        for row in cur.fetchall():
            out.setdefault((row["view"], row["feature"]), []).append(UsageRow(**row))
        return out
