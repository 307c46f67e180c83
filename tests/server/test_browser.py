"""The browser pages in headless Debian Chromium against `omnivox serve` on a tiny random checkpoint.

Chromium's fake microphone plays a WAV (silence, a speech-like burst, silence) once; the call page's fake camera
loops a Y4M of colour bars. The pages report what they do through `window.omnivox`; a second burst of speech is
mixed into the outgoing microphone stream with `window.omnivoxDebug.injectSpeech` while the reply plays, so the
server's VAD hears the person talk over the assistant. Screenshots go to artifacts/screenshots/.
"""

import base64
import time
from pathlib import Path

import numpy as np
import pytest

from browser_support import CHROMIUM, chromium_args, write_turn_wav, write_y4m
from speechlike import silence, speechlike, to_pcm16, write_wav

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402
from server_support import LiveServer, free_port, omni  # noqa: E402,F401 (omni: module fixture)

from omnivox.server.app import ServerOptions  # noqa: E402
from omnivox.server.realtime import SessionLimits  # noqa: E402

SHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
# a reply of up to 8 s of speech (paced at real time), long enough to be talked over
LIMITS = dict(max_output_tokens=48, max_codec_tokens=400)


def Server(omni, **limits) -> LiveServer:
    """The browser tests' server: no API key, LIMITS unless overridden."""
    return LiveServer(omni, ServerOptions(port=free_port(), limits=SessionLimits(**{**LIMITS, **limits})))


@pytest.fixture(scope="module")
def server(omni):
    with Server(omni) as s:
        yield s


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("fake_media")
    return write_turn_wav(d / "turn.wav"), write_y4m(d / "camera.y4m")


@pytest.fixture(scope="module")
def quiet_mic(tmp_path_factory):
    """A fake microphone that only hears silence: speech comes from speak_over when a test wants it."""
    return write_wav(tmp_path_factory.mktemp("quiet") / "quiet.wav", silence(30.0, 48000), 48000)


@pytest.fixture
def open_page():
    """open_page(url, wav, y4m=None, fake_ui=True) -> Playwright page in a fresh headless Chromium."""
    with sync_playwright() as p:
        browsers = []

        def make(url, wav, y4m=None, fake_ui=True):
            args = chromium_args(wav, y4m)
            if not fake_ui:
                args.remove("--use-fake-ui-for-media-stream")
            browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
            browsers.append(browser)
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            page.goto(url)
            page.wait_for_function("window.omnivox !== undefined", timeout=10000)
            return page

        yield make
        for b in browsers:
            b.close()


def hook(page) -> dict:
    return page.evaluate("window.omnivox")


def wait_for(page, expr: str, timeout_s: float):
    try:
        page.wait_for_function(expr, timeout=timeout_s * 1000, polling=100)
    except Exception as e:  # say what the page was doing
        raise AssertionError(f"timed out waiting for {expr!r}; window.omnivox = {hook(page)}") from e


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def speak_over(page, seconds=1.2, seed=2):
    """Mix a burst of speech-like audio into the page's outgoing microphone stream."""
    b64 = base64.b64encode(to_pcm16(0.6 * speechlike(seconds, 24000, seed=seed))).decode()
    return page.evaluate("s => window.omnivoxDebug.injectSpeech(s)", b64)


