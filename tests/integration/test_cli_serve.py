"""`featurestream get` against an in-process server, and `featurestream serve` as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner, Result

from featurestream.cli.app import app
from featurestream.config import ENV_KAFKA, ENV_POSTGRES, ENV_REDIS
from featurestream.devstack.procs import free_port
from featurestream.serving.context import ServingContext
from featurestream.serving.grpc_server import GrpcServer, GrpcSettings
from featurestream.serving.service import OnlineService
from tests.integration.serving.conftest import MIN, T0, ServingProject
from tests.integration.serving.conftest import shop as shop  # the fixture (it lives beside the serving tests)

NOW = T0 + 10 * MIN


def cli(*args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(app, list(args), env={"CI": "true", "COLUMNS": "200"})
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


@pytest.fixture
def server(shop: ServingProject) -> Iterator[str]:
    online = OnlineService(lambda: shop.snapshot, shop.redis_url, clock_ms=lambda: NOW)
    grpc_server = GrpcServer(ServingContext(online=online), GrpcSettings(port=0)).start()
    yield grpc_server.address
    grpc_server.stop(0)
    online.close()


def test_get_json_prints_the_documented_shape(server: str) -> None:
    out = cli("get", "--server", server, "--entity", "user_id=u1", "--entity", "user_id=nobody",
              "--feature", "user_orders:count_1h", "--json").stdout
    assert out == (
        '{"results": [{"entity": {"user_id": "u1"}, "features": {"user_orders:count_1h": '
        '{"value": 2, "status": "PRESENT", "event_time": "2026-11-27T10:05:00Z"}}}, '
        '{"entity": {"user_id": "nobody"}, "features": {"user_orders:count_1h": '
        '{"value": null, "status": "MISSING", "event_time": null}}}]}\n'
    )


def test_get_a_whole_view_and_several_join_keys(server: str) -> None:
    whole = json.loads(cli("get", "--server", server, "-e", "user_id=u1", "-f", "user_orders", "--json").stdout)
    assert list(whole["results"][0]["features"]) == [
        "user_orders:count_1h", "user_orders:amount_sum_1h", "user_orders:amount_mean_1h",
        "user_orders:last_country", "user_orders:last_card",
    ]
    assert whole["results"][0]["features"]["user_orders:amount_mean_1h"]["value"] == 15.0
    both = json.loads(cli("get", "--server", server, "--entity", "user_id=u2,shop_id=8",
                          "--feature-service", "checkout", "--json").stdout)
    assert both == {"results": [{"entity": {"user_id": "u2", "shop_id": "8"}, "features": {
        "user_orders:count_1h": {"value": 4, "status": "INVALID", "event_time": "2026-11-27T10:06:00Z"},
        "shop_orders:count_1h": {"value": 3, "status": "PRESENT", "event_time": "2026-11-27T10:06:00Z"},
    }}]}


def test_get_prints_a_table_without_json(server: str) -> None:
    out = cli("get", "--server", server, "-e", "user_id=u1", "-e", "user_id=u2", "-f", "user_orders:count_1h",
              "-f", "user_orders:amount_mean_1h").stdout
    lines = [line.split() for line in out.splitlines()]
    assert lines[0] == ["entity", "feature", "value", "status", "event", "time"]
    assert ["user_id=u1", "user_orders:count_1h", "2", "PRESENT", "2026-11-27T10:05:00Z"] in lines
    assert ["user_id=u2", "user_orders:count_1h", "4", "INVALID", "2026-11-27T10:06:00Z"] in lines
    assert ["user_id=u1", "user_orders:amount_mean_1h", "15", "PRESENT", "2026-11-27T10:05:00Z"] in lines


def test_get_errors_exit_non_zero_with_the_server_message(server: str) -> None:
    bad = cli("get", "--server", server, "-e", "user_id=u1", "-f", "user_orders:nope", code=1)
    assert "INVALID_ARGUMENT: unknown feature 'nope' of view 'user_orders'" in bad.output
    key = cli("get", "--server", server, "-e", "shop_id=x", "-f", "shop_orders", code=1)
    assert "join key 'shop_id' must be an integer, got 'x'" in key.output
    malformed = cli("get", "--server", server, "-e", "user_id", "-f", "user_orders", code=2)
    assert "key=value" in malformed.output
    nothing = cli("get", "--server", server, "-e", "user_id=u1", code=2)
    assert "--feature" in nothing.output
    down = cli("get", "--server", f"127.0.0.1:{free_port()}", "-e", "user_id=u1", "-f", "user_orders",
               "--timeout", "1", code=1)
    assert "UNAVAILABLE" in down.output


# ---------------------------------------------------------------- the serve process


def _wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"serve did not become healthy:\n{log.read_text()}")
            time.sleep(0.1)


def test_serve_answers_grpc_and_rest_and_stops_on_sigterm(shop: ServingProject, tmp_path: Path) -> None:
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in (ENV_KAFKA,)}
    env.update({ENV_POSTGRES: shop.postgres_url, ENV_REDIS: shop.redis_url})
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "featurestream.cli", "serve", "--project", shop.name, "--grpc-port", str(grpc_port),
             "--http-port", str(http_port), "--grace", "3", "--cache-ttl-ms", "100", "--metrics-port", str(metrics_port)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    try:
        _wait_serving(f"127.0.0.1:{grpc_port}", proc, log)
        # Lifetime features do not decay: the same at any wall-clock time.
        args = ["get", "--server", f"127.0.0.1:{grpc_port}", "-e", "user_id=u1", "-e", "user_id=nobody",
                "-f", "user_orders:last_country", "--json"]
        got = json.loads(cli(*args).stdout)
        assert got["results"][0]["features"]["user_orders:last_country"] == {
            "value": "DE", "status": "PRESENT", "event_time": "2026-11-27T10:05:00Z"}
        assert got["results"][1]["features"]["user_orders:last_country"]["status"] == "MISSING"
        rest = httpx.post(f"http://127.0.0.1:{http_port}/v1/features/online",
                          json={"entities": [{"user_id": "u1"}, {"user_id": "nobody"}], "features": ["user_orders:last_country"]})
        assert rest.status_code == 200, rest.text
        assert rest.json() == got  # both front ends read the same service layer
        assert httpx.get(f"http://127.0.0.1:{http_port}/healthz").status_code == 200
        listed = httpx.get(f"http://127.0.0.1:{http_port}/v1/features", params={"query": "country"}).json()
        assert [f["name"] for f in listed["features"]] == ["user_orders:last_country"]
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert 'featurestream_grpc_calls_total{code="OK",method="GetOnlineFeatures"} 1.0' in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        text = log.read_text()
        assert f"serving project {shop.name}" in text and f"gRPC 127.0.0.1:{grpc_port}" in text
        assert "SIGTERM: shutting down" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_fails_clearly_without_the_project(shop: ServingProject, tmp_path: Path) -> None:
    env = {**os.environ, ENV_POSTGRES: shop.postgres_url, ENV_REDIS: shop.redis_url}
    proc = subprocess.run(
        [sys.executable, "-m", "featurestream.cli", "serve", "--project", "nope", "--grpc-port", "0", "--http-port", "-1"],
        capture_output=True, env=env, timeout=60,
    )
    assert proc.returncode == 1
    assert b"no project 'nope'" in proc.stderr


def test_serve_with_tls(shop: ServingProject, tmp_path: Path) -> None:
    from tests.integration.serving.test_grpc import _self_signed

    cert, key = _self_signed(tmp_path)
    grpc_port, http_port = free_port(), free_port()
    env = {**os.environ, ENV_POSTGRES: shop.postgres_url, ENV_REDIS: shop.redis_url}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "featurestream.cli", "serve", "--project", shop.name,
             "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--tls-cert", str(cert), "--tls-key", str(key)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    try:
        deadline = time.monotonic() + 60
        while "serving project" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        result = CliRunner().invoke(app, ["get", "--server", f"127.0.0.1:{grpc_port}", "--tls-ca", str(cert), "-e",
                                          "user_id=u1", "-f", "user_orders:last_country", "--json"])
        assert result.exit_code == 0, result.output + log.read_text()
        got = json.loads(result.stdout)["results"][0]["features"]["user_orders:last_country"]
        assert got["value"] == "DE"
        plain = cli("get", "--server", f"127.0.0.1:{grpc_port}", "-e", "user_id=u1", "-f", "user_orders", "--timeout", "1", code=1)
        assert "UNAVAILABLE" in plain.output
        try:
            rest = httpx.get(f"https://127.0.0.1:{http_port}/healthz", verify=str(cert))
        except httpx.HTTPError as exc:
            raise AssertionError(f"{exc}\n{log.read_text()}") from exc
        assert rest.status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
