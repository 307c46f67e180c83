"""Answer questions about many audio, video and image files in one run, in text and in speech.

    python demos/offline_qa.py --model DIR --question "What happens here?" clip.mp4 talk.wav photos/
    python demos/offline_qa.py --model DIR --manifest questions.jsonl      # or questions.csv
    python demos/offline_qa.py --model DIR --manifest questions.jsonl --resume   # after an interruption

A manifest is JSONL (one object per line: "file" or "files" (a list), "question", optional "system" and "id") or
CSV (a header with file/files, question and optional system/id columns, or plain `file,question` rows; several
files in one cell are separated by `;`). Relative paths are read from the manifest's folder (the current
directory if only it has the file); no file asks the question with text alone.

The model is loaded once. Each question is one turn through the public streaming API
(`omnivox.load` + `omnivox.streaming.pipeline.generate`): the spoken answer is written into its WAV as the chunks
arrive, and one JSON line per question (text, WAV path, timings) is appended to OUT_DIR/answers.jsonl as soon as
it is answered.

- Resume: `--resume` keeps the answered questions of an earlier run into the same OUT_DIR (matched by "id", else by
  files + question + system) and asks the rest, failed ones included; the settings must be the ones that run
  used (OUT_DIR/run.json). Without --resume an existing answers.jsonl is not overwritten unless --overwrite.
- A file's kind comes from its extension, else from its first bytes; containers are probed with PyAV, so an
  .mp4 with only an audio track is audio. A folder stands for the media files inside it (recursively, sorted).
- Videos are asked with their soundtrack (`use_audio_in_video`, as the Qwen team's demos do) unless
  --no-audio-in-video; a video without an audio track is asked about its frames only.
- A missing, corrupt or unrecognised file gets a line on stderr and a JSON line with "error", and the batch goes on.
- Sampling flags are `omnivox ask`'s (--greedy, --temperature, --top-p, --top-k, --repetition-penalty, --seed,
  --talker-codec-prompt, --fast-start); each question is seeded alike.

Exit status: 0 when every question was answered, 1 when some failed, 2 for bad arguments or a model that does not
load, 130 when interrupted (what was answered is kept; --resume goes on). Progress goes to stderr: a bar on a
terminal, else one line per question: `[3/10] clip.mp4 ... 4.2 s (12 tokens, 3.1 s speech)`.
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
    files: list[str]     # as the user wrote them (empty for a text-only question)
    paths: list[Path]    # where they are read from
    question: str
    system: str | None = None   # this question's system prompt (None: the run's)
    id: str | None = None       # the manifest's id, else one made from the content (see assign_keys)
    key: str = ""

    @property
    def name(self) -> str:
        return "; ".join(self.files) or "(no file)"


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def parse_args(argv=None) -> argparse.Namespace:
    from omnivox.cli import add_sampling_arguments, positive_int  # argparse only: torch loads later

    p = argparse.ArgumentParser(description="Answer questions about audio/video/image files with omnivox: text "
                                "answers as JSONL, spoken answers as WAV.")
    p.add_argument("files", nargs="*", metavar="FILE", help="media files or folders (with --question)")
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--question", help="the question asked about every FILE")
    src.add_argument("--manifest", metavar="FILE", help="questions as JSONL (.jsonl/.ndjson) or CSV: file(s), "
                     "question, optional system and id per row")
    p.add_argument("--out-dir", default="answers", help="where answers.jsonl and the WAVs go (default ./answers)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="keep what an earlier run into --out-dir answered and ask the rest (failed ones too)")
    again.add_argument("--overwrite", action="store_true", help="start over even if --out-dir holds answers")
    p.add_argument("--no-audio", action="store_true", help="text answers only (the Talker is not loaded)")
    p.add_argument("--no-audio-in-video", dest="audio_in_video", action="store_false",
                   help="look at videos' frames only, without listening to their soundtrack")
    p.add_argument("--speaker", default=None, help="voice from the checkpoint's spk_dict.pt (default Chelsie)")
    p.add_argument("--system", default=None, help="system prompt for rows without one (default: the official "
                   "speech prompt when speaking, the chat template's otherwise)")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, help="text tokens per answer")
    p.add_argument("--max-codec-tokens", type=positive_int, default=4096,
                   help="Talker limit per answer (50 codec tokens per second of speech)")
    add_sampling_arguments(p)
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto",
                   help="a progress bar (default on a terminal) or one line per question")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: the checkpoint's)")
    args = p.parse_args(argv)
    if args.manifest and args.files:
        p.error("give questions either with --question FILE... or with --manifest, not both")
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
            items += [Item([str(p)], [p], question) for p in found]
        else:
            items.append(Item([f], [path], question))   # a missing file is reported in its turn, not here
    return items


def _resolve(name: str, folder: Path) -> Path:
    p = Path(name).expanduser()
    if p.is_absolute():
        return p
    beside = folder / p
    return beside if beside.exists() or not p.exists() else p   # the manifest's folder first, then the cwd


def _row_item(where: str, files, question, system, ident, folder: Path) -> Item:
    if not isinstance(question, str) or not question.strip():
        raise UsageError(f"{where}: the question is missing or empty")
    if isinstance(files, str):
        files = [f.strip() for f in files.split(";")]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise UsageError(f"{where}: \"files\" must be a list of paths")
    files = [f for f in files if f.strip()]
    if system is not None and not isinstance(system, str):
        raise UsageError(f"{where}: \"system\" must be a string")
    if ident is not None and not isinstance(ident, (str, int)):
        raise UsageError(f"{where}: \"id\" must be a string or a number")
    return Item(files, [_resolve(f, folder) for f in files], question.strip(), system or None,
                None if ident in (None, "") else str(ident))


def items_from_jsonl(path: Path, lines: list[str]) -> list[Item]:
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UsageError(f"{where}: expected an object with \"question\" and \"file\" or \"files\"")
        if "file" in row and "files" in row:
            raise UsageError(f"{where}: give \"file\" or \"files\", not both")
        files = row.get("files", [row["file"]] if isinstance(row.get("file"), str) else row.get("file", []))
        items.append(_row_item(where, files, row.get("question"), row.get("system"), row.get("id"), path.parent))
    return items


def items_from_csv(path: Path, text: str) -> list[Item]:
    try:
        rows = list(csv.reader(text.splitlines()))
    except csv.Error as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    numbered = [(n, row) for n, row in enumerate(rows, 1)
                if any(c.strip() for c in row) and not row[0].lstrip().startswith("#")]
    header = None
    if numbered:
        head = [c.strip().lower() for c in numbered[0][1]]
        if "question" in head and ("file" in head or "files" in head):
            header, numbered = head, numbered[1:]
    items = []
    for n, row in numbered:
        where = f"{path} line {n}"
        if header is not None:
            if len(row) > len(header):
                raise UsageError(f"{where}: more cells than the header's {len(header)} ({', '.join(header)})")
            cell = dict(zip(header, (c.strip() for c in row)))
            files = cell.get("files", cell.get("file", ""))
            items.append(_row_item(where, files, cell.get("question", ""), cell.get("system"), cell.get("id"),
                                   path.parent))
        else:
            if len(row) < 2:
                raise UsageError(f"{where}: expected file,question")
            # an unquoted comma in the question is kept
            items.append(_row_item(where, row[0], ",".join(row[1:]), None, None, path.parent))
    return items


def items_from_manifest(manifest: str) -> list[Item]:
    path = Path(manifest).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {manifest}: {e}") from None
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or (
        path.suffix.lower() != ".csv" and text.lstrip().startswith("{"))
    items = items_from_jsonl(path, text.splitlines()) if jsonl else items_from_csv(path, text)
    if not items:
        raise UsageError(f"{manifest} holds no questions")
    return items


def assign_keys(items: list[Item]) -> None:
    """Each item's resume key: its id, else its files + question + system, numbered when a row repeats."""
    import hashlib

    seen: dict[str, int] = {}
    for item in items:
        if item.id is not None:
            base = "id:" + item.id
        else:
            blob = json.dumps([item.files, item.question, item.system], ensure_ascii=False)
            base = hashlib.sha1(blob.encode()).hexdigest()[:16]
        seen[base] = seen.get(base, 0) + 1
        item.key = base if seen[base] == 1 else f"{base}#{seen[base]}"
    ids = [i.id for i in items if i.id is not None]
    if len(ids) != len(set(ids)):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise UsageError(f"id {dup!r} is given to more than one question")


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
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(item.files[0]).stem if item.files else "text").strip("._")[:60]
    return f"{index:04d}_{stem or 'item'}.wav"


