"""TMRoPE position ids: (temporal, height, width) ids for a prompt mixing text, audio, images and videos.

The rules (identical to the reference Thinker's `get_rope_index`, quirks included):
- Text and the media bos/eos markers take one id each, equal on the three axes, counting up.
- Audio: one id per encoder token (40 ms), equal on the three axes; the token count comes from the mel length.
- Image: every merged token shares one temporal id; height/width ids are its row/column in the merged grid.
- Video: temporal ids from real time, `int(t · second_per_grid · position_id_per_seconds)` for temporal grid
  step t; height/width ids as for images.
- A modality (and the text after it) starts at the previous piece's maximum id + 1 ("previous piece" is the
  last one laid out, which for interleaved audio-in-video is the last chunk, not the largest id seen).
- Audio in video (`use_audio_in_video`): the prompt holds vision_bos, audio_bos, then chunks of
  `seconds_per_chunk` (video tokens of the chunk, then audio tokens of the chunk), audio_eos, vision_eos. Both
  bos markers share one id, both eos markers share one id, video and audio both start at bos + 1.
- Left/right padding: positions are computed over the attended tokens only; padded slots get id 1.
- With no image or video grid at all, ids are simply 0.. over attended tokens (audio needs no special ids).
`rope_deltas` = max id + 1 - attended length; while decoding, a new token at cache position p (counting only
attended tokens) gets id p + delta on all three axes (`decode_positions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PositionConfig:
    """The token ids and constants TMRoPE reads; from OmniConfig.tokens and the vision config."""
    image_token: int
    video_token: int
    audio_token: int
    vision_start: int
    audio_start: int
    spatial_merge_size: int = 2
    position_id_per_seconds: float = 25
    seconds_per_chunk: float = 2

    @classmethod
    def from_omni(cls, cfg) -> "PositionConfig":
        """From an omnivox.config.OmniConfig (duck-typed: .tokens and .vision)."""
        t = cfg.tokens
        return cls(image_token=t.image, video_token=t.video, audio_token=t.audio, vision_start=t.vision_start,
                   audio_start=t.audio_start, spatial_merge_size=int(cfg.vision.get("spatial_merge_size", 2)),
                   position_id_per_seconds=t.position_id_per_seconds, seconds_per_chunk=t.seconds_per_chunk)


def audio_token_count(mel_frames: int) -> int:
    """Encoder tokens for `mel_frames` log-mel frames (conv stride 2, then average-pool 2)."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


def _flat(length: int, start: int) -> Tensor:
    return torch.arange(length).view(1, -1).expand(3, -1) + start  # (3, length)


def _vision_ids(start: int, t_index: Tensor, grid_h: int, grid_w: int, merge: int) -> Tensor:
    """(3, T·h·w) ids for a merged grid: t from t_index, h/w from the grid position, all + start."""
    h, w = grid_h // merge, grid_w // merge
    t_ids = t_index.view(-1, 1).expand(-1, h * w).reshape(-1)
    h_ids = torch.arange(h).view(1, -1, 1).expand(len(t_index), -1, w).reshape(-1)
    w_ids = torch.arange(w).view(1, 1, -1).expand(len(t_index), h, -1).reshape(-1)
    return torch.stack([t_ids, h_ids, w_ids]) + start


def _chunks(values: list[int], per_chunk: int) -> list[tuple[int, int]]:
    """[start, end) runs of `values` (non-decreasing, from 0) cut where a value reaches the next chunk bound.

    The bound moves one chunk per element at most (the reference's rule), so a jump across several chunk
    bounds still closes only one chunk.
    """
    runs, start, bound = [], 0, per_chunk
    for i, v in enumerate(values):
        if v >= bound:
            runs.append((start, i))
            start, bound = i, bound + per_chunk
    runs.append((start, len(values)))
    return runs


def _video_t_index(grid_t: int, second_per_grid: Tensor, cfg: PositionConfig) -> Tensor:
    # same fp32 arithmetic as the reference before truncation to int
    return (torch.arange(grid_t) * second_per_grid.float() * cfg.position_id_per_seconds).long()


def _index(tokens: list[int], token: int, start: int, what: str) -> int:
    try:
        return tokens.index(token, start)
    except ValueError:
        raise ValueError(f"prompt has fewer {what} placeholders than its media markers promise") from None


