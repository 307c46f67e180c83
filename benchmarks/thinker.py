"""Thinker speed, ours vs the reference (`transformers`), same random weights, one run, printed side by side.

    python benchmarks/thinker.py [--dtypes float32,bfloat16] [--prompt 256] [--new 32] [--layers 24]
    omnivox bench thinker ...

Config: a ~0.5B-parameter Thinker (Qwen2.5-0.5B-like text model: hidden 896, 24 layers, 14/2 heads, ffn 4864,
vocab 151936, mrope [8,12,12]). Prefill tok/s on one prompt; decode tok/s at batch 1 measured as
(N-1) / (t(N tokens) - t(1 token)) for both, so prefill and the first sample cancel out. The reference runs its
own `generate(do_sample=False)` (what its users run); ours runs `prefill` + `decode_step` + argmax.
The memory-bandwidth bound is bytes of weights read per decoded token / measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import time

import torch


def thinker_config(layers: int):
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig

    text = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
                max_position_embeddings=32768)
    audio = dict(encoder_layers=1, d_model=32, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=896)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=896,
                  fullatt_block_indexes=[0])
    ids = dict(audio_token_index=151646, image_token_index=151655, video_token_index=151656,
               audio_start_token_id=151647, audio_end_token_id=151648, vision_start_token_id=151652,
               vision_end_token_id=151653)  # the reference's generate() reads these from the config
    return Qwen2_5OmniThinkerConfig(text_config=text, audio_config=audio, vision_config=vision,
                                    tie_word_embeddings=False, **ids)


def build(layers: int, dtype: torch.dtype):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from omnivox.thinker.config import DecoderConfig
    from omnivox.thinker.model import Thinker

    hf_cfg = thinker_config(layers)
    torch.manual_seed(0)
    ref = Qwen2_5OmniThinkerForConditionalGeneration(hf_cfg).eval().to(dtype)
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    cfg = DecoderConfig.from_dict(hf_cfg.text_config.to_dict(), tie_word_embeddings=False)
    with torch.device("meta"):
        ours = Thinker(cfg)
    # the reference keeps its text model under model.language_model in memory; ours uses the checkpoint names
    state = {k.replace("model.language_model.", "model."): v for k, v in ref.state_dict().items()
             if k.startswith(("model.language_model.", "lm_head."))}
    ours.load_state_dict(state, strict=True, assign=True)
    if hasattr(ours, "reset_buffers"):
        ours.reset_buffers()
    for m in ours.modules():
        if m is not ours and hasattr(m, "reset_buffers"):
            m.reset_buffers()
    return ref.eval(), ours.eval(), cfg


def copy_bandwidth(n_bytes: int = 512 * 2**20) -> float:
    """Bytes/s of a large tensor copy (read + write counted)."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best


def ours_run(thinker, cfg, ids: torch.Tensor, n_new: int, dtype) -> tuple[float, float]:
    """(prefill seconds, seconds for n_new greedy tokens including prefill)."""
    from omnivox.thinker.model import KVCache, decode_step, embed, prefill, text_positions

    T = ids.shape[1]
    cache = KVCache.allocate(cfg, batch=1, max_len=T + n_new + 1, device="cpu", dtype=dtype)
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits, _ = prefill(thinker, cache, embed(thinker, ids), text_positions(0, T, 1))
        tok = logits.argmax(-1)
        t_prefill = time.perf_counter() - t0
        for i in range(n_new - 1):
            logits, _ = decode_step(thinker, cache, tok, text_positions(T + i, 1, 1))
            tok = logits.argmax(-1)
        return t_prefill, time.perf_counter() - t0


def ref_run(ref, ids: torch.Tensor, n_new: int) -> tuple[float, float]:
    with torch.inference_mode():
        t0 = time.perf_counter()
        ref(input_ids=ids, use_cache=False, logits_to_keep=1)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref.generate(input_ids=ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        return t_prefill, time.perf_counter() - t0


def best_of(fn, repeats: int):
    runs = [fn() for _ in range(repeats)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument("--new", type=int, default=32, help="decoded tokens")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bw = copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, copy bandwidth {bw / 1e9:.1f} GB/s")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151000, (1, args.prompt), generator=g)
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        ref, ours, cfg = build(args.layers, dtype)
        n_params = sum(p.numel() for p in ours.parameters())
        # bytes read per decoded token: every weight except the embedding table (one row is gathered)
        read_bytes = (n_params - ours.model.embed_tokens.weight.numel()) * dtype.itemsize
        bound = bw / read_bytes
        # warm up both once (allocators, kernels)
        ours_run(ours, cfg, ids[:, :16], 4, dtype)
        ref_run(ref, ids[:, :16], 4)
        o_pre, o_n = best_of(lambda: ours_run(ours, cfg, ids, args.new, dtype), args.repeats)
        _, o_1 = best_of(lambda: ours_run(ours, cfg, ids, 1, dtype), args.repeats)
        r_pre, r_n = best_of(lambda: ref_run(ref, ids, args.new), args.repeats)
        _, r_1 = best_of(lambda: ref_run(ref, ids, 1), args.repeats)
        o_dec = (args.new - 1) / max(o_n - o_1, 1e-9)
        r_dec = (args.new - 1) / max(r_n - r_1, 1e-9)
        rows.append((name, n_params, args.prompt / r_pre, args.prompt / o_pre, r_dec, o_dec, bound))
        del ref, ours
    print(f"\nThinker {args.layers} layers, hidden 896, prompt {args.prompt} tokens, {args.new} decoded tokens, batch 1")
    hdr = f"{'dtype':9} {'params':>7} | {'prefill tok/s ref':>17} {'ours':>8} {'ratio':>6} | " \
          f"{'decode tok/s ref':>16} {'ours':>7} {'ratio':>6} | {'bw bound':>8} {'ours/bound':>10}"
    print(hdr)
    print("-" * len(hdr))
    for name, n, rp, op, rd, od, bound in rows:
        print(f"{name:9} {n / 1e9:6.2f}B | {rp:17.1f} {op:8.1f} {op / rp:5.2f}x | {rd:16.2f} {od:7.2f} "
              f"{od / rd:5.2f}x | {bound:8.2f} {od / bound:9.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
