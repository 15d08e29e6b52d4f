"""Is a service reachable? One real round trip per protocol, short timeouts.

Each check returns None when the service answered, else a one-line reason.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from featurestream.devstack.procs import port_open


def check_postgres(url: str, timeout: float = 2.0) -> str | None:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=max(1, round(timeout)), autocommit=True) as conn:
            conn.execute("select 1").fetchone()
    except psycopg.Error as exc:
        return _one_line(exc)
    return None


def check_redis(url: str, timeout: float = 2.0) -> str | None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
    except redis.RedisError as exc:
        return _one_line(exc)
    finally:
        client.close()
    return None


def check_kafka(bootstrap: str, timeout: float = 3.0) -> str | None:
    # A TCP probe first: librdkafka logs retries to stderr for a broker that is down.
    hosts = [_host_port(b) for b in bootstrap.split(",") if b.strip()]
    if not any(port_open(h, p, timeout=min(timeout, 1.0)) for h, p in hosts):
        return f"no broker accepts connections at {bootstrap}"
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": int(timeout * 1000)})
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        return _one_line(exc)
    return None


CHECKS = {"kafka": check_kafka, "redis": check_redis, "postgres": check_postgres}


def _host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(f"//{address.strip()}")
    return parts.hostname or "127.0.0.1", parts.port or 9092


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
