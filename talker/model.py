"""The Talker: a Qwen2.5 decoder that turns the Thinker's reply into speech codec tokens, one code per reply entry.

What is notable here:
- Dual track. Every Talker input row is the sum of a *text track* row, in the Thinker's width (Thinker last-layer
  hidden state + Thinker token embedding), and a *codec track* row (the Talker's own `embed_tokens`, also in the
  Thinker's width); the sum goes through `thinker_to_talker_proj` into the decoder. The decoder itself is the
  Thinker's `TextDecoder`, reused as-is.
- The inputs, re-stated from the reference's `Qwen2_5OmniForConditionalGeneration.generate` and its Talker's
  `forward` (transformers 5.23; T prompt tokens, reply tokens r_0, r_1, ... = the Thinker's sampled tokens *that
  it fed back*, so the final EOS and a max-tokens last token are not part of the reply):

      row          text track (Thinker width)                   codec track       -> logits for
      i < T        h_i + e_i   (e_i = 0 at audio/image/video)   nothing (*)
      T            E[speaker bos_token]                         nothing (**)
      T + 1        h(r_0) + e(r_0)                              nothing (**)      -> code c_0
      decode k>=1  reply entry k                                C[c_{k-1}]        -> code c_k

  (*) the reference passes codec `mask` ids for the prompt but embeds none of them: they only reach the
  repetition penalty. E is the Thinker's embedding table (the speaker's `bos_token` from `spk_dict.pt` is a
  *Thinker* vocabulary id), h the Thinker's final-norm hidden state, C the Talker's codec table.
  Reply entry k is h(r_k) + e(r_k) while the Thinker has fed r_k, then E[tts_text_end] once after the reply
  ended, then E[tts_text_pad] for every later step.
  Positions are plain: 0 .. T+1 for the prompt, T+2+k-1 for decode step k, on all three rotary axes.
  (**) `codec_prompt=True` instead takes the reference's other path, the one it runs when its Talker receives an
  attention mask: C[codec_pad] and C[codec_bos] are added to rows T and T+1, and the prompt gets the Thinker's
  multimodal position ids (the reference recomputes them with the Talker's `get_rope_index` over the same tokens),
  then text positions after their maximum. transformers 4 (the checkpoints' release) always took that path;
  transformers 5 drops an all-ones mask in `generate`, so it takes it only for a left-padded batch, and a single
  request (what `generate` runs for every user of it) gets the rows above. Our default is that single-request
  path: speech equals the reference's `generate` step for step (tests/test_speech_parity.py).
- Lock-step streaming. Code c_k needs only reply entry k, i.e. the Thinker having fed r_k (one token ahead of the
  Talker), or the reply having ended. `talker_step` returns None while that entry has not arrived; it never needs
  the whole reply. Feeding the entries one by one while stepping gives exactly the codes of pushing them all first.
- Sampling as the reference's Talker `generate`: repetition penalty over the codec prompt ids (mask, pad, bos) and
  every code so far, `codec_bos` suppressed, EOS = {codec_pad, codec_end}; generation stops on EOS (not part of
  `codes`) or after `max_new_tokens` sampled tokens (EOS included in that count, as in `generate`). The reference
  sets no min_new_tokens. Its sampling defaults (top-k 40, top-p 0.8, temperature 0.9, repetition penalty 1.05)
  are `TALKER_SAMPLING_DEFAULTS`; they are generate() arguments there, not config values. Greedy
  (talker_do_sample=False) still applies the repetition penalty there, as `default_sampling(greedy=True)` does.
- One sequence per state (batch 1); the KV cache is the Thinker's static, position-indexed `KVCache`.
- Use in lock-step behind the Thinker:
      state = talker_prefill(talker, thinker.model.embed_tokens, prompt_ids, prompt_hidden, r0, h(r0), spk_bos)
      each time the Thinker feeds a reply token r (decode_step(r) -> hidden): talker_push_reply(state, r, hidden)
      when the Thinker samples EOS or hits its limit (that last token is never fed): talker_end_reply(state)
      between those, `while (code := talker_step(talker, state, sampler)) is not None: emit(code)`;
      stop when state.finished.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from omnivox.thinker.config import DecoderConfig
from omnivox.thinker.model import KVCache, TextDecoder, text_positions
from omnivox.thinker.sampling import SamplingParams

# The reference's `Qwen2_5OmniForConditionalGeneration.generate(talker_*=...)` defaults (not stored in any config).
TALKER_SAMPLING_DEFAULTS = dict(top_k=40, top_p=0.8, temperature=0.9, repetition_penalty=1.05)
TALKER_MAX_NEW_TOKENS = 4096


def default_sampling(seed: int | None = None, greedy: bool = False,
                     repetition_penalty: float | None = None) -> SamplingParams:
    """The reference's Talker sampling: its generate() defaults with talker_do_sample=True, or with greedy the
    argmax after its processors (talker_do_sample=False: the repetition penalty still applies)."""
    d = dict(TALKER_SAMPLING_DEFAULTS)
    if repetition_penalty is not None:
        d["repetition_penalty"] = repetition_penalty
    if greedy:
        return SamplingParams(greedy=True, seed=seed, repetition_penalty=d["repetition_penalty"])
    return SamplingParams(greedy=False, seed=seed, **d)


_TALKER_ROPE_THETA = 1000000.0  # the reference Talker config's default_theta, used when the config has none


@dataclass(frozen=True)
class TalkerConfig:
    decoder: DecoderConfig      # embedding_size = the Thinker's width, hidden_size = the Talker's
    codec_bos: int              # tts_codec_start_token_id: last prompt row; suppressed when sampling
    codec_eos: int              # tts_codec_end_token_id
    codec_pad: int              # tts_codec_pad_token_id: row T's codec track; also ends generation
    codec_mask: int             # tts_codec_mask_token_id: the prompt's codec ids (only seen by the penalty)
    text_bos: int               # tts_text_start_token_id (Thinker vocabulary; unused by the reference's generate)
    text_eos: int               # tts_text_end_token_id: the reply entry right after the reply ends
    text_pad: int               # tts_text_pad_token_id: every reply entry after that
    audio_token: int            # media placeholders whose Thinker embedding is zeroed on the text track
    image_token: int
    video_token: int
    audio_start: int            # the rest of the media ids the position ids are built from
    audio_end: int
    vision_start: int
    vision_end: int
    position_id_per_seconds: float = 25
    seconds_per_chunk: float = 2
    spatial_merge_size: int = 2

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Codes that end generation (the reference's talker_eos_token_id [8292, 8294] = pad, end)."""
        return (self.codec_pad, self.codec_eos)

    @property
    def media_ids(self) -> tuple[int, int, int]:
        return (self.audio_token, self.image_token, self.video_token)

    @classmethod
    def from_dict(cls, d: dict) -> "TalkerConfig":
        d = dict(d)
        if "rope_theta" not in d and "rope_theta" not in (d.get("rope_parameters") or {}):
            d["rope_theta"] = _TALKER_ROPE_THETA
        dec = DecoderConfig.from_dict(d)

        def tid(key, default):
            return int(d.get(key, default))

        return cls(
            decoder=dec,
            codec_bos=tid("tts_codec_start_token_id", 8293), codec_eos=tid("tts_codec_end_token_id", 8294),
            codec_pad=tid("tts_codec_pad_token_id", 8292), codec_mask=tid("tts_codec_mask_token_id", 8296),
            text_bos=tid("tts_text_start_token_id", 151860), text_eos=tid("tts_text_end_token_id", 151861),
            text_pad=tid("tts_text_pad_token_id", 151859),
            audio_token=tid("audio_token_index", 151646), image_token=tid("image_token_index", 151655),
            video_token=tid("video_token_index", 151656),
            audio_start=tid("audio_start_token_id", 151647), audio_end=tid("audio_end_token_id", 151648),
            vision_start=tid("vision_start_token_id", 151652), vision_end=tid("vision_end_token_id", 151653),
            position_id_per_seconds=d.get("position_id_per_seconds", 25),
            seconds_per_chunk=d.get("seconds_per_chunk", 2),
            spatial_merge_size=int(d.get("spatial_merge_size", 2)),
        )