def _error_text(e: Exception) -> str:
    from omnivox.errors import OmnivoxError

    if isinstance(e, (ValueError, OmnivoxError, OSError)):
        return str(e)
    return f"internal error: {type(e).__name__}: {e}"


SETTINGS = ("model", "no_audio", "audio_in_video", "speaker", "system", "max_new_tokens", "max_codec_tokens",
            "greedy", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "talker_codec_prompt",
            "fast_start", "dtype")


def run_settings(args) -> dict:
    """What decides the answers: a resumed run must use the same."""
    return {k: getattr(args, k) for k in SETTINGS}


def previous_answers(out_dir: Path, args) -> dict[str, dict]:
    """--resume: the answered records of the earlier run by key. The file is rewritten without its failed records
    and a line an interruption cut short, so that what follows is appended to whole lines."""
    jsonl, meta = out_dir / "answers.jsonl", out_dir / "run.json"
    if not jsonl.exists():
        return {}
    try:
        before = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UsageError(f"{out_dir} holds answers.jsonl but no readable run.json: cannot tell its settings; "
                         "use --overwrite to start over") from None
    changed = [k for k in SETTINGS if before.get(k) != getattr(args, k)]
    if changed:
        raise UsageError(f"--resume with other settings than the run in {out_dir} ({', '.join(changed)}); use the "
                         "same ones, another --out-dir, or --overwrite")
    kept: dict[str, dict] = {}
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue                                           # cut short by the interruption
        if isinstance(record, dict) and "error" not in record and "key" in record and (
                record.get("audio") is None or Path(record["audio"]).is_file()):
            kept[record["key"]] = record
    tmp = jsonl.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept.values()), encoding="utf-8")
    os.replace(tmp, jsonl)
    return kept


