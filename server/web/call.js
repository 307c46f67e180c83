// Video-call page (/call): the voice assistant of app.js plus a camera preview whose frames go to the model.
//
// Frames are downscaled so the longer side is at most MAX_SIDE px, JPEG-encoded and sent as a user
// conversation.item.create with one input_image part (a data URI): about once a second while the person speaks
// (one at once when speech starts, so a question comes with a fresh view), every SILENT_MS when nobody speaks,
// and none while the assistant is answering in silence (a frame then would land in the middle of its reply).

import { VoiceApp } from "/static/app.js";

const MAX_SIDE = 640;
const SPEAKING_MS = 1000;
const SILENT_MS = 5000;
const JPEG_QUALITY = 0.7;

const app = new VoiceApp({ video: true }).mount();
const video = document.getElementById("preview");
const cameraButton = document.getElementById("camera");
const placeholder = document.getElementById("preview-placeholder");
const flash = document.getElementById("frame-flash");
const canvas = document.createElement("canvas");

let timer = null;
let lastSent = 0;
let speaking = false;
let cameraOn = true;

function track() {
  const s = video.srcObject;
  return s ? s.getVideoTracks()[0] : null;
}

function showPreview(on, text) {
  video.hidden = !on;
  placeholder.hidden = on;
  if (text) placeholder.textContent = text;
}

function grabFrame() {
  const w = video.videoWidth, h = video.videoHeight;
  if (!w || !h || video.readyState < 2) return null;
  const scale = Math.min(1, MAX_SIDE / Math.max(w, h));
  canvas.width = Math.round(w * scale);
  canvas.height = Math.round(h * scale);
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", JPEG_QUALITY);
}

function sendFrame() {
  if (!cameraOn || !track() || !app.hook.connected) return false;
  const dataURI = grabFrame();
  if (!dataURI) return false;
  const id = app.send({
    type: "conversation.item.create",
    item: { type: "message", role: "user", content: [{ type: "input_image", image_url: dataURI }] },
  });
  if (!id) return false;
  lastSent = performance.now();
  app.hook.framesSent += 1;
  flash.classList.remove("on");
  void flash.offsetWidth; // restart the animation
  flash.classList.add("on");
  return true;
}

function tick() {
  const assistantBusy = app.responseActive || app.audible;
  if (!speaking && assistantBusy) return;
  const every = speaking ? SPEAKING_MS : SILENT_MS;
  if (performance.now() - lastSent >= every) sendFrame();
}

app.on("started", (stream) => {
  if (stream.getVideoTracks().length) {
    video.srcObject = stream;
    video.play().catch(() => {});
    showPreview(true);
    cameraButton.disabled = false;
  } else {
    showPreview(false, "No camera: the assistant only hears you.");
  }
  lastSent = 0;
  timer = setInterval(tick, 200);
});

app.on("stopped", () => {
  clearInterval(timer);
  video.srcObject = null;
  showPreview(false, "Camera preview appears here after Start.");
  cameraButton.disabled = true;
});

app.on("session", () => {
  lastSent = 0; // a new session has seen nothing yet
});

app.on("speech_started", () => {
  speaking = true;
  sendFrame();
});

app.on("speech_stopped", () => {
  speaking = false;
});

cameraButton.addEventListener("click", () => {
  cameraOn = !cameraOn;
  const t = track();
  if (t) t.enabled = cameraOn;
  cameraButton.setAttribute("aria-pressed", String(!cameraOn));
  cameraButton.textContent = cameraOn ? "Camera off" : "Camera on";
  document.body.classList.toggle("camera-off", !cameraOn);
});
