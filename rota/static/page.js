// The System Services page: a live view of the coordinator's HTTP API (/api/v1).
//
// Polls the API about once a second and updates the table in place: one row per service,
// created once and changed cell by cell, so a catalogue of thousands stays responsive.
// Writes (edits, manual runs) send the operator token kept in this tab's sessionStorage.
"use strict";

(() => {
  const API = "/api/v1";
  const POLL_MS = 1000;
  const SLOW_POLL_MS = 5000;
  const CALL_TIMEOUT_MS = 15000;
  const TOKEN_KEY = "rota.operatorToken";
  const GROUPS = [
    ["daemon", "Daemon Services"],
    ["fixed", "Fixed Time Services"],
    ["periodic", "Periodical Services"],
    ["cron", "Cron Services"],
  ];
  const GROUP_TITLE = Object.fromEntries(GROUPS);
  const SCHEDULE_ICON = { fixed: "◷", periodic: "↻" }; // a cron schedule reads "cron …"
  const REQUEST_DONE = new Set(["succeeded", "failed", "refused"]);
  const RUN_DONE = new Set(["succeeded", "failed", "timed_out", "lost", "rejected",
    "expired", "skipped", "missed"]);
  const EDIT_FIELDS = ["enabled", "kind", "period", "align", "run_at", "cron"];

  const $ = (id) => document.getElementById(id);

  const state = {
    offset: null,       // server clock minus local clock, seconds
    rate: 1,            // server seconds per local second (a simulated clock may run faster)
    syncedAt: 0,        // local time (s) of the last sync
    serverAt: 0,        // server time (s) at the last sync
    timezone: null,     // the cluster's time zone, when the API gives it
    entries: new Map(), // service name -> row entry
    order: "",          // signature of the rows' order and groups
    groups: new Map(),  // kind -> {tbody, header, count}
    nodes: [],
    rankings: null,     // the last answer of /rankings
    roleNodes: new Map(), // role -> node ids holding it
    nodesAt: 0,
    leaderAt: 0,
    requests: new Map(), // service name -> {id, state, text, cls}
    view: "services",
    service: null,      // name shown in the service view
    changesAt: 0,
    busy: false,
    filterDirty: true,
  };

  // ---- time -----------------------------------------------------------------------------

  const localNow = () => Date.now() / 1000;

  let shownNow = 0;
  function serverNow() {
    if (state.offset === null) return localNow();
    const now = state.serverAt + (localNow() - state.syncedAt) * state.rate;
    // Network jitter must not make the clock tick backwards; a real jump back (another
    // leader's clock) is shown as it is.
    if (now < shownNow && shownNow - now < 2) return shownNow;
    shownNow = now;
    return now;
  }

  function sync(now) {
    if (typeof now !== "number") return;
    const local = localNow();
    if (state.offset !== null && local - state.syncedAt > 0.5) {
      const rate = (now - state.serverAt) / (local - state.syncedAt);
      // A real clock gives about 1 (network jitter aside); only a simulated fast clock
      // moves the estimate.
      state.rate = rate > 1.5 ? rate : 1;
    }
    state.offset = now - local;
    state.serverAt = now;
    state.syncedAt = local;
  }

  const pad = (n) => String(n).padStart(2, "0");

  function ago(seconds) {
    let s = Math.max(0, Math.floor(seconds));
    const days = Math.floor(s / 86400);
    s -= days * 86400;
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const text = `${pad(h)}:${pad(m)}:${pad(s % 60)}`;
    return days ? `${days}d ${text}` : text;
  }

  let formatter = null;
  function fmtTime(epoch) {
    if (typeof epoch !== "number") return "—";
    if (!formatter) {
      const opts = { year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit",
        minute: "2-digit", second: "2-digit", hourCycle: "h23" };
      opts.timeZone = state.timezone || "UTC";
      try {
        formatter = new Intl.DateTimeFormat("en-GB", opts);
      } catch (e) {
        opts.timeZone = "UTC";
        formatter = new Intl.DateTimeFormat("en-GB", opts);
      }
    }
    const p = {};
    for (const part of formatter.formatToParts(new Date(epoch * 1000))) p[part.type] = part.value;
    return `${p.year}-${p.month}-${p.day} ${p.hour}:${p.minute}:${p.second}`;
  }

  function setTimezone(tz) {
    if (tz && tz !== state.timezone) {
      state.timezone = tz;
      formatter = null;
    }
  }

  function duration(seconds) {
    if (typeof seconds !== "number") return "—";
    if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
    return ago(seconds);
  }

  // ---- DOM helpers ----------------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === undefined || v === null) continue;
        if (k === "text") node.textContent = v;
        else if (k === "class") node.className = v;
        else if (k in node && typeof v !== "string") node[k] = v;
        else node.setAttribute(k, v);
      }
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  /** Sets text only when it changed: most cells stay the same from one poll to the next. */
  function setText(node, text) {
    if (node._text !== text) {
      node._text = text;
      node.textContent = text;
    }
  }

  function setAttr(node, name, value) {
    const key = "_" + name;
    if (node[key] !== value) {
      node[key] = value;
      if (value === null) node.removeAttribute(name);
      else node.setAttribute(name, value);
    }
  }

  function setHidden(node, hidden) {
    if (node.hidden !== hidden) node.hidden = hidden;
  }

  function banner(id, text, extra) {
    const node = $(id);
    if (!text) {
      node._message = null;
      setHidden(node, true);
      return;
    }
    if (node._message === text && !node.hidden) return; // the same news: keep its buttons
    node._message = text;
    node.replaceChildren(text);
    if (extra) node.append(" ", extra);
    setHidden(node, false);
  }

  // ---- API ------------------------------------------------------------------------------

  async function call(method, path, body, token) {
    const headers = { Accept: "application/json" };
    // Reads send the token too when there is one: a coordinator may protect reads.
    if (token === undefined) token = currentToken();
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    if (token) headers.Authorization = `Bearer ${token}`;
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), CALL_TIMEOUT_MS);
    init.signal = abort.signal;
    let res;
    try {
      res = await fetch(API + path, init);
    } catch (e) {
      clearTimeout(timer);
      const why = e.name === "AbortError" ? `no answer in ${CALL_TIMEOUT_MS / 1000} s` : e.message;
      return { ok: false, status: 0, body: { error: `cannot reach the coordinator (${why})` } };
    }
    clearTimeout(timer);
    let data = {};
    try {
      data = await res.json();
    } catch (e) {
      data = { error: `${res.status} ${res.statusText}` };
    }
    if (data === null || typeof data !== "object") data = {};
    return { ok: res.ok, status: res.status, body: data };
  }

  const enc = encodeURIComponent;

  function getToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (e) {
      return "";
    }
  }

  function setToken(token) {
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* storage disabled: the token lives until the page closes */ }
    state.memToken = token || "";
    renderTokenButton();
  }

  const currentToken = () => getToken() || state.memToken || "";

  function renderTokenButton() {
    setText($("token-button"), currentToken() ? "Operator token ✓" : "Operator token…");
  }

  /** A write with the operator token; asks for the token first when there is none. */
  async function write(method, path, body) {
    let token = currentToken();
    if (!token) {
      token = await askToken("Changes and manual runs need an operator token.");
      if (!token) return { ok: false, status: 0, cancelled: true, body: { error: "no operator token given: nothing was sent" } };
    }
    const reply = await call(method, path, body, token);
    if (reply.status === 401) {
      setToken("");
      const why = reply.body.error || "unauthorized";
      reply.body.error = `The operator token was refused (401: ${why}). Nothing was changed; ` +
        "the next change or run asks for the token again.";
      state.tokenRefused = reply.body.error;
      const again = el("button", { type: "button", class: "link", text: "Enter the token again" });
      again.addEventListener("click", () => askToken());
      banner("notice", reply.body.error, again);
      $("notice").classList.add("error");
    }
    return reply;
  }

  function errorText(reply) {
    const b = reply.body || {};
    let text = b.error || `${reply.status}`;
    if (b.leader && reply.status !== 401) text += ` (the leader is ${b.leader})`;
    return text;
  }

  // ---- token dialog ---------------------------------------------------------------------

  let tokenWaiter = null;

  function askToken(why) {
    const dlg = $("token");
    $("token-why").textContent = why || "Changes and manual runs need an operator token. It is kept in this browser tab only.";
    setText($("token-error"), state.tokenRefused ? "The last token was refused." : "");
    $("token-input").value = "";
    if (tokenWaiter) tokenWaiter(null);
    return new Promise((resolve) => {
      tokenWaiter = resolve;
      if (!dlg.open) dlg.showModal();
      $("token-input").focus();
    });
  }

  function closeToken(value) {
    const dlg = $("token");
    if (dlg.open) dlg.close();
    const w = tokenWaiter;
    tokenWaiter = null;
    if (w) w(value);
  }

  function initTokenDialog() {
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = $("token-input").value.trim();
      if (!value) {
        setText($("token-error"), "Enter a token.");
        return;
      }
      state.tokenRefused = null;
      setToken(value);
      banner("notice", null);
      $("notice").classList.remove("error");
      closeToken(value);
    });
    $("token-cancel").addEventListener("click", () => closeToken(null));
    $("token-forget").addEventListener("click", () => {
      setToken("");
      closeToken(null);
    });
    $("token").addEventListener("cancel", () => closeToken(null));
    $("token-button").addEventListener("click", () => askToken());
    renderTokenButton();
  }

  // ---- the services table ---------------------------------------------------------------

  function ensureGroups() {
    if (state.groups.size) return;
    const table = $("services");
    for (const [kind, title] of GROUPS) {
      const count = el("span", { class: "count" });
      const th = el("th", { colspan: "8", scope: "rowgroup", id: `group-${kind}` },
        el("span", { text: title }), " ", count);
      const header = el("tr", { class: "group" }, th);
      const tbody = el("tbody", { "data-kind": kind }, header);
      tbody.hidden = true;
      table.append(tbody);
      state.groups.set(kind, { tbody, header, count, total: 0, shown: 0 });
    }
  }

  // Only rows on screen get their moving columns updated each second; a row scrolled into
  // view is brought up to date at once.
  const onScreen = new Set();
  const observer = "IntersectionObserver" in window ? new IntersectionObserver((items) => {
    const now = serverNow();
    for (const item of items) {
      const entry = item.target._entry;
      if (!entry) continue;
      if (item.isIntersecting) {
        onScreen.add(entry);
        tickEntry(entry, now);
      } else {
        onScreen.delete(entry);
      }
    }
  }, { rootMargin: "200px 0px" }) : null;

  function makeEntry(row) {
    const name = row.name;
    const status = el("span", { class: "status", role: "img" });
    const nameButton = el("button", { type: "button", class: "name link", text: name,
      "aria-haspopup": "dialog", title: `Edit ${name}` });
    nameButton.addEventListener("click", () => openEdit(name));
    const running = el("span", { class: "running" });
    const runsLink = el("a", { href: `#service/${enc(name)}`, class: "runs-link",
      "aria-label": `Runs of ${name}`, title: `Runs of ${name}`, text: "runs" });
    const sched = el("td", { class: "c-sched" });
    const allowed = el("td");
    const groups = el("td");
    const last = el("td", { class: "c-time" });
    const queue = el("td", { class: "c-time" });
    const runCell = el("td", { class: "c-run" });
    const result = el("span", { class: "result", role: "status", "aria-live": "polite" });
    let runButton = null;
    if (row.kind !== "daemon") {
      runButton = el("button", { type: "button", class: "run", text: "▶ Run",
        "aria-label": `Run ${name} now` });
      runButton.addEventListener("click", () => runNow(name));
      runCell.append(runButton, " ", result);
    } else {
      runCell.append(el("span", { class: "muted", text: "—", title: "daemons cannot be run manually" }));
    }
    const tr = el("tr", { "data-name": name },
      el("td", { class: "c-status" }, status),
      el("th", { scope: "row", class: "c-name" }, nameButton, running, " ", runsLink),
      sched, allowed, groups, last, queue, runCell);
    const entry = { name, tr, status, nameButton, running, sched, allowed, groups, last, queue,
      result, runButton, kind: row.kind, row: null, haystack: "", hidden: false };
    tr._entry = entry;
    if (observer) observer.observe(tr);
    return entry;
  }

  function dropEntry(entry) {
    if (observer) observer.unobserve(entry.tr);
    onScreen.delete(entry);
    entry.tr.remove();
  }

  function updateEntry(entry, row) {
    entry.row = row;
    const on = row.enabled !== false;
    setText(entry.status, on ? "●" : "○");
    setAttr(entry.status, "aria-label", on ? "enabled" : "disabled");
    setAttr(entry.status, "title", on ? "enabled" : "disabled");
    setAttr(entry.tr, "class", on ? null : "disabled");
    setText(entry.running, row.running ? ` ▶ ${row.running}` : "");
    setAttr(entry.running, "title", row.running ? `${row.running} running now` : null);
    const icon = SCHEDULE_ICON[row.kind];
    const schedule = row.kind === "daemon" ? "—" : (row.schedule || "—");
    setText(entry.sched, icon && schedule !== "—" ? `${icon} ${schedule}` : schedule);
    setText(entry.allowed, (row.allowed_nodes || []).join(" ") || "—");
    setText(entry.groups, (row.run_groups || []).join(" ") || "—");
    if (entry.runButton) entry.runButton.disabled = !!entry.pending;
  }

  /** The moving columns: Last Run and In Queue count up with the clock. */
  function tickEntry(entry, now) {
    const row = entry.row;
    if (!row) return;
    if (typeof row.last_run === "number") {
      setText(entry.last, `${ago(now - row.last_run)} ago`);
    } else {
      setText(entry.last, "—");
    }
    if (typeof row.in_queue === "number") {
      setText(entry.queue, ago(now - row.in_queue));
    } else {
      setText(entry.queue, "—");
    }
    // Absolute times as tooltips, formatted only when they change.
    if (entry.lastFor !== row.last_run) {
      entry.lastFor = row.last_run;
      setAttr(entry.last, "title", typeof row.last_run === "number" ? fmtTime(row.last_run) : null);
    }
    if (entry.queueFor !== row.in_queue) {
      entry.queueFor = row.in_queue;
      setAttr(entry.queue, "title", typeof row.in_queue === "number"
        ? `waiting since ${fmtTime(row.in_queue)}` : null);
    }
  }

  function haystackOf(row) {
    const roles = row.allowed_nodes || [];
    const nodes = new Set();
    for (const role of roles) for (const n of state.roleNodes.get(role) || []) nodes.add(n);
    return [row.name, GROUP_TITLE[row.kind] || row.kind, row.kind, row.schedule || "",
      ...roles, ...(row.run_groups || []), ...nodes].join("\n").toLowerCase();
  }

  function renderServices(rows) {
    ensureGroups();
    const seen = new Set();
    let signature = "";
    for (const row of rows) {
      if (!row || typeof row.name !== "string") continue;
      seen.add(row.name);
      signature += `${row.kind}\u0000${row.name}\u0001`;
      let entry = state.entries.get(row.name);
      if (!entry || (entry.kind === "daemon") !== (row.kind === "daemon")) {
        if (entry) dropEntry(entry);
        entry = makeEntry(row);
        state.entries.set(row.name, entry);
      }
      const before = entry.row;
      updateEntry(entry, row);
      if (!before || before.kind !== row.kind || before.schedule !== row.schedule ||
          String(before.allowed_nodes) !== String(row.allowed_nodes) ||
          String(before.run_groups) !== String(row.run_groups)) {
        entry.haystack = haystackOf(row);
        state.filterDirty = true;
      }
      entry.kind = row.kind;
    }
    for (const [name, entry] of state.entries) {
      if (!seen.has(name)) {
        dropEntry(entry);
        state.entries.delete(name);
        state.filterDirty = true;
      }
    }
    if (signature !== state.order) {
      // Services came, went or changed group: place the rows in the API's order. Rows are
      // moved, not rebuilt.
      state.order = signature;
      for (const row of rows) {
        const entry = state.entries.get(row.name);
        const group = state.groups.get(row.kind) || state.groups.get("cron");
        if (entry) group.tbody.append(entry.tr);
      }
      state.filterDirty = true;
    }
    if (state.filterDirty) applyFilter();
    tickClock();
  }

  function applyFilter() {
    state.filterDirty = false;
    const terms = $("filter").value.toLowerCase().split(/\s+/).filter(Boolean);
    const kind = $("filter-group").value;
    for (const g of state.groups.values()) {
      g.total = 0;
      g.shown = 0;
    }
    let shown = 0;
    for (const entry of state.entries.values()) {
      const g = state.groups.get(entry.kind) || state.groups.get("cron");
      const match = (!kind || entry.kind === kind) &&
        terms.every((t) => entry.haystack.includes(t));
      if (entry.hidden === match) {
        entry.hidden = !match;
        entry.tr.hidden = !match;
      }
      g.total += 1;
      if (match) {
        g.shown += 1;
        shown += 1;
      }
    }
    for (const g of state.groups.values()) {
      setHidden(g.tbody, g.shown === 0);
      setText(g.count, g.shown === g.total ? `(${g.total})` : `(${g.shown} of ${g.total})`);
    }
    const total = state.entries.size;
    setText($("filter-count"), shown === total ? `${total} services` : `${shown} of ${total} services shown`);
  }

  function tickClock() {
    const now = serverNow();
    if (state.offset !== null) {
      setText($("clock"), `${fmtTime(now)} ${state.timezone || "UTC"}`);
      setAttr($("clock"), "datetime", new Date(now * 1000).toISOString());
    }
    if (state.view === "services") {
      const entries = observer ? onScreen : state.entries.values();
      for (const entry of entries) if (!entry.hidden) tickEntry(entry, now);
    } else if (state.view === "service") {
      tickServiceView(now);
    } else if (state.view === "nodes") {
      tickNodes(now);
    }
  }

  // ---- leader and standby ---------------------------------------------------------------

  function renderLeader(info) {
    if (!info) return;
    if (info.this) state.self = info.this;
    const parts = [];
    if (info.leader) parts.push(`Leader: ${info.leader}`);
    else if ("leader" in info) parts.push("No leader");
    if (typeof info.epoch === "number") parts.push(`epoch ${info.epoch}`);
    if (info.this && info.this !== info.leader) parts.push(`this: ${info.this}`);
    if (parts.length) setText($("leader"), parts.join(" · "));
    if (info.is_leader === false || (info.this && info.leader && info.this !== info.leader)) {
      showStandby(info.this, info.leader, info.leader_url);
    } else if (info.is_leader === true) {
      state.standby = false;
      banner("standby", null);
    }
  }

  function showStandby(self, leader, url) {
    state.standby = true;
    self = self || state.self;
    const who = self ? `This coordinator (${self}) is a standby.` : "This coordinator is a standby.";
    if (!leader) {
      banner("standby", `${who} No leader is elected at the moment.`);
      return;
    }
    const link = url ? el("a", { href: url, text: `Open the leader's page (${leader})` }) : null;
    banner("standby", `${who} The leader is ${leader}; changes and runs go through it.`, link);
  }

  // ---- polling --------------------------------------------------------------------------

  async function pollServices() {
    const reply = await call("GET", "/services");
    if (reply.status === 0) {
      banner("conn-error", `${reply.body.error}; retrying…`);
      $("services").classList.add("stale");
      return;
    }
    banner("conn-error", null);
    const b = reply.body;
    if (!reply.ok) {
      $("services").classList.add("stale");
      if (reply.status === 401) {
        const enter = el("button", { type: "button", class: "link", text: "Enter the operator token" });
        enter.addEventListener("click", () => askToken("This coordinator shows its tables to operators only."));
        banner("conn-error", `Reading needs an operator token (401: ${b.error || "unauthorized"}).`, enter);
      } else if (b.leader !== undefined || reply.status === 503 || reply.status === 409) {
        showStandby(b.this, b.leader, b.leader_url);
      } else {
        banner("conn-error", `The service table is unavailable: ${errorText(reply)}`);
      }
      return;
    }
    $("services").classList.remove("stale");
    if (!state.self || b.leader === state.self) {
      // The table comes from the leader: this coordinator leads (now).
      state.standby = false;
      banner("standby", null);
    }
    setTimezone(b.timezone);
    sync(b.now);
    renderLeader({ leader: b.leader, epoch: b.epoch, this: b.this, is_leader: b.is_leader,
      leader_url: b.leader_url });
    renderServices(Array.isArray(b.services) ? b.services : []);
  }

  async function pollLeader() {
    const reply = await call("GET", "/leader");
    if (reply.ok) {
      setTimezone(reply.body.timezone);
      // A standby has no table to take the time from: its clock comes from here.
      if (state.standby || state.offset === null) sync(reply.body.now);
      renderLeader(reply.body);
      tickClock();
    }
  }

  async function pollNodes() {
    const reply = await call("GET", "/nodes");
    if (!reply.ok) return;
    const nodes = Array.isArray(reply.body.nodes) ? reply.body.nodes : [];
    state.nodes = nodes;
    const roleNodes = new Map();
    for (const n of nodes) {
      for (const role of n.roles || []) {
        if (!roleNodes.has(role)) roleNodes.set(role, []);
        roleNodes.get(role).push(n.id);
      }
    }
    const before = JSON.stringify([...state.roleNodes]);
    state.roleNodes = roleNodes;
    if (JSON.stringify([...roleNodes]) !== before) {
      for (const entry of state.entries.values()) if (entry.row) entry.haystack = haystackOf(entry.row);
      state.filterDirty = true;
      if (state.view === "services") applyFilter();
    }
    if (state.view === "nodes") renderNodes();
  }

  async function pollRequests() {
    const pending = [...state.requests.entries()].filter(([, r]) => !r.done);
    await Promise.all(pending.map(async ([name, req]) => {
      const reply = await call("GET", `/requests/${enc(req.id)}`);
      if (!reply.ok) {
        if (reply.status === 404) showRequest(name, req, "pending", "queued");
        return;
      }
      describeRequest(name, req, reply.body);
    }));
  }

  async function poll() {
    if (state.busy) return;
    state.busy = true;
    try {
      const jobs = [pollServices(), pollRequests()];
      const t = localNow();
      if (state.standby || t - state.leaderAt > SLOW_POLL_MS / 1000) {
        state.leaderAt = t;
        jobs.push(pollLeader());
      }
      if (state.view === "nodes" || t - state.nodesAt > SLOW_POLL_MS / 1000) {
        state.nodesAt = t;
        jobs.push(pollNodes());
      }
      if (state.view === "service" && state.service) jobs.push(pollService(state.service));
      if (state.view === "rankings") jobs.push(pollRankings());
      await Promise.all(jobs);
    } finally {
      state.busy = false;
    }
  }

  // ---- manual runs ----------------------------------------------------------------------

  function showRequest(name, req, cls, text) {
    req.cls = cls;
    req.text = text;
    renderRequest(name);
  }

  function renderRequest(name) {
    const req = state.requests.get(name);
    const targets = [];
    const entry = state.entries.get(name);
    if (entry && entry.result) targets.push(entry.result);
    if (state.view === "service" && state.service === name) targets.push($("service-run-result"));
    for (const t of targets) {
      setText(t, req ? req.text : "");
      setAttr(t, "class", `result ${req ? req.cls : ""}`);
      setAttr(t, "title", req ? `request ${req.id}` : null);
    }
    const pending = !!(req && !req.done);
    if (entry) {
      entry.pending = pending;
      if (entry.runButton) entry.runButton.disabled = pending;
    }
    if (state.view === "service" && state.service === name) $("service-run").disabled = pending || isDaemon(name);
  }

  function describeRequest(name, req, body) {
    const runs = Array.isArray(body.runs) ? body.runs : [];
    const st = body.state || "pending";
    const nodes = runs.map((r) => r.node).filter(Boolean);
    const where = nodes.length === 1 ? ` on ${nodes[0]}` : nodes.length ? ` on ${nodes.length} nodes` : "";
    if (!REQUEST_DONE.has(st)) {
      const running = runs.some((r) => r.state === "running");
      showRequest(name, req, "pending", running ? `running${where}…` : "queued…");
      return;
    }
    req.done = true;
    if (st === "succeeded") {
      const took = runs.length === 1 && typeof runs[0].duration === "number" ? ` in ${duration(runs[0].duration)}` : "";
      showRequest(name, req, "ok", `✓ succeeded${where}${took}`);
    } else {
      const failed = runs.find((r) => r.state !== "succeeded") || {};
      const why = body.reason || failed.error || failed.reason || "";
      const what = st === "refused" ? "refused" : (failed.state || "failed").replace("_", " ");
      showRequest(name, req, "bad", `✗ ${what}${where}${why ? `: ${why}` : ""}`);
    }
  }

  const isDaemon = (name) => {
    const e = state.entries.get(name);
    return !!(e && e.row && e.row.kind === "daemon");
  };

  async function runNow(name) {
    const prev = state.requests.get(name);
    if (prev && !prev.done) return;
    const req = { id: null, done: false, cls: "pending", text: "sending…" };
    state.requests.set(name, req);
    renderRequest(name);
    const reply = await write("POST", `/services/${enc(name)}/run`, {});
    if (!reply.ok) {
      req.done = true;
      showRequest(name, req, "bad", `✗ ${errorText(reply)}`);
      return;
    }
    req.id = reply.body.request_id;
    req.runIds = reply.body.run_ids || [];
    showRequest(name, req, "pending", "queued…");
  }

  // ---- edit dialog ----------------------------------------------------------------------

  const edit = { name: null, def: null, kind: null };

  function runAtRow(value) {
    const index = $("run-at-list").children.length + 1;
    const input = el("input", { type: "text", class: "run-at", value: value || "",
      placeholder: "HH:MM", inputmode: "numeric", autocomplete: "off", size: "5",
      "aria-label": `Run at, time ${index}` });
    const remove = el("button", { type: "button", class: "link", text: "remove",
      "aria-label": `Remove time ${index}` });
    const li = el("li", null, input, " ", remove);
    remove.addEventListener("click", () => {
      li.remove();
      if (!$("run-at-list").children.length) $("run-at-list").append(runAtRow(""));
    });
    return li;
  }

  function clearEditErrors() {
    for (const f of EDIT_FIELDS) setText($(`err-${f}`), "");
    setText($("edit-error"), "");
    setText($("edit-status"), "");
    for (const node of document.querySelectorAll("#edit [aria-invalid]")) node.removeAttribute("aria-invalid");
  }

  function fillEdit(row) {
    const def = row.definition || {};
    edit.def = {
      kind: def.kind || row.kind,
      enabled: typeof def.enabled === "boolean" ? def.enabled : row.enabled !== false,
      period: def.period ?? null,
      align: def.align ?? 0,
      run_at: Array.isArray(def.run_at) ? def.run_at.slice() : [],
      cron: def.cron ?? "",
    };
    const d = edit.def;
    setText($("edit-heading"), `— ${row.name}`);
    $("edit-name").value = row.name;
    $("edit-enabled").value = d.enabled ? "true" : "false";
    $("edit-kind").value = d.kind === "daemon" ? "periodic" : d.kind;
    // A cron service keeps its expression; the others choose between the seed's two kinds.
    $("edit-kind").querySelector('option[value="cron"]').hidden = d.kind !== "cron";
    $("edit-period").value = d.period ?? "";
    $("edit-align").value = d.align ?? 0;
    const list = $("run-at-list");
    list.replaceChildren();
    for (const t of d.run_at.length ? d.run_at : [""]) list.append(runAtRow(t));
    $("edit-cron").value = d.cron || "";
    showKindRows();
  }

  function showKindRows() {
    const daemon = edit.def && edit.def.kind === "daemon";
    const kind = $("edit-kind").value;
    setHidden($("row-kind"), daemon);
    setHidden($("row-period"), daemon || kind !== "periodic");
    setHidden($("row-run-at"), daemon || kind !== "fixed");
    setHidden($("row-cron"), daemon || kind !== "cron");
  }

  function openEdit(name) {
    const entry = state.entries.get(name);
    if (!entry || !entry.row) return;
    edit.name = name;
    clearEditErrors();
    fillEdit(entry.row);
    const dlg = $("edit");
    if (!dlg.open) dlg.showModal();
    $("edit-enabled").focus();
  }

  /** An integer when the text is one; the text otherwise, for the API to name the field. */
  function number(text) {
    const t = text.trim();
    return /^-?\d+$/.test(t) ? Number(t) : t;
  }

  function editChanges() {
    const d = edit.def;
    const out = {};
    const enabled = $("edit-enabled").value === "true";
    if (enabled !== d.enabled) out.enabled = enabled;
    if (d.kind === "daemon") return out;
    const kind = $("edit-kind").value;
    if (kind === "periodic") {
      const period = number($("edit-period").value);
      const align = number($("edit-align").value || "0");
      if (kind !== d.kind || period !== d.period || align !== d.align) {
        out.period = period;
        out.align = align;
      }
    } else if (kind === "fixed") {
      const times = [...document.querySelectorAll("#run-at-list .run-at")]
        .map((i) => i.value.trim()).filter(Boolean);
      if (kind !== d.kind || times.join(",") !== d.run_at.join(",")) out.run_at = times;
    } else if (kind === "cron") {
      const cron = $("edit-cron").value.trim();
      if (kind !== d.kind || cron !== d.cron) out.cron = cron;
    }
    return out;
  }

  function fieldInput(field) {
    return { enabled: "edit-enabled", kind: "edit-kind", period: "edit-period",
      align: "edit-align", cron: "edit-cron" }[field];
  }

  async function applyEdit() {
    clearEditErrors();
    const changes = editChanges();
    if (!Object.keys(changes).length) {
      setText($("edit-status"), "Nothing to change.");
      return true;
    }
    const name = edit.name;
    if (edit.def.kind === "daemon" && changes.enabled === false &&
        !window.confirm(`Disabling ${name} stops it on every node it runs on. Disable it?`)) {
      setText($("edit-status"), "Not disabled.");
      return false;
    }
    setText($("edit-status"), "Applying…");
    const reply = await write("PATCH", `/services/${enc(name)}`, changes);
    setText($("edit-status"), "");
    if (reply.ok) {
      const row = reply.body.service;
      if (row && row.name === name) {
        const entry = state.entries.get(name);
        if (entry) {
          updateEntry(entry, row);
          entry.haystack = haystackOf(row);
          tickEntry(entry, serverNow());
        }
        fillEdit(row);
      }
      setText($("edit-status"), "Applied.");
      if (state.view === "service") state.changesAt = 0;
      return true;
    }
    if (reply.cancelled) {
      setText($("edit-error"), reply.body.error);
      return false;
    }
    const field = reply.body.field;
    const message = errorText(reply);
    const slotName = field === "schedule" ? "kind" : field;
    const slot = slotName && EDIT_FIELDS.includes(slotName) ? $(`err-${slotName}`) : null;
    if (slot && reply.status !== 401) {
      setText(slot, message);
      const input = fieldInput(slotName);
      if (input) {
        $(input).setAttribute("aria-invalid", "true");
        $(input).focus();
      }
    } else {
      setText($("edit-error"), message);
    }
    return false;
  }

  function initEditDialog() {
    $("edit-kind").addEventListener("change", showKindRows);
    $("run-at-add").addEventListener("click", () => {
      const li = runAtRow("");
      $("run-at-list").append(li);
      li.querySelector("input").focus();
    });
    $("edit-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      if (await applyEdit()) $("edit").close();
    });
    $("edit-apply").addEventListener("click", () => applyEdit());
    $("edit-cancel").addEventListener("click", () => $("edit").close());
  }

  // ---- service view ---------------------------------------------------------------------

  const sv = { name: null, row: null, runs: [], sig: "", changesSig: "", facts: null };

  function showServiceView(name) {
    if (sv.name !== name) {
      sv.name = name;
      sv.row = null;
      sv.runs = [];
      sv.sig = "";
      sv.changesSig = "";
      setText($("service-title"), name);
      $("service-facts").replaceChildren();
      $("service-runs").tBodies[0].replaceChildren();
      $("service-changes").tBodies[0].replaceChildren();
      state.changesAt = 0;
      const entry = state.entries.get(name);
      if (entry && entry.row) renderServiceFacts(entry.row);
    }
    renderRequest(name);
  }

  async function pollService(name) {
    const reply = await call("GET", `/services/${enc(name)}`);
    if (state.service !== name) return;
    if (!reply.ok) {
      setText($("service-title"), `${name}: ${errorText(reply)}`);
      return;
    }
    setText($("service-title"), name);
    if (reply.body.service) renderServiceFacts(reply.body.service);
    renderRuns(Array.isArray(reply.body.runs) ? reply.body.runs : []);
    const t = localNow();
    if (t - state.changesAt > 2) {
      state.changesAt = t;
      const ch = await call("GET", `/changes?service=${enc(name)}&limit=20`);
      if (ch.ok && state.service === name) renderChanges(Array.isArray(ch.body.changes) ? ch.body.changes : []);
    }
  }

  function renderServiceFacts(row) {
    sv.row = row;
    const dl = $("service-facts");
    if (!sv.facts) sv.facts = {};
    const facts = [
      ["Status", row.enabled === false ? "○ disabled" : "● enabled"],
      ["Group", GROUP_TITLE[row.kind] || row.kind],
      ["Schedule", row.kind === "daemon" ? "—" : row.schedule || "—"],
      ["Allowed Nodes", (row.allowed_nodes || []).join(" ") || "—"],
      ["Run Groups", (row.run_groups || []).join(" ") || "—"],
      ["Last Run", null],
      ["In Queue", null],
      ["Running now", String(row.running || 0)],
      ["Description", row.description || "—"],
    ];
    if (dl.children.length !== facts.length * 2) {
      dl.replaceChildren();
      sv.facts = {};
      for (const [k] of facts) {
        const dd = el("dd");
        sv.facts[k] = dd;
        dl.append(el("dt", { text: k }), dd);
      }
    }
    for (const [k, v] of facts) if (v !== null) setText(sv.facts[k], v);
    $("service-run").hidden = row.kind === "daemon";
    tickServiceView(serverNow());
  }

  function tickServiceView(now) {
    const row = sv.row;
    if (row && sv.facts) {
      setText(sv.facts["Last Run"], typeof row.last_run === "number"
        ? `${ago(now - row.last_run)} ago (${fmtTime(row.last_run)})` : "—");
      setText(sv.facts["In Queue"], typeof row.in_queue === "number"
        ? `${ago(now - row.in_queue)} (since ${fmtTime(row.in_queue)})` : "—");
    }
    for (const tr of $("service-runs").tBodies[0].rows) {
      if (tr._running) setText(tr._duration, `${duration(now - tr._running)} so far`);
    }
  }

  function runDuration(run) {
    if (typeof run.duration === "number") return run.duration;
    if (typeof run.started_at === "number" && typeof run.finished_at === "number") {
      return run.finished_at - run.started_at;
    }
    return null;
  }

  function renderRuns(runs) {
    const sig = runs.map((r) => `${r.run_id}|${r.state}|${r.finished_at}`).join("\n");
    setHidden($("service-runs-empty"), runs.length > 0);
    if (sig === sv.sig) return;
    sv.sig = sig;
    const rows = runs.map((r) => {
      const outcome = r.outcome || r.state || "—";
      const why = r.error || r.reason || "";
      const outcomeCell = el("td", { class: `outcome ${RUN_DONE.has(outcome) ? outcome : "active"}` },
        el("span", { text: outcome.replace("_", " ") }));
      if (why) outcomeCell.append(el("div", { class: "why", text: why }));
      const tail = r.output_tail ? el("pre", { class: "tail", text: r.output_tail }) : "—";
      const dur = el("td");
      const tr = el("tr", { "data-run": r.run_id, title: r.run_id },
        el("td", { text: r.node || "—" }),
        el("td", { text: r.trigger || "—" }),
        el("td", { text: typeof r.slot === "number" ? fmtTime(r.slot) : "—" }),
        el("td", { text: fmtTime(r.started_at) }),
        dur, outcomeCell, el("td", { class: "c-tail" }, tail),
        el("td", { text: r.requested_by || "—" }));
      tr._duration = dur;
      const d = runDuration(r);
      if (d === null && typeof r.started_at === "number" && !RUN_DONE.has(r.state)) {
        tr._running = r.started_at;
      } else {
        dur.textContent = duration(d);
      }
      return tr;
    });
    $("service-runs").tBodies[0].replaceChildren(...rows);
    tickServiceView(serverNow());
  }

  function show(value) {
    if (value === null || value === undefined) return "—";
    if (Array.isArray(value)) return value.join(", ");
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  function renderChanges(changes) {
    const sig = JSON.stringify(changes);
    setHidden($("service-changes-empty"), changes.length > 0);
    if (sig === sv.changesSig) return;
    sv.changesSig = sig;
    $("service-changes").tBodies[0].replaceChildren(...changes.map((c) => {
      const outcome = el("td", { class: `outcome ${c.outcome === "applied" ? "succeeded" : "failed"}`,
        text: c.outcome || "—" });
      if (c.reason) outcome.append(el("div", { class: "why", text: c.reason }));
      return el("tr", null,
        el("td", { text: fmtTime(c.at) }),
        el("td", { text: c.by || "—" }),
        el("td", { text: c.field || "—" }),
        el("td", { text: show(c.old) }),
        el("td", { text: show(c.new) }),
        outcome);
    }));
  }

  // ---- nodes view -----------------------------------------------------------------------

  let nodesSig = "";
  function renderNodes() {
    const nodes = state.nodes;
    setHidden($("nodes-empty"), nodes.length > 0);
    const sig = JSON.stringify(nodes);
    if (sig === nodesSig) return;
    nodesSig = sig;
    $("nodes").tBodies[0].replaceChildren(...nodes.map((n) => {
      const since = el("td");
      since._since = n.live_since;
      return el("tr", { "data-node": n.id },
        el("th", { scope: "row", text: n.id }),
        el("td", { text: (n.roles || []).join(" ") || "—" }),
        since,
        el("td", { text: String(n.runs_now ?? 0) }),
        el("td", { text: (n.daemons || []).join(", ") || "—" }),
        el("td", { class: n.out_of_placement ? "out" : "",
                   text: n.out_of_placement ? "out (ranking threshold)" : "in" }));
    }));
    tickNodes(serverNow());
  }

  function tickNodes(now) {
    for (const tr of $("nodes").tBodies[0].rows) {
      const cell = tr.cells[2];
      if (typeof cell._since === "number") {
        setText(cell, `${fmtTime(cell._since)} (${ago(now - cell._since)})`);
      } else {
        setText(cell, "—");
      }
    }
  }

  // ---- rankings view --------------------------------------------------------------------

  async function pollRankings() {
    const reply = await call("GET", "/rankings");
    if (!reply.ok) return;
    state.rankings = reply.body;
    if (state.view === "rankings") renderRankings();
  }

  function metricText(v) {
    if (v === undefined || v === null) return "—";
    if (v === -1) return "N/A";
    return Number.isInteger(v) ? String(v) : v.toFixed(3);
  }

  let rankingsSig = "";
  function renderRankings() {
    const body = state.rankings;
    if (!body) return;
    const sig = JSON.stringify(body);
    if (sig === rankingsSig) return;
    rankingsSig = sig;
    const list = Array.isArray(body.rankings) ? body.rankings : [];
    setHidden($("rankings-empty"), list.length > 0);
    const out = body.nodes_out || [];
    setHidden($("rankings-out"), out.length === 0);
    setText($("rankings-out"), out.length ? `Out of placement: ${out.join(", ")}` : "");
    $("rankings").replaceChildren(...list.map((r) => {
      const rk = r.ranking;
      const title = el("h3", { text: `${r.tenant}/${r.id}` });
      const when = el("p", { class: "note", text: rk
        ? `Last update ${fmtTime(Date.parse(rk.LastUpdate) / 1000)} · ${rk.Sorting} by ${rk.SortingParameters.join(", ")}`
          + (r.next ? ` · next ${fmtTime(r.next)}` : "")
        : "Not computed yet" + (r.next ? ` · first at ${fmtTime(r.next)}` : "") });
      if (!rk) return el("article", { class: "ranking", "data-ranking": r.id }, title, when);
      const names = [...new Set(Object.values(rk.Metrics).flatMap((m) => Object.keys(m)))].sort();
      const head = el("tr", {}, el("th", { scope: "col", text: "#" }),
        el("th", { scope: "col", text: "Stat" }),
        ...names.map((m) => el("th", { scope: "col", text: m })));
      const rows = rk.SortedStatIDs.map((stat, i) => el("tr", { "data-stat": stat },
        el("td", { text: String(i + 1) }),
        el("th", { scope: "row", text: stat }),
        ...names.map((m) => el("td", { text: metricText((rk.Metrics[stat] || {})[m]) }))));
      const table = el("table", { class: "runs" }, el("thead", {}, head), el("tbody", {}, ...rows));
      return el("article", { class: "ranking", "data-ranking": r.id }, title, when, table);
    }));
  }

  // ---- views ----------------------------------------------------------------------------

  function route() {
    const hash = location.hash.replace(/^#/, "");
    let view = "services";
    let name = null;
    if (hash === "nodes") view = "nodes";
    else if (hash === "rankings") view = "rankings";
    else if (hash.startsWith("service/")) {
      view = "service";
      try {
        name = decodeURIComponent(hash.slice("service/".length));
      } catch (e) {
        view = "services";
      }
    }
    state.view = view;
    state.service = name;
    setHidden($("view-services"), view !== "services");
    setHidden($("view-service"), view !== "service");
    setHidden($("view-nodes"), view !== "nodes");
    setHidden($("view-rankings"), view !== "rankings");
    setAttr($("nav-rankings"), "aria-current", view === "rankings" ? "page" : null);
    setAttr($("nav-services"), "aria-current", view === "services" ? "page" : null);
    setAttr($("nav-nodes"), "aria-current", view === "nodes" ? "page" : null);
    if (view === "service") showServiceView(name);
    if (view === "nodes") renderNodes();
    if (view === "rankings") renderRankings();
    if (view === "services") applyFilter();
    tickClock();
    poll();
  }

  function init() {
    initTokenDialog();
    initEditDialog();
    ensureGroups();
    $("filters").addEventListener("submit", (ev) => ev.preventDefault());
    $("filter").addEventListener("input", applyFilter);
    $("filter-group").addEventListener("change", applyFilter);
    $("service-edit").addEventListener("click", () => state.service && openEdit(state.service));
    $("service-run").addEventListener("click", () => state.service && runNow(state.service));
    window.addEventListener("hashchange", route);
    route();
    setInterval(poll, POLL_MS);
    setInterval(tickClock, 250);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
