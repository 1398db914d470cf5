// nanodiffusion web UI: a form, a job submitted to /api/jobs, live progress over server-sent events.
"use strict";

const $ = (id) => document.getElementById(id);
const FINAL = ["done", "cancelled", "failed"];
const state = { mode: "txt2img", view: "result", job: null, events: null, started: 0, limits: {}, initImage: null,
  selected: null, controlImage: null, pngInfo: null };

function detailText(detail) {
  if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  return detail;
}

async function api(path, options = {}) {
  const response = await fetch(path, { headers: { "Content-Type": "application/json" }, ...options });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(detailText(data.detail) || `${response.status} ${response.statusText}`);
  return data;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function setStatus(text, progress) {
  $("status").textContent = text;
  if (progress !== undefined) $("bar").style.width = `${Math.round(progress * 1000) / 10}%`;
}

function bindOutput(inputId, outputId) {
  const show = () => { $(outputId).textContent = $(inputId).value; };
  $(inputId).addEventListener("input", show);
  show();
}

function fillSelect(select, items, selected) {
  select.replaceChildren(...items.map(([value, label]) => new Option(label, value, false, value === selected)));
}

async function init() {
  const [config, samplers, schedulers] = await Promise.all([
    api("/api/config"), api("/sdapi/v1/samplers"), api("/sdapi/v1/schedulers")]);
  state.limits = config.limits;
  $("model").textContent = config.model;
  const names = samplers.map((s) => s.name);
  fillSelect($("sampler"), names.map((n) => [n, n]), names.includes("Euler a") ? "Euler a" : names[0]);
  fillSelect($("schedule"), schedulers.map((s) => [s.name, s.label]), "automatic");
  for (const id of ["width", "height"]) {
    $(id).value = config.default_size;
    $(id).max = config.limits.max_side;
  }
  $("steps").max = config.limits.max_steps;
  $("cfg").max = config.limits.max_cfg;
  $("cfg").value = config.default_cfg;
  $("batch").max = config.limits.max_batch;
  $("n_iter").max = config.limits.max_n_iter;
  for (const [input, output] of [["steps", "steps-value"], ["cfg", "cfg-value"], ["strength", "strength-value"],
    ["mask-blur", "blur-value"], ["control-scale", "control-value"], ["hr_denoise", "hr-denoise-value"]]) {
    bindOutput(input, output);
  }
  setupExtras(config);
  setupPlot(config);
  await setupFeatures(config);
  restoreSettings();
  $("generate").disabled = false;
}

function setupExtras(config) {
  $("lora-field").hidden = !config.loras.length;
  for (const name of config.loras) {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip";
    chip.textContent = name;
    chip.addEventListener("click", () => {
      const prompt = $("prompt");
      prompt.value = `${prompt.value.trimEnd()} <lora:${name}:0.8>`.trimStart();
    });
    $("loras").append(chip);
  }
  $("control-field").hidden = !config.controlnet;
  $("control-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => { state.controlImage = reader.result; };
    reader.readAsDataURL(file);
  });
}

// ---- tabs and the source image -------------------------------------------------------------------

function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll(".tab[data-mode]")) tab.classList.toggle("active", tab.dataset.mode === mode);
  const inpaint = mode === "inpaint";
  $("source").hidden = mode === "txt2img";
  for (const id of ["mask-tools", "blur-field", "mask-hint"]) $(id).hidden = !inpaint || !state.initImage;
  $("mask").hidden = !inpaint;
  $("stack").classList.toggle("painting", inpaint);
  $("hires-field").classList.toggle("off", mode !== "txt2img");
  saveSettings();
}

function setView(view) {
  state.view = view;
  for (const tab of document.querySelectorAll(".view-tab")) tab.classList.toggle("active", tab.dataset.view === view);
  for (const panel of document.querySelectorAll(".view")) panel.hidden = panel.id !== `view-${view}`;
  if (view === "history") loadHistory();
  saveSettings();
}

function fitSize(width, height) {
  const scale = Math.min(1, state.limits.max_side / Math.max(width, height));
  return [width, height].map((side) => Math.max(8, Math.round((side * scale) / 8) * 8));
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("that file is not an image this browser can read"));
    image.src = url;
  });
}

async function setInitImage(url) {
  const image = await loadImage(url);
  state.initImage = url;
  $("init").src = url;
  const mask = $("mask");
  mask.width = image.naturalWidth;
  mask.height = image.naturalHeight;
  [$("width").value, $("height").value] = fitSize(image.naturalWidth, image.naturalHeight);
  $("stack").hidden = false;
  $("source-tools").hidden = false;
  setMode(state.mode);
}

function removeInitImage() {
  state.initImage = null;
  $("stack").hidden = true;
  $("source-tools").hidden = true;
  $("init-file").value = "";
  setMode(state.mode);
}

