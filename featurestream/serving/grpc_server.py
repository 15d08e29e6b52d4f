"""The gRPC front end: ``featurestream.v1.FeatureService`` over a ``ServingContext``.

A grpcio sync server (thread pool). Every RPC authenticates the ``authorization: Bearer <token>``
metadata with ``context.access``, calls the service layer and maps a ``ServingError`` to the gRPC
status of its code, with its message. RPCs whose part of the context is missing (as-of, push,
updates, catalog) answer UNIMPLEMENTED. The server also answers the standard health checking
(``grpc.health.v1.Health``: SERVING, NOT_SERVING while shutting down) and server reflection.

Responses of ``FeatureRows`` are written to wire bytes by ``convert.encode_rows`` and handed to
gRPC as they are (identity serializer), which is what keeps a 100 x 50 response cheap.

Shutdown (``GrpcServer.stop``): health turns NOT_SERVING, open update streams end with
UNAVAILABLE ("reconnect"), calls are still served for ``drain_delay_s`` (0 by default), then new
calls are refused, in-flight calls get ``grace_s`` seconds to finish, and the server stops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter

from featurestream.gc_tuning import settle_after_request
from featurestream.serving.access import Principal
from featurestream.serving.context import ServingContext, Subscription
from featurestream.serving.convert import encode_rows, entity_keys, feature_info, identity, timestamp_ms
from featurestream.serving.refs import ServingError
from featurestream.v1 import featurestream_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["FeatureService"].full_name
DEFAULT_PORT = 6566
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

CALLS = Counter("featurestream_grpc_calls_total", "gRPC calls by method and status code", ["method", "code"])

_CODES: dict[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}
_Request = TypeVar("_Request")


def status_code(name: str) -> grpc.StatusCode:
    """The gRPC status of a ``ServingError`` code name (UNKNOWN for names gRPC does not have)."""
    return _CODES.get(name, grpc.StatusCode.UNKNOWN)


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _failure(method: str, exc: BaseException) -> _Aborted:
    if isinstance(exc, _Aborted):
        return exc
    if isinstance(exc, ServingError):
        return _Aborted(status_code(exc.code), exc.message)
    log.exception("%s failed", method)
    return _Aborted(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}: {exc}")


class FeatureServiceHandlers:
    """The RPC implementations; ``method_handlers()`` binds them with their (de)serializers."""

    def __init__(self, context: ServingContext, max_streams: int = 32) -> None:
        self.context = context
        self.max_streams = max_streams
        self._streams: set[Subscription] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._ok = {m: CALLS.labels(method=m, code="OK") for m in _METHODS}

    # ------------------------------------------------------------ plumbing

    def _principal(self, ctx: grpc.ServicerContext) -> Principal:
        token = None
        for key, value in ctx.invocation_metadata():
            if key == "authorization":
                scheme, _, rest = str(value).partition(" ")
                if scheme.lower() == "bearer" and rest.strip():
                    token = rest.strip()
                break
        return self.context.access.authenticate(token)

    def _unary(self, method: str, fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
        ok = self._ok[method]

        def handle(request: Any, ctx: grpc.ServicerContext) -> Any:
            try:
                response = fn(request, ctx)
            except Exception as exc:
                failure = _failure(method, exc)
            else:
                ok.inc()
                settle_after_request()
                return response
            CALLS.labels(method=method, code=failure.code.name).inc()
            ctx.abort(failure.code, failure.message)

        return handle

    @staticmethod
    def _unimplemented(what: str) -> _Aborted:
        return _Aborted(grpc.StatusCode.UNIMPLEMENTED, what)

    # ------------------------------------------------------------ RPCs

    def get_online(self, request: pb.GetOnlineFeaturesRequest, ctx: grpc.ServicerContext) -> bytes:
        principal = self._principal(ctx)
        rows = self.context.online.get_online(
            entity_keys(request.entities), list(request.features), request.feature_service, principal
        )
        return encode_rows(rows)

    def get_as_of(self, request: pb.GetFeaturesAsOfRequest, ctx: grpc.ServicerContext) -> bytes:
        principal = self._principal(ctx)
        as_of = self.context.as_of
        if as_of is None:
            raise self._unimplemented("this server does not serve as-of lookups (no offline store configured)")
        rows = []
        for i, row in enumerate(request.rows):
            if not row.HasField("timestamp"):
                raise ServingError("INVALID_ARGUMENT", f"row {i}: give the timestamp to read the values as of")
            rows.append((dict(row.entity.join_keys), timestamp_ms(row.timestamp)))
        served = as_of.get_as_of(rows, list(request.features), request.feature_service, principal, request.as_of_arrival)
        return encode_rows(served)

    def push_events(self, request: pb.PushEventsRequest, ctx: grpc.ServicerContext) -> pb.PushEventsResponse:
        principal = self._principal(ctx)
        push = self.context.push
        if push is None:
            raise self._unimplemented("this server does not accept pushed events (no producer configured)")
        if not request.source:
            raise ServingError("INVALID_ARGUMENT", "name the source to push events to")
        result = push.push(request.source, list(request.events), principal)
        return pb.PushEventsResponse(
            accepted=result.accepted, rejected=[pb.Rejection(index=i, reason=r) for i, r in result.rejected]
        )

    def list_features(self, request: pb.ListFeaturesRequest, ctx: grpc.ServicerContext) -> pb.ListFeaturesResponse:
        self._principal(ctx)
        catalog = self.context.catalog
        if catalog is None:
            raise self._unimplemented("this server has no catalog")
        return pb.ListFeaturesResponse(features=[feature_info(f) for f in catalog.list_features(request.query)])

    def describe_feature(self, request: pb.DescribeFeatureRequest, ctx: grpc.ServicerContext) -> pb.FeatureInfo:
        self._principal(ctx)
        catalog = self.context.catalog
        if catalog is None:
            raise self._unimplemented("this server has no catalog")
        if not request.name:
            raise ServingError("INVALID_ARGUMENT", "name the feature to describe ('view:feature')")
        return feature_info(catalog.describe_feature(request.name))

    def stream_updates(self, request: pb.StreamFeatureUpdatesRequest, ctx: grpc.ServicerContext) -> Iterator[bytes]:
        method = "StreamFeatureUpdates"
        try:
            principal = self._principal(ctx)
            updates = self.context.updates
            if updates is None:
                raise self._unimplemented("this server does not stream feature updates (no update feed configured)")
            if self._stopping:
                raise _Aborted(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; reconnect to another")
            with self._lock:
                # Each open stream holds a worker thread: past the limit, refuse rather than starve lookups.
                if len(self._streams) >= self.max_streams:
                    raise _Aborted(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{len(self._streams)} update streams are open; the limit is {self.max_streams}")
                placeholder = _Reserved()
                self._streams.add(placeholder)
            try:
                subscription = updates.subscribe(
                    entity_keys(request.entities), list(request.features), request.feature_service, principal
                )
            except BaseException:
                with self._lock:
                    self._streams.discard(placeholder)
                raise
            with self._lock:
                self._streams.discard(placeholder)
                self._streams.add(subscription)
            if self._stopping:  # shutdown began while subscribing
                subscription.close()
        except Exception as exc:
            refused = _failure(method, exc)
            CALLS.labels(method=method, code=refused.code.name).inc()
            ctx.abort(refused.code, refused.message)
        ctx.add_callback(subscription.close)  # the client cancelled or went away
        failure: _Aborted | None = None
        try:
            for rows in subscription:
                if not ctx.is_active():
                    break
                yield encode_rows(rows)
        except Exception as exc:
            failure = _failure(method, exc)
        finally:
            subscription.close()
            with self._lock:
                self._streams.discard(subscription)
        if failure is None and self._stopping and ctx.is_active():
            failure = _Aborted(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; reconnect to another")
        if failure is not None:
            CALLS.labels(method=method, code=failure.code.name).inc()
            ctx.abort(failure.code, failure.message)
        self._ok[method].inc()

    # ------------------------------------------------------------ binding

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        unary = grpc.unary_unary_rpc_method_handler
        return {
            "GetOnlineFeatures": unary(
                self._unary("GetOnlineFeatures", self.get_online),
                request_deserializer=pb.GetOnlineFeaturesRequest.FromString,
                response_serializer=identity,
            ),
            "GetFeaturesAsOf": unary(
                self._unary("GetFeaturesAsOf", self.get_as_of),
                request_deserializer=pb.GetFeaturesAsOfRequest.FromString,
                response_serializer=identity,
            ),
            "StreamFeatureUpdates": grpc.unary_stream_rpc_method_handler(
                self.stream_updates,
                request_deserializer=pb.StreamFeatureUpdatesRequest.FromString,
                response_serializer=identity,
            ),
            "PushEvents": unary(
                self._unary("PushEvents", self.push_events),
                request_deserializer=pb.PushEventsRequest.FromString,
                response_serializer=pb.PushEventsResponse.SerializeToString,
            ),
            "ListFeatures": unary(
                self._unary("ListFeatures", self.list_features),
                request_deserializer=pb.ListFeaturesRequest.FromString,
                response_serializer=pb.ListFeaturesResponse.SerializeToString,
            ),
            "DescribeFeature": unary(
                self._unary("DescribeFeature", self.describe_feature),
                request_deserializer=pb.DescribeFeatureRequest.FromString,
                response_serializer=pb.FeatureInfo.SerializeToString,
            ),
        }

    def begin_shutdown(self) -> None:
        """New streams are refused and open ones end (UNAVAILABLE) so they do not hold the grace period."""
        self._stopping = True
        with self._lock:
            streams = list(self._streams)
        for subscription in streams:
            try:
                subscription.close()
            except Exception:
                log.exception("closing an update subscription failed")


class _Reserved:
    """Holds a stream's place while it subscribes."""

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def close(self) -> None:
        return None


