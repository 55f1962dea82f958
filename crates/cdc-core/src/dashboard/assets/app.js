// The dashboard's page: reads /api/status every few seconds and draws it; the history
// browser reads /api/history and /api/as-of. Plain DOM (text only, never HTML from data),
// charts drawn as SVG by the small functions below. No libraries, no build step.
"use strict";

const REFRESH_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6feb", "#1a7f37", "#b25e00", "#8250df", "#bf3989", "#0a7ea4"];
let tables = []; // the tables of the last status, for the history browser
let refreshing = false;

// ---- small helpers ----------------------------------------------------------------------
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else if (k === "title") e.title = v;
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmtSecs(s) {
  if (s === null || s === undefined || !isFinite(s)) return "—";
  if (s < 0) s = 0;
  if (s < 10) return s.toFixed(2) + " s";
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return Math.floor(s / 60) + " m " + Math.round(s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " m";
  return (s / 86400).toFixed(1) + " d";
}

function fmtBytes(b) {
  if (b === null || b === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return (i === 0 ? b : b.toFixed(1)) + " " + units[i];
}

// Axis ticks of seconds, short: 0.1s, 10s, 17m, 2.8h.
function fmtTick(s) {
  if (s < 60) return +s.toPrecision(2) + "s";
  if (s < 3600) return +(s / 60).toPrecision(2) + "m";
  return +(s / 3600).toPrecision(2) + "h";
}

const fmtNum = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));

// UTC, to the second: "2026-11-24 10:02:17"
function fmtTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "").replace("Z", "");
}

function ago(iso, now) {
  if (!iso) return "";
  return fmtSecs((now - new Date(iso)) / 1000) + " ago";
}

function fill(tbody, rows, emptyText, cols) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "none", colSpan: cols }, emptyText))]));
}

async function getJson(url) {
  const r = await fetch(url, { cache: "no-store" });
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) throw new Error((body && body.error) || r.status + " " + r.statusText);
  return body;
}

// ---- status ------------------------------------------------------------------------------
async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const s = await getJson("/api/status");
    render(s);
  } catch (e) {
    showBanner("The dashboard cannot reach the loader: " + e.message);
    $("ready").textContent = "unreachable";
    $("ready").className = "badge bad";
  } finally {
    refreshing = false;
  }
}

function showBanner(text) {
  const b = $("banner");
  b.hidden = !text;
  b.textContent = text || "";
}

function render(s) {
  const now = new Date(s.generated_at);
  $("pipeline").textContent = s.pipeline;
  $("ready").textContent = s.ready ? "ready" : "not ready";
  $("ready").className = "badge " + (s.ready ? "ok" : "bad");
  $("ready").title = s.readiness;
  for (const [name, db] of [["warehouse", s.warehouse], ["source", s.source]]) {
    $(name + "-state").className = "dot " + (db.reachable ? "ok" : "bad");
    $(name + "-addr").textContent = db.address;
  }
  $("updated").textContent = fmtTime(s.generated_at) + " UTC";

  const problems = [];
  if (!s.warehouse.reachable) problems.push("Warehouse unreachable: " + s.warehouse.error);
  if (!s.source.reachable) problems.push("Source unreachable (slot WAL unknown): " + s.source.error);
  if (!s.ready) problems.push("Loader " + s.readiness);
  for (const o of s.outages) problems.push(o.program + " waiting for " + o.waiting_for + " since " + fmtTime(o.since) + " (last error: " + o.last_error + ")");
  showBanner(problems.join("\n"));

  renderCards(s);
  renderTables(s, now);
  renderCharts(s, now);
  renderFiles(s);
  renderRuns(s);
  if (JSON.stringify(s.tables.map((t) => t.table)) !== JSON.stringify(tables.map((t) => t.table))) {
    tables = s.tables;
    fillTableSelect();
  }
}

