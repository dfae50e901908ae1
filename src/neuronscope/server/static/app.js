// neuronscope Monitor page: plain JS over the JSON API (/api/...). No build step.
// State that survives: the session id and the selected views live in localStorage (shared by tabs of this origin);
// the conversation and steerings live on the server, which also finishes an answer when the page goes away.
"use strict";
const $ = (q) => document.querySelector(q);
const STORE = "neuronscope.monitor";
const S = { sid: null, info: null, state: null, tokens: [], version: -1, sel: null, tab: "activations", busy: false,
  act: { page: 0, pageSize: 50, sort: "activation", order: "desc", filter: "", polarity: "", interp: true, content: true, rows: [], sums: [] },
  attr: { pos: null, page: 0, pageSize: 50, scores: [] }, cl: { sort: "activation", list: [] } };

function esc(s) { return String(s ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c])); }
function fmt(x, d = 3) { return x == null ? "–" : Math.abs(x) >= 1000 || (x !== 0 && Math.abs(x) < 1e-3) ? x.toExponential(2) : x.toFixed(d); }
function status(t) { $("#status").textContent = t || ""; }
const pct = (p) => `${(p * 100).toFixed(1)}%`;

// ---------------------------------------------------------------- persistence
function saveView() {
  const v = { sid: S.sid, tab: S.tab, sel: S.sel, attrPos: S.attr.pos, clSort: S.cl.sort,
    act: { sort: S.act.sort, order: S.act.order, filter: S.act.filter, polarity: S.act.polarity, interp: S.act.interp, content: S.act.content } };
  try { localStorage.setItem(STORE, JSON.stringify(v)); } catch (e) { /* private mode: nothing kept */ }
}
function loadView() { try { return JSON.parse(localStorage.getItem(STORE) || "null"); } catch (e) { return null; } }

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) {
    if (r.status === 404 && path.includes("/api/sessions/") && data.error && data.error.startsWith("No session")) {
      await newSession(); throw new Error("The session expired; a new one was started.");
    }
    throw new Error(data.error || `HTTP ${r.status}`);
  }
  return data;
}
const sp = (p) => `/api/sessions/${S.sid}${p}`;

async function newSession() {
  const st = await api("POST", "/api/sessions");
  await useState(st, true);
}

async function useState(st, fresh) {
  S.sid = st.session_id; S.state = st;
  if (fresh) { S.sel = null; S.attr.pos = null; }
  saveView(); renderSteerings(st.steerings); await refresh();
  if (st.generating) await followGeneration();
}

async function init() {
  S.info = await api("GET", "/api/info");
  const m = S.info.model;
  $("#model-info").textContent = `${m.name} · ${m.family} · ${m.n_layers} layers × ${m.n_neurons} neurons · ${S.info.chat_mode}`;
  const notes = S.info.notes;
  if (notes.length) { $("#notes").hidden = false; $("#notes").innerHTML = notes.map((n) => `<p>⚠ ${esc(n)}</p>`).join(""); }
  $("#max-tokens").max = S.info.limits.max_new_tokens;
  if (!S.info.capabilities.descriptions) { S.act.interp = false; $("#act-interp").disabled = true; }
  const v = loadView();
  if (v) {
    S.tab = v.tab || "activations"; S.sel = v.sel || null; S.attr.pos = v.attrPos ?? null; S.cl.sort = v.clSort || "activation";
    Object.assign(S.act, v.act || {});
    if (!S.info.capabilities.descriptions) S.act.interp = false;
  }
  $("#act-filter").value = S.act.filter; $("#act-polarity").value = S.act.polarity; $("#act-interp").checked = S.act.interp;
  $("#act-content").checked = S.act.content; $("#cl-sort").value = S.cl.sort;
  updateCounter();
  if (v && v.sid) {
    const r = await fetch(`/api/sessions/${v.sid}`);
    if (r.ok) { S.sid = v.sid; await useState(await r.json(), false); switchTab(S.tab); return; }
  }
  await newSession();
}

// ---------------------------------------------------------------- conversation
async function refresh() {
  const [t, st] = await Promise.all([api("GET", sp("/tokens")), api("GET", sp(""))]);
  S.tokens = t.tokens; S.version = t.version; S.state = st;
  // a clicked token or a selection beyond the conversation (e.g. while an answer is regenerated) is kept but unused
  renderConversation(); renderSteerings(st.steerings);
  const jobs = [loadClusters()];
  if (S.tab === "activations") jobs.push(loadActivations());
  else if (S.tab === "attribution" && attrPos() != null) jobs.push(loadAttribution());
  else tint();
  await Promise.all(jobs.map((j) => j.catch((e) => status(e.message))));
}

