// The Learn tab: watch the loaded model denoise step by step (x_t, x0 estimate, noise estimate, sigma schedule,
// per-token cross-attention) and compare CFG scales and samplers. Talks to server/learn.py.
(() => {
  "use strict";
  const LESSON = name => `/learn/docs/${name}.md`;
  const style = document.createElement("style");
  style.textContent = `
    .learn-open { background: none; border: 1px solid var(--line); border-radius: 6px; padding: 4px 10px; cursor: pointer; }
    .learn-open.active { color: var(--text); border-color: var(--accent); }
    #learn { flex: 1; overflow-y: auto; padding: 16px 22px; display: flex; flex-direction: column; gap: 14px; }
    #learn .learn-form { display: flex; flex-wrap: wrap; gap: 10px; align-items: end; }
    #learn label { display: flex; flex-direction: column; gap: 4px; color: var(--muted); font-size: 12px; }
    #learn input, #learn select { background: var(--panel-2); color: var(--text); border: 1px solid var(--line); border-radius: 6px; padding: 6px; }
    #learn #learn-prompt { width: 340px; }
    #learn button.run { background: var(--accent); color: white; border: 0; border-radius: 6px; padding: 8px 16px; cursor: pointer; }
    #learn .views { display: flex; flex-wrap: wrap; gap: 16px; }
    #learn figure { margin: 0; background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 8px; }
    #learn figure img { width: 192px; height: 192px; image-rendering: pixelated; display: block; }
    #learn figcaption { font-size: 12px; color: var(--muted); margin-top: 6px; max-width: 192px; }
    #learn figcaption a { color: var(--accent-2); }
    #learn code { font-size: 11px; }
    #learn .tokens { display: flex; flex-wrap: wrap; gap: 6px; }
    #learn .learn-token { background: var(--panel-2); color: var(--text); border: 1px solid var(--line); border-radius: 12px; padding: 3px 10px; cursor: pointer; }
    #learn .learn-token.active { border-color: var(--accent); background: var(--accent); }
    #learn .strip { display: flex; gap: 8px; flex-wrap: wrap; }
    #learn .strip img { width: 128px; height: 128px; image-rendering: pixelated; }
    #learn-status { color: var(--muted); }
  `;
  document.head.appendChild(style);

  const panel = document.createElement("section");
  panel.id = "learn";
  panel.hidden = true;
  panel.innerHTML = `
    <div class="learn-form">
      <label>Prompt <input id="learn-prompt" value="a red circle above a blue square"></label>
      <label>Steps <input id="learn-steps" type="number" min="1" max="50" value="20"></label>
      <label>Seed <input id="learn-seed" type="number" min="0" value="0"></label>
      <label>CFG <input id="learn-cfg" type="number" min="0" max="30" step="0.5" value=""></label>
      <label>Sampler <select id="learn-sampler">
        <option>Euler</option><option>Euler a</option><option>Heun</option><option>DPM++ 2M</option>
        <option>DDIM</option><option>UniPC</option></select></label>
      <button type="button" class="run" id="learn-run">Denoise step by step</button>
      <span id="learn-status">Pick a prompt and watch the model denoise it.</span>
    </div>
    <div id="learn-result" hidden>
      <label>Step <output id="learn-step-value"></output>
        <input id="learn-step" type="range" min="1" max="20" value="1" style="width: 420px"></label>
      <div class="views">
        <figure><img id="learn-xt" alt="x_t"><figcaption>x<sub>t</sub> entering the step (decoded)
          <a href="${LESSON("forward")}" target="_blank">lesson</a> <code>schedules.py</code></figcaption></figure>
        <figure><img id="learn-x0" alt="x0 estimate"><figcaption>predicted x&#770;<sub>0</sub> = D(x<sub>t</sub>, &sigma;)
          <a href="${LESSON("ddpm-2d")}" target="_blank">lesson</a> <code>denoisers.py:Denoiser</code></figcaption></figure>
        <figure><img id="learn-eps" alt="noise estimate"><figcaption>predicted noise (x<sub>t</sub> &minus; x&#770;<sub>0</sub>)/&sigma;, latent channels 0-2
          <a href="${LESSON("sde-ode")}" target="_blank">lesson</a> <code>samplers.py</code></figcaption></figure>
        <figure><canvas id="learn-sigmas" width="260" height="192"></canvas><figcaption>the sigma schedule, this step marked
          <a href="${LESSON("forward")}" target="_blank">lesson</a> <code>schedules.py:NoiseSchedule.sigmas</code></figcaption></figure>
        <figure><img id="learn-attention" alt="cross-attention"><figcaption>cross-attention of <b id="learn-token-name"></b>
          <a href="${LESSON("attention")}" target="_blank">lesson</a> <code>models/attention_maps.py</code></figcaption></figure>
      </div>
      <div class="tokens" id="learn-tokens"></div>
      <figure><figcaption>Final image</figcaption><img id="learn-final" alt="final image"></figure>
    </div>
    <div class="learn-form">
      <button type="button" class="run" id="learn-cfg-strip">CFG scale strip</button>
      <button type="button" class="run" id="learn-sampler-strip">Sampler strip</button>
      <span><a href="${LESSON("cfg")}" target="_blank">CFG lesson</a> &middot; <code>guidance.py:cfg_denoiser</code>
        &middot; <a href="${LESSON("sde-ode")}" target="_blank">samplers lesson</a> &middot; <code>samplers.py</code></span>
    </div>
    <div class="strip" id="learn-strip"></div>`;
  document.querySelector("main.layout").after(panel);

  const $ = id => document.getElementById(id);
  const learn = { steps: [], tokens: [], token: 0, sigmas: [] };

  $("learn-open").addEventListener("click", () => {
    const open = panel.hidden;
    panel.hidden = !open;
    document.querySelector("main.layout").hidden = open;
    $("learn-open").classList.toggle("active", open);
  });

  function body() {
    const cfg = $("learn-cfg").value;
    return {
      prompt: $("learn-prompt").value, steps: Number($("learn-steps").value), seed: Number($("learn-seed").value),
      cfg_scale: cfg === "" ? null : Number(cfg), sampler_name: $("learn-sampler").value,
    };
  }

  async function post(url) {
    const response = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
                                        body: JSON.stringify(body()) });
    const data = await response.json();
    if (!response.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
    return data;
  }

  function drawSigmas(current) {
    const canvas = $("learn-sigmas"), ctx = canvas.getContext("2d");
    const s = learn.sigmas, w = canvas.width, h = canvas.height, pad = 24;
    ctx.clearRect(0, 0, w, h);
    if (!s.length) return;
    const logs = s.map(v => Math.log(Math.max(v, 1e-3))), lo = Math.min(...logs), hi = Math.max(...logs);
    const x = i => pad + (w - 2 * pad) * (s.length > 1 ? i / (s.length - 1) : 0.5);
    const y = v => h - pad - (h - 2 * pad) * (hi > lo ? (Math.log(Math.max(v, 1e-3)) - lo) / (hi - lo) : 0.5);
    ctx.strokeStyle = "#8b93a5"; ctx.beginPath();
    s.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
    ctx.stroke();
    s.forEach((v, i) => { ctx.fillStyle = i === current ? "#ff5c7a" : "#a392ff";
      ctx.beginPath(); ctx.arc(x(i), y(v), i === current ? 5 : 2.5, 0, 2 * Math.PI); ctx.fill(); });
    ctx.fillStyle = "#e6e8ee"; ctx.font = "11px sans-serif";
    ctx.fillText(`sigma = ${s[current].toFixed(3)} (log scale)`, pad, 14);
  }

  function show(index) {
    const step = learn.steps[index];
    if (!step) return;
    $("learn-step-value").textContent = `${step.step} / ${learn.steps.length}`;
    $("learn-xt").src = step.x_t; $("learn-x0").src = step.x0; $("learn-eps").src = step.eps;
    const attention = step.attention[learn.token];
    $("learn-attention").src = attention || "";
    $("learn-token-name").textContent = learn.tokens.length ? `"${learn.tokens[learn.token]}"` : "(no tokens)";
    drawSigmas(index);
  }

  function pickToken(k) {
    learn.token = k;
    document.querySelectorAll(".learn-token").forEach((b, i) => b.classList.toggle("active", i === k));
    show(Number($("learn-step").value) - 1);
  }

  $("learn-step").addEventListener("input", () => show(Number($("learn-step").value) - 1));

  $("learn-run").addEventListener("click", async () => {
    $("learn-status").textContent = "Denoising…";
    try {
      const data = await post("/api/learn/steps");
      Object.assign(learn, { steps: data.steps, tokens: data.tokens, sigmas: data.sigmas, token: 0 });
      $("learn-final").src = data.image;
      $("learn-step").max = String(data.steps.length);
      $("learn-step").value = "1";
      $("learn-tokens").replaceChildren(...data.tokens.map((text, k) => {
        const button = document.createElement("button");
        button.type = "button"; button.className = "learn-token"; button.textContent = text;
        button.addEventListener("click", () => pickToken(k));
        return button;
      }));
      $("learn-result").hidden = false;
      pickToken(0);
      $("learn-status").textContent = `Done: ${data.steps.length} steps. Drag the slider to scrub.`;
    } catch (error) {
      $("learn-status").textContent = `Error: ${error.message}`;
    }
  });

  async function strip(kind) {
    $("learn-status").textContent = `Generating the ${kind} strip…`;
    try {
      const data = await post(`/api/learn/strip/${kind}`);
      $("learn-strip").replaceChildren(...data.images.map(item => {
        const figure = document.createElement("figure");
        figure.innerHTML = `<img alt=""><figcaption></figcaption>`;
        figure.querySelector("img").src = item.image;
        figure.querySelector("figcaption").textContent = item.label;
        return figure;
      }));
      $("learn-status").textContent = `Done: ${kind} strip.`;
    } catch (error) {
      $("learn-status").textContent = `Error: ${error.message}`;
    }
  }
  $("learn-cfg-strip").addEventListener("click", () => strip("cfg"));
  $("learn-sampler-strip").addEventListener("click", () => strip("sampler"));
})();
