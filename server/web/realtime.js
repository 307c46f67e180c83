// Realtime websocket client (OpenAI Realtime GA protocol, subprotocol "realtime") with automatic reconnect.
//
// Each connection is a new server session (the server keeps no history across sockets). After an unexpected close
// it reconnects with exponential backoff (0.5 s doubling to 10 s, with jitter); the attempt counter resets once a
// session is created. Events go to handlers registered with on(type, fn); "*" receives every event.

export function realtimeURL(path = "/v1/realtime") {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}${path}`;
}

export class RealtimeClient {
  /**
   * onStatus({state, attempt, delayMs, code, reason}) with state in
   * "connecting" | "open" | "reconnecting" | "closed".
   */
  constructor({ url = realtimeURL(), apiKey = "", onStatus = () => {} } = {}) {
    this.url = url;
    this.apiKey = apiKey;
    this.onStatus = onStatus;
    this.handlers = new Map();
    this.ws = null;
    this.wanted = false;
    this.attempt = 0;
    this.timer = null;
    this.seq = 0;
  }

  on(type, fn) {
    if (!this.handlers.has(type)) this.handlers.set(type, []);
    this.handlers.get(type).push(fn);
    return this;
  }

  get open() {
    return !!this.ws && this.ws.readyState === WebSocket.OPEN;
  }

  connect() {
    this.wanted = true;
    clearTimeout(this.timer);
    const protocols = ["realtime"];
    if (this.apiKey) protocols.push(`openai-insecure-api-key.${this.apiKey}`);
    this.onStatus({ state: "connecting", attempt: this.attempt });
    let ws;
    try {
      ws = new WebSocket(this.url, protocols);
    } catch (e) {
      this.onStatus({ state: "closed", reason: String(e.message || e) });
      return;
    }
    this.ws = ws;
    ws.onopen = () => this.onStatus({ state: "open", attempt: this.attempt });
    ws.onmessage = (e) => {
      let ev;
      try {
        ev = JSON.parse(e.data);
      } catch {
        return;
      }
      if (ev.type === "session.created") this.attempt = 0;
      this.dispatch(ev);
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (!this.wanted) {
        this.onStatus({ state: "closed", code: e.code, reason: e.reason });
        return;
      }
      const delayMs = Math.min(10000, 500 * 2 ** this.attempt) * (0.8 + 0.4 * Math.random());
      this.attempt += 1;
      this.onStatus({ state: "reconnecting", attempt: this.attempt, delayMs, code: e.code, reason: e.reason });
      this.timer = setTimeout(() => this.wanted && this.connect(), delayMs);
    };
  }

  dispatch(ev) {
    for (const key of [ev.type, "*"]) for (const fn of this.handlers.get(key) || []) fn(ev);
  }

  /** Send a client event; returns its event_id, or null when not connected (the event is dropped). */
  send(event) {
    if (!this.open) return null;
    const id = `evt_c${Date.now().toString(36)}${(this.seq++).toString(36)}`;
    this.ws.send(JSON.stringify({ event_id: id, ...event }));
    return id;
  }

  close() {
    this.wanted = false;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000, "bye");
    else this.onStatus({ state: "closed" });
  }
}
