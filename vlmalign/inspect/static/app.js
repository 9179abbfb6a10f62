// vlmalign inspect: the site's four views, built from window.VLM (the data/*.js files).
// Every value from the runs is put in the page with textContent (via el()), never as HTML.
"use strict";

const PAGE = 20;
const FLAGS = {
  disagree: "judge vs oracle",
  parse_error: "parse failure",
  failed: "judge failed",
  tie: "tie",
  position: "position-following",
};

// --- small helpers ---------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  add(node, ...children);
  return node;
}

// append children as el() does: arrays flattened, null and false left out, strings as text
function add(node, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function fmt(x, digits) {
  if (x === null || x === undefined) return "";
  if (typeof x !== "number") return String(x);
  return Number.isInteger(x) ? String(x) : x.toFixed(digits === undefined ? 3 : digits);
}

function route() {
  const [view, query] = (location.hash.slice(1) || "prefs").split("?");
  return { view, params: new URLSearchParams(query || "") };
}

function frames(item) {
  if (item.frames) return el("img", { class: "frames", src: item.frames, alt: "frames of " + String(item.video) });
  if (item.video) return el("div", { class: "missing" }, "video not readable: " + JSON.stringify(item.video));
  return null;
}

function pager(total, page, go) {
  const pages = Math.max(1, Math.ceil(total / PAGE));
  return el("div", { class: "pager" },
    el("button", { class: "prev", disabled: page <= 0, onclick: () => go(page - 1) }, "\u2190 previous"),
    el("span", { class: "page" }, `page ${page + 1} of ${pages}`),
    el("button", { class: "next", disabled: page >= pages - 1, onclick: () => go(page + 1) }, "next \u2192"),
    el("span", { class: "count" }, `${total} items`));
}

function select(cls, options, value, onchange) {
  const node = el("select", { class: cls, onchange: (e) => onchange(e.target.value) },
    options.map(([v, label]) => el("option", { value: v, selected: v === value }, label)));
  return node;
}

// --- preferences -----------------------------------------------------------------------------
const prefsState = { run: "", flags: new Set(), text: "", page: 0 };

function prefsView(root) {
  const items = VLM.prefs || [];
  const runs = [...new Set(items.map((i) => i.run))];
  const inRun = items.filter((i) => !prefsState.run || i.run === prefsState.run);
  const text = prefsState.text.toLowerCase();
  const shown = inRun.filter((i) =>
    [...prefsState.flags].every((f) => i.flags.includes(f)) &&
    (!text || (i.question + " " + i.id + " " + i.answers.map((a) => a.text).join(" ")).toLowerCase().includes(text)));
  const rerender = () => render();
  const controls = el("div", { class: "controls" },
    el("label", {}, "run ", select("run", [["", `all runs (${runs.length})`], ...runs.map((r) => [r, r])], prefsState.run,
      (v) => { prefsState.run = v; prefsState.page = 0; rerender(); })),
    Object.entries(FLAGS).map(([flag, label]) => {
      const n = inRun.filter((i) => i.flags.includes(flag)).length;
      return el("label", {},
        el("input", { type: "checkbox", class: "filter", "data-flag": flag, checked: prefsState.flags.has(flag),
          onchange: (e) => { e.target.checked ? prefsState.flags.add(flag) : prefsState.flags.delete(flag); prefsState.page = 0; rerender(); } }),
        ` ${label} (${n})`);
    }),
    el("input", { type: "search", class: "search", placeholder: "search text", value: prefsState.text,
      onchange: (e) => { prefsState.text = e.target.value; prefsState.page = 0; rerender(); } }));
  const go = (p) => { prefsState.page = p; rerender(); window.scrollTo(0, 0); };
  const page = shown.slice(prefsState.page * PAGE, (prefsState.page + 1) * PAGE);
  add(root, runSummary(prefsState.run), controls, pager(shown.length, prefsState.page, go),
    page.length ? page.map(prefItem) : el("p", { class: "missing" }, items.length ? "no item matches the filters" :
      "no preference runs or rollouts in the folders given"),
    page.length ? pager(shown.length, prefsState.page, go) : null);
}

function runSummary(run) {
  const about = (VLM.site.runs || []).filter((r) => !run || r.run === run);
  if (!about.length) return null;
  return el("details", { class: "card runs" }, el("summary", {}, `${about.length} run(s): judge, context and stats`),
    el("table", {}, el("tr", {}, ["run", "kind", "method", "context", "judge", "questions", "pairs", "first answer chosen",
      "oracle agreement"].map((h) => el("th", {}, h))),
      about.map((r) => el("tr", {}, [r.run, r.kind, r.method, r.mode, r.judge, r.questions, r.pairs,
        r.first_answer_chosen === undefined || r.first_answer_chosen === null ? "" : fmt(r.first_answer_chosen, 2),
        r.oracle_agreement ? JSON.stringify(r.oracle_agreement) : ""].map((v) => el("td", {}, fmt(v)))))));
}

function prefItem(item) {
  const rollout = item.answers.some((a) => a.advantage !== undefined);
  const head = ["#", "answer", "log-prob", "tokens", "words", "judge", "oracle", rollout ? "advantage" : "role"];
  if (rollout) head.push("policy rank");
  const rows = item.answers.map((a, k) => {
    const role = k === item.chosen ? "chosen" : k === item.rejected ? "rejected" : "";
    const cells = [
      el("td", { class: "num" }, String(k + 1)),
      el("td", { class: "answer-text" }, a.text),
      el("td", { class: "num" }, fmt(a.logp, 2)),
      el("td", { class: "num" }, fmt(a.tokens)),
      el("td", { class: "num" }, fmt(a.words)),
      el("td", { class: "judge" }, a.judge),
      el("td", { class: "num oracle" }, fmt(a.oracle)),
      rollout ? el("td", { class: "num" }, fmt(a.advantage, 3)) : el("td", { class: "role" }, role),
    ];
    if (rollout) cells.push(el("td", { class: "num" }, fmt(a.policy_rank)));
    return el("tr", { class: role || null }, cells);
  });
  return el("article", { class: "card item", "data-id": item.id, "data-run": item.run },
    el("h3", {}, `${item.run} \u00b7 ${item.id}`, el("span", { class: "status" }, item.status),
      item.flags.map((f) => el("span", { class: "flag", "data-flag": f }, FLAGS[f] || f))),
    frames(item),
    el("div", { class: "question" }, item.question || "(question not recorded)"),
    item.context ? el("details", { class: "context" }, el("summary", {}, `context the judge read (${item.mode})`),
      el("pre", {}, item.context)) : el("div", { class: "note" }, `context: ${item.mode || "none"}`),
    item.reference ? el("div", { class: "note reference" }, "reference answer: ", item.reference) : null,
    el("table", { class: "answers" }, el("tr", {}, head.map((h) => el("th", {}, h))), rows),
    el("details", { class: "replies", open: item.replies.length <= 2 },
      el("summary", {}, `judge's raw reply (${item.replies.length})`),
      item.replies.length ? item.replies.map((r) => el("pre", { class: "reply" }, r)) : el("div", { class: "missing" }, "not recorded")));
}

// --- compare ---------------------------------------------------------------------------------
const compareState = { group: 0, flags: new Set(), page: 0 };

function compareView(root) {
  const groups = VLM.compare || [];
  if (!groups.length) { add(root, el("p", { class: "missing" }, "no evaluation outputs (predictions.jsonl) in the folders given")); return; }
  const group = groups[Math.min(compareState.group, groups.length - 1)];
  const labels = { disagree: "models disagree", failed: "judge failed" };
  const shown = group.rows.filter((r) => [...compareState.flags].every((f) => r.flags.includes(f)));
  const rerender = () => render();
  const go = (p) => { compareState.page = p; rerender(); window.scrollTo(0, 0); };
  add(root, el("div", { class: "controls" },
    el("label", {}, "evaluation ", select("group", groups.map((g, k) => [String(k), `${g.name}: ${g.data} (${g.models.length} models)`]),
      String(compareState.group), (v) => { compareState.group = Number(v); compareState.page = 0; rerender(); })),
    Object.entries(labels).map(([flag, label]) => el("label", {},
      el("input", { type: "checkbox", class: "filter", "data-flag": flag, checked: compareState.flags.has(flag),
        onchange: (e) => { e.target.checked ? compareState.flags.add(flag) : compareState.flags.delete(flag); compareState.page = 0; rerender(); } }),
      ` ${label} (${group.rows.filter((r) => r.flags.includes(flag)).length})`))),
  pager(shown.length, compareState.page, go));
  const page = shown.slice(compareState.page * PAGE, (compareState.page + 1) * PAGE);
  add(root, el("table", { class: "card compare" },
    el("tr", {}, el("th", {}, "question"), group.models.map((m) => el("th", { class: "model" }, m))),
    page.map((r) => el("tr", { class: "row", "data-id": r.id },
      el("td", {}, el("div", { class: "question" }, r.question), el("div", { class: "note" }, "reference: ", r.answer),
        el("div", { class: "note" }, r.id, r.flags.map((f) => el("span", { class: "flag", "data-flag": f }, labels[f])))),
      r.models.map((c) => el("td", { class: "cell" }, c ? [
        el("div", { class: "pred" }, c.pred),
        el("div", { class: c.verdict === "yes" ? "verdict-yes" : c.verdict === "no" ? "verdict-no" : "note" },
          c.status && c.status !== "ok" ? c.status : `${c.verdict || ""}${c.score !== null && c.score !== undefined ? " \u00b7 score " + fmt(c.score) : ""}`),
        c.raw ? el("details", {}, el("summary", {}, "judge reply"), el("pre", {}, c.raw)) : null,
      ] : el("span", { class: "missing" }, "not answered")))))));
}

// --- training --------------------------------------------------------------------------------
const COLOURS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#65a30d", "#475569", "#ea580c"];

function chart(metric, lines) {
  const W = 320, H = 170, L = 46, R = 8, T = 8, B = 22;
  const points = lines.flatMap((l) => l.points);
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
  };
  add("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#9aa5b1" });
  add("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#9aa5b1" });
  for (const [y, label] of [[y0, y0], [y1, y1]]) add("text", { x: L - 4, y: sy(y) + 4, "text-anchor": "end", "font-size": 10 }, fmt(label, 3));
  add("text", { x: L, y: H - 6, "font-size": 10 }, `step ${x0}`);
  add("text", { x: W - R, y: H - 6, "font-size": 10, "text-anchor": "end" }, `${x1}`);
  for (const l of lines) {
    add("polyline", { fill: "none", stroke: l.colour, "stroke-width": 1.6, points: l.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ") });
  }
  return el("div", { class: "chart", "data-metric": metric }, el("h4", {}, metric), svg);
}

function trainingView(root) {
  const { curves, summaries } = VLM.training || { curves: [], summaries: [] };
  const colour = Object.fromEntries(curves.map((c, k) => [c.run, COLOURS[k % COLOURS.length]]));
  const metrics = [...new Set(curves.flatMap((c) => Object.keys(c.series)))].sort();
  add(root, el("h2", {}, "Training curves"),
    curves.length ? el("div", { class: "legend" }, curves.map((c) => el("span", {}, el("span", { class: "swatch", style: `background:${colour[c.run]}` }), c.run)))
      : el("p", { class: "missing" }, "no metrics.jsonl in the folders given"),
    el("div", { class: "charts" }, metrics.map((m) => chart(m, curves.filter((c) => c.series[m] && c.series[m].length)
      .map((c) => ({ colour: colour[c.run], points: c.series[m] }))))),
    el("h2", {}, "Stats and reports"),
    summaries.map((s) => el("details", { class: "card summary" }, el("summary", {}, `${s.run} / ${s.file}`),
      el("table", {}, s.rows.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", { class: "num" }, fmt(v))))))));
}

// --- annotate --------------------------------------------------------------------------------
// A seeded generator, so one seed gives every annotator the same order and A/B positions.
function mulberry32(seed) {
  return function () {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const annotation = { seed: null, order: null, done: [], annotator: "", serverNote: "" };

function annotationPlan(seed) {
  const items = (VLM.prefs || []).filter((i) => i.pair);
  const rand = mulberry32(seed);
  const order = items.map((item) => ({ item, swap: false }));
  for (let k = order.length - 1; k > 0; k--) {
    const j = Math.floor(rand() * (k + 1));
    [order[k], order[j]] = [order[j], order[k]];
  }
  for (const o of order) o.swap = rand() < 0.5;
  return order;
}

// Verdicts are kept in the browser under the pair list's hash and the seed: the same pairs keep
// them across reloads and rebuilds of the site (--serve rebuilds it on every start); other pairs
// (another site, new runs) start afresh.
function storageKey() { return `vlmalign-annotations:${pairsHash()}:${annotation.seed}`; }

let pairsDigest = null;
function pairsHash() {
  if (pairsDigest === null) {
    const text = JSON.stringify((VLM.prefs || []).filter((i) => i.pair).map((i) =>
      [i.run, i.id, i.pair.answers, i.pair.answers.map((k) => i.answers[k].text)]));
    let h = 0x811c9dc5;  // 32-bit FNV-1a over the UTF-16 code units
    for (let k = 0; k < text.length; k++) h = Math.imul(h ^ text.charCodeAt(k), 0x01000193);
    pairsDigest = (h >>> 0).toString(16).padStart(8, "0") + "-" + text.length.toString(16);
  }
  return pairsDigest;
}

function saveRow(row) {
  annotation.done.push(row);
  try { localStorage.setItem(storageKey(), JSON.stringify(annotation.done)); } catch (e) { /* storage off: memory only */ }
  if (location.protocol.startsWith("http")) {
    fetch("annotations", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(row) })
      .then((r) => { annotation.serverNote = r.ok ? "saved on the server" : `server refused: ${r.status}`; })
      .catch(() => { annotation.serverNote = "server unreachable: download the file"; })
      .finally(() => { const n = document.querySelector(".server-note"); if (n) n.textContent = annotation.serverNote; });
  }
}

function download() {
  const text = annotation.done.map((r) => JSON.stringify(r)).join("\n") + (annotation.done.length ? "\n" : "");
  const url = URL.createObjectURL(new Blob([text], { type: "application/x-ndjson" }));
  const a = el("a", { href: url, download: "annotations.jsonl" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function annotateView(root, params) {
  const asked = parseInt(params.get("seed"), 10);
  const seed = Number.isFinite(asked) ? asked : annotation.seed ?? Math.floor(Math.random() * 1e6);
  if (params.get("seed") !== String(seed)) {
    // a drawn seed goes into the URL, so a reload shows the same order and finds the saved verdicts
    params.set("seed", seed);
    history.replaceState(null, "", `#annotate?${params}`);
  }
  if (seed !== annotation.seed) {
    annotation.seed = seed;
    annotation.order = annotationPlan(seed);
    let saved = [];
    try { saved = JSON.parse(localStorage.getItem(storageKey()) || "[]"); } catch (e) { saved = []; }
    annotation.done = saved;
  }
  annotation.annotator = params.get("annotator") || annotation.annotator || localStorage.getItem("vlmalign-annotator") || "";
  const position = annotation.done.length;
  const total = annotation.order.length;
  add(root, el("div", { class: "controls" },
    el("label", {}, "annotator ", el("input", { class: "annotator", value: annotation.annotator,
      onchange: (e) => { annotation.annotator = e.target.value; try { localStorage.setItem("vlmalign-annotator", e.target.value); } catch (x) { /* memory only */ } } })),
    el("span", { class: "seed" }, `order seed ${seed}`),
    el("span", { class: "progress" }, `${Math.min(position, total)} of ${total} pairs annotated`),
    el("button", { class: "download", onclick: download }, "download annotations.jsonl"),
    el("span", { class: "server-note note" }, annotation.serverNote)),
  el("p", { class: "note" }, "Which answer is better for this video and question? Keys: ", el("kbd", {}, "a"), " A, ",
    el("kbd", {}, "b"), " B, ", el("kbd", {}, "t"), " tie. The judge's verdicts, scores and the answers' origin stay hidden."));
  if (!total) { add(root, el("p", { class: "missing" }, "no pairs to annotate")); return; }
  if (position >= total) { add(root, el("p", { class: "finished" }, "All pairs annotated. Download the file, or find it on the server.")); return; }
  const { item, swap } = annotation.order[position];
  const [i, j] = item.pair.answers;
  const shown = swap ? [j, i] : [i, j];
  const choose = (choice) => {
    const preferred = choice === "tie" ? "tie" : (shown[choice === "A" ? 0 : 1] === i ? 0 : 1);
    saveRow({ pair: `${item.run}/${item.id}`, run: item.run, question_id: item.id, context: item.mode, answers: [i, j], shown,
      choice, preferred, judge: item.pair.judge, annotator: annotation.annotator, time: new Date().toISOString() });
    render();
  };
  annotation.choose = choose;
  add(root, el("article", { class: "card annotate-pair", "data-pair": `${item.run}/${item.id}` },
    frames(item),
    el("div", { class: "question" }, item.question || "(question not recorded)"),
    el("div", { class: "pair" },
      el("div", { class: "answer answer-a" }, el("h3", {}, "A"), item.answers[shown[0]].text),
      el("div", { class: "answer answer-b" }, el("h3", {}, "B"), item.answers[shown[1]].text)),
    el("div", { class: "buttons" },
      el("button", { class: "choose-a", onclick: () => choose("A") }, "A is better (a)"),
      el("button", { class: "choose-tie", onclick: () => choose("tie") }, "tie (t)"),
      el("button", { class: "choose-b", onclick: () => choose("B") }, "B is better (b)"))));
}

document.addEventListener("keydown", (e) => {
  if (route().view !== "annotate" || !annotation.choose || e.target.tagName === "INPUT") return;
  const choice = { a: "A", b: "B", t: "tie" }[e.key.toLowerCase()];
  if (choice && annotation.done.length < annotation.order.length) annotation.choose(choice);
});

// --- routing ---------------------------------------------------------------------------------
const VIEWS = { prefs: prefsView, compare: compareView, training: trainingView, annotate: annotateView };

function render() {
  const { view, params } = route();
  const root = document.getElementById("view");
  root.replaceChildren();
  annotation.choose = null;
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.view === view);
  (VIEWS[view] || prefsView)(root, params);
  document.body.dataset.view = VIEWS[view] ? view : "prefs";
}

document.getElementById("source").textContent = `${VLM.site.root} \u00b7 built ${VLM.site.generated}`;
window.addEventListener("hashchange", render);
render();
