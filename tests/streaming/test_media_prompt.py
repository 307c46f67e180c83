"""Media in the Thinker's prompt: video sampling, audio tracks, placeholder expansion, encoder scatter, TMRoPE.

The reference is `Qwen2_5OmniProcessor` + the reference Thinker, handed the same decoded frames and audio arrays
our code sampled (the reference processor does not decode files here). Frame sampling itself is checked against
a re-implementation of the qwen-omni-utils rule on videos whose frames encode their own index.
"""

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from media_fixtures import decoded_index, write_image, write_video, write_wav

from omnivox.encoders.audio_features import load_audio
from omnivox.encoders.images import ImageProcessorConfig, preprocess_frames, preprocess_image
from omnivox.encoders.video import (VideoSampling, extract_audio, patch_batches, probe_video, read_video,
                                    sample_frame_count)
from omnivox.streaming import media
from omnivox.streaming.media import build_media_prompt
from omnivox.streaming.pipeline import Done, GenerationOptions, generate


def load_omni(path: Path):
    """omnivox.model.load, or the same Omni assembled by hand while load() cannot rebuild computed buffers."""
    from omnivox.errors import CheckpointError
    from omnivox.model import load

    try:
        return load(path, audio=False)
    except CheckpointError as e:  # until every module defines reset_buffers() for its computed buffers
        if "reset_buffers" not in str(e):
            raise
        from safetensors.torch import load_file

        from omnivox.config import OmniConfig
        from omnivox.model import Omni, OmniModel
        from omnivox.thinker.tokenizer import Tokenizer

        cfg = OmniConfig.from_dir(path)
        model = OmniModel(cfg, audio_output=False)
        weights = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if k.startswith("thinker.")}
        model.load_state_dict(weights, strict=True)
        return Omni(path=path, config=cfg, tokenizer=Tokenizer.from_dir(path), model=model.eval())


@pytest.fixture(scope="module")
def env(tiny_checkpoint, tmp_path_factory):
    from transformers import Qwen2_5OmniProcessor

    path, ref = tiny_checkpoint("base")
    d = tmp_path_factory.mktemp("media")
    files = {
        "a1": write_wav(d / "a1.wav", 1.37, 16000),
        "a2": write_wav(d / "a2.wav", 2.31, 44100, channels=2, freq=220.0, seed=3),
        "i1": write_image(d / "i1.png", 123, 77),
        "i2": write_image(d / "i2.jpg", 61, 95, seed=1),
        "v": write_video(d / "v.mp4", 43, fps=10, audio_sr=44100),      # 4.3 s, stereo AAC
        "silent": write_video(d / "silent.mp4", 27, fps=10),             # 2.7 s, no audio track
    }
    omni = load_omni(path)
    proc = Qwen2_5OmniProcessor.from_pretrained(str(path))
    return dict(path=path, ref=ref, omni=omni, proc=proc, icfg=ImageProcessorConfig.from_dir(path), dir=d, **files)


def mixed_messages(e, video="v"):
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [
            {"type": "text", "text": "Hello"},
            {"type": "audio", "audio": str(e["a1"])},
            {"type": "image", "image": str(e["i1"])},
            {"type": "video", "video": str(e[video])},
            {"type": "text", "text": "What do you hear?"},
            {"type": "image", "image": e["i2"]},
            {"type": "audio", "audio": str(e["a2"])},
        ]},
    ]


def reference_inputs(e, messages, use_audio_in_video):
    """The reference processor's outputs for the same decoded media our code uses."""
    sampled = read_video(e["v"], e["icfg"])
    audio = [load_audio(str(e["a1"])), load_audio(str(e["a2"]))]
    extra = {}
    if use_audio_in_video:
        audio = [audio[0], extract_audio(e["v"]), audio[1]]   # prompt order: a1, the video's track, a2
        extra = dict(load_audio_from_video=True, audio_from_video_indices=[None, 0, None])
    images = [Image.open(e["i1"]).convert("RGB"), Image.open(e["i2"]).convert("RGB")]
    text = e["omni"].tokenizer.render_chat(messages)
    return e["proc"](text=[text], audio=audio, images=images, videos=[sampled.frames],
                     videos_kwargs={"fps": sampled.sample_fps}, return_tensors="pt", **extra)


