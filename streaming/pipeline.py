"""One conversational turn as a generator of events — the only generation path.

`generate(omni, messages, options)` yields `TextDelta` events as the Thinker samples tokens and ends with one
`Done` event carrying the whole text, the token ids and timings. The CLI, the batch helper `run` and (later) the
realtime server all consume this generator; nothing generates text any other way.

Timings (milliseconds from the call): `first_token_ms` is when the first reply token was sampled (prompt
preparation + prefill + one sampling); `tokens_per_s` is the decode rate after the first token,
(n - 1) / (t_last - t_first), so it measures decode_step alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from omnivox.streaming.prompt import build_prompt
from omnivox.thinker.model import KVCache, decode_step, prefill, text_positions
from omnivox.thinker.sampling import Sampler, SamplingParams
from omnivox.thinker.tokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 512
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(greedy=True))
    use_audio_in_video: bool = False


@dataclass
class TextDelta:
    text: str
    token_id: int


@dataclass
class Done:
    text: str
    token_ids: list[int]
    finish_reason: str              # "stop" (an EOS id was sampled) or "length" (max_new_tokens reached)
    prompt_tokens: int
    timings: dict


def default_sampling(generation: dict) -> SamplingParams:
    """The checkpoint's generation_config.json defaults, read the way the reference reads them
    (no do_sample -> greedy)."""
    if not generation.get("do_sample", False):
        return SamplingParams(greedy=True)
    return SamplingParams(
        greedy=False,
        temperature=float(generation.get("temperature", 1.0)),
        top_k=int(generation.get("top_k", 50) or 0),
        top_p=float(generation.get("top_p", 1.0)),
        repetition_penalty=float(generation.get("repetition_penalty", 1.0)),
    )


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


@torch.inference_mode()  # torch re-enters the mode on each resumption and leaves it at each yield
def generate(omni, messages: list[dict], options: GenerationOptions) -> Iterator[TextDelta | Done]:
    if options.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    t0 = time.perf_counter()
    tok = omni.tokenizer
    thinker = omni.thinker
    cfg = omni.config.text
    prompt = build_prompt(omni, messages, use_audio_in_video=options.use_audio_in_video)
    n = prompt.length
    total = n + options.max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({n} tokens) + max_new_tokens ({options.max_new_tokens}) exceeds the "
                         f"model's context of {cfg.max_position_embeddings} tokens")
    device = omni.device
    eos = set(omni.config.eos_token_ids)
    sampler = Sampler(options.sampling, device=device)
    param = next(thinker.parameters())
    cache = KVCache.allocate(cfg, batch=1, max_len=total, device=device, dtype=param.dtype)
    history = torch.empty(1, total, dtype=torch.long, device=device)  # (1, N) prompt + reply, for the penalty
    history[:, :n] = prompt.input_ids
    detok = IncrementalDetokenizer(tok)
    out_ids: list[int] = []
    finish = "length"
    t_first = t_last = None
    logits, _ = prefill(thinker, cache, prompt.inputs_embeds, prompt.position_ids)
    for step in range(options.max_new_tokens):
        next_id = sampler(logits.float(), history[:, :n])             # (1,)
        token = int(next_id[0])
        t_last = time.perf_counter()
        if t_first is None:
            t_first = t_last
        out_ids.append(token)
        history[0, n] = token
        n += 1
        if token in eos:
            finish = "stop"
            break
        delta = detok.push(token)
        if delta:
            yield TextDelta(delta, token)
        if step + 1 == options.max_new_tokens:
            break
        logits, _ = decode_step(thinker, cache, next_id,
                                text_positions(n - 1 + prompt.rope_delta, 1, 1, device))
    tail = detok.flush()
    if tail:
        yield TextDelta(tail, out_ids[-1])
    t_end = time.perf_counter()
    decode_n = len(out_ids) - 1
    timings = {
        "first_token_ms": round((t_first - t0) * 1000, 3),
        "total_ms": round((t_end - t0) * 1000, 3),
        "tokens_per_s": round(decode_n / (t_last - t_first), 3) if decode_n > 0 and t_last > t_first else None,
    }
    yield Done(text=tok.decode(out_ids), token_ids=out_ids, finish_reason=finish, prompt_tokens=prompt.length,
               timings=timings)


def run(omni, messages: list[dict], options: GenerationOptions) -> Done:
    """Batch API: consume the event stream, return the final `Done`."""
    done = None
    for event in generate(omni, messages, options):
        if isinstance(event, Done):
            done = event
    return done
