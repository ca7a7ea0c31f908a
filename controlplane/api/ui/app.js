// The Graylane dashboard: one page, routed by the URL's fragment. Every number shown is an
// API message relayed by the control plane (/ui/api/..., /ui/events/...); this file only
// lays them out. Text from the server is always set as text, never parsed as HTML.

import { h } from "./dom.js";
import { Charts } from "./charts.js";

const main = document.getElementById("main");
let session = null;
let closePage = () => {};

async function api(path, { method = "GET", body } = {}) {
  const headers = {};
  if (method !== "GET") {
    headers["Content-Type"] = "application/json";
    if (session) headers["X-Graylane-CSRF"] = session.csrf;
  }
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), credentials: "same-origin" });
  let data = {};
  try { data = await r.json(); } catch { /* an empty or non-JSON body */ }
  if (r.status === 401 && path !== "/ui/api/login") { session = null; showLogin(data.error); }
  if (!r.ok) throw Object.assign(new Error(data.error || r.statusText), { status: r.status, code: data.code || "" });
  return data;
}

function age(ts) {
  if (!ts) return "";
  const s = Math.max(0, (Date.now() - Date.parse(ts)) / 1000);
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

function fmt(x, digits = 1) {
  return x === undefined || x === null ? "–" : Number(x).toFixed(digits);
}

// --- login ---------------------------------------------------------------------------

function showLogin(message = "") {
  closePage();
  document.getElementById("who").textContent = "";
  document.getElementById("logout").hidden = true;
  const token = h("input", { id: "token", type: "password", autocomplete: "off", placeholder: "glt_…" });
  const error = h("p", { id: "login-error", class: "error" }, message || "");
  const form = h("form", { class: "login", onsubmit: async (e) => {
    e.preventDefault();
    error.textContent = "";
    try {
      session = await api("/ui/api/login", { method: "POST", body: { token: token.value } });
      token.value = "";
      start();
    } catch (err) { error.textContent = err.message; }
  } },
    h("h1", {}, "Log in"),
    h("p", { class: "muted" }, "Paste an API token (", h("code", {}, "graylane token create"), "). It is kept by the control plane, not in this browser."),
    token, h("button", { id: "login", type: "submit" }, "Log in"), error);
  main.replaceChildren(form);
  token.focus();
}

document.getElementById("logout").addEventListener("click", async () => {
  try { await api("/ui/api/logout", { method: "POST", body: {} }); } catch { /* gone already */ }
  session = null;
  showLogin("Logged out.");
});

// --- live streams ----------------------------------------------------------------------

function live(path, handlers, onProblem) {
  const source = new EventSource(path);
  for (const [event, fn] of Object.entries(handlers)) source.addEventListener(event, (e) => fn(JSON.parse(e.data)));
  source.addEventListener("problem", (e) => onProblem(JSON.parse(e.data)));
  source.onerror = () => onProblem({ error: "connection to the control plane lost; retrying" });
  return () => source.close();
}

// --- releases list ---------------------------------------------------------------------

const PHASES = ["PENDING", "PROGRESSING", "PAUSED", "SUCCEEDED", "ROLLED_BACK", "FAILED"];

function lastEventText(r) {
  return r.status.reason || "";
}

function releasesPage() {
  const filter = h("select", { id: "phase-filter" }, h("option", { value: "" }, "every phase"), PHASES.map((p) => h("option", { value: p }, p)));
  const body = h("tbody");
  const problem = h("p", { class: "error", id: "problem" });
  let latest = [];
  const render = () => {
    const rows = latest.filter((r) => !filter.value || r.status.phase === filter.value).map((r) => {
      const c = r.status.convergence || {};
      const batches = r.spec.batches.length;
      return h("tr", { dataset: { name: r.name } },
        h("td", {}, h("a", { href: `#/release/${encodeURIComponent(r.name)}` }, r.name)),
        h("td", { class: `phase phase-${r.status.phase}` }, r.status.phase),
        h("td", {}, r.spec.strategy),
        h("td", { class: "batch" }, r.status.batch < 0 ? `– / ${batches}` : `${r.status.batch + 1} / ${batches}`),
        h("td", { class: "weight" }, `${r.status.weight} %`),
        h("td", { class: "converged" }, `${c.converged || 0} / ${c.proxies || 0}`),
        h("td", {}, age(r.created)),
        h("td", {}, lastEventText(r)));
    });
    body.replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No release."))]));
  };
  filter.addEventListener("change", render);
  main.replaceChildren(h("h1", {}, "Releases"), h("p", {}, "Phase: ", filter), problem,
    h("table", { id: "releases" }, h("thead", {}, h("tr", {}, ["Release", "Phase", "Strategy", "Batch", "Weight", "Converged / proxies", "Age", "Why (last change)"].map((t) => h("th", {}, t)))), body));
  return live("/ui/events/releases", { releases: (d) => { problem.textContent = ""; latest = d.releases; render(); } }, (p) => { problem.textContent = p.error; });
}

// --- one release -------------------------------------------------------------------------

const ACTIONS = [
  ["next", "Next batch"], ["pause", "Pause"], ["resume", "Resume"], ["rollback", "Roll back"], ["promote", "Promote"], ["restart", "Restart"],
];
const ROLE_RANK = { viewer: 1, operator: 2, admin: 3 };

// The phases each action is legal from come from the control plane's state machine.
function phaseReason(action, r) {
  const p = r.status.phase;
  const from = session.sources[action];
  return from.includes(p) ? "" : `not while ${p} (only when ${from.join(" or ")})`;
}

function roleReason(action, r) {
  const needs = session.needs[action];
  if (ROLE_RANK[session.role] < ROLE_RANK[needs]) return `needs role ${needs} (you are ${session.role})`;
  const scope = session.scope;
  if (scope.services.length || scope.releases.length) {
    const services = r.spec.services.map((s) => s.service);
    const inScope = scope.releases.includes(r.name) || (scope.services.length && services.every((s) => scope.services.includes(s)));
    if (!inScope) return "outside your token's scope";
  }
  return "";
}

async function confirmAction(text) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-reason").value = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok" ? document.getElementById("confirm-reason").value : null), { once: true });
  });
}

