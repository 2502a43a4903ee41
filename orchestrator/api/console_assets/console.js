"use strict";
// The operator's console (issue 27). Plain JavaScript, no build step, nothing from a
// CDN; served with CSP default-src 'self'. Everything shown comes from the public API
// (the same routes a script uses) with the bearer token, asked for once and kept in
// localStorage. Everything an agent wrote (replies, file names, question cards, chat
// ids) is put on the page as text: el()/text() use createTextNode/textContent only,
// never innerHTML. Views: #/ (fleet + sessions), #/session/<id>, #/groups.
const KEY = "orchestrator-api-token";
const PAGE = 50;
// cursors: where each page shown so far starts ("" = the first); next: the server's
// X-Next-Cursor (null on the last page). Cursor pages are the same on one
// orchestrator and on the merged list of every shard (an offset is not).
const state = {cursors: [""], next: null, total: 0, rows: new Map(), lastId: null, view: null,
               fleetTimer: null, refreshTimer: null, sessionId: null, streams: 0, said: null,
               touched: new Set()};

// --- helpers -----------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null) continue;
    if (k === "class") node.className = v;
    else if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c == null) continue;
    node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    localStorage.setItem(KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);
  }
  let t = localStorage.getItem(KEY);
  if (!t) {
    t = (prompt("API token (the contents of [api] token_file):") || "").trim();
    if (t) localStorage.setItem(KEY, t);
  }
  return t;
}

async function api(path, opts) {
  opts = opts || {};
  const headers = Object.assign({"Authorization": "Bearer " + token()}, opts.headers || {});
  const init = {headers: headers, cache: "no-store", method: opts.method || "GET"};
  if (opts.body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(opts.body);
  }
  const resp = await fetch(path, init);
  if (resp.status === 401) {
    localStorage.removeItem(KEY);
    throw new Error("wrong token");
  }
  if (!resp.ok) {
    let why = "HTTP " + resp.status;
    try { why += ": " + (await resp.json()).error; } catch (e) { /* not JSON */ }
    throw new Error(why);
  }
  return resp;
}

async function getJson(path) { return (await api(path)).json(); }

function sid(id) { return encodeURIComponent(id); }

function setConn(text, cls) {
  const node = document.getElementById("conn");
  node.textContent = text;
  node.className = cls;
}

function chat(r) {
  const ro = r.routing || {};
  if (!ro.channel_type) return "-";
  return ro.channel_type + ":" + ro.platform_id + (ro.thread_id ? " / " + ro.thread_id : "");
}

function stateOf(r) {
  if (r.queue_position != null) return "queued";
  if (r.container_status === "idle" && (r.status_reason || "").startsWith("paused")) {
    return "paused";
  }
  return r.container_status;
}

function ago(iso) {
  if (!iso) return "-";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (!isFinite(s)) return String(iso);
  if (s < 90) return Math.max(0, Math.round(s)) + "s ago";
  if (s < 5400) return Math.round(s / 60) + "m ago";
  if (s < 129600) return Math.round(s / 3600) + "h ago";
  return String(iso).slice(0, 10);
}

function say(node, text, bad) {
  node.textContent = text;
  node.className = "say" + (bad ? " bad" : "");
  // an action's answer stays when its session's view is re-drawn (it is, right after)
  if (node.id === "action-result") state.said = {id: state.sessionId, text: text, bad: bad};
}

// --- fleet: tiles and plots --------------------------------------------------------------

function tile(key, value, bad) {
  return el("div", {class: "tile" + (bad ? " bad" : ""), id: "tile-" + key},
            el("div", {class: "v"}, value), el("div", {class: "k"}, key.replace(/_/g, " ")));
}

