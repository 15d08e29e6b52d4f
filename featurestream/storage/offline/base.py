"""The offline store's contract: an archive of raw events per source and feature history per view.

Writes are idempotent: every row carries the (partition, offset) of the Kafka record it came
from, so a replay after a crash stores nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from featurestream.definitions.models import FeatureView, Source


@dataclass(frozen=True, slots=True)
class ArchivedEvent:
    """One valid event as the stream job archives it."""

    partition: int
    offset: int
    event_time_ms: int
    arrival_ms: int
    """When the record reached Kafka (its record timestamp): the guard of ``--as-of-arrival``."""
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class FeatureRow:
    """Values of all features of a view for one entity, as of one event."""

    entity_key: tuple[Any, ...]
    event_time_ms: int
    partition: int
    offset: int
    values: dict[str, Any]


class OfflineStore(Protocol):
    def ensure_source(self, source: Source, key_columns: Sequence[Sequence[str]]) -> None:
        """Create the archive of a source (idempotent), indexed for each set of key columns."""

    def archive_events(self, source: Source, events: Sequence[ArchivedEvent]) -> int:
        """Store events not stored before; return how many were new."""

    def ensure_view(self, view: FeatureView, version: int, key_names: Sequence[str], dtypes: dict[str, str]) -> None:
        """Create the history table of a feature view version (idempotent)."""

    def write_feature_rows(self, view: FeatureView, version: int, rows: Sequence[FeatureRow]) -> int:
        """Store feature rows not stored before; return how many were new."""

    def read_events(
        self, source: Source, key_columns: Sequence[str], keys: Sequence[tuple[Any, ...]] | None, end_ms: int | None
    ) -> Iterator[tuple[tuple[Any, ...], ArchivedEvent]]:
        """Archived events (of the given entity keys, or all), ordered by key then event time."""

    def close(self) -> None: ...
