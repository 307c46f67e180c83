"""Speech latency, ours (streaming) vs the reference (`transformers`), same random weights, one run each.

    python benchmarks/speech.py [--thinker-layers 4] [--text-tokens 40] [--codes 250] [--threads 2]
    omnivox bench speech ...

Checkpoint: the official 3B config (/work/shared/configs/qwen2.5-omni-3b.config.json) with the Talker and token2wav
at their real sizes (Talker 24 layers x 896, DiT 22 layers x 1024, BigVGAN 1536 channels), the Thinker text model
cut to --thinker-layers layers at its real width (2048, vocab 151936), tiny audio/vision encoders. Built once with
the reference's random init, saved with a tiny tokenizer (tests/tiny.py; special ids remapped to that tokenizer)
and loaded with `omnivox.model.load`. Both runs get the same prompt ids (the speech system prompt + a question).

Lengths are forced so both produce exactly --text-tokens reply tokens and --codes codec codes: the lm_head rows of
the Thinker's EOS ids and the codec_head rows of every control id (>= 8192: pad/bos/eos/mask) are zeroed, so with
random weights argmax never picks them. Greedy Thinker and greedy Talker (no repetition penalty) in both.

Ours runs after one warm-up request with another question and the same system prompt (as any earlier request in
a running process), so its prompt rows up to the question are reused (`streaming/prefix.py`); the first audio is
also measured without that reuse, and without the overlapped Thinker (the whole pipeline on one thread).

Measured: time to the first audio sample and to the end. The reference returns one waveform at the end, so its
first audio is its total. token2wav real-time factor = seconds spent in token2wav / seconds of audio produced
(ours: the streaming DiT windows + vocoder windows inside the same run; reference: its one-shot
`token2wav(...)` call inside its `generate`). A breakdown (Thinker, Talker, DiT, BigVGAN) is printed for both.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CONFIG_3B = Path("/work/shared/configs/qwen2.5-omni-3b.config.json")
QUESTION = "Tell me a short story about a fox who learns to sing, please."
WARM_UP_QUESTION = "Hello! Who are you?"


def input_len(omni, messages) -> int:
    from omnivox.streaming.prompt import build_prompt

    with torch.inference_mode():
        return build_prompt(omni, messages).length


def _rope(d: dict) -> None:
    """v4 rope_scaling/rope_theta -> the rope_parameters transformers 5 reads."""
    scaling = d.pop("rope_scaling", None)
    theta = d.pop("rope_theta", None)
    if scaling is not None or theta is not None:
        rp = {"rope_type": "default", "rope_theta": float(theta if theta is not None else 10000.0)}
        if scaling and "mrope_section" in scaling:
            rp["mrope_section"] = list(scaling["mrope_section"])
        d["rope_parameters"] = rp
    d.pop("torch_dtype", None)


def speech_config(official: dict, thinker_layers: int, ids: dict[str, int]):
    """The official config with a short Thinker, tiny encoders and the tokenizer's special ids."""
    from transformers import Qwen2_5OmniConfig

    c = copy.deepcopy(official)
    th, tk, t2w = c["thinker_config"], c["talker_config"], c["token2wav_config"]
    text = th["text_config"]
    width = text["hidden_size"]
    text.update(num_hidden_layers=thinker_layers, tie_word_embeddings=False)
    _rope(text)
    _rope(tk)
    for sub in (t2w["dit_config"], t2w["bigvgan_config"]):
        sub.pop("torch_dtype", None)
    th["audio_config"] = dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                              d_model=32, output_dim=width, n_window=100, max_source_positions=1500)
    th["vision_config"] = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=width,
                               fullatt_block_indexes=[0], window_size=112, patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2)
    media = dict(audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"],
                 video_token_index=ids["<|VIDEO|>"], audio_start_token_id=ids["<|audio_bos|>"],
                 audio_end_token_id=ids["<|audio_eos|>"], vision_start_token_id=ids["<|vision_bos|>"],
                 vision_end_token_id=ids["<|vision_eos|>"])
    th.update(media, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
              pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    th.pop("torch_dtype", None)
    tk.update(media, tts_text_start_token_id=ids["<tts_text_bos>"], tts_text_end_token_id=ids["<tts_text_eod>"],
              tts_text_pad_token_id=ids["<tts_pad>"])
    return Qwen2_5OmniConfig(thinker_config=th, talker_config=tk, token2wav_config=t2w, enable_audio_output=True)


def build_checkpoint(out: Path, thinker_layers: int, seed: int = 0):
    """Write the checkpoint; returns (reference model, tokenizer special ids)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import tiny
    from transformers import Qwen2_5OmniForConditionalGeneration

    tok, ids = tiny.build_tokenizer()
    config = speech_config(json.loads(CONFIG_3B.read_text()), thinker_layers, ids)
    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(config).eval().float()
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    with torch.no_grad():
        model.thinker.lm_head.weight[eos] = 0.0          # logit 0: never the argmax of 151936 random logits
        model.talker.codec_head.weight[8192:] = 0.0      # control ids (pad/bos/eos/mask) never win: only codes
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(str(out))
    tiny.make_processor(out, tok, ids)
    tiny.make_speakers(out, config, ids, seed)
    model.load_speakers(str(out / "spk_dict.pt"))
    return model, ids


class Clock:
    """Accumulates wall time and call counts per label; `wrap` times a callable."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.sizes = defaultdict(list)     # label -> [(size, seconds)]

    def wrap(self, label, fn, size=None):
        def timed(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            dt = time.perf_counter() - t
            self.seconds[label] += dt
            self.calls[label] += 1
            if size is not None:
                self.sizes[label].append((size(*a, **k), dt))
            return out
        return timed


# ----------------------------------------------------------------------------------------------------------------


def ref_run(ref, input_ids: torch.Tensor, text_tokens: int, codes: int) -> dict:
    clock = Clock()
    th, tk, t2w = ref.thinker, ref.talker, ref.token2wav
    th.generate = clock.wrap("thinker", th.generate)
    tk.generate = clock.wrap("talker", tk.generate)
    t2w.forward = clock.wrap("token2wav", t2w.forward)
    t2w.code2wav_dit_model.sample = clock.wrap("dit", t2w.code2wav_dit_model.sample)
    t2w.code2wav_bigvgan_model.forward = clock.wrap("bigvgan", t2w.code2wav_bigvgan_model.forward)
    try:
        with torch.inference_mode():
            c0 = time.process_time()
            t0 = time.perf_counter()
            seq, wav = ref.generate(input_ids=input_ids, speaker="Chelsie", thinker_max_new_tokens=text_tokens,
                                    thinker_min_new_tokens=text_tokens, thinker_do_sample=False,
                                    talker_max_new_tokens=codes, talker_min_new_tokens=codes,
                                    talker_do_sample=False, talker_repetition_penalty=1.0)
            total = time.perf_counter() - t0
            cpu = time.process_time() - c0
    finally:
        for m, name in ((th, "generate"), (tk, "generate"), (t2w, "forward"),
                        (t2w.code2wav_dit_model, "sample"), (t2w.code2wav_bigvgan_model, "forward")):
            m.__dict__.pop(name, None)
    return dict(total=total, first_audio=total, cpu_total=cpu, cpu_first_audio=cpu,
                text_tokens=seq.shape[1] - input_ids.shape[1],
                audio_s=wav.numel() / 24000, clock=clock)


def ours_run(omni, messages, text_tokens: int, codes: int, verbose: bool = False, first_steps=None,
             overlap: bool = True, reuse_prefix: bool = True, first_audio_only: bool = False) -> dict:
    from omnivox.streaming import pipeline
    from omnivox.streaming.prompt import build_prompt
    from omnivox.talker import model as talker_mod
    from omnivox.talker import token2wav as t2w_mod
    from omnivox.thinker.sampling import SamplingParams

    clock = Clock()
    saved = [(pipeline, "prefill"), (pipeline, "decode_step"), (talker_mod, "talker_prefill"),
             (talker_mod, "talker_step"), (t2w_mod, "_window"), (t2w_mod, "_vocode"), (t2w_mod, "start_codes")]
    originals = [(m, n, getattr(m, n)) for m, n in saved]
    pipeline.prefill = clock.wrap("thinker prefill", pipeline.prefill)
    pipeline.decode_step = clock.wrap("thinker decode", pipeline.decode_step)
    talker_mod.talker_prefill = clock.wrap("talker prefill", talker_mod.talker_prefill)
    talker_mod.talker_step = clock.wrap("talker step", talker_mod.talker_step)
    t2w_mod.start_codes = clock.wrap("speaker encoder", t2w_mod.start_codes)
    t2w_mod._window = clock.wrap("dit", t2w_mod._window, size=lambda dit, st, ws, we, steps: we - ws)
    t2w_mod._vocode = clock.wrap("bigvgan", t2w_mod._vocode,
                                 size=lambda bv, st, upto, lookahead=None: st.frames - max(0, st.emitted - st.left)
                                 + (lookahead.shape[2] if lookahead is not None else 0))
    greedy = SamplingParams(greedy=True)
    opts = pipeline.GenerationOptions(max_new_tokens=text_tokens, sampling=greedy, audio=True,
                                      talker_sampling=greedy, max_codec_tokens=codes,
                                      token2wav=t2w_mod.StreamOptions(first_steps=first_steps), overlap=overlap,
                                      reuse_prefix=reuse_prefix)
    with torch.inference_mode():
        ids = build_prompt(omni, messages).input_ids
    reused = omni.prefix_cache.match(ids, pipeline.media_ids(omni), thinker=True)[1] if reuse_prefix else 0
    chunks, pieces = [], []
    cpu_first = None
    try:
        c0 = time.process_time()
        t0 = time.perf_counter()
        events = pipeline.generate(omni, messages, opts)
        for ev in events:
            if isinstance(ev, pipeline.AudioChunk):
                if not chunks:
                    cpu_first = time.process_time() - c0
                    first = time.perf_counter() - t0
                    if verbose:
                        print(f"  first audio after {first:.1f} s", flush=True)
                    if first_audio_only:
                        events.close()
                        return dict(first_audio=first, cpu_first_audio=cpu_first, reused=reused, clock=clock)
                chunks.append((time.perf_counter() - t0, ev.samples.size))
                pieces.append(ev.samples)
            elif isinstance(ev, pipeline.Done):
                done = ev
        total = time.perf_counter() - t0
        cpu = time.process_time() - c0
    finally:
        for m, n, fn in originals:
            setattr(m, n, fn)
    return dict(total=total, first_audio=done.timings["first_audio_ms"] / 1000, cpu_total=cpu, reused=reused,
                cpu_first_audio=cpu_first, text_tokens=len(done.token_ids),
                codes=len(done.codec_ids), audio_s=done.audio_seconds, wav=np.concatenate(pieces), chunks=chunks, clock=clock, done=done)


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--thinker-layers", type=int, default=4, help="Thinker text layers (3B width)")
    p.add_argument("--text-tokens", type=int, default=40, help="Thinker reply tokens (forced)")
    p.add_argument("--codes", type=int, default=250, help="Talker codec codes (forced; 50 per second of speech)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--skip-ref", action="store_true", help="run ours only")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one, removed after)")
    p.add_argument("--first-steps", type=int, default=None,
                   help="also run ours with this many ODE time points for the first DiT window (the explicit "
                        "fast start) and report its first audio and its difference from the exact stream")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the v4-style talker ids trip a harmless vocabulary check in its config
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs", flush=True)

    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="omnivox-speech-")
    out = Path(args.dir or tmp.name)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if (out / "config.json").exists() and (out / "spk_dict.pt").exists():  # --dir of an earlier run: reuse it
        from transformers import Qwen2_5OmniForConditionalGeneration

        ref = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
        ref.load_speakers(str(out / "spk_dict.pt"))
    else:
        ref, _ = build_checkpoint(out, args.thinker_layers)
    n_par = {k: sum(p.numel() for p in getattr(ref, k).parameters()) / 1e6 for k in ("thinker", "talker", "token2wav")}
    print(f"checkpoint ready in {time.perf_counter() - t:.0f} s: thinker {n_par['thinker']:.0f}M "
          f"({args.thinker_layers} layers), talker {n_par['talker']:.0f}M, token2wav {n_par['token2wav']:.0f}M "
          f"params", flush=True)

    from omnivox.model import load as omni_load
    from omnivox.streaming.pipeline import SPEECH_SYSTEM_PROMPT, user_messages
    from omnivox.streaming.prompt import build_prompt

    messages = user_messages(QUESTION, SPEECH_SYSTEM_PROMPT)
    r = None
    if not args.skip_ref:
        # the prompt ids ours builds (same tokenizer files), handed to the reference as input_ids
        omni_text = omni_load(out, audio=False)
        with torch.inference_mode():
            input_ids = build_prompt(omni_text, messages).input_ids.clone()
        del omni_text
        print(f"reference generate: {input_ids.shape[1]} prompt tokens ...", flush=True)
        r = ref_run(ref, input_ids, args.text_tokens, args.codes)
        rc = r["clock"].seconds
        print(f"  done in {r['total']:.1f} s: thinker.generate {rc['thinker']:.1f}, talker.generate "
              f"{rc['talker']:.1f}, token2wav {rc['token2wav']:.1f} (DiT {rc['dit']:.1f}, BigVGAN {rc['bigvgan']:.1f}); "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
    del ref
    gc.collect()

    omni = omni_load(out, audio=True)
    print(f"ours loaded in {omni.load_s:.1f} s; warm-up ...", flush=True)
    # allocator / first-call costs; another question with the same (speech) system prompt, as any earlier
    # request in a running process: its prompt prefix is what the measured run may reuse
    ours_run(omni, user_messages(WARM_UP_QUESTION, SPEECH_SYSTEM_PROMPT), 2, 12)
    print("ours generate ...", flush=True)
    o = ours_run(omni, messages, args.text_tokens, args.codes, verbose=True)
    print(f"  done in {o['total']:.1f} s ({o['reused']} of {input_len(omni, messages)} prompt rows reused from the "
          f"warm-up request); load average {os.getloadavg()[0]:.2f}", flush=True)
    print("ours, first audio only: without prefix reuse; then also without the overlapped Thinker ...", flush=True)
    o["cold"] = ours_run(omni, messages, args.text_tokens, args.codes, verbose=True, reuse_prefix=False,
                         first_audio_only=True)
    o["serial"] = ours_run(omni, messages, args.text_tokens, args.codes, verbose=True, reuse_prefix=False,
                           overlap=False, first_audio_only=True)
    if args.first_steps:
        print(f"ours generate, fast start (first window {args.first_steps} ODE time points) ...", flush=True)
        o["fast"] = ours_run(omni, messages, args.text_tokens, args.codes, verbose=True,
                             first_steps=args.first_steps)
    if tmp is not None:
        tmp.cleanup()

    report(args, o, r)
    return 0


def report(args, o: dict, r: dict | None) -> None:
    oc = o["clock"]
    o_t2w = oc.seconds["dit"] + oc.seconds["bigvgan"] + oc.seconds["speaker encoder"]
    print(f"\nSpeech: 3B Talker/token2wav, Thinker {args.thinker_layers} layers x 2048, {args.text_tokens} text "
          f"tokens, {args.codes} codes, fp32, {torch.get_num_threads()} threads")
    print(f"ours produced {o['text_tokens']} text tokens, {o['codes']} codes, {o['audio_s']:.2f} s of audio"
          + (f"; reference {r['text_tokens']} text tokens, {r['audio_s']:.2f} s of audio" if r else ""))
    hdr = f"{'':26} {'reference':>10} {'ours':>10} {'ratio':>8}"
    print(hdr)
    print("-" * len(hdr))

    def row(name, rv, ov, fmt="{:10.2f}", better_low=True):
        ratio = (rv / ov if better_low else ov / rv) if (rv is not None and ov) else None
        rs = fmt.format(rv) if rv is not None else f"{'-':>10}"
        print(f"{name:26} {rs} {fmt.format(ov)} " + (f"{ratio:7.1f}x" if ratio is not None else f"{'-':>8}"))

    r_t2w = r["clock"].seconds["token2wav"] if r else None
    row("first audio (s)", r["first_audio"] if r else None, o["first_audio"])
    row("  no prefix reuse (s)", r["first_audio"] if r else None, o["cold"]["first_audio"])
    row("  + no overlap (s)", r["first_audio"] if r else None, o["serial"]["first_audio"])
    row("total (s)", r["total"] if r else None, o["total"])
    # CPU seconds of the process (all threads): what each run cost, whatever else shared the cores meanwhile
    row("first audio (CPU s)", r["cpu_first_audio"] if r else None, o["cpu_first_audio"])
    row("total (CPU s)", r["cpu_total"] if r else None, o["cpu_total"])
    f = o.get("fast")
    if f:
        row(f"first audio, fast start (s)", r["first_audio"] if r else None, f["first_audio"])
        row(f"  same, CPU s", r["cpu_first_audio"] if r else None, f["cpu_first_audio"])
        n = min(f["wav"].size, o["wav"].size)
        d = f["wav"][:n] - o["wav"][:n]
        nz = np.flatnonzero(d)
        print(f"fast start vs exact stream: same length {f['wav'].size == o['wav'].size}; waveform max |diff| "
              f"{np.abs(d).max():.3g}, rel L2 {np.linalg.norm(d) / max(np.linalg.norm(o['wav'][:n]), 1e-12):.3g}; "
              f"samples that differ: {nz[0] if nz.size else '-'}..{nz[-1] if nz.size else '-'} of {n}")
    row("token2wav RTF", r_t2w / r["audio_s"] if r else None, o_t2w / o["audio_s"])
    row("overall RTF", r["total"] / r["audio_s"] if r else None, o["total"] / o["audio_s"])
    print("(ratio = reference / ours: > 1 means ours is faster)")

    print("\nwhere the time goes (s)")
    if r:
        rc = r["clock"]
        print(f"  reference: thinker.generate {rc.seconds['thinker']:.1f}, talker.generate {rc.seconds['talker']:.1f},"
              f" token2wav {rc.seconds['token2wav']:.1f} (DiT {rc.seconds['dit']:.1f}, BigVGAN "
              f"{rc.seconds['bigvgan']:.1f})")
    n = max(1, oc.calls["talker step"])
    print(f"  ours: thinker prefill {oc.seconds['thinker prefill']:.2f}, decode {oc.seconds['thinker decode']:.2f} "
          f"({oc.calls['thinker decode']} steps, {1000 * oc.seconds['thinker decode'] / max(1, oc.calls['thinker decode']):.0f} ms each); "
          f"talker prefill {oc.seconds['talker prefill']:.2f}, steps {oc.seconds['talker step']:.2f} "
          f"({n} calls, {1000 * oc.seconds['talker step'] / n:.0f} ms each); speaker encoder "
          f"{oc.seconds['speaker encoder']:.2f}")
    dit = oc.sizes["dit"]
    print(f"  ours DiT: {oc.seconds['dit']:.1f} s in {len(dit)} windows; mel frames solved "
          f"{sum(s for s, _ in dit)} for {o['codes'] * 2} emitted; per window (frames: s) "
          + ", ".join(f"{s}: {t:.1f}" for s, t in dit))
    voc = oc.sizes["bigvgan"]
    print(f"  ours BigVGAN: {oc.seconds['bigvgan']:.1f} s in {len(voc)} calls; frames vocoded "
          f"{sum(s for s, _ in voc)} for {o['codes'] * 2} emitted; per call (frames: s) "
          + ", ".join(f"{s}: {t:.2f}" for s, t in voc))
    ch = o["chunks"]
    print(f"  ours audio chunks (t s: samples): " + ", ".join(f"{t:.1f}: {n}" for t, n in ch))
    print(f"  ours timings: {o['done'].timings}")


if __name__ == "__main__":
    raise SystemExit(main())
