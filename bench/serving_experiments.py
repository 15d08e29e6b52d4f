"""What the proposed serving fixes would save, measured on the benchmark's state (CPU time).

Prototypes and proxies, run in the benchmark process against the same Redis state:

* cost per entity of ``user_spending_profile``: decode (``parse_fields``) and ``evaluate``, by
  hash size (hash fields ~ tiles);
* decoded-tile reuse: a second read of an entity whose hash changed in 2 fields (header + the
  current tile) decodes only those and reuses the other rows, found by comparing bytes;
* pre-merged window bodies: ``evaluate`` of the same state cut to the 2 newest tiles per group
  (what is left to merge per read if the tiles older than the current one were kept merged per
  window);
* shared IR slots: decoding one 1-minute tile row as stored (24 features: 39 slots, 6 HLL
  sketches) against one row holding each distinct IR once (11 slots, 2 sketches);
* small exact sets instead of per-tile HLL sketches: deserialising a tile's sketch against
  reading the same number of 64-bit hashes, and a day's union of 288 tiles each way.
"""

from __future__ import annotations

import random
import time
from array import array
from collections.abc import Callable
from functools import partial
from typing import Any

import redis


def _cpu_us(fn: Callable[[], Any], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.thread_time_ns()
        fn()
        best = min(best, (time.thread_time_ns() - t) / 1000)
    return best


def _q(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else 0.0


def _parse_reusing(agg: Any, fields: dict[bytes, bytes], cache: dict[bytes, tuple[bytes, Any]]) -> tuple[Any, int]:
    """``parse_fields`` of a one-partition hash, reusing decoded rows whose bytes did not change."""
    header = next(v for n, v in fields.items() if n.endswith(b":h"))
    state = agg.decode_parts(header, ())
    groups = agg.layout.groups
    index = agg.layout.group_index
    decoded = 0
    for name, raw in fields.items():
        _, _, rest = name.partition(b":")
        if not rest.startswith(b"t:"):
            continue
        size, _, start = rest[2:].partition(b":")
        g = index[int(size)]
        held = cache.get(name)
        if held is not None and held[0] == raw:
            row = held[1]
        else:
            row = groups[g].codec.decode_all(raw)
            cache[name] = (raw, row)
            decoded += 1
        state.tiles[g][int(start)] = row
    return state, decoded


def run(postgres_url: str, redis_url: str, project: str, users: list[str], seed: int = 1) -> dict[str, Any]:
    from datasketches import hll_sketch, hll_union

    from featurestream.aggregation.codec import RowCodec
    from featurestream.registry import Registry
    from featurestream.serving.refs import Catalog
    from featurestream.storage.online.redis_store import merged_state, parse_fields

    snapshot = Registry(postgres_url).snapshot(project)
    catalog = Catalog(snapshot)
    served = catalog.views[("user_spending_profile", catalog.latest["user_spending_profile"])]
    agg = served.agg
    client = redis.Redis.from_url(redis_url)
    rng = random.Random(seed)
    sample = sorted({rng.choice(users) for _ in range(400)})
    pipe = client.pipeline(transaction=False)
    for u in sample:
        pipe.hgetall(f"fs:{project}:user_spending_profile:v{served.version}:{u}")
    hashes = [h for h in pipe.execute() if h]
    client.close()
    now_ms = int(time.time() * 1000)
    out: dict[str, Any] = {}

    # 1. cost per entity by size
    rows = []
    for fields in hashes:
        subs = parse_fields(agg, fields)
        state, _ = merged_state(agg, subs)
        rows.append((len(fields), _cpu_us(partial(parse_fields, agg, fields)),
                     _cpu_us(partial(agg.evaluate, state, now_ms))))
    rows.sort()
    heavy = [r for r in rows if r[0] >= 200]
    light = [r for r in rows if r[0] < 30]
    out["per_entity"] = {
        "entities": len(rows),
        "mean_decode_us": sum(r[1] for r in rows) / len(rows),
        "mean_evaluate_us": sum(r[2] for r in rows) / len(rows),
        "heavy(>=200 fields)": {"n": len(heavy), "fields": _q([r[0] for r in heavy], 0.5),
                                "decode_us": _q([r[1] for r in heavy], 0.5), "evaluate_us": _q([r[2] for r in heavy], 0.5)},
        "light(<30 fields)": {"n": len(light), "fields": _q([r[0] for r in light], 0.5),
                              "decode_us": _q([r[1] for r in light], 0.5), "evaluate_us": _q([r[2] for r in light], 0.5)},
        "decode_us_per_field": sum(r[1] for r in rows) / max(1, sum(r[0] for r in rows)),
    }
    if not heavy:
        return out
    big = max(hashes, key=len)

    # 2. decoded-tile reuse (the header and the newest 1-minute tile changed)
    cache: dict[bytes, tuple[bytes, Any]] = {}
    _parse_reusing(agg, big, cache)
    changed = dict(big)
    newest = max((n for n in big if b":t:60000:" in n), default=None)
    for name in (next(n for n in big if n.endswith(b":h")), newest):
        if name is not None:
            changed[name] = bytes(changed[name])  # equal content, new object: compared byte by byte
            cache.pop(name, None)
    reuse_us = _cpu_us(lambda: _parse_reusing(agg, changed, dict(cache)))
    out["reuse"] = {"fields": len(big), "full_decode_us": _cpu_us(lambda: parse_fields(agg, big)),
                    "reuse_decode_us": reuse_us}

    # 3. pre-merged window bodies: evaluate over the 2 newest tiles per group
    state, _ = merged_state(agg, parse_fields(agg, big))
    full_eval = _cpu_us(lambda: agg.evaluate(state, now_ms))
    trimmed = type(state)(state.head_start, list(state.head), [dict(sorted(t.items())[-2:]) for t in state.tiles],
                          list(state.horizon), state.latest)
    out["premerged"] = {"tiles": sum(len(t) for t in state.tiles), "evaluate_us": full_eval,
                        "evaluate_2_tiles_per_group_us": _cpu_us(lambda: agg.evaluate(trimmed, now_ms))}

    # 4. shared IR slots in the 1-minute group
    g = agg.layout.group_index[60_000]
    group = agg.layout.groups[g]
    tile_rows = list(state.tiles[g].values())
    raws = [group.codec.encode(r) for r in tile_rows]
    # one window's members hold every distinct IR of the group (count, sum, mean, min, max, stddev, 2 HLL)
    first = {m.feature.name: (m, o) for m, o in zip(group.members, group.offsets, strict=True)}
    keep = [first[n] for n in first if n.endswith("_5m")]
    slots: list[int] = []
    for m, o in keep:
        if m.agg.kind == "mean":
            continue  # (count, sum) already held by count and sum
        slots.extend(range(o, o + m.agg.width))
    shared = RowCodec("".join(group.slots[i] for i in slots))
    shared_raws = [shared.encode([r[i] for i in slots]) for r in tile_rows]
    out["shared_slots"] = {
        "slots_now": len(group.slots), "sketches_now": group.slots.count("H"),
        "slots_shared": len(shared.codes), "sketches_shared": shared.codes.count("H"),
        "decode_row_us_now": _cpu_us(lambda: [group.codec.decode_all(r) for r in raws]) / len(raws),
        "decode_row_us_shared": _cpu_us(lambda: [shared.decode_all(r) for r in shared_raws]) / len(raws),
    }

    # 5. exact small sets instead of per-tile sketches (5-minute group, merchants)
    g5 = agg.layout.group_index[300_000]
    group5 = agg.layout.groups[g5]
    h = group5.slots.index("H")
    sketches = [r[h] for r in state.tiles[g5].values() if r[h] is not None]
    blobs = [bytes(s.serialize_compact()) for s in sketches]
    sizes = [max(1, round(s.get_estimate())) for s in sketches]
    hashed = [array("q", [rng.getrandbits(63) for _ in range(n)]).tobytes() for n in sizes]

    def union_sketches() -> int:
        u = hll_union(12)
        for b in blobs:
            u.update(hll_sketch.deserialize(b))
        estimate: float = u.get_result().get_estimate()
        return round(estimate)

    def union_sets() -> int:
        seen: set[int] = set()
        for b in hashed:
            a = array("q")
            a.frombytes(b)
            seen.update(a)
        return len(seen)

    out["small_sets"] = {
        "tiles": len(blobs), "mean_distinct_per_tile": sum(sizes) / max(1, len(sizes)),
        "mean_sketch_bytes": sum(map(len, blobs)) / max(1, len(blobs)),
        "deserialize_us": _cpu_us(lambda: [hll_sketch.deserialize(b) for b in blobs]) / max(1, len(blobs)),
        "read_hashes_us": _cpu_us(lambda: [array("q", b) for b in hashed]) / max(1, len(blobs)),
        "union_day_sketches_us": _cpu_us(union_sketches), "union_day_sets_us": _cpu_us(union_sets),
    }
    return out


def format_results(r: dict[str, Any]) -> str:
    pe = r["per_entity"]
    lines = [f"experiments (CPU time, user_spending_profile, {pe['entities']} looked-up entities):",
             f"  per entity: decode {pe['mean_decode_us']:.0f} us + evaluate {pe['mean_evaluate_us']:.0f} us on average; "
             f"{pe['decode_us_per_field']:.1f} us of decode per hash field"]
    for k in ("heavy(>=200 fields)", "light(<30 fields)"):
        v = pe[k]
        lines.append(f"    {k}: {v['n']} entities, median {v['fields']:.0f} fields: decode {v['decode_us']:.0f} us, "
                     f"evaluate {v['evaluate_us']:.0f} us")
    if "reuse" in r:
        v = r["reuse"]
        lines.append(f"  decoded-tile reuse, {v['fields']} fields, 2 changed: decode {v['full_decode_us']:.0f} -> "
                     f"{v['reuse_decode_us']:.0f} us")
        v = r["premerged"]
        lines.append(f"  pre-merged bodies: evaluate over {v['tiles']} tiles {v['evaluate_us']:.0f} us -> over 2 tiles "
                     f"per group {v['evaluate_2_tiles_per_group_us']:.0f} us")
        v = r["shared_slots"]
        lines.append(f"  shared IR slots, 1-minute row: {v['slots_now']} slots / {v['sketches_now']} sketches "
                     f"{v['decode_row_us_now']:.1f} us -> {v['slots_shared']} slots / {v['sketches_shared']} sketches "
                     f"{v['decode_row_us_shared']:.1f} us per row")
        v = r["small_sets"]
        lines.append(f"  exact small sets, 5-minute tiles ({v['tiles']}, {v['mean_distinct_per_tile']:.1f} distinct, "
                     f"{v['mean_sketch_bytes']:.0f} B per sketch): read {v['deserialize_us']:.2f} -> "
                     f"{v['read_hashes_us']:.2f} us per tile; union of the day {v['union_day_sketches_us']:.0f} -> "
                     f"{v['union_day_sets_us']:.0f} us")
    return "\n".join(lines)
