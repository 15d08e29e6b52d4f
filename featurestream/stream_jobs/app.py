"""The Faust application of ``featurestream worker``: one agent per source topic.

Faust gives consumer groups, batching (``take_events``) and acknowledgement; correctness on
replay comes from our sinks (``processor.py``), not from Faust's exactly-once mode or table
changelogs (neither is trusted on the dev broker, see ENVIRONMENT.md).

The batches are folded and stored by the ``SourceProcessor``s in a child process of their own
(``Processors``), so Faust's per-event work on this process and the processing of the previous
batch run on two cores at once. A batch's messages are acknowledged (and so committed) only
once the child has stored it: Faust acks a batch when the agent asks for the next one, so each
message holds one more reference until then.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

import faust
from faust.sensors import Monitor
from faust.types import TP
from mode.services import WaitResults

from featurestream.config import featurestream_home
from featurestream.definitions.models import FeatureView, ProjectDefinition, Source
from featurestream.gc_tuning import settle
from featurestream.storage.offline.postgres import PostgresOfflineStore
from featurestream.storage.online.redis_store import RedisOnlineStore
from featurestream.stream_jobs import metrics
from featurestream.stream_jobs.processor import BatchResult, Record, SourceProcessor, ViewRuntime

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerSettings:
    kafka_bootstrap: str
    redis_url: str
    postgres_url: str
    batch_size: int = 2000
    batch_within_s: float = 0.05
    session_timeout_s: float = 30.0
    heartbeat_interval_s: float = 3.0
    write_history: bool = True
    group_id: str | None = None
    fetch_max_wait_ms: int = 100
    child_process: bool = True
    """Process the batches in a child process (a second core); off: on a thread of this one."""


def tune_faust(app: faust.App, fetch_max_wait_ms: int) -> None:
    """The worker's Faust, before it starts: our consumer (``_consumer_class``) and a monitor
    that skips Faust's per-message statistics (the worker exports its own metrics)."""
    app.transport.Consumer = _consumer_class(fetch_max_wait_ms)  # type: ignore[misc]  # this app's only
    app.conf.Monitor = QuietMonitor  # type: ignore[assignment]  # faust types the setting loosely


