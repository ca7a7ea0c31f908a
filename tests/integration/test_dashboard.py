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
from graylane.controlplane import auth
from graylane.controlplane.api import token_record
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.client import Action, ReleaseClient
from graylane.controlplane.local.envoy import EnvoyProcess
from graylane.controlplane.local.traffic import run_load
from graylane.controlplane.local.upstream import Upstream
from graylane.controlplane.store import EtcdStore
from graylane.v1 import release_pb2 as pb

from tests.conftest import require_binary

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

    async def text(self, css: str) -> str:
        def read() -> str:
            from selenium.webdriver.common.by import By

            found = self.driver.find_elements(By.CSS_SELECTOR, css)
            return str(found[0].text) if found else ""

        return await self.run(read)

    async def until(self, css: str, check: Callable[[str], bool], *, timeout: float = 10.0) -> str:
        seen = ""
        try:
            async with asyncio.timeout(timeout):
                while not check(seen := await self.text(css)):
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"{css}: still {seen!r} after {timeout} s") from None
        return seen

    async def element(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        await self.until(css, lambda _: True)
        async with asyncio.timeout(10):
            while not (found := await self.run(self.driver.find_elements, By.CSS_SELECTOR, css)):
                await asyncio.sleep(0.1)
        return found[0]

    async def click(self, css: str) -> None:
        await self.run((await self.element(css)).click)

    async def type(self, css: str, text: str) -> None:
        element = await self.element(css)
        await self.run(element.clear)
        await self.run(element.send_keys, text)

    async def script(self, source: str, *args: Any) -> Any:
        return await self.run(self.driver.execute_script, source, *args)

    async def login(self, token: str) -> None:
        await self.open("/ui/")
        await self.type("#token", token)
        await self.click("#login")
        await self.until("#who", lambda t: "(" in t)

    async def screenshot(self, name: str, tmp: Path) -> None:
        target = REPO / "docs" / "screenshots" if os.environ.get("GRAYLANE_SCREENSHOTS") == "1" else tmp
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
    return pb.ReleaseSpec(
        lane="checkout-v2",
        entry=SERVICE,
        services=[pb.ServiceVersions(service=SERVICE, base_version="v1", gray_version="v2")],
        strategy=pb.CANARY,
        match=[pb.MatchRule(conditions=[pb.Condition(kind=pb.HEADER, name="x-user", op=pb.EXACT, value="tester")])],
        batches=[pb.Batch(weight=w, pause=pb.Pause(manual=True)) for w in weights],
    )


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
        await b.element("#token")
        await b.type("#token", "glt_0000000000000000_not-a-real-token-aaaaaaaaaaaaaaaaaaaaaaaaa")
        await b.click("#login")
        await b.until("#login-error", lambda t: "not valid" in t)

        # A viewer sees the release, its buttons disabled with the reason, and the API refuses
        # the action even when the page is bypassed.
        await b.login(stack.tokens["viewer"])
        await b.until("#releases tr[data-name=rel] .phase", lambda t: t == "PENDING")
        await b.open("/ui/#/release/rel")
        await b.until("#rel-phase", lambda t: t == "PENDING")
        next_button = await b.element("#actions button[data-action=next]")
        assert await b.run(next_button.get_attribute, "disabled") is not None
        assert "needs role operator (you are viewer)" in await b.run(next_button.get_attribute, "title")
        refused = await b.script(
            """return fetch('/ui/api/session').then(r => r.json()).then(s => fetch('/ui/api/releases/rel/next', {
                 method: 'POST', body: '{}',
                 headers: {'Content-Type': 'application/json', 'X-Graylane-CSRF': s.csrf}}))
               .then(async r => [r.status, (await r.json()).code]);"""
        )
        assert refused == [403, "PERMISSION_DENIED"], refused
        await b.click("#logout")
        await b.element("#token")

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
        await b.element("#chart-share canvas")
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
        next_button = await b.element("#actions button[data-action=next]")
        assert "not while ROLLED_BACK" in await b.run(next_button.get_attribute, "title")

        await b.open("/ui/#/releases")
        await b.until("#releases tr[data-name=rel] .phase", lambda t: t == "ROLLED_BACK")
        await b.screenshot("releases", tmp_path)

        # The API's own validation message, shown inline under the editor.
        bad = spec((10, 150))
        async with stack.client("operator") as operator:
            with pytest.raises(grpc.aio.AioRpcError) as refused_by_api:
                await operator.apply_release(pb.Release(name="bad", spec=bad))
        assert refused_by_api.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        await b.open("/ui/#/new")
        yaml_text = await b.script("return document.getElementById('yaml').value")
        await b.script(
            "document.getElementById('yaml').value = arguments[0]",
            yaml_text.replace("name: checkout-v2\n", "name: bad\n", 1).replace("weight: 50", "weight: 150"),
        )
        await b.click("#apply")
        shown = await b.until("#apply-error", lambda t: bool(t))
        assert shown == refused_by_api.value.details(), shown
        await b.screenshot("edit", tmp_path)
        await b.open("/ui/#/clusters")
        await b.until("#clusters", lambda t: "No agent" in t)
    finally:
        stop.set()
        await load
