"""Issue 14: the dashboard in a real headless Chromium, over a real etcd, control plane (with
auth), Envoy and upstreams under live traffic.

Chromium is driven through chromedriver by selenium; its calls block, so they run in a
thread while the control plane keeps serving on the test's loop. A missing chromium or
chromedriver skips here and fails under CI=true (`make test` installs both).
Set GRAYLANE_SCREENSHOTS=1 to save the main pages' screenshots under docs/screenshots/.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from graylane.controlplane.api import auth
from graylane.controlplane.api.client import Action, ReleaseClient
from graylane.controlplane.api.release_service import token_record
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.domain.manifest import load_manifest
from graylane.controlplane.local.envoy import EnvoyProcess
from graylane.controlplane.store import EtcdStore
from graylane.deploy.local.traffic import run_load
from graylane.deploy.local.upstream import Upstream
from graylane.v1 import agent_pb2 as apb
from graylane.v1 import release_pb2 as pb

from tests.conftest import require_binary
from tests.integration.conftest import lane_spec
from tests.integration.test_agent_registry import EAST, runs
from tests.integration.test_agent_registry import connect as connect_agent

pytestmark = [pytest.mark.etcd, pytest.mark.envoy]

SERVICE = "checkout"
REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def _webdriver() -> Any:
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    require_binary(chromium and driver, "the dashboard tests need chromium and chromium-driver: run `make browser`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=str(driver)))


class Browser:
    """Selenium calls in a thread (they block); waits poll with a deadline."""

    def __init__(self, driver: Any, base: str) -> None:
        self.driver = driver
        self.base = base

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def open(self, path: str) -> None:
        await self.run(self.driver.get, self.base + path)

    async def _on(self, css: str, act: Callable[[Any], T], *, timeout: float = 10.0) -> T:
        """`act(element)` on the first match of `css`, found afresh each try: the live page
        replaces elements as updates arrive, so a found element may go stale before use."""
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By

        def once() -> tuple[bool, Any]:
            try:
                found = self.driver.find_elements(By.CSS_SELECTOR, css)
                return (True, act(found[0])) if found else (False, None)
            except StaleElementReferenceException:
                return False, None

        try:
            async with asyncio.timeout(timeout):
                while not (result := await self.run(once))[0]:
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"{css}: not found after {timeout} s") from None
        return result[1]  # type: ignore[no-any-return]

    async def text(self, css: str) -> str:
        """What the element shows: its text, or the value of a form field."""
        return await self._on(
            css, lambda e: str(e.get_property("value") if e.tag_name in ("textarea", "input") else e.text)
        )

    async def until(self, css: str, check: Callable[[str], bool], *, timeout: float = 10.0) -> str:
        seen = ""
        try:
            async with asyncio.timeout(timeout):
                while not check(seen := await self.text(css)):
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"{css}: still {seen!r} after {timeout} s") from None
        return seen

    async def attribute(self, css: str, name: str) -> str | None:
        return await self._on(css, lambda e: e.get_attribute(name))

    async def click(self, css: str) -> None:
        await self._on(css, lambda e: e.click())

    async def type(self, css: str, text: str) -> None:
        def clear_and_type(e: Any) -> None:
            e.clear()
            e.send_keys(text)

        await self._on(css, clear_and_type)

    async def script(self, source: str, *args: Any) -> Any:
        return await self.run(self.driver.execute_script, source, *args)

    async def login(self, token: str) -> None:
        await self.open("/ui/")
        await self.type("#token", token)
        await self.click("#login")
        await self.until("#who", lambda t: "(" in t)

    async def screenshot(self, name: str, tmp: Path, *, points: int = 0) -> None:
        """Save the page as PNG (under docs/screenshots/ with GRAYLANE_SCREENSHOTS=1, where
        a release page first waits for `points` seconds of chart data, to show a curve)."""
        target = tmp
        if os.environ.get("GRAYLANE_SCREENSHOTS") == "1":
            target = REPO / "docs" / "screenshots"
            if points:
                await self.until("#charts", lambda _: True)
                async with asyncio.timeout(points + 15):
                    while int(await self.attribute("#charts", "data-points") or 0) < points:
                        await asyncio.sleep(0.5)
        target.mkdir(parents=True, exist_ok=True)
        await self.run(self.driver.save_screenshot, str(target / f"{name}.png"))


@dataclass
class Stack:
    plane: ControlPlane
    envoy: EnvoyProcess
    browser: Browser
    tokens: dict[str, str]

    def client(self, role: str) -> contextlib.AbstractAsyncContextManager[ReleaseClient]:
        return ReleaseClient.connect(f"127.0.0.1:{self.plane.api_port}", token=self.tokens[role])

    async def v2_share(self, count: int = 400) -> float:
        result = await run_load(
            self.envoy.listen_port, authority=SERVICE, count=count, max_seconds=20, concurrency=8, keep_versions=True
        )
        assert result.failed == 0, (result.statuses, result.errors)
        return result.share("v2")


def spec(weights: tuple[int, ...] = (50, 100)) -> pb.ReleaseSpec:
    tester = pb.MatchRule(conditions=[pb.Condition(kind=pb.HEADER, name="x-user", op=pb.EXACT, value="tester")])
    return lane_spec(SERVICE, "checkout-v2", rules=[tester], weights=weights)  # a canary (the default strategy)


@pytest.fixture
async def stack(store: EtcdStore, envoy: Any) -> AsyncIterator[Stack]:
    driver = await asyncio.to_thread(_webdriver)
    tokens = {}
    for role in ("admin", "operator", "viewer"):
        made = auth.new_token()
        await store.create_token(token_record(name=f"{role}-1", role=role, made=made, created_by="test"))
        tokens[role] = made.token
    try:
        async with contextlib.AsyncExitStack() as es:
            v1 = await es.enter_async_context(Upstream(SERVICE, "v1"))
            v2 = await es.enter_async_context(Upstream(SERVICE, "v2"))
            plane = ControlPlane(
                store, api_listen="127.0.0.1:0", xds_listen="127.0.0.1:0", http_listen="127.0.0.1:0", auth=True
            )
            await es.enter_async_context(plane.running())
            proxy = await envoy(ads_port=plane.xds_port, protocol="delta", node_id="envoy-dash")
            s = Stack(plane, proxy, Browser(driver, f"http://127.0.0.1:{plane.http_port}"), tokens)
            async with s.client("admin") as admin:
                await admin.put_service(pb.Service(name=SERVICE, stable_version="v1"))
                for up, name in ((v1, "v1"), (v2, "v2")):
                    meta = pb.VersionMetadata(
                        author="dev@example.com", change_summary=f"{name} build", image=f"img:{name}"
                    )
                    endpoints = [pb.Endpoint(address="127.0.0.1", port=up.port)]
                    await admin.put_version(pb.Version(service=SERVICE, name=name, metadata=meta, endpoints=endpoints))
            yield s
    finally:
        await asyncio.to_thread(driver.quit)


async def _load_until(stack: Stack, stop: asyncio.Event) -> None:
    """Steady traffic through Envoy for the charts, in bounded rounds until stopped."""
    for _ in range(60):
        if stop.is_set():
            return
        await run_load(stack.envoy.listen_port, authority=SERVICE, count=200, max_seconds=2, rate=100, stop=stop)


async def test_operator_moves_a_release_and_a_viewer_is_refused(stack: Stack, tmp_path: Path) -> None:
    b = stack.browser
    async with stack.client("operator") as operator:
        await operator.apply_release(pb.Release(name="rel", spec=spec()))
    stop = asyncio.Event()
    load = asyncio.create_task(_load_until(stack, stop))
    try:
        # Without a session every read is refused and the page asks for a token.
        await b.open("/ui/")
        await b.text("#token")
        await b.type("#token", "glt_0000000000000000_not-a-real-token-aaaaaaaaaaaaaaaaaaaaaaaaa")
        await b.click("#login")
        await b.until("#login-error", lambda t: "not valid" in t)

        # A viewer sees the release, its buttons disabled with the reason, and the API refuses
        # the action even when the page is bypassed.
        await b.login(stack.tokens["viewer"])
        await b.until("#releases tr[data-name=rel] .phase", lambda t: t == "PENDING")
        await b.open("/ui/#/release/rel")
        await b.until("#rel-phase", lambda t: t == "PENDING")
        assert await b.attribute("#actions button[data-action=next]", "disabled") is not None
        assert "needs role operator (you are viewer)" in (
            await b.attribute("#actions button[data-action=next]", "title") or ""
        )
        refused = await b.script(
            """return fetch('/ui/api/session').then(r => r.json()).then(s => fetch('/ui/api/releases/rel/next', {
                 method: 'POST', body: '{}',
                 headers: {'Content-Type': 'application/json', 'X-Graylane-CSRF': s.csrf}}))
               .then(async r => [r.status, (await r.json()).code]);"""
        )
        assert refused == [403, "PERMISSION_DENIED"], refused
        await b.click("#logout")
        await b.text("#token")

        # An operator acts: next batch from the page, with confirmation; Envoy's routes follow.
        await b.login(stack.tokens["operator"])
        await b.open("/ui/#/release/rel")
        await b.until("#rel-phase", lambda t: t == "PENDING")
        await b.click("#actions button[data-action=next]")
        await b.click("#confirm-ok")
        await b.until("#rel-phase", lambda t: t == "PROGRESSING")
        await b.until("#rel-weight", lambda t: t == "50 %")
        await b.until("#rel-converged", lambda t: t == "1 / 1", timeout=15)
        share = await stack.v2_share()
        assert 0.35 < share < 0.65, share
        # The charts draw the metrics stream under the live traffic.
        await b.text("#chart-share canvas")
        await b.until("#totals", lambda t: "checkout v2 checkout-v2" in t)
        await b.until("#history", lambda t: "token:operator-1" in t)

        # A batch moved by someone else shows up on the open page.
        async with stack.client("operator") as operator:
            await operator.act(Action.NEXT, "rel", reason="moved by a pipeline")
        await b.until("#rel-weight", lambda t: t == "100 %", timeout=3)
        await b.until("#plan li.current", lambda t: t.startswith("2."))
        await b.until("#rel-converged", lambda t: t == "1 / 1", timeout=15)
        assert await stack.v2_share() == 1.0
        await b.screenshot("release", tmp_path)

        # Roll back from the page: every request is back on v1.
        await b.click("#actions button[data-action=rollback]")
        await b.click("#confirm-ok")
        await b.until("#rel-phase", lambda t: t == "ROLLED_BACK")
        await b.until("#rel-converged", lambda t: t == "1 / 1", timeout=15)
        assert await stack.v2_share() == 0.0
        assert "not while ROLLED_BACK" in (await b.attribute("#actions button[data-action=next]", "title") or "")

        await b.open("/ui/#/releases")
        await b.until("#releases tr[data-name=rel] .phase", lambda t: t == "ROLLED_BACK")
        await b.screenshot("releases", tmp_path)

        # The form writes the YAML view; the API's own validation message is shown inline.
        await b.open("/ui/#/new")
        await b.until("#yaml", lambda t: "name: checkout-v2" in t)
        await b.type("#form [name=name]", "bad")
        await b.type("#batches-form .batch-row [name=weight]", "150")
        await b.click("#add-rule")
        await b.until("#yaml", lambda t: "name: bad" in t and "weight: 150" in t and t.count("- conditions:") == 2)
        yaml_text = await b.script("return document.getElementById('yaml').value")
        (bad,) = load_manifest(yaml_text)
        async with stack.client("operator") as operator:
            with pytest.raises(grpc.aio.AioRpcError) as refused_by_api:
                await operator.apply_release(bad)  # type: ignore[arg-type]
        assert refused_by_api.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        await b.click("#apply")
        shown = await b.until("#apply-error", lambda t: bool(t))
        assert shown == refused_by_api.value.details(), shown
        # The field it names is marked in the form.
        assert shown.startswith("spec.match[1].conditions[0].name: "), shown
        marked = await b.attribute("#rules-form .rule:nth-child(2) .cond [name=cname]", "class")
        assert "invalid" in (marked or ""), marked
        await b.screenshot("edit", tmp_path)

        # An existing release loads into the form, and its YAML applies as it is.
        await b.open("/ui/#/edit/rel")
        await b.until("#yaml", lambda t: "name: rel" in t and "weight: 50" in t)
        await b.click("#apply")
        await b.until("#apply-done", lambda t: "Applied" in t and "ROLLED_BACK" in t)

        # An action without the session's CSRF header is refused before it reaches the API.
        status = await b.script(
            """return fetch('/ui/api/releases/rel/restart', {method: 'POST', body: '{}',
                 headers: {'Content-Type': 'application/json'}}).then(r => r.status);"""
        )
        assert status == 403

        # Without the chart library the page says how to install it instead of failing.
        stack.plane.dashboard.vendor_dir = tmp_path / "no-such-dir"
        await b.open("/ui/#/release/rel")
        await b.run(b.driver.refresh)
        await b.until("#charts-missing", lambda t: "make ui" in t)
        await b.until("#rel-phase", lambda t: t == "ROLLED_BACK")

    finally:
        stop.set()
        await load


ANALYSED = """
kind: Release
name: rel
spec:
  lane: checkout-v2
  entry: checkout
  services: [{service: checkout, base_version: v1, gray_version: v2}]
  batches: [{weight: 30}, {weight: 100}]
  analysis: {interval: 1s, min_requests: 10, max_error_rate: 0.05}
