"""The one page `prologue serve` shows at `/`: plain HTML with its CSS and JS inline, no build step,
nothing fetched from anywhere but this server's API (the Content-Security-Policy enforces it), and
no site may frame it. Its sampling fields are built from `/v1/info`'s `options` (the runtime's
table of sampling options). Answers are sequenced: of two requests for the same grid the later
click wins and an answer that arrives after a newer request was made is dropped (the log says so);
a server that does not answer is named as such."""

from __future__ import annotations

PAGE_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
    "X-Frame-Options": "DENY",  # no site may frame the page (clickjacking); older browsers read this one
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Prologue</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
  header { background: #1d2330; color: #fff; padding: 10px 20px; display: flex; align-items: baseline; gap: 16px; }
  header h1 { font-size: 20px; margin: 0; }
  header span { color: #b8c0d0; font-size: 13px; }
  main { padding: 12px 20px 30px; }
  #controls { display: flex; flex-wrap: wrap; gap: 10px 16px; align-items: end; background: #fff; padding: 12px;
              border: 1px solid #dde1e8; border-radius: 6px; }
  #controls label { display: flex; flex-direction: column; font-size: 12px; color: #4b5468; }
  #controls input, #controls select { font-size: 14px; padding: 3px 5px; width: 7em; }
  #controls select { width: 12em; }
  #options { display: contents; }
  button { font-size: 14px; padding: 6px 18px; background: #2f6fde; color: #fff; border: 0; border-radius: 4px;
           cursor: pointer; }
  button:disabled { background: #8aa6d8; cursor: wait; }
  h2 { font-size: 16px; margin: 18px 0 4px; }
  .hint { margin: 0 0 8px; color: #4b5468; font-size: 13px; }
  .grid { display: flex; flex-wrap: wrap; gap: 6px; min-height: 20px; }
  .grid img { width: 96px; height: 96px; image-rendering: pixelated; border: 2px solid transparent;
              border-radius: 3px; background: #fff; cursor: pointer; }
  .grid img:hover { border-color: #2f6fde; }
  .grid img.source { border-color: #e0892f; }
  #status { min-height: 1.4em; margin: 10px 0 0; font-size: 13px; }
  #status.error { color: #b3261e; }
  #log { font: 12px/1.5 ui-monospace, monospace; color: #4b5468; padding-left: 18px; }
</style>
</head>
<body>
<header><h1>Prologue</h1><span id="bundle">loading...</span></header>
<main>
<section id="controls">
  <label>Class <select id="class"></select></label>
  <label>Images <input id="n" type="number" min="1" value="8"></label>
  <label>Seed <input id="seed" type="number" min="0" placeholder="random"></label>
  <span id="options"></span>
  <label>Variations <input id="nvar" type="number" min="1" value="8"></label>
  <button id="generate" type="button">Generate</button>
</section>
<p id="status" role="status"></p>
<h2>Samples</h2>
<p class="hint">Click an image to keep its prologue and resample the rest.</p>
<div id="samples" class="grid"></div>
<h2 id="variations-title" hidden>Variations</h2>
<div id="variations" class="grid"></div>
<h2>Requests</h2>
<ol id="log" reversed></ol>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let info = null;
// the latest request for each grid: an answer to an older one is stale and dropped (new samples
// also make pending variations stale: their source image is gone)
const latest = {samples: 0, variations: 0};
let pending = 0;

function setStatus(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function number(id, integer) {
  const text = $(id).value.trim();
  if (text === "") return null;
  const value = Number(text);
  if (!Number.isFinite(value)) throw new Error(id + " must be a number");
  if (integer && !Number.isSafeInteger(value)) throw new Error(id + " must be a whole number below 2^53 (exact in a web page)");
  return value;
}

function buildOptions(options) {
  // one field per sampling option a request may set (/v1/info "options": runtime/settings.py SAMPLING_OPTIONS)
  for (const o of options) {
    const label = document.createElement("label");
    label.append(o.label + " ");
    const input = document.createElement("input");
    input.id = o.name;
    input.type = "number";
    input.title = o.help;
    if (o.min !== null) input.min = o.min;
    if (o.max !== null) input.max = o.max;
    if (o.step !== null) input.step = o.step;
    if (o.default !== null) input.value = o.default;
    else if (o.optional) input.placeholder = "unset";
    label.appendChild(input);
    $("options").appendChild(label);
  }
}

function knobs() {
  const body = {};
  for (const o of info.options) {
    const v = number(o.name, o.type === "int");
    if (v !== null) body[o.name] = v;
  }
  const seed = number("seed", true);
  if (seed !== null) body.seed = seed;
  return body;
}

function logLine(text) {
  const item = document.createElement("li");
  item.textContent = text;
  $("log").prepend(item);
}

class Stale extends Error {}

async function call(path, body, grid, ticket) {
  const t0 = performance.now();
  let response;
  try {
    response = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                  body: JSON.stringify(body)});
  } catch (e) {  // the browser got no answer at all: "Failed to fetch" says nothing useful
    throw new Error(path + ": the server at " + location.host + " does not answer (is prologue serve still " +
                    "running? restart it and reload this page)");
  }
  let data = null;
  try { data = await response.json(); } catch (e) { data = {error: response.statusText}; }
  const ms = performance.now() - t0;
  if (ticket !== latest[grid]) {  // a newer request for this grid was made meanwhile: it wins
    logLine(path + ": an answer after " + ms.toFixed(0) + " ms dropped (a newer request replaced it)");
    throw new Stale();
  }
  if (!response.ok) throw new Error(path + ": " + response.status + " " + (data.error || ""));
  const t = data.timing || {};
  const line = path + ": " + (data.images || []).length + " images in " + ms.toFixed(0) + " ms (server " +
    (t.total_ms || 0).toFixed(0) + " ms, queued " + (t.queued_ms || 0).toFixed(0) + " ms, loop of " +
    (t.batch_images || 0) + " images), seed " + data.seed;
  logLine(line);
  setStatus(line, false);
  return data;
}

function show(target, data) {
  target.replaceChildren();
  data.images.forEach((b64, index) => {
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + b64;
    img.alt = "class " + data.class_ids[index] + ", seed " + data.seed + ", image " + index;
    img.dataset.result = data.id;
    img.dataset.index = index;
    img.dataset.classId = data.class_ids[index];
    img.addEventListener("click", () => vary(img));
    target.appendChild(img);
  });
}

async function busy(work) {
  pending += 1;
  document.body.dataset.pending = pending;
  try {
    await work();
  } catch (e) {
    if (!(e instanceof Stale)) setStatus(e.message, true);
  } finally {
    pending -= 1;
    document.body.dataset.pending = pending;
  }
}

function generate() {
  const ticket = ++latest.samples;
  latest.variations += 1;  // variations still on their way belong to samples about to be replaced
  return busy(async () => {
    const body = knobs();
    body.class_ids = [Number($("class").value)];
    body.n = number("n", true) || 1;
    setStatus("generating...", false);
    const data = await call("/v1/generate", body, "samples", ticket);
    show($("samples"), data);
  });
}

function vary(img) {
  const ticket = ++latest.variations;
  return busy(async () => {
    document.querySelectorAll(".grid img.source").forEach((el) => el.classList.remove("source"));
    img.classList.add("source");
    const body = knobs();
    body.result_id = img.dataset.result;
    body.index = Number(img.dataset.index);
    body.class_id = Number(img.dataset.classId);
    body.n = number("nvar", true) || 1;
    setStatus("resampling the visual tokens...", false);
    const data = await call("/v1/variations", body, "variations", ticket);
    $("variations-title").hidden = false;
    show($("variations"), data);
  });
}

async function start() {
  try {
    const response = await fetch("/v1/info");
    info = await response.json();
  } catch (e) {
    setStatus("the server at " + location.host + " does not answer (is prologue serve still running?): " +
              e.message, true);
    return;
  }
  $("bundle").textContent = info.bundle.name + " | " + info.bundle.image_size + "x" + info.bundle.image_size +
    " | " + info.backend + " | batching " + (info.batching.enabled ? "on" : "off");
  const select = $("class");
  const names = info.classes.names ||
    Array.from({length: Math.min(info.classes.num_classes, 2000)}, (_, k) => "class " + k);
  names.forEach((name, k) => select.add(new Option(k + ": " + name, k)));
  select.add(new Option("unconditional (null class)", info.classes.null_class));
  buildOptions(info.options);
  $("n").max = info.limits.max_images;
  $("nvar").max = info.limits.max_images;
  $("generate").addEventListener("click", generate);
  document.body.dataset.ready = "1";
  setStatus("ready", false);
}

start();
</script>
</body>
</html>
"""