function renderCards(s) {
  const c = s.capture;
  $("capture-lag").textContent = c.lag_seconds !== null ? fmtSecs(c.lag_seconds)
    : c.mode === "logical" && c.slot.unconfirmed_wal_bytes !== null ? fmtBytes(c.slot.unconfirmed_wal_bytes) : "—";
  $("capture-mode").textContent = c.mode === "logical"
    ? (c.lag_seconds !== null ? "logical mode: age of the newest commit captured" : "logical mode: WAL not yet confirmed by the slot")
    : c.mode === "timestamp" ? "timestamp mode: age of the oldest table watermark" : "capture mode unknown (no progress yet)";
  $("apply-lag").textContent = fmtSecs(s.apply.lag_seconds);
  $("pending-count").textContent = fmtNum(s.apply.pending_count);
  $("log-dir").textContent = s.apply.error || s.apply.log_dir;
  $("dead-count").textContent = fmtNum(s.apply.dead_letter_count);
  $("dead-count").className = "value" + (s.apply.dead_letter_count ? " error" : "");
  const slot = c.slot;
  $("slot-wal").textContent = slot.state === "ok" ? fmtBytes(slot.retained_wal_bytes) : slot.state;
  $("slot-note").textContent = slot.state === "ok"
    ? "slot " + slot.name + (slot.active ? " (active)" : " (inactive)")
    : slot.state === "missing" ? "no slot " + slot.name + " (timestamp mode, or not created yet)"
    : slot.error || "source unreachable";
}

function renderTables(s, now) {
  const rows = s.tables.map((t) => el("tr", { "data-table": t.table },
    el("td", {}, el("b", {}, t.table)),
    el("td", { class: "mono" }, t.history),
    el("td", { class: "num versions" }, fmtNum(t.versions)),
    el("td", { class: "num current" }, fmtNum(t.current_rows)),
    el("td", { class: "num deletes" }, fmtNum(t.deletes)),
    el("td", { title: t.newest_change || "" }, t.error ? el("span", { class: "error" }, t.error) : t.newest_change ? fmtTime(t.newest_change) + " (" + ago(t.newest_change, now) + ")" : "—"),
    el("td", { class: "num capture-lag" }, fmtSecs(t.capture_lag_seconds)),
    el("td", { class: "num apply-lag" }, fmtSecs(t.apply_lag_seconds)),
  ));
  fill($("tables").tBodies[0], rows, "no tables described yet", 8);
  $("tables-error").hidden = !s.tables_error;
  $("tables-error").textContent = s.tables_error || "";
}

function renderFiles(s) {
  fill($("pending").tBodies[0], s.apply.pending.map((f) => el("tr", {},
    el("td", { class: "mono" }, f.name), el("td", { class: "num" }, fmtNum(f.bytes)), el("td", { class: "num" }, fmtSecs(f.age_seconds)))),
  "nothing pending", 3);
  fill($("dead").tBodies[0], s.apply.dead_letter.map((f) => el("tr", {},
    el("td", { class: "mono" }, f.name), el("td", { class: "num" }, f.line ?? ""),
    el("td", { class: "reason" }, f.reason || ""), el("td", {}, fmtTime(f.quarantined_at)))),
  "none", 4);
}

function renderRuns(s) {
  fill($("runs").tBodies[0], s.runs.map((r) => el("tr", { class: r.status === "success" ? "" : "failed" },
    el("td", {}, r.program),
    el("td", { class: "status-" + r.status }, r.status),
    el("td", {}, fmtTime(r.start_time)),
    el("td", { class: "num" }, r.end_time ? fmtSecs((new Date(r.end_time) - new Date(r.start_time)) / 1000) : "running"),
    el("td", { class: "num" }, fmtNum(r.records_processed)),
    el("td", { class: "num" }, fmtNum(r.records_inserted)),
    el("td", { class: "num" }, fmtNum(r.records_updated)),
    el("td", { class: "num" }, fmtNum(r.records_deleted)),
    el("td", { class: "reason" }, r.error_message || ""))),
  "no runs recorded", 9);
}

