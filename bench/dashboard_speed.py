"""How fast the dashboard paints, and what a 10,000-point chart costs per update.

Starts a throw-away control plane (embedded etcd, open loopback mode) with one release, opens
its page in headless Chromium (`make browser`) and reports:

* first contentful paint of the release page, and when its live data was first shown;
* building the six charts of the release page at 10,000 samples x 4 series, and the time of
  one live update at that size (a new sample shifted in and drawn, as each second brings),
  through the page's own chart code (controlplane/api/ui/charts.js).

Run from the repository root: `.venv/bin/python -P bench/dashboard_speed.py`. Bounded: it
stops after one page load and 50 updates (well under a minute).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from typing import Any

from graylane.controlplane.api.client import ReleaseClient
from graylane.deploy.local.stack import local_control_plane, register_service
from graylane.v1 import release_pb2 as pb

_CHART_SCRIPT = """
const done = arguments[arguments.length - 1];
(async () => {
  const { Charts } = await import('/ui/static/charts.js');
  const uPlot = (await import('/ui/vendor/uPlot.esm.js')).default;
  const box = document.createElement('div');
  box.style.width = '1300px';
  document.body.append(box);
  const charts = new Charts(box);
  const N = 10000, keys = ['checkout v1', 'checkout v2 lane=l', 'cart v1', 'cart v2 lane=l'];
  const start = Math.floor(Date.now() / 1000) - N;
  charts.t = Array.from({length: N}, (_, i) => start + i);
  charts.keys = keys.slice();
  for (const id of ['share', 'rps', 'errors', 'p50', 'p99', 'requests']) {
    charts.values[id] = {};
    keys.forEach((k, j) => {
      charts.values[id][k] = Array.from({length: N}, (_, i) => 50 + 40 * Math.sin(i / 300 + j));
    });
  }
  let t0 = performance.now();
  charts.build(uPlot);
  await new Promise(requestAnimationFrame);
  const build = performance.now() - t0;
  const series = (s, v, lane) => ({service: s, version: v, lane, cluster: '', traffic_share: 0.5,
    throughput_rps: 100, error_rate: 0.01, p50_ms: 1.5, p99_ms: 9, requests: 500});
  const updates = [];
  for (let i = 0; i < 50; i++) {
    const until = new Date((start + N + i) * 1000).toISOString();
    t0 = performance.now();
    await charts.add({until, series: [series('checkout', 'v1', ''), series('checkout', 'v2', 'l'),
                                      series('cart', 'v1', ''), series('cart', 'v2', 'l')]});
    await new Promise(requestAnimationFrame);
    updates.push(performance.now() - t0);
  }
  updates.sort((a, b) => a - b);
  done({points: charts.t.length, build_ms: build, update_p50_ms: updates[25], update_max_ms: updates[49]});
})().catch((e) => done({error: String(e)}));
"""


def _driver() -> Any:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        sys.exit("needs chromium and chromedriver: run `make browser`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def _measure(driver: Any, url: str) -> dict[str, Any]:
    from selenium.webdriver.common.by import By

    driver.get(url)
    deadline = time.monotonic() + 20
    while not driver.find_elements(By.CSS_SELECTOR, "#rel-phase") and time.monotonic() < deadline:
        time.sleep(0.05)
    paint = driver.execute_script(
        "const p = performance.getEntriesByName('first-contentful-paint')[0];"
        "const n = performance.getEntriesByType('navigation')[0];"
        "return {first_paint_ms: p ? p.startTime : null, dom_ready_ms: n.domContentLoadedEventEnd,"
        " data_shown_ms: performance.now()};"
    )
    driver.set_script_timeout(60)
    result: dict[str, Any] = paint | driver.execute_async_script(_CHART_SCRIPT)
    return result


async def main() -> int:
    async with local_control_plane(prefix="graylane-dashspeed-") as local:
        async with ReleaseClient.connect(local.api_target, actor="bench") as client:
            await register_service(client, "checkout")
            spec = pb.ReleaseSpec(
                lane="l",
                entry="checkout",
                services=[pb.ServiceVersions(service="checkout", base_version="v1", gray_version="v2")],
                batches=[pb.Batch(weight=w, pause=pb.Pause(manual=True)) for w in (10, 50, 100)],
            )
            await client.apply_release(pb.Release(name="rel", spec=spec))
        driver = await asyncio.to_thread(_driver)
        try:
            result = await asyncio.to_thread(_measure, driver, local.dashboard_url + "#/release/rel")
        finally:
            await asyncio.to_thread(driver.quit)
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}, indent=2))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
