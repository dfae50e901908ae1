// neuronscope Monitor page: plain JS over the JSON API (/api/...). No build step.
"use strict";
const $ = (q) => document.querySelector(q);
const S = { sid: null, info: null, tokens: [], version: -1, sel: null, tab: "activations", busy: false,
  act: { page: 0, pageSize: 50, sort: "activation", order: "desc", filter: "", polarity: "", rows: [], sums: [] },
  attr: { pos: null, page: 0, pageSize: 50, scores: [] } };

function esc(s) { return String(s ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c])); }
function fmt(x, d = 3) { return x == null ? "–" : Math.abs(x) >= 1000 || (x !== 0 && Math.abs(x) < 1e-3) ? x.toExponential(2) : x.toFixed(d); }
function status(t) { $("#status").textContent = t || ""; }

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
  S.sid = st.session_id; S.tokens = []; S.sel = null;
  renderSteerings(st.steerings); await refresh();
}

async function init() {
  S.info = await api("GET", "/api/info");
  const m = S.info.model;
  $("#model-info").textContent = `${m.name} · ${m.family} · ${m.n_layers} layers × ${m.n_neurons} neurons · ${S.info.chat_mode}`;
  const notes = S.info.notes;
  if (notes.length) { $("#notes").hidden = false; $("#notes").innerHTML = notes.map((n) => `<p>⚠ ${esc(n)}</p>`).join(""); }
  $("#max-tokens").max = S.info.limits.max_new_tokens;
  await newSession();
}

// ---------------------------------------------------------------- conversation
async function refresh() {
  const t = await api("GET", sp("/tokens"));
  S.tokens = t.tokens; S.version = t.version;
  renderConversation();
  if (S.tab === "activations") await loadActivations();
  else if (S.tab === "attribution" && S.attr.pos != null && S.attr.pos < S.tokens.length) await loadAttribution();
  else tint();
}

function renderConversation() {
  const box = $("#conversation"); box.innerHTML = "";
  let cur = null, curKey = null;
  for (const tk of S.tokens) {
    const key = `${tk.message}:${tk.role}`;
    if (key !== curKey) {
      cur = document.createElement("div"); cur.className = `msg ${tk.role}`;
      cur.innerHTML = `<span class="who">${tk.role === "template" ? "template" : tk.role}</span>`;
      box.appendChild(cur); curKey = key;
    }
    const s = document.createElement("span");
    s.className = "tok" + (tk.steered ? " steered" : "") + (/^<\|.*\|>$|^<\/?s>$/.test(tk.text) ? " special" : "");
    s.dataset.pos = tk.position; s.textContent = tk.text;
    cur.appendChild(s);
  }
  if (!S.tokens.length) box.innerHTML = '<p class="hint">Start the conversation below.</p>';
  markSelection();
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
}

function markSelection() {
  document.querySelectorAll("#conversation .tok.sel").forEach((el) => el.classList.remove("sel"));
  if (!S.sel) { $("#selection-bar").hidden = true; return; }
  for (let p = S.sel[0]; p < S.sel[1]; p++) tokEl(p)?.classList.add("sel");
  $("#selection-bar").hidden = false; $("#sel-range").textContent = `[${S.sel[0]}, ${S.sel[1]})`;
}

// hover: top-5; click: attribution; drag: range selection
let drag = null;
$("#conversation").addEventListener("mousedown", (e) => {
  const el = e.target.closest(".tok"); if (!el) return;
  drag = { a: +el.dataset.pos, b: +el.dataset.pos, moved: false }; e.preventDefault();
});
$("#conversation").addEventListener("mouseover", (e) => {
  const el = e.target.closest(".tok"); if (!el) return;
  showTooltip(el, e);
  if (drag && +el.dataset.pos !== drag.b) { drag.b = +el.dataset.pos; drag.moved = true;
    S.sel = [Math.min(drag.a, drag.b), Math.max(drag.a, drag.b) + 1]; markSelection(); }
});
$("#conversation").addEventListener("mouseout", (e) => { if (e.target.closest(".tok")) $("#tooltip").hidden = true; });
document.addEventListener("mouseup", async () => {
  if (!drag) return;
  const d = drag; drag = null;
  try {
    if (d.moved) { S.act.page = 0; switchTab("activations"); }
    else { S.attr.pos = d.a; S.attr.page = 0; switchTab("attribution"); }
  } catch (err) { status(err.message); }
});
$("#clear-selection").onclick = () => { S.sel = null; markSelection(); S.act.page = 0; loadActivations().catch((e) => status(e.message)); };

