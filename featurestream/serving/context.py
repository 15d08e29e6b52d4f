"""Everything the front ends (gRPC, REST) serve from, built once by `featurestream serve`.

Both front ends take a ``ServingContext`` and call the same objects, so their answers agree.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from featurestream.serving.access import ANONYMOUS, AccessPolicy, OpenAccess, Principal
from featurestream.serving.service import OnlineService, ServedRows


@dataclass(frozen=True)
class PushResult:
    accepted: int
    rejected: list[tuple[int, str]] = field(default_factory=list)
    """(index in the request, reason) of each refused event."""


class AsOfReader(Protocol):
    def get_as_of(
        self,
        rows: Sequence[tuple[dict[str, str], int]],
        features: Sequence[str],
        feature_service: str = "",
        principal: Principal = ANONYMOUS,
        as_of_arrival: bool = False,
    ) -> ServedRows:
        """For each (entity join keys, epoch ms) the values that would have been served then."""


class EventPusher(Protocol):
    def push(self, source: str, events: Sequence[bytes], principal: Principal = ANONYMOUS) -> PushResult:
        """Validate each event against the source and produce the valid ones to its topic."""


class UpdateFeed(Protocol):
    def subscribe(
        self,
        entities: Sequence[dict[str, str]],
        features: Sequence[str],
        feature_service: str = "",
        principal: Principal = ANONYMOUS,
    ) -> Subscription: ...


class Subscription(Protocol):
    def __iter__(self) -> Iterator[ServedRows]:
        """Blocks until the stream jobs write new values for a subscribed entity, then yields them."""

    def close(self) -> None:
        """Ends the iteration (the client went away)."""


class CatalogReader(Protocol):
    def list_features(self, query: str = "") -> list[dict[str, Any]]: ...

    def describe_feature(self, name: str) -> dict[str, Any]: ...


@dataclass
class ServingContext:
    online: OnlineService
    access: AccessPolicy = field(default_factory=OpenAccess)
    as_of: AsOfReader | None = None
    push: EventPusher | None = None
    updates: UpdateFeed | None = None
    catalog: CatalogReader | None = None
