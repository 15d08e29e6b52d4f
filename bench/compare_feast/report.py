"""The figures of a run as JSON, a Markdown page (docs/benchmarks.md) and a chart (via chart.py in
Feast's virtual environment, which has matplotlib; the project does not depend on it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

FS_CLIENTS = [("inprocess", "fs_inprocess"), ("grpc", "fs_grpc"), ("rest", "fs_rest")]
BASELINE = {"fs_inprocess": "feast_sdk", "fs_grpc": "feast_server", "fs_rest": "feast_server"}
ORDER = ["fs_inprocess_nomemo", "fs_inprocess", "fs_inprocess_cache", "feast_sdk",
         "fs_grpc_nomemo", "fs_grpc", "fs_grpc_cache", "fs_rest_nomemo", "fs_rest", "fs_rest_cache", "feast_server"]


def _baseline(key: str) -> str | None:
    return BASELINE.get(key.removesuffix("_cache").removesuffix("_nomemo"))


def json_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` shape: p99s per case (defaults: memo on, cache off; ``*_nomemo_*`` with neither,
    ``*_cache_*`` with both), training times."""
    online = []
    for case in result.get("online", {}).get("cases", []):
        clients = case["clients"]
        entry: dict[str, Any] = {"name": case["name"]}
        for short, key in FS_CLIENTS:
            entry[f"featurestream_{short}_p99_ms"] = clients[key].get("p99_ms")
        entry["feast_sdk_p99_ms"] = clients["feast_sdk"].get("p99_ms")
        entry["feast_server_p99_ms"] = clients["feast_server"].get("p99_ms")
        for short, key in FS_CLIENTS:
            entry[f"featurestream_{short}_cache_p99_ms"] = clients[f"{key}_cache"].get("p99_ms")
            if f"{key}_nomemo" in clients:
                entry[f"featurestream_{short}_nomemo_p99_ms"] = clients[f"{key}_nomemo"].get("p99_ms")
        for key, stats in clients.items():
            entry[f"{key}_p50_ms"] = stats.get("p50_ms")
            entry[f"{key}_calls_per_s"] = stats.get("calls_per_s")
            entry[f"{key}_failed_calls"] = stats.get("errors", 0)
        online.append(entry)
    training = []
    for case in result.get("training", {}).get("cases", []):
        training.append({
            "rows": case["rows"],
            "featurestream_s": case.get("featurestream_s"),
            "feast_s": case.get("feast_s"),
            "featurestream_peak_mb": case.get("featurestream_peak_mb"),
            "feast_peak_mb": case.get("feast_peak_mb"),
            **{k: case[k] for k in ("featurestream_error", "feast_error") if k in case},
        })
    return {"online": online, "training": training}


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b:
        return "-"
    return f"{a / b:.2f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_summary(result: dict[str, Any]) -> None:
    online = result.get("online")
    if online:
        for case in online["cases"]:
            print(f"\n{case['name']} ({case['calls_per_round'] * case['rounds']} calls per client; "
                  f"load {case['load_before']} -> {case['load_after']})")
            for key in ORDER:
                s = case["clients"][key]
                base = _baseline(key)
                ratio = f"  p99 ratio to {base}: {_ratio(s.get('p99_ms'), case['clients'][base].get('p99_ms'))}" if base else ""
                failed = f"  FAILED {s['errors']}" if s.get("errors") else ""
                print(f"  {online['labels'][key]:<40} p50 {_num(s.get('p50_ms'), 3):>8} ms  p99 {_num(s.get('p99_ms'), 3):>8} ms  "
                      f"{_num(s.get('calls_per_s'), 1):>9} calls/s{ratio}{failed}")
    training = result.get("training")
    if training:
        print(f"\ntraining sets ({training['featurestream']})")
        for case in training["cases"]:
            print(f"  {case['rows']:>9,} rows: featurestream {_num(case.get('featurestream_s'))} s "
                  f"{_num(case.get('featurestream_peak_mb'), 0)} MB; Feast {_num(case.get('feast_s'))} s "
                  f"{_num(case.get('feast_peak_mb'), 0)} MB; equal {case.get('values', {}).get('equal_share')}"
                  + "".join(f"; {side} FAILED: {case[side + '_error']}" for side in ("featurestream", "feast")
                            if case.get(side + "_error")))
    sys.stdout.flush()


