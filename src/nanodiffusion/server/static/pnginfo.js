// The PNG info view: drop a PNG (here or anywhere on the page) to read its parameters, then send them to
// txt2img / img2img, restoring the form's fields. Results and history items are sent the same way.
"use strict";

const SCHEDULE_SUFFIXES = ["Karras", "Exponential"];

function setField(id, value) {
  if (value === undefined || value === null || value === "") return;
  const field = $(id);
  if (field.tagName === "SELECT") {
    const wanted = String(value).toLowerCase();
    const option = [...field.options].find((o) => o.value.toLowerCase() === wanted || o.text.toLowerCase() === wanted);
    if (!option) return;
    field.value = option.value;
  } else {
    field.value = value;
  }
  field.dispatchEvent(new Event("input", { bubbles: true }));
}

function splitSampler(name) {
  const suffix = SCHEDULE_SUFFIXES.find((s) => name.endsWith(` ${s}`));
  return suffix ? [name.slice(0, -suffix.length - 1), suffix] : [name, undefined];
}

// Fill the form from a parsed parameters text ({prompt, negative, settings}); fields it does not name stay.
function applyParameters(parsed) {
  const s = parsed.settings;
  $("prompt").value = parsed.prompt;
  $("negative").value = parsed.negative;
  const [sampler, schedule] = splitSampler(s.Sampler || "");
  setField("sampler", sampler);
  setField("schedule", s["Schedule type"] || schedule || (s.Sampler ? "automatic" : undefined));
  setField("steps", s.Steps);
  setField("cfg", s["CFG scale"]);
  setField("seed", s.Seed);
  const size = /^(\d+)x(\d+)$/.exec(s.Size || "");
  if (size) [$("width").value, $("height").value] = [size[1], size[2]];
  const hires = s["Hires upscale"] !== undefined;
  $("enable_hr").checked = hires;
  if (hires) {
    setField("hr_scale", s["Hires upscale"]);
    setField("hr_second_pass_steps", s["Hires steps"] || 0);
    setField("hr_upscaler", s["Hires upscaler"]);
    setField("hr_denoise", s["Denoising strength"]);
  } else {
    setField("strength", s["Denoising strength"]);
  }
  setField("n_iter", 1);
  if (s.Model) setField("model-select", modelTitleFor(s.Model, s["Model hash"]));
  $("form").dispatchEvent(new Event("change", { bubbles: true }));
}

// Restore a parameters text into txt2img or img2img (with the image as the init image for img2img).
async function sendParameters(text, mode, imageUrl) {
  applyParameters(parseInfotext(text));
  if (mode === "img2img" && imageUrl) {
    const blob = await (await fetch(imageUrl)).blob();
    await setInitImage(await readFile(blob));
  }
  setMode(mode);
  showError("");
}

async function readPngInfo(file) {
  setView("pnginfo");
  const text = $("pnginfo-text");
  text.hidden = false;
  $("pnginfo-actions").hidden = true;
  state.pngInfo = null;
  try {
    const parameters = (await pngTexts(file)).parameters;
    const image = await readFile(file);
    $("pnginfo-image").src = image;
    $("pnginfo-image").hidden = false;
    if (!parameters) {
      text.textContent = `${file.name || "This PNG"} has no "parameters" text: it was not made by a Stable Diffusion UI.`;
      return;
    }
    state.pngInfo = { parameters, image };
    text.textContent = parameters;
    $("pnginfo-actions").hidden = false;
  } catch (error) {
    text.textContent = error.message;
  }
}

function wirePngInfo() {
  $("pnginfo-file").addEventListener("change", (event) => {
    if (event.target.files[0]) readPngInfo(event.target.files[0]);
  });
  for (const mode of ["txt2img", "img2img"]) {
    $(`pnginfo-${mode}`).addEventListener("click", () => {
      if (state.pngInfo) sendParameters(state.pngInfo.parameters, mode, state.pngInfo.image).catch((e) => showError(e.message));
    });
    $(`to-${mode}`).addEventListener("click", () => {
      if (state.selected) sendParameters(state.selected.parameters, mode, state.selected.url).catch((e) => showError(e.message));
    });
  }
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file && !event.target.closest("#drop")) readPngInfo(file);
  });
}

document.addEventListener("DOMContentLoaded", wirePngInfo);
