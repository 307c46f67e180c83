"""Speech parity harness: omnivox's streaming pipeline against the reference's own `generate`, step by step.

Used by tests/test_speech_parity.py and benchmarks/parity.py (`omnivox bench parity`).

- The reference side runs `Qwen2_5OmniForConditionalGeneration.generate` as a user would (processor inputs,
  greedy: `talker_do_sample=False`, which keeps the Talker's repetition penalty) with forward hooks that record the
  raw logits of every Thinker and Talker step, the Talker's codes, the DiT's start noise and mel, and the waveform.
- Our side runs `pipeline.generate` (or a `Conversation` turn) exactly as users run it: prefix reuse and the
  overlapped Thinker on, token2wav streaming; `GenerationOptions.on_logits` records the raw logits each token is
  chosen from. Then our one-shot token2wav is given the reference's noise, so mel and waveform compare exactly.
- Streaming token2wav cannot equal a whole-utterance solve (the DiT's block attention compounds its reach over the
  36 ODE evaluations; talker/token2wav.py), so two comparisons cover it: the pipeline's streamed audio equals our
  streaming driver on the same codes (exact), and its distance to our one-shot run with the same noise is reported
  (rel L2, bounded in tests/test_token2wav.py), not counted as parity.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import tiny
from omnivox.streaming.pipeline import SPEECH_SYSTEM_PROMPT, user_messages

FP32_BOUND = 1e-4


@dataclass
class Run:
    """One spoken answer: per-step raw logits, the chosen ids, and the audio."""
    thinker_logits: list = field(default_factory=list)   # (V,) fp32 per Thinker step
    tokens: list = field(default_factory=list)           # generated ids (EOS included when it ended the answer)
    talker_logits: list = field(default_factory=list)    # (Vc,) fp32 per Talker step (EOS step included)
    codes: list = field(default_factory=list)            # speech codes (EOS excluded)
    noise: torch.Tensor | None = None                    # (1, T_mel, mel_dim) the DiT's start noise (reference)
    mel: torch.Tensor | None = None                      # (1, mel_dim, T_mel)
    wav: np.ndarray | None = None                        # (N,) float32, 24 kHz
    finish: str | None = None                            # our Done.finish_reason


# ----------------------------------------------------------------------------------------------------------------
# The reference


def reference_inputs(omni, proc, messages, use_audio_in_video=False):
    """The reference processor's tensors for `messages`, handed the media our code decodes (the processor does not
    read files); the prompt text is rendered by the processor's own chat template."""
    from PIL import Image

    from omnivox.encoders.audio_features import load_audio
    from omnivox.encoders.images import ImageProcessorConfig
    from omnivox.encoders.video import extract_audio, read_video

    audios, images, videos, fps, from_video = [], [], [], [], []
    icfg = ImageProcessorConfig.from_dir(omni.path)
    for m in messages:
        for part in m["content"] if isinstance(m["content"], list) else []:
            kind = part.get("type")
            if kind == "audio":
                audios.append(load_audio(str(part["audio"])))
                from_video.append(None)
            elif kind == "image":
                images.append(Image.open(part["image"]).convert("RGB"))
            elif kind == "video":
                sampled = read_video(part["video"], icfg)
                videos.append(sampled.frames)
                fps.append(sampled.sample_fps)
                if use_audio_in_video:
                    audios.append(extract_audio(part["video"]))
                    from_video.append(len(videos) - 1)
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kw = {}
    if audios:
        kw["audio"] = audios
    if images:
        kw["images"] = images
    if videos:
        kw["videos"] = videos
        kw["videos_kwargs"] = {"fps": fps if len(fps) > 1 else fps[0]}
    if use_audio_in_video:
        kw.update(load_audio_from_video=True, audio_from_video_indices=from_video)
    return proc(text=[text], return_tensors="pt", **kw)