function steerLabel(s) {
  const what = s.label || (s.concept ? `"${s.concept}"` : `${s.n_neurons} neurons`);
  return `${s.mode}${s.strength != null ? ` ×${s.strength}` : ""} ${what}`;
}
function steeredBy(list) { return list && list.length ? list.map(steerLabel).join(" + ") : "no steering"; }

function renderConversation() {
  const box = $("#conversation"); box.innerHTML = "";
  let cur = null, curKey = null, body = null;
  for (const tk of S.tokens) {
    const key = tk.role === "separator" ? "sep" : `${tk.message}:${tk.role === "template" ? "t" : "m"}`;
    if (key !== curKey || tk.role === "separator" && cur?.dataset.kind !== "sep") {
      const m = tk.message >= 0 ? S.state.messages[tk.message] : null;
      cur = document.createElement("div"); curKey = key;
      if (tk.role === "separator") { cur.className = "msg separator"; cur.dataset.kind = "sep"; cur.title = "turn separator (plain continuation)"; body = cur; }
      else if (tk.role === "template") { cur.className = "msg template"; cur.innerHTML = '<span class="who">template</span>'; body = cur; }
      else {
        cur.className = `msg ${tk.role}`; cur.dataset.message = tk.message;
        const cmp = m && m.previous && m.previous.length;
        cur.innerHTML = `<span class="who">${tk.role}${cmp ? " · now" : ""}${m && (m.steered_by.length || cmp) ? ` · <span class="steered-by">${esc(steeredBy(m.steered_by))}</span>` : ""}</span>`;
        body = document.createElement("div"); body.className = "body"; cur.appendChild(body);
        if (m && m.previous && m.previous.length) {
          cur.classList.add("compare");
          const prev = m.previous[0];
          const old = document.createElement("div"); old.className = "previous";
          old.innerHTML = `<span class="who">before · ${esc(steeredBy(prev.steered_by))}</span><div class="text">${esc(prev.content)}</div>` +
            (m.previous.length > 1 ? `<details><summary>${m.previous.length - 1} earlier</summary>${m.previous.slice(1).map((p) =>
              `<p><small>${esc(steeredBy(p.steered_by))}</small><br>${esc(p.content)}</p>`).join("")}</details>` : "");
          cur.appendChild(old);
        }
      }
      box.appendChild(cur);
    }
    const s = document.createElement("span");
    s.className = "tok" + (tk.steered ? " steered" : "") + (/^<\|.*\|>$|^<\/?s>$/.test(tk.text) ? " special" : "");
    s.dataset.pos = tk.position; s.textContent = tk.text;
    body.appendChild(s);
  }
  if (!S.tokens.length) box.innerHTML = '<p class="hint">Start the conversation below.</p>';
  markSelection();
  box.scrollTop = box.scrollHeight;
}

function tokEl(p) { return document.querySelector(`#conversation .tok[data-pos="${p}"]`); }

function tint() {
  const vals = S.tab === "attribution" ? S.attr.scores : S.act.sums;
  const max = Math.max(1e-9, ...(vals || []).map(Math.abs));
  document.querySelectorAll("#conversation .tok").forEach((el) => {
    const v = (vals || [])[+el.dataset.pos] || 0;
    const a = Math.min(1, Math.abs(v) / max) * 0.65;
    el.style.background = v === 0 ? "" : (v > 0 ? `rgba(58,109,240,${a})` : `rgba(220,60,50,${a})`);
  });
  document.querySelectorAll("#conversation .tok.target").forEach((el) => el.classList.remove("target"));
  if (attrPos() != null) tokEl(S.attr.pos)?.classList.add("target");
}

function markSelection() {
  document.querySelectorAll("#conversation .tok.sel").forEach((el) => el.classList.remove("sel"));
  if (!selRange()) { $("#selection-bar").hidden = true; return; }
  for (let p = S.sel[0]; p < S.sel[1]; p++) tokEl(p)?.classList.add("sel");
  $("#selection-bar").hidden = false; $("#sel-range").textContent = `[${S.sel[0]}, ${S.sel[1]})`;
}

