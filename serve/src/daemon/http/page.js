// lipsync live: the browser page's script (served as /page.js: the page's
// Content-Security-Policy allows no inline script).
"use strict";
const HELLO = 0x01, OPEN = 0x10, OPENED = 0x11, AUDIO = 0x12, END_AUDIO = 0x13, INTERRUPT = 0x15,
  FINISH = 0x16, FRAME = 0x20, DONE = 0x21, SPEECH = 0x22, INTERRUPTED = 0x23, ERROR = 0x7f;
// With --http-token the page was loaded once as /?token=TOKEN, and the daemon answered with a
// session cookie (HttpOnly, SameSite=Strict) that the requests below carry by themselves.
const $ = (id) => document.getElementById(id);
// Read by people (the line under the buttons) and by the end-to-end test.
const S = window.lipsyncStats = {
  frames: 0, idle: 0, speech: 0, firstFrameMs: null, speechFirstFrameMs: null,
  audioStarted: false, audioPlayedMs: 0, fps: 0, done: false, error: null, interrupts: 0,
};
let ws = null, ctx = null, opened = null, openSentAt = 0, speechSentAt = 0;
let fileAudio = null, audioAt = null, player = null, playStart = 0, mic = null;
let draw = Promise.resolve(), stopping = false;
const recent = [];

function message(type, payload) {
  const p = payload || new Uint8Array(0);
  const b = new Uint8Array(5 + p.length);
  new DataView(b.buffer).setUint32(0, p.length + 1);
  b[4] = type;
  b.set(p, 5);
  return b;
}
const json = (type, v) => message(type, new TextEncoder().encode(JSON.stringify(v)));
const text = (p) => new TextDecoder().decode(p);
const send = (b) => { if (ws && ws.readyState === WebSocket.OPEN) ws.send(b); };

function show() {
  const f = (v) => v === null ? "-" : v.toFixed(0) + " ms";
  $("stats").textContent = `frames ${S.frames} (${S.idle} idle, ${S.speech} speech)  ` +
    `${S.fps.toFixed(1)} frames/s  first frame ${f(S.firstFrameMs)}  ` +
    `first speech frame ${f(S.speechFirstFrameMs)}` + (S.error ? "  error: " + S.error : "") +
    (S.done ? "  done" : "");
}

async function connect() {
  ctx = new AudioContext();
  await ctx.resume();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  ws = new WebSocket(`${scheme}//${location.host}/ws`, ["lipsync.v2"]);
  ws.binaryType = "arraybuffer";
  await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = () => fail(new Error("WebSocket failed")); });
  ws.onmessage = (e) => receive(new Uint8Array(e.data));
  ws.onclose = () => { S.done = true; show(); };
  send(json(HELLO, { protocol: 2, client: "browser" }));
  openSentAt = performance.now();
  send(json(OPEN, { avatar: $("avatar").value, sample_rate: ctx.sampleRate, format: "f32le", realtime: true }));
  await new Promise((ok) => { const t = setInterval(() => { if (opened || S.error) { clearInterval(t); ok(); } }, 10); });
  if (S.error) throw new Error(S.error);
  $("interrupt").disabled = $("stop").disabled = false;
}

