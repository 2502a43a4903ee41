"""Our /metrics as a Prometheus user meets it: a real Prometheus server (Debian's
``prometheus`` package, run here on a free loopback port with its own config and
storage in tmp) scrapes a running orchestrator, and ``promtool check metrics`` lints
the output. With CI set, a missing binary fails these tests (``.ci/setup-prometheus.sh``
installs them); elsewhere they skip."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from orchestrator.api.metrics import UNMATCHED, route_template
from tests.support.api_helpers import api_supervised, free_port, message, url_of
from tests.support.e2e import make_config, replies_to
from tests.support.helpers import until


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed (bash .ci/setup-prometheus.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path


def promtool_problems(text: str) -> tuple[int, str]:
    done = subprocess.run([binary("promtool"), "check", "metrics"], input=text.encode(),
                          capture_output=True, timeout=60)
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace").strip()


async def test_promtool_check_metrics_passes_on_our_output(tmp_path: Path,
                                                           reap_agents) -> None:
    cfg = make_config(tmp_path, groups={"helpers": {"idle_after": 0.5}})
    async with api_supervised(cfg) as (sup, client):
        created = (await client.post("/v1/messages", json=message("hi"))).json()
        await until(lambda: replies_to(cfg, created["message_id"]))
        await client.get(f"/v1/sessions/{created['session_id']}")
        await client.get("/v1/no-such-route")
        text = (await client.get("/metrics")).text
    code, problems = await asyncio.to_thread(promtool_problems, text)
    assert code == 0 and problems == "", problems
    for name in ("process_resident_memory_bytes", "process_open_fds", "python_info",
                 "python_gc_objects_collected_total", "orchestrator_admission_wait_seconds_bucket",
                 "orchestrator_http_request_duration_seconds_bucket"):
        assert f"\n{name}" in text, name
    # the route's template, never the raw path (an id in a label grows without bound)
    assert 'route="/v1/sessions/{session_id}"' in text
    assert created["session_id"] not in text
    assert f'route="{UNMATCHED}"' in text and "no-such-route" not in text
    assert 'agent_group="helpers"' in text  # a configured group is its own label


PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: orchestrator
    static_configs:
      - targets: ["{target}"]
"""


class Prometheus:
    """``prometheus`` as a child process; nothing of the Debian service is used."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(PROMETHEUS_CONFIG.replace("{target}", target))
        self.log = tmp / "prometheus.log"
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [binary("prometheus"), f"--config.file={config}",
                 f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, cwd=tmp)
        self.url = f"http://127.0.0.1:{self.port}"

    async def ready(self, http: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
            try:
                if (await http.get(f"{self.url}/-/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError("prometheus not ready within 60 s")

    async def value(self, http: httpx.AsyncClient, query: str) -> float | None:
        resp = await http.get(f"{self.url}/api/v1/query", params={"query": query})
        data = resp.json()
        assert data["status"] == "success", data
        result = data["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


async def test_a_real_prometheus_scrapes_the_reply_counter_and_start_histogram(
        tmp_path: Path, reap_agents) -> None:
    binary("prometheus")
    messages = 3  # to three chats: three sessions, three agent starts, three replies
    cfg = make_config(tmp_path)
    async with api_supervised(cfg) as (sup, client), httpx.AsyncClient(timeout=10) as http:
        target = url_of(client).removeprefix("http://")
        prom = Prometheus(tmp_path, target)
        try:
            await prom.ready(http)
            for i in range(messages):
                created = (await client.post("/v1/messages", json=message(
                    f"hi {i}", platform_id=f"room-{i}"))).json()
                await until(lambda mid=created["message_id"]: replies_to(cfg, mid),
                            message=f"reply {i}")

            async def scraped(query: str, want: float) -> None:
                deadline = time.monotonic() + 30
                got = None
                while time.monotonic() < deadline:
                    got = await prom.value(http, query)
                    if got == want:
                        return
                    await asyncio.sleep(0.25)
                raise AssertionError(f"{query}: {got}, expected {want}")

            await scraped('up{job="orchestrator"}', 1.0)
            await scraped("sum(orchestrator_replies_delivered_total)", float(messages))
            await scraped("sum(orchestrator_agent_start_duration_seconds_count)",
                          float(messages))
            await scraped('sum(orchestrator_agent_starts_total{result="ok"})', float(messages))
            await scraped('orchestrator_agent_start_duration_seconds_bucket{le="+Inf"}',
                          float(messages))
            await scraped("sum(orchestrator_admission_wait_seconds_count)", float(messages))
            # the standard collectors are scraped too
            assert (await prom.value(http, "process_resident_memory_bytes") or 0) > 1e6
            assert await prom.value(http, "count(python_info)") == 1.0
        finally:
            prom.stop()


@pytest.mark.parametrize("path, method, template", [
    ("/v1/sessions/sess-123", "GET", "/v1/sessions/{session_id}"),
    ("/v1/sessions/sess-123/stop", "POST", "/v1/sessions/{session_id}/stop"),
    ("/v1/sessions/sess-123/stop", "GET", "/v1/sessions/{session_id}/stop"),  # a 405
    ("/v1/deliveries/retry", "POST", "/v1/deliveries/retry"),
    ("/nope/sess-123", "GET", UNMATCHED),
])
def test_route_template(path: str, method: str, template: str, tmp_path: Path) -> None:
    async def h(request):  # pragma: no cover - never called
        raise AssertionError

    app = Starlette(routes=[Route("/v1/sessions/{session_id}", h),
                            Route("/v1/sessions/{session_id}/stop", h, methods=["POST"]),
                            Route("/v1/deliveries/retry", h, methods=["POST"])])
    scope = {"type": "http", "path": path, "method": method, "app": app, "root_path": ""}
    assert route_template(scope) == template