def write_chart(result: dict[str, Any], feast_python: Path, png: Path, script: Path) -> None:
    figures = json_figures(result)
    figures["labels"] = result.get("online", {}).get("labels", {})
    figures["clients"] = {c["name"]: c["clients"] for c in result.get("online", {}).get("cases", [])}
    figures["title"] = f"featurestream vs Feast {result['meta']['versions']['feast']} ({result['meta']['date']})"
    done = subprocess.run([str(feast_python), str(script), str(png)], input=json.dumps(figures), text=True,
                          capture_output=True)
    if done.returncode != 0:
        print(f"chart failed:\n{done.stderr[-2000:]}", file=sys.stderr)


def _online_section(online: dict[str, Any]) -> list[str]:
    lines = ["## Online lookups", "",
             "One client process per row, calling sequentially; calls/s = 1 / mean latency of that single "
             "client. Ratio = featurestream / Feast (below 1: featurestream is faster for p50/p99, above 1 for "
             "calls/s); the servers are compared with Feast's HTTP feature server, the in-process reader with "
             "Feast's SDK. featurestream runs three ways: \"memo off\" decodes and evaluates every "
             "lookup from scratch (`--memo-entries 0`); the default keeps decoded hashes and reuses them "
             "while Redis still holds the same bytes (every lookup still reads Redis, and a write token "
             "lets Redis answer 1 byte for an unchanged hash; values are never older than Redis), and "
             "reuses evaluated values within a tile period; \"cache on\" adds the state cache "
             f"(`--cache-ttl-ms {online['cache_ttl_ms']}`), which may serve a state up to that old. "
             "Feast has neither.", "",
             "What each side does per lookup: Feast reads values computed in advance (one Redis hash per "
             "entity and view) and decodes them; featurestream reads each entity's aggregation state (tiles "
             "and sketches, one Redis hash per entity and view, all in one pipelined round trip), decodes "
             "it and evaluates every window at the request time. Its cost grows with the state: a busy "
             "user's wide profile has hundreds of tiles, and lookups here follow activity, so busy users "
             "come up often.", ""]
    check = online.get("value_check")
    if check:
        lines += ["Before measuring, each client's answers for 40 users (1x6 and 1x50) were checked (share "
                  "right): "
                  + ", ".join(f"{online['labels'][k]} {100 * v:.1f}%" for k, v in check.items())
                  + ". Feast's against the snapshot it materialized. featurestream evaluates windows at "
                  "request time (a window that lost an event since the snapshot differs from it), so its "
                  "answers are checked against the in-process service read just before and just after.", ""]
    for case in online["cases"]:
        calls = case["calls_per_round"] * case["rounds"]
        lines += [f"### {case['name']}: {case['entities']} entit{'y' if case['entities'] == 1 else 'ies'} x "
                  f"{case['features']} features (`{case['view']}`)", "",
                  f"{calls:,} measured calls per client ({case['rounds']} rounds x {case['calls_per_round']}) after "
                  f"{case['warmup']} warm-up calls; load average {case['load_before'][0]} before, "
                  f"{case['load_after'][0]} after.", "",
                  "| client | p50 ms | p99 ms | calls/s | p50 ratio | p99 ratio | calls/s ratio | failed calls |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|"]
        failures = []
        for key in ORDER:
            s = case["clients"][key]
            base = _baseline(key)
            b = case["clients"][base] if base else {}
            lines.append(
                f"| {online['labels'][key]} | {_num(s.get('p50_ms'), 3)} | {_num(s.get('p99_ms'), 3)} | "
                f"{_num(s.get('calls_per_s'), 0)} | {_ratio(s.get('p50_ms'), b.get('p50_ms')) if b else '-'} | "
                f"{_ratio(s.get('p99_ms'), b.get('p99_ms')) if b else '-'} | "
                f"{_ratio(s.get('calls_per_s'), b.get('calls_per_s')) if b else '-'} | {s.get('errors', 0)} |")
            if s.get("errors"):
                failures.append(f"{online['labels'][key]}: {s['errors']} (e.g. `{s['first_error']}`)")
        lines.append("")
        if failures:
            lines += ["Failed calls are counted, not timed: " + "; ".join(failures) + ".", ""]
    return lines