// A small SVG plot (own code: five plots of ≤361 points need no charting library).
function plot(title, samples, series, bars) {
  const NS = "http://www.w3.org/2000/svg";
  const W = 300, H = 70, P = 2;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const now = samples.length ? samples[samples.length - 1].t : Date.now() / 1000;
  const t0 = now - 3600;
  let max = 0;
  for (const s of samples) for (const k of series.concat(bars || [])) {
    if (s[k] != null) max = Math.max(max, s[k]);
  }
  max = max || 1;
  const x = t => P + (W - 2 * P) * (t - t0) / 3600;
  const y = v => H - P - (H - 2 * P) * v / max;
  const axis = document.createElementNS(NS, "line");
  for (const [a, v] of [["x1", 0], ["y1", H - P], ["x2", W], ["y2", H - P]]) axis.setAttribute(a, v);
  axis.setAttribute("class", "axis");
  svg.appendChild(axis);
  for (const k of bars || []) {
    for (const s of samples) {
      if (!s[k]) continue;
      const r = document.createElementNS(NS, "rect");
      r.setAttribute("x", x(s.t) - 1.5);
      r.setAttribute("y", y(s[k]));
      r.setAttribute("width", 3);
      r.setAttribute("height", Math.max(0, H - P - y(s[k])));
      r.setAttribute("class", "bar");
      svg.appendChild(r);
    }
  }
  series.forEach((k, i) => {
    const pts = samples.filter(s => s[k] != null).map(s => `${x(s.t).toFixed(1)},${y(s[k]).toFixed(1)}`);
    if (!pts.length) return;
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute("points", pts.join(" "));
    line.setAttribute("class", i ? "line2" : "line");
    svg.appendChild(line);
  });
  const last = samples.length ? samples[samples.length - 1] : {};
  const now_ = series.concat(bars || []).map(k => k + " " + (last[k] == null ? "-" : last[k]));
  return el("div", {class: "plot", "data-plot": title},
            el("div", {class: "k"}, title + " · max " + +max.toFixed(3)), svg,
            el("div", {class: "legend"}, "now: " + now_.join(", ")));
}

async function loadFleet() {
  const f = await getJson("/v1/fleet");
  const t = f.tiles, s = t.sessions, h = f.last_hour;
  document.getElementById("tiles").replaceChildren(
    tile("running", s.running), tile("idle", s.idle), tile("paused", s.paused),
    tile("stopped", s.stopped), tile("queued", s.queued),
    tile("agents", t.agents + " / " + (t.max_agents == null ? "∞" : t.max_agents)),
    tile("delivered_1h", h.delivered), tile("failed_replies_1h", h.failed, h.failed > 0),
    tile("failed_messages_1h", h.messages_failed, h.messages_failed > 0));
  const sm = f.samples;
  document.getElementById("plots").replaceChildren(
    plot("running agents", sm, ["running"]),
    plot("queue length", sm, ["queued"]),
    plot("reply delay p50 / p99 (s)", sm, ["delay_p50", "delay_p99"]),
    plot("agent starts / start time (s)", sm, ["start_seconds"], ["starts"]));
}

// --- sessions list (paged on the server) --------------------------------------------------

function query() {
  const p = new URLSearchParams({limit: PAGE, cursor: state.cursors[state.cursors.length - 1]});
  const q = document.getElementById("q").value.trim();
  const st = document.getElementById("status-filter").value;
  const sort = document.getElementById("sort").value;
  if (q) p.set("q", q);
  if (st) p.set("status", st);
  if (sort) p.set("sort", sort);
  p.set("order", document.getElementById("order").value);
  return p.toString();
}

function cell(tr, cls, value) {
  const td = el("td", {class: cls}, value == null ? "-" : value);
  tr.appendChild(td);
  return td;
}

function renderRow(r, tr) {
  tr = tr || el("tr", {id: "row-" + r.session_id});
  tr.replaceChildren();
  cell(tr, "group", r.agent_group);
  const link = el("a", {href: "#/session/" + sid(r.session_id)}, r.session_id);
  tr.appendChild(el("td", {class: "session"}, link));
  cell(tr, "chat", chat(r));
  const st = stateOf(r);
  const td = cell(tr, "status status-" + st, r.container_status);
  if (st !== r.container_status) td.appendChild(el("span", {class: "muted"}, " (" + st + ")"));
  cell(tr, "num pending", r.pending);
  cell(tr, "num failed", r.failed);
  cell(tr, "active", ago(r.last_active || r.last_heartbeat));
  cell(tr, "usage", usage(r.usage));
  return tr;
}

