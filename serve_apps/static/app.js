// DeepOmni page: the conversation over WS /v1/dialogue/ws (docs/serving.md, "WebSocket /v1/dialogue/ws"),
// shown as turns. A question is spoken (the microphone, streamed as pcm_s16le) or typed; each answer streams
// back as text and audio, plays as it arrives and can be played again (its PCM is kept per turn), and shows
// its time to first audio (measured here, from the question sent to its first audio received; the server's
// own figure beside it) and where its routed tokens went: per MoE layer, the share on speech experts and on
// text experts (the `end` event's `expert_share`; a checkpoint without experts.json has no assignment, and
// then the columns show how many experts each layer used).
//
// The page connects when it loads and says how the connection stands: connecting, connected, reconnecting
// (after a drop, with a growing delay; the server starts a new conversation then), or that it needs a key.
//
// State for tests and people, on <body>: data-state (connecting | idle | recording | answering | done |
// error | needs-key), data-conn (connecting | connected | reconnecting | needs-key), data-chunks-played
// (answer audio chunks scheduled for playback), data-turns (answers ended), data-replays (answers played
// again). Each turn is a .exchange (data-turn, data-ttfa-ms once its first audio came) holding .turn.user,
// .turn.bot, a .replay button for a spoken answer and .experts with one .layer per MoE layer (data-layer,
// data-routed, and data-speech / data-text shares or data-used).
//
// A server with an API key ("Authentication" in docs/serving.md) closes the WebSocket with 1008 after an
// "unauthorized" error: the page then asks for the key, keeps it for this tab (sessionStorage) and sends it
// as the subprotocol openai-insecure-api-key.<key> (a browser cannot set headers on a WebSocket), or as
// ?api_key= when the key has characters a subprotocol may not hold.
"use strict";

const $ = (id) => document.getElementById(id);
const body = document.body;
let ws = null, ready = null, serverRate = 16000, info = null;
let ctx = null, recorder = null, micStream = null, recording = false, sentSamples = 0;
let playHead = 0, playing = [];          // the live answer's scheduled sources (stopped on barge-in)
let connections = 0, retries = 0, retryTimer = null;
let sent = 0, turns = new Map(), current = null;  // questions sent on this connection, by the server's turn number

function setState(s, msg) {
  body.dataset.state = s;
  if (msg !== undefined) $("status").textContent = msg;
}

