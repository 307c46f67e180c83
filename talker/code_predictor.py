"""The Qwen3-Omni code predictor (MTP): fills codebooks 1 .. G-1 of a codec frame from the Talker's hidden state.

What is notable here:
- Per frame, re-stated from the reference's `Qwen3OmniMoeTalkerForConditionalGeneration.prepare_inputs_for_
  generation` and `Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration` (transformers 5.23): a fresh
  sequence of G rows on plain RoPE positions 0 .. G-1 through a small dense Qwen3 decoder (q/k norm):

      row   input                                          head        -> code
      0     the Talker's final-norm hidden state h_t        -
      1     the Talker's codec embedding of code 0          lm_head[0]  -> code 1
      k     codec_embedding[k-2](code k-1), k = 2 .. G-1     lm_head[k-1] -> code k

  The frame's next Talker input is the sum of all G code embeddings: the Talker's table for code 0 and
  `codec_embedding[k-1]` for code k (plus the next text-track row, added by the Talker).
- State: a static KV cache of G positions, reset at every frame (it is allocated once per utterance).
- Sampling (the reference's generate): greedy when the Talker is greedy (`talker_do_sample=False` is mirrored
  onto the predictor); otherwise top-k 50, top-p 0.8, temperature 1.0 (the predictor's generation_config has
  none), no repetition penalty and no suppressed ids.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from omnivox.thinker.config import Qwen3DecoderConfig
from omnivox.thinker.qwen3_layers import (Qwen3Attention, allocate_cache, check_rows,
                                         rope_axes, rope_cos_sin, rope_inv_freq)
from omnivox.thinker.model import KVCache, MLP, RMSNorm, text_positions
from omnivox.thinker.sampling import SamplingParams

# what the reference's Talker passes its predictor when sampling (prepare_inputs_for_generation), not config values
PREDICTOR_SAMPLING_DEFAULTS = dict(top_k=50, top_p=0.8, temperature=1.0)


def predictor_sampling(seed: int | None = None, greedy: bool = False) -> SamplingParams:
    if greedy:
        return SamplingParams(greedy=True, seed=seed)
    return SamplingParams(greedy=False, seed=seed, **PREDICTOR_SAMPLING_DEFAULTS)


@dataclass(frozen=True)
class CodePredictorConfig:
    decoder: Qwen3DecoderConfig     # vocab_size = codebook size of the residual codebooks
    num_code_groups: int            # G: codebooks per frame, code 0 included

    @classmethod
    def from_dict(cls, d: dict) -> "CodePredictorConfig":
        dec = Qwen3DecoderConfig.from_dict(d, "code_predictor_config")
        if dec.mrope_section is not None:
            dec = replace(dec, mrope_section=None)  # the reference gives the predictor plain RoPE
        groups = int(d.get("num_code_groups", 32))
        if groups < 2:
            raise ValueError(f"code_predictor_config: num_code_groups must be >= 2, got {groups}")
        return cls(decoder=dec, num_code_groups=groups)


class PredictorLayer(nn.Module):
    def __init__(self, cfg: Qwen3DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer_idx: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer_idx)  # (1, T, H)
        return x + self.mlp(self.post_attention_layernorm(x))  # (1, T, H)


class PredictorModel(nn.Module):
    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        dec = cfg.decoder
        self.cfg = dec
        self.codec_embedding = nn.ModuleList(nn.Embedding(dec.vocab_size, dec.hidden_size)
                                             for _ in range(cfg.num_code_groups - 1))
        self.layers = nn.ModuleList(PredictorLayer(dec) for _ in range(dec.num_layers))
        self.norm = RMSNorm(dec.hidden_size, dec.rms_norm_eps)

    def forward(self, rows: Tensor, cache: KVCache) -> Tensor:
        """rows (1, T, H) at positions cache.length.. -> final-norm hidden (1, T, H); advances the cache."""
        dec = self.cfg
        check_rows(rows, dec.hidden_size, cache, "code predictor rows")
        t = rows.shape[1]
        pos = text_positions(cache.length, t, device=rows.device)  # (3, 1, T)
        cos, sin = rope_cos_sin(rope_inv_freq(dec, rows.device), rope_axes(dec, rows.device), pos)  # (1, T, D)
        cos, sin = cos.to(rows.dtype), sin.to(rows.dtype)
        x = rows
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        cache.length += t
        return self.norm(x)


class CodePredictor(nn.Module):
    """Parameter names equal the checkpoint's keys under `talker.code_predictor.`."""

    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.model = PredictorModel(cfg)
        self.lm_head = nn.ModuleList(nn.Linear(cfg.decoder.hidden_size, cfg.decoder.vocab_size, bias=False)
                                     for _ in range(cfg.num_code_groups - 1))

    def new_cache(self, device=None, dtype=None) -> KVCache:
        """The per-frame cache (G positions); reused for every frame of an utterance."""
        w = self.lm_head[0].weight
        return allocate_cache(self.cfg.decoder, self.cfg.num_code_groups, device=device or w.device,
                              dtype=dtype or w.dtype)


@torch.no_grad()
def predict_residual_codes(predictor: CodePredictor, talker_hidden: Tensor, code0_embed: Tensor, cache: KVCache,
                           sampler, on_logits=None) -> tuple[Tensor, Tensor]:
    """Codes 1 .. G-1 of one frame -> (codes (G-1,) long, their embeddings (G-1, H)).

    talker_hidden (1, H): the Talker's final-norm hidden state of the row whose logits gave code 0;
    code0_embed (1, H): the Talker's codec embedding of code 0; cache: `predictor.new_cache()` (reset here);
    sampler(logits (1, V)) -> ids (1,); on_logits(k, logits (1, V)) observes the raw logits of code k.
    """
    h = predictor.cfg.decoder.hidden_size
    if tuple(talker_hidden.shape) != (1, h) or tuple(code0_embed.shape) != (1, h):
        raise ValueError(f"talker_hidden and code0_embed must be (1, {h}), got {tuple(talker_hidden.shape)} and "
                         f"{tuple(code0_embed.shape)}")
    groups = predictor.cfg.num_code_groups
    cache.reset()
    rows = torch.stack([talker_hidden[0], code0_embed[0]])[None]  # (1, 2, H)
    codes, embeds = [], []
    for k in range(1, groups):
        hidden = predictor.model(rows.to(predictor.lm_head[0].weight.dtype), cache)[:, -1]  # (1, H)
        logits = predictor.lm_head[k - 1](hidden).float()  # (1, V)
        if on_logits is not None:
            on_logits(k, logits)
        code = sampler(logits).reshape(1).long()  # (1,)
        emb = predictor.model.codec_embedding[k - 1](code)  # (1, H)
        codes.append(code)
        embeds.append(emb[0])
        rows = emb[None]  # (1, 1, H)
    return torch.cat(codes), torch.stack(embeds)  # (G-1,), (G-1, H)
