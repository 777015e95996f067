"""The live status page at ``/``: one static HTML document whose inline script fetches
``status.json`` (``exporter.status``) and redraws the sections in place.

Static, so serving it costs nothing and it holds no data: everything shown arrives as JSON and is
put into the DOM with ``textContent`` and ``createElement`` only, never ``innerHTML``, because
domain, disk and path names are whatever the domain's creator chose (``<img src=x onerror=...>``
is a valid domain name). The only server-side text in it (title, version, links) is the
operator's, and escaped. No external assets: the page works on a hypervisor with no way out, and
its Content-Security-Policy allows just its own script and style (by hash) and fetching from its
own origin, so even a slip in the script could not run injected code, and no page may frame it.
The fetch and the footer links are relative, so the page also works behind a reverse proxy under
a path prefix, and the fetch carries the page's own credentials: the page follows the same basic
auth and TLS as the telemetry path.
"""

from __future__ import annotations

import base64
import hashlib
import html
from typing import Sequence

STYLE = """
:root{color-scheme:light dark;--ok:#1a7f37;--bad:#cf222e;--warn:#9a6700;--muted:#6e7781;--line:#d0d7de}
body{font-family:system-ui,sans-serif;margin:0 auto;padding:0 1em 2em;max-width:84em;line-height:1.4}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:.4em 1.2em;border-bottom:1px solid var(--line)}
h1{font-size:1.4em;margin:.6em 0}
h2{font-size:1.1em;margin:1.4em 0 .4em}
.muted{color:var(--muted)}
.pill{display:inline-block;padding:.05em .6em;border-radius:1em;color:#fff;font-weight:600;background:var(--muted)}
.pill.up{background:var(--ok)}.pill.down{background:var(--bad)}
table{border-collapse:collapse;width:100%;font-size:.92em}
th,td{text-align:left;padding:.25em .6em .25em 0;border-bottom:1px solid var(--line);vertical-align:middle}
th{font-weight:600;white-space:nowrap}
td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
td.name{overflow-wrap:anywhere}
td.disk{white-space:nowrap}
progress{width:12em;height:1em;accent-color:var(--ok);vertical-align:middle}
.stalled progress{accent-color:var(--warn)}
.completed{color:var(--ok)}.failed{color:var(--bad);font-weight:600}.canceled{color:var(--warn)}
.warn{color:var(--warn)}.bad{color:var(--bad)}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em;margin:0}
dt{color:var(--muted)}dd{margin:0;font-variant-numeric:tabular-nums}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(26em,1fr));gap:0 2em}
dl+table,table+table{margin-top:.8em}
footer{margin-top:2em;font-size:.9em}
footer a{margin-right:1.2em}
#error{color:var(--bad);font-weight:600}
""".strip()