function showTooltip(el, e) {
  const tk = S.tokens[+el.dataset.pos]; if (!tk) return;
  const tip = $("#tooltip");
  const rows = tk.top5.map((a) => `<tr><td><code>${esc(JSON.stringify(a.token))}</code></td><td>${(a.prob * 100).toFixed(1)}%</td>
    <td><span class="bar" style="width:${Math.round(a.prob * 60)}px"></span></td></tr>`).join("");
  tip.innerHTML = `<div>token ${tk.position} <code>${esc(JSON.stringify(tk.text))}</code>` +
    (tk.prob != null ? ` · p=${(tk.prob * 100).toFixed(1)}%` : "") + `</div><div>top-5 next tokens:</div><table>${rows}</table>`;
  tip.hidden = false;
  const r = el.getBoundingClientRect();
  tip.style.left = Math.min(window.innerWidth - 240, r.left) + "px"; tip.style.top = (r.bottom + 6) + "px";
}

// ---------------------------------------------------------------- chat + streaming
function genParams() {
  return { max_new_tokens: +$("#max-tokens").value || 48, temperature: +$("#temperature").value || 0, stream: true };
}
function setBusy(b) { S.busy = b; ["#send", "#regenerate", "#new-chat", "#steer-apply-regen"].forEach((q) => { $(q).disabled = b; }); }

async function streamInto(path, body, userText) {
  setBusy(true); status("generating…");
  const box = $("#conversation");
  if (userText) { const u = document.createElement("div"); u.className = "msg user"; u.innerHTML = `<span class="who">user</span>${esc(userText)}`; box.appendChild(u); }
  const div = document.createElement("div"); div.className = "msg assistant pending";
  div.innerHTML = '<span class="who">assistant</span>'; box.appendChild(div);
  try {
    const r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!r.ok) { const d = await r.json().catch(() => ({})); throw new Error(d.error || `HTTP ${r.status}`); }
    const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = "";
    for (;;) {
      const { value, done } = await reader.read(); if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
        if (!chunk.startsWith("data: ")) continue;
        const ev = JSON.parse(chunk.slice(6));
        if (ev.type === "token") { const s = document.createElement("span"); s.className = "tok"; s.textContent = ev.text; div.appendChild(s); box.scrollTop = box.scrollHeight; }
        else if (ev.type === "error") throw new Error(ev.error);
        else if (ev.type === "done") status(`${ev.n_tokens} tokens (${ev.finish_reason})${ev.steered ? " · steered" : ""}`);
      }
    }
  } catch (err) { status(err.message); }
  finally { setBusy(false); }
  await refresh().catch((e) => status(e.message));
}

$("#chat-form").addEventListener("submit", (e) => {
  e.preventDefault(); if (S.busy) return;
  const text = $("#message").value; if (!text.trim()) { status("Type a message first."); return; }
  $("#message").value = "";
  streamInto(sp("/chat"), { message: text, ...genParams() }, text);
});
$("#message").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); } });
$("#regenerate").onclick = () => regenerate();
async function regenerate() {
  if (S.busy) return;
  // drop the last answer from view; the server does the same
  const msgs = [...document.querySelectorAll("#conversation .msg.assistant")]; msgs.at(-1)?.remove();
  await streamInto(sp("/regenerate"), genParams());
}
$("#new-chat").onclick = async () => {
  try { const st = await api("POST", sp("/reset")); renderSteerings(st.steerings); S.sel = null; S.attr.pos = null; await refresh(); status("new chat"); }
  catch (e) { status(e.message); }
};

// ---------------------------------------------------------------- tabs
function switchTab(name) {
  S.tab = name;
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".panel").forEach((p) => { p.hidden = p.id !== `panel-${name}`; });
  if (name === "activations") return loadActivations().catch((e) => status(e.message));
  if (name === "attribution") return loadAttribution().catch((e) => status(e.message));
  tint();
}
document.querySelectorAll("#tabs button").forEach((b) => { b.onclick = () => switchTab(b.dataset.tab); });

function nid(l, n, pol) { return `<span class="nid" data-l="${l}" data-n="${n}" title="open neuron">L${l}/N${n}</span>`; }
function toks(list) { return `<span class="toks">${(list || []).map((t) => `<code>${esc(t)}</code>`).join("")}</span>`; }
document.addEventListener("click", (e) => { const el = e.target.closest(".nid"); if (el) openNeuron(+el.dataset.l, +el.dataset.n); });

