// The playground: a task from /tasks, images from a file input or a drop, POST /predict,
// the top-k of each image with bars, the latency, and the server's {error, detail} when it fails.
"use strict";

const $ = (id) => document.getElementById(id);
let chosen = [];

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return `${resp.status} ${body.error}: ${body.detail || ""}`;
  } catch (e) { /* not JSON: fall through */ }
  return `${resp.status} ${resp.statusText}`;
}

async function loadTasks() {
  let resp;
  try {
    resp = await fetch("/tasks");
  } catch (e) {
    showError(`cannot reach the server: ${e.message}`);
    return;
  }
  if (!resp.ok) { showError(await errorText(resp)); return; }
  const { tasks } = await resp.json();
  const select = $("task");
  select.replaceChildren();
  for (const t of tasks.filter((t) => t.servable)) {
    const option = new Option(`${t.task} (v${t.version}, ${t.classes.length} classes)`, t.task);
    option.dataset.classes = t.classes.join(", ");
    select.add(option);
  }
  if (!select.options.length) showError("no servable task is published yet: train one with uda-train --publish");
  describeTask();
  select.dataset.loaded = "true";
}

function describeTask() {
  const option = $("task").selectedOptions[0];
  $("task-info").textContent = option ? `classes: ${option.dataset.classes}` : "";
}

function choose(files) {
  chosen = Array.from(files);
  $("chosen").textContent = chosen.length ? chosen.map((f) => f.name).join(", ") : "no image chosen";
}

function renderResults(body, latencyMs) {
  const results = $("results");
  results.replaceChildren();
  body.predictions.forEach((prediction, i) => {
    const card = document.createElement("div");
    card.className = "result";
    const img = document.createElement("img");
    img.src = URL.createObjectURL(chosen[i]);
    img.alt = chosen[i].name;
    const table = document.createElement("table");
    table.dataset.image = chosen[i].name;
    const caption = table.createCaption();
    caption.textContent = chosen[i].name;
    for (const item of prediction.top_k) {
      const row = table.insertRow();
      row.className = "prediction";
      row.insertCell().textContent = item.label;
      row.cells[0].className = "label";
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${(100 * item.score).toFixed(1)}%`;
      row.insertCell().append(bar);
      const score = row.insertCell();
      score.className = "score";
      score.textContent = item.score.toFixed(4);
    }
    card.append(img, table);
    results.append(card);
  });
  const t = body.timing;
  $("latency").textContent = `${body.task} v${body.version}: ${latencyMs.toFixed(0)} ms in all ` +
    `(queue ${t.queue_ms.toFixed(1)} ms, swap ${t.swap_ms.toFixed(1)} ms, model ${t.model_ms.toFixed(1)} ms)`;
  $("latency").dataset.ms = latencyMs.toFixed(1);
}

async function predict(event) {
  event.preventDefault();
  showError("");
  if (!chosen.length) { showError("choose or drop an image first"); return; }
  const form = new FormData();
  for (const file of chosen) form.append("file", file, file.name);
  const query = new URLSearchParams({ task: $("task").value, top_k: $("top-k").value });
  $("predict").disabled = true;
  $("results").replaceChildren();
  $("latency").textContent = "";
  const started = performance.now();
  try {
    const resp = await fetch(`/predict?${query}`, { method: "POST", body: form });
    if (!resp.ok) { showError(await errorText(resp)); return; }
    renderResults(await resp.json(), performance.now() - started);
  } catch (e) {
    showError(`request failed: ${e.message}`);
  } finally {
    $("predict").disabled = false;
  }
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  choose(e.dataTransfer.files);
});
$("files").addEventListener("change", (e) => choose(e.target.files));
$("task").addEventListener("change", describeTask);
$("form").addEventListener("submit", predict);
loadTasks();