def reference_speech(ref, inputs, speaker: str, thinker_new: int, talker_new: int, penalty: float = 1.05,
                     use_audio_in_video: bool = False, noise_seed: int = 1234) -> Run:
    """The reference's greedy `generate` on processor inputs, recorded step by step."""
    run = Run()
    hooks = [
        ref.thinker.register_forward_hook(lambda m, a, o: run.thinker_logits.append(o.logits[0, -1].float().clone())),
        ref.talker.register_forward_hook(lambda m, a, o: run.talker_logits.append(o.logits[0, -1].float().clone())),
    ]
    talker_generate, dit_sample = ref.talker.generate, ref.token2wav.code2wav_dit_model.sample
    sequences = []

    @functools.wraps(talker_generate)
    def record_codes(*a, **k):
        out = talker_generate(*a, **k)
        sequences.append((out, k["input_ids"].shape[1]))
        return out

    @functools.wraps(dit_sample)
    def record_mel(cond, ref_mel, code, **k):
        dit = ref.token2wav.code2wav_dit_model
        torch.manual_seed(noise_seed)   # the noise `sample` draws first, drawn again here to keep it
        run.noise = torch.randn([1, code.shape[1] * dit.repeats, dit.mel_dim], dtype=ref_mel.dtype)
        torch.manual_seed(noise_seed)
        run.mel = dit_sample(cond, ref_mel, code, **k)
        return run.mel

    ref.talker.generate, ref.token2wav.code2wav_dit_model.sample = record_codes, record_mel
    # The reference's generate forwards every unprefixed input to its Talker too, whose generate() refuses pixel
    # values (a reference bug, not its math): those go to the Thinker only, as thinker_* arguments.
    kwargs = {(f"thinker_{k}" if k in ("pixel_values", "pixel_values_videos") else k): v for k, v in inputs.items()}
    try:
        with torch.no_grad():
            seq, wav = ref.generate(**kwargs, speaker=speaker, use_audio_in_video=use_audio_in_video,
                                    thinker_max_new_tokens=thinker_new, talker_max_new_tokens=talker_new,
                                    talker_do_sample=False, talker_repetition_penalty=penalty)
    finally:
        for h in hooks:
            h.remove()
        del ref.talker.generate, ref.token2wav.code2wav_dit_model.sample
    run.tokens = seq[0, inputs["input_ids"].shape[1]:].tolist()
    out, start = sequences[0]
    codes = out[0, start:].tolist()
    eos = {8292, 8294}  # the reference generate's default talker_eos_token_id
    run.codes = codes[:next((i for i, c in enumerate(codes) if c in eos), len(codes))]
    run.wav = wav.reshape(-1).float().numpy()
    return run


# ----------------------------------------------------------------------------------------------------------------
# Ours


def greedy_options(omni, thinker_new: int, talker_new: int, penalty: float = 1.05, speaker: str | None = None,
                   use_audio_in_video: bool = False, run: Run | None = None):
    """GenerationOptions for the reference's greedy generate (penalties kept), recording logits into `run`."""
    from omnivox.streaming.decoding import talker_sampling, thinker_sampling
    from omnivox.streaming.pipeline import GenerationOptions

    def record(part, logits):
        (run.thinker_logits if part == "thinker" else run.talker_logits).append(logits[0].float().clone())

    return GenerationOptions(max_new_tokens=thinker_new, sampling=thinker_sampling(omni.config.generation,
                                                                                   greedy=True),
                             audio=True, speaker=speaker, use_audio_in_video=use_audio_in_video,
                             talker_sampling=talker_sampling(greedy=True, repetition_penalty=penalty),
                             max_codec_tokens=talker_new, on_logits=record if run is not None else None)


def collect(events, run: Run) -> Run:
    from omnivox.streaming.pipeline import AudioChunk, Done

    chunks = []
    for e in events:
        if isinstance(e, AudioChunk):
            chunks.append(e.samples)
        elif isinstance(e, Done):
            run.tokens, run.codes, run.finish = list(e.token_ids), list(e.codec_ids), e.finish_reason
    run.wav = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return run


def our_speech(omni, messages, thinker_new, talker_new, penalty=1.05, speaker=None, use_audio_in_video=False) -> Run:
    from omnivox.streaming.pipeline import generate

    run = Run()
    opts = greedy_options(omni, thinker_new, talker_new, penalty, speaker, use_audio_in_video, run)
    return collect(generate(omni, messages, opts), run)


def our_turn(conv, item_id, thinker_new, talker_new, penalty=1.05, speaker=None) -> Run:
    run = Run()
    opts = greedy_options(conv.omni, thinker_new, talker_new, penalty, speaker, run=run)
    return collect(conv.respond(opts, item_id), run)


