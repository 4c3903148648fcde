"""What a running hub tells its operator: Prometheus metrics and a health check.

:class:`HubMetrics` is the set of hooks :mod:`agentmesh.hub.server` calls at the
events an operator counts (a connection, a login, a commit, an acknowledged
delivery, a refusal); its methods do nothing, so a hub without
``metrics_port`` pays one empty call per event and needs no extra package.
:class:`PrometheusHubMetrics` records them with ``prometheus_client`` (the
``metrics`` extra) in a registry of its own, and :class:`OpsEndpoint` serves
that registry at ``/metrics`` and a database health check at ``/healthz`` on
their own HTTP port.

The metrics (all prefixed ``agentmesh_``)::

    envelopes_accepted_total            stored by a commit (new, not duplicates)
    envelopes_duplicate_total           acknowledged again without storing
    envelopes_refused_total{reason}     mailbox_full, unknown_recipient, error
    envelopes_delivered_total           acknowledged by their recipient
    envelopes_purged_total              deleted after their TTL
    commit_seconds                      histogram: one group commit (enqueue transaction)
    commit_batch_envelopes              histogram: envelopes per group commit
    logins_total{kind}                  new (first binding) or returning
    login_failures_total{reason}        identity_mismatch, bad_signature, wrong_hub, ...
    connections_total                   accepted
    connections_refused_total{reason}   too_many_connections, shutting_down
    connection_errors_total{code,side}  fatal errors: side=hub (the hub closed it:
                                        bad frame, timeout, replaced) or peer
    requests_rejected_total{code}       non-fatal refusals (rate_limited, not_found, ...)
    store_errors_total{operation}       database failures: commit, ack, login, read, request, purge
    connected_agents                    gauge: agents logged in on this hub
    connections                         gauge: open connections (logged in or not)
    queue_depth, queue_bytes            gauges: envelopes (bytes) queued in the database
    bound_agents                        gauge: agent ids bound in the database
    database_up                         gauge: 1 if the last scrape could read the database
    hub_info{version}                   always 1

The database gauges are read at scrape time (one read transaction); on a
database shared by several hubs they are the same on each.

Threads
    The hooks are called from the event-loop thread and the writer thread;
    ``prometheus_client`` metrics are thread-safe. :class:`OpsEndpoint` owns
    one server thread (``agentmesh-hub-metrics``) plus a thread per request
    and one health-check thread; :meth:`OpsEndpoint.close` stops them. No lock
    of this module is held while calling into the store or the hub.

Never imported by ``agentmesh`` itself; ``prometheus_client`` is imported only
when :class:`PrometheusHubMetrics` is created.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import importlib.util
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from agentmesh.errors import ConfigurationError
from agentmesh.hub.store import EnqueueResult, HubStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

logger = logging.getLogger("agentmesh.hub.metrics")

__all__ = [
    "LOGIN_REFUSALS",
    "METRICS_INSTALL",
    "HubMetrics",
    "OpsEndpoint",
    "PrometheusHubMetrics",
    "metrics_available",
]

#: What to install for ``--metrics-port``.
METRICS_INSTALL: Final = 'pip install "agentmesh[metrics]"'
#: ERROR codes with which the protocol machine itself refuses a LOGIN.
LOGIN_REFUSALS: Final = frozenset(
    {
        "unsupported_version",
        "weak_key",
        "wrong_hub",
        "channel_binding_mismatch",
        "bad_signature",
        "bad_bundle",
    }
)
#: Seconds /healthz waits for the database before answering 503.
HEALTH_TIMEOUT_S: Final = 5.0
_COMMIT_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


def _installed_version() -> str:
    try:
        return importlib.metadata.version("agentmesh")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def metrics_available() -> bool:
    """Whether ``prometheus_client`` is installed (the ``metrics`` extra)."""
    return importlib.util.find_spec("prometheus_client") is not None


class HubMetrics:
    """The hooks the hub server calls; this base class records nothing.

    Every method is cheap and never raises; the counts are what they are named.
    """

    def connection_accepted(self) -> None:
        """A connection was accepted (before any login)."""

    def connection_refused(self, reason: str) -> None:
        """A connection was closed on arrival (``too_many_connections``, ``shutting_down``)."""

    def connection_error(self, code: str, *, by_peer: bool, logged_in: bool) -> None:
        """A connection ended with a fatal ERROR ``code``: sent by the peer, or by the hub.

        A hub-side refusal of a LOGIN by the protocol machine (``code`` in
        :data:`LOGIN_REFUSALS`, before login) also counts as a login failure.
        """

    def request_rejected(self, code: str) -> None:
        """A request was refused without closing the connection."""

    def login_succeeded(self, *, new: bool) -> None:
        """An agent logged in; ``new``: its id was bound now."""

    def login_failed(self, reason: str) -> None:
        """A verified login was refused (``identity_mismatch``, ``internal``)."""

    def send_committed(self, result: EnqueueResult | BaseException) -> None:
        """A SEND's commit outcome (an exception: the commit failed)."""

    def commit(self, seconds: float, envelopes: int, *, ok: bool) -> None:
        """One group commit of ``envelopes`` SENDs took ``seconds``."""

    def delivered(self, count: int) -> None:
        """Recipients acknowledged ``count`` pushed envelopes."""

    def purged(self, count: int) -> None:
        """``count`` expired envelopes were deleted."""

    def store_error(self, operation: str) -> None:
        """A database operation failed (it is logged with its traceback too)."""