async function loadSessions() {
  const started = performance.now();
  const resp = await api("/v1/sessions?" + query());
  const rows = await resp.json();
  state.total = Number(resp.headers.get("X-Total-Count") || rows.length);
  state.next = resp.headers.get("X-Next-Cursor");
  const first = (state.cursors.length - 1) * PAGE;
  const body = document.querySelector("#sessions tbody");
  state.rows = new Map();
  body.replaceChildren(...rows.map(r => {
    const tr = renderRow(r);
    state.rows.set(r.session_id, tr);
    return tr;
  }));
  document.getElementById("empty").hidden = rows.length > 0;
  document.getElementById("total").textContent = "(" + state.total + ")";
  const last = first + rows.length;
  document.getElementById("page-info").textContent =
    rows.length ? (first + 1) + "–" + last + " of " + state.total : "";
  document.getElementById("prev").disabled = state.cursors.length === 1;
  document.getElementById("next").disabled = !state.next;
  window.__consoleListed = {query: query(), rows: rows.length, total: state.total,
                            first: first + 1, ids: rows.map(r => r.session_id),
                            ms: performance.now() - started, at: performance.now()};
}

async function refreshRow(id) {
  const tr = state.rows.get(id);
  if (!tr) return;
  renderRow(await getJson("/v1/sessions/" + sid(id)), tr);
}

// --- one session --------------------------------------------------------------------------

function contentText(m) {
  const c = m.content;
  if (m.problem) return "(" + m.problem + ")";
  if (c && typeof c === "object" && typeof c.text === "string") return c.text;
  return JSON.stringify(c);
}

async function download(url, name, out) {
  try {
    const blob = await (await api(url)).blob();
    const a = el("a", {href: URL.createObjectURL(blob), download: name});
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 5000);
  } catch (e) { say(out, "download failed: " + e.message, true); }
}

function optionValue(o) {
  return (o && typeof o === "object") ? String(o.value != null ? o.value : o.label) : String(o);
}
function optionLabel(o) {
  return (o && typeof o === "object") ? String(o.label != null ? o.label : o.value) : String(o);
}

function questionCard(s, m, answered, out) {
  const c = m.content;
  const card = el("div", {class: "card", "data-question": String(c.questionId)},
                  el("div", {class: "title"}, c.title == null ? "question" : c.title),
                  el("div", {class: "q"}, c.question == null ? "" : c.question));
  if (answered != null) {
    card.appendChild(el("div", {class: "muted"}, "answered: " + answered));
    return card;
  }
  const row = el("div", {class: "actions"});
  for (const o of Array.isArray(c.options) ? c.options : []) {
    row.appendChild(el("button", {type: "button", class: "answer", on: {click: async () => {
      try {
        await api("/v1/sessions/" + sid(s.session_id) + "/answer", {method: "POST", body: {
          question_id: String(c.questionId), option: optionValue(o)}});
        say(out, "answered " + optionValue(o));
        showSession(s.session_id);
      } catch (e) { say(out, e.message, true); }
    }}}, optionLabel(o)));
  }
  card.appendChild(row);
  return card;
}

function messageBox(s, m, out) {
  const box = el("div", {class: "msg " + m.direction, "data-id": m.id},
                 el("div", {class: "meta"}, (m.direction === "in" ? "→ in" : "← out") + " · " +
                    m.timestamp + " · " + m.kind + " · " + (m.status || "-")),
                 el("div", {class: "text"}, contentText(m)));
  if (m.files && m.files.length) {
    const files = el("div", {class: "files"});
    for (const f of m.files) {
      if (f.url) {
        files.appendChild(el("a", {href: "#", class: "file", on: {click: ev => {
          ev.preventDefault(); download(f.url, f.name, out);
        }}}, f.name));
      } else files.appendChild(el("span", {class: "file"}, f.name));
    }
    box.appendChild(files);
  }
  return box;
}