def _training_section(training: dict[str, Any]) -> list[str]:
    lines = ["## Point-in-time training sets", "",
             f"`{training['view']}` ({len(training['features'])} features) for every label row. featurestream: "
             f"{training['featurestream']} (PostgreSQL archive); Feast: `get_historical_features` with the file "
             "offline store (Parquet). Each in a process of its own: wall time of the whole command (start-up, "
             "reading labels, join, writing Parquet), peak memory = that process's ru_maxrss.", "",
             "| label rows | featurestream s | Feast s | time ratio | featurestream peak MB | Feast peak MB | "
             "memory ratio | equal values: all / exact-time / other rows |",
             "|--:|--:|--:|--:|--:|--:|--:|---|"]
    failures = []
    for case in training["cases"]:
        for side, name in (("featurestream", "featurestream"), ("feast", "Feast")):
            if case.get(f"{side}_error"):
                failures.append(f"{case['rows']:,} rows, {name}: {case[f'{side}_error']}")
        eq = case.get("values", {}).get("equal_share")
        equal = " / ".join(f"{100 * eq[p]:.1f}%" if eq.get(p) is not None else "-" for p in ("all", "exact", "other")) if eq else "-"
        lines.append(
            f"| {case['rows']:,} | {_num(case.get('featurestream_s'))} | {_num(case.get('feast_s'))} | "
            f"{_ratio(case.get('featurestream_s'), case.get('feast_s'))} | {_num(case.get('featurestream_peak_mb'), 0)} | "
            f"{_num(case.get('feast_peak_mb'), 0)} | {_ratio(case.get('featurestream_peak_mb'), case.get('feast_peak_mb'))} | "
            f"{equal} |")
    lines.append("")
    if failures:
        lines += ["Failed (\"-\" above): " + "; ".join(failures) + ". Each training-set process is stopped "
                  f"once its resident memory passes {training.get('memory_limit_mb', 0) / 1024:g} GB "
                  "(`--memory-limit-gb`): the machine is shared and has 24 GiB.", ""]
    per_feature = next((c["values"]["features"] for c in reversed(training["cases"]) if "values" in c
                        and "features" in c["values"]), None)
    if per_feature:
        lines += ["Equal values per feature (largest run; all / exact-time / other rows):", ""]
        for name, shares in per_feature.items():
            text = shares if isinstance(shares, str) else " / ".join(
                f"{100 * shares[p]:.1f}%" if shares[p] is not None else "-" for p in ("all", "exact", "other"))
            lines.append(f"- `{name}`: {text}")
        lines.append("")
    return lines


def _load_note(result: dict[str, Any]) -> str:
    seen = [values[0] for values in result["meta"]["load"].values()]
    for case in [*result.get("online", {}).get("cases", []), *result.get("training", {}).get("cases", [])]:
        seen += [case["load_before"][0], case["load_after"][0]]
    peak = max(seen)
    if peak < 2.5:
        return (f"The machine (shared with other engineers) was nearly idle during this run: the 1-minute load "
                f"average stayed at or below {peak} on 2 cores, this run's own processes included.")
    return (f"The machine is shared: other engineers' test suites ran on its 2 cores during the run (1-minute "
            f"load average up to {peak}), so the absolute figures carry that noise; both sides saw the same "
            "conditions (interleaved rounds).")


