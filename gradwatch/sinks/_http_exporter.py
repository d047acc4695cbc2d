"""A small in-process HTTP(S) server that serves one Prometheus registry, optionally behind basic auth.

prometheus_client's ``start_http_server`` offers TLS but not basic auth, and it completes TLS handshakes
on its accept thread (one stalled client blocks every scrape). This server reuses prometheus_client's
WSGI app and adds both: a basic-auth WSGI wrapper, and TLS wrapped per connection in the worker thread.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hmac
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.metrics_core import Metric

logger = logging.getLogger(__name__)

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# A scraper that connects and then says nothing must not hold a worker thread forever.
CONNECTION_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class BasicAuth:
    """Credentials a scraper must present (HTTP basic auth)."""

    username: str
    password: str

    def __post_init__(self) -> None:
        if not self.username or ":" in self.username:
            raise ValueError("basic_auth username must be non-empty and contain no ':'")
        if not self.password:
            raise ValueError("basic_auth password must be non-empty")

    def header_value(self) -> bytes:
        token = base64.b64encode(f"{self.username}:{self.password}".encode())
        return b"Basic " + token


def require_basic_auth(app: WsgiApp, credentials: BasicAuth, realm: str = "gradwatch") -> WsgiApp:
    """Wrap a WSGI app so that requests without the right ``Authorization`` header get 401."""
    expected = credentials.header_value()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        offered = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", errors="replace")
        # Constant-time comparison so the response time does not leak how much of the secret matched.
        if hmac.compare_digest(offered, expected):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("WWW-Authenticate", f'Basic realm="{realm}"'), ("Content-Type", "text/plain")],
        )
        return [b"401 Unauthorized: this gradwatch exporter needs HTTP basic auth\n"]

    return guarded


class _QuietHandler(WSGIRequestHandler):
    """Request handler that logs at debug level instead of writing each request to stderr."""

    timeout = CONNECTION_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("exporter request: " + format, *args)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per scrape; TLS (if any) is negotiated inside that thread, not on the accept loop."""

    daemon_threads = True
    tls_context: ssl.SSLContext | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The connections being served (plain or TLS sockets), so a forked child can close its copies.
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def _track(self, connection: socket.socket, open_: bool) -> None:
        with self.connections_lock:
            if open_:
                self.open_connections.add(connection)
            else:
                self.open_connections.discard(connection)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._track(request, True)
        super().process_request(request, client_address)

    def close_request(self, request: Any) -> None:
        self._track(request, False)
        super().close_request(request)

    def close_inherited_connections(self) -> None:
        """In a forked child: close the child's copies of the connections the parent was serving at the
        fork (the parent's stay open: closing a descriptor in one process does not end the connection
        while the other holds it)."""
        with self.connections_lock:
            inherited, self.open_connections = self.open_connections, set()
        for connection in inherited:
            with contextlib.suppress(OSError):
                # close() would wait for the handler's file objects (which never close in the child):
                # take the descriptor out of the socket object and close it now.
                os.close(connection.detach())

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls_context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(CONNECTION_TIMEOUT_S)
        try:
            tls_request = self.tls_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:  # wrap_socket closes the socket it failed on
            logger.debug("TLS handshake with %s failed: %s", client_address, exc)
            return
        # The TLS socket now owns the connection's descriptor (the plain one is detached).
        self._track(request, False)
        self._track(tls_request, True)
        try:
            super().finish_request(tls_request, client_address)
        finally:
            # The TLS socket took over the connection's file descriptor, so closing the plain one (what the
            # server does after this returns) would leave it open until garbage collection.
            self.shutdown_request(tls_request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("exporter error while serving %s", client_address, exc_info=True)


ExportFaultHandler = Callable[[str, Exception], None]
"""Told ``(what, exception)`` when a collector or metric family cannot be served (on a scrape thread)."""


class _OneFamily:
    def __init__(self, family: Metric) -> None:
        self._family = family

    def collect(self) -> list[Metric]:
        return [self._family]


class FaultTolerantCollection:
    """What the exporter serves: ``registry``'s metric families, each checked on its own.

    A collector that raises, or a metric family that cannot be written (a label value that is not
    encodable text), is left out of the scrape and handed to ``on_fault``; the other families are served.
    Without this one bad series makes every scrape an HTTP 500 with nothing in it.
    """

    def __init__(self, registry: Any, on_fault: ExportFaultHandler) -> None:
        self._registry = registry
        self._on_fault = on_fault

    def _collectors(self) -> list[Any]:
        # prometheus_client's registry keeps its collectors in _collector_to_names (since its first
        # releases); collecting each on its own keeps one raising collector from ending the iteration.
        # Anything else (a restricted registry for ?name[]=...) is collected as one.
        by_collector = getattr(self._registry, "_collector_to_names", None)
        lock = getattr(self._registry, "_lock", None)
        if not isinstance(by_collector, dict) or lock is None:
            return [self._registry]
        with lock:
            return list(by_collector)

    def collect(self) -> Iterable[Metric]:
        for collector in self._collectors():
            try:
                families = list(collector.collect())
            except Exception as exc:
                self._on_fault(f"collector {type(collector).__name__}", exc)
                continue
            for family in families:
                try:
                    generate_latest(_OneFamily(family))  # what the scrape will do with it
                except Exception as exc:
                    self._on_fault(f"metric family {getattr(family, 'name', '?')}", exc)
                    continue
                yield family

    def restricted_registry(self, names: Iterable[str]) -> FaultTolerantCollection:
        """For ``/metrics?name[]=...``: the same checks on the named families only."""
        return FaultTolerantCollection(self._registry.restricted_registry(names), self._on_fault)


def _server_class(family: socket.AddressFamily) -> type[_ThreadingServer]:
    return type("_GradwatchExporterServer", (_ThreadingServer,), {"address_family": family})


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server-side TLS context from a PEM certificate chain and key, with a clear error on bad files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile=certfile, keyfile=keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"cannot load TLS certificate {certfile!r} with key {keyfile!r}: {exc}. "
            "Give PEM files (certificate chain and its unencrypted private key)."
        ) from exc
    return context