// ---------------------------------------------------------------- activations
async function loadActivations() {
  if (!S.tokens.length) { $("#act-table tbody").innerHTML = ""; S.act.sums = []; $("#act-summary").textContent = ""; tint(); return; }
  const q = new URLSearchParams({ sort: S.act.sort, order: S.act.order, page: S.act.page, page_size: S.act.pageSize, filter: S.act.filter });
  if (S.act.polarity) q.set("polarity", S.act.polarity);
  if (S.sel) { q.set("start", S.sel[0]); q.set("end", S.sel[1]); }
  const d = await api("GET", sp(`/activations?${q}`));
  S.act.rows = d.rows; S.act.sums = d.token_sums;
  $("#act-note").textContent = d.mode === "raw" ? d.notes[0] : "";
  $("#act-summary").textContent = `${d.total} neurons firing in tokens [${d.start}, ${d.end})`;
  const pages = Math.max(1, Math.ceil(d.total / d.page_size));
  $("#act-page").textContent = `page ${d.page + 1} / ${pages}`;
  $("#act-prev").disabled = d.page === 0; $("#act-next").disabled = d.page + 1 >= pages;
  $("#act-table tbody").innerHTML = d.rows.map((r, i) => `<tr data-i="${i}"><td>${nid(r.layer, r.neuron)}</td>
    <td class="${r.polarity}">${fmt(r.activation, 2)}</td><td class="${r.polarity}">${r.polarity === "pos" ? "+" : "−"}</td>
    <td>${r.count}</td><td>${esc(r.description || "")}</td><td>${toks(r.top_tokens)}</td></tr>`).join("");
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
  loadActivations().catch((e) => status(e.message)); }; });
let filterTimer = null;
$("#act-filter").addEventListener("input", () => { clearTimeout(filterTimer); filterTimer = setTimeout(() => { S.act.filter = $("#act-filter").value; S.act.page = 0; loadActivations().catch((e) => status(e.message)); }, 250); });
$("#act-polarity").onchange = () => { S.act.polarity = $("#act-polarity").value; S.act.page = 0; loadActivations().catch((e) => status(e.message)); };
$("#act-prev").onclick = () => { S.act.page--; loadActivations().catch((e) => status(e.message)); };
$("#act-next").onclick = () => { S.act.page++; loadActivations().catch((e) => status(e.message)); };

