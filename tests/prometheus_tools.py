"""Test helpers for the real Prometheus tools: find binaries, run servers on loopback, poll with deadlines.

A missing binary skips the test with the reason, unless ``GRADWATCH_REQUIRE_PROMETHEUS=1`` (set by CI),
where it fails: CI must never pass by skipping what it is there to check.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

REQUIRE_ENV = "GRADWATCH_REQUIRE_PROMETHEUS"
INSTALL_HINT = "apt-get install -y prometheus prometheus-pushgateway"
T = TypeVar("T")


def require_binary(name: str) -> str:
    """Path of ``name`` on PATH; skip (or fail under GRADWATCH_REQUIRE_PROMETHEUS=1) when it is missing."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name!r} is not on PATH (install it with: {INSTALL_HINT})"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 requires it")
    pytest.skip(reason)


def free_port() -> int:
    """A loopback port free right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(probe: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.1) -> T:
    """Call ``probe`` until it returns something other than None (or raises no error), within ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = probe()
            if result is not None:
                return result
        except (OSError, ValueError, KeyError, AssertionError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error})"
            )
        time.sleep(interval)


@dataclass
class Server:
    """A server process we started, its base URL and its log file."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@contextmanager
def running_server(
    argv: Sequence[str], *, port: int, log: Path, ready_path: str = "/-/ready"
) -> Iterator[Server]:
    """Start ``argv`` (which must listen on 127.0.0.1:``port``), wait until ready, and always stop it."""
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            list(argv), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = Server(process=process, url=f"http://127.0.0.1:{port}", log=log)
    try:

        def ready() -> bool | None:
            if process.poll() is not None:
                raise AssertionError(f"{argv[0]} exited with {process.returncode}:\n{server.log_tail()}")
            with urllib.request.urlopen(server.url + ready_path, timeout=1) as response:
                return True if response.status == 200 else None

        try:
            wait_until(ready, timeout=20, what=f"{Path(argv[0]).name} to be ready on port {port}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- server log ---\n{server.log_tail()}") from None
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def query(prometheus_url: str, expr: str) -> list[dict[str, Any]]:
    """Instant query; returns the result list of a vector, or [one sample] for a scalar."""
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        body = json.loads(http_get(url))
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"query {expr!r} was refused: {exc.read().decode(errors='replace')}") from exc
    if body.get("status") != "success":
        raise AssertionError(f"query {expr!r} failed: {body}")
    data = body["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    return list(data["result"])


def label_values(prometheus_url: str, label: str, match: str) -> list[str]:
    """What Grafana's ``label_values(match, label)`` lists."""
    url = f"{prometheus_url}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": match})
    body = json.loads(http_get(url))
    assert body.get("status") == "success", body
    return list(body["data"])