class Progress:
    """A bar redrawn in place on a terminal, else one line per question."""

    def __init__(self, total: int, skipped: int, mode: str, stream=sys.stderr):
        self.total, self.done, self.failed, self.stream = total, skipped, 0, stream
        self.bar = mode == "bar" or (mode == "auto" and stream.isatty())
        self.t0, self.n_timed = time.perf_counter(), 0
        self.width = len(str(total))

    def start(self, index: int, item: Item) -> None:
        if not self.bar:
            self.stream.write(f"[{index:>{self.width}}/{self.total}] {item.name} ... ")
        else:
            self.stream.write("\r" + self.line(item.name) + "\x1b[K")
        self.stream.flush()

    def finish(self, item: Item, message: str, ok: bool) -> None:
        self.done += 1
        self.n_timed += 1
        self.failed += not ok
        if not self.bar:
            self.stream.write(message + "\n")
        elif not ok:                                           # errors stay on screen above the bar
            self.stream.write(f"\r\x1b[K{item.name}: {message}\n")
        self.stream.flush()

    def line(self, current: str) -> str:
        frac = self.done / self.total if self.total else 1.0
        cells = 24
        full = int(frac * cells)
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.n_timed * (self.total - self.done) if self.n_timed else None
        eta_text = f"eta {_clock(eta)}" if eta is not None else "eta --:--"
        failed = f" {self.failed} failed" if self.failed else ""
        return (f"[{'#' * full}{'.' * (cells - full)}] {self.done}/{self.total} {frac:4.0%} {_clock(elapsed)} "
                f"{eta_text}{failed}  {current[-40:]}")

    def close(self) -> None:
        if self.bar:
            self.stream.write("\r" + self.line("") + "\x1b[K\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class Batch:
    """The loaded model and the options shared by every question."""

    def __init__(self, omni, args):
        from omnivox.cli import sampling_from_args, stream_options
        from omnivox.streaming.pipeline import GenerationOptions, speech_system_prompt

        self.omni, self.args = omni, args
        self.speech = not args.no_audio
        sampling, talker = sampling_from_args(args, omni.config.generation)
        self.options = GenerationOptions(max_new_tokens=args.max_new_tokens, sampling=sampling, audio=self.speech,
                                         speaker=args.speaker, talker_sampling=talker,
                                         max_codec_tokens=args.max_codec_tokens,
                                         talker_codec_prompt=args.talker_codec_prompt,
                                         token2wav=stream_options(args))
        self.system = args.system if args.system is not None else (speech_system_prompt(omni) if self.speech
                                                                    else None)
        self.out_dir = Path(args.out_dir)

    def answer(self, index: int, item: Item) -> dict:
        """One question -> its JSON record; raises for a bad file (the caller records the error)."""
        from omnivox.streaming.pipeline import AudioChunk, Done, generate, user_messages

        media: dict[str, list[str]] = {"audios": [], "images": [], "videos": []}
        kinds, silent, in_video = [], [], False
        for path in item.paths:
            kind, has_audio = media_kind(path)
            kinds.append(kind)
            media[kind + "s"].append(str(path))
            in_video |= kind == "video" and self.args.audio_in_video and has_audio
            if kind == "video" and not has_audio:
                silent.append(str(path))
        if in_video:   # use_audio_in_video is per request: every video must then have a soundtrack
            if silent:
                raise ValueError(f"{silent[0]} has no audio track while another video of the question is heard "
                                 "with its soundtrack; ask them separately or use --no-audio-in-video")
        messages = user_messages(item.question, item.system or self.system, **media)
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
        record = {"index": index, "key": item.key, **({"id": item.id} if item.id is not None else {}),
                  "files": item.files, "kinds": kinds}
        if len(item.files) == 1:
            record.update(file=item.files[0], kind=kinds[0])
        record.update({
            "question": item.question, **({"system": item.system} if item.system else {}), "answer": done.text,
            "finish_reason": done.finish_reason, "prompt_tokens": done.prompt_tokens,
            "answer_tokens": len(done.token_ids), "use_audio_in_video": in_video,
        })
        if self.speech:
            record.update(codec_tokens=len(done.codec_ids), audio=str(wav_path),
                          audio_seconds=round(done.audio_seconds, 3))
        record["timings"] = {**done.timings, "wall_s": round(time.perf_counter() - t0, 3)}
        return record


def run_batch(batch: Batch, items: list[Item], jsonl, progress: Progress, kept: dict[str, dict]) -> int:
    """Answer every item not in `kept`, in order; returns the number that failed."""
    t_start = time.perf_counter()
    todo = [(i, item) for i, item in enumerate(items, 1) if item.key not in kept]
    for i, item in todo:
        progress.start(i, item)
        t0 = time.perf_counter()
        try:
            record = batch.answer(i, item)
        except Exception as e:
            if os.environ.get("OMNIVOX_DEBUG"):
                raise
            record = {"index": i, "key": item.key, **({"id": item.id} if item.id is not None else {}),
                      "files": item.files, **({"file": item.files[0]} if len(item.files) == 1 else {}),
                      "question": item.question, "error": _error_text(e)}
            progress.finish(item, f"error: {record['error']}", ok=False)
        else:
            speech = f", {record['audio_seconds']:.1f} s speech" if "audio_seconds" in record else ""
            progress.finish(item, f"{time.perf_counter() - t0:.1f} s ({record['answer_tokens']} tokens{speech})",
                            ok=True)
        jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
        jsonl.flush()
    progress.close()
    total, n, failed = time.perf_counter() - t_start, len(items), progress.failed
    earlier = f" ({len(items) - len(todo)} from the earlier run)" if len(todo) < n else ""
    print(f"answered {n - failed} of {n} questions{earlier} in {total:.1f} s"
          + (f"; {failed} failed" if failed else "") + f" -> {jsonl.name}", file=sys.stderr)
    return failed


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        items = items_from_manifest(args.manifest) if args.manifest else items_from_files(args.files,
                                                                                             args.question)
        if not items:
            raise UsageError("no files to ask about")
        assign_keys(items)
        out_dir = Path(args.out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the output folder {out_dir}: {e}") from None
        jsonl_path = out_dir / "answers.jsonl"
        if args.resume:
            kept = previous_answers(out_dir, args)
        elif jsonl_path.exists() and jsonl_path.stat().st_size and not args.overwrite:
            raise UsageError(f"{jsonl_path} already holds answers: --resume to go on with them, --overwrite to "
                             "start over")
        else:
            kept = {}
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
    left = sum(item.key not in kept for item in items)
    print(f"loaded {omni.path} on {device} in {time.perf_counter() - t0:.1f} s; {len(items)} questions"
          + (f", {len(items) - left} answered before, {left} to go" if args.resume else ""), file=sys.stderr)
    (out_dir / "run.json").write_text(json.dumps(run_settings(args), indent=1) + "\n", encoding="utf-8")
    progress = Progress(len(items), len(items) - left, args.progress)
    try:
        with open(jsonl_path, "a" if args.resume else "w", encoding="utf-8") as jsonl:
            failed = run_batch(batch, items, jsonl, progress, kept)
    except KeyboardInterrupt:
        print(f"\noffline_qa: interrupted after {progress.done} of {len(items)}; run again with --resume to go on",
              file=sys.stderr)
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
