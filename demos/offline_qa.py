"""Answer questions about a batch of audio, video and image files in one run, in text and in speech.

    python demos/offline_qa.py --model DIR --question "What happens here?" clip.mp4 talk.wav photos/
    python demos/offline_qa.py --model DIR --csv questions.csv          # rows: file,question (header optional)

The model is loaded once. Each question is one turn through the public streaming API
(`omnivox.load` + `omnivox.streaming.pipeline.generate`): the spoken answer is written into its WAV as the chunks
arrive, and one JSON line per question is appended to OUT_DIR/answers.jsonl as soon as it is answered, so a long
batch can be followed (and a cut-off batch keeps what it finished).

- A file's kind comes from its extension, else from its first bytes; containers are probed with PyAV, so an
  .mp4 with only an audio track is audio. A folder stands for the media files inside it (recursively, sorted).
- Videos are asked with their soundtrack (`use_audio_in_video`, as the Qwen team's demos do) unless
  --no-audio-in-video; a video without an audio track is asked about its frames only.
- A missing, corrupt or unrecognised file gets a line on stderr and a JSON line with "error", and the batch goes on.
- Relative paths in a CSV are read from the CSV's folder (the current directory if only it has the file); an
  empty file cell asks the question with no media.

Exit status: 0 when every question was answered, 1 when some failed, 2 for bad arguments or a model that does not
load. Progress goes to stderr as plain lines: `[3/10] clip.mp4 ... 4.2 s (12 tokens, 3.1 s speech)`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

AUDIO_EXT = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".aif", ".aiff", ".au",
             ".amr"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VIDEO_EXT = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ts",
             ".mts"}
MEDIA_EXT = AUDIO_EXT | IMAGE_EXT | VIDEO_EXT
SAMPLE_RATE = 24000


class UsageError(ValueError):
    """Bad arguments or inputs found before any work: exit 2."""


@dataclass
class Item:
    file: str            # as the user wrote it ("" for a text-only question)
    path: Path | None    # where it is read from
    question: str


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def parse_args(argv=None) -> argparse.Namespace:
    from omnivox.cli import positive_int  # argparse only: torch loads later

    p = argparse.ArgumentParser(description="Answer questions about audio/video/image files with omnivox: text "
                                "answers as JSONL, spoken answers as WAV.")
    p.add_argument("files", nargs="*", metavar="FILE", help="media files or folders (with --question)")
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--question", help="the question asked about every FILE")
    src.add_argument("--csv", metavar="CSV", help="questions file with columns file,question (header optional)")
    p.add_argument("--out-dir", default="answers", help="where answers.jsonl and the WAVs go (default ./answers)")
    p.add_argument("--no-audio", action="store_true", help="text answers only (the Talker is not loaded)")
    p.add_argument("--no-audio-in-video", dest="audio_in_video", action="store_false",
                   help="look at videos' frames only, without listening to their soundtrack")
    p.add_argument("--speaker", default=None, help="voice from the checkpoint's spk_dict.pt (default Chelsie)")
    p.add_argument("--system", default=None, help="system prompt (default: the official speech prompt when "
                   "speaking, the chat template's otherwise)")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, help="text tokens per answer")
    p.add_argument("--max-codec-tokens", type=positive_int, default=4096,
                   help="Talker limit per answer (50 codec tokens per second of speech)")
    p.add_argument("--greedy", action="store_true",
                   help="argmax decoding in both models, as the reference's do_sample=False (penalties kept)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed; each question is seeded alike")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: the checkpoint's)")
    args = p.parse_args(argv)
    if args.csv and args.files:
        p.error("give questions either with --question FILE... or with --csv, not both")
    if args.question is not None and not args.files:
        p.error("--question needs at least one FILE")
    if args.question is not None and not args.question.strip():
        p.error("--question is empty")
    return args


def _media_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_EXT
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def items_from_files(files: list[str], question: str) -> list[Item]:
    items = []
    for f in files:
        path = Path(f).expanduser()
        if path.is_dir():
            found = _media_in(path)
            if not found:
                print(f"offline_qa: warning: no audio, image or video files in {f}", file=sys.stderr)
            items += [Item(str(p), p, question) for p in found]
        else:
            items.append(Item(f, path, question))   # a missing file is reported in its turn, not here
    return items


def items_from_csv(csv_path: str) -> list[Item]:
    path = Path(csv_path).expanduser()
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"cannot read {csv_path}: {e}") from None
    numbered = [(n, row) for n, row in enumerate(rows, 1)
                if any(c.strip() for c in row) and not row[0].lstrip().startswith("#")]
    file_col, q_col, has_header = 0, 1, False
    if numbered:
        head = [c.strip().lower() for c in numbered[0][1]]
        if "file" in head and "question" in head:
            file_col, q_col, has_header = head.index("file"), head.index("question"), True
            numbered = numbered[1:]
    items = []
    for n, row in numbered:
        if has_header:
            if len(row) <= max(file_col, q_col):
                raise UsageError(f"{csv_path} line {n}: expected columns {', '.join(rows[0])}")
            f, q = row[file_col].strip(), row[q_col].strip()
        else:
            if len(row) < 2:
                raise UsageError(f"{csv_path} line {n}: expected file,question")
            f, q = row[0].strip(), ",".join(row[1:]).strip()   # an unquoted comma in the question is kept
        if not q:
            raise UsageError(f"{csv_path} line {n}: the question is empty")
        if not f:
            items.append(Item("", None, q))
            continue
        p = Path(f).expanduser()
        if not p.is_absolute():
            beside = path.parent / p
            p = beside if beside.exists() or not p.exists() else p   # the CSV's folder first, then the cwd
        items.append(Item(f, p, q))
    if not items:
        raise UsageError(f"{csv_path} holds no questions")
    return items


def _sniff(path: Path) -> str | None:
    """The media kind from a file's first bytes, or None."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] == b"RIFF":
        return {b"WAVE": "audio", b"AVI ": "video", b"WEBP": "image"}.get(head[8:12])
    if head[:4] in (b"fLaC", b"OggS") or head[:3] == b"ID3" or head[:4] == b"FORM":
        return "audio"
    if len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] != 0xFF:   # MPEG/ADTS frame sync
        return "audio"
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff" or head[:4] in (b"GIF8", b"II*\0", b"MM\0*") \
            or head[:2] == b"BM":
        return "image"
    if head[4:8] == b"ftyp":
        return "audio" if head[8:12] in (b"M4A ", b"M4B ") else "video"
    if head[:4] == b"\x1a\x45\xdf\xa3":                    # Matroska / WebM
        return "video"
    return None