// hover: probability + top-5 at this position; click: attribution; drag: range selection
let drag = null;
$("#conversation").addEventListener("mousedown", (e) => {
  const el = e.target.closest(".tok"); if (!el || el.closest(".pending")) return;
  drag = { a: +el.dataset.pos, b: +el.dataset.pos, moved: false }; e.preventDefault();
});
$("#conversation").addEventListener("mouseover", (e) => {
  const el = e.target.closest(".tok"); if (!el) return;
  showTooltip(el);
  if (drag && +el.dataset.pos !== drag.b) { drag.b = +el.dataset.pos; drag.moved = true;
    S.sel = [Math.min(drag.a, drag.b), Math.max(drag.a, drag.b) + 1]; markSelection(); }
});
$("#conversation").addEventListener("mouseout", (e) => { if (e.target.closest(".tok")) $("#tooltip").hidden = true; });
document.addEventListener("mouseup", async () => {
  if (!drag) return;
  const d = drag; drag = null;
  try {
    if (d.moved) { S.act.page = 0; saveView(); switchTab("activations"); loadClusters().catch((e) => status(e.message)); }
    else { S.attr.pos = d.a; S.attr.page = 0; saveView(); switchTab("attribution"); if (S.cl.sort === "attribution") loadClusters().catch((e) => status(e.message)); }
  } catch (err) { status(err.message); }
});
$("#clear-selection").onclick = () => { S.sel = null; markSelection(); S.act.page = 0; saveView(); loadActivations().catch((e) => status(e.message)); loadClusters().catch((e) => status(e.message)); };

function showTooltip(el) {
  const tk = S.tokens[+el.dataset.pos]; if (!tk || el.closest(".pending")) return;
  const tip = $("#tooltip");
  const rows = tk.top5.map((a) => `<tr class="${a.id === tk.id ? "chosen" : ""}"><td><code>${esc(JSON.stringify(a.token))}</code></td><td>${pct(a.prob)}</td>
    <td><span class="bar" style="width:${Math.round(a.prob * 60)}px"></span></td></tr>`).join("");
  tip.innerHTML = `<div>token ${tk.position} <code>${esc(JSON.stringify(tk.text))}</code>` +
    (tk.prob != null ? ` · p=${pct(tk.prob)}` : "") + "</div>" +
    (tk.top5.length ? `<div>top-5 the model predicted here:</div><table>${rows}</table>` : "<div>(first token: nothing predicted it)</div>");
  tip.hidden = false;
  const r = el.getBoundingClientRect();
  tip.style.left = Math.min(window.innerWidth - 240, r.left) + "px"; tip.style.top = (r.bottom + 6) + "px";
}

// ---------------------------------------------------------------- chat + streaming
function genParams() {
  return { max_new_tokens: +$("#max-tokens").value || 48, temperature: +$("#temperature").value || 0, stream: true };
}
function setBusy(b) { S.busy = b; ["#send", "#regenerate", "#new-chat", "#steer-apply-regen", "#import"].forEach((q) => { $(q).disabled = b; }); }
function updateCounter() {
  const n = $("#message").value.length, lim = S.info ? S.info.limits.max_message_chars : 4000;
  const c = $("#char-count"); c.textContent = `${n} / ${lim}`; c.classList.toggle("over", n > lim);
}
$("#message").addEventListener("input", updateCounter);

function pendingBox(userText) {
  const box = $("#conversation");
  if (box.querySelector(".hint")) box.innerHTML = "";
  if (userText) { const u = document.createElement("div"); u.className = "msg user"; u.innerHTML = `<span class="who">user</span>${esc(userText)}`; box.appendChild(u); }
  const div = document.createElement("div"); div.className = "msg assistant pending";
  div.innerHTML = '<span class="who">assistant · generating…</span><div class="body"></div>'; box.appendChild(div);
  box.scrollTop = box.scrollHeight;
  return div.querySelector(".body");
}

async function streamInto(path, body, userText) {
  setBusy(true); status("generating…");
  let out = null, ok = false;
  try {
    const r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!r.ok) { const d = await r.json().catch(() => ({})); throw new Error(d.error || `HTTP ${r.status}`); }
    ok = true; if (userText) { $("#message").value = ""; updateCounter(); }  // the text is kept until the server took it
    out = pendingBox(userText);
    const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = "";
    for (;;) {
      const { value, done } = await reader.read(); if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
        if (!chunk.startsWith("data: ")) continue;
        const ev = JSON.parse(chunk.slice(6));
        if (ev.type === "token") { const s = document.createElement("span"); s.className = "tok"; s.textContent = ev.text; out.appendChild(s); $("#conversation").scrollTop = 1e9; }
        else if (ev.type === "error") throw new Error(ev.error);
        else if (ev.type === "done") status(`${ev.n_tokens} tokens (${ev.finish_reason})${ev.steered ? " · steered" : ""}`);
      }
    }
  } catch (err) { status(err.message); }
  try { if (ok) await refresh(); } catch (e) { status(e.message); } finally { setBusy(false); }  // idle once re-rendered
  return ok;
}

async function followGeneration() {  // after a reload mid-answer: show the partial answer until the server is done
  setBusy(true);
  const out = pendingBox(null);
  try {
    for (;;) {
      const st = await api("GET", sp(""));
      if (!st.generating) break;
      out.textContent = st.generating.text; status(`generating… (${st.generating.n_tokens} tokens)`);
      await new Promise((res) => setTimeout(res, 300));
    }
    status("");
    await refresh();
  } finally { setBusy(false); }
}