function conditionText(c) {
  const what = c.kind === "PATH" ? "path" : `${c.kind.toLowerCase()} ${c.name}`;
  return c.op === "PRESENT" ? `${what} present` : `${what} ${c.op.toLowerCase()} "${c.value}"`;
}

function pauseText(p, analysed) {
  if (!p) return "";
  if (p.manual) return analysed ? "analysis or next" : "manual next";
  if (p.duration) return p.duration;
  return "";
}

function releasePage(name) {
  const title = h("h1", {}, `Release ${name}`);
  const cards = h("div", { class: "cards" });
  const plan = h("ol", { class: "plan", id: "plan" });
  const actions = h("div", { class: "actions", id: "actions" });
  const actionError = h("p", { class: "error", id: "action-error" });
  const problem = h("p", { class: "error", id: "problem" });
  const chartBox = h("div", { class: "charts", id: "charts" }, h("p", { class: "muted" }, "Waiting for metrics…"));
  const totals = h("div", { id: "totals" });
  const rules = h("div", { id: "rules" });
  const proxies = h("div", { id: "proxies" });
  const history = h("ul", { class: "timeline", id: "history" });
  const versions = h("div", { id: "versions" });
  const edit = h("a", { href: `#/edit/${encodeURIComponent(name)}` }, "Edit / YAML");
  main.replaceChildren(title, problem, cards, h("h2", {}, "Batch plan"), plan, h("h2", {}, "Actions"), actions, actionError, edit,
    h("h2", {}, "Traffic per version"), chartBox, h("h2", {}, "Total requests (counted by the proxies since each started)"), totals,
    h("h2", {}, "Rules"), rules, h("h2", {}, "Proxies"), proxies,
    h("h2", {}, "Versions"), versions, h("h2", {}, "History"), history);
  const charts = new Charts(chartBox);
  const onResize = () => charts.resize();
  window.addEventListener("resize", onResize);
  let current = null;

  const act = async (action, label) => {
    const reason = await confirmAction(`${label}: release ${name}?`);
    if (reason === null) return;
    actionError.textContent = "";
    try {
      await api(`/ui/api/releases/${encodeURIComponent(name)}/${action}`, { method: "POST", body: { reason, expected_revision: current.revision } });
    } catch (err) { actionError.textContent = `${label} refused: ${err.message}`; }
  };

  const render = (page) => {
    const r = page.release;
    current = r;
    problem.textContent = "";
    const s = r.status;
    const c = s.convergence || {};
    cards.replaceChildren(
      h("div", { class: "card" }, h("span", { class: "label" }, "Phase"), h("b", { id: "rel-phase", class: `phase phase-${s.phase}` }, s.phase)),
      h("div", { class: "card" }, h("span", { class: "label" }, "Strategy"), h("b", {}, r.spec.strategy)),
      h("div", { class: "card" }, h("span", { class: "label" }, "Batch"), h("b", { id: "rel-batch" }, s.batch < 0 ? "–" : `${s.batch + 1} / ${r.spec.batches.length}`)),
      h("div", { class: "card" }, h("span", { class: "label" }, "Weight"), h("b", { id: "rel-weight" }, `${s.weight} %`), s.served_weight !== s.weight ? `served ${s.served_weight} %` : ""),
      h("div", { class: "card" }, h("span", { class: "label" }, "Converged / proxies"), h("b", { id: "rel-converged" }, `${c.converged} / ${c.proxies}`), s.reached ? "reached" : "not reached"),
      h("div", { class: "card" }, h("span", { class: "label" }, "Why"), h("span", { id: "rel-reason", class: "value" }, s.reason)),
    );
    plan.replaceChildren(...r.spec.batches.map((b, i) => h("li", { class: i === s.batch ? "current" : i < s.batch ? "done" : "", dataset: { batch: i } },
      `${i + 1}. ${b.weight} %`, h("br"), h("small", {}, pauseText(b.pause, Boolean(r.spec.analysis))))));
    // Buttons are rebuilt only when what they allow changes, so a live update cannot
    // swap a button away under the user's click.
    const reasons = ACTIONS.map(([action]) => roleReason(action, r) || phaseReason(action, r));
    const signature = JSON.stringify(reasons);
    if (signature !== actions.dataset.signature) {
      actions.dataset.signature = signature;
      actions.replaceChildren(...ACTIONS.map(([action, label], i) => h("button", {
        dataset: { action }, disabled: Boolean(reasons[i]), title: reasons[i] || `${label} (needs ${session.needs[action]})`, onclick: () => act(action, label),
      }, label)), h("span", { class: "muted", id: "disabled-reasons" }, ACTIONS.map(([, label], i) => (reasons[i] ? `${label}: ${reasons[i]}. ` : "")).join("")));
    }
    rules.replaceChildren(r.spec.match.length
      ? h("ul", {}, r.spec.match.map((rule) => h("li", {}, rule.conditions.map(conditionText).join(" AND "))))
      : h("p", { class: "muted" }, "No rule: requests join the lane by weight only."),
      h("p", { class: "muted" }, `A request matching any rule (OR) joins lane ${r.spec.lane} at entry ${r.spec.entry}.`));
    const lagging = (c.lagging || []).map((l) => h("li", {}, l));
    const gone = (c.gone_names || []).map((g) => h("li", {}, `${g} (gone: no ACK within the stale-proxy timeout)`));
    const nack = s.last_nack && s.last_nack.node ? h("p", { class: "error", id: "nack" }, `Last NACK from ${s.last_nack.node} (cluster ${s.last_nack.cluster || "local"}): ${s.last_nack.message}`) : null;
    proxies.replaceChildren(h("p", {}, `${c.converged} of ${c.proxies} proxies carry the current batch.`),
      lagging.length ? h("div", {}, h("b", {}, "Lagging or rejected:"), h("ul", { id: "lagging" }, lagging)) : null,
      gone.length ? h("ul", {}, gone) : null, nack);
    const vrows = [];
    for (const [service, list] of Object.entries(page.versions)) for (const v of list) {
      const m = v.metadata || {};
      vrows.push(h("tr", {}, h("td", {}, service), h("td", {}, v.name), h("td", {}, m.author || ""), h("td", {}, m.created || ""), h("td", {}, m.change_summary || ""), h("td", {}, m.image || "")));
    }
    versions.replaceChildren(h("table", {}, h("thead", {}, h("tr", {}, ["Service", "Version", "Author", "Date", "Summary", "Image"].map((t) => h("th", {}, t)))), h("tbody", {}, vrows)));
    history.replaceChildren(...page.history.slice().reverse().map((e) => {
      const details = Object.entries(e.details || {}).sort(([a], [b]) => a.localeCompare(b)).map(([k, v]) => `${k}=${v}`).join("  ");
      const batch = (i) => (i < 0 ? "–" : i + 1);
      return h("li", { class: e.details && e.details.verdict ? `verdict-${e.details.verdict}` : "" },
        h("b", {}, e.action), ` ${e.at.replace("T", " ").replace(/\.\d+Z$/, "Z")} by ${e.actor}: `,
        `${e.from_phase} → ${e.to_phase}, batch ${batch(e.from_batch)} → ${batch(e.to_batch)}, weight ${e.weight} %`,
        e.reason ? h("div", {}, e.reason) : null, details ? h("div", { class: "details" }, details) : null);
    }));
    charts.setVerdicts(page.history);
  };
  const stop = live(`/ui/events/releases/${encodeURIComponent(name)}`, {
    release: render,
    metrics: (m) => charts.add(m),
    traffic: (t) => {
      if (t.unavailable !== undefined) { totals.replaceChildren(h("p", { class: "muted" }, t.unavailable)); return; }
      totals.replaceChildren(h("table", {}, h("thead", {}, h("tr", {}, ["Service", "Version", "Lane", "Requests", "2xx", "4xx", "5xx", "No response"].map((x) => h("th", {}, x)))),
        h("tbody", {}, t.counts.map((c) => h("tr", {}, [c.service, c.version, c.lane || "–", c.requests, c.responses_2xx, c.responses_4xx, c.responses_5xx, c.failures].map((x) => h("td", {}, x)))))),
        h("p", { class: "muted" }, `${t.proxies} proxies counted on ${t.replicas} replica(s)${t.oldest ? `; other replicas as published, the oldest ${t.oldest} ago` : ""}${t.unreachable.length ? `; unreachable: ${t.unreachable.join(", ")}` : ""}${t.note ? `. Note: ${t.note}` : ""}`));
    },
  }, (p) => { problem.textContent = p.error; });
  return () => { stop(); charts.destroy(); window.removeEventListener("resize", onResize); };
}

