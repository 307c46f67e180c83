// Audio plumbing shared by both pages: microphone capture at 24 kHz PCM16 and assistant playback, both through
// AudioWorklets on one AudioContext, plus base64 <-> PCM16 helpers.

export const RATE = 24000;

export function int16ToBase64(int16) {
  const bytes = new Uint8Array(int16.buffer, int16.byteOffset, int16.byteLength);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

export function base64ToInt16(b64) {
  const s = atob(b64);
  const n = s.length >> 1;
  const out = new Int16Array(n);
  for (let i = 0; i < n; i++) {
    const lo = s.charCodeAt(2 * i), hi = s.charCodeAt(2 * i + 1);
    out[i] = (hi << 8) | lo; // little endian; the Int16Array store wraps into the signed range
  }
  return out;
}

/** Ask for the microphone (and optionally the camera). Rejects with the browser's DOMException. */
export async function openMedia({ video = false } = {}) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    const e = new Error("This browser cannot capture audio here (a secure context — https or localhost — is required).");
    e.name = "NotSupportedError";
    throw e;
  }
  const audio = { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 };
  if (!video) return navigator.mediaDevices.getUserMedia({ audio });
  try {
    return await navigator.mediaDevices.getUserMedia({
      audio,
      video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 15 } },
    });
  } catch (e) {
    // no usable camera: go on with the microphone alone; the caller shows why
    if (e.name === "NotAllowedError" && !(await micAllowed())) throw e;
    const stream = await navigator.mediaDevices.getUserMedia({ audio });
    stream.cameraError = e;
    return stream;
  }
}

async function micAllowed() {
  try {
    const p = await navigator.permissions.query({ name: "microphone" });
    return p.state !== "denied";
  } catch {
    return true;
  }
}

/** Human sentence for a getUserMedia failure. */
export function mediaErrorMessage(e, what = "microphone") {
  switch (e && e.name) {
    case "NotAllowedError":
    case "SecurityError":
      return `Access to the ${what} was denied. Allow it in the browser's site settings (the icon left of the address), then press Start again.`;
    case "NotFoundError":
    case "OverconstrainedError":
      return `No ${what} was found. Plug one in, then press Start again.`;
    case "NotReadableError":
      return `The ${what} is in use by another application or could not be opened.`;
    case "NotSupportedError":
      return e.message;
    default:
      return `Could not open the ${what}: ${(e && e.message) || e}`;
  }
}

/**
 * One AudioContext with a capture worklet fed by the microphone stream and a playback worklet to the speakers.
 *   onChunk(int16, rms)   — every chunkMs of 24 kHz microphone audio
 *   onPlayback(message)   — messages of the playback worklet (start/progress/idle/stopped)
 */
export class AudioEngine {
  constructor({ onChunk, onPlayback, chunkMs = 40, prebufferMs = 80 }) {
    this.onChunk = onChunk;
    this.onPlayback = onPlayback;
    this.chunkMs = chunkMs;
    this.prebufferMs = prebufferMs;
    this.ctx = null;
    this.stopWaiters = [];
  }

  /** Create the AudioContext: call it synchronously inside the click handler, so autoplay rules let it run. */
  createContext() {
    this.ctx = new AudioContext({ latencyHint: "interactive" });
    return this.ctx;
  }

  async start(stream) {
    const ctx = this.ctx || this.createContext();
    await Promise.all([
      ctx.audioWorklet.addModule("/static/capture-worklet.js"),
      ctx.audioWorklet.addModule("/static/playback-worklet.js"),
    ]);
    this.source = ctx.createMediaStreamSource(stream);
    this.capture = new AudioWorkletNode(ctx, "omnivox-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      channelCount: 1,
      channelCountMode: "explicit",
      processorOptions: { targetRate: RATE, chunkMs: this.chunkMs },
    });
    this.capture.port.onmessage = (e) => this.onChunk(new Int16Array(e.data.pcm), e.data.rms);
    this.source.connect(this.capture);
    // keep the capture node pulled by the graph on every browser: route its (silent) output through a muted gain
    this.sink = ctx.createGain();
    this.sink.gain.value = 0;
    this.capture.connect(this.sink).connect(ctx.destination);
    this.playback = new AudioWorkletNode(ctx, "omnivox-playback", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { sourceRate: RATE, prebufferMs: this.prebufferMs, maxBufferMs: 15000, fadeMs: 6 },
    });
    this.playback.port.onmessage = (e) => {
      if (e.data.type === "stopped") this.stopWaiters.splice(0).forEach((w) => w(e.data));
      this.onPlayback(e.data);
    };
    this.playback.connect(ctx.destination);
    if (ctx.state !== "running") await Promise.race([ctx.resume().catch(() => {}), new Promise((r) => setTimeout(r, 500))]);
  }

  /** The context may stay suspended when the browser wants a gesture first (e.g. after a long permission prompt). */
  get suspended() {
    return !!this.ctx && this.ctx.state === "suspended";
  }

  resume() {
    return this.ctx ? this.ctx.resume() : Promise.resolve();
  }

  play(itemId, int16) {
    if (this.playback) this.playback.port.postMessage({ type: "push", item: itemId, pcm: int16.buffer }, [int16.buffer]);
  }

  endItem(itemId) {
    if (this.playback) this.playback.port.postMessage({ type: "end", item: itemId });
  }

  /** Fade out and drop all queued audio; resolves with {item, played, total} from the worklet. */
  stopPlayback() {
    if (!this.playback) return Promise.resolve(null);
    return new Promise((resolve) => {
      this.stopWaiters.push(resolve);
      this.playback.port.postMessage({ type: "stop" });
      setTimeout(() => resolve(null), 250); // the worklet answers within a render quantum or two
    });
  }

  async close() {
    if (this.source) this.source.disconnect();
    if (this.ctx) await this.ctx.close().catch(() => {});
    this.ctx = this.source = this.capture = this.playback = null;
  }
}