# ----------------------------------------------------------------------------------------------------------------
# Video decoding and sampling


def official_nframes(total, video_fps, fps=2.0, min_frames=4, max_frames=768):
    """qwen-omni-utils smart_nframes (fps rule), written out independently."""
    min_f = math.ceil(min_frames / 2) * 2
    max_f = math.floor(min(max_frames, total) / 2) * 2
    n = round(min(max(total / video_fps * fps, min_f), max_f) / 2) * 2
    return min(n, total)


@pytest.mark.parametrize("frames,fps", [(27, 10), (43, 10), (7, 25), (61, 24), (3, 10), (1, 5)])
def test_video_sampling_follows_the_official_rule(env, frames, fps):
    path = write_video(env["dir"] / f"idx_{frames}_{fps}.mp4", frames, fps=fps, width=34, height=26)
    sampled = read_video(path, env["icfg"])
    n = max(1, official_nframes(frames, fps))
    want = torch.linspace(0, frames - 1, n).round().long().tolist()
    assert sampled.indices == want
    assert [decoded_index(f) for f in sampled.frames] == want          # the frames really are those frames
    assert sampled.sample_fps == pytest.approx(n / frames * fps)
    assert probe_video(path).total_frames == frames


def test_sampling_options_fps_bounds_and_nframes(env):
    assert sample_frame_count(300, 30, VideoSampling()) == 20                   # 10 s at 2 fps
    assert sample_frame_count(300, 30, VideoSampling(fps=0.5)) == 4            # 5 frames: Python round, half to even
    assert sample_frame_count(300, 30, VideoSampling(fps=0.7)) == 8            # 7 frames: 3.5 pairs -> 4 pairs
    assert sample_frame_count(300, 30, VideoSampling(max_frames=9)) == 8
    assert sample_frame_count(10, 30, VideoSampling()) == 4                    # at least 4
    assert sample_frame_count(100000, 30, VideoSampling()) == 768              # at most 768
    assert sample_frame_count(300, 30, VideoSampling(nframes=7)) == 8
    path = write_video(env["dir"] / "opt.mp4", 40, fps=10, width=34, height=26)
    sampled = read_video(path, env["icfg"], VideoSampling(nframes=6))
    assert [decoded_index(f) for f in sampled.frames] == [0, 8, 16, 23, 31, 39]


def test_decoded_frames_equal_preprocessing_the_full_size_frames(env):
    import av

    path = write_video(env["dir"] / "big.mp4", 11, fps=4, width=300, height=170)
    with av.open(str(path)) as c:
        full = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    cap = int(5 * 784 * 0.9 * 40)                                     # a whole-video budget that binds
    sampled = read_video(path, env["icfg"], total_pixels=cap)
    want = preprocess_frames(full[sampled.indices], env["icfg"], total_pixels=cap)
    target = tuple(sampled.frames.shape[1:3])
    assert want.grid_thw[0, 1:].tolist() == [target[0] // 14, target[1] // 14]
    # resized while decoding == resized afterwards; a few temporal patches at a time == all at once
    for frames in (sampled.frames, full[sampled.indices]):
        batches = list(patch_batches(torch.from_numpy(frames), target, env["icfg"], max_patches=1))
        assert len(batches) == int(want.grid_thw[0, 0]) == 3           # one temporal patch per batch
        assert torch.equal(torch.cat([b[0] for b in batches]), want.pixel_values)


def test_opencv_fallback_reads_the_same_frames(env, monkeypatch):
    import omnivox.encoders.video as video

    def refuse(path):
        raise OSError("PyAV refuses this file in the test")

    want = read_video(env["silent"], env["icfg"])
    monkeypatch.setattr(video, "_av_probe", refuse)
    got = read_video(env["silent"], env["icfg"])
    assert got.info.backend == "cv2" and got.indices == want.indices
    assert [decoded_index(f) for f in got.frames] == want.indices


def test_extract_audio_gives_16k_mono_of_the_track(env):
    x = extract_audio(env["v"])
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 4.3 * 16000) < 0.05 * 16000                     # AAC adds a little priming/padding
    with pytest.raises(ValueError, match="silent.mp4 has no audio track"):
        extract_audio(env["silent"])


