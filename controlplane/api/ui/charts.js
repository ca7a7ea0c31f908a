// Charts over time of one release's metrics windows (WatchMetrics, one a second), drawn
// with uPlot (installed by `make ui`, served under /ui/vendor/). One line per (service,
// version, lane, cluster); analysis verdicts as dashed vertical lines. Keeps the last
// MAX_POINTS samples.

import { h } from "./dom.js";

const MAX_POINTS = 10000;
const CHARTS = [
  ["share", "Traffic share (%)", (s) => 100 * s.traffic_share],
  ["rps", "Requests/s", (s) => s.throughput_rps],
  ["errors", "Error rate (%)", (s) => 100 * s.error_rate],
  ["p50", "Latency p50 (ms)", (s) => s.p50_ms ?? null],
  ["p99", "Latency p99 (ms)", (s) => s.p99_ms ?? null],
  ["requests", "Requests in window", (s) => s.requests],
];
const COLORS = ["#1565c0", "#e65100", "#2e7d32", "#6a1b9a", "#00838f", "#ad1457", "#5d4037", "#9e9d24"];

let uplotModule;
async function loadUplot() {
  if (uplotModule === undefined) {
    uplotModule = await import("/ui/vendor/uPlot.esm.js").then((m) => m.default, () => null);
  }
  return uplotModule;
}

export class Charts {
  constructor(box) {
    this.box = box;
    this.t = [];
    this.keys = [];
    this.values = {};  // chart id -> key -> array aligned with t
    this.plots = {};
    this.verdicts = [];
  }

  key(s) {
    return `${s.service} ${s.version}${s.lane ? ` lane=${s.lane}` : ""}${s.cluster ? ` @${s.cluster}` : ""}`;
  }

  async add(metrics) {
    const uPlot = await loadUplot();
    if (!uPlot) {
      this.box.replaceChildren(h("p", { class: "error", id: "charts-missing" }, "Charts need the uPlot library, which is not installed: run `make ui` (it installs uplot from the npm registry into .venv/ui-vendor), then reload."));
      return;
    }
    const at = Date.parse(metrics.until) / 1000;
    if (this.t.length && at <= this.t[this.t.length - 1]) return;
    let rebuild = false;
    for (const s of metrics.series) {
      const k = this.key(s);
      if (!this.keys.includes(k)) { this.keys.push(k); rebuild = true; }
    }
    this.t.push(at);
    for (const [id, , read] of CHARTS) {
      const byKey = (this.values[id] ??= {});
      for (const k of this.keys) (byKey[k] ??= new Array(this.t.length - 1).fill(null)).push(null);
      for (const s of metrics.series) byKey[this.key(s)][this.t.length - 1] = read(s);
    }
    if (this.t.length > MAX_POINTS) {
      this.t.shift();
      for (const byKey of Object.values(this.values)) for (const arr of Object.values(byKey)) arr.shift();
    }
    this.box.dataset.points = this.t.length;
    if (rebuild) this.build(uPlot); else this.update();
  }

  setVerdicts(events) {
    this.verdicts = events.filter((e) => e.details && e.details.verdict).map((e) => ({ t: Date.parse(e.at) / 1000, verdict: e.details.verdict }));
    for (const p of Object.values(this.plots)) p.redraw(false);
  }

  width() {
    const column = this.box.clientWidth || 960;
    return Math.max(320, Math.floor(column >= 960 ? column / 2 - 40 : column - 24));
  }

  resize() {
    for (const p of Object.values(this.plots)) p.setSize({ width: this.width(), height: 200 });
  }

  data(id) {
    return [this.t, ...this.keys.map((k) => this.values[id][k])];
  }

  build(uPlot) {
    for (const p of Object.values(this.plots)) p.destroy();
    this.plots = {};
    const verdictMarks = {
      hooks: { draw: [(u) => {
        const ctx = u.ctx;
        ctx.save();
        for (const v of this.verdicts) {
          const x = u.valToPos(v.t, "x", true);
          if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
          ctx.strokeStyle = v.verdict === "pass" ? "#2e7d32" : v.verdict === "fail" ? "#b3261e" : "#9aa3b0";
          ctx.lineWidth = 2;
          ctx.setLineDash([4, 3]);
          ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
        }
        ctx.restore();
      }] },
    };
    const cells = CHARTS.map(([id, title]) => {
      const cell = h("div", { class: "chart", id: `chart-${id}` }, h("h3", {}, title));
      const opts = {
        width: this.width(), height: 200, plugins: [verdictMarks],
        series: [{}, ...this.keys.map((k, i) => ({ label: k, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false }))],
        axes: [{}, { size: 50 }],
        legend: { live: false },
      };
      this.plots[id] = new uPlot(opts, this.data(id), cell);
      return cell;
    });
    this.box.replaceChildren(...cells);
  }

  update() {
    for (const [id] of CHARTS) this.plots[id]?.setData(this.data(id));
  }

  destroy() {
    for (const p of Object.values(this.plots)) p.destroy();
  }
}
