"""The client loop both sides are measured with (standard library only: it runs in the project's
virtual environment for featurestream and in Feast's own for Feast).

A worker process measures ONE target (a featurestream or a Feast client). It reads commands as
JSON lines on stdin and answers each with one JSON line on the file descriptor it was given
(stdout at start; libraries that print are sent to stderr):

* ``{"op": "run", "case": NAME, "payloads": [[user_id, ...], ...]}`` -> ``{"ns": [...], "errors":
  [...]}``: one call per payload, each timed with ``perf_counter_ns`` around the call alone; a
  failed call is counted with its error, not timed;
* ``{"op": "warm", "case": NAME, "payloads": [...]}`` -> ``{"ok": true, "errors": [...]}``: the
  same calls, not kept; after the first warm-up the worker collects and (unless told not to) ``gc.freeze()``s
  what start-up and warm-up allocated, and from then on what each call leaves behind (untimed,
  between calls): the same for every target, so a full collection of whatever a library keeps
  (memos, caches, pools) never lands in a measured call;
* ``{"op": "values", "case": NAME, "payloads": [...]}`` -> ``{"values": [...]}`` (for checks);
* ``{"op": "quit"}``.

A target is an object with ``call(case, user_ids)`` (does the whole request, including
building it and decoding the answer) and optionally ``values(case, user_ids)`` and ``close()``.
"""

from __future__ import annotations

import gc
import http.client
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any


class HttpJson:
    """One keep-alive HTTP/1.1 connection posting JSON (``http.client``: the same client for both
    REST servers)."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def post(self, path: str, body: Any) -> Any:
        data = json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data))}
        for attempt in (0, 1):
            try:
                self.conn.request("POST", path, data, headers)
                response = self.conn.getresponse()
                payload = response.read()
                break
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                if attempt:
                    raise
        if response.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {response.status}: {payload[:500]!r}")
        return json.loads(payload)

    def close(self) -> None:
        self.conn.close()


def serve(make_target: Callable[[], Any], freeze_gc: bool = True) -> None:
    """Answer commands on stdin until ``quit`` or end of input."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the answers
    sys.stdout = sys.stderr
    target = make_target()
    frozen = False
    between = gc.freeze if freeze_gc else None

    def answer(obj: Any) -> None:
        out.write(json.dumps(obj, separators=(",", ":")) + "\n")
        out.flush()

    answer({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        op = command.get("op")
        try:
            if op == "quit":
                break
            if op == "warm":
                _, errors = timed(target, command["case"], command["payloads"], between if frozen else None)
                if not frozen:
                    gc.collect()
                    if freeze_gc:
                        gc.freeze()
                    frozen = True
                answer({"ok": True, "errors": errors})
            elif op == "run":
                ns, errors = timed(target, command["case"], command["payloads"], between if frozen else None)
                answer({"ns": ns, "errors": errors})
            elif op == "values":
                answer({"values": [target.values(command["case"], p) for p in command["payloads"]]})
            else:
                answer({"error": f"unknown op {op!r}"})
        except Exception as exc:  # report, keep serving
            answer({"error": f"{type(exc).__name__}: {exc}"})
    close = getattr(target, "close", None)
    if callable(close):
        close()


def timed(target: Any, case: str, payloads: list[list[str]],
          between: Callable[[], None] | None = None) -> tuple[list[int], list[str]]:
    """Latency of each successful call (ns) and the error of each failed one (not in the latencies);
    ``between`` runs after each call, untimed."""
    call = target.call
    clock = time.perf_counter_ns
    out: list[int] = []
    errors: list[str] = []
    append = out.append
    for payload in payloads:
        started = clock()
        try:
            call(case, payload)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            continue
        append(clock() - started)
        if between is not None:
            between()
    return out, errors
