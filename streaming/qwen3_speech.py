"""Qwen3-Omni's speech side for one utterance: the MoE Talker + code predictor, then Code2Wav, frame by frame.

The same interface as `pipeline.Speech` (Qwen2.5-Omni), so `decode_reply` runs both families: `give` hands over
each reply token the Thinker fed, `talk` samples every frame that token allows, `audio` synthesizes what was
sampled, `end` finishes after the reply. What differs:
- The Talker reads the prompt's ids, the Thinker's input embeddings and, at media placeholders, the Thinker's
  hidden state after `accept_hidden_layer` layers (`prompt_hidden` here); of the reply only the tokens (their
  embeddings), never the reply's hidden states.
- A frame holds G codes (code 0 from the Talker, 1 .. G-1 from the code predictor) and covers 80 ms. Code2Wav is
  causal, so each frame's audio is final as soon as the frame exists: it is synthesized right away (the first
  audio is out before the second frame is predicted), and the streamed waveform equals the one-shot one.
- `codes` lists the codes codebook by codebook ((G, N) like the reference's Talker output), `reply_tokens_at[j]`
  how many reply tokens the Talker had when it made frame j.
"""

from __future__ import annotations

from typing import Iterator

import torch

from omnivox.thinker.sampling import Sampler


class Qwen3Speech:
    def __init__(self, omni, options, prompt_ids: torch.Tensor, prompt_hidden: torch.Tensor | None, speaker: dict,
                 observe):
        from omnivox.talker.code_predictor import predictor_sampling
        from omnivox.talker.qwen3_talker import talker_sampling

        if omni.talker is None or omni.code2wav is None:
            raise ValueError("speech output needs the Talker and Code2Wav: load the checkpoint with audio=True")
        self.omni, self.options = omni, options
        self.prompt_ids, self.prompt_hidden = prompt_ids, prompt_hidden
        self.speaker = int(speaker["codec_id"])
        params = options.talker_sampling or talker_sampling(options.sampling.seed)
        self.sampler = observe(Sampler(params, device=omni.device), options.on_logits, "talker")
        seed = params.seed
        self.predictor = Sampler(predictor_sampling(seed, greedy=params.greedy), device=omni.device)
        self.wave = omni.code2wav.new_state()
        self.state = None
        self.first: int | None = None        # the first reply token, until the Talker prefill
        self.frames: list[torch.Tensor] = []  # (G,) each, sampled and not yet synthesized
        self.made: list[list[int]] = []      # every frame so far
        self.fed = 0
        self.reply_tokens_at: list[int] = []
        self.samples = 0

    @property
    def codes(self) -> list[list[int]]:
        """The codes codebook by codebook: G lists of N."""
        return [list(c) for c in zip(*self.made)] if self.made else []

    def stopped(self) -> bool:
        return self.options.stop is not None and self.options.stop()

    def give(self, token: int, hidden: torch.Tensor | None = None) -> None:
        """The Thinker fed reply token `token` (its hidden state is not needed by this Talker)."""
        from omnivox.talker.qwen3_talker import talker_push_reply

        if self.state is None and self.first is None:
            self.first = token
        else:
            if self.state is None:
                self.talk()
            talker_push_reply(self.omni.talker, self.state, token)
        self.fed += 1

    def talk(self) -> None:
        """The Talker prefill (first call), then every frame the reply tokens given so far allow."""
        from omnivox.talker.qwen3_talker import talker_prefill, talker_step

        talker = self.omni.talker
        if self.state is None:
            if self.first is None:
                return
            self.state = talker_prefill(talker, self.omni.thinker.model.embed_tokens, self.prompt_ids,
                                        self.prompt_hidden, self.speaker, [self.first],
                                        max_new_tokens=self.options.max_codec_tokens)
        while not self.stopped():
            frame = talker_step(talker, self.state, self.sampler, self.predictor)
            if frame is None:
                return
            self.frames.append(frame)
            self.made.append([int(c) for c in frame])
            self.reply_tokens_at.append(min(self.state.sampled, self.fed))

    def audio(self) -> Iterator:
        """Code2Wav on the frames sampled so far (each frame's audio is final at once)."""
        from omnivox.streaming.pipeline import AudioChunk

        if not self.frames or self.stopped():
            return
        codes = torch.stack(self.frames, dim=1)[None]  # (1, G, n)
        self.frames = []
        wav = self.omni.code2wav(codes.to(self.omni.code2wav.code_embedding.weight.device), self.wave)[0, 0]
        if wav.numel():
            self.samples += wav.numel()
            yield AudioChunk(wav.detach().float().cpu().numpy())

    def end(self) -> Iterator:
        """The reply ended: the Talker runs to its end, frame by frame, each synthesized as it comes."""
        from omnivox.talker.qwen3_talker import talker_end_reply

        self.talk()
        if self.state is None:
            return
        talker_end_reply(self.state)
        while not self.state.finished and not self.stopped():
            self.talk()
            yield from self.audio()
        yield from self.audio()
