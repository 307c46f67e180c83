"""Token sampling for the Thinker and the Talker, matching Hugging Face's logits processors.

Order (as `generate` applies them): suppressed ids -> -inf, repetition penalty, temperature, top-k, top-p, then a
multinomial draw from a generator the Sampler owns (seeded once, so a seeded run is reproducible).
`greedy=True` is what `generate(do_sample=False)` does: the argmax after the logits *processors* (suppressed ids
and the repetition penalty, which Hugging Face applies in greedy mode too); the *warpers* (temperature, top-k,
top-p) only shape a random draw, so greedy ignores them. `repetition_penalty=1.0` turns the penalty off. All work is done in fp32 on the logits'
device; no host sync happens except the draw itself when the caller reads the ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0                     # 0: no top-k filter
    top_p: float = 1.0                 # 1.0: no nucleus filter
    repetition_penalty: float = 1.0    # 1.0: none; > 1 discourages ids already in the history
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (use greedy=True for argmax)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """Seen ids: positive logits divided by the penalty, negative ones multiplied (HF RepetitionPenalty).

    Ids at or past the vocabulary size (possible when an embedding table is larger than the head) are ignored.
    """
    vocab = logits.shape[-1]
    history = history.clamp(max=vocab)  # out-of-vocabulary ids land on a spare column, dropped below
    padded = F.pad(logits, (0, 1))  # (B, V+1)
    seen = torch.gather(padded, 1, history)  # (B, N)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, history, seen)[:, :vocab]  # (B, V)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits (ties with the k-th kept), the rest -inf (HF TopKLogitsWarper)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest top set whose probability reaches p (at least one id), the rest -inf (HF TopPLogitsWarper)."""
    sorted_logits, order = torch.sort(logits, descending=False)  # (B, V) ascending
    cum = sorted_logits.softmax(-1).cumsum(-1)  # (B, V)
    drop_sorted = cum <= (1 - p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


class Sampler:
    def __init__(self, params: SamplingParams, device="cpu"):
        self.params = params
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def process(self, logits: Tensor, history: Tensor | None = None, suppress_ids=None) -> Tensor:
        """The filtered fp32 logits (B, V) that `__call__` samples from (or takes the argmax of when greedy)."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be (B, V), got {tuple(logits.shape)}")
        p = self.params
        scores = logits.to(torch.float32)  # (B, V)
        if suppress_ids is not None:
            ids = torch.as_tensor(suppress_ids, dtype=torch.long, device=scores.device).reshape(-1)
            if ids.numel():
                scores = scores.index_fill(1, ids, float("-inf"))
        if history is not None and history.numel() and p.repetition_penalty != 1.0:
            if history.dim() != 2 or history.shape[0] != scores.shape[0]:
                raise ValueError(f"history must be (B, N) with B={scores.shape[0]}, got {tuple(history.shape)}")
            scores = apply_repetition_penalty(scores, history.to(device=scores.device, dtype=torch.long),
                                              p.repetition_penalty)
        if p.greedy:
            return scores
        if p.temperature != 1.0:
            scores = scores / p.temperature
        if p.top_k > 0:
            scores = top_k_filter(scores, p.top_k)
        if p.top_p < 1.0:
            scores = top_p_filter(scores, p.top_p)
        return scores

    def __call__(self, logits: Tensor, history: Tensor | None = None, suppress_ids=None) -> Tensor:
        """logits (B, V) -> ids (B,) long."""
        scores = self.process(logits, history, suppress_ids)  # (B, V)
        if self.params.greedy:
            return scores.argmax(-1)  # (B,)
        probs = scores.softmax(-1)  # (B, V)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]  # (B,)
