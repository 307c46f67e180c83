"""token2wav driver: codec codes -> mel (DiT) -> 24 kHz waveform (BigVGAN), one-shot or chunk by chunk.

What is notable here:
- Noise is a function of the absolute mel frame (`dit.frame_noise`: one seeded draw per attention block), so a
  streaming window and a one-shot run integrate the ODE from the same starting point wherever they overlap.
- DiT streaming. The ODE integrates every frame of its input together and one evaluation already reaches
  `blocks_back` blocks back and `blocks_ahead` ahead; across ~36 evaluations the reach compounds, so no finite
  window is exact. As the authors' streaming port does, each chunk is generated in a window holding
  `past_blocks` blocks of past context and `future_blocks` of future context (2 and 1 blocks of 24 frames by
  default), and only the chunk's own frames are kept. Chunk boundaries follow a fixed schedule
  (`chunk_blocks`), and a chunk is computed once the codes reach its future context, so the output does not
  depend on how the codes are pushed (one at a time or all at once). Windows start on block boundaries and use
  absolute positions, so each chunk equals the one-shot DiT run on its window exactly; the whole stream differs
  from one whole-utterance run by the truncated context only (measured in tests/talker/test_token2wav.py).
- Vocoder streaming is exact: windows overlap by the BigVGAN receptive field (`bigvgan.receptive_field`, 34 mel
  frames each way for the official config) and only samples whose whole receptive field was inside the window
  are emitted. The price is `right` frames (340 ms of audio) of look-ahead on top of the DiT's. Except once: the
  first chunk is vocoded with its DiT window's future-context frames standing in for the look-ahead
  (`StreamOptions.early_vocoder`), so the first audio needs one 48-frame DiT window and 24 codes, not two
  windows; only those first samples depend on provisional frames (measured in tests/talker/test_token2wav.py).
- Time to first audio is Talker steps for 24 codes + one DiT solve over 48 frames + BigVGAN over 48 frames.
  `StreamOptions.first_steps` (explicit, off by default) solves that first window with fewer ODE points.
- State lives in small dataclasses passed to functions; the modules stay stateless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from omnivox.talker import dit as dit_mod
from omnivox.talker.bigvgan import BigVGAN, mel_to_wav, receptive_field
from omnivox.talker.dit import DiT, Speaker, frame_noise, solve


@dataclass(frozen=True)
class StreamOptions:
    """Runtime knobs of streaming synthesis (not architecture)."""
    past_blocks: int = 2                         # context blocks before a chunk (authors' port: 48 frames)
    future_blocks: int = 1                       # context blocks after a chunk (authors' port: 24 frames)
    # Blocks per emitted chunk; the last entry repeats. The first chunk is one block: its window is that block
    # plus its future block (48 frames, 24 codes), the least one evaluation's receptive field allows. Later chunks
    # grow (2, then 4 blocks) so fewer frames are solved twice as context: a window of past + 4 + future blocks
    # per 4 emitted (1.75 frames solved per frame emitted, the authors' 3-block chunks need 2).
    chunk_blocks: tuple[int, ...] = (1, 2, 4)
    # First chunk only: vocode it with its window's future-context frames (not final yet) as the vocoder's
    # look-ahead, so audio starts after that one window instead of waiting for the next chunk's window. The
    # first chunk's samples then depend on 24 provisional mel frames (bound measured in tests/talker/test_token2wav.py);
    # from there on the vocoder is exact on the final mel. False: exact from the first sample, later.
    early_vocoder: bool = True
    steps: int = 10                              # ODE time points
    # Explicit fast start (off by default): ODE time points for the first chunk's window only. Fewer points
    # make the first audio sooner at a measured cost in accuracy (see `omnivox bench speech --first-steps`).
    first_steps: int | None = None
    guidance: float = 0.5                        # classifier-free guidance scale (< 1e-5: no null branch)
    sway: float | None = -1.0                    # sway-sampling coefficient
    seed: int = 0                                # noise seed (see dit.frame_noise)

    def blocks_in_chunk(self, index: int) -> int:
        return self.chunk_blocks[min(index, len(self.chunk_blocks) - 1)]


# ----------------------------------------------------------------------------------------------------------------
# DiT: codes -> mel chunks


@dataclass
class DiTStreamState:
    speaker: Speaker                 # speaker encoder output, computed once
    options: StreamOptions
    codes: Tensor                    # (n,) long, every code received so far
    noise: Tensor                    # (1, frames drawn, mel_dim), frame_noise(seed, 0, frames drawn)
    next_block: int = 0              # first block not yet emitted
    chunk_index: int = 0
    finished: bool = False
    provisional: Tensor | None = None  # (1, mel_dim, n): the last window's frames after its chunk (not final)


def start_codes(dit: DiT, cond: Tensor, ref_mel: Tensor, options: StreamOptions = StreamOptions()) -> DiTStreamState:
    c = dit.cfg
    if c.block_size % c.repeats:
        raise ValueError(f"streaming needs block_size ({c.block_size}) divisible by repeats ({c.repeats})")
    if options.past_blocks < 0 or options.future_blocks < 0 or not options.chunk_blocks \
            or min(options.chunk_blocks) < 1:
        raise ValueError(f"bad stream options {options}: context blocks >= 0, chunk_blocks a tuple of ints >= 1")
    if options.steps < 2 or (options.first_steps is not None and options.first_steps < 2):
        raise ValueError(f"bad stream options {options}: steps and first_steps need >= 2 time points")
    device = dit.proj_out.weight.device
    speaker = dit.encode_speaker(cond.to(device), ref_mel.to(device), cfg=options.guidance >= 1e-5)
    return DiTStreamState(speaker=speaker, options=options,
                          codes=torch.zeros(0, dtype=torch.long, device=device),
                          noise=torch.zeros(1, 0, c.mel_dim, device=device))


def push_codes(dit: DiT, st: DiTStreamState, codes: Tensor | list[int]) -> Tensor:
    """Add codes; returns the mel frames that became final, (1, mel_dim, n), n possibly 0."""
    if st.finished:
        raise ValueError("push_codes after finish_codes: start a new stream")
    codes = torch.as_tensor(codes, dtype=torch.long, device=st.codes.device).reshape(-1)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > dit.cfg.num_embeds):
        raise ValueError(f"codec codes must lie in [0, {dit.cfg.num_embeds}]; strip control codes such as EOS")
    st.codes = torch.cat([st.codes, codes])
    return _emit(dit, st, final=False)


def finish_codes(dit: DiT, st: DiTStreamState) -> Tensor:
    """No more codes: returns the remaining mel frames (1, mel_dim, n)."""
    if st.finished:
        raise ValueError("finish_codes called twice")
    out = _emit(dit, st, final=True)
    st.finished = True
    return out


def _emit(dit: DiT, st: DiTStreamState, final: bool) -> Tensor:
    c, o = dit.cfg, st.options
    bs, total = c.block_size, st.codes.numel() * c.repeats
    chunks = []
    while st.next_block * bs < total:
        end_block = st.next_block + o.blocks_in_chunk(st.chunk_index)
        if not final and (end_block + o.future_blocks) * bs > total:
            break  # its future context has not arrived yet
        start, end = st.next_block * bs, min(end_block * bs, total)
        ws, we = max(0, start - o.past_blocks * bs), min(total, (end_block + o.future_blocks) * bs)
        steps = o.first_steps if (st.chunk_index == 0 and o.first_steps is not None) else o.steps
        mel = _window(dit, st, ws, we, steps)                                               # (1, we - ws, mel)
        chunks.append(mel[:, start - ws:end - ws])
        st.provisional = mel[:, end - ws:].transpose(1, 2)                                  # (1, mel, we - end)
        st.next_block, st.chunk_index = end_block, st.chunk_index + 1
    if not chunks:
        return torch.zeros(1, c.mel_dim, 0, device=st.codes.device)
    return torch.cat(chunks, dim=1).transpose(1, 2)                                         # (1, mel, n)


def _window(dit: DiT, st: DiTStreamState, ws: int, we: int, steps: int) -> Tensor:
    """Solve the ODE over mel frames [ws, we) of the utterance -> (1, we - ws, mel_dim)."""
    c, o = dit.cfg, st.options
    have = st.noise.shape[1]
    if we > have:
        more = frame_noise(o.seed, have, we, c.mel_dim, c.block_size, device=st.noise.device)
        st.noise = torch.cat([st.noise, more], dim=1)
    inp = dit.prepare(st.codes[ws // c.repeats:we // c.repeats], st.speaker, o.guidance, start=ws)
    return solve(dit, inp, st.noise[:, ws:we], steps, o.sway)


# ----------------------------------------------------------------------------------------------------------------
# BigVGAN: mel chunks -> waveform chunks (exact)


@dataclass
class VocoderStreamState:
    left: int                        # receptive field in mel frames (bigvgan.receptive_field)
    right: int
    mel: Tensor                      # (1, mel_dim, n) buffered frames; mel[..., 0] is absolute frame `start`
    start: int = 0
    frames: int = 0                  # frames received
    emitted: int = 0                 # frames whose samples were returned
    finished: bool = False


def start_mel(bigvgan: BigVGAN, lookahead: int | None = None) -> VocoderStreamState:
    """`lookahead` (mel frames) defaults to the receptive field, which makes streaming exact; a smaller value
    emits audio sooner but then the last samples of each chunk only approximate the one-shot output."""
    if not bigvgan.cfg.usable:
        raise ValueError("BigVGAN config unusable: upsample_initial_channel leaves no channels after the halvings")
    left, right = receptive_field(bigvgan.cfg)
    if lookahead is not None:
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0 mel frames, got {lookahead}")
        right = min(right, int(lookahead))
    device = bigvgan.conv_pre.weight.device
    return VocoderStreamState(left=left, right=right, mel=torch.zeros(1, bigvgan.cfg.mel_dim, 0, device=device))


def push_mel(bigvgan: BigVGAN, st: VocoderStreamState, mel: Tensor, lookahead: Tensor | None = None) -> Tensor:
    """Add mel frames (1, mel_dim, n); returns the waveform samples that became final, (k * hop,).

    `lookahead` (1, mel_dim, m): provisional frames that follow `mel` (e.g. the DiT window's future context). They
    are not kept; they only stand in for the look-ahead, so samples of up to m more frames come out now. Those
    samples then depend on the provisional frames (approximate); everything after them is exact again.
    """
    if st.finished:
        raise ValueError("push_mel after finish_mel: start a new stream")
    for name, m in (("mel chunk", mel), ("lookahead", lookahead)):
        if m is not None and (m.dim() != 3 or m.shape[:2] != (1, bigvgan.cfg.mel_dim)):
            raise ValueError(f"{name} must be (1, {bigvgan.cfg.mel_dim}, n), got {tuple(m.shape)}")
    st.mel = torch.cat([st.mel, mel.to(st.mel.device, st.mel.dtype)], dim=2)
    st.frames += mel.shape[2]
    if lookahead is None or lookahead.shape[2] == 0:
        return _vocode(bigvgan, st, st.frames - st.right)
    upto = min(st.frames, st.frames + lookahead.shape[2] - st.right)
    return _vocode(bigvgan, st, upto, lookahead.to(st.mel.device, st.mel.dtype))


def finish_mel(bigvgan: BigVGAN, st: VocoderStreamState) -> Tensor:
    """No more mel: returns the remaining samples."""
    if st.finished:
        raise ValueError("finish_mel called twice")
    st.finished = True
    return _vocode(bigvgan, st, st.frames)


@torch.no_grad()
def _vocode(bigvgan: BigVGAN, st: VocoderStreamState, upto: int, lookahead: Tensor | None = None) -> Tensor:
    """Emit the samples of frames [emitted, upto): vocode frames [emitted - left, frames) (+ lookahead), trim."""
    hop = bigvgan.cfg.hop
    if upto <= st.emitted:
        return torch.zeros(0, device=st.mel.device)
    ws = max(0, st.emitted - st.left)
    mel = st.mel[:, :, ws - st.start:]
    if lookahead is not None:
        mel = torch.cat([mel, lookahead], dim=2)                                            # (1, mel, n + m)
    wav = bigvgan(mel)[0, 0]                                                                # ((n [+ m]) hop,)
    out = wav[(st.emitted - ws) * hop:(upto - ws) * hop]
    st.emitted = upto
    keep = max(0, upto - st.left)                                                           # next window start
    st.mel, st.start = st.mel[:, :, keep - st.start:], keep
    return out


# ----------------------------------------------------------------------------------------------------------------
# Both together


@dataclass
class Token2WavStreamState:
    dit: DiTStreamState
    vocoder: VocoderStreamState
    mel_frames: int = 0              # mel frames produced so far
    samples: int = 0                 # waveform samples returned so far


class Token2WavDriver:
    """Owns the DiT and the vocoder; one-shot `synthesize`, or `start` / `push` / `finish` for streaming."""

    def __init__(self, dit: DiT, bigvgan: BigVGAN):
        if dit.cfg.mel_dim != bigvgan.cfg.mel_dim:
            raise ValueError(f"DiT mel_dim {dit.cfg.mel_dim} != BigVGAN mel_dim {bigvgan.cfg.mel_dim}")
        self.dit, self.bigvgan = dit, bigvgan

    @torch.no_grad()
    def code_to_mel(self, codes: Tensor, cond: Tensor, ref_mel: Tensor, noise: Tensor | None = None, seed: int = 0,
                    steps: int = 10, guidance: float = 0.5, sway: float | None = -1.0) -> Tensor:
        """codes (T_codes,) -> mel (1, mel_dim, T_mel); noise defaults to frame_noise(seed, ...)."""
        c = self.dit.cfg
        device = self.dit.proj_out.weight.device
        codes = torch.as_tensor(codes, dtype=torch.long).reshape(-1).to(device)
        if noise is None:
            noise = frame_noise(seed, 0, codes.numel() * c.repeats, c.mel_dim, c.block_size, device=device)
        return dit_mod.code_to_mel(self.dit, codes, cond.to(device), ref_mel.to(device), noise.to(device),
                           steps, guidance, sway)

    @torch.no_grad()
    def synthesize(self, codes: Tensor, cond: Tensor, ref_mel: Tensor, noise: Tensor | None = None, seed: int = 0,
                   steps: int = 10, guidance: float = 0.5, sway: float | None = -1.0) -> Tensor:
        """codes (T_codes,) -> waveform (T_codes * repeats * hop,), the whole utterance at once."""
        return mel_to_wav(self.bigvgan, self.code_to_mel(codes, cond, ref_mel, noise, seed, steps, guidance, sway))

    def start(self, cond: Tensor, ref_mel: Tensor, options: StreamOptions = StreamOptions()) -> Token2WavStreamState:
        return Token2WavStreamState(dit=start_codes(self.dit, cond, ref_mel, options), vocoder=start_mel(self.bigvgan))

    @torch.no_grad()
    def push(self, st: Token2WavStreamState, codes: Tensor | list[int]) -> Tensor:
        """Add codes; returns the waveform samples that became final (possibly none)."""
        mel = push_codes(self.dit, st.dit, codes)
        early = st.dit.options.early_vocoder and st.vocoder.emitted == 0 and mel.shape[2] > 0
        return self._vocode(st, mel, final=False, lookahead=st.dit.provisional if early else None)

    @torch.no_grad()
    def finish(self, st: Token2WavStreamState) -> Tensor:
        """End of the code stream: returns the rest of the waveform."""
        mel = finish_codes(self.dit, st.dit)
        return self._vocode(st, mel, final=True)

    def _vocode(self, st: Token2WavStreamState, mel: Tensor, final: bool, lookahead: Tensor | None = None) -> Tensor:
        st.mel_frames += mel.shape[2]
        parts = [push_mel(self.bigvgan, st.vocoder, mel, lookahead)] if mel.shape[2] else []
        if final:
            parts.append(finish_mel(self.bigvgan, st.vocoder))
        wav = torch.cat(parts) if parts else torch.zeros(0, device=mel.device)
        st.samples += wav.numel()
        return wav