def _streams(path: Path) -> tuple[bool, bool] | None:
    """(has video, has audio) of a container, or None when PyAV cannot open it (the pipeline reports why)."""
    import av

    try:
        with av.open(str(path)) as c:
            return bool(c.streams.video), bool(c.streams.audio)
    except Exception:
        return None


def media_kind(path: Path) -> tuple[str, bool]:
    """("audio" | "image" | "video", has an audio track). ValueError for a missing or unrecognised file."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    ext = path.suffix.lower()
    kind = ("audio" if ext in AUDIO_EXT else "image" if ext in IMAGE_EXT else "video" if ext in VIDEO_EXT
            else _sniff(path))
    if kind is None:
        raise ValueError(f"cannot tell whether {path} is audio, an image or a video (unknown extension and content)")
    if kind != "video":
        return kind, kind == "audio"
    streams = _streams(path)
    if streams is None:
        return "video", False
    has_video, has_audio = streams
    if not has_video and has_audio:
        return "audio", True                                   # e.g. an .mp4 holding only sound
    return "video", has_audio


# ----------------------------------------------------------------------------------------------------------------
# Running


def _device(name: str) -> str:
    from omnivox.cli import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _wav_name(index: int, item: Item) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(item.file).stem if item.file else "text").strip("._")[:60]
    return f"{index:04d}_{stem or 'item'}.wav"


def _error_text(e: Exception) -> str:
    from omnivox.errors import OmnivoxError

    if isinstance(e, (ValueError, OmnivoxError, OSError)):
        return str(e)
    return f"internal error: {type(e).__name__}: {e}"


class Batch:
    """The loaded model and the options shared by every question."""

    def __init__(self, omni, args):
        from omnivox.streaming.decoding import talker_sampling, thinker_sampling
        from omnivox.streaming.pipeline import SPEECH_SYSTEM_PROMPT, GenerationOptions

        self.omni, self.args = omni, args
        self.speech = not args.no_audio
        # greedy: the reference's do_sample=False in both models; else the checkpoint's generation_config and the
        # Talker's reference defaults, with the same seed
        sampling = thinker_sampling(omni.config.generation, greedy=args.greedy, seed=args.seed)
        talker = talker_sampling(greedy=args.greedy, seed=args.seed)
        self.options = GenerationOptions(max_new_tokens=args.max_new_tokens, sampling=sampling, audio=self.speech,
                                         speaker=args.speaker, talker_sampling=talker,
                                         max_codec_tokens=args.max_codec_tokens)
        self.system = args.system if args.system is not None else (SPEECH_SYSTEM_PROMPT if self.speech else None)
        self.out_dir = Path(args.out_dir)

    def answer(self, index: int, item: Item) -> dict:
        """One question -> its JSON record; raises for a bad file (the caller records the error)."""
        from omnivox.streaming.pipeline import AudioChunk, Done, generate, user_messages

        media, kind, in_video = {}, None, False
        if item.path is not None:
            kind, has_audio = media_kind(item.path)
            media = {kind + "s": [str(item.path)]}
            in_video = kind == "video" and self.args.audio_in_video and has_audio
        messages = user_messages(item.question, self.system, **media)
        options = dataclasses.replace(self.options, use_audio_in_video=in_video)
        wav_path = (self.out_dir / _wav_name(index, item)).resolve() if self.speech else None
        done, wav = None, None
        t0 = time.perf_counter()
        try:
            if wav_path is not None:
                import soundfile as sf

                wav = sf.SoundFile(str(wav_path), mode="w", samplerate=SAMPLE_RATE, channels=1, subtype="PCM_16",
                                   format="WAV")
            for event in generate(self.omni, messages, options):
                if isinstance(event, AudioChunk):
                    wav.write(event.samples)
                    wav.flush()
                elif isinstance(event, Done):
                    done = event
        except BaseException:
            if wav is not None:
                wav.close()
                wav_path.unlink(missing_ok=True)
            raise
        if wav is not None:
            wav.close()
        record = {
            "index": index, "file": item.file, "kind": kind, "question": item.question, "answer": done.text,
            "finish_reason": done.finish_reason, "prompt_tokens": done.prompt_tokens,
            "answer_tokens": len(done.token_ids), "use_audio_in_video": in_video,
        }
        if self.speech:
            record.update(codec_tokens=len(done.codec_ids), audio=str(wav_path),
                          audio_seconds=round(done.audio_seconds, 3))
        record["timings"] = {**done.timings, "wall_s": round(time.perf_counter() - t0, 3)}
        return record


def run_batch(batch: Batch, items: list[Item], jsonl) -> int:
    """Answer every item in order; returns the number that failed."""
    failed, t_start, n = 0, time.perf_counter(), len(items)
    width = len(str(n))
    for i, item in enumerate(items, 1):
        name = item.file or "(no file)"
        sys.stderr.write(f"[{i:>{width}}/{n}] {name} ... ")
        sys.stderr.flush()
        t0 = time.perf_counter()
        try:
            record = batch.answer(i, item)
        except Exception as e:
            if os.environ.get("OMNIVOX_DEBUG"):
                raise
            failed += 1
            record = {"index": i, "file": item.file, "question": item.question, "error": _error_text(e)}
            sys.stderr.write(f"error: {record['error']}\n")
        else:
            speech = f", {record['audio_seconds']:.1f} s speech" if "audio_seconds" in record else ""
            sys.stderr.write(f"{time.perf_counter() - t0:.1f} s ({record['answer_tokens']} tokens{speech})\n")
        sys.stderr.flush()
        jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
        jsonl.flush()
    total = time.perf_counter() - t_start
    print(f"answered {n - failed} of {n} questions in {total:.1f} s"
          + (f"; {failed} failed" if failed else "") + f" -> {jsonl.name}", file=sys.stderr)
    return failed


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        items = items_from_csv(args.csv) if args.csv else items_from_files(args.files, args.question)
        if not items:
            raise UsageError("no files to ask about")
        out_dir = Path(args.out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the output folder {out_dir}: {e}") from None
        device = _device(args.device)
        import omnivox
        from omnivox.streaming.pipeline import resolve_speaker

        t0 = time.perf_counter()
        omni = omnivox.load(args.model, device=device, dtype=args.dtype, audio=not args.no_audio)
        if not args.no_audio:
            resolve_speaker(omni, args.speaker)
        batch = Batch(omni, args)
    except Exception as e:
        if os.environ.get("OMNIVOX_DEBUG"):
            raise
        print(f"offline_qa: error: {_error_text(e)}", file=sys.stderr)
        return 2
    print(f"loaded {omni.path} on {device} in {time.perf_counter() - t0:.1f} s; {len(items)} questions",
          file=sys.stderr)
    try:
        with open(out_dir / "answers.jsonl", "w", encoding="utf-8") as jsonl:
            failed = run_batch(batch, items, jsonl)
    except KeyboardInterrupt:
        print("\noffline_qa: interrupted", file=sys.stderr)
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
