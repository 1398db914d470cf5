// Reading generation parameters: the PNG text chunks (tEXt, zTXt, iTXt) of a file, and the web UI's "parameters"
// text (prompt lines, "Negative prompt: ...", then "Steps: 20, Sampler: Euler a, ..." with JSON-quoted values).
"use strict";

const PNG_SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];
const SETTING = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;

function latin1(bytes) {
  let text = "";
  for (const byte of bytes) text += String.fromCharCode(byte);
  return text;
}

async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

async function textChunk(type, data) {
  const end = data.indexOf(0);
  if (end < 0) return null;
  const key = latin1(data.subarray(0, end));
  if (type === "tEXt") return [key, latin1(data.subarray(end + 1))];
  if (type === "zTXt") return [key, latin1(await inflate(data.subarray(end + 2)))];
  const compressed = data[end + 1] === 1;
  const language = data.indexOf(0, end + 3);
  const translated = data.indexOf(0, language + 1);
  if (language < 0 || translated < 0) return null;
  const body = data.subarray(translated + 1);
  return [key, new TextDecoder("utf-8").decode(compressed ? await inflate(body) : body)];
}

// All text chunks of a PNG file as {keyword: text}; throws a one-line error for a file that is not a PNG.
async function pngTexts(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  if (!PNG_SIGNATURE.every((byte, i) => bytes[i] === byte)) throw new Error(`${file.name || "that file"} is not a PNG`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const texts = {};
  for (let at = 8; at + 8 <= bytes.length;) {
    const length = view.getUint32(at);
    const type = latin1(bytes.subarray(at + 4, at + 8));
    const data = bytes.subarray(at + 8, at + 8 + length);
    if (type === "IEND") break;
    if (["tEXt", "zTXt", "iTXt"].includes(type)) {
      const chunk = await textChunk(type, data).catch(() => null);
      if (chunk) texts[chunk[0]] = chunk[1];
    }
    at += 12 + length;
  }
  return texts;
}

function settingValue(raw) {
  const value = raw.trim();
  if (!value.startsWith('"')) return value;
  try {
    return JSON.parse(value);
  } catch {
    return value;
  }
}

// The settings line "Key: value, Key: "quoted, value"" as an object (the web UI reads a line with >= 3 of them).
function parseSettings(line) {
  const settings = {};
  for (const match of line.matchAll(SETTING)) settings[match[1].trim()] = settingValue(match[2]);
  return Object.keys(settings).length >= 3 ? settings : null;
}

// A parameters text -> {prompt, negative, settings}, as the web UI's parse_generation_parameters reads it.
function parseInfotext(text) {
  const lines = text.trim().split("\n");
  const settings = parseSettings(lines[lines.length - 1]);
  if (settings) lines.pop();
  const prompt = [];
  const negative = [];
  let inNegative = false;
  for (const line of lines) {
    if (line.startsWith("Negative prompt:")) {
      inNegative = true;
      negative.push(line.slice("Negative prompt:".length).trim());
    } else {
      (inNegative ? negative : prompt).push(line);
    }
  }
  return { prompt: prompt.join("\n").trim(), negative: negative.join("\n").trim(), settings: settings || {} };
}
