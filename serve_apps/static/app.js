// DeepOmni page: records the microphone, streams it over WS /v1/dialogue/ws, plays the answer as it arrives
// and shows the transcript. Follows docs/serving.md ("WebSocket /v1/dialogue/ws").
//
// State for tests and people, on <body>: data-state (idle | connecting | recording | answering | done |
// error | needs-key), data-chunks-played (answer audio chunks scheduled for playback), data-turns (answers
// ended).
//
// A server with an API key ("Authentication" in docs/serving.md) closes the WebSocket with 1008 after an
// "unauthorized" error: the page then asks for the key, keeps it for this tab (sessionStorage) and sends it
// as the subprotocol openai-insecure-api-key.<key> (a browser cannot set headers on a WebSocket), or as
// ?api_key= when the key has characters a subprotocol may not hold.
"use strict";

const $ = (id) => document.getElementById(id);
const body = document.body;
let ws = null, ready = null, serverRate = 16000;
let ctx = null, recorder = null, micStream = null, recording = false;
let playHead = 0, botLine = null, turnStart = 0, sentSamples = 0;

function setState(s, msg) {
  body.dataset.state = s;
  if (msg !== undefined) $("status").textContent = msg;
}

function addLine(cls, who, text) {
  const div = document.createElement("div");
  div.className = "turn " + cls;
  div.innerHTML = '<span class="who"></span> <span class="text"></span>';
  div.querySelector(".who").textContent = who;
  div.querySelector(".text").textContent = text;
  $("transcript").appendChild(div);
  return div.querySelector(".text");
}

async function audioContext() {
  if (!ctx) {
    ctx = new AudioContext();
    await ctx.audioWorklet.addModule("static/pcm-recorder.js");
  }
  if (ctx.state === "suspended") await ctx.resume();
  return ctx;
}

const KEY_ITEM = "deepomni-api-key";
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;  // what a subprotocol may hold (RFC 6455 / 7230 token)
let needsKey = false;

function askForKey(msg) {
  needsKey = true;
  $("keyrow").hidden = false;
  $("apikey").focus();
  setState("needs-key", msg);
}