// --- create or edit ----------------------------------------------------------------------

const TEMPLATE_SPEC = {
  lane: "checkout-v2", entry: "checkout", strategy: "CANARY",
  services: [{ service: "checkout", base_version: "v1", gray_version: "v2" }],
  match: [{ conditions: [{ kind: "HEADER", name: "x-user", op: "EXACT", value: "tester" }] }],
  batches: [{ weight: 10, pause: { manual: true } }, { weight: 50, pause: { duration: "30s" } }, { weight: 100, pause: { manual: true } }],
};
const KINDS = ["HEADER", "COOKIE", "QUERY", "PATH"];
const OPS = ["EXACT", "PREFIX", "REGEX", "PRESENT"];
const STRATEGIES = ["CANARY", "BLUE_GREEN", "AB"];

function select(values, value, attrs = {}) {
  return h("select", attrs, values.map((v) => h("option", { value: v, selected: v === value }, v)));
}

// A form over the fields most releases set; what it does not show (cohort, placement,
// webhooks, the finer analysis knobs) is kept from the loaded spec and stays editable in
// the YAML below, which is what Apply sends.
class ReleaseForm {
  constructor(onChange) {
    this.onChange = onChange;
    this.root = h("div", { id: "form", class: "form" });
    this.root.addEventListener("input", () => this.changed());
    this.root.addEventListener("change", () => this.changed());
  }

