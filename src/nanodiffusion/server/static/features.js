// Controls whose backend a server may lack: styles, model picker, hires fix. Each asks its endpoint once and stays
// hidden when the answer is an error (404 / 422 / 501) or an empty list, so the page works either way.
"use strict";

async function optional(path) {
  try {
    const response = await fetch(path);
    return response.ok ? await response.json() : null;
  } catch {
    return null;
  }
}

function names(list) {
  return Array.isArray(list) ? list.map((item) => item.name).filter(Boolean) : [];
}

function setupStyles(styles) {
  const list = names(styles);
  $("styles-field").hidden = !list.length;
  $("styles").replaceChildren(...list.map((name) => {
    const chip = document.createElement("label");
    chip.className = "chip";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.id = `style:${name}`;
    box.value = name;
    chip.append(box, ` ${name}`);
    return chip;
  }));
}

function setupModels(models, options) {
  const titles = Array.isArray(models) ? models.map((m) => m.title).filter(Boolean) : [];
  const select = $("model-select");
  select.hidden = titles.length < 2;
  $("model").hidden = !select.hidden;
  const current = options && options.sd_model_checkpoint;
  fillSelect(select, titles.map((t) => [t, t]), titles.includes(current) ? current : titles[0]);
}

// The model picker's title for an infotext's "Model" name (and hash), if the server has that model.
function modelTitleFor(name, hash) {
  const options = [...$("model-select").options].map((o) => o.value);
  return options.find((t) => hash && t.includes(`[${hash}`)) || options.find((t) => t === name || t.startsWith(`${name} [`));
}

function setupHires(config, latentModes, upscalers) {
  $("hires-field").hidden = !config.hires;
  const list = [...names(latentModes), ...names(upscalers).filter((n) => n !== "None")];
  $("hr-upscaler-field").hidden = !list.length;
  fillSelect($("hr_upscaler"), list.map((n) => [n, n]), list[0]);
}

async function setupFeatures(config) {
  const [styles, models, options, latentModes, upscalers] = await Promise.all([
    optional("/sdapi/v1/prompt-styles"), optional("/sdapi/v1/sd-models"), optional("/sdapi/v1/options"),
    optional("/sdapi/v1/latent-upscale-modes"), optional("/sdapi/v1/upscalers")]);
  setupStyles(styles);
  setupModels(models, options);
  setupHires(config, latentModes, upscalers);
}

// Request fields of the optional controls that are shown: styles, the chosen model.
function featurePayload() {
  const body = {};
  const styles = [...document.querySelectorAll("#styles input:checked")].map((box) => box.value);
  if (styles.length) body.styles = styles;
  if (!$("model-select").hidden && $("model-select").value) {
    body.override_settings = { sd_model_checkpoint: $("model-select").value };
  }
  return body;
}

// The web UI's txt2img hires-fix fields, when the hires fix is offered and on.
function hiresPayload() {
  if ($("hires-field").hidden || !$("enable_hr").checked) return {};
  const body = { enable_hr: true, hr_scale: +$("hr_scale").value, hr_second_pass_steps: +$("hr_second_pass_steps").value,
    denoising_strength: +$("hr_denoise").value };
  if (!$("hr-upscaler-field").hidden) body.hr_upscaler = $("hr_upscaler").value;
  return body;
}
