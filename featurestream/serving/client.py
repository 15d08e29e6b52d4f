"""``featurestream.Client``: the Python client of the gRPC serving API.

::

    from featurestream import Client

    with Client("localhost:6566", token="...") as client:
        result = client.get_online([{"user_id": "u1"}], features=["user_transactions"])
        result["results"][0]["features"]["user_transactions:txn_count_1h"]
        # {"value": 3, "status": "PRESENT", "event_time": "2026-11-27T10:00:00Z"}
        frame = result.to_pandas()          # or client.get_online(..., as_frame=True)

Results are plain dicts shaped like ``featurestream get --json`` and the REST API. Errors raise
``ClientError`` with the server's gRPC status name (``code``) and message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import grpc

from featurestream.serving.convert import decode_rows, timestamp, to_ms
from featurestream.v1 import featurestream_pb2 as pb
from featurestream.v1 import featurestream_pb2_grpc

if TYPE_CHECKING:
    import pandas as pd

Entity = Mapping[str, Any]


class ClientError(Exception):
    """A call the server refused or could not answer; ``code`` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def of(cls, error: grpc.RpcError) -> ClientError:
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else None
        return cls(code.name if code is not None else "UNKNOWN", details or str(error))


class FeatureResult(dict[str, Any]):
    """``{"results": [{"entity": {...}, "features": {name: {"value", "status", "event_time"}}}]}``
    plus ``feature_names`` (the response's feature order) and ``to_pandas()``."""

    def __init__(self, results: list[dict[str, Any]], feature_names: list[str]) -> None:
        super().__init__(results=results)
        self.feature_names = feature_names

    @property
    def results(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self["results"]
        return rows

    def to_pandas(self, statuses: bool = False, event_times: bool = False) -> pd.DataFrame:
        """One row per entity: its join keys (and ``timestamp`` for as-of results), then one
        column per feature; ``<feature>__status`` / ``<feature>__event_time`` columns on request."""
        import pandas as pd

        records = []
        for result in self.results:
            record: dict[str, Any] = dict(result["entity"])
            if "timestamp" in result:
                record["timestamp"] = result["timestamp"]
            features = result["features"]
            for name in self.feature_names:
                cell = features[name]
                record[name] = cell["value"]
                if statuses:
                    record[f"{name}__status"] = cell["status"]
                if event_times:
                    record[f"{name}__event_time"] = cell["event_time"]
            records.append(record)
        frame = pd.DataFrame.from_records(records)
        if "timestamp" in frame.columns:
            frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True, format="ISO8601")
        if event_times:
            for name in self.feature_names:
                column = f"{name}__event_time"
                frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
        return frame


def _result(data: bytes, with_timestamp: bool = False) -> FeatureResult:
    names, rows = decode_rows(data, with_timestamp)
    return FeatureResult(rows, names)


def _in_request_order(result: FeatureResult, entities: Sequence[Entity]) -> FeatureResult:
    """Join keys in the order the caller gave them (a proto map keeps no order)."""
    for row, asked in zip(result["results"], entities, strict=False):
        got = row["entity"]
        row["entity"] = {**{k: got[k] for k in asked if k in got}, **got}
    return result


def _entity(entity: Entity) -> pb.EntityKey:
    return pb.EntityKey(join_keys={str(k): v if isinstance(v, str) else str(v) for k, v in entity.items()})


def _features(features: str | Sequence[str] | None) -> list[str]:
    if features is None:
        return []
    if isinstance(features, str):
        return [features]
    return list(features)