function table(headers, rows) {
  return el("div", {class: "scroll"}, el("table", {},
    el("thead", {}, el("tr", {}, ...headers.map(h => el("th", {}, h)))),
    el("tbody", {}, ...rows.map(r => el("tr", {}, ...r.map(v => el("td", {}, v == null ? "-" : v)))))));
}

async function showSession(id) {
  const logTail = el("pre", {id: "agent-log", class: "log"});
  const view = document.getElementById("view-session");
  const out = el("div", {class: "say", id: "action-result"});
  if (state.said && state.said.id === id) {
    out.textContent = state.said.text;
    if (state.said.bad) out.className = "say bad";
  }
  const [s, page, tl, series] = await Promise.all([
    getJson("/v1/sessions/" + sid(id)),
    getJson("/v1/sessions/" + sid(id) + "/messages?limit=200"),
    getJson("/v1/sessions/" + sid(id) + "/timeline"),
    getJson("/v1/series?session_id=" + sid(id))]);
  if (state.sessionId !== id) return;
  const msgs = page.messages.slice().reverse();  // newest last
  const answers = new Map();
  for (const m of msgs) {
    const c = m.content;
    if (m.direction === "in" && c && c.type === "question_response") {
      answers.set(String(c.questionId), String(c.selectedOption));
    }
  }
  const conv = el("div", {class: "conv", id: "conversation"});
  const cards = el("div", {id: "questions"});
  for (const m of msgs) {
    const c = m.content;
    if (m.direction === "out" && c && c.type === "ask_question") {
      const answered = answers.has(String(c.questionId)) ? answers.get(String(c.questionId)) : null;
      conv.appendChild(questionCard(s, m, answered, out));
      if (answered == null) cards.appendChild(questionCard(s, m, null, out));
    } else conv.appendChild(messageBox(s, m, out));
  }
  const open = msgs.filter(m => m.status === "pending" || m.status === "failed");
  const text = el("textarea", {id: "send-text", placeholder: "message to the agent"});
  const ro = s.routing || {};
  const act = (label, cls, fn) => el("button", {type: "button", class: cls, id: "act-" + label.replace(/ /g, "-"),
    on: {click: async () => {
      try { say(out, await fn()); } catch (e) { say(out, e.message, true); }
      setTimeout(() => { if (state.sessionId === id) showSession(id).catch(() => {}); }, 300);
    }}}, label);
  view.replaceChildren(
    el("p", {}, el("a", {href: "#/"}, "‹ all sessions")),
    el("h2", {}, "session ", el("span", {id: "session-id"}, s.session_id)),
    el("div", {class: "kv"},
       el("span", {class: "k"}, "group"), el("span", {id: "session-group"}, s.agent_group),
       el("span", {class: "k"}, "chat"), el("span", {id: "session-chat"}, chat(s)),
       el("span", {class: "k"}, "status"),
       el("span", {id: "session-status", class: "status-" + stateOf(s)},
          s.container_status + (s.status_reason ? " — " + s.status_reason : "")),
       el("span", {class: "k"}, "messages"),
       el("span", {}, `pending ${s.pending}, processing ${s.processing}, failed ${s.failed}, ` +
          `completed ${s.completed}`)),
    el("div", {class: "actions"},
       act("stop agent", "danger", async () => {
         await api("/v1/sessions/" + sid(id) + "/stop", {method: "POST"});
         return "stopping the agent";
       }),
       act("retry failed replies", "", async () => {
         const r = await (await api("/v1/deliveries/retry", {method: "POST",
           body: {session_id: id}})).json();
         return "re-queued " + r.retried + " failed replies";
       })),
    out,
    el("h3", {}, "open questions"), cards.childNodes.length ? cards : el("p", {class: "muted"}, "none"),
    el("h3", {}, "conversation ", el("span", {class: "muted"}, "(newest last)")), conv,
    el("form", {class: "send", id: "send-form", on: {submit: async ev => {
      ev.preventDefault();
      const body = {agent_group: s.agent_group, channel: ro.channel_type || "api",
                    platform_id: ro.platform_id || "default", thread_id: ro.thread_id,
                    content: {text: text.value}};
      try {
        const r = await (await api("/v1/messages", {method: "POST", body: body})).json();
        say(out, "sent " + r.message_id + (r.session_id !== id ? " (to session " + r.session_id + ")" : ""));
        text.value = "";
        setTimeout(() => showSession(id).catch(() => {}), 300);
      } catch (e) { say(out, e.message, true); }
    }}}, text, el("button", {type: "submit", id: "send-button"}, "send")),
    el("h3", {}, "pending and failed messages"),
    table(["id", "direction", "status", "at", "content"],
          open.map(m => [m.id, m.direction, m.status, m.timestamp, contentText(m).slice(0, 200)])),
    el("h3", {}, "agent runs"),
    table(["started", "ended", "seconds", "exit reason"],
          tl.runs.slice().reverse().map(r => [r.started_at, r.ended_at, r.seconds, r.exit_reason])),
    el("h3", {}, "status timeline"),
    table(["at", "from", "to", "reason"],
          tl.changes.slice().reverse().map(c => [c.at, c.old, c.new, c.reason])),
    el("h3", {}, "series"), seriesTable(series, () => showSession(id)),
    el("h3", {}, "agent log ", el("span", {class: "muted"}, "(newest run, its last lines)")),
    logTail);
  loadLogTail(id, logTail).catch(e => logTail.replaceChildren(
    el("p", {class: "muted"}, "no log: " + e.message)));
  window.__consoleSession = {id: id, at: performance.now()};
}

