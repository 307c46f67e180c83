// Assistant speech playback AudioWorklet: a small bounded jitter buffer of 24 kHz chunks, resampled to the context
// rate by linear interpolation, with short fades so starts, stops, underruns and ends do not click.
//
// Messages in:  {type: "push", item, pcm: ArrayBuffer Int16 24 kHz} — queue audio of assistant item `item`
//               {type: "end", item}   — no more audio for this item: play out what is left without prebuffering
//               {type: "stop"}        — barge-in: fade out within fadeMs, drop everything queued, report
// Messages out: {type: "start"}                    — audio became audible after silence (latency measurement)
//               {type: "progress", item, played, total, buffered}   — every ~reportMs while playing
//               {type: "idle", item, played, total} — the queue ran dry (reply finished or underrun)
//               {type: "stopped", item, played, total, dropped} — answer to "stop"
// `played` counts 24 kHz samples of `item` that went to the speakers (including the fade), `total` over the
// session. The queue holds at most maxBufferMs; audio beyond it is dropped (and counted) so memory stays bounded.

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.inRate = o.sourceRate || 24000;
    this.step = this.inRate / sampleRate; // input samples per output sample
    this.prebuffer = Math.round((this.inRate * (o.prebufferMs ?? 80)) / 1000);
    this.maxBuffer = Math.round((this.inRate * (o.maxBufferMs ?? 15000)) / 1000);
    this.fadeStep = 1 / Math.max(1, Math.round((sampleRate * (o.fadeMs ?? 6)) / 1000));
    this.reportEvery = Math.round((sampleRate * (o.reportMs ?? 50)) / 1000);
    this.queue = []; // [{item, data: Float32Array}]
    this.pos = 0; // fractional read position in queue[0].data
    this.buffered = 0; // input samples queued (minus the read position of the head)
    this.ended = new Set(); // items whose audio is complete
    this.playing = false;
    this.gain = 0;
    this.stopping = false;
    this.item = null; // item at the play head
    this.played = 0; // samples of this.item played
    this.total = 0;
    this.dropped = 0;
    this.sinceReport = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(m) {
    if (m.type === "push") {
      const pcm = new Int16Array(m.pcm);
      if (this.buffered + pcm.length > this.maxBuffer) {
        this.dropped += pcm.length;
        return;
      }
      const f = new Float32Array(pcm.length);
      for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 32768;
      this.queue.push({ item: m.item, data: f });
      this.buffered += f.length;
    } else if (m.type === "end") {
      this.ended.add(m.item);
      if (this.ended.size > 64) this.ended.delete(this.ended.values().next().value);
    } else if (m.type === "stop") {
      if (this.playing && this.gain > 0) {
        this.stopping = true; // fade out in process(), then clear
      } else {
        this.clear();
      }
    }
  }

  clear() {
    const item = this.item;
    const dropped = this.buffered;
    this.queue = [];
    this.pos = 0;
    this.buffered = 0;
    this.playing = false;
    this.stopping = false;
    this.gain = 0;
    this.port.postMessage({ type: "stopped", item, played: this.played, total: this.total, dropped });
  }

  sampleAt(k) {
    // input sample at offset k (>= 0) from the head chunk start; holds the last sample when data runs out
    let q = 0;
    while (q < this.queue.length && k >= this.queue[q].data.length) {
      k -= this.queue[q].data.length;
      q++;
    }
    if (q < this.queue.length) return this.queue[q].data[k];
    const lastChunk = this.queue[this.queue.length - 1];
    return lastChunk ? lastChunk.data[lastChunk.data.length - 1] : 0;
  }

  process(_inputs, outputs) {
    const out = outputs[0];
    const ch0 = out[0];
    const frames = ch0.length;
    if (!this.playing) {
      const head = this.queue[0];
      const canStart = head && (this.buffered >= this.prebuffer || this.ended.has(this.queue[this.queue.length - 1].item));
      if (canStart && !this.stopping) {
        this.playing = true;
        this.gain = 0;
        this.port.postMessage({ type: "start" });
      }
    }
    for (let f = 0; f < frames; f++) {
      let v = 0;
      if (this.playing && this.queue.length) {
        const head = this.queue[0];
        if (head.item !== this.item) {
          this.item = head.item;
          this.played = 0;
        }
        const i = Math.floor(this.pos);
        const frac = this.pos - i;
        const a = head.data[i];
        const b = i + 1 < head.data.length ? head.data[i + 1] : this.sampleAt(i + 1);
        // fade out when stopping, or over the last few ms before the queue runs dry (an underrun or the end)
        const remaining = this.buffered - this.pos;
        const draining = remaining / this.step <= 1 / this.fadeStep;
        if (this.stopping || draining) this.gain = Math.max(0, this.gain - this.fadeStep);
        else this.gain = Math.min(1, this.gain + this.fadeStep);
        v = (a + (b - a) * frac) * this.gain;
        const before = i;
        this.pos += this.step;
        const adv = Math.floor(this.pos) - before;
        if (adv > 0) {
          this.played += adv;
          this.total += adv;
        }
        while (this.queue.length && this.pos >= this.queue[0].data.length) {
          this.pos -= this.queue[0].data.length;
          this.buffered -= this.queue[0].data.length;
          this.queue.shift();
          if (this.queue.length && this.queue[0].item !== this.item) break;
        }
        if (this.stopping && this.gain === 0) {
          for (let c = 0; c < out.length; c++) out[c][f] = v;
          this.clear();
          continue;
        }
        if (!this.queue.length) {
          this.playing = false;
          this.pos = 0;
          this.port.postMessage({ type: "idle", item: this.item, played: this.played, total: this.total });
        }
      }
      for (let c = 0; c < out.length; c++) out[c][f] = v;
    }
    this.sinceReport += frames;
    if (this.playing && this.sinceReport >= this.reportEvery) {
      this.sinceReport = 0;
      this.port.postMessage({
        type: "progress",
        item: this.item,
        played: this.played,
        total: this.total,
        buffered: this.buffered - Math.floor(this.pos),
      });
    }
    return true;
  }
}

registerProcessor("omnivox-playback", PlaybackProcessor);