class UpdateStream:
    """Iterates the ``FeatureResult`` of each update; ``cancel()`` (or leaving a ``with``) ends it."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[FeatureResult]:
        try:
            for message in self._call:
                yield _result(message)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise ClientError.of(exc) from None

    def cancel(self) -> None:
        self._call.cancel()

    close = cancel

    def __enter__(self) -> UpdateStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Client:
    """A connection to a featurestream gRPC server.

    ``target``: ``host:port``. ``token``: sent as ``authorization: Bearer <token>``. ``tls``:
    ``False`` (plain), ``True`` (the system's root certificates) or a PEM file of the root
    certificate(s) to trust (e.g. a self-signed server certificate). ``timeout``: seconds per
    call (``None``: no deadline).
    """

    def __init__(
        self,
        target: str = "localhost:6566",
        token: str | None = None,
        tls: bool | str | Path = False,
        *,
        timeout: float | None = 10.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        channel_options = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            *options,
        ]
        if tls is False:
            self.channel = grpc.insecure_channel(target, options=channel_options)
        else:
            roots = None if tls is True else Path(tls).read_bytes()
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=channel_options)
        self.stub = featurestream_pb2_grpc.FeatureServiceStub(self.channel)  # type: ignore[no-untyped-call]
        # The calls that answer rows take the response's bytes as they are: decode_rows reads them.
        service = f"/{pb.DESCRIPTOR.services_by_name['FeatureService'].full_name}/"
        self._get_online = self.channel.unary_unary(
            service + "GetOnlineFeatures", request_serializer=pb.GetOnlineFeaturesRequest.SerializeToString
        )
        self._get_as_of = self.channel.unary_unary(
            service + "GetFeaturesAsOf", request_serializer=pb.GetFeaturesAsOfRequest.SerializeToString
        )
        self._stream_updates = self.channel.unary_stream(
            service + "StreamFeatureUpdates", request_serializer=pb.StreamFeatureUpdatesRequest.SerializeToString
        )

    # ------------------------------------------------------------ plumbing

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise ClientError.of(exc) from None

    # ------------------------------------------------------------ features

    @overload
    def get_online(self, entities: Iterable[Entity], features: str | Sequence[str] | None = ..., feature_service: str = ...,
                   *, as_frame: Literal[False] = ..., timeout: float | None = ...) -> FeatureResult: ...

    @overload
    def get_online(self, entities: Iterable[Entity], features: str | Sequence[str] | None = ..., feature_service: str = ...,
                   *, as_frame: Literal[True], timeout: float | None = ...) -> pd.DataFrame: ...

    def get_online(
        self,
        entities: Iterable[Entity],
        features: str | Sequence[str] | None = None,
        feature_service: str = "",
        *,
        as_frame: bool = False,
        timeout: float | None = None,
    ) -> FeatureResult | pd.DataFrame:
        """Fresh values: ``features`` are ``view:feature``, ``view`` (all its features) or
        ``view@N:feature``; or name a ``feature_service``. One result per entity, in order."""
        entities = list(entities)
        request = pb.GetOnlineFeaturesRequest(
            entities=[_entity(e) for e in entities], features=_features(features), feature_service=feature_service
        )
        result = _in_request_order(_result(self._call(self._get_online, request, timeout)), entities)
        return result.to_pandas() if as_frame else result

    @overload
    def get_as_of(self, rows: Iterable[tuple[Entity, datetime | int]], features: str | Sequence[str] | None = ...,
                  feature_service: str = ..., *, as_of_arrival: bool = ..., as_frame: Literal[False] = ...,
                  timeout: float | None = ...) -> FeatureResult: ...

    @overload
    def get_as_of(self, rows: Iterable[tuple[Entity, datetime | int]], features: str | Sequence[str] | None = ...,
                  feature_service: str = ..., *, as_of_arrival: bool = ..., as_frame: Literal[True],
                  timeout: float | None = ...) -> pd.DataFrame: ...

    def get_as_of(
        self,
        rows: Iterable[tuple[Entity, datetime | int]],
        features: str | Sequence[str] | None = None,
        feature_service: str = "",
        *,
        as_of_arrival: bool = False,
        as_frame: bool = False,
        timeout: float | None = None,
    ) -> FeatureResult | pd.DataFrame:
        """For each (entity, time) the values that would have been served then; a time is an
        aware datetime or epoch milliseconds. Each result also carries its ``timestamp``."""
        request = pb.GetFeaturesAsOfRequest(
            rows=[pb.AsOfRow(entity=_entity(e), timestamp=timestamp(to_ms(at))) for e, at in rows],
            features=_features(features),
            feature_service=feature_service,
            as_of_arrival=as_of_arrival,
        )
        result = _result(self._call(self._get_as_of, request, timeout), with_timestamp=True)
        return result.to_pandas() if as_frame else result

    def stream_updates(
        self,
        entities: Iterable[Entity],
        features: str | Sequence[str] | None = None,
        feature_service: str = "",
    ) -> UpdateStream:
        """New values of the features of these entities as the stream jobs write them."""
        request = pb.StreamFeatureUpdatesRequest(
            entities=[_entity(e) for e in entities], features=_features(features), feature_service=feature_service
        )
        return UpdateStream(self._stream_updates(request, metadata=self._metadata))

    # ------------------------------------------------------------ ingest

    def push_events(
        self, source: str, events: Iterable[bytes | str | Mapping[str, Any]], *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Validate events and produce the valid ones to the source's topic. Dicts are sent as
        JSON; bytes as they are (JSON or Avro, the source's format).
        Returns ``{"accepted": n, "rejected": [{"index": i, "reason": "..."}]}``."""
        encoded = [
            e if isinstance(e, bytes) else e.encode() if isinstance(e, str) else json.dumps(e, default=str).encode()
            for e in events
        ]
        response = self._call(self.stub.PushEvents, pb.PushEventsRequest(source=source, events=encoded), timeout)
        return {"accepted": response.accepted, "rejected": [{"index": r.index, "reason": r.reason} for r in response.rejected]}

    # ------------------------------------------------------------ catalog

    def list_features(self, query: str = "", *, timeout: float | None = None) -> list[dict[str, Any]]:
        response = self._call(self.stub.ListFeatures, pb.ListFeaturesRequest(query=query), timeout)
        return [_info(f) for f in response.features]

    def describe_feature(self, name: str, *, timeout: float | None = None) -> dict[str, Any]:
        return _info(self._call(self.stub.DescribeFeature, pb.DescribeFeatureRequest(name=name), timeout))

    # ------------------------------------------------------------ lifetime

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (ClientError UNAVAILABLE after ``timeout`` seconds)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ClientError("UNAVAILABLE", f"no featurestream server at {self.target} within {timeout:g} s") from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"


def _info(info: pb.FeatureInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "view_version": info.view_version,
        "description": info.description,
        "owner": info.owner,
        "tags": list(info.tags),
        "dtype": info.dtype,
        "aggregation": info.aggregation,
        "window": info.window,
        "pii": info.pii,
        "max_age": info.max_age or None,
        "entity": info.entity,
        "join_keys": list(info.join_keys),
        "source": info.source,
        "reads": info.reads,
    }