// ---- the mask: painted on a canvas over the image (or uploaded), exported black/white ------------------

const MASK_COLOR = [255, 64, 96];
let painting = null;

function maskPoint(event) {
  const mask = $("mask");
  const rect = mask.getBoundingClientRect();
  return { x: ((event.clientX - rect.left) * mask.width) / rect.width,
    y: ((event.clientY - rect.top) * mask.height) / rect.height, scale: mask.width / rect.width };
}

function paint(from, to) {
  const context = $("mask").getContext("2d");
  context.strokeStyle = `rgb(${MASK_COLOR.join(",")})`;
  context.lineCap = "round";
  context.lineJoin = "round";
  context.lineWidth = $("brush").value * to.scale;
  context.beginPath();
  context.moveTo(from.x, from.y);
  context.lineTo(to.x, to.y);
  context.stroke();
}

function clearMask() {
  const mask = $("mask");
  mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
}

async function uploadMask(file) {
  const image = await loadImage(await readFile(file));
  const mask = $("mask");
  const context = mask.getContext("2d");
  clearMask();
  context.drawImage(image, 0, 0, mask.width, mask.height);
  const pixels = context.getImageData(0, 0, mask.width, mask.height);
  const d = pixels.data;
  for (let i = 0; i < d.length; i += 4) {
    const on = (d[i] + d[i + 1] + d[i + 2]) / 3 > 127 && d[i + 3] > 127;
    [d[i], d[i + 1], d[i + 2], d[i + 3]] = on ? [...MASK_COLOR, 255] : [0, 0, 0, 0];
  }
  context.putImageData(pixels, 0, 0);
}

function exportMask() {
  const mask = $("mask");
  const pixels = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height);
  const d = pixels.data;
  let painted = 0;
  for (let i = 0; i < d.length; i += 4) {
    const on = d[i + 3] > 0;
    painted += on;
    d[i] = d[i + 1] = d[i + 2] = on ? 255 : 0;
    d[i + 3] = 255;
  }
  const out = document.createElement("canvas");
  out.width = mask.width;
  out.height = mask.height;
  out.getContext("2d").putImageData(pixels, 0, 0);
  return painted ? out.toDataURL("image/png") : null;
}

// ---- generation -----------------------------------------------------------------------------------

function payload() {
  const seed = parseInt($("seed").value, 10);
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value,
    scheduler: $("schedule").value, steps: +$("steps").value, cfg_scale: +$("cfg").value,
    seed: Number.isNaN(seed) ? -1 : seed, width: +$("width").value, height: +$("height").value,
    batch_size: +$("batch").value, n_iter: +$("n_iter").value, ...featurePayload(),
  };
  if (state.controlImage) {
    body.alwayson_scripts = { controlnet: { args: [
      { enabled: true, image: state.controlImage, weight: +$("control-scale").value }] } };
  }
  if (state.mode === "txt2img") return { ...body, ...hiresPayload() };
  if (!state.initImage) throw new Error("Choose an image to start from first.");
  Object.assign(body, { init_images: [state.initImage], denoising_strength: +$("strength").value });
  if (state.mode === "inpaint") {
    const mask = exportMask();
    if (!mask) throw new Error("Paint over the area to repaint (or upload a mask) first.");
    Object.assign(body, { mask, mask_blur: +$("mask-blur").value, inpainting_fill: 1 });
  }
  return body;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
  $("progress").classList.toggle("busy", busy);
}

async function generate(event) {
  event.preventDefault();
  if (state.job || $("generate").disabled) return;
  showError("");
  let body;
  let path = "/api/jobs";
  try {
    body = payload();
    const plot = plotPayload();
    if (plot) [path, body] = ["/api/xyz", { ...body, ...plot }];
  } catch (error) {
    showError(error.message);
    return;
  }
  setBusy(true);
  setStatus("Submitting…", 0);
  try {
    const job = await api(path, { method: "POST", body: JSON.stringify(body) });
    state.job = job.id;
    state.started = performance.now();
    listen(job.id);
  } catch (error) {
    showError(error.message);
    setStatus("Ready", 0);
    setBusy(false);
  }
}

function listen(id) {
  const events = new EventSource(`/api/jobs/${id}/events`);
  state.events = events;
  events.onmessage = (message) => {
    const event = JSON.parse(message.data);
    update(event);
    if (FINAL.includes(event.status)) {
      events.close();
      finish(event);
    }
  };
  events.onerror = () => {
    events.close();
    showError("Lost the connection to the server.");
    finish({ status: "failed", images: [] });
  };
}

function showImage(url) {
  const preview = $("preview");
  preview.src = url;
  preview.hidden = false;
  $("placeholder").hidden = true;
}