class MetricsServer:
    """Serves ``registry`` at ``http(s)://address:port/metrics`` from a daemon thread until ``close()``;
    with ``on_fault``, what cannot be served is left out and reported (:class:`FaultTolerantCollection`)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        address: str,
        port: int,
        certfile: str | None = None,
        keyfile: str | None = None,
        basic_auth: BasicAuth | None = None,
        on_fault: ExportFaultHandler | None = None,
    ) -> None:
        if (certfile is None) != (keyfile is None):
            raise ValueError("TLS needs both certfile and keyfile (or neither for plain HTTP)")
        context = tls_context(certfile, keyfile) if certfile and keyfile else None
        served: Any = registry if on_fault is None else FaultTolerantCollection(registry, on_fault)
        app: WsgiApp = make_wsgi_app(served)
        if basic_auth is not None:
            app = require_basic_auth(app, basic_auth)
        try:
            infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ValueError(f"cannot resolve exporter address {address!r}: {exc}") from exc
        family, _, _, _, sockaddr = infos[0]
        try:
            self._server = _server_class(family)((str(sockaddr[0]), port), _QuietHandler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ValueError(
                    f"port {port} on {address} is already in use (another exporter, or another gradwatch "
                    "monitor?). Pass a different port, or port 0 to pick a free one (sink.port tells which)."
                ) from exc
            raise ValueError(
                f"cannot listen on {address}:{port}: {exc.strerror or exc}. Use an address of this machine "
                "(default 127.0.0.1) and a port you may bind (>= 1024 unprivileged, or 0 for any free one)."
            ) from exc
        self._server.tls_context = context
        self._server.set_app(app)
        self.address: str = address
        self.port: int = int(self._server.server_address[1])
        self.bound_address: str = str(self._server.server_address[0])
        scheme = "https" if context is not None else "http"
        host = f"[{address}]" if ":" in address else address
        self.url: str = f"{scheme}://{host}:{self.port}/metrics"
        self._thread: threading.Thread | None = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="gradwatch-exporter",
            daemon=True,
        )
        self._thread.start()

    def release_after_fork(self) -> None:
        """In a forked child, where the serving thread does not exist (``close()`` would wait for it
        forever): close the inherited listening socket, so the port is free once the parent closes, and
        the scrape connections open at the fork, so none stays open until the child exits."""
        self._thread = None
        self._server.socket.close()
        self._server.close_inherited_connections()

    def close(self) -> None:
        """Stop serving and release the port; idempotent."""
        if self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)
        self._thread = None