$("#chat-form").addEventListener("submit", (e) => {
  e.preventDefault(); if (S.busy) return;
  const text = $("#message").value; if (!text.trim()) { status("Type a message first."); return; }
  streamInto(sp("/chat"), { message: text, ...genParams() }, text);
});
$("#message").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); } });
$("#regenerate").onclick = () => regenerate();
async function regenerate() {
  if (S.busy) return;
  return streamInto(sp("/regenerate"), genParams());
}
$("#new-chat").onclick = async () => {
  try { const st = await api("POST", sp("/reset")); S.sel = null; S.attr.pos = null; saveView(); renderSteerings(st.steerings); await refresh(); status("new chat"); }
  catch (e) { status(e.message); }
};

// ---------------------------------------------------------------- export / import
$("#export").onclick = async () => {
  try {
    const d = await api("GET", sp("/export"));
    const blob = new Blob([JSON.stringify(d, null, 1)], { type: "application/json" });
    const a = document.createElement("a"); a.href = URL.createObjectURL(blob);
    a.download = `monitor-session-${d.model.name.replace(/[^\w.-]+/g, "_")}.json`; document.body.appendChild(a); a.click(); a.remove();
    status("exported");
  } catch (e) { status(e.message); }
};
$("#import").onchange = async (e) => {
  const f = e.target.files[0]; if (!f) return;
  try { const st = await api("POST", "/api/sessions/import", JSON.parse(await f.text())); await useState(st, true); status(`imported ${f.name}`); }
  catch (err) { status(`Import failed: ${err.message}`); }
  e.target.value = "";
};

// ---------------------------------------------------------------- tabs
function switchTab(name) {
  S.tab = name; saveView();
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".panel").forEach((p) => { p.hidden = p.id !== `panel-${name}`; });
  if (name === "activations") return loadActivations().catch((e) => status(e.message));
  if (name === "attribution") return loadAttribution().catch((e) => status(e.message));
  tint();
}
document.querySelectorAll("#tabs button").forEach((b) => { b.onclick = () => switchTab(b.dataset.tab); });
const nid = (l, n) => `<span class="nid" data-l="${l}" data-n="${n}">L${l}/N${n}</span>`;
const shown = (t) => esc(t).replace(/\n/g, "⏎").replace(/\t/g, "⇥");  // one line per token chip
const toks = (list) => `<span class="toks">${(list || []).map((t) => `<code>${shown(t)}</code>`).join("")}</span>`;
document.addEventListener("click", (e) => { const el = e.target.closest(".nid"); if (el) openNeuron(+el.dataset.l, +el.dataset.n); });

// ---------------------------------------------------------------- activations
const attrPos = () => (S.attr.pos != null && S.attr.pos < S.tokens.length ? S.attr.pos : null);
const selRange = () => (S.sel && S.sel[1] <= S.tokens.length ? S.sel : null);
function viewQuery() {
  const q = new URLSearchParams({ content_only: S.act.content, interpretable: S.act.interp });
  const sel = selRange();
  if (sel) { q.set("start", sel[0]); q.set("end", sel[1]); }
  return q;
}
async function loadActivations() {
  if (!S.tokens.length) { $("#act-table tbody").innerHTML = ""; S.act.sums = []; $("#act-summary").textContent = ""; tint(); return; }
  const q = viewQuery();
  for (const [k, v] of Object.entries({ sort: S.act.sort, order: S.act.order, page: S.act.page, page_size: S.act.pageSize, filter: S.act.filter })) q.set(k, v);
  if (S.act.polarity) q.set("polarity", S.act.polarity);
  const d = await api("GET", sp(`/activations?${q}`));
  S.act.rows = d.rows; S.act.sums = d.token_sums;
  $("#act-note").textContent = d.mode === "raw" || (S.act.interp && d.notes[0]?.startsWith("No descriptions")) ? d.notes[0]
    : d.normalised_by ? `· normalised: ${d.normalised_by}` : "";
  $("#act-summary").textContent = `${d.total} neurons${S.act.filter ? ` matching “${S.act.filter}”` : ""} firing in tokens [${d.start}, ${d.end})` +
    `${S.act.interp ? " · interpretable only" : ""}${S.act.content ? " · message tokens only" : ""}`;
  const pages = Math.max(1, Math.ceil(d.total / d.page_size));
  $("#act-page").textContent = `page ${d.page + 1} / ${pages}`;
  $("#act-prev").disabled = d.page === 0; $("#act-next").disabled = d.page + 1 >= pages;
  $("#act-table tbody").innerHTML = d.rows.map((r, i) => `<tr data-i="${i}"><td>${nid(r.layer, r.neuron)}</td>
    <td class="${r.polarity}">${fmt(r.activation, 2)}</td><td class="${r.polarity}">${r.polarity === "pos" ? "+" : "−"}</td>
    <td>${r.count}</td><td class="desc" title="${esc(r.description || "")}">${esc(r.description || "")}</td>
    <td class="desc" title="${esc((r.top_tokens || []).join(" "))}">${toks(r.top_tokens)}</td></tr>`).join("");
  tint();
}
$("#act-table tbody").addEventListener("mouseover", (e) => {
  const tr = e.target.closest("tr"); if (!tr) return;
  document.querySelectorAll("#conversation .tok.lit").forEach((el) => el.classList.remove("lit"));
  for (const f of S.act.rows[+tr.dataset.i].fires) tokEl(f.position)?.classList.add("lit");
});
$("#act-table tbody").addEventListener("mouseleave", () => document.querySelectorAll("#conversation .tok.lit").forEach((el) => el.classList.remove("lit")));
document.querySelectorAll("#act-table th[data-sort]").forEach((th) => { th.onclick = () => {
  const k = th.dataset.sort; S.act.order = S.act.sort === k && S.act.order === "desc" ? "asc" : "desc"; S.act.sort = k; S.act.page = 0;
  saveView(); loadActivations().catch((e) => status(e.message)); }; });