function update(event) {
  if (event.preview) showImage(event.preview);
  if (event.status === "queued") {
    setStatus(event.ahead > 0 ? `Queued: ${event.ahead} job(s) ahead (place ${event.position} in the queue)` : "Starting…", 0);
  } else if (event.status === "running") {
    const batch = event.n_iter > 1 ? ` · batch ${event.iteration + 1}/${event.n_iter}` : "";
    setStatus(event.total ? `Step ${event.step} / ${event.total}${batch}` : "Encoding the prompt…", event.progress);
  }
}

function finish(event) {
  state.job = null;
  setBusy(false);
  const seconds = ((performance.now() - state.started) / 1000).toFixed(1);
  if (event.status === "done") setStatus(`Done in ${seconds} s · saved ${event.images.length} image(s)`, 1);
  if (event.status === "cancelled") setStatus("Cancelled", 0);
  if (event.status === "failed") {
    setStatus("Failed", 0);
    if (event.error) showError(event.error);
  }
  const results = event.images || [];
  results.slice().reverse().forEach(addToGallery);
  if (results.length) {
    select(results[0]);
    rememberResults(results);
  }
  if (state.view === "history") loadHistory();
}

async function cancel() {
  if (!state.job) return;
  setStatus("Cancelling…");
  try {
    await api(`/api/jobs/${state.job}/cancel`, { method: "POST" });
  } catch (error) {
    showError(error.message);
  }
}

// ---- gallery and details --------------------------------------------------------------------------

function seedOf(result) {
  const match = /Seed: (\d+)/.exec(result.parameters);
  return match ? match[1] : null;
}

// A thumbnail button for an image result ({url, parameters}); onClick runs when it is clicked.
function thumbButton(result, title, onClick) {
  const thumb = document.createElement("button");
  thumb.type = "button";
  thumb.className = "thumb";
  thumb.title = title;
  const image = document.createElement("img");
  image.src = result.url;
  image.loading = "lazy";
  image.alt = result.parameters.split("\n")[0];
  thumb.append(image);
  thumb.addEventListener("click", onClick);
  return thumb;
}

function addToGallery(result) {
  const thumb = thumbButton(result, result.name, () => select(result));
  thumb.dataset.url = result.url;
  $("gallery").prepend(thumb);
}

function select(result) {
  state.selected = result;
  for (const thumb of document.querySelectorAll("#gallery .thumb")) thumb.classList.toggle("selected", thumb.dataset.url === result.url);
  showImage(result.url);
  $("parameters").textContent = `${result.parameters}\n\nSaved as ${result.url.replace(/^\//, "")}`;
  $("download").href = result.url;
  $("download").download = result.name;
  $("details").hidden = false;
}

// ---- wiring -----------------------------------------------------------------------------------------

function wire() {
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("form").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) generate(event);
  });
  for (const tab of document.querySelectorAll(".tab[data-mode]")) tab.addEventListener("click", () => setMode(tab.dataset.mode));
  for (const tab of document.querySelectorAll(".view-tab")) tab.addEventListener("click", () => setView(tab.dataset.view));
  $("random-seed").addEventListener("click", () => { $("seed").value = -1; });
  $("reuse-seed").addEventListener("click", () => {
    const seed = state.selected && seedOf(state.selected);
    if (seed) $("seed").value = seed;
  });
  $("use-seed").addEventListener("click", () => $("reuse-seed").click());
  for (const [box, fold] of [["enable_hr", "hires-field"], ["xyz-enabled", "xyz-field"]]) {
    $(box).addEventListener("input", () => { if ($(box).checked) $(fold).open = true; });
  }
  $("preview").addEventListener("load", () => {
    const image = $("preview");
    image.classList.toggle("pixelated", image.naturalWidth < 256);
  });

  $("init-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (file) await setInitImage(await readFile(file)).catch((error) => showError(error.message));
  });
  $("remove-init").addEventListener("click", removeInitImage);
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) await setInitImage(await readFile(file)).catch((error) => showError(error.message));
  });

  const mask = $("mask");
  mask.addEventListener("pointerdown", (event) => {
    mask.setPointerCapture(event.pointerId);
    painting = maskPoint(event);
    paint(painting, painting);
  });
  mask.addEventListener("pointermove", (event) => {
    if (!painting) return;
    const point = maskPoint(event);
    paint(painting, point);
    painting = point;
  });
  for (const name of ["pointerup", "pointercancel"]) mask.addEventListener(name, () => { painting = null; });
  $("clear-mask").addEventListener("click", clearMask);
  $("mask-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (file) await uploadMask(file).catch((error) => showError(error.message));
  });
}

document.addEventListener("DOMContentLoaded", () => {
  wire();
  init().catch((error) => showError(`Could not load the server settings: ${error.message}`));
});
