"""TMRoPE position ids vs the reference Thinker's `get_rope_index`, and decode positions vs its `generate`.

Prompts are built by hand from the tiny checkpoint's token ids: text, audio, images, videos (with and without
their audio interleaved), left-padded batches; position ids and rope deltas must be identical.
"""

import numpy as np
import pytest
import torch

from omnivox.config import OmniConfig
from omnivox.encoders.images import ImageProcessorConfig, preprocess_image
from omnivox.thinker.positions import PositionConfig, audio_token_count, decode_positions, rope_index


@pytest.fixture
def setup(tiny_checkpoint):
    path, ref = tiny_checkpoint("base")
    return path, ref, OmniConfig.from_dir(path)


class Prompt:
    """Builds placeholder runs the way the reference processor lays them out."""

    def __init__(self, cfg: OmniConfig, seed=0):
        self.tok, self.pc = cfg.tokens, PositionConfig.from_omni(cfg)
        self.g = torch.Generator().manual_seed(seed)

    def text(self, n):
        return torch.randint(0, 300, (n,), generator=self.g).tolist()

    def audio(self, mel):
        return [self.tok.audio_start] + [self.tok.audio] * audio_token_count(mel) + [self.tok.audio_end]

    def image(self, t, h, w):
        return [self.tok.vision_start] + [self.tok.image] * (t * h * w // 4) + [self.tok.vision_end]

    def video(self, t, h, w):
        return [self.tok.vision_start] + [self.tok.video] * (t * h * w // 4) + [self.tok.vision_end]

    def video_with_audio(self, t, h, w, second_per_grid, mel):
        """vision_bos audio_bos (video chunk, audio chunk)* audio_eos vision_eos, chunked by time as the processor."""
        per = int(self.pc.position_id_per_seconds * self.pc.seconds_per_chunk)
        v_time = np.repeat(np.arange(t) * second_per_grid * self.pc.position_id_per_seconds, h * w // 4)
        a_time = np.arange(audio_token_count(mel))

        def runs(values):
            out, start, bound = [], 0, per
            for i, v in enumerate(values):
                if v >= bound:
                    out.append(i - start)
                    start, bound = i, bound + per
            return out + [len(values) - start]

        v_runs, a_runs = runs(v_time), runs(a_time)
        out = [self.tok.vision_start, self.tok.audio_start]
        for j in range(max(len(v_runs), len(a_runs))):
            out += [self.tok.video] * (v_runs[j] if j < len(v_runs) else 0)
            out += [self.tok.audio] * (a_runs[j] if j < len(a_runs) else 0)
        return out + [self.tok.audio_end, self.tok.vision_end]


def left_padded(rows, pad=0):
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), pad)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor(r)
        mask[i, t - len(r):] = 1
    return ids, mask


def as_tensor(x, dtype=torch.long):
    return None if x is None else torch.tensor(x, dtype=dtype)


def check(ref, cfg, rows, image_grids, video_grids, use_audio_in_video, mels, seconds):
    ids, mask = left_padded(rows)
    args = (ids, as_tensor(image_grids), as_tensor(video_grids), mask, use_audio_in_video, as_tensor(mels),
            as_tensor(seconds, torch.float32))
    want_pos, want_delta = ref.thinker.model.get_rope_index(*args)
    got_pos, got_delta = rope_index(*args, cfg)
    assert got_pos.shape == (3, *ids.shape) and got_delta.shape == (ids.shape[0], 1)
    assert torch.equal(got_pos, want_pos)
    assert torch.equal(got_delta, want_delta)
    return got_pos, got_delta


def test_text_audio_image_video_prompt_matches_reference(setup):
    _, ref, cfg = setup
    p = Prompt(cfg)
    rows = [p.text(5) + p.image(1, 4, 6) + p.text(3) + p.audio(230) + p.text(2) + p.video(3, 4, 4) + p.text(4),
            p.text(2) + p.audio(97) + p.image(1, 8, 4) + p.text(1)]
    pos, _ = check(ref, cfg, rows, [[1, 4, 6], [1, 8, 4]], [[3, 4, 4]], False, [230, 97], [1.0])
    assert not torch.equal(pos[0], pos[1])  # the image really has 2-D ids


def test_audio_in_video_prompt_matches_reference(setup):
    _, ref, cfg = setup
    p = Prompt(cfg, seed=1)
    rows = [p.text(3) + p.image(1, 4, 4) + p.text(2) + p.video_with_audio(6, 4, 4, 1.0, 1200) + p.text(3),
            p.text(4) + p.audio(300) + p.video_with_audio(5, 2, 4, 0.8, 810) + p.text(2)]
    check(ref, cfg, rows, [[1, 4, 4]], [[6, 4, 4], [5, 2, 4]], True, [1200, 300, 810], [1.0, 0.8])


def test_videos_with_uneven_frame_times_match_reference(setup):
    """Non-integer seconds per grid (fp32 truncation) and steps that jump over whole 2-second chunks."""
    _, ref, cfg = setup
    p = Prompt(cfg, seed=2)
    check(ref, cfg, [p.text(3) + p.video(5, 4, 6) + p.text(2) + p.video(3, 2, 2) + p.text(1)],
          None, [[5, 4, 6], [3, 2, 2]], False, None, [1.3, 0.7])
    check(ref, cfg, [p.text(3) + p.video_with_audio(4, 4, 6, 3.0, 900) + p.text(1)],
          None, [[4, 4, 6]], True, [900], [3.0])


def test_text_and_audio_only_prompts_match_reference(setup):
    _, ref, cfg = setup
    p = Prompt(cfg, seed=3)
    check(ref, cfg, [p.text(7), p.text(3) + p.audio(150) + p.text(2)], None, None, False, [150], None)


def test_decode_positions_match_reference_generation(setup):
    """The ids the reference feeds its rotary embedding while generating, for a left-padded image batch."""
    path, ref, cfg = setup
    icfg = ImageProcessorConfig.from_dir(path)
    rng = np.random.default_rng(0)
    a = preprocess_image(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8), icfg)
    b = preprocess_image(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8), icfg)
    p = Prompt(cfg, seed=4)
    rows = [p.text(4) + p.image(*a.grid_thw[0].tolist()) + p.text(3),
            p.text(2) + p.image(*b.grid_thw[0].tolist()) + p.text(1)]
    ids, mask = left_padded(rows)
    grids = torch.cat([a.grid_thw, b.grid_thw])
    seen = []
    hook = ref.thinker.model.language_model.rotary_emb.register_forward_pre_hook(
        lambda module, args: seen.append(args[1].clone()))
    try:
        with torch.no_grad():
            ref.thinker.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                 pixel_values=torch.cat([a.pixel_values, b.pixel_values]), image_grid_thw=grids)
    finally:
        hook.remove()
    pos, deltas = rope_index(ids, grids, None, mask, False, None, None, cfg)
    assert torch.equal(seen[0], pos)
    attended = mask.sum(-1)  # a left-padded row counts only its real tokens
    for step, want in enumerate(seen[1:]):
        assert torch.equal(decode_positions(deltas, attended + step, batch=2), want)
    assert decode_positions(deltas[:1], 10, batch=1, steps=3)[0, 0].tolist() == [10 + deltas[0, 0].item() + s
                                                                                    for s in range(3)]


def test_mismatched_prompts_raise_value_error(setup):
    _, _, cfg = setup
    p = Prompt(cfg, seed=5)
    ids = torch.tensor([p.text(2) + p.image(1, 4, 4) + p.text(1)])
    with pytest.raises(ValueError, match="do not match"):
        rope_index(ids, torch.tensor([[1, 4, 8]]), None, None, False, None, None, cfg)
    with pytest.raises(ValueError, match="more images"):
        rope_index(torch.cat([ids, ids], 1), torch.tensor([[1, 4, 4]]), None, None, False, None, None, cfg)
    vid = torch.tensor([p.text(2) + p.video(2, 4, 4)])
    with pytest.raises(ValueError, match="second_per_grid"):
        rope_index(vid, None, torch.tensor([[2, 4, 4]]), None, False, None, None, cfg)
    aud = torch.tensor([p.audio(100) + p.image(1, 4, 4)])
    with pytest.raises(ValueError, match="audio"):
        rope_index(aud, torch.tensor([[1, 4, 4]]), None, None, False, None, None, cfg)