// ---- charts ------------------------------------------------------------------------------
const CH = { w: 600, h: 220, l: 52, r: 12, t: 12, b: 40 };

function renderCharts(s, now) {
  const end = Math.ceil(now.getTime() / 60000) * 60000;
  const start = end - 3600000;
  const pts = (f) => s.minutes.map((m) => ({ t: new Date(m.t).getTime() + 30000, v: f(m) })).filter((p) => p.v !== null && p.v !== undefined);
  lineChart($("chart-delay"), [
    { name: "max (oldest change of a file)", color: "#c4302b", points: pts((m) => m.max_delay_seconds) },
    { name: "min (newest change of a file)", color: "#2f6feb", points: pts((m) => m.min_delay_seconds) },
  ], { start, end, log: true, fmt: fmtTick, empty: "no file applied in the last hour" });
  // Throughput: every minute of the hour, 0 where nothing happened.
  const byMinute = new Map(s.minutes.map((m) => [new Date(m.t).getTime(), m]));
  const series = (f) => {
    const out = [];
    for (let t = start; t < end; t += 60000) { const m = byMinute.get(t); out.push({ t: t + 30000, v: m ? f(m) : 0 }); }
    return out;
  };
  lineChart($("chart-throughput"), [
    { name: "captured events/min", color: "#8250df", points: series((m) => m.captured) },
    { name: "applied events/min", color: "#2f6feb", points: series((m) => m.events) },
    { name: "versions inserted/min", color: "#1a7f37", points: series((m) => m.versions_inserted) },
  ], { start, end, log: false, fmt: fmtNum, empty: null });
}

function lineChart(root, series, o) {
  const { w, h, l, r, t, b } = CH;
  root.replaceChildren();
  const all = series.flatMap((s) => s.points.map((p) => p.v));
  const x = (ms) => l + ((ms - o.start) / (o.end - o.start)) * (w - l - r);
  let y, ticks;
  if (o.log) {
    const pos = all.filter((v) => v > 0);
    const lo = Math.floor(Math.log10(pos.length ? Math.min(...pos) : 0.1));
    const hi = Math.max(lo + 1, Math.ceil(Math.log10(pos.length ? Math.max(...pos) : 10)));
    y = (v) => { const lv = Math.log10(Math.max(v, Math.pow(10, lo))); return h - b - ((lv - lo) / (hi - lo)) * (h - t - b); };
    ticks = [];
    for (let e = lo; e <= hi; e++) ticks.push(Math.pow(10, e));
  } else {
    const max = Math.max(1, ...all);
    const step = niceStep(max / 4);
    const top = Math.ceil(max / step) * step;
    y = (v) => h - b - (v / top) * (h - t - b);
    ticks = [];
    for (let v = 0; v <= top + 1e-9; v += step) ticks.push(v);
  }
  for (const v of ticks) {
    root.append(svg("line", { x1: l, x2: w - r, y1: y(v), y2: y(v), class: "grid-line" }));
    root.append(svg("text", { x: l - 6, y: y(v) + 3, "text-anchor": "end" }, o.fmt(v)));
  }
  for (let m = 0; m <= 60; m += 10) {
    const ms = o.start + m * 60000;
    root.append(svg("line", { x1: x(ms), x2: x(ms), y1: t, y2: h - b, class: "grid-line" }));
    root.append(svg("text", { x: x(ms), y: h - b + 14, "text-anchor": "middle" }, m === 60 ? "now" : "−" + (60 - m) + " min"));
  }
  if (!all.length && o.empty) {
    root.append(svg("text", { x: (l + w - r) / 2, y: (t + h - b) / 2, "text-anchor": "middle", class: "empty" }, o.empty));
  }
  series.forEach((s, i) => {
    if (s.points.length) {
      const d = s.points.map((p, j) => (j ? "L" : "M") + x(p.t).toFixed(1) + "," + y(p.v).toFixed(1)).join(" ");
      root.append(svg("path", { d, fill: "none", stroke: s.color, "stroke-width": 1.8, class: "series" }));
      if (o.log) for (const p of s.points) root.append(svg("circle", { cx: x(p.t), cy: y(p.v), r: 2.5, fill: s.color }));
    }
    const lx = l + i * 190;
    root.append(svg("rect", { x: lx, y: h - 14, width: 10, height: 10, fill: s.color }));
    root.append(svg("text", { x: lx + 14, y: h - 5 }, s.name));
  });
}

