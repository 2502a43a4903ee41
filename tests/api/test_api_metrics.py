"""api.metrics: the stop-reason rule and what each notification counts."""

from __future__ import annotations

import pytest

from orchestrator.api.metrics import Metrics, group_label, inotify_watches, stop_reason


@pytest.mark.parametrize("reason, label", [
    ("stopped: idle for 300s", "idle"),
    ("killed: heartbeat 1900s old (limit 1800s)", "ceiling"),
    ("killed: claim on m1 70s old with no heartbeat since (limit 60s)", "claim_stuck"),
    ("stopped at orchestrator shutdown", "shutdown"),
    ("stopped: requested through the API", "requested"),
    ("agent exited, exit code 1", "crash"),
    ("agent killed by signal 9", "crash"),
    ("no agent running", "crash"),
    ("stopped: max_run: ran 3600s (max_run 3600s)", "max_run"),
    ("killed: max_run: ran 3900s (max_run 3600s) and was not idle within max_run_grace (300s)",
     "max_run"),
])
def test_stop_reason(reason: str, label: str) -> None:
    assert stop_reason(reason) == label


def sample(m: Metrics, name: str, labels: dict | None = None) -> float | None:
    return m.registry.get_sample_value(name, labels or {})


def test_notifications_feed_the_counters() -> None:
    m = Metrics(runtime="local", channel="webhook", version="1", statuses=lambda: [
        "running", "running", "stopped"], queue_length=lambda: 4,
        rescans=lambda: {"events_lost": 3, "Queue Overflow!": 1}, groups=["support"],
        webhook_responses=lambda: {"200": 5, "503": 2, "error": 1})
    g = {"agent_group": "support"}
    m.observe("status", {"old": "running", "status": "stopped", "reason": "stopped: idle", **g})
    m.observe("status", {"old": "stopped", "status": "stopped", "reason": "x", **g})  # no stop
    m.observe("status", {"old": "stopped", "status": "running", "reason": "agent started"})
    m.observe("reply_delivered", {"delay_seconds": 0.02, **g})
    m.observe("reply_delivered", {"delay_seconds": None, "agent_group": "chosen-by-a-client"})
    m.observe("reply_failed", g)
    m.observe("message_failed", {"agent_group": "default"})
    m.observe("agent_start", {"result": "ok", "seconds": 0.3, "waited": 2.0, **g})
    m.observe("agent_start", {"result": "ok", "seconds": 0.3, "waited": None, **g})
    m.observe("agent_start", {"result": "error", "seconds": 0.0, **g})
    s = {"agent_group": "support"}
    assert sample(m, "orchestrator_agent_stops_total", {"reason": "idle", **s}) == 1
    assert sample(m, "orchestrator_agent_stops_total", {"reason": "crash", **s}) == 0
    assert sample(m, "orchestrator_replies_delivered_total", {"channel": "webhook", **s}) == 1
    assert sample(m, "orchestrator_replies_delivered_total",
                  {"channel": "webhook", "agent_group": "other"}) == 1  # not configured
    assert sample(m, "orchestrator_replies_failed_total", {"channel": "webhook", **s}) == 1
    assert sample(m, "orchestrator_reply_delivery_delay_seconds_count",
                  {"channel": "webhook", **s}) == 1
    assert sample(m, "orchestrator_messages_failed_total", {"agent_group": "default"}) == 1
    assert sample(m, "orchestrator_agent_starts_total",
                  {"runtime": "local", "result": "ok", **s}) == 2
    assert sample(m, "orchestrator_agent_starts_total",
                  {"runtime": "local", "result": "error", **s}) == 1
    assert sample(m, "orchestrator_agent_start_duration_seconds_count",
                  {"runtime": "local", **s}) == 2
    assert sample(m, "orchestrator_admission_wait_seconds_count", s) == 1
    assert sample(m, "orchestrator_admission_wait_seconds_sum", s) == 2.0
    assert sample(m, "orchestrator_webhook_responses_total", {"code": "503"}) == 2
    assert sample(m, "orchestrator_webhook_responses_total", {"code": "error"}) == 1
    assert sample(m, "orchestrator_watch_rescans_total", {"cause": "queue_overflow"}) == 1
    assert sample(m, "orchestrator_watch_rescans_total", {"cause": "events_lost"}) == 3
    assert sample(m, "orchestrator_watch_rescans_total", {"cause": "watch_restarted"}) == 0
    assert sample(m, "orchestrator_sessions", {"status": "running"}) == 2
    assert sample(m, "orchestrator_sessions", {"status": "idle"}) == 0
    assert sample(m, "orchestrator_admission_queue_length") == 4
    text = m.render().decode()
    assert "# TYPE orchestrator_agent_stops_total counter" in text
    assert "process_resident_memory_bytes" in text and "python_info" in text
    assert "python_gc_objects_collected_total" in text
    # every configured group (and the default) is there from the start, at 0
    assert sample(m, "orchestrator_replies_delivered_total",
                  {"channel": "webhook", "agent_group": "default"}) == 0


@pytest.mark.parametrize("group, label", [
    ("support", "support"), ("default", "default"), ("other", "other"),
    ("anything-else", "other"), (None, "other"),
])
def test_group_label_is_bounded_by_the_config(group, label) -> None:
    assert group_label(group, frozenset({"support"})) == label


def test_inotify_watches_counts_wd_lines(tmp_path) -> None:
    fdinfo = tmp_path / "fdinfo"
    fdinfo.mkdir()
    (fdinfo / "3").write_text("pos:\t0\nflags:\t02\ninotify wd:1 ino:2\ninotify wd:2 ino:3\n")
    (fdinfo / "4").write_text("pos:\t0\n")
    assert inotify_watches(str(fdinfo)) == 2
    assert inotify_watches(str(tmp_path / "missing")) == 0