function setConn(s, msg) {
  body.dataset.conn = s;
  $("conn").dataset.conn = s;
  $("conn").textContent = msg;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function scrollDown() { window.scrollTo(0, document.body.scrollHeight); }

// ------------------------------------------------------------------------------------------ connection
const KEY_ITEM = "deepomni-api-key";
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;  // what a subprotocol may hold (RFC 6455 / 7230 token)
let needsKey = false;

function askForKey(msg) {
  needsKey = true;
  $("keyrow").hidden = false;
  $("apikey").focus();
  setConn("needs-key", "needs an API key");
  setState("needs-key", msg);
}

function connect() {
  if (ready) return ready;
  if (needsKey) return Promise.reject(new Error("this server needs an API key"));
  clearTimeout(retryTimer);
  retryTimer = null;
  setConn(retries ? "reconnecting" : "connecting", retries ? "reconnecting…" : "connecting…");
  const url = new URL("v1/dialogue/ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const key = sessionStorage.getItem(KEY_ITEM);
  const protocols = ["deepomni"];
  if (key && TOKEN.test(key)) protocols.push("openai-insecure-api-key." + key);
  else if (key) url.searchParams.set("api_key", key);
  const sock = ws = new WebSocket(url, protocols);
  sock.binaryType = "arraybuffer";
  ready = new Promise((resolve, reject) => {
    sock.onmessage = (ev) => {
      if (typeof ev.data !== "string") return onAudio(ev.data);
      const msg = JSON.parse(ev.data);
      if (msg.type === "ready") onReady(msg, resolve);
      else onMessage(msg);
    };
    sock.onclose = (ev) => {
      if (ws === sock) ready = null;
      const wasOpen = body.dataset.conn === "connected";
      for (const t of turns.values()) finishTurn(t, "connection lost");  // (those that ended are left as they are)
      current = null;
      if (ev.code === 1008 && ev.reason === "unauthorized") {
        askForKey(sessionStorage.getItem(KEY_ITEM) ? "that API key was refused: enter the server's key"
                                                  : "this server needs an API key: enter it above");
      } else {
        const delay = Math.min(10, 0.5 * 2 ** retries);
        retries += 1;
        setConn("reconnecting", `${wasOpen ? "disconnected" : "cannot connect"} (${ev.code}${ev.reason ? ": " +
                ev.reason : ""}) · reconnecting in ${delay < 1 ? delay.toFixed(1) : delay.toFixed(0)} s`);
        if (["answering", "recording"].includes(body.dataset.state)) setState("error", "the connection dropped");
        retryTimer = setTimeout(() => connect().catch(() => {}), delay * 1000);
      }
      reject(new Error("closed"));
    };
  });
  return ready;
}

function onReady(msg, resolve) {
  serverRate = msg.sample_rate;
  info = msg;
  retries = 0;
  connections += 1;
  sent = 0;
  turns = new Map();  // the server counts turns per connection
  if (connections > 1 && $("transcript").children.length) {
    $("transcript").appendChild(el("div", "divider", "reconnected: the server starts a new conversation here"));
  }
  setConn("connected", `connected · answers at ${msg.sample_rate} Hz · up to ${msg.max_seconds} s per question`);
  if (!["recording", "answering"].includes(body.dataset.state)) setState("idle", "ready");
  resolve();
}

// ------------------------------------------------------------------------------------------ turns
function newTurn(question, spokenSeconds) {
  sent += 1;
  const t = {n: sent, sentAt: performance.now(), firstAudioAt: null, pcm: [], samples: 0, ended: false};
  t.card = el("article", "exchange");
  t.card.dataset.turn = String(t.n);
  const user = el("div", "turn user");
  user.append(el("span", "who", "You:"),
              el("span", "text", spokenSeconds === undefined ? question : `(spoken, ${spokenSeconds.toFixed(1)} s)`));
  if (spokenSeconds !== undefined) user.dataset.seconds = spokenSeconds.toFixed(2);
  const bot = el("div", "turn bot");
  t.text = el("span", "text", "");
  bot.append(el("span", "who", "DeepOmni:"), t.text);
  t.meta = el("div", "meta");
  t.card.append(user, bot, t.meta);
  $("transcript").appendChild(t.card);
  turns.set(t.n, t);
  scrollDown();
  return t;
}

function onMessage(msg) {
  const t = turns.get(msg.turn);
  if (msg.type === "start") {
    if (current && current !== t) stopPlayback();
    current = t || null;
    setState("answering", "answering…");
  } else if (msg.type === "text") {
    if (t) t.text.textContent += msg.delta;
  } else if (msg.type === "end") {
    body.dataset.turns = String(Number(body.dataset.turns) + 1);
    if (t) finishTurn(t, msg.cancelled ? "stopped" : null, msg);
    if (current === t) current = null;
    if (![...turns.values()].some((x) => !x.ended)) setState("done", "ready for the next question");
  } else if (msg.type === "error" && msg.reason === "unauthorized") {
    return;  // the close that follows (1008) asks for the key
  } else if (msg.type === "error") {
    if (t) {
      t.card.querySelector(".turn.bot").classList.add("err");
      t.text.textContent = `${msg.message} (${msg.reason})`;
      finishTurn(t, "refused");
      if (current === t) current = null;
    }
    setState("error", msg.reason);
  }
}

function onAudio(buf) {
  const pcm = new Int16Array(buf);
  const t = current;
  if (!pcm.length || !t) return;
  if (t.firstAudioAt === null) {
    t.firstAudioAt = performance.now();
    t.card.dataset.ttfaMs = (t.firstAudioAt - t.sentAt).toFixed(0);
  }
  t.pcm.push(pcm);
  t.samples += pcm.length;
  if (!ctx || t.muted) return;
  const src = source(pcm);
  playHead = Math.max(playHead, ctx.currentTime + 0.05);  // a little slack so chunks play back to back
  src.start(playHead);
  playHead += src.buffer.duration;
  playing.push(src);
  src.onended = () => { playing = playing.filter((s) => s !== src); };
  body.dataset.chunksPlayed = String(Number(body.dataset.chunksPlayed) + 1);
}

function source(pcm) {
  const audio = ctx.createBuffer(1, pcm.length, serverRate);
  const ch = audio.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
  const src = ctx.createBufferSource();
  src.buffer = audio;
  src.connect(ctx.destination);
  return src;
}

function stopPlayback() {  // a new question: the answer playing stops (the server stops it too: barge-in)
  if (current) current.muted = true;  // what it still sends before it stops is kept for replay, not played
  for (const s of playing) { try { s.stop(); } catch (e) { /* not started yet */ } }
  playing = [];
  if (ctx) playHead = ctx.currentTime;
}

function finishTurn(t, note, end) {
  if (t.ended) return;
  t.ended = true;
  const m = t.meta;
  if (t.firstAudioAt !== null) {
    const server = end && end.ttfa_ms != null ? ` (server ${end.ttfa_ms.toFixed(0)} ms)` : "";
    m.append(metric("first audio", `${t.card.dataset.ttfaMs} ms${server}`, "ttfa"));
  }
  if (note) m.append(el("span", "note", note));
  if (end && !end.cancelled) {
    if (end.audio_seconds) m.append(metric("speech", `${end.audio_seconds.toFixed(2)} s`));
    if (end.rtf != null) m.append(metric("RTF", end.rtf.toFixed(2)));
    m.append(metric("steps", String(end.steps)));
    if (end.cached_tokens) m.append(metric("context kept", `${end.cached_tokens}/${end.prompt_tokens} positions`));
    if (end.dropped_turns) m.append(metric("oldest turns left out", String(end.dropped_turns)));
  }
  if (t.samples) m.append(replayButton(t));
  if (end && end.expert_share) t.card.appendChild(expertChart(end.expert_share));
  scrollDown();
}

function metric(name, value, cls) {
  const s = el("span", cls || "");
  s.append(`${name} `, el("b", "", value));
  return s;
}

function replayButton(t) {
  const b = el("button", "replay", "▶ Play again");
  b.title = `the answer's ${(t.samples / serverRate).toFixed(2)} s of speech`;
  let src = null;
  b.onclick = async () => {
    if (src) { src.stop(); return; }
    await audioContext();
    const all = new Int16Array(t.samples);
    let o = 0;
    for (const p of t.pcm) { all.set(p, o); o += p.length; }
    src = source(all);
    src.onended = () => { src = null; b.textContent = "▶ Play again"; };
    src.start();
    b.textContent = "■ Stop";
    body.dataset.replays = String(Number(body.dataset.replays) + 1);
  };
  return b;
}

// where the answer's routed (token, expert) pairs went, one column per MoE layer (expert_share: docs/serving.md)
function expertChart(share) {
  const box = el("div", "experts");
  const assigned = Array.isArray(share.speech);
  box.dataset.assignment = assigned ? "yes" : "no";
  const tokens = share.tokens || {}, sp = tokens.speech || 0, tx = tokens.text || 0;
  const from = `${sp + tx} tokens run for this answer (${sp} speech, ${tx} text: the question's new positions and the answer)`;
  const head = el("div", "head");
  if (assigned) {
    const mean = share.speech.reduce((a, b) => a + b, 0) / Math.max(1, share.speech.length);
    head.append("Experts, per MoE layer: ", el("span", "sw speech"), " speech ", el("span", "sw text"),
                ` text · ${(100 * mean).toFixed(0)}% of the routed pairs on speech experts (mean over layers) · ${from}`);
  } else {
    head.append(`No expert assignment in this checkpoint (no experts.json): `, el("span", "sw used"),
                ` experts each MoE layer used, of ${share.num_experts} · ${from}`);
  }
  const bars = el("div", "bars" + (share.layers.length > 12 ? " many" : ""));
  share.layers.forEach((layer, i) => {
    const col = el("div", "col"), cell = el("div", "layer");
    cell.dataset.layer = String(layer);
    cell.dataset.routed = String(share.routed[i]);
    if (assigned) {
      const s = share.speech[i], x = share.text[i];
      cell.dataset.speech = String(s);
      cell.dataset.text = String(x);
      col.append(segment("speech", s), segment("text", x));
      cell.title = `layer ${layer}: ${(100 * s).toFixed(1)}% to speech experts, ${(100 * x).toFixed(1)}% to text ` +
                   `experts (${share.routed[i]} routed pairs)`;
    } else {
      const used = share.experts_used[i];
      cell.dataset.used = String(used);
      col.append(segment("used", used / share.num_experts));
      cell.title = `layer ${layer}: ${used} of ${share.num_experts} experts used (${share.routed[i]} routed pairs)`;
    }
    cell.append(col, el("span", "lab", String(layer)));
    bars.appendChild(cell);
  });
  box.append(head, bars);
  return box;
}

function segment(kind, fraction) {
  const s = el("div", "seg " + kind);
  s.style.height = `${(100 * Math.max(0, Math.min(1, fraction))).toFixed(2)}%`;
  return s;
}

// ------------------------------------------------------------------------------------------ questions
async function audioContext() {
  if (!ctx) {
    ctx = new AudioContext();
    await ctx.audioWorklet.addModule("static/pcm-recorder.js");
  }
  if (ctx.state === "suspended") await ctx.resume();
  return ctx;
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
  if (!ws || ws.readyState !== WebSocket.OPEN) {
    setState("error", "the connection dropped while recording: ask again");
    return;
  }
  stopPlayback();
  ws.send(JSON.stringify({type: "end_of_turn"}));
  newTurn(null, sentSamples / ctx.sampleRate);
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
    stopPlayback();
    ws.send(JSON.stringify({type: "text", text: q}));
    newTurn(q);
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
  retries = 0;
  try {
    await connect();
  } catch (e) {
    if (!needsKey) setState("error", `connection failed: ${e.message || e}`);
  }
}
$("usekey").onclick = useKey;
$("apikey").addEventListener("keydown", (e) => { if (e.key === "Enter") useKey(); });
$("question").addEventListener("keydown", (e) => { if (e.key === "Enter") sendText(); });

connect().catch(() => {});  // at once: the page says how the connection stands before anyone asks