let filterTimer = null;
$("#act-filter").addEventListener("input", () => { clearTimeout(filterTimer); filterTimer = setTimeout(() => { S.act.filter = $("#act-filter").value; S.act.page = 0; saveView(); loadActivations().catch((e) => status(e.message)); }, 200); });
const reloadViews = () => { S.act.page = 0; saveView(); loadActivations().catch((e) => status(e.message)); loadClusters().catch((e) => status(e.message)); };
$("#act-polarity").onchange = () => { S.act.polarity = $("#act-polarity").value; reloadViews(); };
$("#act-interp").onchange = () => { S.act.interp = $("#act-interp").checked; reloadViews(); };
$("#act-content").onchange = () => { S.act.content = $("#act-content").checked; reloadViews(); };
$("#act-prev").onclick = () => { S.act.page--; loadActivations().catch((e) => status(e.message)); };
$("#act-next").onclick = () => { S.act.page++; loadActivations().catch((e) => status(e.message)); };

// ---------------------------------------------------------------- active concepts (clusters)
async function loadClusters() {
  if (!S.tokens.length) { $("#clusters").innerHTML = ""; $("#cl-note").textContent = "Concepts appear once there is a conversation."; return; }
  const q = viewQuery();
  let sort = S.cl.sort;
  if (sort === "attribution" && attrPos() == null) { sort = "activation"; $("#cl-note").textContent = "Click a token to rank concepts by attribution to it."; }
  q.set("sort", sort);
  if (sort === "attribution") q.set("position", attrPos());
  const d = await api("GET", sp(`/clusters?${q}`));
  const nForm = d.clusters.filter((c) => c.kind === "form" || c.kind === "unclear").length;
  S.cl.list = $("#cl-form").checked ? d.clusters : d.clusters.filter((c) => c.kind !== "form" && c.kind !== "unclear");
  if (sort === S.cl.sort) $("#cl-note").textContent = `${S.cl.list.length} concepts among ${d.n_neurons} firing neurons (${d.method})` +
    (nForm && !$("#cl-form").checked ? ` · ${nForm} syntax, format & unclear groups hidden` : "") +
    (sort === "attribution" ? ` · attribution to token ${d.position}` : "") + (d.notes[0]?.startsWith("No clusters") ? ` · ${d.notes[0]}` : "");
  const max = Math.max(1e-9, ...S.cl.list.map((c) => (sort === "attribution" ? c.attribution : c.activation) || 0));
  $("#clusters").innerHTML = S.cl.list.map((c, i) => {
    const v = (sort === "attribution" ? c.attribution : c.activation) || 0;
    return `<div class="cluster${c.kind === "form" || c.kind === "unclear" ? " form" : ""}" data-i="${i}" title="${esc(c.members.map((m) => `L${m[0]}/N${m[1]}${m[2] === "neg" ? "−" : "+"}`).join(" "))}">
      <div class="cl-head"><b class="cl-name">${esc(c.name)}</b> <small>${c.size} neurons</small>
        <span class="cl-actions"><button type="button" class="cl-steer" data-mode="strengthen" title="strengthen this concept">▲</button><button type="button" class="cl-steer" data-mode="suppress" title="suppress this concept">▼</button></span></div>
      <div class="cl-bar"><span style="width:${Math.round(100 * v / max)}%"></span></div>
      <small>Σ act ${fmt(c.activation, 1)}${c.attribution != null ? ` · attr ${fmt(c.attribution)}` : ""} · ${toks(c.tokens.slice(0, 4))}</small></div>`;
  }).join("") || '<p class="hint">No clusters of firing neurons here.</p>';
}
$("#cl-form").onchange = () => loadClusters().catch((e) => status(e.message));
$("#cl-sort").onchange = () => { S.cl.sort = $("#cl-sort").value; saveView(); loadClusters().catch((e) => status(e.message)); };
$("#clusters").addEventListener("click", (e) => {
  const b = e.target.closest(".cl-steer"); if (!b) return;
  const c = S.cl.list[+b.closest(".cluster").dataset.i];
  steerCluster(c, b.dataset.mode).catch((err) => status(err.message));
});
$("#clusters").addEventListener("mouseover", (e) => {
  const el = e.target.closest(".cluster"); if (!el) return;
  const c = S.cl.list[+el.dataset.i]; const keys = new Set(c.members.map((m) => `${m[0]}:${m[1]}:${m[2]}`));
  document.querySelectorAll("#conversation .tok.lit").forEach((t) => t.classList.remove("lit"));
  for (const r of S.act.rows) if (keys.has(`${r.layer}:${r.neuron}:${r.polarity}`)) for (const f of r.fires) tokEl(f.position)?.classList.add("lit");
});
async function steerCluster(c, mode) {
  // a cluster with a topic steers the topic's writers (the neurons that promote its words); else its members
  const members = c.members.map((m) => [m[0], m[1], m[2] === "neg" ? 1 : 0]);
  const body = { mode, label: c.name, generated: true, ranges: [] };
  if (mode === "strengthen") body.strength = +$("#cl-strength").value || 1;
  if ($("#cl-on-sel").checked && selRange()) body.ranges = [selRange()];
  let st;
  if (c.topic) {
    try { st = await api("POST", sp("/steerings"), { ...body, concept: c.topic }); }
    catch (err) { status(`no writers of "${c.topic}" (${err.message}); steering the cluster's members`); }
  }
  if (!st) st = await api("POST", sp("/steerings"), { ...body, neurons: members });
  status(`steering ${st.id}: ${steerLabel(st)}`);
  renderSteerings((await api("GET", sp(""))).steerings);
  if ($("#cl-regen").checked && S.state.messages.some((m) => m.role === "user")) await regenerate();
  else await refresh();
}