function niceStep(raw) {
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p;
  return 10 * p;
}

// ---- history browser ---------------------------------------------------------------------
function fillTableSelect() {
  const sel = $("hb-table");
  const keep = sel.value;
  sel.replaceChildren(...tables.map((t) => el("option", { value: t.table }, t.table)));
  if (tables.some((t) => t.table === keep)) sel.value = keep;
  keyInputs();
}

function currentTable() {
  return tables.find((t) => t.table === $("hb-table").value);
}

function keyInputs(values) {
  const t = currentTable();
  const box = $("hb-keys");
  box.replaceChildren(...(t ? t.key_columns.map((k, i) => el("label", {}, k + " ",
    el("input", { class: "key-part", size: k === "id" && t.key_columns.length === 1 ? 36 : 12, value: values ? values[i] : "", spellcheck: false }))) : []));
}

// The key as the API takes it: one column's text, or the JSON array of a composite key's.
function encodeKey(parts) {
  return parts.length === 1 ? parts[0] : JSON.stringify(parts);
}

function decodeKey(key, n) {
  return n === 1 ? [key] : JSON.parse(key);
}

async function showHistory(table, key) {
  const msg = $("history-msg");
  msg.className = "msg";
  msg.textContent = "loading…";
  try {
    const h = await getJson("/api/history?table=" + encodeURIComponent(table) + "&key=" + encodeURIComponent(key));
    msg.textContent = h.rows.length
      ? h.rows.length + " version(s) of " + h.table + " key " + key + (h.truncated ? " (the first " + h.limit + ")" : "")
      : "no versions of " + h.table + " key " + key;
    drawTimeline(h);
    drawRows($("versions"), h, { highlightChanges: true });
  } catch (e) {
    msg.className = "msg error";
    msg.textContent = e.message;
    $("timeline").replaceChildren();
    $("versions").replaceChildren();
  }
}

function drawTimeline(h) {
  const box = $("timeline");
  box.replaceChildren();
  if (!h.rows.length) return;
  const W = 1000, H = 74, L = 10, R = 10, top = 14, barH = 28;
  const now = Date.now();
  const t0 = new Date(h.rows[0].valid_from).getTime();
  const last = h.rows[h.rows.length - 1];
  const t1 = Math.max(last.valid_to ? new Date(last.valid_to).getTime() : now, t0 + 1000);
  const x = (ms) => L + ((ms - t0) / (t1 - t0)) * (W - L - R);
  const root = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "versions timeline" });
  root.append(svg("line", { x1: L, x2: W - R, y1: top + barH + 4, y2: top + barH + 4, class: "grid-line", stroke: "#c9ced6" }));
  h.rows.forEach((v, i) => {
    const a = new Date(v.valid_from).getTime();
    const z = v.valid_to ? new Date(v.valid_to).getTime() : t1;
    const x0 = x(a), x1 = Math.max(x(z), x0 + 3);
    const rect = svg("rect", { x: x0, y: top, width: x1 - x0, height: barH, rx: 3, fill: COLORS[i % COLORS.length], class: "version", "data-index": i });
    rect.append(svg("title", {}, "version " + (i + 1) + ": " + fmtTime(v.valid_from) + " → " + (v.valid_to ? fmtTime(v.valid_to) : "now (current)") + (v.is_truncated ? ", then truncated" : v.is_deleted ? ", then deleted" : "")));
    rect.addEventListener("click", () => selectVersion(i, v));
    root.append(rect);
    if (x1 - x0 > 22) root.append(svg("text", { x: x0 + 6, y: top + 18, class: "in-bar" }, "v" + (i + 1)));
    if (v.is_deleted) {
      const dx = x(z);
      root.append(svg("line", { x1: dx - 5, x2: dx + 5, y1: top - 5, y2: top + 5, class: "deleted-mark" }));
      root.append(svg("line", { x1: dx - 5, x2: dx + 5, y1: top + 5, y2: top - 5, class: "deleted-mark" }));
    }
  });
  root.append(svg("text", { x: L, y: H - 6 }, fmtTime(h.rows[0].valid_from)));
  root.append(svg("text", { x: W - R, y: H - 6, "text-anchor": "end" }, last.valid_to ? fmtTime(last.valid_to) + (last.is_truncated ? " (truncated)" : last.is_deleted ? " (deleted)" : "") : "now (current)"));
  box.append(root);
}