class Talker(nn.Module):
    """Parameter names equal the checkpoint's keys under `talker.`."""

    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.cfg = cfg
        dec = cfg.decoder
        self.thinker_to_talker_proj = nn.Linear(dec.embedding_size, dec.hidden_size, bias=True)
        self.model = TextDecoder(dec)  # embed_tokens: codec embedding (vocab, embedding_size)
        self.codec_head = nn.Linear(dec.hidden_size, dec.vocab_size, bias=False)

    def forward(self, rows: Tensor, position_ids: Tensor, cache: KVCache, last_only: bool = False) -> Tensor:
        """rows (B, T, Ht): text track + codec track in the Thinker's width -> fp32 logits (B, T, V), or (B, 1, V)
        for the last row only."""
        x = self.thinker_to_talker_proj(rows)  # (B, T, H)
        hidden = self.model(x, position_ids, cache)  # (B, T, H)
        if last_only:
            hidden = hidden[:, -1:]  # (B, 1, H)
        return self.codec_head(hidden).float()  # (B, T or 1, V)


@dataclass
class TalkerState:
    """One utterance of the Talker: its cache, the reply entries waiting to be consumed, the codes so far."""
    cache: KVCache
    embed_tokens: nn.Embedding       # the Thinker's token table (shared, not copied)
    eos_row: Tensor                  # (Ht,) E[tts_text_end]
    pad_row: Tensor                  # (Ht,) E[tts_text_pad]
    next_position: int               # text position of the next decode row
    max_new_tokens: int
    logits: Tensor | None = None     # (1, V) fp32 logits the next code is sampled from; None until fed
    last_logits: Tensor | None = None  # (1, V) the logits of the latest sampled code (raw, before sampling)
    pending: deque = field(default_factory=deque)  # (Ht,) reply rows h + e pushed but not consumed yet
    reply_ended: bool = False        # the Thinker finished its reply (talker_end_reply)
    eos_fed: bool = False            # the E[tts_text_end] entry has been consumed
    history: Tensor | None = None    # (1, 3 + max_new_tokens) long: prompt codec ids (mask, pad, bos), then codes
    history_len: int = 0             # valid prefix of `history` (what the repetition penalty sees)
    last_token: Tensor | None = None  # (1,) long, the latest code on the device (fed by the next step)
    codes: list[int] = field(default_factory=list)    # sampled codec codes (EOS excluded)
    sampled: int = 0                 # tokens sampled so far, EOS included (max_new_tokens counts these)
    finished: bool = False
    finish_reason: str | None = None  # "stop" (an EOS code) or "length" (max_new_tokens)
    suppress_ids: Tensor | None = None  # (1,) long: never sampled (codec_bos)