class PrometheusHubMetrics(HubMetrics):
    """:class:`HubMetrics` recorded in a ``prometheus_client`` registry of its own.

    Raises :class:`~agentmesh.errors.ConfigurationError` if ``prometheus_client``
    is not installed.
    """

    def __init__(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            raise ConfigurationError(
                f"metrics need the prometheus_client package: {METRICS_INSTALL}"
            ) from None
        self.registry = registry = prom.CollectorRegistry()
        prom.ProcessCollector(registry=registry)
        prom.PlatformCollector(registry=registry)
        counter, gauge, histogram = prom.Counter, prom.Gauge, prom.Histogram
        kw: dict[str, Any] = {"namespace": "agentmesh", "registry": registry}
        gauge("hub_info", "This hub's AgentMesh version", ["version"], **kw).labels(
            version=_installed_version()
        ).set(1)

        self._accepted = counter(
            "envelopes_accepted", "Envelopes stored by a commit (duplicates excluded)", **kw
        )
        self._duplicates = counter(
            "envelopes_duplicate", "Envelopes acknowledged again without storing", **kw
        )
        self._refused = counter(
            "envelopes_refused", "Envelopes the hub refused to store", ["reason"], **kw
        )
        self._delivered = counter(
            "envelopes_delivered", "Envelopes acknowledged by their recipient", **kw
        )
        self._purged = counter("envelopes_purged", "Envelopes deleted after their TTL", **kw)
        self._commit_seconds = histogram(
            "commit_seconds",
            "Duration of one group commit of SENDs (one database transaction)",
            buckets=_COMMIT_BUCKETS,
            **kw,
        )
        self._commit_batch = histogram(
            "commit_batch_envelopes", "SENDs per group commit", buckets=_BATCH_BUCKETS, **kw
        )
        self._logins = counter("logins", "Successful logins", ["kind"], **kw)
        self._login_failures = counter("login_failures", "Refused logins", ["reason"], **kw)
        self._connections = counter("connections", "Accepted connections", **kw)
        self._refused_connections = counter(
            "connections_refused", "Connections closed on arrival", ["reason"], **kw
        )
        self._connection_errors = counter(
            "connection_errors",
            "Connections ended by a fatal error (side: who sent it)",
            ["code", "side"],
            **kw,
        )
        self._rejected = counter(
            "requests_rejected", "Requests refused without closing the connection", ["code"], **kw
        )
        self._store_errors = counter(
            "store_errors", "Failed database operations", ["operation"], **kw
        )
        # Pre-create the series an alert looks for, so they read 0 instead of absent.
        for reason in ("mailbox_full", "unknown_recipient", "error"):
            self._refused.labels(reason=reason)
        for kind in ("new", "returning"):
            self._logins.labels(kind=kind)
        for operation in ("commit", "ack", "login", "read", "request", "purge"):
            self._store_errors.labels(operation=operation)

    # -- the hooks ------------------------------------------------------

    def connection_accepted(self) -> None:
        self._connections.inc()

    def connection_refused(self, reason: str) -> None:
        self._refused_connections.labels(reason=reason).inc()

    def connection_error(self, code: str, *, by_peer: bool, logged_in: bool) -> None:
        self._connection_errors.labels(code=code, side="peer" if by_peer else "hub").inc()
        if not by_peer and not logged_in and code in LOGIN_REFUSALS:
            self._login_failures.labels(reason=code).inc()

    def request_rejected(self, code: str) -> None:
        self._rejected.labels(code=code).inc()

    def login_succeeded(self, *, new: bool) -> None:
        self._logins.labels(kind="new" if new else "returning").inc()

    def login_failed(self, reason: str) -> None:
        self._login_failures.labels(reason=reason).inc()

    def send_committed(self, result: EnqueueResult | BaseException) -> None:
        if isinstance(result, BaseException):
            self._refused.labels(reason="error").inc()
        elif result.status.value == "stored":
            self._accepted.inc()
        elif result.status.value == "duplicate":
            self._duplicates.inc()
        else:
            self._refused.labels(reason=result.status.value).inc()

    def commit(self, seconds: float, envelopes: int, *, ok: bool) -> None:
        self._commit_seconds.observe(seconds)
        self._commit_batch.observe(envelopes)
        if not ok:
            self._store_errors.labels(operation="commit").inc()

    def delivered(self, count: int) -> None:
        self._delivered.inc(count)

    def purged(self, count: int) -> None:
        self._purged.inc(count)

    def store_error(self, operation: str) -> None:
        self._store_errors.labels(operation=operation).inc()

    # -- gauges read at scrape time -------------------------------------

    def watch(
        self,
        store: HubStore,
        connected_agents: Callable[[], int],
        connections: Callable[[], int],
    ) -> None:
        """Add the gauges read at scrape time: the hub's (callables) and the database's."""
        self.registry.register(_LiveCollector(store, connected_agents, connections))


class _LiveCollector:
    """Gauges computed when Prometheus scrapes: the hub's connections and the database's queue.

    A database that cannot be read gives ``database_up 0`` and no queue gauges,
    rather than a failed scrape.
    """

    def __init__(
        self,
        store: HubStore,
        connected_agents: Callable[[], int],
        connections: Callable[[], int],
    ) -> None:
        self._store = store
        self._connected_agents = connected_agents
        self._connections = connections

    def describe(self) -> Iterable[Any]:
        return []  # unchecked: the families depend on the database's state

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        def gauge(name: str, text: str, value: float) -> Any:
            return GaugeMetricFamily(f"agentmesh_{name}", text, value=value)

        yield gauge("connected_agents", "Agents logged in on this hub", self._connected_agents())
        yield gauge("connections", "Open connections on this hub", self._connections())
        try:
            stats = self._store.stats()
        except Exception as exc:
            logger.warning("metrics: cannot read the database: %s", type(exc).__name__)
            yield gauge("database_up", "1 if this scrape could read the database", 0)
            return
        yield gauge("database_up", "1 if this scrape could read the database", 1)
        yield gauge("queue_depth", "Envelopes queued in the database", stats["envelopes"])
        yield gauge("queue_bytes", "Body bytes queued in the database", stats["bytes"])
        yield gauge("bound_agents", "Agent ids bound in the database", stats["agents"])


# --- the HTTP endpoint -------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics endpoint: " + format, *args)


class OpsEndpoint:
    """``/metrics`` and ``/healthz`` on ``host``:``port`` (``port=0``: any free port).

    ``/healthz`` answers ``200 ok`` when :meth:`HubStore.ping` succeeds within
    :data:`HEALTH_TIMEOUT_S` seconds, ``503`` otherwise (the body names the
    exception type, never a URL or a password). The constructor binds the
    socket (raising :class:`OSError` if it cannot) and starts serving.
    """

    def __init__(
        self, metrics: PrometheusHubMetrics, store: HubStore, host: str, port: int
    ) -> None:
        from prometheus_client import make_wsgi_app

        self._store = store
        self._metrics_app = make_wsgi_app(metrics.registry)
        # One health check at a time; a hung database makes the next ones time out.
        self._checker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="agentmesh-hub-health"
        )
        server_class = _Server6 if ":" in host else _Server
        try:
            self._httpd = make_server(
                host, port, self._app, server_class=server_class, handler_class=_QuietHandler
            )
        except OSError as exc:
            self._checker.shutdown(wait=False)
            raise OSError(exc.errno, f"metrics port {host}:{port}: {exc.strerror}") from exc
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="agentmesh-hub-metrics",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and end the endpoint's threads (waits for them)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._checker.shutdown(wait=False, cancel_futures=True)

    def health(self) -> tuple[bool, str]:
        """``(healthy, reason)``: whether the hub can read its database right now."""
        try:
            self._checker.submit(self._store.ping).result(timeout=HEALTH_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            return False, f"database did not answer within {HEALTH_TIMEOUT_S:g}s"
        except Exception as exc:
            return False, f"database unreachable ({type(exc).__name__})"
        return True, "ok"

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            healthy, reason = self.health()
            status = "200 OK" if healthy else "503 Service Unavailable"
            body = (reason + "\n").encode()
            if not healthy:
                logger.warning("health check failed: %s", reason)
        else:
            status, body = "404 Not Found", b"try /metrics or /healthz\n"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [body]
