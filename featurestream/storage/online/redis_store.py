"""The online store in Redis: one hash per (feature view version, entity).

Layout (docs/storage.md has the full spec)::

    key    fs:{project}:{view}:v{version}:{entity}
    fields w                  write token: new random bytes at every write of the hash
           {p}:h              header of partition p's sub-state (head start, horizons, raw head events)
           {p}:t:{size}:{start} one tile row of partition p's sub-state
           {p}:o              "{last applied offset}:{newest event time ms}" of partition p

Each source partition owns its own sub-state, so workers that share a consumer group never
write the same fields; a read merges the sub-states. The offset field is written in the same
HSET as the state it describes, so a replayed event (offset <= the stored one) is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import redis

from featurestream.aggregation.state import StateLayoutError, ViewState
from featurestream.aggregation.view import ViewAggregator
from featurestream.aggregation.windows import TileKey
from featurestream.generations import Generations

EntityKey = tuple[Any, ...]


def entity_part(key: EntityKey) -> str:
    """``u1`` for one join key; a JSON list for several (unambiguous, still readable)."""
    return str(key[0]) if len(key) == 1 else json.dumps(list(key), separators=(",", ":"))


def redis_key(project: str, view: str, version: int, key: EntityKey) -> str:
    return f"fs:{project}:{view}:v{version}:{entity_part(key)}"


def updates_channel(project: str, view: str, version: int) -> str:
    """Pub/sub channel announcing which entities of a view version a batch changed
    (one message per batch: the entity parts, newline-separated)."""
    return f"fs:{project}:updates:{view}:v{version}"


@dataclass(slots=True)
class PartitionState:
    """One source partition's share of an entity's state, with what was applied to it."""

    state: ViewState
    offset: int = -1
    newest_ms: int | None = None


@dataclass(slots=True)
class EntityWrite:
    """What one batch changed in one partition sub-state of one entity."""

    key: EntityKey
    partition: int
    sub: PartitionState
    touched: set[TileKey] = field(default_factory=set)
    removed: list[TileKey] = field(default_factory=list)
    header_changed: bool = True


WRITE_TOKEN = b"w"
"""Hash field rewritten with a fresh random token by every write of the hash (in the same HSET
as the state it changes), so a reader holding the token knows the hash is unchanged."""


def new_write_token() -> bytes:
    return os.urandom(8).hex().encode()


def _pack_args(args: Sequence[bytes]) -> bytes:
    """One command in the Redis protocol (RESP); ``hiredis.pack_command`` does the same in C."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


try:
    from hiredis import pack_command as _hiredis_pack

    def _pack(args: Sequence[bytes]) -> bytes:
        return _hiredis_pack(tuple(args))  # type: ignore[arg-type,no-any-return]
except ImportError:  # redis-py without hiredis
    _pack = _pack_args