def speaker_of(omni, name):
    from omnivox.streaming.pipeline import resolve_speaker

    return resolve_speaker(omni, name)[1]


def one_shot(omni, codes, speaker, noise=None, seed=0):
    """Our whole-utterance token2wav: (mel (1, mel_dim, T), waveform (N,))."""
    from omnivox.talker.bigvgan import mel_to_wav
    from omnivox.talker.token2wav import Token2WavDriver

    t2w = omni.token2wav
    spk = speaker_of(omni, speaker)
    with torch.inference_mode():
        driver = Token2WavDriver(t2w.code2wav_dit_model, t2w.code2wav_bigvgan_model)
        mel = driver.code_to_mel(torch.tensor(codes), spk["cond"], spk["ref_mel"], noise=noise, seed=seed)
        return mel, mel_to_wav(t2w.code2wav_bigvgan_model, mel).reshape(-1).float().numpy()


def streamed(omni, codes, speaker, seed=0):
    """Our streaming driver on `codes` pushed all at once (the pipeline pushes them in groups)."""
    from omnivox.talker.token2wav import StreamOptions, Token2WavDriver

    t2w = omni.token2wav
    spk = speaker_of(omni, speaker)
    with torch.inference_mode():
        driver = Token2WavDriver(t2w.code2wav_dit_model, t2w.code2wav_bigvgan_model)
        st = driver.start(spk["cond"], spk["ref_mel"], StreamOptions(seed=seed))
        return torch.cat([driver.push(st, codes), driver.finish(st)]).float().numpy()


# ----------------------------------------------------------------------------------------------------------------
# Comparison


def _max_step_diff(a: list, b: list) -> float:
    if len(a) != len(b):
        return float("inf")
    return max(((x - y).abs().max().item() for x, y in zip(a, b)), default=0.0)


def compare(omni, ref: Run, ours: Run, speaker: str) -> dict:
    """The parity rows of one case (max |diff| in fp32, or equality of ids), plus the streaming figures."""
    mel, wav = one_shot(omni, ours.codes, speaker, noise=ref.noise)
    ref_wav = torch.from_numpy(ref.wav)
    rows = {
        "thinker steps": (len(ours.thinker_logits), len(ref.thinker_logits)),
        "thinker logits": _max_step_diff(ours.thinker_logits, ref.thinker_logits),
        "thinker tokens equal": ours.tokens == ref.tokens,
        "talker steps": (len(ours.talker_logits), len(ref.talker_logits)),
        "talker logits": _max_step_diff(ours.talker_logits, ref.talker_logits),
        "codes equal": ours.codes == ref.codes,
        "codes": len(ours.codes),
        "mel one-shot": (mel - ref.mel).abs().max().item() if mel.shape == ref.mel.shape else float("inf"),
        "wave one-shot": ((torch.from_numpy(wav) - ref_wav).abs().max().item()
                          if wav.shape == ref.wav.shape else float("inf")),
        "wave peak": float(np.abs(ref.wav).max()),
    }
    stream = streamed(omni, ours.codes, speaker)
    rows["stream == driver"] = (float(np.abs(stream - ours.wav).max()) if stream.shape == ours.wav.shape
                                else float("inf"))
    _, whole = one_shot(omni, ours.codes, speaker)       # same noise as the stream (frame_noise, seed 0)
    n = min(whole.size, ours.wav.size)
    rows["stream vs one-shot rel L2"] = float(np.linalg.norm(ours.wav[:n] - whole[:n]) /
                                              max(np.linalg.norm(whole[:n]), 1e-12))
    return rows


def failures(rows: dict, bound: float = FP32_BOUND) -> list[str]:
    """The rows that break parity (empty: the case matches the reference)."""
    bad = []
    for key in ("thinker logits", "talker logits", "mel one-shot", "wave one-shot", "stream == driver"):
        if not rows[key] <= bound:
            bad.append(f"{key} {rows[key]:.3g}")
    for key in ("thinker tokens equal", "codes equal"):
        if not rows[key]:
            bad.append(key)
    for key in ("thinker steps", "talker steps"):
        if rows[key][0] != rows[key][1]:
            bad.append(f"{key} {rows[key]}")
    return bad


