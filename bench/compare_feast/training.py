"""Point-in-time training sets: ``featurestream training-set`` against Feast's
``get_historical_features`` (file offline store), each in a process of its own (project venv).

Both read the same label Parquet file (``label_id, user_id, event_timestamp, exact``) and write
Parquet. Time = the process's wall clock (start-up, reading labels, the join, writing); peak
memory = the process's ru_maxrss. The two commands alternate order from one size to the next. A
process whose resident memory passes ``--memory-limit-gb`` is stopped and recorded as failed (the
machine is shared: nobody else's process may meet the OOM killer because of a benchmark).

Where the semantics agree, the values must be equal: Feast's join takes the newest feature row at
or before the label time within the view's TTL (rows = featurestream's values as of each event,
so a sliding window as of the user's last event, not decayed to the label time);
featurestream ends windows at the label time and nulls a value older than its ``max_age``
(STALE). So: equal at labels placed exactly at one of the user's event times (``exact``), and
elsewhere only while nothing left a window between the last event and the label time.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import data
import pyarrow.parquet as pq
from services import measured

HERE = Path(__file__).resolve().parent


def featurestream_available() -> tuple[bool, str]:
    """Whether this installation has ``featurestream training-set`` (another change adds it)."""
    done = subprocess.run([sys.executable, "-m", "featurestream.cli", "training-set", "--help"],
                          capture_output=True, text=True)
    if done.returncode == 0:
        return True, "featurestream training-set"
    return False, "skipped: this installation has no `featurestream training-set` command yet"


def _column(columns: list[str], view: str, feature: str) -> str | None:
    for name in (f"{view}:{feature}", f"{view}__{feature}", feature):
        if name in columns:
            return name
    return None


def same(a: Any, b: Any) -> bool:
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or (isinstance(b, float) and math.isnan(b))
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return False
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
        except (TypeError, ValueError):
            return False
    return bool(a == b)


def compare(fs_path: Path, feast_path: Path, view: str, features: list[str]) -> dict[str, Any]:
    """Share of equal values per feature: all rows, rows at an exact event time, the others."""
    fs = pq.read_table(fs_path)
    feast = pq.read_table(feast_path)
    fs_cols, feast_cols = fs.column_names, feast.column_names
    if "label_id" not in fs_cols or "label_id" not in feast_cols:
        return {"error": f"no label_id column (featurestream: {fs_cols[:8]}, Feast: {feast_cols[:8]})"}
    fs_index = {v: i for i, v in enumerate(fs.column("label_id").to_pylist())}
    feast_ids = feast.column("label_id").to_pylist()
    order = [fs_index[i] for i in feast_ids]
    exact = [fs.column("exact")[i].as_py() for i in order]
    out: dict[str, Any] = {"rows": len(order), "exact_rows": sum(exact), "features": {}}
    totals = {"all": [0, 0], "exact": [0, 0], "other": [0, 0]}
    for feature in features:
        a_name, b_name = _column(fs_cols, view, feature), _column(feast_cols, view, feature)
        if a_name is None or b_name is None:
            out["features"][feature] = "column missing"
            continue
        a_all = fs.column(a_name).to_pylist()
        b_all = feast.column(b_name).to_pylist()
        counts = {"all": [0, 0], "exact": [0, 0], "other": [0, 0]}
        for k, i in enumerate(order):
            ok = same(a_all[i], b_all[k])
            for part in ("all", "exact" if exact[k] else "other"):
                counts[part][0] += ok
                counts[part][1] += 1
        for part, (good, count) in counts.items():
            totals[part][0] += good
            totals[part][1] += count
        out["features"][feature] = {part: round(good / count, 4) if count else None
                                    for part, (good, count) in counts.items()}
    out["equal_share"] = {part: round(good / count, 4) if count else None for part, (good, count) in totals.items()}
    return out


def run(sizes: list[int], tmp: Path, repo: Path, feast_python: Path, pg_url: str, ingested: data.Ingested,
        view: str, features: list[str], seed: int, log: Callable[[str], None], memory_limit_mb: float) -> dict[str, Any]:
    available, how = featurestream_available()
    if not available:
        log(f"featurestream training set {how}")
    env = {**os.environ, "FEATURESTREAM_POSTGRES_URL": pg_url}
    cases = []
    for n, rows in enumerate(sizes):
        labels = tmp / f"labels_{rows}.parquet"
        data.write_labels(labels, rows, ingested, seed=seed + rows)
        case: dict[str, Any] = {"rows": rows, "load_before": [round(x, 2) for x in os.getloadavg()]}
        fs_out, feast_out = tmp / f"fs_{rows}.parquet", tmp / f"feast_{rows}.parquet"
        feast_config = {"repo": str(repo), "labels": str(labels), "out": str(feast_out),
                        "features": [f"{view}:{f}" for f in features]}
        steps = ["featurestream", "feast"] if n % 2 == 0 else ["feast", "featurestream"]
        for side in steps:
            try:
                if side == "feast":
                    seconds, peak, out, _ = measured([str(feast_python), str(HERE / "feast_worker.py"), "historical",
                                                      json.dumps(feast_config)], cwd=str(repo), memory_limit_mb=memory_limit_mb)
                    inner = json.loads(out.strip().splitlines()[-1])
                    case.update(feast_s=round(seconds, 2), feast_peak_mb=round(peak), feast_rows=inner["rows"])
                    log(f"  {rows:,} rows: Feast {seconds:.1f} s, peak {peak:.0f} MB")
                elif available:
                    seconds, peak, _, _ = measured([sys.executable, "-m", "featurestream.cli", "training-set",
                                                    "--labels", str(labels), "--out", str(fs_out), "--feature", view,
                                                    "--no-status", "--no-progress"], env=env, memory_limit_mb=memory_limit_mb)
                    case.update(featurestream_s=round(seconds, 2), featurestream_peak_mb=round(peak),
                                featurestream_rows=pq.ParquetFile(fs_out).metadata.num_rows)
                    log(f"  {rows:,} rows: featurestream {seconds:.1f} s, peak {peak:.0f} MB")
            except RuntimeError as exc:  # OverMemory or a failed command: recorded, the run goes on
                case[f"{side}_error"] = str(exc).splitlines()[0][:300]
                log(f"  {rows:,} rows: {side} failed: {case[f'{side}_error']}")
        case["load_after"] = [round(x, 2) for x in os.getloadavg()]
        if available and "featurestream_s" in case and "feast_s" in case:
            case["values"] = compare(fs_out, feast_out, view, features)
            log(f"  values equal: {case['values'].get('equal_share')}")
        for path in (fs_out, feast_out, labels):
            path.unlink(missing_ok=True)
        cases.append(case)
    return {"featurestream": how, "view": view, "features": features, "cases": cases,
            "memory_limit_mb": memory_limit_mb}