def _row_positions(tokens: list[int], cfg: PositionConfig, image_grid_thw, video_grid_thw, use_audio_in_video,
                   audio_seqlens, second_per_grids, counters: dict) -> Tensor:
    """(3, len(tokens)) ids for one unpadded row; `counters` carries image/video/audio indices across rows."""
    ids = torch.tensor(tokens)
    starts = (ids == cfg.vision_start).nonzero().view(-1)
    after = ids[starts[starts + 1 < len(ids)] + 1]  # the token after each vision_start
    n_audio = int((ids == cfg.audio_start).sum())
    n_image = int((after == cfg.image_token).sum())
    n_video = int((after == (cfg.audio_start if use_audio_in_video else cfg.video_token)).sum())
    remaining = {"image": n_image, "video": n_video, "audio": n_audio}
    n_media = n_image + n_audio + (0 if use_audio_in_video else n_video)
    merge = cfg.spatial_merge_size
    pieces: list[Tensor] = []

    def nxt() -> int:
        return int(pieces[-1].max()) + 1 if pieces else 0

    def text(length: int) -> None:
        if length < 0:
            raise ValueError("a media placeholder must follow its start marker(s)")
        if length:
            pieces.append(_flat(length, nxt()))

    def need(x, what):
        if x is None:
            raise ValueError(f"prompt has {what} placeholders but no {what} sizes were given")
        return x

    st = 0
    end = len(tokens) + 1
    for _ in range(n_media):
        ed_image = _index(tokens, cfg.image_token, st, "image") \
            if remaining["image"] > 0 and cfg.image_token in tokens else end
        ed_video = _index(tokens, cfg.video_token, st, "video") \
            if remaining["video"] > 0 and cfg.video_token in tokens else end
        ed_audio = _index(tokens, cfg.audio_token, st, "audio") \
            if remaining["audio"] > 0 and cfg.audio_token in tokens else end
        first = min(ed_image, ed_video, ed_audio)
        if first == end:
            raise ValueError("prompt has media start markers without placeholder tokens after them")

        if first == ed_audio:
            a = counters["audio"]
            seqlens = need(audio_seqlens, "audio")
            if a >= len(seqlens):
                raise ValueError(f"prompt has more audio clips than audio_seqlens ({len(seqlens)})")
            text_len = first - st - 1
            text(text_len)
            pieces.append(_flat(1, nxt()))                                         # audio bos
            n = audio_token_count(int(seqlens[a]))
            pieces.append(_flat(n, nxt()))
            pieces.append(_flat(1, nxt()))                                         # audio eos
            st += text_len + 2 + n
            counters["audio"] += 1
            remaining["audio"] -= 1

        elif first == ed_image:
            i = counters["image"]
            grids = need(image_grid_thw, "image")
            if i >= len(grids):
                raise ValueError(f"prompt has more images than image_grid_thw rows ({len(grids)})")
            t, h, w = (int(v) for v in grids[i])
            text_len = first - st - 1
            text(text_len)
            pieces.append(_flat(1, nxt()))                                         # vision bos
            t_index = (torch.arange(t) * 1 * cfg.position_id_per_seconds).long()
            pieces.append(_vision_ids(nxt(), t_index, h, w, merge))
            pieces.append(_flat(1, nxt()))                                         # vision eos
            st += text_len + 2 + t * h * w // merge ** 2
            counters["image"] += 1
            remaining["image"] -= 1

        elif not use_audio_in_video:
            v = counters["video"]
            grids, spg = need(video_grid_thw, "video"), need(second_per_grids, "video second_per_grid")
            if v >= len(grids) or v >= len(spg):
                raise ValueError("prompt has more videos than video_grid_thw / second_per_grids rows")
            t, h, w = (int(x) for x in grids[v])
            text_len = first - st - 1
            text(text_len)
            pieces.append(_flat(1, nxt()))                                         # vision bos
            pieces.append(_vision_ids(nxt(), _video_t_index(t, spg[v], cfg), h, w, merge))
            pieces.append(_flat(1, nxt()))                                         # vision eos
            st += text_len + 2 + t * h * w // merge ** 2
            counters["video"] += 1
            remaining["video"] -= 1

        else:  # video with its audio track interleaved
            v, a = counters["video"], counters["audio"]
            grids, spg = need(video_grid_thw, "video"), need(second_per_grids, "video second_per_grid")
            seqlens = need(audio_seqlens, "audio")
            if v >= len(grids) or v >= len(spg) or a >= len(seqlens):
                raise ValueError("prompt has more audio-in-video clips than video / audio sizes were given")
            t, h, w = (int(x) for x in grids[v])
            text_len = first - st - 2
            text(text_len)
            bos = nxt()
            pieces += [_flat(1, bos), _flat(1, bos)]                               # vision bos, audio bos
            start = bos + 1
            n_audio_tokens = audio_token_count(int(seqlens[a]))
            audio_ids = _flat(n_audio_tokens, start)
            video_ids = _vision_ids(start, _video_t_index(t, spg[v], cfg), h, w, merge)
            per_chunk = int(cfg.position_id_per_seconds * cfg.seconds_per_chunk)
            v_runs = _chunks((video_ids[0] - start).tolist(), per_chunk)
            a_runs = _chunks((audio_ids[0] - start).tolist(), per_chunk)
            for j in range(max(len(v_runs), len(a_runs))):
                if j < len(v_runs):
                    pieces.append(video_ids[:, v_runs[j][0]:v_runs[j][1]])
                if j < len(a_runs):
                    pieces.append(audio_ids[:, a_runs[j][0]:a_runs[j][1]])
            eos = nxt()
            pieces += [_flat(1, eos), _flat(1, eos)]                               # audio eos, vision eos
            st += text_len + 4 + n_audio_tokens + t * h * w // merge ** 2
            counters["video"] += 1
            counters["audio"] += 1
            remaining["video"] -= 1
            remaining["audio"] -= 1

    if st < len(tokens):
        text(len(tokens) - st)
    out = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    if out.shape[1] != len(tokens):
        raise ValueError(f"media sizes give {out.shape[1]} positions for a prompt of {len(tokens)} tokens: the "
                         "placeholder counts do not match the image/video grids or audio lengths")
    return out


