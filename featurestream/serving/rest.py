"""The REST front end: a JSON mirror of the gRPC API over the same ``ServingContext``.

For people and scripts. Endpoints are plain ``def`` (the service blocks on Redis), so FastAPI runs
them in its thread pool; responses are built as dicts and encoded once (orjson when installed).
Errors are ``{"error": {"code": <gRPC status name>, "message": ...}}`` with the HTTP status of the
code. Run it with uvicorn and never recycle workers by request count (each recycle stalls ~0.7 s).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import redis
from fastapi import FastAPI, Header, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

import featurestream
from featurestream.gc_tuning import settle_after_request
from featurestream.serving.access import Principal
from featurestream.serving.context import ServingContext
from featurestream.serving.convert import iso_ms
from featurestream.serving.refs import ServingError
from featurestream.serving.service import ServedRows

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is optional
    orjson = None  # type: ignore[assignment]

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
"""gRPC status name -> HTTP status (Google's mapping); anything else is a 500."""

_CODE_OF_HTTP = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    413: "RESOURCE_EXHAUSTED",
    422: "INVALID_ARGUMENT",
}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


# --- encoding ---------------------------------------------------------------------------------


class JSONBody(Response):
    """JSON of plain dicts/lists/str/int/float/bool/None, encoded by orjson when installed."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _dumps(content)


def _dumps(obj: Any) -> bytes:
    if orjson is not None:
        return orjson.dumps(obj)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def iso_datetime(value: datetime) -> str:
    """A datetime as ISO-8601 UTC with ``Z`` (naive ones are taken to be UTC)."""
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat() + "Z"


def epoch_ms(value: datetime) -> int:
    return (value - _EPOCH) // _MS


def rows_to_json(rows: ServedRows, *, with_timestamp: bool = False) -> dict[str, Any]:
    """``{"results": [{"entity", ["timestamp",] "features": {name: {value, status, event_time}}}]}``:
    the shape of the REST responses and of ``featurestream get --json``."""
    names = rows.feature_names
    results = []
    iso: dict[int | None, str | None] = {None: None}  # the features of a view share their event time
    for row in rows.rows:
        features: dict[str, Any] = {}
        for name, served in zip(names, row.values, strict=True):
            value = served.value
            if isinstance(value, datetime):
                value = iso_datetime(value)
            at = served.event_time_ms
            event_time = iso.get(at)
            if event_time is None and at is not None:
                event_time = iso[at] = iso_ms(at)
            features[name] = {"value": value, "status": served.status, "event_time": event_time}
        if with_timestamp:
            results.append({"entity": row.entity, "timestamp": iso_ms(row.at_ms), "features": features})
        else:
            results.append({"entity": row.entity, "features": features})
    return {"results": results}


def _error(code: str, message: str, status: int | None = None, **extra: Any) -> JSONBody:
    headers = {"WWW-Authenticate": "Bearer"} if code == "UNAUTHENTICATED" else None
    return JSONBody(
        {"error": {"code": code, "message": message, **extra}}, status or HTTP_STATUS.get(code, 500), headers
    )


# --- request and response models --------------------------------------------------------------

JoinKeys = Annotated[
    dict[str, StrictStr | StrictInt],
    Field(
        description='Join key values of one entity row, e.g. {"user_id": "u1"}; integers are accepted for int64 keys.'
    ),
]
FeatureRefs = Annotated[
    list[str], Field(description="'view:feature', 'view' (all its features) or 'view@N:feature'.")
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OnlineRequest(_Request):
    entities: list[JoinKeys]
    features: FeatureRefs = []
    feature_service: str = ""


class AsOfRow(_Request):
    entity: JoinKeys
    timestamp: AwareDatetime = Field(description="ISO-8601 with a UTC offset or Z.")


class AsOfRequest(_Request):
    rows: list[AsOfRow]
    features: FeatureRefs = []
    feature_service: str = ""
    as_of_arrival: bool = Field(False, description="Also require events to have arrived by the timestamp.")


class PushRequest(_Request):
    events: list[dict[str, Any]] = Field(description="Events of a JSON source, each a JSON object.")


class FeatureValueOut(BaseModel):
    value: Any = Field(description="null when MISSING; timestamps as ISO-8601 UTC.")
    status: Literal["PRESENT", "MISSING", "STALE", "INVALID"]
    event_time: str | None = Field(
        description="Newest event behind the value, ISO-8601 UTC; null when unknown."
    )


class OnlineResult(BaseModel):
    entity: dict[str, str]
    features: dict[str, FeatureValueOut]


class OnlineResponse(BaseModel):
    results: list[OnlineResult]


class AsOfResult(OnlineResult):
    timestamp: str


class AsOfResponse(BaseModel):
    results: list[AsOfResult]


class Rejection(BaseModel):
    index: int
    reason: str


class PushResponse(BaseModel):
    accepted: int
    rejected: list[Rejection]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class FeatureList(BaseModel):
    features: list[dict[str, Any]]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    redis: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 422, 501, 503)
}

Authorization = Annotated[str | None, Header(description="Bearer <token>")]


# --- the body size limit ------------------------------------------------------------------------

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]


class BodyLimit:
    """Pure ASGI middleware: a request body over ``max_bytes`` gets a 413 before any parsing."""

    def __init__(self, app: _ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        replayed = False

        async def replay() -> _Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        message = f"the request body is larger than {self.max_bytes} bytes"
        await _error("RESOURCE_EXHAUSTED", message, 413)(scope, receive, send)


# --- the app ----------------------------------------------------------------------------------


def _field(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts)


def build_app(context: ServingContext, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The REST API over ``context``; run it with uvicorn (``featurestream serve`` does)."""
    app = FastAPI(
        title="featurestream",
        version=featurestream.__version__,
        description="Online and as-of feature values, event push and the catalog of a featurestream project.",
        default_response_class=JSONBody,
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    access = context.access

    def principal(authorization: str | None) -> Principal:
        token = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                token = value.strip()
        return access.authenticate(token)

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> Response:
        return _error(exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        details = [
            {"field": _field(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type", "")}
            for e in errors
        ]
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details) or "invalid request"
        return _error("INVALID_ARGUMENT", message, 422, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = _CODE_OF_HTTP.get(exc.status_code, "UNKNOWN")
        response = _error(code, str(exc.detail), exc.status_code)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        return _error("INTERNAL", f"internal error: {type(exc).__name__}", 500)

    @app.post(
        "/v1/features/online",
        response_model=OnlineResponse,
        responses=_ERRORS,
        tags=["features"],
        summary="Fresh values of features for entities, evaluated now",
    )
    def get_online(body: OnlineRequest, authorization: Authorization = None) -> Response:
        who = principal(authorization)
        entities = [{k: v if isinstance(v, str) else str(v) for k, v in e.items()} for e in body.entities]
        rows = context.online.get_online(entities, body.features, body.feature_service, who)
        body_out = JSONBody(rows_to_json(rows))
        settle_after_request()
        return body_out

    @app.post(
        "/v1/features/as-of",
        response_model=AsOfResponse,
        responses=_ERRORS,
        tags=["features"],
        summary="For each (entity, timestamp) the values that would have been served then",
    )
    def get_as_of(body: AsOfRequest, authorization: Authorization = None) -> Response:
        who = principal(authorization)
        if context.as_of is None:
            raise ServingError(
                "UNIMPLEMENTED", "this server does not serve as-of lookups (no offline store configured)"
            )
        rows = [
            ({k: v if isinstance(v, str) else str(v) for k, v in r.entity.items()}, epoch_ms(r.timestamp))
            for r in body.rows
        ]
        served = context.as_of.get_as_of(rows, body.features, body.feature_service, who, body.as_of_arrival)
        body_out = JSONBody(rows_to_json(served, with_timestamp=True))
        settle_after_request()
        return body_out

    @app.post(
        "/v1/sources/{source}/events",
        response_model=PushResponse,
        responses=_ERRORS,
        tags=["sources"],
        summary="Validate events of a JSON source and produce the valid ones to its topic",
    )
    def push_events(source: str, body: PushRequest, authorization: Authorization = None) -> Response:
        who = principal(authorization)
        if context.push is None:
            raise ServingError(
                "UNIMPLEMENTED", "this server does not accept pushed events (no producer configured)"
            )
        spec = context.online.catalog.snapshot.definition.source(source)
        if spec is not None and spec.format != "json":
            raise ServingError(
                "INVALID_ARGUMENT",
                f"source '{source}' takes {spec.format} events; push them with gRPC PushEvents",
            )
        result = context.push.push(source, [_dumps(e) for e in body.events], who)
        return JSONBody(
            {"accepted": result.accepted, "rejected": [{"index": i, "reason": r} for i, r in result.rejected]}
        )

    @app.get(
        "/v1/features",
        response_model=FeatureList,
        responses=_ERRORS,
        tags=["catalog"],
        summary="Features whose name, description, tags or owner match the query",
    )
    def list_features(
        query: Annotated[str, Query(description="empty: all")] = "", authorization: Authorization = None
    ) -> Response:
        principal(authorization)
        if context.catalog is None:
            raise ServingError("UNIMPLEMENTED", "this server has no catalog")
        return JSONBody({"features": jsonable_encoder(context.catalog.list_features(query))})

    @app.get(
        "/v1/features/{name}",
        response_model=dict[str, Any],
        responses=_ERRORS,
        tags=["catalog"],
        summary="One feature ('view:feature') as the catalog describes it",
    )
    def describe_feature(name: str, authorization: Authorization = None) -> Response:
        principal(authorization)
        if context.catalog is None:
            raise ServingError("UNIMPLEMENTED", "this server has no catalog")
        return JSONBody(jsonable_encoder(context.catalog.describe_feature(name)))

    @app.get(
        "/healthz",
        response_model=Health,
        responses={503: {"model": Health}},
        tags=["operations"],
        summary="200 when the online store (Redis) answers a PING, else 503",
    )
    def healthz() -> Response:
        try:
            context.online.redis.ping()
        except redis.RedisError as exc:
            return JSONBody({"status": "unavailable", "redis": str(exc) or type(exc).__name__}, 503)
        return JSONBody({"status": "ok", "redis": "ok"})

    @app.get("/metrics", response_class=Response, tags=["operations"], summary="Prometheus metrics")
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
