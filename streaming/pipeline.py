"""One conversational turn as a generator of events — the only generation path.

`generate(omni, messages, options)` yields `TextDelta` events as the Thinker samples tokens, `AudioChunk` events
(24 kHz float32) as speech becomes final, and ends with one `Done` event carrying the text, the token and codec
ids and timings. The CLI, the batch helper `run` and the server all consume this generator. Its sample / feed
loop (`decode_reply`, with `Speech` for the Talker side) is shared with `conversation.Conversation.respond`, which
runs the same loop over a KV cache kept across turns.

Speech runs in lock-step behind the Thinker, in the same loop: each time the Thinker feeds a reply token through
`decode_step`, that token and its hidden state go to the Talker, which then samples every code it can (code k needs
reply entry k only); codes go to token2wav in small groups, which returns the waveform samples that became final
(its DiT works block by block with past/future context, its vocoder with an exact overlap). So the first audio
arrives after the Thinker has produced only a few dozen tokens, long before the text is finished. Within a round
the Thinker's feed runs on a helper thread while the Talker samples from the previous entry (`decode_reply`).

Timings (milliseconds from the call): `first_token_ms` is when the first reply token was sampled; `first_audio_ms`
when the first audio samples were ready; `tokens_per_s` is the Thinker's rate after the first token,
(n - 1) / (t_last - t_first) (with speech on, this includes the Talker and token2wav work interleaved with it).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from omnivox.streaming.prompt import build_prompt
from omnivox.thinker.model import KVCache, decode_step, prefill, text_positions
from omnivox.thinker.sampling import Sampler, SamplingParams
from omnivox.thinker.tokenizer import IncrementalDetokenizer

# Speech output only works with this system prompt (the Qwen team's note; REFERENCE.md).
SPEECH_SYSTEM_PROMPT = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
                        "perceiving auditory and visual inputs, as well as generating text and speech.")
SAMPLE_RATE = 24000


def speech_system_prompt(omni) -> str | None:
    """The system prompt a spoken answer gets when the caller gives none: Qwen2.5-Omni speaks only under its
    official one; Qwen3-Omni needs none (the chat template's default applies)."""
    return None if omni.config.family == "qwen3" else SPEECH_SYSTEM_PROMPT


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 512
    # Thinker; greedy = the reference's do_sample=False (argmax after the repetition penalty, when one is set).
    # streaming.decoding.thinker_sampling builds it from a checkpoint's generation_config.json and a request.
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(greedy=True))
    use_audio_in_video: bool = False
    audio: bool = False                   # speak the answer (needs a checkpoint loaded with audio=True)
    speaker: str | None = None            # a name from spk_dict.pt; None: "Chelsie" when present, else the first
    # None: the reference's Talker defaults (sampled: top-k 40, top-p 0.8, temperature 0.9, repetition penalty
    # 1.05); its greedy is streaming.decoding.talker_sampling(greedy=True) (penalty 1.05 kept, as the reference)
    talker_sampling: SamplingParams | None = None
    # the reference's attention-mask Talker prompt (codec pad/bos rows, multimodal positions: transformers 4, and
    # transformers 5 for padded batches) instead of its single-request one (talker/model.py says more)
    talker_codec_prompt: bool = False
    max_codec_tokens: int = 4096          # Talker limit (50 codes per second of speech)
    codes_per_push: int = 12              # codes handed to token2wav at a time (12 codes = one 24-frame DiT block)
    token2wav_seed: int = 0               # ODE start noise seed (the noise is a function of the absolute frame)
    token2wav: "StreamOptions | None" = None  # streaming synthesis knobs (talker.token2wav.StreamOptions); None:
                                              # the defaults with token2wav_seed (exact math, early first chunk)
    overlap: bool = True                  # speech: the Thinker's next step on a helper thread while the Talker
                                          # samples (same results; False runs both on the calling thread)
    reuse_prefix: bool = True             # copy prompt rows an earlier request computed (omni.prefix_cache;
                                          # streaming/prefix.py) instead of prefilling them again
    # Observer of the raw fp32 logits each token is chosen from: on_logits("thinker" | "talker", logits (1, V)),
    # called on the generating thread right before each sample (parity checks, debugging); None: no cost.
    on_logits: "Callable[[str, torch.Tensor], None] | None" = None
    # Cancel: stop() is asked before every Thinker token, every Talker code and every token2wav push; once it
    # returns True the generator ends at once, WITHOUT a Done event (a server passes its cancel flag's is_set, so
    # a cancelled turn stops within the one step in flight). None: never stopped.
    stop: "Callable[[], bool] | None" = None