SCRIPT = r"""
"use strict";
const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
const OUTCOME_CLASS = {completed: "completed", failed: "failed", canceled: "canceled"};
// Relative (a reverse proxy may serve the page under a prefix), without the user:password@ a
// page address may hold, which fetch() refuses; the browser sends the login it used for the page.
const STATUS_URL = (() => {
  const u = new URL("status.json", document.baseURI);
  u.username = "";
  u.password = "";
  return u.href;
})();
let refreshMs = 2000;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function bytes(n) {
  let i = 0;
  n = Number(n) || 0;
  while (Math.abs(n) >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(Math.round(n))) + " " + UNITS[i];
}
function duration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "\u2014";
  s = Math.max(0, Math.round(s));
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60), r = s % 60;
  if (d) return d + "d " + h + "h";
  if (h) return h + "h " + String(m).padStart(2, "0") + "m";
  if (m) return m + "m " + String(r).padStart(2, "0") + "s";
  return r + "s";
}
function ago(ts, now) {
  if (!ts) return el("span", "never", "muted");
  const span = el("span", duration(now - ts) + " ago");
  span.title = new Date(ts * 1000).toLocaleString();
  return span;
}
function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.append(c);
  return tr;
}
function td(text, cls) { return el("td", text, cls); }
function fill(id, rows, emptyText, columns) {
  const body = document.getElementById(id);
  if (!rows.length) {
    const cell = td(emptyText, "muted");
    cell.colSpan = columns;
    rows = [row([cell])];
  }
  body.replaceChildren(...rows);
}
function note(id, text) { document.getElementById(id).textContent = text || ""; }
function dl(id, pairs) {
  const list = document.getElementById(id);
  const items = [];
  for (const [k, v, cls] of pairs) {
    items.push(el("dt", k));
    const dd = el("dd", v instanceof Node ? null : v, cls);
    if (v instanceof Node) dd.append(v);
    items.push(dd);
  }
  list.replaceChildren(...items);
}

function renderConnection(s) {
  const c = s.connection;
  const pill = document.getElementById("conn");
  pill.textContent = c.connected ? "connected" : "not connected";
  pill.className = "pill " + (c.connected ? "up" : "down");
  note("conn-detail", c.uri + " (" + c.mode + "), " + c.domains + " running domains, " + c.disks + " disks" +
       (c.unresponsive_total ? ", " + c.unresponsive_total + " unresponsive: " + c.unresponsive.join(", ") : ""));
  document.getElementById("conn-detail").className = c.unresponsive_total ? "warn" : "muted";
}

function renderJobs(s) {
  const rows = s.jobs.shown.map(j => {
    const bar = el("progress");
    bar.max = 100;
    bar.value = j.percent;
    const cell = document.createElement("td");
    cell.append(bar, " ", j.percent.toFixed(1) + " %");
    const rate = j.stalled ? "stalled" : j.rate === null ? "measuring" : bytes(j.rate) + "/s";
    const eta = j.ready ? "ready" : duration(j.eta_seconds);
    const tr = row([td(j.domain, "name"), td(j.disk, "disk"), td(j.type), cell,
                    td(rate, "num" + (j.stalled ? " warn" : "")), td(eta, "num"),
                    td(j.bandwidth ? bytes(j.bandwidth) + "/s" : "unlimited", "num"),
                    (() => { const c = td(null, "num"); c.append(ago(j.started, s.now)); return c; })()]);
    if (j.stalled) tr.className = "stalled";
    return tr;
  });
  fill("jobs", rows, "No active block jobs.", 8);
  const more = s.jobs.total - s.jobs.shown.length;
  note("jobs-note", s.jobs.total + " active" + (more > 0 ? "; " + more + " more not shown" : ""));
}

function renderOutcomes(s) {
  const o = s.outcomes;
  const rows = o.recent.map(r => {
    const status = td(r.outcome + (r.inferred ? " (inferred)" : ""), OUTCOME_CLASS[r.outcome] || "");
    const when = td(null, "num");
    when.append(ago(r.time, s.now));
    return row([when, td(r.domain, "name"), td(r.disk, "disk"), td(r.type), status]);
  });
  fill("outcomes", rows, "No job has ended since the exporter started.", 5);
  note("outcomes-note", Object.entries(o.totals).map(([k, v]) => v + " " + k).join(", "));
}

function renderChains(s) {
  const rows = s.chains.deepest.map(c => row([td(c.domain, "name"), td(c.disk, "disk"), td(c.depth, "num"),
                                                td(c.base, "name muted")]));
  fill("chains", rows, "No disk has a backing chain.", 4);
  note("chains-note", s.chains.with_backing + " disks with backing images");
}

function renderPolicy(s) {
  const p = s.policy;
  const section = document.getElementById("policy");
  section.hidden = !p;
  if (!p) return;
  const pairs = [["mode", p.enforcing ? "enforcing" : "dry run", p.enforcing ? "" : "warn"]];
  if (!p.reload_ok) pairs.push(["last reload", "failed; the previous policy is in force", "bad"]);
  if (p.evaluated === null) {
    pairs.push(["evaluated", "not yet"]);
  } else {
    pairs.push(["evaluated", ago(p.evaluated, s.now)],
               ["start window", p.in_window ? "open" : "closed"],
               ["active jobs", p.active_jobs + " of at most " + p.max_concurrent],
               ["starting now", p.starting],
               ["deferred", p.deferred_total]);
  }
  dl("policy-state", pairs);
  const rules = (p.rules || []).map(r => row([
    td(r.name, "name"), td(r.candidates, "num"),
    td(Object.entries(r.deferred).map(([k, v]) => k + ": " + v).join(", ") || "\u2014")]));
  fill("policy-rules", rules, "No evaluation yet.", 3);
  const deferred = (p.deferred || []).map(d => row([
    td(d.domain, "name"), td(d.disk, "disk"), td(d.rule, "name"),
    td(d.would ? "would " + d.would : d.reason), td(d.detail, "muted")]));
  fill("policy-deferred", deferred, "Nothing deferred.", 5);
}

function renderExporter(s) {
  const x = s.exporter;
  document.getElementById("health").hidden = !x;
  if (!x) return;
  const errors = Object.entries(x.libvirt_errors).map(([k, v]) => k + ": " + v).join(", ");
  let cycle = el("span", "none yet");
  if (x.last_poll_time) {
    cycle = el("span", "took " + Math.round(x.last_poll_duration * 1000) + " ms, ended ");
    cycle.append(ago(x.last_poll_time, s.now));
  }
  dl("health-state", [
    ["last poll cycle", cycle, x.last_poll_duration > x.poll_interval ? "warn" : ""],
    ["poll interval", x.poll_interval + " s"],
    ["discovery interval", x.discovery_interval.toFixed(1) + " s"],
    ["poll cycles", x.poll_cycles],
    ["libvirt calls", x.libvirt_calls],
    ["libvirt errors", x.libvirt_errors_total ? x.libvirt_errors_total + " (" + errors + ")" : "0",
     x.libvirt_errors_total ? "warn" : ""],
    ["reconnects", x.reconnects],
    ["events received", x.events],
  ]);
}

function render(s) {
  refreshMs = Math.max(1000, (s.refresh_seconds || 2) * 1000);
  renderConnection(s);
  renderJobs(s);
  renderOutcomes(s);
  renderChains(s);
  renderPolicy(s);
  renderExporter(s);
  const updated = document.getElementById("updated");
  updated.textContent = "updated " + new Date(s.now * 1000).toLocaleTimeString();
  updated.dataset.now = String(s.now);
}

async function refresh() {
  try {
    const r = await fetch(STATUS_URL, {cache: "no-store", credentials: "same-origin"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    note("error", "");
  } catch (e) {
    note("error", "Cannot load status.json: " + e.message + " (retrying)");
  } finally {
    setTimeout(refresh, refreshMs);
  }
}
refresh();
""".strip()


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