# ----------------------------------------------------------------------------------------------------------------
# Prompt parity with the reference


@pytest.mark.parametrize("use_audio_in_video", [False, True])
def test_prompt_ids_embeddings_and_positions_match_reference(env, use_audio_in_video):
    messages = mixed_messages(env)
    ours = build_media_prompt(env["omni"], messages, use_audio_in_video=use_audio_in_video)
    inp = reference_inputs(env, messages, use_audio_in_video)
    assert torch.equal(ours.input_ids, inp["input_ids"])

    captured = {}
    lm = env["ref"].thinker.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            env["ref"].thinker(**inp, use_audio_in_video=use_audio_in_video)
    finally:
        hook.remove()
    assert (captured["inputs_embeds"] - ours.inputs_embeds).abs().max() <= 1e-4
    assert torch.equal(captured["position_ids"], ours.position_ids)
    pos, delta = env["ref"].thinker.model.get_rope_index(
        inp["input_ids"], inp["image_grid_thw"], inp["video_grid_thw"], inp["attention_mask"], use_audio_in_video,
        inp["feature_attention_mask"].sum(-1), inp["video_second_per_grid"])
    assert torch.equal(pos, ours.position_ids) and int(delta[0, 0]) == ours.rope_delta

    t = env["omni"].config.tokens
    ids = ours.input_ids[0]
    n_audio = int((ids == t.audio).sum())
    if use_audio_in_video:  # the video's placeholder really is interleaved: video, audio, video, audio, ...
        inner = ids[(ids == t.video).nonzero()[0, 0] - 1:]
        assert inner[0] == t.audio_start
        kinds = [int(k) for k in inner[1:] if k in (t.video, t.audio)]
        switches = sum(1 for a, b in zip(kinds, kinds[1:]) if a != b)
        assert switches >= 3 and n_audio > inp["feature_attention_mask"][[0, 2]].sum() // 4 - 2
    else:
        assert int((ids == t.audio_start).sum()) == 2


@pytest.mark.parametrize("use_audio_in_video", [False, True])
def test_greedy_answer_matches_reference_generate(env, use_audio_in_video):
    messages = mixed_messages(env)
    events = list(generate(env["omni"], messages,
                           GenerationOptions(max_new_tokens=16, use_audio_in_video=use_audio_in_video)))
    done = events[-1]
    assert isinstance(done, Done)
    inp = reference_inputs(env, messages, use_audio_in_video)
    with torch.no_grad():
        out = env["ref"].thinker.generate(**inp, use_audio_in_video=use_audio_in_video, max_new_tokens=16,
                                          do_sample=False)
    want = out[0, inp["input_ids"].shape[1]:].tolist()
    assert done.token_ids == want
    assert done.prompt_tokens == inp["input_ids"].shape[1]


