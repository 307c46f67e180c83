"""What a request's sampling settings mean for the Thinker and the Talker: one rule for the CLI, the Python API,
the server and the demos, matching the reference's `generate`.

- Greedy is `generate(do_sample=False)`: the argmax after the logits processors, so the repetition penalty still
  applies (the checkpoint's generation_config.json value for the Thinker, the reference's 1.05 for the Talker);
  temperature / top-k / top-p shape a random draw and do not apply. `repetition_penalty=1.0` turns it off.
- Without explicit settings the Thinker follows generation_config.json (no `do_sample` there means greedy, as in
  the reference) and the Talker the reference's generate() defaults (sampled: top-k 40, top-p 0.8,
  temperature 0.9, repetition penalty 1.05).
- An explicit temperature / top-p / top-k asks for sampling (starting from neutral values when the checkpoint
  decodes greedily); an explicit repetition penalty alone keeps the mode and replaces the penalty.
"""

from __future__ import annotations

from omnivox.talker.model import default_sampling as talker_defaults
from omnivox.thinker.sampling import SamplingParams


def checkpoint_sampling(generation: dict) -> SamplingParams:
    """The checkpoint's generation_config.json defaults, read the way the reference reads them (no do_sample ->
    greedy, which keeps the file's repetition penalty)."""
    penalty = float(generation.get("repetition_penalty", 1.0) or 1.0)
    if not generation.get("do_sample", False):
        return SamplingParams(greedy=True, repetition_penalty=penalty)
    return SamplingParams(
        greedy=False,
        temperature=float(generation.get("temperature", 1.0)),
        top_k=int(generation.get("top_k", 50) or 0),
        top_p=float(generation.get("top_p", 1.0)),
        repetition_penalty=penalty,
    )


def thinker_sampling(generation: dict, greedy: bool = False, temperature: float | None = None,
                     top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
                     seed: int | None = None) -> SamplingParams:
    """The Thinker's SamplingParams for a request (None: not given). See the module docstring."""
    base = checkpoint_sampling(generation)
    penalty = repetition_penalty if repetition_penalty is not None else base.repetition_penalty
    warpers = (temperature, top_p, top_k)
    if greedy or (base.greedy and all(v is None for v in warpers)):
        return SamplingParams(greedy=True, repetition_penalty=penalty, seed=seed)
    neutral = base.greedy  # the checkpoint decodes greedily but sampling was asked for: start from neutral values
    return SamplingParams(
        greedy=False,
        temperature=temperature if temperature is not None else (1.0 if neutral else base.temperature),
        top_k=top_k if top_k is not None else (0 if neutral else base.top_k),
        top_p=top_p if top_p is not None else (1.0 if neutral else base.top_p),
        repetition_penalty=penalty,
        seed=seed,
    )


def talker_sampling(greedy: bool = False, repetition_penalty: float | None = None,
                    seed: int | None = None) -> SamplingParams:
    """The Talker's SamplingParams: the reference's defaults, greedy (penalty kept) when asked."""
    return talker_defaults(seed=seed, greedy=greedy, repetition_penalty=repetition_penalty)
