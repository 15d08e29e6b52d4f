"""A bare Faust agent that only counts events: the framework's ceiling for ``featurestream worker``.

Same Faust settings as the worker (raw serializers, memory store, no topic declaration, the
same ``take_events`` batching), no processing, and Faust's own consumer; ``--worker-tuning``:
the worker's tuning of Faust instead (``tune_faust``: its consumer's fetch wait, messages handed
to the stream without Faust's per-message tasks when the stream has room, no per-message
statistics in Faust's monitor; ``source_topic``: raw events made without serializer lookups).
Run as a script by ``bench/ingest.py``:

    python bench/_faust_bare.py BOOTSTRAP TOPIC PARTITIONS EXPECTED BATCH WITHIN OUT.json [--per-event] [--worker-tuning]

Writes ``{"count", "first_s", "first_batch", "last_s", "first_cpu", "last_cpu"}`` (wall-clock and
process CPU seconds) to OUT.json once EXPECTED events have arrived, then exits.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any

import faust


def main() -> None:
    bootstrap, topic_name, partitions, expected, batch, within, out = sys.argv[1:8]
    per_event = "--per-event" in sys.argv[8:]
    app = faust.App(
        f"bench-faust-bare-{uuid.uuid4().hex[:8]}",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        value_serializer="raw",
        key_serializer="raw",
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=2.0,
        broker_heartbeat_interval=0.5,
        topic_allow_declare=False,
        topic_disable_leader=True,
        web_enabled=False,
    )
    if "--worker-tuning" in sys.argv[8:]:
        from featurestream.stream_jobs.app import WorkerSettings, source_topic, tune_faust

        tune_faust(app, WorkerSettings.fetch_max_wait_ms)  # the worker's default
        topic = source_topic(app, topic_name, int(partitions))
    else:
        topic = app.topic(topic_name, value_type=bytes, key_type=bytes, partitions=int(partitions))
    want = int(expected)
    seen: dict[str, Any] = {"count": 0, "first_s": None, "first_batch": 0, "last_s": None,
                            "first_cpu": None, "last_cpu": None}

    def note(n: int) -> None:
        now, cpu = time.time(), time.process_time()
        if seen["first_s"] is None:
            seen["first_s"], seen["first_batch"], seen["first_cpu"] = now, n, cpu
        seen["count"] += n
        seen["last_s"], seen["last_cpu"] = now, cpu
        if seen["count"] >= want:
            with open(out, "w") as fh:
                json.dump(seen, fh)
            os._exit(0)  # no orderly shutdown: it is not what is measured

    async def count(stream: faust.StreamT[bytes]) -> None:
        if per_event:
            async for _ in stream:
                note(1)
        else:
            async for events in stream.take_events(int(batch), within=float(within)):  # type: ignore[attr-defined]
                note(len(events))

    app.agent(topic, name="bench.count")(count)
    faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
