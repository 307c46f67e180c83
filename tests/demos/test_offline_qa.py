"""demos/offline_qa.py and demos/api_example.py run as a user runs them (a subprocess on a tiny checkpoint): one JSON
line and one 24 kHz WAV per question, the same turn as `omnivox ask`, CSV input, bad files reported and skipped
while the batch goes on (exit 1), bad arguments refused before any work (exit 2)."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cli_support import omnivox
from media_fixtures import write_image, write_video, write_wav

DEMOS = Path(__file__).resolve().parents[2] / "demos"
QUESTION = "What do you hear and see?"
LIMITS = ["--greedy", "--max-new-tokens", "4", "--max-codec-tokens", "24"]


def run_demo(script: str, *args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("OMNIVOX_DEBUG", None)
    return subprocess.run([sys.executable, str(DEMOS / script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_wav(path: str, seconds: float):
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.format) == (24000, 1, "WAV")
    assert info.frames > 0
    assert info.frames / 24000 == pytest.approx(seconds, abs=1e-3)


@pytest.fixture(scope="module")
def qa():
    """demos/offline_qa.py as a module (demos/ is not a package)."""
    spec = importlib.util.spec_from_file_location("demos_offline_qa", DEMOS / "offline_qa.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)   # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def media(tiny_checkpoint, tmp_path_factory):
    path, _ = tiny_checkpoint("base")
    d = tmp_path_factory.mktemp("offline_qa")
    corrupt_wav = d / "corrupt.wav"
    corrupt_wav.write_bytes(b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(range(256)) * 4)
    corrupt_mp4 = d / "corrupt.mp4"
    corrupt_mp4.write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(2000))
    return {
        "model": path, "dir": d,
        "wav": write_wav(d / "speech.wav", 1.0, sr=16000),
        "mp4": write_video(d / "clip.mp4", 10, fps=10, audio_sr=16000),
        "corrupt_wav": corrupt_wav, "corrupt_mp4": corrupt_mp4,
    }


@pytest.fixture(scope="module")
def batch(media):
    """The question mode over a WAV and a video, speech on: (process, JSON records, out dir)."""
    out = media["dir"] / "answers"
    r = run_demo("offline_qa.py", "--model", media["model"], "--question", QUESTION, media["wav"], media["mp4"],
                 "--out-dir", out, *LIMITS)
    return r, (read_jsonl(out / "answers.jsonl") if (out / "answers.jsonl").exists() else []), out


def test_question_mode_gives_one_json_line_and_one_wav_per_file(batch, media):
    r, records, out = batch
    assert r.returncode == 0, r.stderr
    assert [(x["index"], x["file"], x["kind"]) for x in records] == [(1, str(media["wav"]), "audio"),
                                                                     (2, str(media["mp4"]), "video")]
    for x in records:
        assert x["question"] == QUESTION and "error" not in x
        assert isinstance(x["answer"], str) and x["answer_tokens"] == 4 and x["finish_reason"] == "length"
        assert x["prompt_tokens"] > 20 and x["codec_tokens"] > 0
        assert set(x["timings"]) >= {"first_token_ms", "first_audio_ms", "total_ms", "wall_s"}
        assert Path(x["audio"]).parent == out.resolve()
        assert_wav(x["audio"], x["audio_seconds"])
    assert sorted(p.name for p in out.glob("*.wav")) == ["0001_speech.wav", "0002_clip.wav"]
    assert records[1]["use_audio_in_video"] is True          # the video's soundtrack is heard by default
    assert "[1/2] " in r.stderr and "[2/2] " in r.stderr and "answered 2 of 2" in r.stderr


def test_video_answer_is_the_same_turn_as_omnivox_ask(batch, media, tmp_path):
    _, records, _ = batch
    wav = tmp_path / "ask.wav"
    a = omnivox("ask", "--model", str(media["model"]), "--video", str(media["mp4"]), "--use-audio-in-video",
                "--text", QUESTION, "--json", "--out", str(wav), *LIMITS)
    assert a.returncode == 0, a.stderr
    ask, ours = json.loads(a.stdout), records[1]
    assert ours["answer"] == ask["text"] and ours["answer_tokens"] == len(ask["token_ids"])
    assert ours["prompt_tokens"] == ask["prompt_tokens"] and ours["codec_tokens"] == len(ask["codec_ids"])
    np.testing.assert_array_equal(sf.read(ours["audio"])[0], sf.read(str(wav))[0])


def test_csv_mode_reads_paths_beside_the_csv(batch, media, tmp_path):
    table = media["dir"] / "questions.csv"
    with open(table, "w", newline="") as fh:
        csv.writer(fh).writerows([["file", "question"], ["speech.wav", "Who speaks?"],
                                  ["clip.mp4", "What moves, and where?"], ["pic.png", "Which colours?"]])
    write_image(media["dir"] / "pic.png", 40, 30)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    r = run_demo("offline_qa.py", "--model", media["model"], "--csv", table, "--out-dir", "out", "--no-audio",
                 "--no-audio-in-video", *LIMITS, cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    records = read_jsonl(elsewhere / "out" / "answers.jsonl")
    assert [(x["file"], x["kind"], x["question"]) for x in records] == [
        ("speech.wav", "audio", "Who speaks?"), ("clip.mp4", "video", "What moves, and where?"),
        ("pic.png", "image", "Which colours?")]
    assert not list((elsewhere / "out").glob("*.wav")) and all("audio" not in x for x in records)
    # without its soundtrack the video's prompt is shorter than in the default run
    assert records[1]["use_audio_in_video"] is False
    assert records[1]["prompt_tokens"] < batch[1][1]["prompt_tokens"]


def test_csv_without_header_keeps_commas_in_questions(qa, media):
    table = media["dir"] / "plain.csv"
    table.write_text("# comment\nspeech.wav,Loud, or quiet?\n\n,Just text\n")
    items = qa.items_from_csv(str(table))
    assert [(i.file, i.path, i.question) for i in items] == [("speech.wav", media["wav"], "Loud, or quiet?"),
                                                             ("", None, "Just text")]
    table.write_text("speech.wav\n")
    with pytest.raises(qa.UsageError, match="line 1"):
        qa.items_from_csv(str(table))


def test_missing_and_corrupt_files_are_reported_and_the_batch_goes_on(media):
    out = media["dir"] / "mixed"
    missing = media["dir"] / "missing.wav"
    files = [media["wav"], missing, media["corrupt_wav"], media["mp4"], media["corrupt_mp4"]]
    r = run_demo("offline_qa.py", "--model", media["model"], "--question", QUESTION, *files, "--out-dir", out,
                 *LIMITS)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    records = read_jsonl(out / "answers.jsonl")
    assert [x["file"] for x in records] == [str(f) for f in files]
    for x, bad in zip(records, [False, True, True, False, True]):
        if bad:
            assert x["file"] in x["error"] and "answer" not in x
            assert f"{Path(x['file']).name} ... error: " in r.stderr
        else:
            assert "error" not in x
            assert_wav(x["audio"], x["audio_seconds"])
    assert "does not exist" in records[1]["error"]
    # no half-written WAV is left behind for the failed questions
    assert sorted(p.name for p in out.glob("*.wav")) == ["0001_speech.wav", "0004_clip.wav"]
    assert "answered 2 of 5 questions" in r.stderr and "3 failed" in r.stderr


@pytest.mark.parametrize("args, message", [
    ([], "one of the arguments --question --csv is required"),
    (["--question", "Hi"], "needs at least one FILE"),
    (["--question", "Hi", "--csv", "x.csv", "a.wav"], "not allowed with"),
    (["--csv", "nowhere.csv"], "cannot read nowhere.csv"),
    (["--question", "Hi", "a.wav", "--speaker", "Zed"], "Chelsie, Ethan"),
])
def test_bad_arguments_exit_2_with_one_line(media, args, message, tmp_path):
    r = run_demo("offline_qa.py", "--model", media["model"], *args, "--out-dir", tmp_path / "o", cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "answers.jsonl").exists()


def test_missing_model_exits_2(media, tmp_path):
    r = run_demo("offline_qa.py", "--model", tmp_path / "no_model", "--question", "Hi", media["wav"],
                 "--out-dir", tmp_path / "o")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_api_example_prints_the_answer_and_saves_speech(media, tmp_path):
    wav = tmp_path / "answer.wav"
    r = run_demo("api_example.py", "--model", media["model"], media["wav"], "What is this?", "--out", wav,
                 "--max-new-tokens", "4", "--max-codec-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert f"-> {wav}]" in r.stdout and "tokens and" in r.stdout
    assert sf.info(str(wav)).samplerate == 24000 and sf.info(str(wav)).frames > 0


def test_kind_comes_from_the_content_when_the_extension_says_nothing(qa, media, tmp_path):
    silent = write_video(tmp_path / "silent.mp4", 4, fps=10)
    for name, source, expected in [("sound", media["wav"], ("audio", True)), ("movie", media["mp4"], ("video", True)),
                                   ("quiet", silent, ("video", False))]:
        (tmp_path / name).write_bytes(source.read_bytes())
        assert qa.media_kind(tmp_path / name) == expected
    assert qa.media_kind(write_image(tmp_path / "pic.png", 8, 8)) == ("image", False)
    (tmp_path / "picture").write_bytes((tmp_path / "pic.png").read_bytes())
    assert qa.media_kind(tmp_path / "picture") == ("image", False)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="cannot tell"):
        qa.media_kind(tmp_path / "notes.txt")


def test_a_folder_stands_for_the_media_files_in_it(qa, media, tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.wav", "sub/a.mp4", ".hidden.wav", "notes.txt"]:
        (tmp_path / name).write_bytes(media["wav"].read_bytes())
    items = qa.items_from_files([str(tmp_path), str(media["mp4"])], "Q?")
    assert [i.path for i in items] == [tmp_path / "b.wav", tmp_path / "sub" / "a.mp4", media["mp4"]]
    assert {i.question for i in items} == {"Q?"}
