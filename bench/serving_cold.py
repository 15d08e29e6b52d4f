"""What a lookup costs when the read memo cannot help: entities never read before, and the first
read after the clock moves on by a minute.

    python bench/serving_cold.py [--events N] [--users N] [--entities 100] [--steps 5] [--json PATH]

State: ``--events`` demo transactions over the last day through the real ``SourceProcessor``
into Redis (database 5 of the machine's server unless FEATURESTREAM_REDIS_URL is set), as
``bench/serving.py`` loads it. Then, in this process, ``OnlineService`` (read memo on, the
default) with its clock under the benchmark's control, 1 call = ``--entities`` users (the most
active first, as the traffic picks them) x the 50 features of ``user_spending_profile`` of the
``100x50`` case:

- from scratch: the call on a service with the memo off (every hash decoded, every window
  evaluated: what entities never read before cost), best of 5;
- first: the first call for these users on the memo-on service (the same work, plus filling
  the memo);
- warm: the same call again at the same instant (best of 5);
- after each of ``--steps`` one-minute steps of the clock: the first call (what a minute
  boundary costs: every entity whose windows lost a tile evaluates again).

Figures are CPU milliseconds of this thread (``time.thread_time``), so other work on the
machine does not inflate them; the Redis round trip is in them only as the client's CPU.
A call for other users runs first, so one-time costs (imports, first allocations) are not
charged to the first call.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from serving import case_features
from serving_data import apply_definitions, load, log, sample_users, start_services

from featurestream.registry import Registry
from featurestream.serving.service import OnlineService


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--users", type=int, default=3_000)
    parser.add_argument("--entities", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--redis-db", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    services = start_services(args.redis_db)
    project = f"servecold{int(time.time())}"
    try:
        versions = apply_definitions(services, project)
        data = load(services, project, versions, args.events, args.users, args.seed)
        by_traffic = list(dict.fromkeys(sample_users(data, "traffic", 20_000, args.seed)))
        users, others = by_traffic[: args.entities], by_traffic[args.entities : 2 * args.entities]
        snapshot = Registry(services.postgres_url).snapshot(project)
        _, names = case_features()["100x50"]
        clock = [int(time.time() * 1000)]
        service = OnlineService(lambda: snapshot, services.redis_url, clock_ms=lambda: clock[0])
        request = [{"user_id": u} for u in users]

        def cpu_ms(on: OnlineService = service) -> float:
            started = time.thread_time()
            on.get_online(request, names)
            return (time.thread_time() - started) * 1000

        service.get_online([{"user_id": u} for u in others], names)
        scratch_service = OnlineService(lambda: snapshot, services.redis_url, clock_ms=lambda: clock[0], memo_entries=0)
        scratch = min(cpu_ms(scratch_service) for _ in range(5))
        scratch_service.close()
        cold = cpu_ms()
        warm = min(cpu_ms() for _ in range(5))
        steps = []
        for _ in range(args.steps):
            clock[0] += 60_000
            steps.append(cpu_ms())
        service.close()
        print(f"{len(users)} x {len(names)} lookup, CPU ms: from scratch {scratch:.1f}, first {cold:.1f}, warm {warm:.2f}, first call after each "
              f"one-minute step: {', '.join(f'{s:.1f}' for s in steps)}", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"entities": len(users), "features": len(names), "scratch_ms": scratch, "first_ms": cold,
                                             "warm_ms": warm, "minute_steps_ms": steps}, indent=2) + "\n")
            log(f"wrote {args.json}")
    finally:
        services.close()


if __name__ == "__main__":
    main()
