// lookalike web page: query by file, drag-and-drop, paste or live camera; show the matches.
// Plain ES2020, no inline code (the page runs under a strict Content-Security-Policy).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    ready: $("ready"),
    dropZone: $("drop-zone"),
    dropHint: $("drop-hint"),
    queryImage: $("query-image"),
    video: $("camera-video"),
    fileInput: $("file-input"),
    cameraStart: $("camera-start"),
    cameraStop: $("camera-stop"),
    form: $("options"),
    k: $("k"),
    minScore: $("min-score"),
    interval: $("interval"),
    cameraStats: $("camera-stats"),
    rate: $("rate"),
    latency: $("latency"),
    cameraError: $("camera-error"),
    status: $("status"),
    noMatch: $("no-match"),
    noMatchDetail: $("no-match-detail"),
    results: $("results"),
  };

  const SMOOTH_FRAMES = 5;      // camera: vote over the last N frames
  const CAMERA_BUDGET_MS = 150; // camera: a frame's time budget for the server's second looks (its CAMERA_BUDGET_MS)
  const FRAME_LONGEST_SIDE = 384;
  const RATE_WINDOW_MS = 3000;  // camera: queries/s over the last few seconds
  const SHOWN_FIELDS = new Set(["title", "location"]);

  // ---- small helpers ------------------------------------------------------------------

  function setStatus(text, kind = "") {
    const cls = "message" + (kind ? " " + kind : "");
    if (el.status.textContent !== text) el.status.textContent = text;
    if (el.status.className !== cls) el.status.className = cls;
  }

  function options() {
    const asked = Number(el.k.value); // "1e2" is 100, "0" is at least 1 (parseInt read them as 1 and 5)
    const k = el.k.value.trim() === "" || !Number.isFinite(asked) ? 5 : Math.max(1, Math.min(100, Math.round(asked)));
    const raw = el.minScore.value.trim();
    const minScore = raw === "" ? null : Number(raw);
    return { k, minScore: Number.isFinite(minScore) ? minScore : null };
  }

  function searchUrl(k, minScore, extra) {
    const url = new URL("search", document.baseURI);
    url.searchParams.set("k", String(k));
    if (minScore !== null) url.searchParams.set("min_score", String(minScore));
    for (const [key, value] of Object.entries(extra || {})) url.searchParams.set(key, value);
    return url;
  }

  // A hit that geometric verification confirmed (the index has local features): say so.
  function verifiedText(hit) {
    return hit.verified === true ? ` · verified (${Number(hit.inliers)} matching points)` : "";
  }

  class ApiError extends Error {}

  // POST one image to /search; resolves to the parsed JSON, rejects with a readable ApiError.
  async function postSearch(blob, filename, k, minScore, signal, extra) {
    const body = new FormData();
    body.append("file", blob, filename);
    let response;
    try {
      response = await fetch(searchUrl(k, minScore, extra), { method: "POST", body, signal });
    } catch (err) {
      if (err && err.name === "AbortError") throw err;
      throw new ApiError("Could not reach the server: " + (err && err.message ? err.message : err));
    }
    let data = null;
    const text = await response.text();
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null;
    }
    if (!response.ok) {
      if (response.status === 503) checkReady(); // the index went away: say so at the top too
      let msg = `The server said ${response.status}${response.statusText ? " " + response.statusText : ""}`;
      if (data && (data.error || data.detail)) {
        const detail = typeof data.detail === "string" ? data.detail : data.detail ? JSON.stringify(data.detail) : "";
        msg = [data.error, detail].filter(Boolean).join(": ");
      } else if (text && text.length < 300) {
        msg += ": " + text;
      }
      throw new ApiError(msg);
    }
    if (!data || !Array.isArray(data.results)) throw new ApiError("Unexpected answer from the server.");
    return data;
  }

  function fmtScore(x) {
    return typeof x === "number" && Number.isFinite(x) ? x.toFixed(3) : "–";
  }

  function fmtMs(ms) {
    return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : Math.round(ms) + " ms";
  }

  // ---- results grid (cells are keyed by item id and reused, so nothing flickers) ----------

  const cells = new Map(); // id -> <li>

  function makeCell(id) {
    const li = document.createElement("li");
    li.className = "hit";
    li.dataset.id = id;
    const figure = document.createElement("div");
    figure.className = "thumb-box";
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = "";
    img.loading = "lazy";
    img.decoding = "async";
    img.addEventListener("error", () => li.classList.add("no-thumb"));
    img.addEventListener("load", () => li.classList.remove("no-thumb"));
    figure.append(img);
    const rank = document.createElement("span");
    rank.className = "rank";
    figure.append(rank);
    const body = document.createElement("div");
    body.className = "hit-body";
    const title = document.createElement("h3");
    title.className = "title";
    const score = document.createElement("p");
    score.className = "score";
    const location = document.createElement("p");
    location.className = "location";
    const meta = document.createElement("dl");
    meta.className = "meta";
    body.append(title, score, location, meta);
    li.append(figure, body);
    return li;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function updateCell(li, hit, rank, scoreText) {
    const img = li.querySelector(".thumb");
    const src = hit.image_url ? new URL(hit.image_url, document.baseURI).href : "";
    if (src && img.src !== src) img.src = src;
    if (!src) li.classList.add("no-thumb");
    const md = hit.metadata && typeof hit.metadata === "object" ? hit.metadata : {};
    const title = md.title != null && md.title !== "" ? String(md.title) : String(hit.id);
    img.alt = title;
    setText(li.querySelector(".rank"), String(rank));
    setText(li.querySelector(".title"), title);
    li.querySelector(".title").title = title; // shortened to three lines on the card
    setText(li.querySelector(".score"), scoreText);
    const loc = li.querySelector(".location");
    const locText = md.location != null && md.location !== "" ? String(md.location) : "";
    setText(loc, locText);
    loc.hidden = !locText;
    const pairs = [["id", String(hit.id)]];
    for (const [key, value] of Object.entries(md)) {
      if (SHOWN_FIELDS.has(key) || value === null || value === undefined || value === "") continue;
      pairs.push([key, typeof value === "object" ? JSON.stringify(value) : String(value)]);
    }
    const signature = JSON.stringify(pairs);
    const dl = li.querySelector(".meta");
    if (dl.dataset.signature !== signature) {
      dl.dataset.signature = signature;
      const frag = document.createDocumentFragment();
      for (const [key, value] of pairs) {
        const div = document.createElement("div");
        div.className = "field";
        div.dataset.field = key;
        const dt = document.createElement("dt");
        dt.textContent = key;
        const dd = document.createElement("dd");
        dd.textContent = value;
        dd.title = value;
        div.append(dt, dd);
        frag.append(div);
      }
      dl.replaceChildren(frag);
    }
    li.dataset.rank = String(rank);
  }

  // rows: [{hit, scoreText}] in rank order. Reuses and reorders existing cells in place.
  function renderHits(rows) {
    const keep = new Set();
    rows.forEach((row, i) => {
      const id = String(row.hit.id);
      keep.add(id);
      let li = cells.get(id);
      if (!li) {
        li = makeCell(id);
        cells.set(id, li);
      }
      updateCell(li, row.hit, i + 1, row.scoreText);
      const at = el.results.children[i];
      if (at !== li) el.results.insertBefore(li, at || null);
    });
    for (const [id, li] of cells) {
      if (!keep.has(id)) {
        li.remove();
        cells.delete(id);
      }
    }
  }

  function showNoMatch(on, minScore) {
    el.noMatch.hidden = !on;
    el.noMatchDetail.textContent = on
      ? minScore !== null
        ? `Nothing in the catalog scored ${minScore} or more. Lower the min score to see the closest items.`
        : "The catalog returned nothing for this image."
      : "";
  }

  function clearResults() {
    renderHits([]);
    showNoMatch(false, null);
  }

  // ---- one-shot search: file picker, drop, paste ----------------------------------------

  let searchSeq = 0;
  let searchAbort = null;
  let lastQuery = null; // {blob, name} to re-run when k / min score change
  let queryUrl = null;

  el.queryImage.addEventListener("error", () => {
    // not a picture the browser can show (the server will say what is wrong with it)
    el.queryImage.hidden = true;
    if (!camera.running && !lastQuery) el.dropHint.hidden = false; // not beside the matches of a query (e.g. a TIFF)
  });

  function showQueryImage(blob) {
    if (queryUrl) URL.revokeObjectURL(queryUrl);
    queryUrl = URL.createObjectURL(blob);
    el.queryImage.src = queryUrl;
    el.queryImage.hidden = false;
    el.dropHint.hidden = true;
  }

  async function searchImage(blob, name) {
    if (camera.running) stopCamera();
    lastQuery = { blob, name };
    showQueryImage(blob);
    const { k, minScore } = options();
    const seq = ++searchSeq;
    if (searchAbort) searchAbort.abort();
    searchAbort = new AbortController();
    setStatus(`Searching for ${name}…`, "busy");
    const t0 = performance.now();
    try {
      const data = await postSearch(blob, name, k, minScore, searchAbort.signal);
      if (seq !== searchSeq) return;
      const ms = performance.now() - t0;
      const hits = (data.results[0] && data.results[0].hits) || [];
      renderHits(hits.map((hit) => ({ hit, scoreText: "score " + fmtScore(hit.score) + verifiedText(hit) })));
      showNoMatch(hits.length === 0, minScore);
      const took = typeof data.took_ms === "number" ? ` (server ${fmtMs(data.took_ms)})` : "";
      setStatus(
        hits.length ? `${hits.length} match${hits.length === 1 ? "" : "es"} for ${name} in ${fmtMs(ms)}${took}.` : `No match for ${name}.`,
        hits.length ? "" : "warn",
      );
    } catch (err) {
      if (err && err.name === "AbortError") return;
      if (seq !== searchSeq) return;
      clearResults();
      setStatus(err instanceof ApiError ? err.message : "Something went wrong: " + err, "error");
    }
  }

  function imageFromList(files, items) {
    if (files && files.length) {
      for (const f of files) if (!f.type || f.type.startsWith("image/")) return f;
      return files[0];
    }
    if (items) {
      for (const item of items) {
        if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
      }
    }
    return null;
  }

  el.fileInput.addEventListener("change", () => {
    const file = el.fileInput.files && el.fileInput.files[0];
    if (file) searchImage(file, file.name || "image");
    el.fileInput.value = ""; // choosing the same file again searches again
  });

  // Drag and drop anywhere on the page.
  let dragDepth = 0;
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
  document.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth += 1;
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    dragDepth = 0;
    document.body.classList.remove("dragging");
    const file = e.dataTransfer && imageFromList(e.dataTransfer.files, e.dataTransfer.items);
    if (file) searchImage(file, file.name || "dropped image");
    else {
      clearResults(); // the matches on screen are not of what was dropped
      setStatus("That was not an image file: drop a photo (JPEG, PNG, …).", "error");
    }
  });

  // Paste an image from the clipboard.
  document.addEventListener("paste", (e) => {
    const cd = e.clipboardData;
    if (!cd) return;
    const file = imageFromList(cd.files, cd.items);
    if (!file) return; // pasted text into a field: leave it alone
    e.preventDefault();
    searchImage(file, file.name && file.name !== "image.png" ? file.name : "pasted image");
  });

  // k / min score changed: run the last still query again (the camera picks them up by itself).
  let optionsTimer = 0;
  el.form.addEventListener("submit", (e) => e.preventDefault());
  for (const input of [el.k, el.minScore]) {
    input.addEventListener("change", () => {
      clearTimeout(optionsTimer);
      optionsTimer = setTimeout(() => {
        if (!camera.running && lastQuery) searchImage(lastQuery.blob, lastQuery.name);
      }, 150);
    });
  }

  // ---- live camera ------------------------------------------------------------------------

  const camera = {
    running: false,
    stream: null,
    timer: 0,
    inFlight: false,
    frames: [],      // last SMOOTH_FRAMES frames: arrays of hits
    done: [],        // completion times (performance.now()) of answered queries
    answered: 0,     // queries answered since the camera started
    startedAt: 0,
    canvas: document.createElement("canvas"),
    session: 0,
  };

  function cameraErrorMessage(err) {
    const name = (err && err.name) || "Error";
    const message = (err && err.message) || String(err);
    switch (name) {
      case "NotAllowedError":
      case "PermissionDeniedError":
      case "SecurityError":
        return "Camera permission was denied. Allow camera access for this page in your browser's site settings (the camera icon next to the address), then press Start camera again.";
      case "NotFoundError":
      case "DevicesNotFoundError":
      case "OverconstrainedError":
        return "No camera was found on this device. Plug one in or use a phone, or search with a photo instead.";
      case "NotReadableError":
      case "TrackStartError":
      case "AbortError":
        return `The camera could not be started: it may be in use by another app (${name}: ${message}).`;
      default:
        return `The camera could not be started (${name}: ${message}).`;
    }
  }

  function showCameraError(text) {
    el.cameraError.textContent = text;
    el.cameraError.hidden = !text;
  }

  function insecureMessage() {
    const origin = location.origin && location.origin !== "null" ? location.origin : location.href;
    return (
      `The camera needs a secure page, and ${origin} is not one, so this browser hides the camera. ` +
      "Open the page on https:// or on http://localhost (or 127.0.0.1) on this computer. " +
      "On a phone, reach the server through an https tunnel, or run `lookalike serve --host 0.0.0.0` behind a reverse proxy with TLS."
    );
  }

  async function openCamera() {
    try {
      return await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
    } catch (err) {
      // Permission refusals are final; anything else: try again with whatever camera there is.
      if (err && (err.name === "NotAllowedError" || err.name === "SecurityError")) throw err;
      return await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
    }
  }

  async function startCamera() {
    showCameraError("");
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showCameraError(
        window.isSecureContext
          ? "This browser does not offer camera access (navigator.mediaDevices is missing). Try a current Chrome, Firefox or Safari."
          : insecureMessage(),
      );
      return;
    }
    if (camera.running) return;
    el.cameraStart.disabled = true;
    setStatus("Asking for the camera…", "busy");
    let stream;
    try {
      stream = await openCamera();
    } catch (err) {
      el.cameraStart.disabled = false;
      showCameraError(cameraErrorMessage(err));
      setStatus("Camera unavailable: search with a photo instead.", "warn");
      return;
    }
    if (searchAbort) searchAbort.abort();
    searchSeq += 1;
    camera.session += 1;
    camera.stream = stream;
    camera.running = true;
    camera.inFlight = false;
    camera.frames = [];
    camera.done = [];
    camera.answered = 0;
    camera.startedAt = performance.now();
    lastQuery = null;
    el.video.srcObject = stream;
    el.video.hidden = false;
    el.queryImage.hidden = true;
    el.dropHint.hidden = true;
    el.cameraStart.hidden = true;
    el.cameraStart.disabled = false;
    el.cameraStop.hidden = false;
    el.cameraStats.hidden = false;
    el.rate.textContent = "0.0 queries/s";
    el.rate.dataset.rate = "0";
    el.rate.dataset.queries = "0";
    el.latency.textContent = "–";
    document.body.classList.add("camera-on");
    el.video.play().catch(() => {}); // autoplay attribute covers it; some browsers want the call
    clearResults();
    setStatus("Camera on: point it at a thing.", "");
    for (const track of stream.getVideoTracks()) {
      track.addEventListener("ended", () => {
        if (camera.stream === stream) {
          stopCamera();
          showCameraError("The camera stopped (it was unplugged or taken by another app).");
        }
      });
    }
    schedule();
  }

  function schedule() {
    clearInterval(camera.timer);
    const every = Math.max(50, parseInt(el.interval.value, 10) || 250);
    camera.timer = setInterval(tick, every);
    tick();
  }

  function stopCamera() {
    if (!camera.running && !camera.stream) return;
    camera.running = false;
    camera.session += 1;
    clearInterval(camera.timer);
    if (camera.stream) for (const track of camera.stream.getTracks()) track.stop();
    camera.stream = null;
    el.video.srcObject = null;
    el.video.hidden = true;
    el.cameraStop.hidden = true;
    el.cameraStart.hidden = false;
    el.cameraStart.disabled = false;
    document.body.classList.remove("camera-on");
    if (el.queryImage.src && !el.queryImage.hidden) el.dropHint.hidden = true;
    else el.dropHint.hidden = false;
    setStatus("Camera stopped.", "");
  }

  function grabFrame() {
    const v = el.video;
    const w0 = v.videoWidth;
    const h0 = v.videoHeight;
    const scale = Math.min(1, FRAME_LONGEST_SIDE / Math.max(w0, h0));
    const w = Math.max(1, Math.round(w0 * scale));
    const h = Math.max(1, Math.round(h0 * scale));
    const c = camera.canvas;
    if (c.width !== w) c.width = w;
    if (c.height !== h) c.height = h;
    c.getContext("2d").drawImage(v, 0, 0, w, h);
    return new Promise((resolve, reject) =>
      c.toBlob((b) => (b ? resolve(b) : reject(new Error("could not encode the frame"))), "image/jpeg", 0.8),
    );
  }

  function updateRate(now) {
    camera.done = camera.done.filter((t) => now - t <= RATE_WINDOW_MS);
    const span = Math.min(RATE_WINDOW_MS, Math.max(now - camera.startedAt, 1)) / 1000;
    const rate = camera.done.length / span;
    el.rate.textContent = rate.toFixed(1) + " queries/s";
    el.rate.dataset.rate = rate.toFixed(2);
  }

  // Smooth over the last frames: rank by summed score (a missing frame adds 0), show the top k.
  function smoothed(k) {
    const votes = new Map();
    for (const hits of camera.frames) {
      for (const hit of hits) {
        const id = String(hit.id);
        const v = votes.get(id) || { hit, sum: 0, n: 0 };
        v.hit = hit; // newest metadata wins
        v.sum += typeof hit.score === "number" ? hit.score : 0;
        v.n += 1;
        votes.set(id, v);
      }
    }
    const frames = Math.max(1, camera.frames.length);
    return Array.from(votes.values())
      .sort((a, b) => b.sum - a.sum || b.n - a.n)
      .slice(0, k)
      .map((v) => ({
        hit: v.hit,
        scoreText: `score ${fmtScore(v.sum / frames)} · in ${v.n}/${frames} frames` + verifiedText(v.hit),
        votes: v,
      }));
  }

  async function tick() {
    const now = performance.now();
    if (camera.running) updateRate(now);
    if (!camera.running || camera.inFlight || document.hidden) return;
    const v = el.video;
    if (v.readyState < 2 || !v.videoWidth || !v.videoHeight) return;
    const session = camera.session;
    const { k, minScore } = options();
    camera.inFlight = true;
    const t0 = performance.now();
    try {
      const blob = await grabFrame();
      if (session !== camera.session) return;
      // ask for a few more than k per frame so the vote has something to work with; search the
      // frame's corners and centre too (regions): an item held up fills only part of the frame;
      // a frame found neither verified nor well upright is tried turned (orient=auto), then with
      // a finer grid of smaller squares (regions=auto), each only when the server expects it to
      // fit in the frame budget (budget_ms)
      const data = await postSearch(blob, "camera.jpg", Math.min(100, k * 2), minScore, undefined,
                                    { regions: "auto", orient: "auto", budget_ms: CAMERA_BUDGET_MS });
      if (session !== camera.session) return;
      const t1 = performance.now();
      camera.done.push(t1);
      camera.answered += 1;
      el.rate.dataset.queries = String(camera.answered);
      updateRate(t1);
      const took = typeof data.took_ms === "number" ? ` (server ${fmtMs(data.took_ms)})` : "";
      el.latency.textContent = fmtMs(t1 - t0) + took;
      const hits = (data.results[0] && data.results[0].hits) || [];
      camera.frames.push(hits);
      while (camera.frames.length > SMOOTH_FRAMES) camera.frames.shift();
      const rows = smoothed(k);
      renderHits(rows);
      showNoMatch(rows.length === 0, minScore);
      if (rows.length) setStatus("Camera on: point it at a thing.", "");
      else setStatus("No match in the camera view.", "warn");
    } catch (err) {
      if (session !== camera.session) return;
      setStatus(err instanceof ApiError ? err.message : "Camera query failed: " + err, "error");
    } finally {
      if (session === camera.session) camera.inFlight = false;
    }
  }

  el.cameraStart.addEventListener("click", () => {
    startCamera().catch((err) => showCameraError(cameraErrorMessage(err)));
  });
  el.cameraStop.addEventListener("click", stopCamera);
  el.interval.addEventListener("change", () => {
    if (camera.running) schedule();
  });
  window.addEventListener("pagehide", stopCamera);

  // ---- readiness --------------------------------------------------------------------------

  // Checked for as long as the page is open: every 2 s while the index cannot be searched, every
  // 15 s while it can (it may be deleted, damaged or rebuilt under the service), and at once when
  // a search is answered 503.
  let readyTimer = null;
  async function checkReady() {
    clearTimeout(readyTimer);
    let ok = false;
    try {
      const r = await fetch(new URL("readyz", document.baseURI), { cache: "no-store" });
      const data = await r.json().catch(() => ({}));
      if (r.ok && data.ready !== false) {
        const n = typeof data.items === "number" ? data.items : typeof data.count === "number" ? data.count : null;
        el.ready.textContent = n === null ? "ready" : `${n.toLocaleString()} item${n === 1 ? "" : "s"} indexed`;
        el.ready.className = "ready ok";
        el.ready.title = "";
        ok = true;
      } else {
        el.ready.textContent = r.status === 503 ? "index unavailable" : "index not ready";
        el.ready.className = "ready bad";
        el.ready.title = typeof data.detail === "string" ? data.detail : "";
      }
    } catch (_) {
      el.ready.textContent = "server unreachable";
      el.ready.className = "ready bad";
      el.ready.title = "";
    }
    readyTimer = setTimeout(checkReady, ok ? 15000 : 2000);
  }

  if (!window.isSecureContext) {
    el.cameraStart.title = "The camera needs https:// or localhost";
  }
  checkReady();
})();
