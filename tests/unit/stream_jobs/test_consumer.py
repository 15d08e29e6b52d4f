"""The worker's Faust consumer: the fetch wait Faust fixes at 1.5 s is ours to set."""

from __future__ import annotations

import asyncio

import faust

from featurestream.stream_jobs.app import _consumer_class


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