def write_media(folder: Path) -> dict:
    """The media files the media cases ask about (tests/media_fixtures.py)."""
    from media_fixtures import write_image, write_video, write_wav

    folder.mkdir(parents=True, exist_ok=True)
    return {
        "audio": write_wav(folder / "a.wav", 1.37, 16000),
        "image": write_image(folder / "i.png", 123, 77),
        "video": write_video(folder / "v.mp4", 23, fps=10, audio_sr=44100),   # 2.3 s with a stereo AAC track
    }


# ----------------------------------------------------------------------------------------------------------------
# The matrix: checkpoint shapes and cases


STRONG = dict(speech_codes_only=True, strong_token2wav=True)
SHAPES = {
    # Talker 2 x (2 heads x 16), 1 kv head, hidden 32; Thinker 64 wide
    "pa": tiny.Variant(name="pa", **STRONG),
    # Talker 3 x (4 x 8 = 32) into hidden 48, 2 kv heads, theta 1e4; Thinker GQA 8/2, tied embeddings, 3 layers
    "pb": tiny.Variant(name="pb", hidden=96, heads=8, kv_heads=2, intermediate=160, mrope_section=[2, 2, 2],
                       tie=True, layers=3, seed=1, talker_hidden=48, talker_layers=3, talker_heads=4, talker_kv=2,
                       talker_head_dim=8, talker_rope_theta=10000.0, **STRONG),
    # Talker 1 x (4 x 24 = 96) into hidden 40, MHA, theta 5e5; Thinker MHA 128 wide; official v4 config.json dialect
    "pc": tiny.Variant(name="pc", hidden=128, heads=4, kv_heads=4, intermediate=256, mrope_section=[4, 6, 6],
                       rope_theta=1000000.0, seed=2, talker_hidden=40, talker_layers=1, talker_heads=4, talker_kv=4,
                       talker_head_dim=24, talker_rope_theta=500000.0, v4_config=True, **STRONG),
    # Talker 2 x (4 x 12 = 48) into hidden 64, 1 kv head; lm heads edited so both models end by EOS (`_force_eos`)
    "pd": tiny.Variant(name="pd", seed=3, talker_hidden=64, talker_layers=2, talker_heads=4, talker_kv=1,
                       talker_head_dim=12, **STRONG),
}


@dataclass(frozen=True)
class Case:
    name: str
    shape: str
    question: str = "hello world"
    speaker: str = "Chelsie"
    thinker_new: int = 16
    talker_new: int = 120
    penalty: float = 1.05           # the reference's default greedy keeps the Talker's repetition penalty
    media: tuple = ()               # ("audio" | "image" | "video", ...) parts before the question
    audio_in_video: bool = False
    ends: tuple = ("length", "length")   # how the (Thinker, Talker) answers end
    min_codes: int = 0


CASES = [
    Case("text", "pa"),
    Case("text, penalty off", "pa", penalty=1.0),
    Case("ethan", "pa", question="What is the weather like?", speaker="Ethan", thinker_new=12, talker_new=60),
    Case("gqa tied", "pb", thinker_new=20, talker_new=100),
    Case("mha v4 config", "pc", speaker="Ethan", thinker_new=24, talker_new=90),
    Case("eos", "pd", question="Say something short.", thinker_new=40, talker_new=400, ends=("stop", "stop")),
    Case("long", "pb", question="Tell me a long story.", thinker_new=40, talker_new=320, min_codes=300),
    Case("image", "pa", question="What is in the picture?", media=("image",), speaker="Ethan"),
    Case("audio", "pb", question="What do you hear?", media=("audio",)),
    Case("video", "pc", question="Describe the video.", media=("video",), talker_new=80),
    Case("audio in video", "pa", question="What happens in the video?", media=("video",), audio_in_video=True,
         talker_new=80),
]