def rope_index(input_ids: Tensor, image_grid_thw: Tensor | None, video_grid_thw: Tensor | None,
               attention_mask: Tensor | None, use_audio_in_video: bool, audio_seqlens: Tensor | None,
               second_per_grids: Tensor | None, cfg) -> tuple[Tensor, Tensor]:
    """-> (position_ids (3, B, T) long, rope_deltas (B, 1) long).

    input_ids (B, T); image_grid_thw / video_grid_thw (n, 3) in prompt order over the whole batch;
    attention_mask (B, T) 1 = attended (None: all); audio_seqlens: mel frames per audio clip (the reference's
    `audio_feature_lengths`); second_per_grids: seconds per temporal grid step per video (temporal_patch / fps).
    cfg: PositionConfig or OmniConfig.
    """
    if not isinstance(cfg, PositionConfig):
        cfg = PositionConfig.from_omni(cfg)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    mask = torch.ones(b, t, dtype=torch.bool) if attention_mask is None else attention_mask.cpu() == 1
    if mask.shape != (b, t):
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {(b, t)}")
    ids_cpu = input_ids.cpu()
    if second_per_grids is not None:
        second_per_grids = torch.as_tensor(second_per_grids).cpu().float().reshape(-1)

    if image_grid_thw is None and video_grid_thw is None:
        pos = mask.long().cumsum(-1) - 1
        pos = pos.masked_fill(~mask, 1)                                       # (B, T)
        deltas = pos.max(-1, keepdim=True).values + 1 - mask.sum(-1, keepdim=True)
        position_ids = pos.unsqueeze(0).expand(3, -1, -1).contiguous()
        return position_ids.to(input_ids.device), deltas.to(input_ids.device)

    position_ids = torch.ones(3, b, t, dtype=torch.long)
    deltas = []
    counters = {"image": 0, "video": 0, "audio": 0}
    for i in range(b):
        tokens = ids_cpu[i][mask[i]].tolist()
        row = _row_positions(tokens, cfg, image_grid_thw, video_grid_thw, use_audio_in_video, audio_seqlens,
                             second_per_grids, counters)
        position_ids[:, i, mask[i]] = row
        deltas.append(int(row.max()) + 1 - len(tokens) if len(tokens) else 0)
    return position_ids.to(input_ids.device), torch.tensor(deltas).view(b, 1).to(input_ids.device)


def decode_positions(rope_deltas: Tensor, cache_len: int | Tensor, batch: int, steps: int = 1) -> Tensor:
    """(3, B, steps) ids for the next `steps` tokens of each row: cache_len + s + delta on all axes.

    cache_len: tokens already attended per row (int, or (B,) for left-padded batches: count only real tokens).
    rope_deltas (B, 1) or (1, 1), repeated over the batch as the reference does.
    """
    deltas = rope_deltas.reshape(-1, 1)
    if batch % deltas.shape[0]:
        raise ValueError(f"batch {batch} is not a multiple of the {deltas.shape[0]} rope deltas")
    deltas = deltas.repeat_interleave(batch // deltas.shape[0], dim=0)       # (B, 1)
    base = torch.as_tensor(cache_len, device=deltas.device).reshape(-1, 1)   # (B or 1, 1)
    pos = base + torch.arange(steps, device=deltas.device) + deltas           # (B, steps)
    return pos.unsqueeze(0).expand(3, -1, -1)