async function loadLogTail(id, into) {
  // the agent's own output (GET /v1/sessions/{id}/logs): text, never markup; the
  // last 200 lines of the newest run, control characters shown as escapes
  const resp = await api("/v1/sessions/" + sid(id) + "/logs");
  const text = await resp.text();
  const lines = text.split("\n").slice(-200).map(l => l.replace(
    /[\u0000-\u0008\u000b-\u001f\u007f]/g,
    c => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0")));
  into.textContent = lines.join("\n") || "(empty)";
}

function amount(value, unit, digits) {
  return value == null ? "? " + unit : value.toFixed(digits) + " " + unit;
}

function usage(u) {
  // what the session's agent runs used (unknown values: "?"): the last run, then totals
  if (!u || !u.last_run) return null;
  const l = u.last_run;
  const mib = b => b == null ? null : b / 1048576;
  return amount(l.wall_seconds, "s", 1) + ", " + amount(l.cpu_seconds, "CPU-s", 2) + ", " +
    amount(mib(l.peak_memory_bytes), "MiB", 0) + " (" + l.exit_reason + ") · " +
    u.runs + (u.runs === 1 ? " run, " : " runs, ") + amount(u.cpu_seconds, "CPU-s", 2);
}

function seriesTable(series, after) {
  if (!series.length) return el("p", {class: "muted"}, "none");
  return table(["series", "every", "state", "next run", "done", "failed", ""], series.map(r => [
    r.series_id, r.recurrence + " (" + r.timezone + ")", r.state, r.next_run, r.completed,
    r.failed, r.state === "active" ? el("button", {type: "button", class: "danger cancel-series",
      "data-series": r.series_id, on: {click: async ev => {
        try {
          await api("/v1/series/" + sid(r.series_id) + "/cancel", {method: "POST"});
          after();
        } catch (e) { ev.target.textContent = e.message; }
      }}}, "cancel") : null]));
}

// --- groups -------------------------------------------------------------------------------

async function showGroups() {
  const view = document.getElementById("view-groups");
  const groups = await getJson("/v1/groups");
  view.replaceChildren(el("h2", {}, "groups"), ...groups.map(g => el("div", {
    class: "group", id: "group-" + g.group},
    el("h3", {}, g.group + " ", el("span", {class: "muted"},
       (g.configured ? "configured" : "defaults") + " · " + g.sessions + " sessions · digest " +
       g.settings.digest)),
    el("pre", {class: "settings"}, JSON.stringify(g.settings, null, 2)),
    el("h3", {}, "destinations"),
    table(["name", "type", "chat / agent", "source"], g.destinations.map(d => [
      d.name, d.type, d.type === "agent" ? d.target_agent_group_id
        : (d.channel_type || "-") + ":" + (d.platform_id || "-"), d.source])),
    el("h3", {}, "series"), seriesTable(g.series, showGroups))));
}

// --- routing between views ----------------------------------------------------------------

function route() {
  const h = location.hash;
  const m = h.match(/^#\/session\/(.+)$/);
  const view = m ? "session" : (h === "#/groups" ? "groups" : "fleet");
  state.view = view;
  state.sessionId = m ? decodeURIComponent(m[1]) : null;
  for (const v of ["fleet", "session", "groups"]) {
    document.getElementById("view-" + v).hidden = v !== view;
  }
  const fail = e => setConn("error: " + e.message, "down");
  // the list first (what an operator looks for), then the tiles and plots
  if (view === "fleet") loadSessions().catch(fail).then(() => loadFleet().catch(fail));
  else if (view === "session") showSession(state.sessionId).catch(fail);
  else showGroups().catch(fail);
}

// Live: any event re-reads what is shown, at most once a second.
function onEvent(ev) {
  const d = ev.data;
  if (state.view === "fleet" && d.session_id && ev.event === "status") {
    const tr = state.rows.get(d.session_id);
    if (tr) {
      const td = tr.querySelector("td.status");
      td.textContent = d.status;
      td.className = "status status-" + d.status;
    }
    refreshRow(d.session_id).catch(() => {});
  }
  if (d.session_id) state.touched.add(d.session_id);
  if (state.refreshTimer) return;  // one re-read a second, of all that came meanwhile
  state.refreshTimer = setTimeout(() => {
    const touched = state.touched;
    state.refreshTimer = null;
    state.touched = new Set();
    // the list too: a new session, or one that now matches the filter, shows up
    if (state.view === "fleet") loadSessions().then(loadFleet).catch(() => {});
    else if (state.view === "session" && touched.has(state.sessionId)) {
      showSession(state.sessionId).catch(() => {});
    }
  }, 1000);
}

async function stream() {
  const headers = state.lastId === null ? {} : {"Last-Event-ID": String(state.lastId)};
  const resp = await api("/v1/events", {headers: headers});
  state.streams += 1;
  setConn("live", "live");
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const ev = {event: "message", data: "", id: null};
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "data") ev.data += val;
        else if (field === "event") ev.event = val;
        else if (field === "id") ev.id = val;
      }
      if (ev.id !== null) state.lastId = Number(ev.id);
      if (!ev.data) continue;
      // a new stream after a drop: what was missed is re-read (the first one: shown)
      if (ev.event === "gap" || (ev.event === "hello" && state.streams > 1)) { route(); continue; }
      try { ev.data = JSON.parse(ev.data); } catch (e) { continue; }
      onEvent(ev);
    }
  }
}

