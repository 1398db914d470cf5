// The Live tab: a drawing canvas or the webcam on the left, the diffused stream on the right (server/stream.py).
// One frame in flight at a time: the next frame is sent when the last comes back, so the FPS shown is real.
(() => {
  "use strict";
  const style = document.createElement("style");
  style.textContent = `
    #live { flex: 1; overflow-y: auto; padding: 16px 22px; display: flex; flex-direction: column; gap: 14px; }
    #live .live-form { display: flex; flex-wrap: wrap; gap: 10px; align-items: end; }
    #live label { display: flex; flex-direction: column; gap: 4px; color: var(--muted); font-size: 12px; }
    #live input, #live select { background: var(--panel-2); color: var(--text); border: 1px solid var(--line); border-radius: 6px; padding: 6px; }
    #live #live-prompt { width: 340px; }
    #live button { background: var(--accent); color: white; border: 0; border-radius: 6px; padding: 8px 16px; cursor: pointer; }
    #live button.ghost { background: none; border: 1px solid var(--line); color: var(--muted); }
    #live .views { display: flex; gap: 16px; flex-wrap: wrap; }
    #live canvas, #live video { width: 384px; height: 384px; image-rendering: pixelated; background: white; border-radius: 8px; }
    #live #live-draw { cursor: crosshair; touch-action: none; }
    #live-stats { color: var(--muted); font-variant-numeric: tabular-nums; }
  `;
  document.head.appendChild(style);

  const panel = document.createElement("section");
  panel.id = "live";
  panel.hidden = true;
  panel.innerHTML = `
    <div class="live-form">
      <label>Prompt <input id="live-prompt" value="a red circle above a blue square"></label>
      <label>Strength <input id="live-strength" type="range" min="0.1" max="1" step="0.05" value="0.5"></label>
      <label>Steps <select id="live-steps"><option>1</option><option selected>2</option><option>3</option><option>4</option></select></label>
      <label>Source <select id="live-source"><option value="draw">Drawing canvas</option><option value="webcam">Webcam</option></select></label>
      <label>Brush colour <input id="live-color" type="color" value="#e03030"></label>
      <button type="button" class="ghost" id="live-clear">Clear</button>
      <button type="button" id="live-start">Start</button>
    </div>
    <div class="views">
      <canvas id="live-draw" width="256" height="256"></canvas>
      <video id="live-video" autoplay playsinline muted hidden></video>
      <canvas id="live-output" width="256" height="256"></canvas>
    </div>
    <div id="live-stats">stopped</div>`;
  document.querySelector("main.layout").after(panel);
  const $ = id => document.getElementById(id);
  const draw = $("live-draw"), pen = draw.getContext("2d"), output = $("live-output").getContext("2d");
  const grab = document.createElement("canvas");
  let running = false, size = 64, times = [], webcam = null;

  function clear() { pen.fillStyle = "white"; pen.fillRect(0, 0, draw.width, draw.height); }
  clear();
  fetch("/api/config").then(r => r.json()).then(c => { size = c.default_size || 64; }).catch(() => {});

  $("live-open").addEventListener("click", () => {
    const open = panel.hidden;
    panel.hidden = !open;
    document.querySelector("main.layout").hidden = open;
    const learn = $("learn");
    if (learn && open) { learn.hidden = true; $("learn-open").classList.remove("active"); }
    $("live-open").classList.toggle("active", open);
    if (!open) stop();
  });
  $("live-clear").addEventListener("click", clear);

  let last = null;
  function point(event) {
    const box = draw.getBoundingClientRect();
    return [(event.clientX - box.left) * draw.width / box.width, (event.clientY - box.top) * draw.height / box.height];
  }
  draw.addEventListener("pointerdown", event => { last = point(event); draw.setPointerCapture(event.pointerId); });
  draw.addEventListener("pointerup", () => { last = null; });
  draw.addEventListener("pointermove", event => {
    if (!last) return;
    const next = point(event);
    pen.strokeStyle = $("live-color").value;
    pen.lineWidth = 28;
    pen.lineCap = "round";
    pen.beginPath();
    pen.moveTo(...last);
    pen.lineTo(...next);
    pen.stroke();
    last = next;
  });

  $("live-source").addEventListener("change", async () => {
    const useWebcam = $("live-source").value === "webcam";
    if (useWebcam && !webcam) {
      try {
        webcam = await navigator.mediaDevices.getUserMedia({ video: true });
        $("live-video").srcObject = webcam;
      } catch (error) {
        $("live-stats").textContent = `no webcam: ${error.message}`;
        $("live-source").value = "draw";
        return;
      }
    }
    $("live-video").hidden = !useWebcam;
    draw.hidden = useWebcam;
  });

  function frame() {
    grab.width = grab.height = size;
    const source = $("live-source").value === "webcam" ? $("live-video") : draw;
    grab.getContext("2d").drawImage(source, 0, 0, size, size);
    return new Promise(resolve => grab.toBlob(resolve, "image/png"));
  }

  async function loop() {
    while (running) {
      const params = new URLSearchParams({ prompt: $("live-prompt").value, strength: $("live-strength").value,
                                           steps: $("live-steps").value });
      const sent = performance.now();
      let response;
      try {
        response = await fetch(`/api/stream/frame?${params}`, { method: "POST", body: await frame() });
      } catch (error) {
        $("live-stats").textContent = `error: ${error.message}`;
        break;
      }
      if (!response.ok) {
        const detail = await response.json().catch(() => ({}));
        $("live-stats").textContent = `error: ${detail.detail || response.status}`;
        break;
      }
      const image = await createImageBitmap(await response.blob());
      output.imageSmoothingEnabled = false;
      output.drawImage(image, 0, 0, 256, 256);
      const now = performance.now();
      times.push(now);
      times = times.filter(t => now - t < 2000);
      const fps = times.length > 1 ? (times.length - 1) * 1000 / (now - times[0]) : 0;
      $("live-stats").textContent = `${fps.toFixed(1)} FPS · latency ${(now - sent).toFixed(0)} ms ` +
        `(server ${response.headers.get("X-Stream-Ms")} ms)`;
      window.dispatchEvent(new CustomEvent("live-frame"));
    }
    stop();
  }

  function stop() {
    running = false;
    $("live-start").textContent = "Start";
  }
  $("live-start").addEventListener("click", () => {
    if (running) { stop(); return; }
    running = true;
    times = [];
    $("live-start").textContent = "Stop";
    loop();
  });
})();
