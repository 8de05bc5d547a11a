// DELRec page: build a history with autocomplete from /items, POST /recommend then /explain, draw the results.
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // [{item, title}]
let known = new Map(); // title -> item, from the latest /items answer

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

async function call(method, path, body) {
  const res = await fetch(path, {
    method, headers: body ? { "Content-Type": "application/json" } : {}, body: body ? JSON.stringify(body) : undefined,
  });
  const data = await res.json().catch(() => ({ detail: res.statusText }));
  if (!res.ok) throw new Error(data.detail || `HTTP ${res.status}`);
  return data;
}

function showError(msg) { $("error").textContent = msg || ""; }

function renderHistory() {
  const ol = $("history");
  ol.replaceChildren(...history.map((h, i) => el("li", {}, h.title,
    el("button", { type: "button", title: "remove", "aria-label": `remove ${h.title}`,
      onclick: () => { history.splice(i, 1); renderHistory(); } }, "×"))));
}

let searchTimer = null;
async function suggest() {
  const q = $("title-input").value.trim();
  if (!q) return;
  try {
    const { items } = await call("GET", `/items?q=${encodeURIComponent(q)}&limit=20`);
    known = new Map(items.map((it) => [it.title, it.item]));
    $("title-options").replaceChildren(...items.map((it) => el("option", { value: it.title })));
  } catch (e) { /* autocomplete is best effort */ }
}

function addTitle(ev) {
  ev.preventDefault();
  const title = $("title-input").value.trim();
  if (!title) return;
  // Unknown titles are sent as typed; the server matches them (exactly or fuzzily) or says which it could be.
  history.push({ item: known.get(title) ?? null, title });
  $("title-input").value = "";
  showError("");
  renderHistory();
}

// Influences can be tiny (random or barely trained models): keep three significant digits instead of zeros.
function scoreText(x) { return x === 0 || Math.abs(x) >= 0.01 ? x.toFixed(3) : x.toExponential(2); }

function renderRecs(recs) {
  $("recommendations").replaceChildren(...recs.map((r) =>
    el("li", { class: "rec", "data-item": r.item }, el("span", { class: "rec-title" }, r.title), " ",
      el("span", { class: "score" }, scoreText(r.score)))));
}

function renderInfluences(infl) {
  const box = $("influences");
  if (!infl.length) { box.replaceChildren(el("p", { class: "muted" }, "Needs at least two history items.")); return; }
  const max = Math.max(...infl.map((x) => Math.abs(x.influence)), 1e-9);
  box.replaceChildren(...infl.map((x) => {
    const w = (Math.abs(x.influence) / max) * 50; // percent of the track on one side of the axis
    const bar = el("div", { class: x.influence >= 0 ? "bar" : "bar neg" });
    bar.style.width = `${w}%`;
    bar.style.left = x.influence >= 0 ? "50%" : `${50 - w}%`;
    return el("div", { class: "bar-row influence" },
      el("span", { class: "bar-label", title: x.title }, x.title),
      el("div", { class: "bar-track" }, el("div", { class: "bar-axis" }), bar),
      el("span", { class: "bar-value" }, (x.influence >= 0 ? "+" : "") + scoreText(x.influence)));
  }));
}

function renderTeacher(name, picks) {
  $("teacher-title").textContent = name ? `${name}'s top-k` : "Teacher's top-k";
  if (!name) { $("teacher").replaceChildren(el("li", { class: "muted" }, "no teacher in this run")); return; }
  $("teacher").replaceChildren(...picks.map((t) => el("li", { class: "teacher-pick" }, t.title, " ",
    t.in_candidates ? el("span", { class: "tag", title: "also among the LLM's candidates" }, "candidate") : "")));
}

async function recommend() {
  showError("");
  if (!history.length) { showError("Add at least one item to the history."); return; }
  const body = {
    history: history.map((h) => h.item ?? h.title),
    k: parseInt($("k").value, 10) || 10,
  };
  const btn = $("recommend");
  btn.disabled = true;
  $("rec-status").textContent = "ranking…";
  $("recommendations").replaceChildren();
  $("influences").replaceChildren();
  $("teacher").replaceChildren();
  $("explain-status").textContent = "";
  try {
    const rec = await call("POST", "/recommend", { ...body, all_items: $("all-items").checked });
    renderRecs(rec.recommendations);
    $("rec-status").textContent = `${rec.n_candidates} ${rec.candidates} candidates, ${rec.seconds.toFixed(2)} s`;
    if ($("with-explain").checked) {
      $("explain-status").textContent = "explaining (one prompt per history item)…";
      const ex = await call("POST", "/explain", body);
      $("explain-status").textContent = `top: ${ex.recommendations[0].title} (on ${ex.candidates.length} drawn candidates), ${ex.seconds.toFixed(2)} s`;
      renderInfluences(ex.influences);
      renderTeacher(ex.teacher, ex.teacher_topk);
    }
  } catch (e) {
    showError(e.message);
    $("rec-status").textContent = "";
    $("explain-status").textContent = "";
  } finally {
    btn.disabled = false;
  }
}

async function init() {
  $("add-form").addEventListener("submit", addTitle);
  $("title-input").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(suggest, 150); });
  $("recommend").addEventListener("click", recommend);
  $("clear").addEventListener("click", () => { history.length = 0; renderHistory(); showError(""); });
  try {
    const h = await call("GET", "/health");
    $("info").textContent = `${h.dataset} (${h.n_items} items, ${h.domain}) · ${h.backbone}` +
      ` · soft prompt: ${h.soft_prompt ? "yes" : "no"} · adapter: ${h.adapter ? "yes" : "no"}` +
      ` · teacher: ${h.teacher ?? "none"}`;
    $("k").max = String(h.max_candidates);
  } catch (e) { $("info").textContent = `server not ready: ${e.message}`; }
}

init();
