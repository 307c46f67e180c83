// The voice assistant controller shared by the voice chat page (/) and the video-call page (/call).
//
// Start opens the microphone (and camera on /call), starts the audio worklets and connects to /v1/realtime with
// server-side turn detection. It streams microphone audio as input_audio_buffer.append (PCM16 24 kHz, one event per
// 40 ms chunk), plays response.output_audio.delta through the playback worklet, shows both sides of the
// transcript, a state indicator, the reply latency (end of the person's speech -> first reply audio played) and
// clear notices. Barge-in: on input_audio_buffer.speech_started playback stops at once and the unheard part of the
// assistant's reply is reported with conversation.item.truncate (audio_end_ms = what was actually played).
// `window.omnivox` mirrors the counters for tests and curious users; `window.omnivoxDebug.injectSpeech(samples)`
// mixes 24 kHz audio into the outgoing microphone stream (how a test speaks over a reply).

import { AudioEngine, RATE, base64ToInt16, int16ToBase64, mediaErrorMessage, openMedia } from "/static/audio.js";
import { RealtimeClient } from "/static/realtime.js";

const $ = (id) => document.getElementById(id);
const STATE_TEXT = {
  idle: "Press Start to talk",
  connecting: "Connecting…",
  reconnecting: "Reconnecting…",
  listening: "Listening",
  user: "Hearing you",
  thinking: "Thinking…",
  assistant: "Speaking",
};

export class VoiceApp {
  constructor({ video = false } = {}) {
    this.video = video;
    this.listeners = new Map();
    this.hook = {
      connected: false,
      sentAudioMs: 0,
      receivedAudioMs: 0,
      playedAudioMs: 0,
      framesSent: 0,
      lastError: null,
      state: "idle",
      latencyMs: null,
      truncatesSent: 0,
      sessionId: null,
      voice: null,
      events: {},
    };
    window.omnivox = this.hook;
    window.omnivoxDebug = { injectSpeech: (samples) => this.injectSpeech(samples) };
    this.running = false;
    this.muted = false;
    this.inject = null; // {data: Float32Array, pos}
    this.resetSession();
  }

  // ---------------------------------------------------------------- small event emitter for page extensions
  on(name, fn) {
    if (!this.listeners.has(name)) this.listeners.set(name, []);
    this.listeners.get(name).push(fn);
  }

  emit(name, arg) {
    for (const fn of this.listeners.get(name) || []) fn(arg);
  }

  resetSession() {
    this.sessionSamples = 0; // samples appended in this server session (the server's audio_*_ms timeline)
    this.sendTimes = []; // [[sessionSamplesAfterChunk, performance.now()]] for the last ~30 s
    this.items = new Map(); // item id -> {li, text, role}
    this.received = new Map(); // assistant item id -> samples received
    this.played = new Map(); // assistant item id -> samples played
    this.cut = new Set(); // assistant items interrupted: their late audio is dropped
    this.assistantItem = null;
    this.responseActive = false;
    this.responseAudio = 0;
    this.userSpeaking = false;
    this.audible = false;
    this.turnEndAt = null;
  }

  // ---------------------------------------------------------------- page wiring
  mount() {
    this.el = {
      start: $("start"),
      mute: $("mute"),
      voice: $("voice"),
      state: $("state"),
      stateText: $("state-text"),
      level: $("level"),
      latency: $("latency"),
      notices: $("notices"),
      transcript: $("transcript"),
      stats: $("stats"),
      apiKey: $("api-key"),
    };
    this.el.start.addEventListener("click", () => (this.running ? this.stop() : this.start()));
    this.el.mute.addEventListener("click", () => this.setMuted(!this.muted));
    this.el.voice.addEventListener("change", () => this.chooseVoice(this.el.voice.value));
    if (this.el.apiKey) {
      this.el.apiKey.value = sessionStorage.getItem("omnivox.apiKey") || "";
      // kept for this tab only (sessionStorage), never in localStorage; a new key reloads the voice list
      this.el.apiKey.addEventListener("change", () => {
        sessionStorage.setItem("omnivox.apiKey", this.el.apiKey.value.trim());
        this.clearNotice("auth");
        this.clearNotice("voices");
        this.loadVoices();
      });
    }
    this.loadVoices();
    this.setState("idle");
    this.statsTimer = setInterval(() => this.renderStats(), 250);
    return this;
  }