class RawSchema(faust.Schema):  # type: ignore[type-arg]  # bytes keys and values
    """Keys and values as the broker's bytes, made into events without Faust's serializer
    lookups (the same events its ``raw`` codec gives, for less per message)."""

    def __init__(self) -> None:
        super().__init__(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    def compile(self, app: Any, **_: Any) -> Any:
        create_event = app.create_event

        async def decode(message: Any, *, propagate: bool = False) -> Any:
            return create_event(message.key, message.value, message.headers, message)

        return decode


def source_topic(app: faust.App, name: str, partitions: int | None) -> Any:
    """A source topic of raw events, as the worker reads it."""
    return app.topic(name, schema=RawSchema(), partitions=partitions)


class QuietMonitor(Monitor):
    """Faust's monitor without its four per-message hooks (counters and timings per message
    and stream event, no reader here); commits, offsets and sends are still tracked."""

    def on_message_in(self, tp: TP, offset: int, message: Any) -> None:
        return None

    def on_stream_event_in(self, tp: TP, offset: int, stream: Any, event: Any) -> dict[str, Any] | None:
        return None

    def on_stream_event_out(self, tp: TP, offset: int, stream: Any, event: Any, state: dict[str, Any] | None = None) -> None:
        return None

    def on_message_out(self, tp: TP, offset: int, message: Any) -> None:
        return None


def _consumer_class(fetch_max_wait_ms: int) -> type[Any]:
    """Faust's aiokafka consumer with our fetch wait. Faust fixes ``fetch_max_wait_ms`` at 1.5 s;
    a broker that holds a fetch for that long when some partitions have nothing (tansu does)
    delays fresh events by up to as much: measured here, freshness p99 at 2,000 events/s went
    from 1,088 ms to 389 ms with 100 ms."""
    from faust.transport.drivers import aiokafka as driver

    class ConsumerThread(driver.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            consumer._fetch_max_wait_ms = fetch_max_wait_ms  # read when the consumer starts
            return consumer

    class Consumer(InlineFirstStep, driver.Consumer):
        def _new_consumer_thread(self) -> Any:
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    return Consumer


class InlineFirstStep:
    """For a ``mode.Service`` with a ``suspend_flow`` event (Faust's consumer)."""

    suspend_flow: Any  # events of asyncio or of mode
    _stopped: Any
    _crashed: Any

    async def wait_first(self, *coros: Any, timeout: Any = None) -> Any:
        """Faust hands each message to the streams as ``wait_first(callback(message),
        suspend_flow.wait())``: four tasks, a wait and three cancellations per message, a
        third of this process's CPU. Nearly always the callback finishes without waiting
        (the stream's buffer has room): step it once here, and fall back to Faust's way,
        from where it stopped, only when it waits or when the flow is suspended."""
        first = coros[0] if coros else None
        if (timeout is not None or len(coros) != 2 or not inspect.iscoroutine(first)
                or self.suspend_flow.is_set() or self._stopped.is_set() or self._crashed.is_set()):
            return await super().wait_first(*coros, timeout=timeout)  # type: ignore[misc]  # the Service's
        try:
            waiting_on = first.send(None)
        except BaseException as exc:
            if inspect.iscoroutine(coros[1]):
                coros[1].close()  # the suspend_flow.wait() is not needed
            if isinstance(exc, StopIteration):
                return WaitResults([first], [exc.value], False)
            raise
        return await super().wait_first(_Started(first, waiting_on), coros[1])  # type: ignore[misc]


class _Started:
    """A coroutine stepped once by hand, to be awaited from where it stopped: what it waits on
    goes up to the awaiting task first, then it is resumed (or has the task's error thrown in)."""

    def __init__(self, coro: Any, waiting_on: Any) -> None:
        self.coro, self.waiting_on = coro, waiting_on

    def __await__(self) -> Any:
        waiting_on = self.waiting_on
        while True:
            try:
                sent = yield waiting_on
            except BaseException as exc:  # cancellation included: it goes in
                try:
                    waiting_on = self.coro.throw(exc)
                except StopIteration as finished:
                    return finished.value
            else:
                try:
                    waiting_on = self.coro.send(sent)
                except StopIteration as finished:
                    return finished.value


def build_runtimes(
    definition: ProjectDefinition, live: Sequence[tuple[FeatureView, int]]
) -> dict[str, list[ViewRuntime]]:
    """Live view versions (each with its own spec) grouped by source name."""
    by_source: dict[str, list[ViewRuntime]] = {}
    for view, version in live:
        entity = definition.entity(view.entity)
        source = definition.source(view.source)
        if entity is None or source is None:
            raise ValueError(f"feature view {view.name}@{version}: its entity or source is not in the project")
        by_source.setdefault(source.name, []).append(ViewRuntime.build(view, version, entity, source))
    return by_source


# ------------------------------------------------------------------ the processors' side

_processors: dict[str, SourceProcessor] = {}
"""The executor's process (or thread) holds the worker's processors, by source name."""


def _die_with_parent() -> None:
    """A child whose worker is killed (kill -9 included) dies at once, so no batch of the old
    worker is still being written when a new one starts."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the call above
        os._exit(1)


def _start_processors(
    definition: ProjectDefinition, live: list[tuple[FeatureView, int]], settings: WorkerSettings, in_child: bool
) -> None:
    if in_child:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the worker, which stops this process
    project = definition.project.name
    for processor in _processors.values():
        processor.close()
    _processors.clear()
    for source_name, views in build_runtimes(definition, live).items():
        source = definition.source(source_name)
        assert source is not None  # build_runtimes checked
        _processors[source_name] = SourceProcessor(
            source,
            views,
            RedisOnlineStore(settings.redis_url, project),
            PostgresOfflineStore(settings.postgres_url),
            write_history=settings.write_history,
        )


def _ready() -> int:
    return os.getpid()


def _process(source_name: str, rows: list[tuple[int, int, int, bytes | None]]) -> BatchResult:
    try:
        return _processors[source_name].process([Record(*row) for row in rows])
    finally:
        settle()  # the entity states outlive the batch: keep full collections off them


def _recover(source_name: str) -> None:
    _processors[source_name].recover()


def _forget_partitions(source_name: str, partitions: set[int]) -> None:
    _processors[source_name].cache.forget_partitions(partitions)


class Processors:
    """The worker's ``SourceProcessor``s behind one executor of one worker: calls run one at a
    time in submission order, which keeps each source's batches in order. A child process that
    dies is replaced (its successor reloads states from Redis, as after ``recover``)."""

    def __init__(self, definition: ProjectDefinition, runtimes: dict[str, list[ViewRuntime]], settings: WorkerSettings) -> None:
        live = [(r.view, r.version) for views in runtimes.values() for r in views]
        self._init_args = (definition, live, settings, settings.child_process)
        self._executor = self._start()
        self._replacing = asyncio.Lock()

    def _start(self) -> Executor:
        child = self._init_args[-1]
        executor: Executor
        if child:
            executor = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), _start_processors, self._init_args)
        else:
            executor = ThreadPoolExecutor(1, "featurestream-sink", _start_processors, self._init_args)
        pid = executor.submit(_ready).result()  # builds the processors now: their errors surface at startup
        if child:
            log.info("batches are processed by child process %d", pid)
        return executor

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        executor = self._executor
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except BrokenProcessPool:
            await self._replace(executor)
            raise

    async def _replace(self, broken: Executor) -> None:
        """A new child for a dead one, started on a thread: a start takes 1-2 s (spawn, imports,
        building the processors) that the event loop spends on heartbeats and fetching."""
        async with self._replacing:  # calls failing together start one successor
            if broken is not self._executor:
                return
            log.error("the processing child process died; starting another")
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = await asyncio.get_running_loop().run_in_executor(None, self._start)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------ the Faust side


def build_app(
    definition: ProjectDefinition,
    runtimes: dict[str, list[ViewRuntime]],
    settings: WorkerSettings,
) -> faust.App:
    project = definition.project.name
    app_id = settings.group_id or f"featurestream-{project}"
    datadir = featurestream_home() / "worker" / app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        # Faust keeps a data directory even with in-memory tables: not in the working directory.
        datadir=str(datadir),
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        value_serializer="raw",
        key_serializer="raw",
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        topic_allow_declare=False,
        topic_disable_leader=True,
        web_enabled=False,
    )
    tune_faust(app, settings.fetch_max_wait_ms)
    processors = Processors(definition, runtimes, settings)
    sources: list[Source] = []
    for source_name in runtimes:
        source = definition.source(source_name)
        if source is None:
            raise ValueError(f"source {source_name!r} is not in the project")
        sources.append(source)
        _add_agent(app, source, processors, settings)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # faust's signal typing is narrower than its use
    async def _forget(sender: Any, revoked: set[TP], **_: Any) -> None:
        for source in sources:
            await processors.call(_forget_partitions, source.name, {tp.partition for tp in revoked if tp.topic == source.topic})

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _report(sender: Any, assigned: set[TP], **_: Any) -> None:
        for source in sources:
            mine = sorted(tp.partition for tp in assigned if tp.topic == source.topic)
            log.info("assigned %s partitions %s", source.topic, ",".join(map(str, mine)) or "none")

    @app.on_before_shutdown.connect  # type: ignore[arg-type]  # sent once the consumer has stopped
    async def _close(sender: Any, **_: Any) -> None:
        await asyncio.to_thread(processors.close)

    return app


def _add_agent(app: faust.App, source: Source, processors: Processors, settings: WorkerSettings) -> None:
    topic = source_topic(app, source.topic, source.partitions)
    dead_letters = app.topic(source.dlq_topic, value_type=bytes, key_type=bytes)
    labels = {"source": source.name}
    message_out = app.sensors.on_message_out

    async def apply(events: list[Any]) -> None:
        rows = [(m.partition, m.offset, int(m.timestamp * 1000), m.value) for m in (e.message for e in events)]
        with metrics.BATCH_SECONDS.labels(**labels).time():
            result = await _process_until_done(processors, source.name, rows)
            for dead in result.dead_letters:
                await dead_letters.send(
                    key=None,
                    value=dead.record.value or b"",
                    headers={
                        "featurestream-reason": dead.reason.encode(),
                        "featurestream-topic": source.topic.encode(),
                        "featurestream-partition": str(dead.record.partition).encode(),
                        "featurestream-offset": str(dead.record.offset).encode(),
                    },
                )
                metrics.DEAD_LETTERS.labels(source=source.name, reason=metrics.reason_class(dead.reason)).inc()
            if result.dead_letters:
                await app.producer.flush()
        for event in events:  # the batch is stored: its offsets may be committed
            if event.ack():
                message_out(event.message.tp, event.message.offset, event.message)
        if settings.child_process:  # on a thread, ``_process`` has settled this process's heap already
            settle()
        metrics.BATCH_SIZE.labels(**labels).observe(len(rows))
        metrics.EVENTS.labels(**labels).inc(result.valid)
        metrics.REPLAYED.labels(**labels).inc(result.replayed)
        metrics.REBUILT.labels(**labels).inc(result.rebuilt)
        for view, count in result.late.items():
            metrics.LATE.labels(view=view).inc(count)
        if result.newest_event_ms is not None:
            metrics.LAG_SECONDS.labels(**labels).set(max(0.0, time.time() - result.newest_event_ms / 1000))

    async def consume(stream: faust.StreamT[bytes]) -> None:
        applying: asyncio.Future[None] | None = None
        try:
            async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):  # type: ignore[attr-defined]
                for event in events:
                    event.message.incref()  # take_events' own ack leaves the message unacked: apply acks it
                if applying is not None:
                    await applying  # batches are applied one after the other, in order
                applying = asyncio.ensure_future(apply(events))
        finally:
            if applying is not None and not applying.done():
                await asyncio.wait({applying}, timeout=settings.session_timeout_s)

    app.agent(topic, name=f"featurestream.source.{source.name}")(consume)


async def _process_until_done(processors: Processors, source_name: str, rows: list[tuple[int, int, int, bytes | None]]) -> BatchResult:
    """Retry a batch until the stores take it: nothing is acknowledged before, and a retry of an
    idempotent batch is harmless. A store that is down (a restart) stalls the stream, not loses it."""
    delay = 0.1
    while True:
        try:
            return await processors.call(_process, source_name, rows)
        except Exception as exc:  # any store failure; the batch itself is valid or dead-lettered
            metrics.SINK_FAILURES.labels(source=source_name).inc()
            log.warning("batch of %d records failed (%s: %s); retrying in %.1fs", len(rows), type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                await processors.call(_recover, source_name)
            except Exception as again:
                log.warning("reconnect failed (%s); retrying", again)