_METHODS = ("GetOnlineFeatures", "GetFeaturesAsOf", "StreamFeatureUpdates", "PushEvents", "ListFeatures", "DescribeFeature")


@dataclass(frozen=True)
class GrpcSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    """0: any free port (``GrpcServer.port`` tells which)."""
    max_workers: int = 64
    """Threads serving calls."""
    max_streams: int = 32
    """Open StreamFeatureUpdates calls; each holds a worker thread for its lifetime, so keep it
    below ``max_workers`` (further streams get RESOURCE_EXHAUSTED)."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    grace_s: float = 10.0
    drain_delay_s: float = 0.0
    """On stop, report NOT_SERVING and keep serving this long before refusing new calls, so load
    balancers that poll the health service move traffic away first."""
    max_message_bytes: int = MAX_MESSAGE_BYTES


def server_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])


class GrpcServer:
    """``featurestream.v1.FeatureService`` plus health and reflection on one port."""

    def __init__(self, context: ServingContext, settings: GrpcSettings | None = None) -> None:
        self.settings = settings or GrpcSettings()
        if (self.settings.tls_cert is None) != (self.settings.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key")
        if self.settings.max_streams >= self.settings.max_workers:
            raise ValueError("max_streams must be below max_workers: streams would leave no thread for lookups")
        self.context = context
        self.handlers = FeatureServiceHandlers(context, self.settings.max_streams)
        options = [
            ("grpc.max_receive_message_length", self.settings.max_message_bytes),
            ("grpc.max_send_message_length", self.settings.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a silently shared socket
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        self._pool = ThreadPoolExecutor(max_workers=self.settings.max_workers, thread_name_prefix="grpc")
        self.server = grpc.server(self._pool, options=options)
        handlers = self.handlers.method_handlers()
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        self.server.add_registered_method_handlers(SERVICE_NAME, handlers)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        address = f"{self.settings.host}:{self.settings.port}"
        if self.settings.tls_cert is not None and self.settings.tls_key is not None:
            bound = self.server.add_secure_port(address, server_credentials(self.settings.tls_cert, self.settings.tls_key))
        else:
            bound = self.server.add_insecure_port(address)
        if not bound:
            raise OSError(f"cannot listen for gRPC on {address}")
        self.port: int = bound
        self._stopped = threading.Event()

    @property
    def tls(self) -> bool:
        return self.settings.tls_cert is not None

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def start(self) -> GrpcServer:
        self.server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Refuse new calls, end update streams, let in-flight calls finish within the grace period."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.handlers.begin_shutdown()
        if self.settings.drain_delay_s > 0:
            time.sleep(self.settings.drain_delay_s)
        self.server.stop(self.settings.grace_s if grace_s is None else grace_s).wait()
        self._pool.shutdown(wait=False)

    def wait(self, timeout: float | None = None) -> bool:
        return bool(self.server.wait_for_termination(timeout))

    def __enter__(self) -> GrpcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
