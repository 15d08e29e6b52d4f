"""The worker's tuning of Faust: our fetch wait, messages handed to the streams without per-message tasks, no per-message statistics."""

from __future__ import annotations

import asyncio
import inspect

import faust
from faust.types import TP, Message

from featurestream.stream_jobs.app import QuietMonitor, _consumer_class, source_topic, tune_faust


def test_the_consumer_fetch_wait_is_the_configured_one() -> None:
    async def created() -> tuple[int, int]:
        waits = []
        for consumer_class in (None, _consumer_class(123)):
            app = faust.App("featurestream-test-fetch", broker="kafka://127.0.0.1:1", store="memory://", web_enabled=False)
            if consumer_class is not None:
                app.transport.Consumer = consumer_class
            consumer = app.consumer._thread._create_worker_consumer(app.transport)  # not started: no connection
            waits.append(consumer._fetch_max_wait_ms)
            await consumer.stop()
        return waits[0], waits[1]

    faust_default, ours = asyncio.run(created())
    assert faust_default == 1500 and ours == 123


# ------------------------------------------------------------------ handing messages to the streams


def _consumer(app_name: str) -> faust.types.ConsumerT:
    app = faust.App(app_name, broker="kafka://127.0.0.1:1", store="memory://", web_enabled=False)
    app.transport.Consumer = _consumer_class(100)
    return app.consumer  # not started: no connection


def test_a_callback_that_does_not_wait_runs_inline_and_its_suspend_wait_is_closed() -> None:
    async def scenario() -> tuple[list[str], object, str]:
        consumer = _consumer("featurestream-test-inline")
        steps: list[str] = []

        async def callback() -> str:
            steps.append("ran")
            return "put"

        suspend_wait = consumer.suspend_flow.wait()
        result = await consumer.wait_first(callback(), suspend_wait)
        return steps, result, inspect.getcoroutinestate(suspend_wait)

    steps, result, state = asyncio.run(scenario())
    assert steps == ["ran"]
    assert result.results == ["put"] and not result.stopped
    assert state == inspect.CORO_CLOSED  # closed, not left to warn "never awaited"


def test_a_callback_that_waits_resumes_where_it_stopped() -> None:
    async def scenario() -> tuple[list[str], list[object]]:
        consumer = _consumer("featurestream-test-waits")
        room: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        steps: list[str] = []

        async def callback() -> str:
            steps.append("before")
            got = await room  # a full stream buffer
            steps.append(f"after {got}")
            await asyncio.sleep(0)  # a bare yield on the way
            return "put"

        asyncio.get_running_loop().call_later(0.01, room.set_result, 7)
        result = await consumer.wait_first(callback(), consumer.suspend_flow.wait())
        return steps, result.results

    steps, results = asyncio.run(scenario())
    assert steps == ["before", "after 7"]
    assert results == ["put"]


def test_a_waiting_callback_is_cancelled_when_the_flow_is_suspended() -> None:
    async def scenario() -> tuple[list[str], list[object]]:
        consumer = _consumer("featurestream-test-suspend")
        steps: list[str] = []

        async def callback() -> str:
            try:
                await asyncio.Event().wait()  # a buffer that never drains
            except asyncio.CancelledError:
                steps.append("cancelled inside")
                raise
            return "put"

        asyncio.get_running_loop().call_later(0.01, consumer.suspend_flow.set)  # a rebalance
        result = await consumer.wait_first(callback(), consumer.suspend_flow.wait())
        await asyncio.sleep(0)  # the cancellation reaches the callback
        return steps, result.results

    steps, results = asyncio.run(scenario())
    assert results == [True]  # the suspend wait won, as in Faust's own wait_first
    assert steps == ["cancelled inside"]


def test_a_failing_callback_raises_and_a_suspended_flow_takes_fausts_way() -> None:
    async def scenario() -> tuple[str, list[object]]:
        consumer = _consumer("featurestream-test-fails")

        async def failing() -> None:
            raise ValueError("bad message")

        try:
            await consumer.wait_first(failing(), consumer.suspend_flow.wait())
        except ValueError as exc:
            error = str(exc)
        consumer.suspend_flow.set()

        async def callback() -> str:
            return "put"

        result = await consumer.wait_first(callback(), consumer.suspend_flow.wait())
        return error, sorted(map(str, result.results))

    error, results = asyncio.run(scenario())
    assert error == "bad message"
    assert results == ["True", "put"]  # Faust's wait_first: both had finished


def test_the_tuned_app_keeps_no_per_message_statistics_but_tracks_commits() -> None:
    app = faust.App("featurestream-test-monitor", broker="kafka://127.0.0.1:1", store="memory://", web_enabled=False)
    tune_faust(app, 100)
    monitor = app.monitor
    assert isinstance(monitor, QuietMonitor)
    tp = TP("transactions", 0)
    monitor.on_message_in(tp, 5, None)
    assert monitor.messages_received_total == 0 and monitor.events_total == 0
    monitor.on_tp_commit({tp: 5})
    assert monitor.tp_committed_offsets[tp] == 5


def test_a_source_topic_makes_the_events_fausts_raw_codec_makes() -> None:
    async def decoded() -> list[tuple[object, object, object]]:
        app = faust.App("featurestream-test-raw", broker="kafka://127.0.0.1:1", store="memory://", web_enabled=False)
        ours = source_topic(app, "transactions", 4)
        fausts = app.topic("transactions", value_type=bytes, key_type=bytes, value_serializer="raw", key_serializer="raw")
        out = []
        for key, value in ((b"u_1", b'{"amount": 3}'), (None, b"\xff\x00 not json"), (b"k", None)):
            message = Message("transactions", 2, 17, 1_700_000_000.0, 0, [("h", b"1")], key, value, None)
            for topic in (ours, fausts):
                event = await topic.decode(message, propagate=True)
                out.append((event.key, event.value, event.message is message))
        return out

    got = asyncio.run(decoded())
    assert got[0::2] == got[1::2]  # ours, then Faust's, for each message
    assert got[0] == (b"u_1", b'{"amount": 3}', True) and got[4] == (b"k", None, True)