# Sent with the page: its own script and style by hash, fetches to its own origin, nothing else;
# no framing (no clickjacking of the page under someone else's).
CONTENT_SECURITY_POLICY = (f"default-src 'none'; script-src {_hash(SCRIPT)}; style-src {_hash(STYLE)}; "
                           "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")

_BODY = """
<header>
<h1>{title}</h1>
<span id="conn" class="pill">loading</span>
<span id="conn-detail" class="muted"></span>
<span id="updated" class="muted"></span>
</header>
<p id="error" role="alert"></p>
<noscript><p>This page needs JavaScript to show the live status; <a href="status.json">status.json</a> holds the
same data.</p></noscript>
<section id="active">
<h2>Active block jobs <span id="jobs-note" class="muted"></span></h2>
<table>
<thead><tr><th>Domain</th><th>Disk</th><th>Type</th><th>Progress</th><th>Rate</th><th>ETA</th><th>Bandwidth cap</th>
<th>Since</th></tr></thead>
<tbody id="jobs"></tbody>
</table>
</section>
<div class="cols">
<section>
<h2>Last outcomes <span id="outcomes-note" class="muted"></span></h2>
<table>
<thead><tr><th>When</th><th>Domain</th><th>Disk</th><th>Type</th><th>Status</th></tr></thead>
<tbody id="outcomes"></tbody>
</table>
</section>
<section>
<h2>Deepest backing chains <span id="chains-note" class="muted"></span></h2>
<table>
<thead><tr><th>Domain</th><th>Disk</th><th>Depth</th><th>Base image</th></tr></thead>
<tbody id="chains"></tbody>
</table>
</section>
</div>
<div class="cols">
<section id="policy" hidden>
<h2>Policy</h2>
<dl id="policy-state"></dl>
<table>
<thead><tr><th>Rule</th><th>Candidates</th><th>Deferred by reason</th></tr></thead>
<tbody id="policy-rules"></tbody>
</table>
<table>
<thead><tr><th>Domain</th><th>Disk</th><th>Rule</th><th>Deferred</th><th>Detail</th></tr></thead>
<tbody id="policy-deferred"></tbody>
</table>
</section>
<section id="health" hidden>
<h2>Exporter</h2>
<dl id="health-state"></dl>
</section>
</div>
<footer>{version}{links}</footer>
"""


def render_page(title: str, version: str, links: Sequence[tuple[str, str]]) -> bytes:
    """The page, with the operator's title, version and links (href, text) escaped into it."""
    e = html.escape
    anchors = "".join(f'<a href="{e(href, quote=True)}">{e(text)}</a>' for href, text in links)
    ver = f'<span class="muted">Version {e(version)}</span> ' if version else ""
    body = _BODY.format(title=e(title), version=ver, links=anchors)
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>{body}"
            f"<script>{SCRIPT}</script>\n</body>\n</html>\n")
    return page.encode("utf-8")