class Built:
    """One saved checkpoint: the reference loaded from it as a user would, our runtime, the processor."""

    def __init__(self, path, media):
        from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor

        from omnivox.model import load

        self.path, self.media = path, media
        self.ref = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
        self.proc = Qwen2_5OmniProcessor.from_pretrained(str(path))
        self.omni = load(path, audio=True)
        self.reused = []                          # prompt rows each request copied from the prefix cache
        match = self.omni.prefix_cache.match

        def counting(*a, **k):
            entry, n = match(*a, **k)
            if k.get("thinker"):
                self.reused.append(n)
            return entry, n
        self.omni.prefix_cache.match = counting

    def messages(self, case: Case):
        parts = [{"type": kind, kind: str(self.media[kind])} for kind in case.media]
        return [{"role": "system", "content": [{"type": "text", "text": SPEECH_SYSTEM_PROMPT}]},
                {"role": "user", "content": parts + [{"type": "text", "text": case.question}]}]

    def reference(self, case: Case, messages=None):
        messages = messages or self.messages(case)
        inputs = reference_inputs(self.omni, self.proc, messages, case.audio_in_video)
        return reference_speech(self.ref, inputs, case.speaker, case.thinker_new, case.talker_new,
                                       case.penalty, case.audio_in_video)

    def ours(self, case: Case):
        return our_speech(self.omni, self.messages(case), case.thinker_new, case.talker_new, case.penalty,
                                 case.speaker, case.audio_in_video)


def first_new(ids: list[int], start: int, skip=()) -> int:
    """The first index >= start whose id did not occur before it."""
    for j in range(start, len(ids)):
        if ids[j] not in ids[:j] and ids[j] not in skip:
            return j
    raise AssertionError(f"no new id after {start} in {ids}")


def force_eos(path, case: Case, media):
    """Edit the lm heads so both models end by EOS: the Thinker's <|im_end|> row copies (x1.02) the row of a token
    it would pick after a few steps, the Talker's codec-end row that of a code it would pick after ~30 codes. Both
    trial runs use the reference; the edited weights are saved into the checkpoint (ours loads them from there)."""
    b = Built(path, media)
    ref = b.ref
    eos = ref.config.thinker_config.eos_token_id
    tokens = b.reference(case).tokens
    target = tokens[first_new(tokens, 5)]
    with torch.no_grad():
        ref.thinker.lm_head.weight[eos] = ref.thinker.lm_head.weight[target] * 1.02
    codes = b.reference(case).codes
    code = codes[first_new(codes, min(30, len(codes) // 2))]
    with torch.no_grad():
        head = ref.talker.codec_head.weight
        head[ref.talker.codec_eos_token] = head[code] * 1.02
    ref.save_pretrained(str(path))


def build(shape: str, path, media) -> Built:
    """Write checkpoint `shape` into `path` (edited for the EOS case), load it both ways, and run one warm-up
    request with the speech system prompt, so later requests reuse its prompt rows as a running server does."""
    tiny.make_checkpoint(path, SHAPES[shape])
    if shape == "pd":
        force_eos(path, next(c for c in CASES if c.shape == "pd"), media)
    b = Built(path, media)
    our_speech(b.omni, user_messages("Hi there!", SPEECH_SYSTEM_PROMPT), 4, 8)
    return b


def conversation(b: Built) -> dict:
    """Two spoken turns of a `Conversation` (its Thinker KV cache kept across turns; the Talker's prompt is the
    whole history) against the reference's `generate` on the rendered history of each turn: {turn: rows}."""
    from omnivox.streaming.conversation import Conversation

    first = Case("turn 1", "pb", question="Hello! Who are you?", thinker_new=12, talker_new=40)
    second = Case("turn 2", "pb", question="And what can you do?", speaker="Ethan", thinker_new=14, talker_new=60)
    conv = Conversation(b.omni, SPEECH_SYSTEM_PROMPT)
    conv.add("user", [{"type": "text", "text": first.question}], "u1")
    ours1 = our_turn(conv, "a1", first.thinker_new, first.talker_new)
    conv.add("user", [{"type": "text", "text": second.question}], "u2")
    ours2 = our_turn(conv, "a2", second.thinker_new, second.talker_new, speaker=second.speaker)
    history = b.messages(first)
    ref1 = b.reference(first, history)
    reply = b.omni.tokenizer.decode([t for t in ours1.tokens if t not in b.omni.config.eos_token_ids])
    history = history + [{"role": "assistant", "content": [{"type": "text", "text": reply}]},
                         {"role": "user", "content": [{"type": "text", "text": second.question}]}]
    ref2 = b.reference(second, history)
    return {case.name: compare(b.omni, ref, ours, case.speaker)
            for ref, ours, case in ((ref1, ours1, first), (ref2, ours2, second))}