// ---------------------------------------------------------------- attribution
async function loadAttribution() {
  tint();
  if (attrPos() == null) { S.attr.scores = []; tint(); return; }
  if (S.attr.pos < 1) { $("#attr-head").textContent = "The first token has no prediction before it; click a later token."; $("#attr-table tbody").innerHTML = ""; return; }
  status("attributing…");
  const d = await api("GET", sp(`/attribution?position=${S.attr.pos}&page=${S.attr.page}&page_size=${S.attr.pageSize}`));
  status("");
  S.attr.scores = d.position_scores;
  $("#attr-head").innerHTML = `Neurons behind token ${d.target_position} <code>${esc(JSON.stringify(d.target_text))}</code>
    (p = ${(d.probability * 100).toFixed(2)}%): top ${d.total} by |activation × ∂p/∂activation|, all layers and positions.`;
  const pages = Math.max(1, Math.ceil(d.total / d.page_size));
  $("#attr-page").textContent = `page ${d.page + 1} / ${pages}`;
  $("#attr-prev").disabled = d.page === 0; $("#attr-next").disabled = d.page + 1 >= pages;
  $("#attr-table tbody").innerHTML = d.rows.map((r) => `<tr data-pos="${r.position}"><td>${nid(r.layer, r.neuron)}</td>
    <td class="desc">${r.position} <code>${esc(JSON.stringify(r.token))}</code></td>
    <td class="${r.polarity}" title="raw ${fmt(r.activation, 3)}">${r.normalised != null ? fmt(r.normalised, 2) : fmt(r.activation, 2)}</td>
    <td>${fmt(r.score)}</td><td class="desc" title="${esc(r.description || (r.top_tokens || []).join(" "))}">${r.description ? esc(r.description) : toks(r.top_tokens)}</td></tr>`).join("");
  tint();
}
$("#attr-table tbody").addEventListener("mouseover", (e) => {
  const tr = e.target.closest("tr"); if (!tr) return;
  document.querySelectorAll("#conversation .tok.lit").forEach((el) => el.classList.remove("lit"));
  tokEl(+tr.dataset.pos)?.classList.add("lit");
});
$("#attr-prev").onclick = () => { S.attr.page--; loadAttribution().catch((e) => status(e.message)); };
$("#attr-next").onclick = () => { S.attr.page++; loadAttribution().catch((e) => status(e.message)); };

