"""The omnivox Python API on one file: ask a question, print the answer as it streams, save the speech.

    python demos/api_example.py --model Qwen/Qwen2.5-Omni-3B clip.mp4 "What happens in this clip?" --out answer.wav
"""
import argparse
from pathlib import Path

import soundfile as sf
import torch

import omnivox
from omnivox.streaming.pipeline import SPEECH_SYSTEM_PROMPT, AudioChunk, Done, GenerationOptions, TextDelta

p = argparse.ArgumentParser()
p.add_argument("file", help="an audio, image or video file")
p.add_argument("question")
p.add_argument("--model", required=True, help="checkpoint directory or hub id")
p.add_argument("--out", default="answer.wav")
p.add_argument("--max-new-tokens", type=int, default=512)
p.add_argument("--max-codec-tokens", type=int, default=4096)
args = p.parse_args()

omni = omnivox.load(args.model, device="cuda" if torch.cuda.is_available() else "cpu")  # Thinker, Talker, token2wav
ext = Path(args.file).suffix.lower()
kind = "image" if ext in (".png", ".jpg", ".jpeg", ".webp") else "video" if ext in (".mp4", ".mov", ".mkv",
                                                                                     ".webm") else "audio"
# speech output wants the official system prompt; a video is heard as well as seen (it needs an audio track)
messages = omnivox.user_messages(args.question, SPEECH_SYSTEM_PROMPT, **{kind + "s": [args.file]})
options = GenerationOptions(max_new_tokens=args.max_new_tokens, audio=True, use_audio_in_video=kind == "video",
                            max_codec_tokens=args.max_codec_tokens)
with sf.SoundFile(args.out, "w", samplerate=24000, channels=1, subtype="PCM_16") as wav:
    for event in omnivox.generate(omni, messages, options):
        if isinstance(event, TextDelta):
            print(event.text, end="", flush=True)
        elif isinstance(event, AudioChunk):           # 24 kHz float32, written as soon as it is final
            wav.write(event.samples)
        elif isinstance(event, Done):
            print(f"\n[{len(event.token_ids)} tokens and {event.audio_seconds:.1f} s of speech in "
                  f"{event.timings['total_ms'] / 1000:.1f} s -> {args.out}]")