// ---------------------------------------------------------------- attribution
async function loadAttribution() {
  document.querySelectorAll("#conversation .tok.target").forEach((el) => el.classList.remove("target"));
  if (S.attr.pos == null) { S.attr.scores = []; tint(); return; }
  tokEl(S.attr.pos)?.classList.add("target");
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
    <td>${r.position} <code>${esc(JSON.stringify(r.token))}</code></td>
    <td class="${r.polarity}">${fmt(r.activation, 2)}${r.normalised != null ? ` <small>(${fmt(r.normalised, 2)}×q)</small>` : ""}</td>
    <td>${fmt(r.gradient)}</td><td>${fmt(r.score)}</td><td>${toks(r.top_tokens)}</td></tr>`).join("");
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
    const d = await api("GET", `/api/neurons/${l}/${n}?n_exemplars=8`);
    const dec = Object.entries(d.decodes).map(([site, list]) => `<tr><td>${esc(site)}</td><td>${toks(list.map((x) => x.token))}</td></tr>`).join("");
    const ex = (pol) => (d.exemplars[pol] || []).map((e) => `<div class="exemplar">${e.tokens.map((t, i) => {
      const m = e.marks ? e.marks[i] : null; const cls = [i === e.position ? "peak" : "", m != null && Math.abs(m) > 1 ? "fire" : ""].join(" ");
      return `<span class="${cls}" title="${m != null ? fmt(m, 2) : ""}">${esc(t)}</span>`; }).join("")}
      <small> · ${fmt(e.normalised ?? e.activation, 2)}</small></div>`).join("") || '<p class="hint">no exemplars (needs corpus statistics)</p>';
    box.className = "";
    box.innerHTML = `<h3>L${d.layer}/N${d.neuron} <button type="button" id="steer-this">steer this neuron</button></h3>
      <p><b class="pos">+</b> ${esc(d.descriptions.pos || "no description")}<br><b class="neg">−</b> ${esc(d.descriptions.neg || "no description")}</p>
      <h4>Decoded tokens (${esc(d.decodes_source)})</h4><table class="grid">${dec}</table>
      <h4>Top exemplars, positive</h4>${ex("pos")}<h4>Top exemplars, negative</h4>${ex("neg")}
      ${d.notes.length ? `<p class="panel-note">${d.notes.map(esc).join("<br>")}</p>` : ""}`;
    $("#steer-this").onclick = () => { $("#steer-neurons").value = `${l}:${n}`; $("#steer-concept").value = ""; switchTab("steering"); };
  } catch (e) { box.textContent = e.message; }
}

// ---------------------------------------------------------------- concepts and clusters
$("#concept-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    const d = await api("GET", `/api/concepts?q=${encodeURIComponent($("#concept-q").value)}&k=50`);
    $("#concept-note").textContent = `${d.results.length} neurons for "${d.query}"`;
    $("#concept-table tbody").innerHTML = d.results.map((r) => `<tr><td>${nid(r.layer, r.neuron)}</td><td class="${r.polarity}">${r.polarity}</td>
      <td>${fmt(r.score)}</td><td>${toks(r.tokens)}</td><td>${esc(r.description || "")}</td></tr>`).join("");
    $("#steer-concept").value = d.query;
  } catch (err) { $("#concept-note").textContent = err.message; }
});
$("#cluster-btn").onclick = async () => {
  try {
    const q = S.sel ? `?start=${S.sel[0]}&end=${S.sel[1]}` : "";
    const d = await api("GET", sp(`/clusters${q}`));
    $("#clusters").innerHTML = `<h3>${d.clusters.length} clusters of ${d.n_neurons} active neurons <small>(${esc(d.method)})</small></h3>` +
      d.clusters.map((c) => `<div class="cluster"><b>${esc(c.name)}</b> ${toks(c.tokens)}<br>${c.members.map((m) => nid(m[0], m[1]) + (m[2] === "neg" ? "−" : "+")).join(" ")}</div>`).join("");
  } catch (err) { $("#clusters").textContent = err.message; }
};

// ---------------------------------------------------------------- steering
function steerBody() {
  const body = { mode: $("#steer-mode").value, generated: $("#steer-generated").checked, ranges: [] };
  const concept = $("#steer-concept").value.trim(), neurons = $("#steer-neurons").value.trim();
  if (neurons) body.neurons = neurons.split(/[\s,]+/).filter(Boolean).map((x) => x.split(/[:/]/).map((v) => parseInt(v.replace(/^[LN]/i, ""), 10)));
  else if (concept) body.concept = concept;
  body.strength = +$("#steer-strength").value;
  if (body.mode === "clamp") body.value = +$("#steer-value").value;
  if ($("#steer-n").value) body.n_neurons = +$("#steer-n").value;
  const rg = $("#steer-ranges").value.trim();
  if (rg) body.ranges = rg.split(/[\s,]+/).filter(Boolean).map((x) => x.split("-").map((v) => parseInt(v, 10)));
  return body;
}
async function addSteering() {
  const st = await api("POST", sp("/steerings"), steerBody());
  status(`steering ${st.id}: ${st.mode} ${st.n_neurons} neurons`);
  await reloadSteerings(); await refresh();
}
$("#steer-form").addEventListener("submit", (e) => { e.preventDefault(); addSteering().catch((err) => status(err.message)); });
$("#steer-apply-regen").onclick = () => addSteering().then(regenerate).catch((err) => status(err.message));
$("#use-selection").onclick = () => { if (S.sel) $("#steer-ranges").value = `${S.sel[0]}-${S.sel[1]}`; };
async function reloadSteerings() { renderSteerings(await api("GET", sp("/steerings"))); }
function renderSteerings(list) {
  $("#steer-count").textContent = list.length ? `(${list.length})` : "";
  $("#steer-list").innerHTML = list.map((s) => `<li><b>${esc(s.id)}</b> ${s.mode} ${s.concept ? `"${esc(s.concept)}"` : ""} · ${s.n_neurons} neurons
    ${s.strength != null ? `· strength ${s.strength}` : ""} · ${[...s.ranges.map((r) => `[${r[0]}, ${r[1]})`), s.generated ? "generated" : ""].filter(Boolean).join(", ")}
    <button type="button" data-id="${esc(s.id)}" class="steer-remove">remove</button></li>`).join("") || '<li class="hint">none</li>';
  document.querySelectorAll(".steer-remove").forEach((b) => { b.onclick = async () => {
    try { await api("DELETE", sp(`/steerings/${encodeURIComponent(b.dataset.id)}`)); await reloadSteerings(); await refresh(); } catch (e) { status(e.message); } }; });
}

init().catch((e) => status(e.message));