@dataclass
class TextDelta:
    text: str
    token_id: int


@dataclass
class AudioChunk:
    samples: np.ndarray                   # (N,) float32 in [-1, 1]
    sample_rate: int = SAMPLE_RATE

    def pcm16(self) -> bytes:
        return (np.clip(self.samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


@dataclass
class Done:
    text: str
    token_ids: list[int]
    finish_reason: str              # "stop" (an EOS id was sampled) or "length" (max_new_tokens reached)
    prompt_tokens: int
    timings: dict
    codec_ids: list[int] = field(default_factory=list)
    audio_seconds: float = 0.0


def user_messages(text: str, system: str | None = None, audios=(), images=(), videos=()) -> list[dict]:
    """A one-turn conversation; the user message lists audios, then images, then videos, then the text."""
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    content = [{"type": "audio", "audio": a} for a in audios]
    content += [{"type": "image", "image": i} for i in images]
    content += [{"type": "video", "video": v} for v in videos]
    content.append({"type": "text", "text": text})
    messages.append({"role": "user", "content": content})
    return messages


# the reference's default voice per family (Qwen2.5-Omni's generate: Chelsie; Qwen3-Omni's: Ethan)
DEFAULT_SPEAKER = {"qwen2_5": "Chelsie", "qwen3": "Ethan"}


def resolve_speaker(omni, name: str | None) -> tuple[str, dict]:
    speakers = omni.speakers or {}
    if not speakers:
        raise ValueError(f"{omni.path} has no speakers (spk_dict.pt): speech output is not available")
    if name is None:
        dflt = DEFAULT_SPEAKER.get(getattr(omni.config, "family", "qwen2_5"), "Chelsie")
        name = dflt if dflt in speakers else sorted(speakers)[0]
    if name not in speakers:
        folded = {k.lower(): k for k in speakers}
        if name.lower() not in folded:
            raise ValueError(f"unknown speaker {name!r}; available: {', '.join(sorted(speakers))}")
        name = folded[name.lower()]
    return name, speakers[name]


class Speech:
    """Talker + token2wav for one utterance, fed one Thinker reply token at a time.

    prompt_ids (1, T), prompt_positions (3, 1, T), prompt_hidden (1, T, H): the Thinker's prompt for this turn
    (for a conversation: the whole history up to the assistant header). `reply_tokens_at[j]` is the number of
    reply tokens the Talker had consumed when it sampled speech code j (code j covers 20 ms of audio), so a
    listener's playback position maps back to the reply text it covers.
    """

    def __init__(self, omni, options: GenerationOptions, prompt_ids: torch.Tensor, prompt_positions: torch.Tensor,
                 prompt_hidden: torch.Tensor):
        from omnivox.talker.model import default_sampling as talker_defaults
        from omnivox.talker.token2wav import StreamOptions, Token2WavDriver

        if omni.talker is None or omni.token2wav is None:
            raise ValueError("speech output needs the Talker and token2wav: load the checkpoint with audio=True")
        _, spk = resolve_speaker(omni, options.speaker)
        self.omni, self.options = omni, options
        self.prompt_ids, self.prompt_positions, self.prompt_hidden = prompt_ids, prompt_positions, prompt_hidden
        self.speaker = spk
        params = options.talker_sampling or talker_defaults(options.sampling.seed)
        self.sampler = _observed(Sampler(params, device=omni.device), options.on_logits, "talker")
        t2w = omni.token2wav
        self.driver = Token2WavDriver(t2w.code2wav_dit_model, t2w.code2wav_bigvgan_model)
        dev = t2w.code2wav_dit_model.proj_out.weight.device
        self.wave = self.driver.start(spk["cond"].to(dev), spk["ref_mel"].to(dev),
                                      options.token2wav or StreamOptions(seed=options.token2wav_seed))
        self.max_code = t2w.code2wav_dit_model.cfg.num_embeds  # codes above this are Talker control ids
        self.state = None
        self.first: tuple[int, torch.Tensor] | None = None  # the first reply entry, until the Talker prefill
        self.pending: list[int] = []
        self.codes: list[int] = []
        self.fed = 0                          # reply tokens handed to the Talker
        self.reply_tokens_at: list[int] = []  # per speech code (those sent to token2wav)
        self.samples = 0

    def give(self, token: int, hidden: torch.Tensor) -> None:
        """The Thinker fed reply token `token` and produced `hidden` (H,); the Talker reads it on its next `talk`."""
        from omnivox.talker.model import talker_push_reply

        if self.state is None and self.first is None:
            self.first = (token, hidden)      # the Talker prefill needs the first reply entry
        else:
            if self.state is None:
                self.talk()
            talker_push_reply(self.state, token, hidden)
        self.fed += 1

    def talk(self) -> None:
        """Talker work on the entries given so far: its prefill (first call), then every code it can sample.

        Touches only the Talker's own state, so it may run while the Thinker feeds its next token on another thread.
        """
        from omnivox.talker.model import talker_prefill, talker_step

        if self.state is None:
            if self.first is None:
                return
            token, hidden = self.first
            prefixes = getattr(self.omni, "prefix_cache", None) if self.options.reuse_prefix else None
            media = media_ids(self.omni)
            codec_prompt = self.options.talker_codec_prompt
            self.state = talker_prefill(
                self.omni.talker, self.omni.thinker.model.embed_tokens, self.prompt_ids, self.prompt_hidden,
                token, hidden, int(self.speaker["bos_token"]),
                prompt_position_ids=self.prompt_positions if codec_prompt else None, codec_prompt=codec_prompt,
                max_new_tokens=self.options.max_codec_tokens,
                prefix=prefixes.talker_rows(self.prompt_ids, media) if prefixes is not None else None)
            if prefixes is not None:
                prefixes.store_talker(self.prompt_ids, self.state.cache, self.prompt_ids.shape[1], media)
        # None means "waiting for the next reply entry" before the end, "finished" after it
        while not self.stopped() and (code := talker_step(self.omni.talker, self.state, self.sampler)) is not None:
            self.codes.append(code)
            if code <= self.max_code:  # a stray control id (never EOS, which ends the loop) is not speech
                self.pending.append(code)
                # code k is sampled after reply entry k (entries past the reply are text-end / pad)
                self.reply_tokens_at.append(min(self.state.sampled, self.fed))
            if len(self.pending) >= self.options.codes_per_push:
                return  # a group for token2wav is ready: the caller synthesizes it before more Talker work

    def stopped(self) -> bool:
        return self.options.stop is not None and self.options.stop()

    def audio(self) -> Iterator[AudioChunk]:
        """token2wav on the codes sampled so far, in groups of `codes_per_push`; yields the audio that became final."""
        while len(self.pending) >= self.options.codes_per_push and not self.stopped():
            yield from self._push(self.options.codes_per_push)

    def end(self) -> Iterator[AudioChunk]:
        """The reply ended: the Talker runs to its end (audio streams out group by group), then token2wav finishes."""
        from omnivox.talker.model import talker_end_reply

        self.talk()                           # the prefill, if the reply had a single entry
        if self.state is None:                # the reply ended before any token was fed: nothing to say
            return
        talker_end_reply(self.state)
        while not self.state.finished:
            if self.stopped():
                return
            self.talk()
            yield from self.audio()
        yield from self.audio()
        if self.stopped():
            return
        yield from self._push(len(self.pending))
        yield from self._emit(self.driver.finish(self.wave))

    def _push(self, n: int) -> Iterator[AudioChunk]:
        if n:
            codes, self.pending = self.pending[:n], self.pending[n:]
            yield from self._emit(self.driver.push(self.wave, codes))

    def _emit(self, wav: torch.Tensor) -> Iterator[AudioChunk]:
        if wav.numel():
            self.samples += wav.numel()
            yield AudioChunk(wav.detach().float().cpu().numpy())


def media_ids(omni) -> tuple[int, int, int]:
    """The Thinker's media placeholder ids: prompt rows after the first of them depend on more than the ids."""
    t = omni.config.tokens
    return (t.audio, t.image, t.video)


def check_options(omni, options: GenerationOptions) -> None:
    """Fail before any work on options that cannot run."""
    if options.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if options.audio:
        resolve_speaker(omni, options.speaker)
        if omni.talker is None:
            raise ValueError("speech output needs the Talker: load the checkpoint with audio=True")


# ----------------------------------------------------------------------------------------------------------------
# The Thinker of either family: Qwen2.5-Omni's dense decoder (thinker/model.py) or Qwen3-Omni's MoE (thinker/moe.py)


def allocate_cache(omni, max_len: int) -> KVCache:
    param = next(omni.thinker.parameters())
    if omni.config.family == "qwen3":
        from omnivox.thinker.moe import allocate

        return allocate(omni.thinker, max_len, device=omni.device, dtype=param.dtype)
    return KVCache.allocate(omni.config.text, batch=1, max_len=max_len, device=omni.device, dtype=param.dtype)


def thinker_prefill(omni, cache: KVCache, embeds: torch.Tensor, positions: torch.Tensor):
    """-> (logits (1, V) of the last row, what the Talker reads of the rows (1, T, H)): Qwen2.5's Talker reads the
    final hidden states, Qwen3's the hidden states after its `accept_hidden_layer`."""
    if omni.config.family == "qwen3":
        from omnivox.thinker import moe

        talker = omni.talker
        keep = talker.cfg.accept_hidden_layer if talker is not None else None
        logits, hidden, kept = moe.prefill(omni.thinker, cache, embeds, positions, keep_layer=keep)
        return logits, (kept if kept is not None else hidden)
    return prefill(omni.thinker, cache, embeds, positions)


def thinker_decode(omni, cache: KVCache, token_ids: torch.Tensor, positions: torch.Tensor):
    """One fed token -> (logits (1, V), hidden (1, H))."""
    if omni.config.family == "qwen3":
        from omnivox.thinker import moe

        logits, hidden, _ = moe.decode_step(omni.thinker, cache, token_ids, positions)
        return logits, hidden
    return decode_step(omni.thinker, cache, token_ids, positions)


def new_speech(omni, options: GenerationOptions, prompt_ids: torch.Tensor, prompt_positions: torch.Tensor,
               prompt_hidden: torch.Tensor):
    """The speech side of one utterance for the checkpoint's family."""
    if omni.config.family == "qwen3":
        from omnivox.streaming.qwen3_speech import Qwen3Speech

        return Qwen3Speech(omni, options, prompt_ids, prompt_hidden, resolve_speaker(omni, options.speaker)[1],
                           _observed)
    return Speech(omni, options, prompt_ids, prompt_positions, prompt_hidden)


class _ReplyThinker:
    """The Thinker side of one reply: `sample` a token, then `feed` it back (unless it ended the reply).

    It owns the sampler, the penalty history and the logits between steps, and appends every sampled id to
    `out_ids`. `feed` may run on a helper thread; it touches only this object and the caller's cache.
    """

    def __init__(self, omni, options: GenerationOptions, logits: torch.Tensor, prompt_ids: torch.Tensor, feed,
                 out_ids: list[int]):
        device = omni.device
        self.eos = set(omni.config.eos_token_ids)
        self.max_new_tokens = options.max_new_tokens
        self.sampler = _observed(Sampler(options.sampling, device=device), options.on_logits, "thinker")
        self.n = self.prompt_len = prompt_ids.shape[1]
        self.history = torch.empty(1, self.n + options.max_new_tokens, dtype=torch.long, device=device)  # (1, N)
        self.history[:, :self.n] = prompt_ids
        self.logits, self._feed, self.out_ids = logits, feed, out_ids
        self.finish = "length"
        self.done = False
        self.t_first = self.t_last = None

    def sample(self) -> int:
        """The next reply token; sets `done` when it ends the reply (EOS, or the last one allowed: not fed back)."""
        next_id = self.sampler(self.logits.float(), self.history[:, :self.n])          # (1,)
        token = int(next_id[0])
        self.t_last = time.perf_counter()
        if self.t_first is None:
            self.t_first = self.t_last
        self.out_ids.append(token)
        self.history[0, self.n] = token
        self.n += 1
        if token in self.eos:
            self.finish, self.done = "stop", True
        elif self.n - self.prompt_len == self.max_new_tokens:
            self.done = True
        return token

    def feed(self) -> torch.Tensor:
        """Run the Thinker on the token just sampled -> its hidden state (H,); the next logits are kept."""
        next_id = self.history[0, self.n - 1:self.n].clone()                            # (1,)
        self.logits, hidden = self._feed(next_id, self.n - 1)                           # (1, V), (1, H)
        return hidden[0]


def decode_reply(omni, options: GenerationOptions, logits: torch.Tensor, prompt_ids: torch.Tensor, feed,
                 speech, t0: float, out_ids: list[int]) -> Iterator[TextDelta | AudioChunk | Done]:
    """The sample / feed loop of one reply, shared by `generate` and `Conversation.respond`.

    logits (1, V): the prompt's last position; prompt_ids (1, T): what the repetition penalty sees before the reply;
    feed(token_ids (1,), cache_index) -> (logits (1, V), hidden (1, H)) runs the Thinker on one sampled token at
    cache index `cache_index` (the caller owns the cache and its positions). Sampled ids are appended to
    `out_ids` as they come (EOS included), so a caller that closes the generator early still sees them.

    With speech on (and `options.overlap`), each round feeds the next token on a helper thread while the Talker
    samples from the entries it already has on this one: both are memory-bound matrix-vector work that one thread
    cannot saturate, so a round costs about the slower of the two, not their sum (measured at the official Talker
    size: 183 ms instead of 273 ms). The helper is joined before anything is yielded, so token2wav runs with the
    Thinker idle and nothing runs while the caller holds the generator suspended. Lock-step on purpose: letting
    the Thinker run further ahead only takes memory bandwidth from the Talker before the first audio, and
    compute-bound work (the Talker prefill, the DiT) slows down when it shares the two cores. Either way, the
    tokens, codes and audio are the same.
    """
    tok = omni.tokenizer
    thinker = _ReplyThinker(omni, options, logits, prompt_ids, feed, out_ids)
    detok = IncrementalDetokenizer(tok)
    t_audio = None

    def audio(chunks):
        nonlocal t_audio
        for chunk in chunks:
            if t_audio is None:
                t_audio = time.perf_counter()
            yield chunk

    pool = ThreadPoolExecutor(1, thread_name_prefix="omnivox-thinker") \
        if speech is not None and options.overlap else None
    feed_there = _same_grad_mode(thinker.feed)
    stop = options.stop or (lambda: False)
    try:
        while not thinker.done:
            if stop():
                return                                                     # cancelled: no Done
            token = thinker.sample()
            if token in thinker.eos:
                break
            delta = detok.push(token)
            if delta:
                yield TextDelta(delta, token)
            if thinker.done:
                break                                                      # the last token is never fed back
            if pool is None:
                hidden = thinker.feed()                                    # (H,)
                if speech is not None:
                    speech.give(token, hidden)
                    speech.talk()
            else:
                running = pool.submit(feed_there)
                try:
                    speech.talk()                                          # the entries given so far
                finally:
                    wait([running])                                        # never leave the Thinker running
                speech.give(token, running.result())
            if speech is not None:
                yield from audio(speech.audio())
        tail = detok.flush()
        if tail:
            yield TextDelta(tail, out_ids[-1])
        t_text = time.perf_counter()
        if speech is not None:
            yield from audio(speech.end())
        if stop():
            return
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    t_end = time.perf_counter()
    t_first, t_last = thinker.t_first, thinker.t_last
    decode_n = len(out_ids) - 1
    timings = {
        "first_token_ms": round((t_first - t0) * 1000, 3),
        "text_ms": round((t_text - t0) * 1000, 3),
        "total_ms": round((t_end - t0) * 1000, 3),
        "tokens_per_s": round(decode_n / (t_last - t_first), 3) if decode_n > 0 and t_last > t_first else None,
    }
    if speech is not None:
        timings["first_audio_ms"] = round((t_audio - t0) * 1000, 3) if t_audio is not None else None
    yield Done(text=tok.decode(out_ids), token_ids=list(out_ids), finish_reason=thinker.finish,
               prompt_tokens=prompt_ids.shape[1], timings=timings, codec_ids=list(speech.codes) if speech else [],
               audio_seconds=(speech.samples / SAMPLE_RATE) if speech else 0.0)


def _observed(sampler: Sampler, on_logits, part: str):
    """The sampler, or a wrapper that shows `on_logits` the raw logits of every choice first."""
    if on_logits is None:
        return sampler

    def sample(logits, *rest):
        on_logits(part, logits)
        return sampler(logits, *rest)
    return sample


def _same_grad_mode(fn):
    """fn wrapped to run under the caller's inference / grad mode (thread-local in torch) on another thread."""
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(*args):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(*args)
    return run


@torch.inference_mode()  # torch re-enters the mode on each resumption and leaves it at each yield
def generate(omni, messages: list[dict], options: GenerationOptions) -> Iterator[TextDelta | AudioChunk | Done]:
    check_options(omni, options)
    t0 = time.perf_counter()
    prompt = build_prompt(omni, messages, use_audio_in_video=options.use_audio_in_video)
    n = prompt.length
    total = n + options.max_new_tokens
    context = omni.config.max_positions
    if total > context:
        raise ValueError(f"prompt ({n} tokens) + max_new_tokens ({options.max_new_tokens}) exceeds the "
                         f"model's context of {context} tokens")
    device = omni.device
    cache = allocate_cache(omni, total)

    # the prefix cache keeps Qwen2.5's final hidden states; Qwen3's Talker reads another layer: not shared yet
    reuse = options.reuse_prefix and omni.config.family != "qwen3"
    prefixes = getattr(omni, "prefix_cache", None) if reuse else None
    media = media_ids(omni)
    entry, reused = prefixes.match(prompt.input_ids, media, thinker=True) if prefixes is not None else (None, 0)
    if entry is not None:                           # rows [0, reused) as an earlier request computed them
        head = prefixes.restore(entry, reused, cache)                                          # (1, reused, H)
        logits, rest = thinker_prefill(omni, cache, prompt.inputs_embeds[:, reused:],
                                       prompt.position_ids[:, :, reused:])                     # (1,V), (1,T-r,H)
        prompt_hidden = torch.cat([head.to(rest.dtype), rest], dim=1)                          # (1, T, H)
    else:
        logits, prompt_hidden = thinker_prefill(omni, cache, prompt.inputs_embeds, prompt.position_ids)
    if prefixes is not None:
        prefixes.store(prompt.input_ids, cache, prompt_hidden, media)
    speech = new_speech(omni, options, prompt.input_ids, prompt.position_ids, prompt_hidden) \
        if options.audio else None

    def feed(next_id: torch.Tensor, index: int):
        return thinker_decode(omni, cache, next_id, text_positions(index + prompt.rope_delta, 1, 1, device))

    yield from decode_reply(omni, options, logits, prompt.input_ids, feed, speech, t0, [])


def run(omni, messages: list[dict], options: GenerationOptions) -> tuple[Done, np.ndarray]:
    """Batch API: consume the event stream; returns the final `Done` and the whole waveform (empty without audio)."""
    done, chunks = None, []
    for event in generate(omni, messages, options):
        if isinstance(event, AudioChunk):
            chunks.append(event.samples)
        elif isinstance(event, Done):
            done = event
    return done, (np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32))