def write_markdown(result: dict[str, Any], path: Path, png: Path) -> None:
    meta = result["meta"]
    v = meta["versions"]
    d = meta.get("data", {})
    setup = meta.get("feast_setup", {})
    loads = meta["load"]
    lines = [
        "# Benchmarks: featurestream and Feast side by side", "",
        f"Generated by `python bench/compare_feast/run.py{' --quick' if meta['quick'] else ''}` on {meta['date']} "
        f"(total {meta['total_s']:.0f} s). Every figure below is as measured in that one run; rerun it to "
        "reproduce (see [How to run](#how-to-run)).", "",
        f"![p99 latency and training-set time]({png.name})", "",
        "## Machine and versions", "",
        "| | |", "|---|---|",
        f"| machine | {v['cpu']}, {v['cores']} cores, {v['memory_gib']} GiB, {v['os']} |",
        f"| featurestream | {v['featurestream']} (commit {v['commit']}), Python {v['python']} |",
        f"| Feast | {v['feast']} from PyPI, Python {v['feast_python']}, own virtual environment |",
        f"| Redis | {v['redis_server']}, one server for both (featurestream `{meta['redis']['featurestream']}`, "
        f"Feast `{meta['redis']['feast']}`) |",
        "| PostgreSQL | throwaway database (featurestream's registry and offline store) |",
        f"| load average (1 min) | start {loads['start'][0]}, online {loads.get('online_start', ['-'])[0]} -> "
        f"{loads.get('online_end', ['-'])[0]}, training {loads.get('training_start', ['-'])[0]} -> "
        f"{loads.get('training_end', ['-'])[0]}, end {loads['end'][0]} |", "",
        _load_note(result), "",
        "## Setup", "",
        f"- Data: {d.get('events', 0):,} demo events (`featurestream/demo/generator.py`) over the last "
        f"{d.get('span_hours', 0):g} h, {d.get('users', 0):,} users, written through featurestream's real "
        f"`SourceProcessor` (no Kafka) into Redis and PostgreSQL in {d.get('ingest_s', 0)} s "
        f"({d.get('valid', 0):,} valid, {d.get('dead_letters', 0):,} dead letters, {d.get('late', 0):,} late).",
        "- The same values in Feast: featurestream's values of every user were read at one instant and "
        "written as Feast's Parquet source rows with that instant as `event_timestamp`; `feast apply`, "
        f"`feast materialize` ({setup.get('apply_s', '-')} s, {setup.get('materialize_s', '-')} s). All "
        f"{setup.get('values_checked', 0):,} materialized values were read back through Feast's SDK: "
        f"{'all equal to featurestream' + chr(39) + 's' if not setup.get('mismatches') else 'mismatches ' + json.dumps(setup['mismatches'])}"
        " (timestamps compared to the second: Feast's `UnixTimestamp` keeps seconds).",
        "- Feast: Redis online store (same Redis server, another database number), file offline store, "
        "file registry with its default cache; `feast serve` with one worker, `--max-requests 0` (no worker "
        "recycling) and no access log. Feast's server runs with Python's default garbage collector.",
        "- featurestream: `featurestream serve` (gRPC and REST in one process), three servers: `--memo-entries 0`, "
        "the defaults (read memo on, `--cache-ttl-ms 0`) and the state cache on; each freezes start-up objects, raises the collector's thresholds "
        "once ready and freezes what each request leaves (its default, `--gc-tuning`); in-process: " + f"`{result.get('online', {}).get('in_process_reader', '-')}`.",
        "- Clients: one process per client, all with the same loop (`bench/compare_feast/loop.py`): each call "
        "builds the request, sends it and decodes the answer (gRPC: `featurestream.Client.get_online`, dicts; "
        "REST, both servers: `http.client` keep-alive + `json`; Feast SDK: `get_online_features(...).to_dict()`; "
        "featurestream in-process: `get_rows`, Python values). Lookups follow activity (users drawn in "
        "proportion to their transactions; 100 distinct users per 100-entity call); every client gets the "
        "same requests" + (" (here: uniformly, `--lookups uniform`)" if result.get("online", {}).get("lookups") == "uniform" else "")
        + ". Warm-up, then "
        + ("a `gc.collect(); gc.freeze()` in every client process and a `gc.freeze()` after each call, untimed (both sides alike: "
           "no full collection of what a library keeps lands in a measured call), then " if result.get("online", {}).get("gc_freeze_in_clients") else "")
        + "rounds in which featurestream and Feast clients alternate (A/B/A/B, reversed every other round).",
        "- Semantics: featurestream evaluates windows at request time (a 1 h window ends now); Feast serves "
        "the value materialized at the snapshot instant. Same values at that instant, checked above.", "",
    ]
    if result.get("online"):
        lines += _online_section(result["online"])
    if result.get("training"):
        lines += _training_section(result["training"])
        lines += [
            "Where the semantics differ: Feast's point-in-time join takes the newest feature row at or before "
            "the label time within the view's TTL. Its rows here are featurestream's own values as of each "
            "event (computed by featurestream's as-of path), so Feast returns a sliding window's value as of "
            "the user's last event, not decayed to the label time. featurestream ends every window at the label "
            "time and nulls a value older than its `max_age` (STALE). Both agree at labels placed exactly at an "
            "event's time (10% of the labels: \"exact-time\") and elsewhere only while no event left a window "
            "in between; `last_country` (no window, no `max_age`) agrees everywhere.", ""]
    lines += [
        "## How to run", "",
        "```",
        "python bench/compare_feast/run.py            # everything (see the time above)",
        "python bench/compare_feast/run.py --quick    # fewer calls, only the 10k training set",
        "python bench/compare_feast/run.py --json out.json --no-report",
        "```", "",
        "Run it with the project's virtual environment. Feast is installed on first use into a virtual "
        "environment of its own, `$FEATURESTREAM_HOME/feast-venv` (default `~/.featurestream/feast-venv`, "
        "outside the repository; `--feast-venv`, `--feast-version`), never into the project's. It needs "
        "PostgreSQL (`--postgres`, a throwaway database is created and dropped) and Redis (`--redis`; two "
        "empty database numbers are claimed and only those are flushed at the end). `--help` lists the knobs "
        "(events, rounds, calls, cache TTL, `--lookups uniform`, `--no-gc-freeze`, `--memory-limit-gb`); "
        "`--report-from RUN.full.json` writes this page and the chart again from a saved run (`--json RUN.json` "
        "saves it). Once Feast is installed, `--quick` took 2 min 41 s here with the machine idle (load 0.1) "
        "and 7 to 9 min while other test suites ran; the full run 17 min idle, 25 min loaded.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
