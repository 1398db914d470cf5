// The X/Y/Z plot panel: when on, Generate posts the form plus its axes to /api/xyz (server/web.py), which queues
// one job that draws a labelled grid; the grid comes back like any result.
"use strict";

const AXIS_LABELS = { steps: "Steps", cfg: "CFG scale", sampler: "Sampler", schedule: "Schedule type", seed: "Seed",
  strength: "Denoising", width: "Width", height: "Height", prompt_sr: "Prompt S/R" };
const AXIS_DEFAULTS = { x: "steps", y: "cfg", z: "" };

function setupPlot(config) {
  $("xyz-field").hidden = !config.xyz;
  const axes = (config.xyz_axes || []).map((name) => [name, AXIS_LABELS[name] || name]);
  for (const [letter, chosen] of Object.entries(AXIS_DEFAULTS)) {
    const choices = letter === "x" ? axes : [["", "Nothing"], ...axes];
    fillSelect($(`xyz-${letter}-name`), choices, chosen);
  }
}

// The axes to send when the plot is on ({axes, stack}), or null; throws a one-line error for an empty X axis.
function plotPayload() {
  if ($("xyz-field").hidden || !$("xyz-enabled").checked) return null;
  const axes = [];
  for (const letter of Object.keys(AXIS_DEFAULTS)) {
    const name = $(`xyz-${letter}-name`).value;
    const values = $(`xyz-${letter}-values`).value.trim();
    if (name && values) axes.push({ name, values });
    else if (letter === "x") throw new Error("Give the X axis some values, like 10, 20, 30 or 1-5.");
  }
  return { axes, stack: $("xyz-stack").checked };
}