def test_voice_chat_page_talks_plays_the_reply_and_stops_it_on_barge_in(server, media, open_page):
    wav, _ = media
    page = open_page(server.base + "/", wav)
    wait_for(page, "document.querySelectorAll('#voice option').length > 0 && !document.querySelector('#voice').disabled", 10)
    assert page.eval_on_selector("#voice", "s => s.value") == "Chelsie"
    page.click("#start")
    wait_for(page, "window.omnivox.connected && window.omnivox.sessionId", 10)
    sent0 = hook(page)["sentAudioMs"]
    # the fake microphone's burst is heard as one turn by the server's VAD
    wait_for(page, "window.omnivox.events['input_audio_buffer.speech_stopped'] >= 1", 20)
    h = hook(page)
    assert h["sentAudioMs"] > sent0 + 1000
    assert h["events"]["input_audio_buffer.speech_started"] >= 1
    # the reply comes back and reaches the speakers
    wait_for(page, "window.omnivox.playedAudioMs > 200", 30)
    h = hook(page)
    assert h["receivedAudioMs"] >= h["playedAudioMs"] > 200
    assert h["latencyMs"] is not None and 0 < h["latencyMs"] < 30000
    assert page.inner_text("#latency").endswith(" s")
    assert page.locator("#transcript .msg.user").count() >= 1
    assert page.locator("#transcript .msg.assistant").count() >= 1
    # the person talks over the reply: playback stops and the unheard part is reported with a truncate
    assert h["truncatesSent"] == 0
    speak_over(page)
    wait_for(page, "window.omnivox.truncatesSent >= 1", 10)
    played_at_stop = hook(page)["playedAudioMs"]
    time.sleep(0.5)  # the injected speech lasts 1.2 s: no new reply can start yet
    h = hook(page)
    assert h["playedAudioMs"] == played_at_stop, "playback went on after the barge-in"
    assert h["state"] == "user" and page.locator("#state").get_attribute("data-state") == "user"
    wait_for(page, "window.omnivox.events['conversation.item.truncated'] >= 1", 5)
    assert page.locator("#transcript .msg.interrupted").count() == 1
    h = hook(page)
    assert h["lastError"] is None and "error" not in h["events"], h
    assert not page.errors, page.errors
    shot(page, "voice_chat")


def test_call_page_sends_camera_frames_and_plays_the_reply(server, media, open_page):
    wav, y4m = media
    page = open_page(server.base + "/call", wav, y4m)
    wait_for(page, "!document.querySelector('#voice').disabled", 10)
    page.select_option("#voice", "Ethan")  # chosen before Start: applied with session.update once connected
    page.click("#start")
    wait_for(page, "window.omnivox.connected", 10)
    wait_for(page, "window.omnivox.events['session.updated'] >= 1", 10)
    assert hook(page)["voice"] == "Ethan"
    wait_for(page, "document.querySelector('#preview').videoWidth > 0", 10)
    wait_for(page, "window.omnivox.framesSent >= 1", 10)
    wait_for(page, "window.omnivox.events['input_audio_buffer.speech_stopped'] >= 1", 20)
    h = hook(page)
    # one frame at once, then about one a second while the person spoke (2 s burst)
    assert h["framesSent"] >= 2, h
    wait_for(page, "window.omnivox.playedAudioMs > 200", 30)
    h = hook(page)
    # each frame became a user item on the server and none was refused
    assert h["events"].get("conversation.item.added", 0) >= h["framesSent"]
    assert h["lastError"] is None and "error" not in h["events"], h
    assert not page.errors, page.errors
    assert page.inner_text("#stats").endswith(f"frames {h['framesSent']}")
    shot(page, "video_call")


def test_denied_microphone_is_explained(server, media, open_page):
    wav, _ = media
    page = open_page(server.base + "/", wav, fake_ui=False)  # no auto-accept: headless denies the permission
    page.click("#start")
    wait_for(page, "window.omnivox.lastError !== null", 10)
    assert "denied" in hook(page)["lastError"]
    notice = page.locator("#notices .notice.error")
    assert notice.count() == 1 and "denied" in notice.inner_text()
    assert notice.get_attribute("role") == "alert"
    assert page.inner_text("#start") == "Start" and not hook(page)["connected"]
    shot(page, "mic_denied")


def test_server_error_and_lost_connection_are_shown_and_the_page_reconnects(omni, media, open_page):
    wav, _ = media
    with Server(omni, max_session_s=2.0) as server:  # the server ends each session after 2 s
        page = open_page(server.base + "/", wav)
        page.click("#start")
        wait_for(page, "window.omnivox.connected && window.omnivox.sessionId", 10)
        first = hook(page)["sessionId"]
        wait_for(page, "window.omnivox.lastError !== null", 10)
        assert "session_expired" in hook(page)["lastError"]
        wait_for(page, "document.querySelector('#notices [data-key=connection]') !== null", 5)
        assert "Reconnecting" in page.inner_text("#notices [data-key=connection]")
        wait_for(page, f"window.omnivox.connected && window.omnivox.sessionId && window.omnivox.sessionId !== '{first}'", 10)
        assert page.locator("#transcript .note").count() >= 1
        shot(page, "reconnected")