def test_video_given_as_frames_matches_reference(env):
    frames = np.random.default_rng(5).integers(0, 256, (5, 60, 90, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "video", "video": frames, "fps": 1.5},
                                             {"type": "text", "text": "Describe the video, please."}]}]
    ours = build_media_prompt(env["omni"], messages)
    inp = env["proc"](text=[env["omni"].tokenizer.render_chat(messages)], videos=[frames],
                      videos_kwargs={"fps": 1.5}, return_tensors="pt")
    assert torch.equal(ours.input_ids, inp["input_ids"])
    captured = {}
    hook = env["ref"].thinker.model.language_model.register_forward_pre_hook(
        lambda m, a, k: captured.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            env["ref"].thinker(**inp)
    finally:
        hook.remove()
    assert (captured["inputs_embeds"] - ours.inputs_embeds).abs().max() <= 1e-4
    assert torch.equal(captured["position_ids"], ours.position_ids)


def test_video_encoded_batch_by_batch_equals_one_pass(env, monkeypatch):
    messages = mixed_messages(env)
    whole = build_media_prompt(env["omni"], messages, use_audio_in_video=True)
    monkeypatch.setattr(media, "patch_batches", functools.partial(patch_batches, max_patches=1))
    batched = build_media_prompt(env["omni"], messages, use_audio_in_video=True)
    assert torch.equal(whole.input_ids, batched.input_ids)
    assert (whole.inputs_embeds - batched.inputs_embeds).abs().max() <= 1e-5


def test_per_part_options_reach_the_preprocessing(env):
    t = env["omni"].config.tokens
    merge = env["icfg"].merge_size
    messages = [{"role": "user", "content": [
        {"type": "image", "image": str(env["i1"]), "max_pixels": 56 * 56},
        {"type": "video", "video": str(env["v"]), "nframes": 4, "max_pixels": 128 * 28 * 28},
        {"type": "audio", "audio": load_audio(str(env["a2"]), target_sr=22050), "sampling_rate": 22050}]}]
    ours = build_media_prompt(env["omni"], messages)
    image = preprocess_image(str(env["i1"]), env["icfg"], max_pixels=56 * 56)
    video = read_video(env["v"], env["icfg"], VideoSampling(nframes=4), max_pixels=128 * 28 * 28)
    ids = ours.input_ids[0]
    assert int((ids == t.image).sum()) == int(image.grid_thw.prod()) // merge ** 2 == 2   # 12 without the cap
    t_, h, w = 2, video.frames.shape[1] // 14, video.frames.shape[2] // 14
    assert int((ids == t.video).sum()) == t_ * h * w // merge ** 2
    assert int((ids == t.audio).sum()) == 58                                   # 2.31 s of audio: 231 mel frames


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_media_raise_clear_value_errors(env, tmp_path):
    omni = env["omni"]

    def ask(*parts, uav=False):
        return build_media_prompt(omni, [{"role": "user", "content": list(parts)}], use_audio_in_video=uav)

    write_wav(tmp_path / "empty.wav", 0.0)
    (tmp_path / "notes.mp4").write_text("this is not a video")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    data = Path(env["v"]).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])                 # index at the end: won't open
    data = write_video(tmp_path / "fast.mp4", 40, fps=10, faststart=True).read_bytes()
    (tmp_path / "cut_fast.mp4").write_bytes(data[: len(data) * 3 // 4])       # opens, frames missing

    cases = [
        (({"type": "audio", "audio": str(tmp_path / "missing.wav")},), "missing.wav"),
        (({"type": "audio", "audio": str(tmp_path / "empty.wav")},), "zero-length"),
        (({"type": "audio", "audio": np.zeros(0, np.float32)},), "empty|zero"),
        (({"type": "audio", "audio": np.full(100, np.nan, np.float32)},), "NaN"),
        (({"type": "image", "image": str(tmp_path / "broken.png")},), "broken.png"),
        (({"type": "video", "video": str(tmp_path / "missing.mp4")},), "missing.mp4"),
        (({"type": "video", "video": str(tmp_path / "notes.mp4")},), "notes.mp4"),
        (({"type": "video", "video": str(tmp_path / "cut.mp4")},), "cut.mp4"),
        (({"type": "video", "video": str(tmp_path / "cut_fast.mp4")},), "cut_fast.mp4 is truncated"),
        (({"type": "video", "video": np.zeros((2, 10, 10), np.uint8)},), "uint8 \\(T, H, W, 3\\)"),
        (({"type": "video", "video": np.zeros((2, 30, 30, 3), np.uint8), "nframes": 2},), "frames array"),
        (({"type": "image", "image": str(env["i1"]), "resized_height": 28},), "unsupported options"),
        (({"type": "audio"},), "needs a 'audio' key"),
        (({"type": "text", "text": "look: <|IMAGE|>"}, {"type": "image", "image": str(env["i1"])}),
         "2 image placeholders for 1 image"),
    ]
    for parts, match in cases:
        with pytest.raises(ValueError, match=match):
            ask(*parts)
    with pytest.raises(ValueError, match="silent.mp4 has no audio track"):
        ask({"type": "video", "video": str(env["silent"])}, uav=True)
    with pytest.raises(ValueError, match="no audio track"):
        ask({"type": "video", "video": np.zeros((2, 30, 30, 3), np.uint8)}, uav=True)