  async loadVoices() {
    const sel = this.el.voice;
    try {
      const r = await fetch("/v1/voices", { headers: this.authHeaders() });
      if (r.status === 401) {
        sel.replaceChildren(new Option("default", ""));
        sel.disabled = true;
        this.notice("voices", this.keyProblem(), "warn");
        return;
      }
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const { voices = [], default: dflt } = await r.json();
      const saved = localStorage.getItem("omnivox.voice");
      sel.replaceChildren(...voices.map((v) => new Option(v, v)));
      sel.value = voices.includes(saved) ? saved : dflt || voices[0] || "";
      sel.disabled = voices.length === 0;
    } catch (e) {
      sel.replaceChildren(new Option("default", ""));
      sel.disabled = true;
      this.notice("voices", `Could not load the voice list (${e.message}); the server's default voice is used.`, "warn");
    }
  }

  keyProblem() {
    return this.el.apiKey && this.el.apiKey.value.trim()
      ? "The server refused this API key: check it under Settings → API key."
      : "This server needs an API key: enter it under Settings → API key, then press Start.";
  }

  /** Ask the server whether our key (if any) is accepted before opening the microphone; false when refused.
   * A websocket refused at the handshake only reports code 1006 to a page, so this is where a bad key shows. */
  async authorized() {
    let r;
    try {
      r = await fetch("/v1/models", { headers: this.authHeaders() });
    } catch {
      return true; // the server is unreachable: the connection's own reconnect notice says so
    }
    if (r.status !== 401) {
      this.clearNotice("auth");
      return true;
    }
    this.fail("auth", this.keyProblem());
    if (this.el.apiKey) {
      const settings = this.el.apiKey.closest("details");
      if (settings) settings.open = true;
      this.el.apiKey.focus();
    }
    return false;
  }