def round_trip(client: redis.Redis, commands: Sequence[bytes]) -> list[Any]:
    """Send commands packed in the Redis protocol in one write and read every reply; an error
    reply comes back as a ``redis.ResponseError`` in the list."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command([b"".join(commands)])  # type: ignore[no-untyped-call]
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as exc:
                replies.append(exc)
        return replies
    except BaseException:
        conn.disconnect()  # type: ignore[no-untyped-call]  # its replies are out of step now
        raise
    finally:
        pool.release(conn)


READ_SCRIPT = b"""local token = redis.call('HGET', KEYS[1], 'w')
if token and token == ARGV[1] then return 1 end
return redis.call('HGETALL', KEYS[1])"""
"""Read a hash unless the reader holds its current write token (then the reply is 1)."""
READ_SCRIPT_SHA = hashlib.sha1(READ_SCRIPT).hexdigest().encode()


def read_command(key: bytes, token: bytes | None) -> bytes:
    """The command reading one entity hash: the whole hash, or 1 if ``token`` is still current."""
    if token is None:
        return _pack((b"HGETALL", key))
    return _pack((b"EVALSHA", READ_SCRIPT_SHA, b"1", key, token))


def hash_fields(reply: dict[bytes, bytes] | list[bytes]) -> dict[bytes, bytes]:
    """A hash read as a dict: HGETALL answers a map under RESP3, the script a flat
    [field, value, ...] list."""
    if isinstance(reply, dict):
        return reply
    it = iter(reply)
    return dict(zip(it, it, strict=True))


@dataclass(slots=True)
class PreparedWrite:
    """Commands encoded by ``RedisOnlineStore.prepare``, in the Redis protocol, not yet sent."""

    commands: list[bytes] = field(default_factory=list)


def _tile_field(partition: int, tile: TileKey) -> bytes:
    return b"%d:t:%d:%d" % (partition, tile.size_ms, tile.start_ms)


_HEADER, _OFFSET, _TILE, _OTHER = 0, 1, 2, 3
_FIELD_NAMES: Generations[bytes, tuple[int, int, TileKey | None]] = Generations(100_000)


def _field_name(name: bytes) -> tuple[int, int, TileKey | None]:
    """(partition, what, tile key) of a hash field name; memoised, since every entity's hash
    uses the same few hundred names (tile starts are on a shared grid)."""
    parsed = _FIELD_NAMES.get(name)
    if parsed is None:
        partition_text, _, rest = name.partition(b":")
        if not partition_text.isdigit():  # the write token, or a newer writer's field
            return (-1, _OTHER, None)
        partition = int(partition_text)
        if rest == b"h":
            parsed = (partition, _HEADER, None)
        elif rest == b"o":
            parsed = (partition, _OFFSET, None)
        elif rest.startswith(b"t:"):
            size, _, start = rest[2:].partition(b":")
            parsed = (partition, _TILE, TileKey(int(size), int(start)))
        else:  # not ours to read (a newer writer's field, say)
            parsed = (partition, _OTHER, None)
        _FIELD_NAMES.put(name, parsed)
    return parsed


def parse_fields(
    agg: ViewAggregator, fields: dict[bytes, bytes], *, shared_rows: bool = False
) -> dict[int, PartitionState]:
    """A hash's fields -> the sub-state of each partition (``shared_rows``: for readers, see
    ``ViewAggregator.decode_parts``)."""
    headers: dict[int, bytes] = {}
    tiles: dict[int, list[tuple[TileKey, bytes]]] = {}
    offsets: dict[int, tuple[int, int | None]] = {}
    for name, value in fields.items():
        partition, what, tile = _field_name(name)
        if what == _TILE:
            held = tiles.get(partition)
            if held is None:
                held = tiles[partition] = []
            held.append((tile, value))  # type: ignore[arg-type]
        elif what == _HEADER:
            headers[partition] = value
        elif what == _OFFSET:
            offset_text, _, newest_text = value.partition(b":")
            offsets[partition] = (int(offset_text), int(newest_text) if newest_text else None)
    out: dict[int, PartitionState] = {}
    for partition, header in headers.items():
        state = agg.decode_parts(header, tiles.get(partition, ()), shared_rows=shared_rows)
        applied, newest = offsets.get(partition, (-1, None))
        out[partition] = PartitionState(state, applied, newest)
    return out


class RedisOnlineStore:
    """Reads and writes the per-entity aggregation state of feature view versions."""

    def __init__(self, url: str, project: str, *, socket_timeout: float = 1.0) -> None:
        self.project = project
        self.client = redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)

    def key(self, view: str, version: int, entity: EntityKey) -> str:
        return redis_key(self.project, view, version, entity)

    def load(
        self, view: str, version: int, agg: ViewAggregator, entities: Sequence[EntityKey]
    ) -> list[dict[int, PartitionState] | None]:
        """The sub-states of each entity, in one round trip; None for an entity whose state was
        written for another layout of the view (a feature added since): rebuild it."""
        pipe = self.client.pipeline(transaction=False)
        for entity in entities:
            pipe.hgetall(self.key(view, version, entity))
        out: list[dict[int, PartitionState] | None] = []
        for fields in pipe.execute():
            try:
                out.append(parse_fields(agg, fields))
            except StateLayoutError:
                out.append(None)
        return out

    def write(
        self, view: str, version: int, agg: ViewAggregator, writes: Iterable[EntityWrite], ttl: timedelta | None
    ) -> None:
        """All changes of a batch in one pipelined round trip; one atomic HSET per entity."""
        pipe = self.pipeline()
        self.prepare(pipe, view, version, agg, writes, ttl)
        self.execute(pipe)

    def pipeline(self) -> PreparedWrite:
        """An empty batch of commands for ``prepare`` (several views may share one), then ``execute``."""
        return PreparedWrite()

    def prepare(
        self, batch: PreparedWrite, view: str, version: int, agg: ViewAggregator, writes: Iterable[EntityWrite],
        ttl: timedelta | None,
    ) -> int:
        """Encode ``write``'s commands into ``batch`` without sending them (encoding is the costly
        part, so a caller can do it while it waits for something else); returns the entities queued."""
        ttl_ms = b"%d" % int(ttl.total_seconds() * 1000) if ttl is not None else None
        prefix = f"fs:{self.project}:{view}:v{version}:"
        token = new_write_token()
        encode_header, encode_tile = agg.encode_header, agg.encode_tile
        out = batch.commands
        add = out.append
        changed: list[str] = []
        for w in writes:
            part = entity_part(w.key)
            key = (prefix + part).encode()
            p = w.partition
            sub = w.sub
            args: list[bytes] = [
                b"HSET", key, WRITE_TOKEN, token,
                b"%d:o" % p, b"%d:%d" % (sub.offset, sub.newest_ms if sub.newest_ms is not None else 0),
            ]
            if w.header_changed:
                args += (b"%d:h" % p, encode_header(sub.state))
            removed = w.removed
            for tile in w.touched:
                if not removed or tile not in removed:
                    args += (b"%d:t:%d:%d" % (p, tile.size_ms, tile.start_ms), encode_tile(sub.state, tile))
            add(_pack(args))
            if removed:
                add(_pack([b"HDEL", key, *[_tile_field(p, tile) for tile in removed]]))
            if ttl_ms is not None:
                add(_pack([b"PEXPIRE", key, ttl_ms]))
            changed.append(part)
        if changed:
            add(_pack([b"PUBLISH", updates_channel(self.project, view, version).encode(), "\n".join(changed).encode()]))
        return len(changed)

    def execute(self, batch: PreparedWrite) -> None:
        """Send a prepared batch in one write and read its replies (one round trip)."""
        if not batch.commands:
            return
        for reply in round_trip(self.client, batch.commands):
            if isinstance(reply, redis.ResponseError):  # every reply was read: report the first error
                raise reply

    def replace(
        self, view: str, version: int, agg: ViewAggregator, entity: EntityKey, subs: dict[int, PartitionState],
        ttl: timedelta | None,
    ) -> None:
        """Rewrite an entity's whole hash (materialize from history)."""
        key = self.key(view, version, entity)
        mapping: dict[bytes, bytes] = {WRITE_TOKEN: new_write_token()}
        for p, sub in subs.items():
            mapping[b"%d:o" % p] = b"%d:%d" % (sub.offset, sub.newest_ms or 0)
            mapping[b"%d:h" % p] = agg.encode_header(sub.state)
            for tile in agg.tile_keys(sub.state):
                mapping[_tile_field(p, tile)] = agg.encode_tile(sub.state, tile)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(key)
        if subs:
            pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
            if ttl is not None:
                pipe.pexpire(key, int(ttl.total_seconds() * 1000))
        pipe.execute()

    def close(self) -> None:
        self.client.close()


def merged_state(agg: ViewAggregator, subs: dict[int, PartitionState]) -> tuple[ViewState, int | None]:
    """One state from an entity's partition sub-states, and its newest event time."""
    parts = list(subs.values())
    if not parts:
        return agg.new_state(), None
    state = agg.decode_state(agg.encode_state(parts[0].state)) if len(parts) > 1 else parts[0].state
    for sub in parts[1:]:
        agg.merge(state, sub.state)
    newest = max((s.newest_ms for s in parts if s.newest_ms is not None), default=None)
    return state, newest
