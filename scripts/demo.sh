#!/usr/bin/env bash
# The featurestream demo on a machine with nothing configured: the embedded dev stack
# (Kafka, Redis, PostgreSQL from PyPI wheels), the example definitions, and what they make.
# Safe to re-run; stop the stack afterwards with: .venv/bin/featurestream dev down
set -euo pipefail
# shellcheck source=scripts/test.sh
source "$(dirname "${BASH_SOURCE[0]}")/test.sh"  # setup functions only; cds to the repo root

ensure_venv

step() { printf '\n== %s\n' "$*"; }

step "featurestream dev up"
featurestream dev up

step "featurestream apply definitions/"
featurestream apply definitions/

step "featurestream list"
featurestream list

LOGS="${FEATURESTREAM_HOME:-$HOME/.featurestream}/demo"
mkdir -p "$LOGS"
WORKER_PID=""
SERVER_PID=""
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
  [ -n "$WORKER_PID" ] && kill "$WORKER_PID" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

step "featurestream produce-demo: 20,000 card transactions (skewed users, some out of order, late or malformed)"
featurestream produce-demo --count 20000 --rate 0 --definitions definitions --json --no-progress > "$LOGS/produced.json"
python -c 'import json,sys; s=json.load(open(sys.argv[1])); print({k: s[k] for k in s if k in ("sent", "delivered", "failed", "malformed")})' "$LOGS/produced.json"

step "featurestream worker (in the background; log in $LOGS/worker.log)"
featurestream worker --metrics-port 9108 > "$LOGS/worker.log" 2>&1 &
WORKER_PID=$!
python - "$LOGS/produced.json" "$WORKER_PID" <<'PY'
import json, os, sys, time, urllib.request
summary = json.load(open(sys.argv[1]))
expected = summary["delivered"] - sum(summary["malformed"].values())
deadline = time.time() + 180
done = shown = -1.0
while time.time() < deadline:
    try:
        text = urllib.request.urlopen("http://127.0.0.1:9108/metrics", timeout=1).read().decode()
        done = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("featurestream_events_total{"))
    except OSError:
        pass
    if done != shown:
        print(f"\r  events applied: {max(0, int(done))} / {expected}", end="", flush=True)
        shown = done
    if done >= expected:
        break
    try:
        os.kill(int(sys.argv[2]), 0)
    except OSError:
        sys.exit("\nthe worker stopped; see its log")
    time.sleep(0.5)
print()
if done < expected:
    sys.exit("the worker did not catch up within 3 minutes; see its log")
PY

step "featurestream serve (gRPC :6566, REST :6567; log in $LOGS/server.log)"
featurestream serve --grpc-port 6566 --http-port 6567 > "$LOGS/server.log" 2>&1 &
SERVER_PID=$!
USERS=$(python - <<'PY'
import psycopg
from featurestream.config import require
with psycopg.connect(require("postgres_url")) as conn:
    rows = conn.execute(
        "select user_id from fs_offline.raw__transactions group by user_id order by count(*) desc limit 3"
    ).fetchall()
print(" ".join(f"--entity user_id={r[0]}" for r in rows))
PY
)
for _ in $(seq 1 50); do
  featurestream get --server 127.0.0.1:6566 $USERS --feature user_transactions:txn_count_1h >/dev/null 2>&1 && break
  sleep 0.2
done

step "featurestream get: fresh features of the three busiest demo users, served over gRPC"
featurestream get --server 127.0.0.1:6566 $USERS --feature user_transactions

step "the same over REST"
python - $USERS <<'PY'
import json, sys, urllib.request
users = [arg.split("=", 1)[1] for arg in sys.argv[1:] if "=" in arg]
body = json.dumps({"entities": [{"user_id": users[0]}], "features": ["user_transactions:txn_count_1h", "user_transactions:last_country"]}).encode()
request = urllib.request.Request("http://127.0.0.1:6567/v1/features/online", body, {"Content-Type": "application/json"})
print(json.dumps(json.load(urllib.request.urlopen(request, timeout=5)), indent=2))
PY

step "done; worker and server stop now, the dev stack keeps running (featurestream dev status / featurestream dev down)"