  authHeaders() {
    const key = this.el && this.el.apiKey ? this.el.apiKey.value.trim() : "";
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  chooseVoice(voice) {
    localStorage.setItem("omnivox.voice", voice);
    if (voice && this.client && this.client.open) this.updateSession();
  }

  updateSession() {
    const voice = this.el.voice.value;
    if (!voice) return;
    this.client.send({ type: "session.update", session: { type: "realtime", audio: { output: { voice } } } });
  }

  setMuted(m) {
    this.muted = m;
    this.el.mute.setAttribute("aria-pressed", String(m));
    this.el.mute.textContent = m ? "Unmute" : "Mute";
    this.el.mute.title = m ? "Microphone is muted: silence is sent instead" : "Mute the microphone";
    document.body.classList.toggle("muted", m);
  }

  // ---------------------------------------------------------------- start / stop
  async start() {
    this.running = true;
    this.el.start.disabled = true;
    this.clearNotice("mic");
    const engine = new AudioEngine({
      onChunk: (pcm, rms) => this.onMicChunk(pcm, rms),
      onPlayback: (m) => this.onPlayback(m),
    });
    engine.createContext(); // still inside the click: the browser lets this context play sound
    if (!(await this.authorized())) {
      await engine.close();
      this.running = false;
      this.el.start.disabled = false;
      return;
    }
    this.engine = engine;
    try {
      this.stream = await openMedia({ video: this.video });
    } catch (e) {
      await this.engine.close();
      this.engine = null;
      this.running = false;
      this.el.start.disabled = false;
      this.fail("mic", mediaErrorMessage(e, this.video ? "microphone and camera" : "microphone"));
      return;
    }
    if (this.stream.cameraError) this.notice("camera", mediaErrorMessage(this.stream.cameraError, "camera"), "warn");
    try {
      await this.engine.start(this.stream);
    } catch (e) {
      this.fail("audio", `Could not start audio processing: ${e.message}`);
      await this.stop();
      return;
    }
    if (this.engine.suspended) {
      this.notice("sound", "The browser is holding back sound: click anywhere on the page to enable it.", "warn");
      const resume = () => this.engine && this.engine.resume().then(() => this.clearNotice("sound"));
      document.addEventListener("pointerdown", resume, { once: true });
    }
    this.client = new RealtimeClient({
      apiKey: this.el.apiKey ? this.el.apiKey.value.trim() : "",
      onStatus: (s) => this.onStatus(s),
    });
    this.client.on("*", (ev) => this.onEvent(ev));
    this.client.connect();
    this.el.start.disabled = false;
    this.el.start.textContent = "Stop";
    this.el.start.classList.add("active");
    this.el.mute.disabled = false;
    this.emit("started", this.stream);
  }

  async stop() {
    this.running = false;
    if (this.client) this.client.close();
    this.client = null;
    if (this.engine) await this.engine.close();
    this.engine = null;
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    this.stream = null;
    this.hook.connected = false;
    this.el.start.disabled = false;
    this.el.start.textContent = "Start";
    this.el.start.classList.remove("active");
    this.el.mute.disabled = true;
    this.el.level.style.setProperty("--level", "0");
    this.resetSession();
    this.hadSession = false; // the next Start is a fresh conversation, not a reconnect
    this.clearNotice("connection");
    this.clearNotice("sound");
    this.emit("stopped");
    this.setState("idle");
  }

  onStatus(s) {
    const wasConnected = this.hook.connected;
    this.hook.connected = s.state === "open";
    if (s.state === "connecting") {
      this.setState(this.hadSession ? "reconnecting" : "connecting");
    } else if (s.state === "open") {
      this.clearNotice("connection");
      if (this.hadSession) {
        // a new socket is a new server session: its audio timeline and conversation start from zero
        this.resetSession();
        this.note("Reconnected: a new session started (the assistant does not remember the earlier conversation).");
      }
    } else if (s.state === "reconnecting") {
      this.abandonReply();
      const secs = (s.delayMs / 1000).toFixed(1);
      const why = s.code === 1008 ? " (refused: check the API key)" : "";
      this.fail("connection", `Connection to the server lost${why}. Reconnecting in ${secs} s (attempt ${s.attempt})…`, "warn");
      this.setState("reconnecting");
    } else if (s.state === "closed" && wasConnected && this.running) {
      this.fail("connection", "Disconnected from the server.");
    }
    this.updateState();
  }

  // ---------------------------------------------------------------- microphone -> server
  onMicChunk(pcm, rms) {
    if (this.inject) {
      const { data } = this.inject;
      for (let i = 0; i < pcm.length && this.inject.pos < data.length; i++) {
        const v = pcm[i] / 32768 + data[this.inject.pos++];
        pcm[i] = Math.max(-32768, Math.min(32767, Math.round(v * 32767)));
      }
      if (this.inject.pos >= data.length) this.inject = null;
      rms = Math.max(rms, 0.1);
    }
    this.el.level.style.setProperty("--level", this.muted ? "0" : Math.min(1, rms * 6).toFixed(3));
    if (!this.client || !this.client.open) return;
    // muted: silence goes up instead, so the server's timeline runs on and a turn cut by muting still ends
    if (this.muted) pcm.fill(0);
    if (this.client.send({ type: "input_audio_buffer.append", audio: int16ToBase64(pcm) })) {
      this.sessionSamples += pcm.length;
      this.hook.sentAudioMs += (pcm.length * 1000) / RATE;
      this.sendTimes.push([this.sessionSamples, performance.now()]);
      if (this.sendTimes.length > 800) this.sendTimes.splice(0, 100);
    }
  }

  /** samples: base64 PCM16 24 kHz (as the protocol carries audio) or an array of floats in [-1, 1]. */
  injectSpeech(samples) {
    const data = typeof samples === "string" ? Float32Array.from(base64ToInt16(samples), (v) => v / 32768) : Float32Array.from(samples);
    this.inject = { data, pos: 0 };
    return data.length;
  }

  /** performance.now() at which the session's sample `ms` was captured (the chunk holding it was sent). */
  captureTime(ms) {
    const target = (ms * RATE) / 1000;
    for (const [samples, t] of this.sendTimes) if (samples >= target) return t - ((samples - target) * 1000) / RATE;
    return null;
  }

  // ---------------------------------------------------------------- server -> page
  onEvent(ev) {
    const h = this.hook;
    h.events[ev.type] = (h.events[ev.type] || 0) + 1;
    switch (ev.type) {
      case "session.created":
        this.hadSession = true;
        h.sessionId = ev.session && ev.session.id;
        h.voice = voiceOf(ev.session);
        this.clearNotice("connection");
        if (this.el.voice.value && this.el.voice.value !== voiceOf(ev.session)) this.updateSession();
        this.emit("session", ev.session);
        break;
      case "session.updated":
        h.voice = voiceOf(ev.session) || h.voice; // the voice the server now speaks with
        break;
      case "input_audio_buffer.speech_started":
        this.userSpeaking = true;
        this.bargeIn();
        this.emit("speech_started", ev);
        break;
      case "input_audio_buffer.speech_stopped":
        this.userSpeaking = false;
        this.turnEndAt = this.captureTime(ev.audio_end_ms) ?? performance.now();
        this.emit("speech_stopped", ev);
        break;
      case "conversation.item.added":
      case "conversation.item.created":
        this.addItem(ev.item);
        break;
      case "conversation.item.input_audio_transcription.delta":
        this.appendText(ev.item_id, ev.delta, "user");
        break;
      case "conversation.item.input_audio_transcription.completed":
        this.setText(ev.item_id, ev.transcript, "user");
        break;
      case "response.created":
        this.responseActive = true;
        this.responseAudio = 0;
        break;
      case "response.output_item.added":
        if (ev.item && ev.item.role === "assistant") {
          this.assistantItem = ev.item.id;
          this.addItem(ev.item);
        }
        break;
      case "response.output_audio.delta":
      case "response.audio.delta":
        this.onAudioDelta(ev);
        break;
      case "response.output_audio.done":
      case "response.audio.done":
        if (this.engine) this.engine.endItem(ev.item_id);
        break;
      case "response.output_audio_transcript.delta":
      case "response.audio_transcript.delta":
      case "response.output_text.delta":
      case "response.text.delta":
        if (!this.cut.has(ev.item_id)) this.appendText(ev.item_id, ev.delta, "assistant");
        break;
      case "response.done":
        this.onResponseDone(ev.response || {});
        break;
      case "error":
        this.onServerError(ev.error || {});
        break;
    }
    this.updateState();
  }

  onAudioDelta(ev) {
    const item = ev.item_id;
    if (this.cut.has(item) || !this.engine) return;
    const pcm = base64ToInt16(ev.delta);
    this.assistantItem = item;
    this.received.set(item, (this.received.get(item) || 0) + pcm.length);
    this.responseAudio += pcm.length;
    this.hook.receivedAudioMs += (pcm.length * 1000) / RATE;
    this.engine.play(item, pcm);
  }

  onResponseDone(r) {
    this.responseActive = false;
    if (!this.responseAudio) this.turnEndAt = null; // nothing to play: no latency to measure for this turn
    if (r.status === "failed") {
      const d = (r.status_details && r.status_details.error) || {};
      this.fail("server", `The reply failed: ${d.message || d.code || "unknown error"}`);
    }
    const ids = (r.output || []).map((o) => o.id).concat(this.assistantItem ? [this.assistantItem] : []);
    for (const id of ids) {
      if (id && this.items.has(id)) this.items.get(id).li.classList.remove("pending");
      if (id && this.engine && !this.cut.has(id)) this.engine.endItem(id); // play out the tail without prebuffering
    }
  }

  onServerError(err) {
    const msg = err.message || err.code || "unknown error";
    this.fail("server", `Server error${err.code ? ` (${err.code})` : ""}: ${msg}`);
  }

  // ---------------------------------------------------------------- playback -> page
  onPlayback(m) {
    if (m.type === "start") {
      this.audible = true;
      if (this.turnEndAt != null) {
        const ms = performance.now() - this.turnEndAt;
        this.turnEndAt = null;
        this.hook.latencyMs = Math.round(ms);
        this.el.latency.textContent = `${(ms / 1000).toFixed(2)} s`;
        this.el.latency.classList.remove("none");
      }
    } else if (m.type === "idle" || m.type === "stopped") {
      this.audible = false;
    }
    if (m.item != null && m.played != null) this.played.set(m.item, m.played);
    if (m.total != null) this.hook.playedAudioMs = (m.total * 1000) / RATE;
    this.updateState();
  }

  /** The person started speaking: silence the assistant and tell the server how much of its reply was heard. */
  async bargeIn() {
    const item = this.assistantItem;
    if (!this.engine || !item || this.cut.has(item)) return;
    const received = this.received.get(item) || 0;
    const heardAll = !this.responseActive && !this.audible && (this.played.get(item) || 0) >= received;
    if (received === 0 || heardAll) {
      if (this.responseActive) this.cut.add(item); // the server cancels the reply; drop what is still in flight
      return;
    }
    this.cut.add(item);
    const r = await this.engine.stopPlayback();
    const played = r && r.item === item ? r.played : this.played.get(item) || 0;
    this.markInterrupted(item);
    const audioEndMs = Math.floor((Math.min(played, received) * 1000) / RATE);
    if (this.client && this.client.send({ type: "conversation.item.truncate", item_id: item, content_index: 0, audio_end_ms: audioEndMs })) {
      this.hook.truncatesSent += 1;
    }
  }

  /** Connection lost mid-reply: stop the audio of a session that no longer exists. */
  abandonReply() {
    if (this.engine) this.engine.stopPlayback();
    this.responseActive = this.userSpeaking = false;
    this.turnEndAt = null;
  }

  // ---------------------------------------------------------------- transcript
  addItem(item) {
    if (!item || !item.id || item.type !== "message" || item.role === "system") return;
    const parts = item.content || [];
    if (item.role === "user" && parts.length && parts.every((p) => p.type === "input_image")) {
      return; // camera frames: counted, not shown
    }
    const entry = this.entry(item.id, item.role);
    const text = parts
      .map((p) => p.text || p.transcript || (p.type === "input_image" ? "(image)" : ""))
      .filter(Boolean)
      .join(" ");
    if (text) this.setText(item.id, text, item.role);
    else if (item.role === "user" && !entry.text) entry.span.textContent = "(audio)";
  }

  entry(id, role) {
    let e = this.items.get(id);
    if (e) return e;
    const li = document.createElement("li");
    li.className = `msg ${role}${role === "assistant" ? " pending" : ""}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const span = document.createElement("span");
    span.className = "text";
    li.append(who, span);
    this.el.transcript.append(li);
    e = { li, span, text: "", role };
    this.items.set(id, e);
    this.scrollTranscript();
    return e;
  }

  appendText(id, delta, role) {
    if (!id || !delta) return;
    const e = this.entry(id, role);
    e.text += delta;
    e.span.textContent = e.text;
    this.scrollTranscript();
  }

  setText(id, text, role) {
    if (!id || text == null) return;
    const e = this.entry(id, role);
    e.text = text;
    e.span.textContent = text || (role === "user" ? "(audio)" : "");
    this.scrollTranscript();
  }

  markInterrupted(id) {
    const e = this.items.get(id);
    if (e) {
      e.li.classList.remove("pending");
      e.li.classList.add("interrupted");
    }
  }

  note(text) {
    const li = document.createElement("li");
    li.className = "note";
    li.textContent = text;
    this.el.transcript.append(li);
    this.scrollTranscript();
  }

  scrollTranscript() {
    const t = this.el.transcript;
    t.scrollTop = t.scrollHeight;
  }

  // ---------------------------------------------------------------- indicator, notices, stats
  updateState() {
    if (!this.running) return this.setState("idle");
    if (!this.hook.connected) return this.setState(this.hadSession ? "reconnecting" : "connecting");
    if (this.userSpeaking) return this.setState("user");
    if (this.audible) return this.setState("assistant");
    if (this.responseActive || this.turnEndAt != null) return this.setState("thinking");
    this.setState("listening");
  }

  setState(s) {
    if (this.hook.state === s && this.el.state.dataset.state === s) return;
    this.hook.state = s;
    this.el.state.dataset.state = s;
    this.el.stateText.textContent = STATE_TEXT[s];
  }

  fail(key, text, level = "error") {
    if (level === "error") this.hook.lastError = text;
    this.notice(key, text, level);
  }

  notice(key, text, level = "error") {
    let n = this.el.notices.querySelector(`[data-key="${key}"]`);
    if (!n) {
      n = document.createElement("div");
      n.dataset.key = key;
      const msg = document.createElement("span");
      const close = document.createElement("button");
      close.type = "button";
      close.className = "dismiss";
      close.setAttribute("aria-label", "Dismiss message");
      close.textContent = "×";
      close.addEventListener("click", () => n.remove());
      n.append(msg, close);
      this.el.notices.append(n);
    }
    n.className = `notice ${level}`;
    n.setAttribute("role", level === "error" ? "alert" : "status");
    n.firstChild.textContent = text;
  }

  clearNotice(key) {
    const n = this.el.notices.querySelector(`[data-key="${key}"]`);
    if (n) n.remove();
  }

  renderStats() {
    const h = this.hook;
    const s = (ms) => `${(ms / 1000).toFixed(1)} s`;
    let text = `sent ${s(h.sentAudioMs)} · received ${s(h.receivedAudioMs)} · played ${s(h.playedAudioMs)}`;
    if (this.video) text += ` · frames ${h.framesSent}`;
    if (this.el.stats.textContent !== text) this.el.stats.textContent = text;
  }

  /** Send a client event on the current connection (null when not connected). */
  send(event) {
    return this.client ? this.client.send(event) : null;
  }
}

function voiceOf(session) {
  if (!session) return null;
  return (session.audio && session.audio.output && session.audio.output.voice) || session.voice || null;
}
