// What survives a reload, in localStorage: every form field (prompt included), the model choice, the mode and
// view tabs, and the latest results shown in the gallery. Images to start from are not kept (too large).
"use strict";

const SETTINGS_KEY = "nanodiffusion.settings";
const RESULTS_KEY = "nanodiffusion.results";
const KEEP_RESULTS = 48;
let settingsRestored = false;

function keptFields() {
  return [...document.querySelectorAll("#form [id], #model-select")]
    .filter((field) => ["INPUT", "SELECT", "TEXTAREA"].includes(field.tagName) && field.type !== "file");
}

function readStore(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) || fallback;
  } catch {
    return fallback;
  }
}

function writeStore(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch {
    // storage full or disabled (private mode): the page works without it
  }
}

function saveSettings() {
  if (!settingsRestored) return;
  const fields = {};
  for (const field of keptFields()) fields[field.id] = field.type === "checkbox" ? field.checked : field.value;
  writeStore(SETTINGS_KEY, { fields, mode: state.mode, view: state.view });
}

function restoreField(field, value) {
  if (field.type === "checkbox") field.checked = Boolean(value);
  else if (field.tagName !== "SELECT" || [...field.options].some((o) => o.value === value)) field.value = value;
  field.dispatchEvent(new Event("input"));
}

// Put the saved fields and tabs back (after the selects are filled), then keep saving on every change.
function restoreSettings() {
  const saved = readStore(SETTINGS_KEY, {});
  for (const [id, value] of Object.entries(saved.fields || {})) {
    const field = document.getElementById(id);
    if (field && keptFields().includes(field)) restoreField(field, value);
  }
  readStore(RESULTS_KEY, []).slice().reverse().forEach(addToGallery);
  settingsRestored = true;
  setMode(saved.mode || state.mode);
  setView(saved.view || state.view);
}

function rememberResults(results) {
  const kept = readStore(RESULTS_KEY, []);
  const fresh = results.map(({ url, name, parameters }) => ({ url, name, parameters }));
  writeStore(RESULTS_KEY, [...fresh, ...kept].slice(0, KEEP_RESULTS));
}

function wireSettings() {
  for (const name of ["input", "change"]) document.addEventListener(name, saveSettings);
}

document.addEventListener("DOMContentLoaded", wireSettings);