def test_mute_sends_silence_so_the_server_hears_nothing_until_unmuted(server, quiet_mic, open_page):
    page = open_page(server.base + "/", quiet_mic)
    assert page.get_attribute("#mute", "disabled") is not None            # nothing to mute before Start
    page.click("#start")
    wait_for(page, "window.omnivox.connected && window.omnivox.sessionId", 10)
    page.click("#mute")
    assert page.inner_text("#mute") == "Unmute" and page.get_attribute("#mute", "aria-pressed") == "true"
    assert page.evaluate("document.body.classList.contains('muted')")
    sent = hook(page)["sentAudioMs"]
    speak_over(page, seconds=1.5)                                         # the person talks while muted
    time.sleep(3.0)
    h = hook(page)
    # the microphone stream goes on (silence keeps the server's timeline running) but no speech reaches it
    assert h["sentAudioMs"] > sent + 2500, h
    assert h["events"].get("input_audio_buffer.speech_started", 0) == 0, h
    assert page.evaluate("getComputedStyle(document.querySelector('#level')).getPropertyValue('--level').trim()") \
        == "0"
    page.click("#mute")
    assert page.inner_text("#mute") == "Mute" and page.get_attribute("#mute", "aria-pressed") == "false"
    speak_over(page, seconds=1.5, seed=4)
    wait_for(page, "window.omnivox.events['input_audio_buffer.speech_started'] >= 1", 10)
    h = hook(page)
    assert h["lastError"] is None and "error" not in h["events"], h
    assert not page.errors, page.errors
    page.click("#start")                                                  # Stop: mute is off limits again
    wait_for(page, "!window.omnivox.connected", 5)
    assert page.get_attribute("#mute", "disabled") is not None
    shot(page, "mute")


def test_camera_off_stops_frames_and_the_track_and_camera_on_resumes_them(server, quiet_mic, media, open_page):
    _, y4m = media
    page = open_page(server.base + "/call", quiet_mic, y4m)
    page.click("#start")
    wait_for(page, "window.omnivox.connected && window.omnivox.sessionId", 10)
    wait_for(page, "window.omnivox.framesSent >= 1", 10)                  # the first view goes at once
    page.click("#camera")
    assert page.inner_text("#camera") == "Camera on" and page.get_attribute("#camera", "aria-pressed") == "true"
    assert page.evaluate("document.body.classList.contains('camera-off')")
    track = "document.querySelector('#preview').srcObject.getVideoTracks()[0]"
    assert page.evaluate(f"{track}.enabled") is False                    # the camera itself is switched off
    frames = hook(page)["framesSent"]
    speak_over(page, seconds=1.5)                                         # speech would send a fresh view
    wait_for(page, "window.omnivox.events['input_audio_buffer.speech_started'] >= 1", 10)
    time.sleep(2.0)
    assert hook(page)["framesSent"] == frames, "a frame was sent with the camera off"
    page.click("#camera")
    assert page.inner_text("#camera") == "Camera off" and page.get_attribute("#camera", "aria-pressed") == "false"
    assert page.evaluate(f"{track}.enabled") is True
    wait_for(page, "window.omnivox.events['input_audio_buffer.speech_stopped'] >= 1", 10)
    speak_over(page, seconds=1.5, seed=5)
    wait_for(page, f"window.omnivox.framesSent > {frames}", 15)
    h = hook(page)
    assert h["lastError"] is None and "error" not in h["events"], h
    assert not page.errors, page.errors
    shot(page, "camera_toggle")