  changed() { this.onChange(this.read()); }

  load(name, spec) {
    this.name = name;
    this.spec = structuredClone(spec);
    this.render();
  }

  read() {
    const q = (sel) => [...this.root.querySelectorAll(sel)];
    const spec = structuredClone(this.spec);
    spec.lane = this.root.querySelector("[name=lane]").value;
    spec.entry = this.root.querySelector("[name=entry]").value;
    spec.strategy = this.root.querySelector("[name=strategy]").value;
    spec.services = q(".svc-row").map((row) => ({
      service: row.querySelector("[name=service]").value, base_version: row.querySelector("[name=base]").value, gray_version: row.querySelector("[name=gray]").value,
    }));
    spec.match = q(".rule").map((rule) => ({ conditions: [...rule.querySelectorAll(".cond")].map((c) => {
      const cond = { kind: c.querySelector("[name=kind]").value, op: c.querySelector("[name=op]").value };
      const name = c.querySelector("[name=cname]").value, value = c.querySelector("[name=value]").value;
      if (name) cond.name = name;
      if (value) cond.value = value;
      return cond;
    }) }));
    spec.batches = q(".batch-row").map((row) => {
      const w = row.querySelector("[name=weight]").value;
      const manual = row.querySelector("[name=pause]").value === "manual";
      return { weight: w === "" ? 0 : Number(w), pause: manual ? { manual: true } : { duration: row.querySelector("[name=duration]").value } };
    });
    if (this.root.querySelector("[name=analysis]").checked) {
      const a = { ...(spec.analysis || {}) };
      for (const [key, kind] of [["interval", "text"], ["min_requests", "int"], ["max_error_rate", "num"], ["max_p99_ms", "num"], ["failure_limit", "int"]]) {
        const v = this.root.querySelector(`[name=a_${key}]`).value.trim();
        if (v === "") delete a[key];
        else a[key] = kind === "text" ? v : Number(v);
      }
      a.baseline = this.root.querySelector("[name=a_baseline]").checked;
      spec.analysis = a;
    } else {
      delete spec.analysis;
    }
    return { name: this.root.querySelector("[name=name]").value, spec };
  }

