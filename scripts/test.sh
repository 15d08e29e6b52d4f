#!/usr/bin/env bash
# Lint and test featurestream, from a fresh clone or an old checkout; safe to re-run.
#   bash scripts/test.sh               everything
#   bash scripts/test.sh -k devstack   extra arguments go to pytest
# Uses the machine's PostgreSQL (5432) and Redis (6379) when they run or can be started,
# else the tests start embedded ones (see tests/conftest.py). Kafka is always embedded.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

pick_python() {
  local candidate
  for candidate in python3.11 python3.12 python3.13 python3; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  echo "error: featurestream needs Python 3.11 or newer; none found on PATH" >&2
  return 1
}

ensure_venv() {
  if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$(pick_python)" -m venv .venv
  fi
  # pip takes a while even when nothing changed: reinstall only when pyproject.toml did.
  local stamp=.venv/.featurestream-install-stamp want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] || [ ! -x .venv/bin/featurestream ] \
      || ! (cd / && "$ROOT/.venv/bin/python" -c 'import featurestream') >/dev/null 2>&1; then
    echo "== installing featurestream and its dependencies into .venv"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[embedded,serving,dev]"
    echo "$want" >"$stamp"
  fi
  export PATH="$ROOT/.venv/bin:$PATH"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local _
  for _ in $(seq 50); do port_open "$1" && return 0; sleep 0.2; done
  return 1
}

# The machine's own start commands (its documentation), tolerating machines without them.
start_machine_postgres() {
  port_open 5432 && return 0
  command -v pg_ctlcluster >/dev/null 2>&1 || return 1
  local version
  version=$(ls /etc/postgresql 2>/dev/null | head -n 1)
  [ -n "$version" ] || return 1
  echo "== starting the machine's PostgreSQL $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
  wait_port 5432
}

start_machine_redis() {
  port_open 6379 && return 0
  command -v redis-server >/dev/null 2>&1 || return 1
  echo "== starting the machine's Redis"
  local args=(--daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no)
  [ -d /var/lib/redis ] && args+=(--dir /var/lib/redis)
  [ -d /var/log/redis ] && args+=(--logfile /var/log/redis/ci.log)
  redis-server "${args[@]}" >/dev/null 2>&1 || true
  wait_port 6379
}

# "reachable postgres URL": a real client gets an answer (TCP alone misses auth trouble).
reachable() {
  python -c 'import sys; from featurestream.devstack.health import CHECKS
sys.exit(CHECKS[sys.argv[1]](sys.argv[2]) is not None)' "$1" "$2"
}

# Export the machine's addresses only when they answer; an address already set is kept.
use_machine_services() {
  local pg_url=postgresql://postgres@127.0.0.1:5432/postgres redis_url=redis://127.0.0.1:6379/0
  if [ -z "${FEATURESTREAM_POSTGRES_URL:-}" ] && start_machine_postgres && reachable postgres "$pg_url"; then
    export FEATURESTREAM_POSTGRES_URL=$pg_url
  fi
  if [ -z "${FEATURESTREAM_REDIS_URL:-}" ] && start_machine_redis && reachable redis "$redis_url"; then
    export FEATURESTREAM_REDIS_URL=$redis_url
  fi
  echo "== PostgreSQL: ${FEATURESTREAM_POSTGRES_URL:-embedded}; Redis: ${FEATURESTREAM_REDIS_URL:-embedded}; Kafka: embedded tansu"
}

main() {
  ensure_venv
  use_machine_services
  local lint=0 tests=0
  echo "== ruff check featurestream tests"
  ruff check featurestream tests || lint=$?
  echo "== pytest -q $*"
  pytest -q "$@" || tests=$?
  if [ "$lint" -ne 0 ]; then echo "ruff found problems (exit $lint)" >&2; fi
  # A test failure wins; else a lint failure; else pytest's 0 (or 5: no tests collected).
  if [ "$tests" -ne 0 ] && [ "$tests" -ne 5 ]; then exit "$tests"; fi
  if [ "$lint" -ne 0 ]; then exit "$lint"; fi
  exit "$tests"
}

# demo.sh sources this file for the setup functions only.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