def test_api_key_field_unlocks_a_server_that_needs_one(omni, quiet_mic, open_page):
    options = ServerOptions(port=free_port(), api_key="s3cret-key", limits=SessionLimits(**LIMITS))
    with LiveServer(omni, options) as server:
        page = open_page(server.base + "/", quiet_mic)
        # without a key: the voice list says why it is missing, Start explains instead of retrying forever
        wait_for(page, "document.querySelector('#notices [data-key=voices]') !== null", 10)
        assert "needs an API key" in page.inner_text("#notices [data-key=voices]")
        page.click("#start")
        wait_for(page, "window.omnivox.lastError !== null", 10)
        assert "needs an API key" in hook(page)["lastError"]
        assert page.evaluate("document.querySelector('details.settings').open")
        assert page.evaluate("document.activeElement.id") == "api-key"
        assert page.inner_text("#start") == "Start" and not hook(page)["connected"]
        # a wrong key is refused and said so
        page.fill("#api-key", "wrong")
        page.dispatch_event("#api-key", "change")
        page.click("#start")
        wait_for(page, "window.omnivox.lastError.includes('refused this API key')", 10)
        assert not hook(page)["connected"] and hook(page)["sentAudioMs"] == 0
        # the right key: voices load, the session opens, the key stays in this tab only
        page.fill("#api-key", "s3cret-key")
        page.dispatch_event("#api-key", "change")
        wait_for(page, "!document.querySelector('#voice').disabled", 10)
        assert page.locator("#notices [data-key=voices]").count() == 0
        assert page.locator("#notices [data-key=auth]").count() == 0
        page.click("#start")
        wait_for(page, "window.omnivox.connected && window.omnivox.sessionId", 10)
        assert page.evaluate("sessionStorage.getItem('omnivox.apiKey')") == "s3cret-key"
        assert "s3cret-key" not in page.evaluate("JSON.stringify(localStorage)")
        page.click("#start")
        page.reload()
        page.wait_for_function("window.omnivox !== undefined", timeout=10000)
        assert page.input_value("#api-key") == "s3cret-key"
        wait_for(page, "!document.querySelector('#voice').disabled", 10)
        assert not page.errors, page.errors
        shot(page, "api_key")


# audio crosses the Playwright boundary as base64 (a JSON array of samples takes seconds to serialize)
B64_JS = """
const toB64 = (buf) => { const u = new Uint8Array(buf); let s = "";
  for (let i = 0; i < u.length; i += 0x8000) s += String.fromCharCode.apply(null, u.subarray(i, i + 0x8000));
  return btoa(s); };
const fromB64 = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)).buffer;
"""

CAPTURE_JS = "async ([freq, rate]) => {" + B64_JS + """
  const ctx = new OfflineAudioContext(1, rate, rate);  // 1 s
  await ctx.audioWorklet.addModule("/static/capture-worklet.js");
  const node = new AudioWorkletNode(ctx, "omnivox-capture", {numberOfOutputs: 1, outputChannelCount: [1],
    processorOptions: {targetRate: 24000, chunkMs: 40}});
  const chunks = [];
  node.port.onmessage = (e) => chunks.push(toB64(e.data.pcm));
  const osc = new OscillatorNode(ctx, {frequency: freq});
  osc.connect(new GainNode(ctx, {gain: 0.5})).connect(node).connect(ctx.destination);
  osc.start();
  await ctx.startRendering();
  await new Promise((r) => setTimeout(r, 300));  // the last port messages
  return chunks;
}"""

PLAYBACK_JS = "async ([b64, rate, stopAt]) => {" + B64_JS + """
  const pcm = new Int16Array(fromB64(b64));
  const ctx = new OfflineAudioContext(1, rate / 2, rate);  // 0.5 s
  await ctx.audioWorklet.addModule("/static/playback-worklet.js");
  const node = new AudioWorkletNode(ctx, "omnivox-playback", {numberOfInputs: 0, numberOfOutputs: 1,
    outputChannelCount: [1], processorOptions: {sourceRate: 24000, prebufferMs: 80, maxBufferMs: 15000, fadeMs: 6}});
  const msgs = [];
  node.port.onmessage = (e) => msgs.push(e.data);
  node.connect(ctx.destination);
  for (let i = 0; i < pcm.length; i += 2400) {  // 100 ms deltas
    const chunk = Int16Array.from(pcm.slice(i, i + 2400));
    node.port.postMessage({type: "push", item: "item_1", pcm: chunk.buffer}, [chunk.buffer]);
  }
  node.port.postMessage({type: "end", item: "item_1"});
  if (stopAt) ctx.suspend(stopAt).then(() => { node.port.postMessage({type: "stop"}); setTimeout(() => ctx.resume(), 100); });
  await new Promise((r) => setTimeout(r, 200));  // the queued chunks reach the worklet first
  const out = await ctx.startRendering();
  await new Promise((r) => setTimeout(r, 300));
  return {out: toB64(out.getChannelData(0).buffer), msgs: msgs.filter((m) => m.type !== "progress")};
}"""


