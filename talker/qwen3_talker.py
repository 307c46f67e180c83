"""The Qwen3-Omni Talker: an MoE decoder that speaks the Thinker's reply as codec frames (G codebooks per 80 ms).

What is notable here:
- Decoder: Qwen3 attention (q/k norm, interleaved multimodal RoPE; `thinker/qwen3_layers`) and in *every* layer
  a sparse MoE block (`thinker/moe.SparseMoE`): a softmax router picks top-k of E experts (weights renormalised
  when `norm_topk_prob`), plus a shared expert scaled by sigmoid(shared_expert_gate(x)). (The reference builds
  that block in every layer whatever `mlp_only_layers` / `decoder_sparse_step` say, so we read and ignore them
  too.) Experts run grouped: the token-expert pairs are sorted by expert and each active expert runs one GEMM
  over its tokens; there is no per-token loop. Expert weights keep the checkpoint's per-expert names
  (`mlp.experts.{e}.gate_proj.weight`).
- Inputs, re-stated from the reference's `Qwen3OmniMoeForConditionalGeneration.generate` (transformers 5.23).
  Only the Thinker's *input embeddings* e(x) (its `embed_tokens`) and, at audio/image/video placeholders, its
  hidden state h_L(x) after layer L = `accept_hidden_layer` are read; T(·) = `text_projection`, M(·) =
  `hidden_projection` (two-layer SiLU MLPs from the Thinker's width), C = the Talker's codec table:

      prompt rows, in order                       text track                codec track
      every row of every *user* turn              T(e(x)), or M(h_L(x))     -
        (a row's turn = the role token right        at a media placeholder
         after the latest <|im_start|>; system
         turns and earlier assistant turns are
         left out)
      last assistant turn: a_0 a_1 a_2             T(e(a_i))                 0
        (<|im_start|> assistant \\n)
      4 rows                                      T(e(tts_pad))             C[nothink], C[think_bos],
                                                                            C[think_eos], C[speaker id]
      1 row                                       T(e(tts_bos))             C[codec_pad]
      1 row                                       T(e(a_3)) = 1st reply tok C[codec_bos]         -> code 0, frame 0
      decode step k >= 1                          T(e(a_{k+3}))             sum of frame k-1's G code
                                                  then T(e(tts_eos)) once,  embeddings          -> frame k
                                                  then T(e(tts_pad))

  a_3, a_4, ... are the reply tokens the Thinker *fed back* (its final EOS, or a max-tokens last token, is never
  fed, so it is never spoken). Positions are plain 0 .. P-1 then P, P+1, ... on all three axes for a text prompt;
  for media prompts the reference recomputes multimodal ids over the Talker's own rows (`position_ids=`).
- Per frame: code 0 comes from `codec_head` with the reference's processors (repetition penalty 1.05 over the
  codes 0 so far, ids [V-1024, V) except codec_eos suppressed; EOS = codec_eos), then the code predictor fills
  codes 1 .. G-1 (`code_predictor.py`). Generation stops at EOS, or when `max_new_tokens` codes 0 were sampled:
  the reference runs the predictor for a code 0 only on the step after it, so a last code 0 sampled at the limit
  never becomes a frame (max_new_tokens = N gives at most N - 1 frames), and we do the same.
- Lock-step streaming: frame k needs only reply token a_{k+3} (or the reply's end). `talker_step` returns None
  while that has not arrived; each frame can go straight to Code2Wav (`code2wav.Code2WavState`), so the first
  audio is out before the second frame is predicted.
- One sequence per state (batch 1); static KV caches (Talker: prompt + max_new_tokens rows; predictor: G rows).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnivox.talker.code_predictor import CodePredictor, CodePredictorConfig, predict_residual_codes
from omnivox.talker.model import next_reply_row, talker_end_reply  # talker_end_reply: also this module's API
from omnivox.thinker.config import MoEConfig, Qwen3DecoderConfig
from omnivox.thinker.model import KVCache, RMSNorm, text_positions
from omnivox.thinker.moe import SparseMoE
from omnivox.thinker.qwen3_layers import (Qwen3Attention, allocate_cache, check_rows,
                                          rope_axes, rope_cos_sin, rope_inv_freq)
from omnivox.thinker.sampling import SamplingParams

# The reference's `Qwen3OmniMoeForConditionalGeneration.generate(talker_*=...)` defaults (not in any config).
TALKER_SAMPLING_DEFAULTS = dict(top_k=50, top_p=1.0, temperature=0.9, repetition_penalty=1.05)
TALKER_MAX_NEW_TOKENS = 4096
SUPPRESSED_TAIL = 1024  # the reference suppresses the last 1024 codec ids (control ids), codec_eos excepted


def talker_sampling(seed: int | None = None, greedy: bool = False) -> SamplingParams:
    """Code 0's sampling: the reference's generate() defaults, or with greedy its argmax after the processors
    (talker_do_sample=False keeps the repetition penalty and the suppressed ids)."""
    d = TALKER_SAMPLING_DEFAULTS
    if greedy:
        return SamplingParams(greedy=True, seed=seed, repetition_penalty=d["repetition_penalty"])
    return SamplingParams(greedy=False, seed=seed, **d)


@dataclass(frozen=True)
class Qwen3TalkerConfig:
    decoder: Qwen3DecoderConfig     # talker_config.text_config; intermediate_size = the projections' middle width
    moe: MoEConfig
    code_predictor: CodePredictorConfig
    thinker_hidden_size: int
    accept_hidden_layer: int        # h_L: the Thinker's output after this many layers feeds media rows
    num_code_groups: int            # G codebooks per frame
    codec_pad: int
    codec_bos: int
    codec_eos: int                  # codec_eos_token_id: ends generation
    codec_nothink: int
    codec_think_bos: int
    codec_think_eos: int
    speakers: dict                  # lower-case name -> codec id (speaker_id)
    # Thinker-vocabulary ids (top level of config.json; media ids from thinker_config)
    tts_pad: int
    tts_bos: int
    tts_eos: int
    im_start: int
    user: int
    assistant: int
    system: int
    audio_token: int
    image_token: int
    video_token: int
    # numbers the reference's Talker reads for multimodal position ids (computed by the caller, see position_ids)
    position_id_per_seconds: float = 25
    spatial_merge_size: int = 2

    @classmethod
    def from_config(cls, cfg: dict) -> "Qwen3TalkerConfig":
        """From the whole config.json dict (v4 or v5 spelling)."""
        t = cfg.get("talker_config")
        if not isinstance(t, dict) or not isinstance(t.get("text_config"), dict):
            raise ValueError("config.json has no talker_config.text_config")
        text = t["text_config"]
        thinker = cfg.get("thinker_config") or {}
        dec = Qwen3DecoderConfig.from_dict(text, "talker_config.text_config")
        try:
            moe = MoEConfig(
                num_experts=int(text.get("num_local_experts", text.get("num_experts", 0))),
                top_k=int(text["num_experts_per_tok"]), intermediate_size=int(text["moe_intermediate_size"]),
                shared_intermediate_size=int(text["shared_expert_intermediate_size"]),
                norm_topk_prob=bool(text.get("norm_topk_prob", False)))
            pred = CodePredictorConfig.from_dict(t["code_predictor_config"])
            groups = int(t["num_code_groups"])
            out = cls(
                decoder=dec, moe=moe, code_predictor=pred, thinker_hidden_size=int(t["thinker_hidden_size"]),
                accept_hidden_layer=int(t["accept_hidden_layer"]), num_code_groups=groups,
                codec_pad=int(t["codec_pad_id"]), codec_bos=int(t["codec_bos_id"]),
                codec_eos=int(t["codec_eos_token_id"]), codec_nothink=int(t["codec_nothink_id"]),
                codec_think_bos=int(t["codec_think_bos_id"]), codec_think_eos=int(t["codec_think_eos_id"]),
                speakers={str(k).lower(): int(v) for k, v in (t.get("speaker_id") or {}).items()},
                tts_pad=int(cfg["tts_pad_token_id"]), tts_bos=int(cfg["tts_bos_token_id"]),
                tts_eos=int(cfg["tts_eos_token_id"]), im_start=int(cfg["im_start_token_id"]),
                user=int(cfg["user_token_id"]), assistant=int(cfg["assistant_token_id"]),
                system=int(cfg["system_token_id"]),
                audio_token=int(thinker.get("audio_token_id", t.get("audio_token_id"))),
                image_token=int(thinker.get("image_token_id", t.get("image_token_id"))),
                video_token=int(thinker.get("video_token_id", t.get("video_token_id"))),
                position_id_per_seconds=t.get("position_id_per_seconds", 25),
                spatial_merge_size=int(t.get("spatial_merge_size", 2)),
            )
        except KeyError as e:
            raise ValueError(f"config.json: the talker part lacks {e}") from None
        except TypeError as e:
            raise ValueError(f"config.json: a talker token id is missing ({e})") from None
        if not 1 <= moe.top_k <= moe.num_experts:
            raise ValueError(f"talker: num_experts_per_tok {moe.top_k} must be in 1..num_experts {moe.num_experts}")
        if pred.num_code_groups != groups:
            raise ValueError(f"talker num_code_groups {groups} != code_predictor_config's {pred.num_code_groups}")
        if pred.decoder.hidden_size != dec.hidden_size:
            raise ValueError(f"the code predictor's hidden_size {pred.decoder.hidden_size} must equal the Talker's "
                             f"{dec.hidden_size} (it reads the Talker's hidden state and codec embedding)")
        if not 0 <= out.codec_eos < dec.vocab_size:
            raise ValueError(f"codec_eos_token_id {out.codec_eos} is outside the Talker vocabulary")
        return out

    @property
    def suppress_ids(self) -> list[int]:
        v = self.decoder.vocab_size
        return [i for i in range(max(0, v - SUPPRESSED_TAIL), v) if i != self.codec_eos]

    def speaker_code(self, speaker: str | int) -> int:
        if isinstance(speaker, int):
            return speaker
        code = self.speakers.get(str(speaker).lower())
        if code is None:
            raise ValueError(f"unknown speaker {speaker!r}; this checkpoint has {sorted(self.speakers)}")
        return code


# ----------------------------------------------------------------------------------------------------------------
# Modules (parameter names = the checkpoint's keys under `talker.`)


class ResizeMLP(nn.Module):
    """Thinker width -> Talker width: linear_fc2(silu(linear_fc1(x)))."""

    def __init__(self, cin: int, mid: int, cout: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(cin, mid, bias=True)
        self.linear_fc2 = nn.Linear(mid, cout, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class TalkerLayer(nn.Module):
    def __init__(self, cfg: Qwen3TalkerConfig):
        super().__init__()
        dec = cfg.decoder
        self.input_layernorm = RMSNorm(dec.hidden_size, dec.rms_norm_eps)
        self.self_attn = Qwen3Attention(dec)
        self.post_attention_layernorm = RMSNorm(dec.hidden_size, dec.rms_norm_eps)
        self.mlp = SparseMoE(dec.hidden_size, cfg.moe)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer_idx: int) -> Tensor:
        b, t, h = x.shape
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer_idx)  # (1, T, H)
        return x + self.mlp(self.post_attention_layernorm(x).view(b * t, h)).view(b, t, h)


class TalkerModel(nn.Module):
    def __init__(self, cfg: Qwen3TalkerConfig):
        super().__init__()
        dec = cfg.decoder
        self.cfg = dec
        self.codec_embedding = nn.Embedding(dec.vocab_size, dec.hidden_size)
        self.layers = nn.ModuleList(TalkerLayer(cfg) for _ in range(dec.num_layers))
        self.norm = RMSNorm(dec.hidden_size, dec.rms_norm_eps)

    def forward(self, rows: Tensor, position_ids: Tensor, cache: KVCache) -> Tensor:
        """rows (1, T, H), position_ids (3, 1, T) -> final-norm hidden (1, T, H); advances the cache by T."""
        dec = self.cfg
        check_rows(rows, dec.hidden_size, cache, "Talker rows")
        t = rows.shape[1]
        if tuple(position_ids.shape) != (3, 1, t):
            raise ValueError(f"position_ids must be (3, 1, {t}), got {tuple(position_ids.shape)}")
        cos, sin = rope_cos_sin(rope_inv_freq(dec, rows.device), rope_axes(dec, rows.device), position_ids)
        cos, sin = cos.to(rows.dtype), sin.to(rows.dtype)  # (1, T, D)
        x = rows
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        cache.length += t
        return self.norm(x)


class Qwen3Talker(nn.Module):
    """Parameter names equal the checkpoint's keys under `talker.`."""

    def __init__(self, cfg: Qwen3TalkerConfig):
        super().__init__()
        self.cfg = cfg
        dec = cfg.decoder
        self.text_projection = ResizeMLP(cfg.thinker_hidden_size, dec.intermediate_size, dec.hidden_size)
        self.hidden_projection = ResizeMLP(cfg.thinker_hidden_size, dec.intermediate_size, dec.hidden_size)
        self.model = TalkerModel(cfg)
        self.codec_head = nn.Linear(dec.hidden_size, dec.vocab_size, bias=False)
        self.code_predictor = CodePredictor(cfg.code_predictor)