def talker_positions(prompt_position_ids: Tensor | None, prompt_len: int, device=None) -> tuple[Tensor, int]:
    """Position ids (3, 1, T + 2) of the Talker prompt and the text position of its first decode row.

    None: plain positions 0 .. T+1 (the reference's single-request path). Else prompt_position_ids (3, 1, T) are the
    Thinker's multimodal ids of the same prompt (the `codec_prompt` path): the speaker-bos row and the first reply
    row continue as text after the prompt's largest id.
    """
    if prompt_position_ids is None:
        pos = text_positions(0, prompt_len + 2, device=device)  # (3, 1, T + 2)
        return pos, prompt_len + 2
    if tuple(prompt_position_ids.shape) != (3, 1, prompt_len):
        raise ValueError(f"prompt_position_ids must be (3, 1, {prompt_len}), got {tuple(prompt_position_ids.shape)}")
    start = int(prompt_position_ids.max()) + 1
    tail = text_positions(start, 2, device=prompt_position_ids.device)  # (3, 1, 2)
    return torch.cat([prompt_position_ids.long(), tail], dim=2), start + 2  # (3, 1, T + 2)


def _as_row(hidden: Tensor, width: int, what: str) -> Tensor:
    if hidden.numel() != width:
        raise ValueError(f"{what} must hold one hidden state of width {width}, got shape {tuple(hidden.shape)}")
    return hidden.reshape(width)  # (Ht,)


def _check_id(token_id: int, vocab: int, what: str) -> int:
    token_id = int(token_id)
    if not 0 <= token_id < vocab:
        raise ValueError(f"{what} {token_id} is outside the Thinker vocabulary (0..{vocab - 1})")
    return token_id