async function live() {
  for (;;) {
    try {
      await stream();
      setConn("reconnecting…", "down");
    } catch (e) {
      setConn("disconnected (" + e.message + "); retrying", "down");
    }
    await new Promise(res => setTimeout(res, 1000));
  }
}

function main() {
  token();
  let typing = null;
  const reload = () => { state.cursors = [""]; loadSessions().catch(e => setConn(e.message, "down")); };
  document.getElementById("q").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(reload, 250);
  });
  for (const id of ["status-filter", "sort", "order"]) {
    document.getElementById(id).addEventListener("change", reload);
  }
  document.getElementById("filters").addEventListener("submit", ev => { ev.preventDefault(); reload(); });
  document.getElementById("prev").addEventListener("click", () => {
    if (state.cursors.length > 1) state.cursors.pop();
    loadSessions().catch(() => {});
  });
  document.getElementById("next").addEventListener("click", () => {
    if (!state.next) return;
    state.cursors.push(state.next);
    loadSessions().catch(() => {});
  });
  window.addEventListener("hashchange", route);
  state.fleetTimer = setInterval(() => {
    if (state.view === "fleet" && !document.hidden) loadFleet().catch(() => {});
  }, 10000);
  route();
  live();
}
window.addEventListener("load", main);  // after load: the token prompt never blocks it
