// Microphone capture AudioWorklet: resamples the context rate to 24 kHz mono and posts PCM16 chunks.
//
// Downsampling goes through a windowed-sinc low-pass (cut-off just under the new Nyquist) before linear
// interpolation, so 48 kHz -> 24 kHz does not alias; the fractional read position is carried across render
// quanta so the stream has no seams. Each message is {pcm: ArrayBuffer (Int16, chunkMs long), rms: float}; the
// buffer is transferred, not copied.

function lowpass(cutoff, taps) {
  // cutoff in cycles per input sample (< 0.5); Blackman window; unit gain at DC
  const h = new Float32Array(taps);
  const mid = (taps - 1) / 2;
  let sum = 0;
  for (let i = 0; i < taps; i++) {
    const x = i - mid;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    const w = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (taps - 1)) + 0.08 * Math.cos((4 * Math.PI * i) / (taps - 1));
    h[i] = sinc * w;
    sum += h[i];
  }
  for (let i = 0; i < taps; i++) h[i] /= sum;
  return h;
}

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.outRate = o.targetRate || 24000;
    this.step = sampleRate / this.outRate; // input samples per output sample
    this.chunk = Math.max(1, Math.round((this.outRate * (o.chunkMs || 40)) / 1000));
    this.out = new Int16Array(this.chunk);
    this.n = 0;
    this.sq = 0;
    this.taps = this.step > 1.001 ? lowpass((0.45 / this.step), 31) : null;
    this.ring = this.taps ? new Float32Array(this.taps.length) : null;
    this.ringPos = 0;
    this.filtered = new Float32Array(128);
    this.t = 0; // position of the next output sample, in input samples relative to the current block
    this.last = 0; // last (filtered) input sample of the previous block, index -1
  }

  filter(x) {
    if (!this.taps) return x;
    if (this.filtered.length < x.length) this.filtered = new Float32Array(x.length);
    const h = this.taps, ring = this.ring, L = h.length, y = this.filtered;
    let p = this.ringPos;
    for (let i = 0; i < x.length; i++) {
      ring[p] = x[i];
      let acc = 0;
      let k = p;
      for (let j = 0; j < L; j++) {
        acc += h[j] * ring[k];
        k = k === 0 ? L - 1 : k - 1;
      }
      y[i] = acc;
      p = p + 1 === L ? 0 : p + 1;
    }
    this.ringPos = p;
    return y.subarray(0, x.length);
  }

  emit(v) {
    const s = Math.max(-1, Math.min(1, v));
    this.sq += s * s;
    this.out[this.n++] = s < 0 ? Math.round(s * 32768) : Math.round(s * 32767);
    if (this.n === this.chunk) {
      const rms = Math.sqrt(this.sq / this.chunk);
      this.port.postMessage({ pcm: this.out.buffer, rms }, [this.out.buffer]);
      this.out = new Int16Array(this.chunk);
      this.n = 0;
      this.sq = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || !input[0]) return true;
    let mono = input[0];
    if (input.length > 1) {
      // average the channels (a stereo microphone)
      const m = new Float32Array(mono.length);
      for (let c = 0; c < input.length; c++) for (let i = 0; i < m.length; i++) m[i] += input[c][i] / input.length;
      mono = m;
    }
    const x = this.filter(mono);
    const N = x.length;
    let t = this.t;
    while (t < N - 1) {
      const i = Math.floor(t);
      const frac = t - i;
      const a = i < 0 ? this.last : x[i];
      const b = x[i + 1];
      this.emit(a + (b - a) * frac);
      t += this.step;
    }
    this.t = t - N;
    this.last = x[N - 1];
    return true;
  }
}

registerProcessor("omnivox-capture", CaptureProcessor);