@torch.no_grad()
def talker_prefill(talker: Talker, thinker_embed_tokens: nn.Embedding, prompt_ids: Tensor, prompt_hidden: Tensor,
                   first_reply_id: int, first_reply_hidden: Tensor, speaker_bos: int,
                   prompt_position_ids: Tensor | None = None, max_new_tokens: int = TALKER_MAX_NEW_TOKENS,
                   cache: KVCache | None = None, prefix: KVCache | None = None,
                   codec_prompt: bool = False) -> TalkerState:
    """Run the Talker prompt (T + 2 rows); the returned state holds the logits of the first code.

    prompt_ids (1, T): the Thinker's input ids; prompt_hidden (1, T, Ht): its final-norm hidden states;
    first_reply_id / first_reply_hidden (Ht,): the first reply token and the Thinker's hidden state when it fed that
    token; speaker_bos: the speaker's `bos_token` from spk_dict.pt (a Thinker vocabulary id);
    codec_prompt: the reference's attention-mask path (module docstring): codec pad/bos on the last two rows and
    the Thinker's multimodal positions prompt_position_ids (3, 1, T) (None there: a text-only prompt). Without
    it (the default, the reference's single-request `generate`) the positions are plain and prompt_position_ids
    must be None;
    cache: a preallocated Talker cache to reuse (it is reset), else one of T + 2 + max_new_tokens is allocated.
    prefix: the keys/values of the first `prefix.length` <= T prompt rows from an earlier run over the same prompt
    ids (`streaming.prefix.PrefixCache`); those rows are copied, not recomputed.
    """
    cfg = talker.cfg
    width = cfg.decoder.embedding_size
    vocab = thinker_embed_tokens.num_embeddings
    if thinker_embed_tokens.embedding_dim != width:
        raise ValueError(f"the Thinker's embedding width {thinker_embed_tokens.embedding_dim} does not match the "
                         f"Talker's embedding_size {width}")
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be (1, T) with T >= 1, got {tuple(prompt_ids.shape)}")
    t = prompt_ids.shape[1]
    if tuple(prompt_hidden.shape) != (1, t, width):
        raise ValueError(f"prompt_hidden must be (1, {t}, {width}), got {tuple(prompt_hidden.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_position_ids is not None and not codec_prompt:
        raise ValueError("prompt_position_ids are only used with codec_prompt=True (the reference's single-request "
                         "path uses plain positions)")
    speaker_bos = _check_id(speaker_bos, vocab, "speaker bos_token")
    first_reply_id = _check_id(first_reply_id, vocab, "first reply token")
    first_row = _as_row(first_reply_hidden, width, "first_reply_hidden")
    dev = prompt_hidden.device
    dtype = talker.thinker_to_talker_proj.weight.dtype

    ids = prompt_ids.to(dev)
    media = torch.zeros_like(ids, dtype=torch.bool)
    for m in cfg.media_ids:
        media |= ids == m
    emb = thinker_embed_tokens(ids).masked_fill(media[..., None], 0.0)  # (1, T, Ht) placeholders zeroed
    text_ids = torch.tensor([speaker_bos, first_reply_id, cfg.text_eos, cfg.text_pad], device=dev)
    text = thinker_embed_tokens(text_ids)  # (4, Ht)
    spk_row = text[0]  # (Ht,)
    first = first_row.to(text.dtype) + text[1]  # (Ht,)
    if codec_prompt:
        codec = talker.model.embed_tokens(torch.tensor([cfg.codec_pad, cfg.codec_bos], device=dev))  # (2, Ht)
        spk_row, first = spk_row + codec[0], first + codec[1]  # (Ht,) each
    rows = torch.cat([prompt_hidden.to(emb.dtype) + emb, spk_row[None, None], first[None, None]], dim=1)  # (1, T+2, Ht)

    positions, next_pos = talker_positions(prompt_position_ids, t, device=dev)  # (3, 1, T + 2)
    if cache is None:
        cache = KVCache.allocate(cfg.decoder, 1, t + 2 + max_new_tokens, device=dev, dtype=dtype)
    else:
        if cache.batch != 1 or cache.max_len < t + 2 + max_new_tokens - 1:
            raise ValueError(f"the given cache (batch {cache.batch}, max_len {cache.max_len}) cannot hold "
                             f"{t + 2} prompt rows + {max_new_tokens - 1} decode rows")
        cache.reset()
    n = 0
    if prefix is not None:
        n = prefix.length
        if n > t:
            raise ValueError(f"{n} prefix rows for a prompt of {t} rows")
        cache.fill(prefix.k, prefix.v, n)
    logits = talker(rows[:, n:].to(dtype), positions[:, :, n:], cache, last_only=True)[:, -1]  # (1, V)

    state = TalkerState(cache=cache, embed_tokens=thinker_embed_tokens, eos_row=text[2], pad_row=text[3],
                        next_position=next_pos, max_new_tokens=max_new_tokens, logits=logits)
    # the reference's penalty runs over mask * T, pad, bos and the codes; only the set of ids matters
    state.history = torch.zeros(1, 3 + max_new_tokens, dtype=torch.long, device=dev)  # (1, 3 + N)
    state.history[0, :3] = torch.tensor([cfg.codec_mask, cfg.codec_pad, cfg.codec_bos])
    state.history_len = 3
    state.suppress_ids = torch.tensor([cfg.codec_bos], device=dev)  # (1,)
    return state


def talker_push_reply(state: TalkerState, token_id: int, hidden: Tensor) -> None:
    """One more Thinker reply token arrived: its id and the Thinker's hidden state (Ht,) when it fed that token."""
    if state.reply_ended:
        raise ValueError("the Thinker reply already ended (talker_end_reply was called)")
    width = state.eos_row.shape[0]
    row = _as_row(hidden, width, "hidden")
    token_id = _check_id(token_id, state.embed_tokens.num_embeddings, "reply token")
    with torch.no_grad():
        e = state.embed_tokens(torch.tensor(token_id, device=state.eos_row.device))  # (Ht,)
        state.pending.append(row.to(e.dtype) + e)  # (Ht,)


def talker_end_reply(state) -> None:
    """The Thinker finished: the Talker gets tts_text_end once, then tts_text_pad for every later step.
    (Any Talker state with the reply-feed fields: this one's and `talker.qwen3_talker`'s.)"""
    state.reply_ended = True


def next_reply_row(state) -> Tensor | None:
    """The text-track row of the next step: a pushed reply row, else (reply ended) the eos row once, then the pad
    row; None while waiting for the Thinker. Shared by both Talker families (`pending`, `reply_ended`, `eos_fed`,
    `eos_row`, `pad_row` on their states)."""
    if state.pending:
        return state.pending.popleft()
    if not state.reply_ended:
        return None
    if not state.eos_fed:
        state.eos_fed = True
        return state.eos_row
    return state.pad_row


@torch.no_grad()
def talker_step(talker: Talker, state: TalkerState, sampler) -> int | None:
    """Sample one codec code; None when finished (see state.finished) or waiting for the next reply entry.

    The first call after `talker_prefill` never waits. A later call first feeds the previous code with the next
    reply entry; if the Thinker has neither pushed that entry nor ended, it returns None and changes nothing.
    `sampler(logits (1, V), history (1, N), suppress_ids (1,))` -> ids (1,), e.g. `omnivox.thinker.sampling.Sampler`.
    """
    if state.finished:
        return None
    if state.logits is None:
        entry = next_reply_row(state)
        if entry is None:
            return None
        row = entry + talker.model.embed_tokens(state.last_token)[0]  # (Ht,)
        pos = text_positions(state.next_position, 1, device=entry.device)  # (3, 1, 1)
        state.logits = talker(row.to(talker.thinker_to_talker_proj.weight.dtype)[None, None], pos,
                              state.cache)[:, -1]  # (1, V)
        state.next_position += 1
    logits, state.logits = state.logits, None
    state.last_logits = logits
    sampled = sampler(logits, state.history[:, :state.history_len], state.suppress_ids).reshape(1)  # (1,)
    token = int(sampled)
    state.sampled += 1
    if token in talker.cfg.eos_ids:
        state.finished, state.finish_reason = True, "stop"
        return None
    state.codes.append(token)
    state.last_token = sampled.long()
    state.history[0, state.history_len] = state.last_token[0]
    state.history_len += 1
    if state.sampled >= state.max_new_tokens:
        state.finished, state.finish_reason = True, "length"
    return token


@torch.no_grad()
def talker_generate(talker: Talker, thinker_embed_tokens: nn.Embedding, prompt_ids: Tensor, prompt_hidden: Tensor,
                    reply_ids: list[int], reply_hidden: Tensor, speaker_bos: int, sampler,
                    prompt_position_ids: Tensor | None = None,
                    max_new_tokens: int = TALKER_MAX_NEW_TOKENS, codec_prompt: bool = False) -> TalkerState:
    """Codes for a whole Thinker reply at once (what the reference does), through the step API.

    reply_ids: the reply tokens the Thinker fed back (its sampled tokens without the final EOS / last token);
    reply_hidden (N, Ht): their hidden states. Returns the finished state (`.codes`, `.finish_reason`).
    """
    if len(reply_ids) < 1 or reply_hidden.shape[0] != len(reply_ids):
        raise ValueError(f"need at least one reply token and one hidden state per token, got {len(reply_ids)} ids "
                         f"and hidden of shape {tuple(reply_hidden.shape)}")
    state = talker_prefill(talker, thinker_embed_tokens, prompt_ids, prompt_hidden, reply_ids[0], reply_hidden[0],
                           speaker_bos, prompt_position_ids=prompt_position_ids, max_new_tokens=max_new_tokens,
                           codec_prompt=codec_prompt)
    for tok, h in zip(reply_ids[1:], reply_hidden[1:]):
        talker_push_reply(state, tok, h)
    talker_end_reply(state)
    while not state.finished:
        talker_step(talker, state, sampler)
    return state