function receive(b) {
  const type = b[4], p = b.subarray(5);
  if (type === FRAME) {
    const dv = new DataView(p.buffer, p.byteOffset, p.byteLength);
    const index = dv.getUint32(0), idle = (p[8] & 1) === 1;
    const jpeg = new Blob([p.subarray(9)], { type: "image/jpeg" });
    // Decoded in parallel, drawn in order.
    const bitmap = createImageBitmap(jpeg);
    draw = draw.then(() => bitmap).then((img) => {
      const c = $("view");
      if (c.width !== img.width) { c.width = img.width; c.height = img.height; }
      c.getContext("2d").drawImage(img, 0, 0);
      img.close();
      const now = performance.now();
      S.frames++;
      if (idle) S.idle++; else S.speech++;
      if (S.firstFrameMs === null) S.firstFrameMs = now - openSentAt;
      recent.push(now);
      while (recent.length && recent[0] < now - 1000) recent.shift();
      S.fps = recent.length;
      if (audioAt !== null && index === audioAt) startSound(now);
      show();
    }).catch((e) => { S.error = "cannot decode frame " + index + ": " + e; show(); });
  } else if (type === OPENED) {
    opened = JSON.parse(text(p));
  } else if (type === SPEECH) {
    const s = JSON.parse(text(p));
    if (fileAudio && audioAt === null && !S.audioStarted) audioAt = s.frame;
  } else if (type === INTERRUPTED) {
    S.interrupts++;
    if (player) { player.stop(); player = null; }
    audioAt = null;
  } else if (type === DONE) {
    S.done = true;
  } else if (type === ERROR) {
    S.error = JSON.parse(text(p)).message;
  }
  show();
}

// The file's sound starts with the frame that begins its utterance: sound and lips in sync.
function startSound(now) {
  audioAt = null;
  player = ctx.createBufferSource();
  player.buffer = fileAudio;
  player.connect(ctx.destination);
  playStart = ctx.currentTime;
  player.onended = () => { S.audioPlayedMs = (ctx.currentTime - playStart) * 1000; show(); };
  player.start();
  S.audioStarted = true;
  S.speechFirstFrameMs = now - speechSentAt;
}

function sendSamples(samples) {
  const copy = new Float32Array(samples);
  send(message(AUDIO, new Uint8Array(copy.buffer)));
}

async function playFile() {
  const f = $("file").files[0];
  if (!f) { S.error = "choose an audio file first"; show(); return; }
  if (!ws) await connect();
  fileAudio = await ctx.decodeAudioData(await f.arrayBuffer());
  const mono = new Float32Array(fileAudio.length);
  for (let c = 0; c < fileAudio.numberOfChannels; c++) {
    const d = fileAudio.getChannelData(c);
    for (let i = 0; i < d.length; i++) mono[i] += d[i] / fileAudio.numberOfChannels;
  }
  // Sent at the pace of real time, 20 ms a message, as a microphone would.
  const chunk = Math.round(ctx.sampleRate / 50);
  speechSentAt = performance.now();
  for (let at = 0, k = 0; at < mono.length; at += chunk, k++) {
    const due = speechSentAt + k * 20;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((ok) => setTimeout(ok, wait));
    if (!ws || ws.readyState !== WebSocket.OPEN || stopping) return;
    sendSamples(mono.subarray(at, Math.min(mono.length, at + chunk)));
  }
  send(message(END_AUDIO));
}

async function useMic() {
  if (!ws) await connect();
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  const src = ctx.createMediaStreamSource(stream);
  mic = ctx.createScriptProcessor(1024, 1, 1);
  speechSentAt = performance.now();
  mic.onaudioprocess = (e) => sendSamples(e.inputBuffer.getChannelData(0));
  src.connect(mic);
  mic.connect(ctx.destination);
}

async function loadAvatars() {
  const r = await fetch("/avatars");
  if (!r.ok) throw new Error(`/avatars: ${r.status}`);
  const list = (await r.json()).avatars;
  for (const name of list) {
    const o = document.createElement("option");
    o.value = o.textContent = name;
    $("avatar").appendChild(o);
  }
}

$("play").onclick = () => playFile().catch((e) => { S.error = String(e); show(); });
$("mic").onclick = () => useMic().catch((e) => { S.error = String(e); show(); });
$("interrupt").onclick = () => send(message(INTERRUPT));
$("stop").onclick = () => {
  stopping = true;
  if (mic) { mic.disconnect(); mic = null; send(message(END_AUDIO)); }
  send(message(FINISH));
};
loadAvatars().catch((e) => { S.error = "cannot list avatars: " + e; show(); });