"""


async def test_open_mode_needs_no_login_and_marks_analysis_verdicts(
    store: EtcdStore, envoy: Any, tmp_path: Path
) -> None:
    """Without --auth the dashboard is open, as the API is; actions are recorded as
    `dashboard`. A release judged on live metrics shows its verdicts on the timeline."""
    driver = await asyncio.to_thread(_webdriver)
    try:
        async with contextlib.AsyncExitStack() as es:
            v1 = await es.enter_async_context(Upstream(SERVICE, "v1"))
            v2 = await es.enter_async_context(Upstream(SERVICE, "v2"))
            plane = ControlPlane(
                store,
                api_listen="127.0.0.1:0",
                xds_listen="127.0.0.1:0",
                http_listen="127.0.0.1:0",
                leader_ttl_seconds=2,
                analysis_tick_seconds=0.1,
            )
            await es.enter_async_context(plane.running())
            proxy = await envoy(ads_port=plane.xds_port, protocol="sotw", node_id="envoy-open")
            client = await es.enter_async_context(ReleaseClient.connect(f"127.0.0.1:{plane.api_port}"))
            await client.put_service(pb.Service(name=SERVICE, stable_version="v1"))
            for up, name in ((v1, "v1"), (v2, "v2")):
                endpoints = [pb.Endpoint(address="127.0.0.1", port=up.port)]
                await client.put_version(pb.Version(service=SERVICE, name=name, endpoints=endpoints))
            stop = asyncio.Event()
            load = asyncio.create_task(
                run_load(proxy.listen_port, authority=SERVICE, count=20_000, max_seconds=40, rate=200, stop=stop)
            )
            try:
                b = Browser(driver, f"http://127.0.0.1:{plane.http_port}")
                await b.open("/ui/#/new")
                await b.until("#who", lambda t: "open mode" in t)
                assert await b.attribute("#logout", "hidden") is not None
                # The YAML view is what Apply sends; typed in, it is applied as it is.
                await b.until("#yaml", lambda t: "kind: Release" in t)
                await b.script("document.getElementById('yaml').value = arguments[0]", ANALYSED)
                await b.click("#apply")
                await b.until("#apply-done", lambda t: "Applied" in t)
                await b.click("#apply-done a")
                # Nobody touches it afterwards: analysis passes each batch on live traffic.
                await b.until("#rel-phase", lambda t: t == "SUCCEEDED", timeout=30)
                timeline = await b.text("#history")
                assert "create" in timeline and "by dashboard" in timeline, timeline
                assert "verdict=pass" in await b.text("#history li.verdict-pass")
                await b.text("#chart-p99 canvas")
                await b.screenshot("release-analysis", tmp_path, points=20)
                stop.set()
                await load

                # Clusters: an agent registered the way the AgentService does it.
                await b.open("/ui/#/clusters")
                await b.until("#clusters", lambda t: "No agent" in t)
                session = await connect_agent(plane.agents, EAST, runs("east", "v2", 9999))
                row = await b.until("#clusters tr[data-name=east]", lambda t: "checkout/v2: 1" in t, timeout=5)
                assert "agent-east" in row and "connected" in row and "127.0.0.1:7001" in row, row
                # Its agent reports two Envoys: the page counts them (as the replicas publish them).
                plane.agents.reported(
                    session, apb.ProxyReport(proxies=[apb.ProxyState(node_id=f"east-envoy-{i}") for i in (1, 2)])
                )
                await b.until("#clusters tr[data-name=east] td.proxies", lambda t: t == "2", timeout=10)
                await b.screenshot("clusters", tmp_path)
            finally:
                stop.set()
                await load
    finally:
        await asyncio.to_thread(driver.quit)