// ---------------------------------------------------------------- neuron detail
async function openNeuron(l, n) {
  switchTab("neuron");
  const box = $("#neuron-body"); box.textContent = "loading…";
  try {
    const d = await api("GET", `/api/neurons/${l}/${n}?n_exemplars=8&marks=false`);  // at once, no model call
    renderNeuron(d, l, n);
    const full = await api("GET", `/api/neurons/${l}/${n}?n_exemplars=8`);             // then the marks
    if ($("#neuron-body").dataset.key === `${l}:${n}`) renderNeuron(full, l, n);
  } catch (e) { box.textContent = e.message; }
}
function renderNeuron(d, l, n) {
  const box = $("#neuron-body"); box.dataset.key = `${l}:${n}`;
  {
    const kinds = (all) => { const rows = ["pos", "neg"].flatMap((pol) => ((all || {})[pol] || []).map((c) =>
      `<tr><td>${pol === "pos" ? "+" : "−"} ${esc(c.source)}</td><td>${esc(c.text)}</td><td>${c.score != null ? "r " + fmt(c.score, 2) : ""}</td>
       <td>${c.detection != null ? "det " + fmt(c.detection, 2) : ""}</td><td>${c.output_score != null ? "out " + fmt(c.output_score, 2) + " (" + fmt(c.effect, 2) + " nats)" : ""}</td></tr>`));
      return rows.length ? `<h4>Every description, with its scores</h4><table class="grid">${rows.join("")}</table>` : ""; };
    const dec = Object.entries(d.decodes).map(([site, list]) => `<tr><td>${esc(site)}</td><td>${toks(list.map((x) => x.token))}</td></tr>`).join("");
    const ex = (pol) => (d.exemplars[pol] || []).map((e) => `<div class="exemplar">${e.tokens.map((t, i) => {
      const m = e.marks ? e.marks[i] : null; const cls = [i === e.position ? "peak" : "", m != null && Math.abs(m) > 1 ? "fire" : ""].join(" ");
      return `<span class="${cls}" title="${m != null ? fmt(m, 2) : ""}">${esc(t)}</span>`; }).join("")}
      <small> · ${fmt(e.normalised ?? e.activation, 2)}</small></div>`).join("") || '<p class="hint">no exemplars (needs corpus statistics)</p>';
    box.className = "";
    box.innerHTML = `<h3>L${d.layer}/N${d.neuron} <button type="button" id="steer-this">steer this neuron</button>
      <button type="button" id="outputs-this">what it makes the model say</button></h3><div id="outputs-box"></div>
      <p><b class="pos">+</b> ${esc(d.descriptions.pos || "no description")}<br><b class="neg">−</b> ${esc(d.descriptions.neg || "no description")}</p>
      ${kinds(d.description_kinds)}
      <h4>Decoded tokens (${esc(d.decodes_source)})</h4><table class="grid">${dec}</table>
      ${d.quantiles ? `<h4>Quantiles</h4><table class="grid">${Object.entries(d.quantiles).map(([lv, q]) =>
        `<tr><td>q(${esc(lv)})</td><td>${fmt(q)}</td><td class="panel-note">${esc((d.quantile_marks || {})[lv] || "")}</td></tr>`).join("")}</table>
        ${d.normalised_by ? `<p class="panel-note">normalised: ${esc(d.normalised_by)}</p>` : ""}` : ""}
      <h4>Top exemplars, positive</h4>${ex("pos")}<h4>Top exemplars, negative</h4>${ex("neg")}
      ${d.notes.length ? `<p class="panel-note">${d.notes.map(esc).join("<br>")}</p>` : ""}`;
    $("#outputs-this").onclick = async () => {
      $("#outputs-box").textContent = "measuring…";
      try {
        const o = await api("GET", `/api/neurons/${d.layer}/${d.neuron}/outputs`);
        const one = (pol, e) => e ? `<p><b class="${pol}">${pol === "pos" ? "+" : "−"}</b> makes the model say ${e.says.map((x) => esc(x.token) + " (" + fmt(x.delta, 2) + ")").join(", ") || "nothing specific"}; less ${e.less.map((x) => esc(x.token)).join(", ")}
          <small>· held-out score ${fmt(e.output_score, 2)}, effect ${fmt(e.effect, 2)} nats${e.held ? "" : " (did not hold)"}</small></p>` : `<p class="hint">${pol}: never fires with this sign</p>`;
        $("#outputs-box").innerHTML = one("pos", o.outputs.pos) + one("neg", o.outputs.neg);
      } catch (err) { $("#outputs-box").textContent = String(err.message || err); }
    };
    $("#steer-this").onclick = () => { $("#steer-neurons").value = `${l}:${n}`; $("#steer-concept").value = ""; switchTab("steering"); steerFields(); };
  }
}