def sine_fit(x, freq, rate):
    """(amplitude, residual level in dB relative to it) of the best freq-Hz sinusoid through x."""
    t = np.arange(len(x)) / rate
    a = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t), np.ones_like(t)], 1)
    coef, *_ = np.linalg.lstsq(a, x, rcond=None)
    amp = float(np.hypot(coef[0], coef[1]))
    return amp, float(20 * np.log10((x - a @ coef).std() / amp))


def test_worklets_resample_to_24k_without_aliasing_and_count_played_samples(server, media, open_page):
    page = open_page(server.base + "/", media[0])
    # capture: 48 kHz and 44.1 kHz contexts -> 24 kHz PCM16 in 40 ms chunks, a clean 1 kHz tone
    for rate in (48000, 44100):
        chunks = [np.frombuffer(base64.b64decode(c), "<i2") for c in page.evaluate(CAPTURE_JS, [1000, rate])]
        assert {len(c) for c in chunks} == {960}
        x = np.concatenate(chunks).astype(np.float64) / 32768
        assert abs(len(x) - 24000) <= 960
        amp, resid_db = sine_fit(x[100:], 1000, 24000)
        assert abs(amp - 0.5) < 0.005 and resid_db < -45, (rate, amp, resid_db)
    # a 15 kHz tone cannot exist at 24 kHz: the low-pass keeps it from aliasing down to 9 kHz
    x = np.concatenate([np.frombuffer(base64.b64decode(c), "<i2") for c in page.evaluate(CAPTURE_JS, [15000, 48000])])
    x = x.astype(np.float64) / 32768
    assert 20 * np.log10(x[100:].std() * np.sqrt(2) / 0.5) < -50

    # playback: 0.3 s of a 24 kHz tone at 48 kHz, faded in and out, every sample counted
    tone = base64.b64encode(to_pcm16(0.5 * np.sin(2 * np.pi * 1000 * np.arange(7200) / 24000))).decode()
    r = page.evaluate(PLAYBACK_JS, [tone, 48000, 0])
    y = np.frombuffer(base64.b64decode(r["out"]), "<f4").astype(np.float64)
    on = np.nonzero(np.abs(y) > 1e-6)[0]
    assert abs((on[-1] - on[0] + 1) - 14400) <= 2  # 0.3 s, no gap, nothing lost or repeated
    amp, resid_db = sine_fit(y[on[0] + 480:on[-1] - 480], 1000, 48000)
    assert abs(amp - 0.5) < 0.01 and resid_db < -40, (amp, resid_db)
    assert np.abs(np.diff(y)).max() < 0.068  # no step beyond the tone's own slope (0.065): no clicks
    assert np.abs(y[on[0]:on[0] + 48]).max() < 0.1  # fade in
    assert [m["type"] for m in r["msgs"]] == ["start", "idle"]
    assert r["msgs"][1] == {"type": "idle", "item": "item_1", "played": 7200, "total": 7200}

    # stop (barge-in) at 0.1 s: a 6 ms fade, then silence; the report says what was heard
    r = page.evaluate(PLAYBACK_JS, [tone, 48000, 0.1])
    y = np.frombuffer(base64.b64decode(r["out"]), "<f4").astype(np.float64)
    stopped = r["msgs"][-1]
    assert stopped["type"] == "stopped" and stopped["item"] == "item_1"
    assert 0.1 * 24000 <= stopped["played"] <= 0.12 * 24000 and stopped["dropped"] > 0
    last = np.nonzero(np.abs(y) > 1e-6)[0][-1]
    assert abs(last / 48000 - stopped["played"] / 24000) < 0.002
    assert np.abs(np.diff(y)).max() < 0.068