function selectVersion(i, v) {
  document.querySelectorAll("#timeline .version").forEach((r) => r.classList.toggle("selected", Number(r.getAttribute("data-index")) === i));
  document.querySelectorAll("#versions tbody tr").forEach((r, j) => r.classList.toggle("selected", j === i));
  // The table as it was when this version began (the API's time, to the microsecond).
  $("asof-at").value = v.valid_from;
}

function drawRows(box, h, opts) {
  const head = el("tr", {}, ...h.columns.map((c) => el("th", {}, c)));
  const rows = h.rows.map((r, i) => {
    const prev = i > 0 ? h.rows[i - 1].values : null;
    const tr = el("tr", { "data-key": r.key, class: opts.clickable ? "clickable" : "" },
      ...r.values.map((v, j) => el("td", {
        class: "mono" + (opts.highlightChanges && prev && j >= h.key_columns && h.columns[j] !== "valid_from" && isTracked(h, j) && prev[j] !== v ? " changed" : ""),
      }, v === null ? "NULL" : v)));
    if (opts.clickable) tr.addEventListener("click", () => {
      $("hb-table").value = h.table;
      keyInputs(decodeKey(r.key, h.key_columns));
      showHistory(h.table, r.key);
      $("browser").scrollIntoView();
    });
    return tr;
  });
  box.replaceChildren(el("table", { class: "grid small" }, el("thead", {}, head), el("tbody", {}, ...rows)));
}

// Tracked columns are those between the key and valid_from.
function isTracked(h, j) {
  return j < h.columns.indexOf("valid_from");
}

async function showAsOf() {
  const t = currentTable();
  const msg = $("asof-msg");
  if (!t) return;
  msg.className = "msg";
  msg.textContent = "loading…";
  try {
    const at = $("asof-at").value.trim();
    const r = await getJson("/api/as-of?table=" + encodeURIComponent(t.table) + "&at=" + encodeURIComponent(at));
    msg.textContent = r.rows.length + " row(s) of " + r.table + " as of " + r.at + (r.truncated ? " (the first " + r.limit + " by key)" : "") + " — click a row for its history";
    drawRows($("asof"), r, { clickable: true });
  } catch (e) {
    msg.className = "msg error";
    msg.textContent = e.message;
    $("asof").replaceChildren();
  }
}

$("hb-table").addEventListener("change", () => keyInputs());
$("history-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = currentTable();
  if (!t) return;
  const parts = [...document.querySelectorAll("#hb-keys .key-part")].map((i) => i.value.trim());
  showHistory(t.table, encodeKey(parts));
});
$("asof-form").addEventListener("submit", (ev) => { ev.preventDefault(); showAsOf(); });
$("asof-at").value = new Date().toISOString().replace(/\.\d+Z$/, "Z");

refresh();
setInterval(refresh, REFRESH_MS);