function connect() {
  if (ready) return ready;
  if (needsKey) return Promise.reject(new Error("this server needs an API key"));
  setState("connecting", "connecting…");
  const url = new URL("v1/dialogue/ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const key = sessionStorage.getItem(KEY_ITEM);
  const protocols = ["deepomni"];
  if (key && TOKEN.test(key)) protocols.push("openai-insecure-api-key." + key);
  else if (key) url.searchParams.set("api_key", key);
  ws = new WebSocket(url, protocols);
  ws.binaryType = "arraybuffer";
  ready = new Promise((resolve, reject) => {
    ws.onmessage = (ev) => {
      if (typeof ev.data !== "string") return playChunk(ev.data);
      const msg = JSON.parse(ev.data);
      if (msg.type === "ready") {
        serverRate = msg.sample_rate;
        setState("idle", `connected · answers at ${msg.sample_rate} Hz · up to ${msg.max_seconds} s per question`);
        resolve();
      } else onMessage(msg);
    };
    ws.onclose = (ev) => {
      ready = null;
      if (ev.code === 1008 && ev.reason === "unauthorized") {
        askForKey(sessionStorage.getItem(KEY_ITEM) ? "that API key was refused: enter the server's key"
                                                  : "this server needs an API key: enter it above");
      } else if (body.dataset.state !== "error") {
        setState("idle", `disconnected (${ev.code}${ev.reason ? ": " + ev.reason : ""})`);
      }
      reject(new Error("closed"));
    };
  });
  return ready;
}

function onMessage(msg) {
  if (msg.type === "start") {
    botLine = addLine("bot", "DeepOmni:", "");
    setState("answering", "answering…");
  } else if (msg.type === "text") {
    if (!botLine) botLine = addLine("bot", "DeepOmni:", "");
    botLine.textContent += msg.delta;
  } else if (msg.type === "end") {
    body.dataset.turns = String(Number(body.dataset.turns) + 1);
    botLine = null;
    const parts = msg.cancelled ? ["cancelled"] : [
      msg.ttfa_ms != null ? `first audio ${msg.ttfa_ms.toFixed(0)} ms` : "no audio",
      `${msg.audio_seconds.toFixed(2)} s of speech`, `${msg.steps} steps`,
      msg.rtf != null ? `RTF ${msg.rtf.toFixed(2)}` : ""];
    $("stats").textContent = parts.filter(Boolean).join(" · ");
    setState("done", "ready for the next question");
  } else if (msg.type === "error" && msg.reason === "unauthorized") {
    return;  // the close that follows (1008) asks for the key
  } else if (msg.type === "error") {
    const line = addLine("bot err", "error:", `${msg.message} (${msg.reason})`);
    line.parentElement.classList.add("err");
    setState("error", msg.reason);
  }
}

function playChunk(buf) {
  const pcm = new Int16Array(buf);
  if (!pcm.length || !ctx) return;
  const audio = ctx.createBuffer(1, pcm.length, serverRate);
  const ch = audio.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
  const src = ctx.createBufferSource();
  src.buffer = audio;
  src.connect(ctx.destination);
  playHead = Math.max(playHead, ctx.currentTime + 0.05);  // a little slack so chunks play back to back
  src.start(playHead);
  playHead += audio.duration;
  body.dataset.chunksPlayed = String(Number(body.dataset.chunksPlayed) + 1);
}

async function startRecording() {
  await audioContext();
  await connect();
  micStream = await navigator.mediaDevices.getUserMedia({audio: {channelCount: 1, echoCancellation: true}});
  const src = ctx.createMediaStreamSource(micStream);
  recorder = new AudioWorkletNode(ctx, "pcm-recorder");
  ws.send(JSON.stringify({type: "start_turn", format: "pcm_s16le", sample_rate: ctx.sampleRate}));
  sentSamples = 0;
  recorder.port.onmessage = (ev) => {
    if (!recording || ws.readyState !== WebSocket.OPEN) return;
    const f = ev.data, pcm = new Int16Array(f.length);
    for (let i = 0; i < f.length; i++) pcm[i] = Math.max(-1, Math.min(1, f[i])) * 32767;
    ws.send(pcm.buffer);
    sentSamples += f.length;
  };
  src.connect(recorder);
  recording = true;
  turnStart = performance.now();
  $("talk").classList.add("rec");
  $("talk").textContent = "■ Stop";
  setState("recording", "listening… click Stop when done");
}

function stopRecording() {
  recording = false;
  if (recorder) recorder.disconnect();
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  recorder = micStream = null;
  $("talk").classList.remove("rec");
  $("talk").textContent = "● Talk";
  const seconds = sentSamples / ctx.sampleRate;
  addLine("user", "You:", `(spoken question, ${seconds.toFixed(1)} s)`);
  ws.send(JSON.stringify({type: "end_of_turn"}));
  setState("answering", "thinking…");
}

$("talk").onclick = async () => {
  try {
    if (recording) stopRecording(); else await startRecording();
  } catch (e) {
    if (!needsKey) setState("error", `microphone or connection failed: ${e.message || e}`);
  }
};

async function sendText() {
  const q = $("question").value.trim();
  if (!q) return;
  try {
    await audioContext();
    await connect();
    $("question").value = "";
    addLine("user", "You:", q);
    ws.send(JSON.stringify({type: "text", text: q}));
    setState("answering", "thinking…");
  } catch (e) {
    if (!needsKey) setState("error", `connection failed: ${e.message || e}`);
  }
}
$("send").onclick = sendText;

async function useKey() {
  const key = $("apikey").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_ITEM, key);
  $("apikey").value = "";
  $("keyrow").hidden = true;
  needsKey = false;
  try {
    await connect();
  } catch (e) {
    if (!needsKey) setState("error", `connection failed: ${e.message || e}`);
  }
}
$("usekey").onclick = useKey;
$("apikey").addEventListener("keydown", (e) => { if (e.key === "Enter") useKey(); });
$("question").addEventListener("keydown", (e) => { if (e.key === "Enter") sendText(); });