  // Point at the input a server message names ("spec.batches[1].weight: ..."), if the form
  // shows that field; the message itself stays where it is shown.
  mark(message) {
    for (const el of this.root.querySelectorAll(".invalid")) { el.classList.remove("invalid"); el.removeAttribute("title"); }
    const path = (message.match(/^(?:[^:]*: )?((?:spec\.)?[a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*): /) || [])[1];
    if (!path) return null;
    const parts = [...path.matchAll(/([a-z_]+)(?:\[(\d+)\])?/g)].map((m) => [m[1], m[2] === undefined ? null : Number(m[2])]);
    if (parts[0][0] === "spec") parts.shift();
    const [[field, index], [sub, subIndex] = [], [leaf] = []] = parts;
    const nth = (sel, i) => this.root.querySelectorAll(sel)[i];
    const names = { service: "service", base_version: "base", gray_version: "gray", name: "cname", value: "value", kind: "kind", op: "op" };
    let input = null;
    if (field === "batches" && index !== null) input = nth(".batch-row", index)?.querySelector(sub === "pause" ? "[name=duration]" : "[name=weight]");
    else if (field === "services" && index !== null) input = nth(".svc-row", index)?.querySelector(`[name=${names[sub] || "service"}]`);
    else if (field === "match" && index !== null) {
      const cond = subIndex !== null && subIndex !== undefined ? nth(".rule", index)?.querySelectorAll(".cond")[subIndex] : null;
      input = cond ? cond.querySelector(`[name=${names[leaf] || "cname"}]`) : nth(".rule", index);
    } else if (field === "analysis") input = this.root.querySelector(`[name=a_${sub}]`) || this.root.querySelector("[name=analysis]");
    else input = this.root.querySelector(`[name=${field}]`);
    if (input) { input.classList.add("invalid"); input.title = message; }
    return input;
  }

  render() {
    const s = this.spec;
    const field = (label, input) => h("label", { class: "field" }, label, " ", input);
    const svc = (v = {}) => h("div", { class: "svc-row" },
      field("service", h("input", { name: "service", value: v.service || "" })),
      field("base", h("input", { name: "base", value: v.base_version || "", size: 8 })),
      field("gray", h("input", { name: "gray", value: v.gray_version || "", size: 8 })),
      h("button", { type: "button", onclick: (e) => { e.target.parentNode.remove(); this.changed(); } }, "remove"));
    const cond = (c = {}) => h("span", { class: "cond" },
      select(KINDS, c.kind || "HEADER", { name: "kind" }), h("input", { name: "cname", value: c.name || "", placeholder: "name", size: 10 }),
      select(OPS, c.op || "EXACT", { name: "op" }), h("input", { name: "value", value: c.value || "", placeholder: "value", size: 10 }),
      h("button", { type: "button", title: "remove this condition", onclick: (e) => { e.target.parentNode.remove(); this.changed(); } }, "×"));
    const rule = (r = { conditions: [{}] }) => {
      const conds = h("span", { class: "conds" }, r.conditions.map(cond));
      return h("div", { class: "rule" }, h("b", {}, "rule: "), conds,
        h("button", { type: "button", class: "add-and", onclick: () => { conds.append(cond()); this.changed(); } }, "+ AND"),
        h("button", { type: "button", onclick: (e) => { e.target.parentNode.remove(); this.changed(); } }, "remove rule"));
    };
    const batch = (b = { weight: 100, pause: { manual: true } }) => {
      const manual = !b.pause || b.pause.manual || !b.pause.duration;
      return h("div", { class: "batch-row" },
        field("weight %", h("input", { name: "weight", type: "number", value: b.weight ?? 0, min: 0, max: 100, style: "width:5em" })),
        field("pause", select(["manual", "duration"], manual ? "manual" : "duration", { name: "pause" })),
        h("input", { name: "duration", value: manual ? "30s" : b.pause.duration, size: 6 }),
        h("button", { type: "button", onclick: (e) => { e.target.parentNode.remove(); this.changed(); } }, "remove"));
    };
    const services = h("div", {}, (s.services || []).map(svc));
    const rules = h("div", { id: "rules-form" }, (s.match || []).map(rule));
    const batches = h("div", { id: "batches-form" }, (s.batches || []).map(batch));
    const a = s.analysis || {};
    this.root.replaceChildren(
      h("div", {}, field("name", h("input", { name: "name", value: this.name || "", readonly: Boolean(this.name && this.fixedName) })),
        field("lane", h("input", { name: "lane", value: s.lane || "" })), field("entry", h("input", { name: "entry", value: s.entry || "" })),
        field("strategy", select(STRATEGIES, s.strategy || "CANARY", { name: "strategy" }))),
      h("h2", {}, "Services"), services, h("button", { type: "button", onclick: () => { services.append(svc()); this.changed(); } }, "+ service"),
      h("h2", {}, "Rules (a request matching any rule joins the lane)"), rules,
      h("button", { type: "button", id: "add-rule", onclick: () => { rules.append(rule()); this.changed(); } }, "+ OR rule"),
      h("h2", {}, "Batches"), batches, h("button", { type: "button", id: "add-batch", onclick: () => { batches.append(batch()); this.changed(); } }, "+ batch"),
      h("h2", {}, h("label", {}, h("input", { type: "checkbox", name: "analysis", checked: Boolean(s.analysis) }), " Automated analysis")),
      h("div", {}, field("interval", h("input", { name: "a_interval", value: a.interval || "", placeholder: "60s", size: 6 })),
        field("min requests", h("input", { name: "a_min_requests", value: a.min_requests ?? "", placeholder: "100", size: 6 })),
        field("max error rate", h("input", { name: "a_max_error_rate", value: a.max_error_rate ?? "", placeholder: "0.05", size: 6 })),
        field("max p99 ms", h("input", { name: "a_max_p99_ms", value: a.max_p99_ms ?? "", size: 6 })),
        field("failure limit", h("input", { name: "a_failure_limit", value: a.failure_limit ?? "", placeholder: "2", size: 4 })),
        field("compare with base", h("input", { type: "checkbox", name: "a_baseline", checked: Boolean(a.baseline) }))));
  }
}

function editPage(name) {
  const text = h("textarea", { id: "yaml", rows: 24, spellcheck: "false" });
  const shape = h("p", { class: "error", id: "form-error" });
  const error = h("p", { class: "error", id: "apply-error" });
  const done = h("p", { id: "apply-done" });
  const restart = h("input", { type: "checkbox", id: "restart" });
  let pending = 0;
  const form = new ReleaseForm(async (value) => {
    const mine = ++pending;
    try {
      const r = await api("/ui/api/yaml", { method: "POST", body: value });
      if (mine !== pending) return;  // a later edit's answer wins
      text.value = r.yaml + "\n";
      shape.textContent = r.error;
      form.mark(r.error);
    } catch (err) { shape.textContent = err.message; }
  });
  form.fixedName = Boolean(name);
  const download = h("a", { href: "#", id: "export", onclick: (e) => {
    e.preventDefault();
    const url = URL.createObjectURL(new Blob([text.value], { type: "application/yaml" }));
    h("a", { href: url, download: `${name || "release"}.yaml` }).click();
    URL.revokeObjectURL(url);
  } }, "Export YAML");
  const apply = h("button", { id: "apply", onclick: async () => {
    error.textContent = ""; done.textContent = "";
    try {
      const r = await api("/ui/api/apply", { method: "POST", body: { yaml: text.value, restart: restart.checked } });
      done.replaceChildren("Applied: ", h("a", { href: `#/release/${encodeURIComponent(r.name)}` }, `release ${r.name}`), ` (${r.status.phase}).`);
    } catch (err) {
      error.textContent = err.message;
      (form.mark(err.message) || error).scrollIntoView({ block: "center" });
    }
  } }, "Apply");
  if (ROLE_RANK[session.role] < ROLE_RANK[session.needs.apply]) {
    apply.disabled = true;
    apply.title = `needs role ${session.needs.apply} (you are ${session.role})`;
  }
  main.replaceChildren(h("h1", {}, name ? `Edit release ${name}` : "New release"), form.root, shape,
    h("p", {}, apply, " ", h("label", {}, restart, " restart a finished release from its first batch"), " ", download), error, done,
    h("h2", {}, "YAML: what Apply sends"), h("p", { class: "muted" }, "Edit it for the fields the form does not show (cohort, placement, webhooks); a change in the form writes it anew."), text);
  if (name) {
    api(`/ui/api/releases/${encodeURIComponent(name)}`).then((d) => { form.load(name, d.release.spec); form.changed(); }, (err) => { error.textContent = err.message; });
  } else {
    form.load("checkout-v2", TEMPLATE_SPEC);
    form.changed();
  }
  return () => {};
}

// --- clusters ---------------------------------------------------------------------------

function clustersPage() {
  const box = h("div", { id: "clusters" }, h("p", { class: "muted" }, "Loading…"));
  const problem = h("p", { class: "error" });
  main.replaceChildren(h("h1", {}, "Clusters"), problem, box);
  const load = async () => {
    try {
      const d = await api("/ui/api/clusters");
      problem.textContent = "";
      box.replaceChildren(d.clusters.length ? h("table", {}, h("thead", {}, h("tr", {}, ["Cluster", "Agent", "Connected", "Gateway", "Proxies", "Endpoints (service/version: count)"].map((t) => h("th", {}, t)))),
        h("tbody", {}, d.clusters.map((c) => h("tr", { dataset: { name: c.name } }, h("td", {}, c.name), h("td", {}, `${c.agent_id} ${c.agent_version}`),
          h("td", { class: c.connected ? "" : "phase-FAILED" }, c.connected ? "connected" : "not connected"), h("td", {}, c.gateway_address),
          h("td", { class: "proxies" }, String(c.proxies)),
          h("td", {}, c.versions.map((v) => `${v.service}/${v.version}: ${v.endpoints}`).join(", ")))))) :
        h("p", { class: "muted" }, "No agent has registered a cluster: this control plane serves its own proxies only (their counts are on each release)."));
    } catch (err) { problem.textContent = err.message; }
  };
  load();
  const timer = setInterval(load, 1000);
  return () => clearInterval(timer);
}

// --- routing -----------------------------------------------------------------------------

function route() {
  closePage();
  if (!session) return;
  const [, page, arg] = location.hash.split("/").map(decodeURIComponent);
  if (page === "release" && arg) closePage = releasePage(arg);
  else if (page === "edit" && arg) closePage = editPage(arg);
  else if (page === "new") closePage = editPage("");
  else if (page === "clusters") closePage = clustersPage();
  else closePage = releasesPage();
}

function start() {
  document.getElementById("who").textContent = session.auth ? `${session.identity} (${session.role})` : "open mode (no login)";
  document.getElementById("logout").hidden = !session.auth;
  route();
}

window.addEventListener("hashchange", route);
api("/ui/api/session").then((s) => { session = s; start(); }, (err) => { if (err.status !== 401) showLogin(err.message); });
