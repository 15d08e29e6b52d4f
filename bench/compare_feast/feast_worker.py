"""The Feast side (runs in Feast's own virtual environment, never in the project's).

``python feast_worker.py COMMAND CONFIG_JSON``; results are one JSON line on stdout.

* ``setup``: ``feast apply`` and ``feast materialize`` in the generated repo, then reads every
  entity back through the SDK and compares with the values run.py wrote (featurestream's).
* ``worker``: one measured client for ``loop.py``: ``sdk`` (``FeatureStore.get_online_features(...)
  .to_dict()``) or ``http`` (POST ``/get-online-features`` of ``feast serve`` with ``http.client``).
* ``historical``: ``get_historical_features`` (file offline store) for a label Parquet file,
  the result written to Parquet; run.py times the process and reads its peak memory.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FEAST = str(Path(sys.executable).parent / "feast")


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _feast(repo: str, *args: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([FEAST, "-c", repo, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"feast {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def _norm(value: Any) -> Any:
    """Comparable form: timestamps as whole epoch seconds (Feast's UnixTimestamp keeps seconds)."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, datetime):
        value = value if value.tzinfo else value.replace(tzinfo=UTC)
        return int(value.timestamp())
    if hasattr(value, "item"):  # numpy scalar
        return _norm(value.item())
    return value


def setup(config: dict[str, Any]) -> None:
    import pyarrow.parquet as pq
    from feast import FeatureStore

    repo = config["repo"]
    apply_s = _feast(repo, "apply")
    materialize_s = _feast(repo, "materialize", config["start"], config["end"])
    store = FeatureStore(repo_path=repo)
    checked = 0
    mismatches: dict[str, int] = {}
    examples: list[str] = []
    for view in config["check"]:
        table = pq.read_table(view["path"])
        rows = table.to_pylist()
        latest: dict[str, dict[str, Any]] = {}
        for row in rows:  # the newest row per entity is what materialize writes
            key = row[config["join_key"]]
            if key not in latest or row["event_timestamp"] >= latest[key]["event_timestamp"]:
                latest[key] = row
        keys = sorted(latest)
        names = view["features"]
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            got = store.get_online_features(
                features=[f"{view['name']}:{n}" for n in names],
                entity_rows=[{config["join_key"]: k} for k in chunk],
            ).to_dict()
            for i, key in enumerate(chunk):
                for name in names:
                    want, have = _norm(latest[key][name]), _norm(got[name][i])
                    checked += 1
                    if want != have:
                        mismatches[name] = mismatches.get(name, 0) + 1
                        if len(examples) < 5:
                            examples.append(f"{view['name']}:{name} {key}: featurestream {want!r}, feast {have!r}")
    _emit({"apply_s": round(apply_s, 2), "materialize_s": round(materialize_s, 2), "values_checked": checked,
           "mismatches": mismatches, "examples": examples})


class SdkTarget:
    def __init__(self, config: dict[str, Any]) -> None:
        from feast import FeatureStore

        self.features = config["cases"]
        self.store = FeatureStore(repo_path=config["repo"])

    def call(self, case: str, users: list[str]) -> Any:
        return self.store.get_online_features(
            features=self.features[case], entity_rows=[{"user_id": u} for u in users]
        ).to_dict()

    def values(self, case: str, users: list[str]) -> list[list[Any]]:
        got = self.call(case, users)
        names = [f.split(":", 1)[1] for f in self.features[case]]
        return [[_norm(got[n][i]) for n in names] for i in range(len(users))]


class HttpTarget:
    def __init__(self, config: dict[str, Any]) -> None:
        from loop import HttpJson

        self.features = config["cases"]
        self.http = HttpJson("127.0.0.1", config["http_port"])

    def call(self, case: str, users: list[str]) -> Any:
        return self.http.post("/get-online-features", {"features": self.features[case], "entities": {"user_id": users}})

    def values(self, case: str, users: list[str]) -> list[list[Any]]:
        got = self.call(case, users)
        # one result per name in metadata.feature_names (the join key too), each with a value per entity
        column = {name: r["values"] for name, r in zip(got["metadata"]["feature_names"], got["results"], strict=True)}
        names = [f.split(":", 1)[1] for f in self.features[case]]
        return [[column[n][i] for n in names] for i in range(len(users))]

    def close(self) -> None:
        self.http.close()


def worker(config: dict[str, Any]) -> None:
    from loop import serve

    targets = {"sdk": SdkTarget, "http": HttpTarget}
    serve(lambda: targets[config["target"]](config), freeze_gc=config.get("freeze_gc", True))


def historical(config: dict[str, Any]) -> None:
    import pandas as pd
    from feast import FeatureStore

    started = time.perf_counter()
    store = FeatureStore(repo_path=config["repo"])
    labels = pd.read_parquet(config["labels"])
    frame = store.get_historical_features(entity_df=labels, features=config["features"]).to_df()
    frame.to_parquet(config["out"], index=False)
    _emit({"rows": len(frame), "inner_s": round(time.perf_counter() - started, 3)})


def main() -> None:
    command, config = sys.argv[1], json.loads(sys.argv[2])
    {"setup": setup, "worker": worker, "historical": historical}[command](config)


if __name__ == "__main__":
    main()
