"""``agentmesh-hub --metrics-port``: /metrics after real traffic, /healthz, JSON logs.

Real ``agentmesh-hub`` subprocesses and real agents; the counters are read from
the HTTP endpoint as Prometheus would. Waits are bounded polls.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
from agentkit import alice_and_bob
from hubproc import RawClient, wait_until
from opskit import ScriptHub, drop_pg_database, fresh_pg_database, http_get, metric
from sqlalchemy import make_url

from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.protocol import hub_protocol as hp

pytestmark = pytest.mark.timeout(120)


def scrape(hub: ScriptHub) -> str:
    status, body = http_get(hub.metrics_port, "/metrics")
    assert status == 200
    return body


def test_metrics_after_real_traffic_and_json_logs(tmp_path: Path) -> None:
    hub = ScriptHub(tmp_path, "--metrics-port", "0", "--log-format", "json").start()
    try:
        with hub.client() as client:
            alice, bob, inbox = alice_and_bob(client, tmp_path)
            alice.send("bob", text="hello")
            wait_until(lambda: inbox.texts == ["hello"])
            wait_until(
                lambda: metric(scrape(hub), "agentmesh_envelopes_delivered_total") == 1,
                what="bob's ack counted",
            )
            body = scrape(hub)
            assert metric(body, "agentmesh_envelopes_accepted_total") == 1
            assert metric(body, 'agentmesh_logins_total{kind="new"}') == 2
            assert metric(body, "agentmesh_connected_agents") == 2
            assert metric(body, "agentmesh_bound_agents") == 2
            assert metric(body, "agentmesh_database_up") == 1
            assert metric(body, "agentmesh_commit_seconds_count") >= 1
            assert metric(body, "agentmesh_connections_total") >= 2
            wait_until(lambda: metric(scrape(hub), "agentmesh_queue_depth") == 0)

            bob.close()  # offline: the next message waits in the queue
            wait_until(lambda: metric(scrape(hub), "agentmesh_connected_agents") == 1)
            alice.send("bob", text="later")
            body = scrape(hub)
            assert metric(body, "agentmesh_queue_depth") == 1
            assert metric(body, "agentmesh_envelopes_accepted_total") == 2

            # Someone else's key for alice: refused, counted by reason.
            raw = RawClient(hub.port)
            refused = raw.login("alice", IdentityKeyPair.generate())
            raw.close()
            assert isinstance(refused, hp.ErrorReceived | hp.ConnectionFailed)
            mismatch = 'agentmesh_login_failures_total{reason="identity_mismatch"}'
            wait_until(lambda: metric(scrape(hub), mismatch) == 1)
            alice.close()
        assert "agentmesh_hub_info{" in body and "process_cpu_seconds_total" in body
        status, text = http_get(hub.metrics_port, "/nothing-here")
        assert status == 404 and "/metrics" in text
    finally:
        hub.stop()

    # --log-format json: every line of the hub's log is one JSON object.
    lines = hub.log().splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert any(re.match(r"alice logged in from ", r["msg"]) for r in records)
    assert any("login refused for 'alice'" in r["msg"] for r in records)


def test_healthz_answers_503_once_the_database_is_gone(tmp_path: Path) -> None:
    """PostgreSQL: the hub's database dropped (its connections terminated) under it."""
    with fresh_pg_database() as url:
        hub = ScriptHub(tmp_path, "--metrics-port", "0", db=url).start()
        try:
            assert http_get(hub.metrics_port, "/healthz") == (200, "ok\n")
            drop_pg_database(str(make_url(url).database))
            status, text = http_get(hub.metrics_port, "/healthz")
            assert status == 503, text
            assert "database unreachable" in text and "postgres" not in text.lower()
            body = scrape(hub)  # the metrics still answer, and say why
            assert metric(body, "agentmesh_database_up") == 0
            assert "agentmesh_queue_depth " not in body
        finally:
            hub.stop()


def test_healthz_on_sqlite(tmp_path: Path) -> None:
    hub = ScriptHub(tmp_path, "--metrics-port", "0").start()
    try:
        assert http_get(hub.metrics_port, "/healthz") == (200, "ok\n")
    finally:
        hub.stop()


def test_metrics_port_without_prometheus_client_exits_2(tmp_path: Path) -> None:
    """prometheus_client made unimportable (a shadowing package), as without the extra."""
    shadow = tmp_path / "shadow" / "prometheus_client"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named prometheus_client')\n")
    hub = ScriptHub(tmp_path, "--metrics-port", "0")
    hub.env["PYTHONPATH"] = str(tmp_path / "shadow")
    assert hub.run_to_exit() == 2
    assert 'pip install "agentmesh[metrics]"' in hub.log()
    assert "Traceback" not in hub.log()


def test_metrics_port_in_use_exits_1_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        hub = ScriptHub(tmp_path, "--metrics-port", str(port))
        assert hub.run_to_exit() == 1
    assert f"metrics port 127.0.0.1:{port}" in hub.log()
    assert "Traceback" not in hub.log()


def test_hooks_count_what_they_are_named() -> None:
    """The Prometheus hooks in process: labels, login refusals by the protocol, commits."""
    from agentmesh.hub.metrics import LOGIN_REFUSALS, PrometheusHubMetrics
    from agentmesh.hub.store import EnqueueResult, EnqueueStatus

    m = PrometheusHubMetrics()

    def value(name: str, **labels: str) -> float:
        found = m.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    for status in EnqueueStatus:
        m.send_committed(EnqueueResult(status, 1 if status is EnqueueStatus.STORED else None))
    m.send_committed(OSError("disk full"))
    assert value("agentmesh_envelopes_accepted_total") == 1
    assert value("agentmesh_envelopes_duplicate_total") == 1
    assert value("agentmesh_envelopes_refused_total", reason="mailbox_full") == 1
    assert value("agentmesh_envelopes_refused_total", reason="unknown_recipient") == 1
    assert value("agentmesh_envelopes_refused_total", reason="error") == 1

    for code in sorted(LOGIN_REFUSALS):
        m.connection_error(code, by_peer=False, logged_in=False)
        assert value("agentmesh_login_failures_total", reason=code) == 1
    m.connection_error("bad_frame", by_peer=False, logged_in=True)
    m.connection_error("wrong_hub", by_peer=True, logged_in=False)  # the peer's, not a login
    assert value("agentmesh_login_failures_total", reason="wrong_hub") == 1
    assert value("agentmesh_connection_errors_total", code="bad_frame", side="hub") == 1
    assert value("agentmesh_connection_errors_total", code="wrong_hub", side="peer") == 1

    m.commit(0.002, 3, ok=True)
    m.commit(0.2, 1, ok=False)
    assert value("agentmesh_commit_seconds_count") == 2
    assert value("agentmesh_commit_seconds_bucket", le="0.0025") == 1
    assert value("agentmesh_commit_batch_envelopes_sum") == 4
    assert value("agentmesh_store_errors_total", operation="commit") == 1
    m.login_succeeded(new=False)
    m.delivered(5)
    m.purged(2)
    m.connection_refused("too_many_connections")
    m.request_rejected("rate_limited")
    assert value("agentmesh_logins_total", kind="returning") == 1
    assert value("agentmesh_envelopes_delivered_total") == 5
    assert value("agentmesh_envelopes_purged_total") == 2
    assert value("agentmesh_connections_refused_total", reason="too_many_connections") == 1
    assert value("agentmesh_requests_rejected_total", code="rate_limited") == 1