// ---------------------------------------------------------------- concept search
$("#concept-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    const d = await api("GET", `/api/concepts?q=${encodeURIComponent($("#concept-q").value)}&k=50`);
    $("#concept-note").textContent = d.results.length ? `${d.results.length} neurons for "${d.query}" (reads: fires on its words or in text about it; writes: promotes its words)`
      : (d.notes[0] || `No neurons for "${d.query}".`);
    $("#concept-table tbody").innerHTML = d.results.map((r) => `<tr><td>${nid(r.layer, r.neuron)}</td><td class="${r.polarity}">${r.polarity === "pos" ? "+" : "−"}</td>
      <td>${fmt(r.score)}</td><td>${esc(r.source)}</td><td class="desc">${toks(r.tokens)}</td><td class="desc" title="${esc(r.description || "")}">${esc(r.description || "")}</td></tr>`).join("");
    $("#steer-concept").value = d.query;
  } catch (err) { $("#concept-note").textContent = err.message; }
});

// ---------------------------------------------------------------- steering (manual form + the list with toggles)
function steerFields() {
  const mode = $("#steer-mode").value, neurons = $("#steer-neurons").value.trim();
  document.querySelector(".only-strengthen").hidden = mode !== "strengthen";
  document.querySelector(".only-clamp").hidden = mode !== "clamp";
  document.querySelector(".only-concept").hidden = !!neurons;
}
["#steer-mode", "#steer-neurons"].forEach((q) => $(q).addEventListener("input", steerFields));
function steerBody() {
  const body = { mode: $("#steer-mode").value, generated: $("#steer-generated").checked, ranges: [] };
  const concept = $("#steer-concept").value.trim(), neurons = $("#steer-neurons").value.trim();
  if (neurons) body.neurons = neurons.split(/[\s,]+/).filter(Boolean).map((x) => x.split(/[:/]/).map((v) => parseInt(v.replace(/^[LN]/i, ""), 10)));
  else if (concept) body.concept = concept;
  if (body.mode === "strengthen") body.strength = +$("#steer-strength").value;
  if (body.mode === "clamp") body.value = +$("#steer-value").value;
  if (!neurons && $("#steer-n").value) body.n_neurons = +$("#steer-n").value;
  const rg = $("#steer-ranges").value.trim();
  if (rg) body.ranges = rg.split(/[\s,]+/).filter(Boolean).map((x) => x.split("-").map((v) => parseInt(v, 10)));
  return body;
}
async function addSteering() {
  const st = await api("POST", sp("/steerings"), steerBody());
  status(`steering ${st.id}: ${steerLabel(st)}`);
  await refresh();
}
$("#steer-form").addEventListener("submit", (e) => { e.preventDefault(); addSteering().catch((err) => status(err.message)); });
$("#steer-apply-regen").onclick = () => addSteering().then(regenerate).catch((err) => status(err.message));
$("#use-selection").onclick = () => { if (S.sel) $("#steer-ranges").value = `${S.sel[0]}-${S.sel[1]}`; };
function renderSteerings(list) {
  $("#steer-list").innerHTML = list.map((s) => `<span class="chip${s.enabled ? "" : " off"}" title="${esc(`${s.n_neurons} neurons · ${[...s.ranges.map((r) => `[${r[0]}, ${r[1]})`), s.generated ? "generated tokens" : ""].filter(Boolean).join(", ")}`)}">
    <label><input type="checkbox" class="steer-toggle" data-id="${esc(s.id)}" ${s.enabled ? "checked" : ""}> ${esc(steerLabel(s))}</label>
    <button type="button" data-id="${esc(s.id)}" class="steer-remove" title="remove">×</button></span>`).join("") || '<span class="hint">none: ▲/▼ on a concept, or Steer…</span>';
  document.querySelectorAll(".steer-remove").forEach((b) => { b.onclick = async () => {
    try { await api("DELETE", sp(`/steerings/${encodeURIComponent(b.dataset.id)}`)); await refresh(); } catch (e) { status(e.message); } }; });
  document.querySelectorAll(".steer-toggle").forEach((b) => { b.onchange = async () => {
    try { await api("PATCH", sp(`/steerings/${encodeURIComponent(b.dataset.id)}`), { enabled: b.checked }); await refresh(); status(`${b.dataset.id} ${b.checked ? "on" : "off"}: regenerate to see its effect`); } catch (e) { status(e.message); } }; });
}

steerFields();
init().catch((e) => status(e.message));