# ----------------------------------------------------------------------------------------------------------------
# Prompt assembly


def user_rows_mask(cfg: Qwen3TalkerConfig, ids: Tensor) -> Tensor:
    """ids (T,) -> (T,) bool: rows in a user turn (the reference's cummax over <|im_start|> positions)."""
    t = ids.shape[0]
    positions = torch.arange(t, device=ids.device)
    starts = torch.where(ids == cfg.im_start, positions, torch.full_like(positions, -1))
    latest = torch.cummax(starts, dim=0).values.clamp_min(0)  # (T,)
    roles = ids[(latest + 1).clamp_max(t - 1)]  # (T,)
    return roles == cfg.user


def assistant_start(cfg: Qwen3TalkerConfig, ids: Tensor) -> int:
    """Index of the last `<|im_start|> assistant` pair in ids (T,)."""
    hits = ((ids[:-1] == cfg.im_start) & (ids[1:] == cfg.assistant)).nonzero().flatten()
    if hits.numel() == 0:
        raise ValueError("the prompt has no '<|im_start|>assistant' turn for the Talker to speak (the prompt must "
                         "end with the assistant header, as the chat template's add_generation_prompt gives)")
    return int(hits[-1])


@torch.no_grad()
def project_text(talker: Qwen3Talker, thinker_embed_tokens: nn.Embedding, ids) -> Tensor:
    """Thinker-vocabulary ids (N,) -> text-track rows T(e(ids)) (N, H)."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=thinker_embed_tokens.weight.device).reshape(-1)
    vocab = thinker_embed_tokens.num_embeddings
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"token ids must lie in the Thinker vocabulary 0..{vocab - 1}, got {ids.tolist()}")
    w = talker.text_projection.linear_fc1.weight
    return talker.text_projection(thinker_embed_tokens(ids).to(w.device, w.dtype))  # (N, H)


@torch.no_grad()
def talker_prompt(talker: Qwen3Talker, thinker_embed_tokens: nn.Embedding, prompt_ids: Tensor,
                  accept_hidden: Tensor | None, speaker: str | int, reply_ids=()) -> tuple[Tensor, list[Tensor]]:
    """The Talker's prefill rows and the text-track rows left for its decode steps (module docstring table).

    prompt_ids (1, T): the Thinker's prompt ending in the assistant header; accept_hidden (1, T, Ht): the
    Thinker's hidden states after `accept_hidden_layer` layers for those rows (only media rows of user turns are
    read; None is fine for a prompt without media); reply_ids: reply tokens the Thinker has fed so far (the
    first one at least, unless the prompt's assistant turn already holds 4 rows).
    Returns (rows (1, P, H), [T(e(x)) (H,) for the assistant rows after the 4th]).
    """
    cfg = talker.cfg
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1 or prompt_ids.shape[1] < 2:
        raise ValueError(f"prompt_ids must be (1, T) with T >= 2, got {tuple(prompt_ids.shape)}")
    ids = prompt_ids[0].to(thinker_embed_tokens.weight.device).long()
    t = ids.shape[0]
    w = talker.text_projection.linear_fc1.weight
    media = (ids == cfg.audio_token) | (ids == cfg.image_token) | (ids == cfg.video_token)  # (T,)
    user = user_rows_mask(cfg, ids)  # (T,)
    user_media = user & media
    if user_media.any():
        if accept_hidden is None or tuple(accept_hidden.shape) != (1, t, cfg.thinker_hidden_size):
            got = None if accept_hidden is None else tuple(accept_hidden.shape)
            raise ValueError(f"the prompt's user turns hold media placeholders, so accept_hidden must be the "
                             f"Thinker's hidden states after layer {cfg.accept_hidden_layer}, shape "
                             f"(1, {t}, {cfg.thinker_hidden_size}); got {got}")
    user_idx = user.nonzero().flatten()  # (U,) rows kept, in order
    parts = []
    if user_idx.numel():
        rows = torch.empty(user_idx.numel(), cfg.decoder.hidden_size, device=w.device, dtype=w.dtype)  # (U, H)
        is_media = media[user_idx]
        if is_media.any():
            h = accept_hidden[0, user_idx[is_media]].to(w.device, w.dtype)  # (Um, Ht)
            rows[is_media.to(w.device)] = talker.hidden_projection(h)
        if (~is_media).any():
            rows[(~is_media).to(w.device)] = project_text(talker, thinker_embed_tokens, ids[user_idx[~is_media]])
        parts.append(rows)

    start = assistant_start(cfg, ids)
    tail = ids[start:].tolist() + [int(r) for r in reply_ids]
    if len(tail) < 4:
        raise ValueError("the Talker's prefill needs the first reply token the Thinker fed (reply_ids), after "
                         "'<|im_start|>assistant\\n'")
    assistant = project_text(talker, thinker_embed_tokens, tail)  # (A, H)
    tts = project_text(talker, thinker_embed_tokens, [cfg.tts_pad, cfg.tts_bos])  # (2, H)
    text = torch.cat([assistant[:3], tts[:1].expand(4, -1), tts[1:2], assistant[3:4]])  # (9, H)
    codec_ids = torch.tensor([cfg.codec_nothink, cfg.codec_think_bos, cfg.codec_think_eos, cfg.speaker_code(speaker),
                              cfg.codec_pad, cfg.codec_bos], device=w.device)
    if not 0 <= int(codec_ids[3]) < cfg.decoder.vocab_size:
        raise ValueError(f"speaker id {int(codec_ids[3])} is outside the Talker vocabulary")
    codec = torch.cat([torch.zeros(3, cfg.decoder.hidden_size, device=w.device, dtype=w.dtype),
                       talker.model.codec_embedding(codec_ids)])  # (9, H)
    parts.append(text + codec)
    return torch.cat(parts)[None], list(assistant[4:].unbind(0))  # (1, P, H), [(H,)]


# ----------------------------------------------------------------------------------------------------------------
# State and steps


@dataclass
class Qwen3TalkerState:
    """One utterance: caches, the text-track rows waiting, the last logits/hidden, the frames so far."""
    cache: KVCache
    predictor_cache: KVCache
    thinker_embed_tokens: nn.Embedding  # the Thinker's table (shared, not copied)
    eos_row: Tensor                     # (H,) T(e(tts_eos))
    pad_row: Tensor                     # (H,) T(e(tts_pad))
    next_position: int                  # position of the next decode row (all three axes)
    max_new_tokens: int
    suppress_ids: Tensor                # (S,) long
    history: Tensor                     # (1, max_new_tokens) long: codes 0 so far (the repetition penalty's view)
    history_len: int = 0
    logits: Tensor | None = None        # (1, V) fp32: code 0 of the next frame; None until the next row is fed
    hidden: Tensor | None = None        # (1, H) final-norm hidden of the row that gave `logits`
    codec_row: Tensor | None = None     # (H,) sum of the last frame's G code embeddings (next row's codec track)
    pending: deque = field(default_factory=deque)  # (H,) text-track rows pushed but not consumed yet
    reply_ended: bool = False
    eos_fed: bool = False
    frames: list = field(default_factory=list)     # (G,) long per frame
    sampled: int = 0                    # codes 0 sampled, EOS included (max_new_tokens counts these)
    finished: bool = False
    finish_reason: str | None = None    # "stop" (codec_eos) or "length"


@torch.no_grad()
def talker_prefill(talker: Qwen3Talker, thinker_embed_tokens: nn.Embedding, prompt_ids: Tensor,
                   accept_hidden: Tensor | None, speaker: str | int, reply_ids=(),
                   position_ids: Tensor | None = None,
                   max_new_tokens: int = TALKER_MAX_NEW_TOKENS) -> Qwen3TalkerState:
    """Run the Talker prompt; the state then holds the logits of frame 0's code 0 (see `talker_prompt`).

    position_ids (3, 1, P): multimodal ids of the P prefill rows (None: plain 0 .. P-1, the text-prompt case);
    decode rows continue at max + 1.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = talker.cfg
    rows, rest = talker_prompt(talker, thinker_embed_tokens, prompt_ids, accept_hidden, speaker, reply_ids)
    p = rows.shape[1]
    w = talker.codec_head.weight
    if position_ids is None:
        position_ids = text_positions(0, p, device=w.device)  # (3, 1, P)
    elif tuple(position_ids.shape) != (3, 1, p):
        raise ValueError(f"position_ids must be (3, 1, {p}) for this prompt, got {tuple(position_ids.shape)}")
    cache = allocate_cache(cfg.decoder, p + max_new_tokens, device=w.device, dtype=w.dtype)
    hidden = talker.model(rows, position_ids.to(w.device), cache)[:, -1]  # (1, H)
    eos_pad = project_text(talker, thinker_embed_tokens, [cfg.tts_eos, cfg.tts_pad])  # (2, H)
    state = Qwen3TalkerState(
        cache=cache, predictor_cache=talker.code_predictor.new_cache(), thinker_embed_tokens=thinker_embed_tokens,
        eos_row=eos_pad[0], pad_row=eos_pad[1], next_position=int(position_ids.max()) + 1,
        max_new_tokens=max_new_tokens, suppress_ids=torch.tensor(cfg.suppress_ids, device=w.device, dtype=torch.long),
        history=torch.zeros(1, max_new_tokens, dtype=torch.long, device=w.device),
        logits=talker.codec_head(hidden).float(), hidden=hidden)
    state.pending.extend(rest)
    return state


@torch.no_grad()
def talker_push_reply(talker: Qwen3Talker, state: Qwen3TalkerState, token_id: int) -> None:
    """The Thinker fed one more reply token (sampled it and ran it through its decoder)."""
    if state.reply_ended:
        raise ValueError("the Thinker reply already ended (talker_end_reply was called)")
    state.pending.append(project_text(talker, state.thinker_embed_tokens, [int(token_id)])[0])  # (H,)


@torch.no_grad()
def talker_step(talker: Qwen3Talker, state: Qwen3TalkerState, sampler, predictor_sampler,
                on_logits=None) -> Tensor | None:
    """One codec frame (G,) long, or None: finished (state.finished) or waiting for the next reply token.

    sampler(logits (1, V), history (1, N), suppress_ids (S,)) -> (1,) picks code 0 (`Sampler(talker_sampling())`);
    predictor_sampler(logits (1, V)) -> (1,) codes 1 .. G-1 (`Sampler(code_predictor.predictor_sampling())`).
    on_logits(k, logits (1, V)) observes raw logits: k = 0 for code 0, 1 .. G-1 for the predictor's.
    """
    if state.finished:
        return None
    if state.logits is None:
        text = next_reply_row(state)
        if text is None:
            return None
        row = (state.codec_row + text)[None, None]  # (1, 1, H)
        pos = text_positions(state.next_position, 1, device=row.device)  # (3, 1, 1)
        state.hidden = talker.model(row, pos, state.cache)[:, -1]  # (1, H)
        state.logits = talker.codec_head(state.hidden).float()  # (1, V)
        state.next_position += 1
    logits, state.logits = state.logits, None
    if on_logits is not None:
        on_logits(0, logits)
    code0 = sampler(logits, state.history[:, :state.history_len], state.suppress_ids).reshape(1).long()  # (1,)
    state.sampled += 1
    if int(code0) == talker.cfg.codec_eos:
        state.finished, state.finish_reason = True, "stop"
        return None
    if state.sampled >= state.max_new_tokens:
        # the reference completes a frame only on the step after its code 0; at the limit there is none
        state.finished, state.finish_reason = True, "length"
        return None
    state.history[0, state.history_len] = code0[0]
    state.history_len += 1
    code0_embed = talker.model.codec_embedding(code0)  # (1, H)
    rest, rest_embeds = predict_residual_codes(talker.code_predictor, state.hidden, code0_embed,
                                               state.predictor_cache, predictor_sampler, on_logits)
    state.codec_row = torch.cat([code0_embed, rest_embeds]).sum(0)  # (H,)
    frame = torch.cat([code0, rest])  # (G,)
    state.frames.append(frame)
    return frame


@torch.no_grad()
def talker_generate(talker: Qwen3Talker, thinker_embed_tokens: nn.Embedding, prompt_ids: Tensor,
                    accept_hidden: Tensor | None, reply_ids, speaker: str | int, sampler, predictor_sampler,
                    position_ids: Tensor | None = None, max_new_tokens: int = TALKER_MAX_NEW_TOKENS,
                    on_logits=None) -> Qwen3TalkerState:
    """All frames for a whole reply at once (what the reference does), through the step API.

    reply_ids: the reply tokens the Thinker fed (its generated tokens without the last one). Returns the finished
    state; `torch.stack(state.frames, 1)[None]` is the (1, G, N) codes tensor Code2Wav takes.
    """
    reply_ids = [int(r) for r in reply_ids]
    state = talker_prefill(talker, thinker_embed_tokens, prompt_ids, accept_hidden, speaker, reply_ids[:1],
                           position_ids=position_ids, max_new_tokens=max_new_tokens)
    for r in reply_ids[1:]:
        talker_push_reply(talker, state, r)
    talker_end_reply(state)
    while not state.finished:
        talker_step(talker, state, sampler, predictor_sampler, on_logits)
    return state
