"""demos/offline_qa.py and demos/api_example.py run as a user runs them (a subprocess on a tiny checkpoint): one JSON
line and one 24 kHz WAV per question, the same turn as `omnivox ask`, CSV and JSONL manifests, bad files reported
and skipped while the batch goes on (exit 1), an interrupted batch resumed to the same answers, bad arguments
refused before any work (exit 2)."""

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from io import StringIO
from types import SimpleNamespace
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


def test_csv_manifest_reads_paths_beside_it(batch, media, tmp_path):
    table = media["dir"] / "questions.csv"
    with open(table, "w", newline="") as fh:
        csv.writer(fh).writerows([["file", "question"], ["speech.wav", "Who speaks?"],
                                  ["clip.mp4", "What moves, and where?"], ["pic.png", "Which colours?"]])
    write_image(media["dir"] / "pic.png", 40, 30)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    r = run_demo("offline_qa.py", "--model", media["model"], "--manifest", table, "--out-dir", "out", "--no-audio",
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
    items = qa.items_from_manifest(str(table))
    assert [(i.files, i.paths, i.question) for i in items] == [(["speech.wav"], [media["wav"]], "Loud, or quiet?"),
                                                               ([], [], "Just text")]
    table.write_text("speech.wav\n")
    with pytest.raises(qa.UsageError, match="line 1"):
        qa.items_from_manifest(str(table))


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
    ([], "one of the arguments --question --manifest is required"),
    (["--question", "Hi"], "needs at least one FILE"),
    (["--question", "Hi", "--manifest", "x.csv", "a.wav"], "not allowed with"),
    (["--manifest", "nowhere.csv"], "cannot read nowhere.csv"),
    (["--question", "Hi", "a.wav", "--resume", "--overwrite"], "not allowed with"),
    (["--question", "Hi", "a.wav", "--greedy", "--temperature", "0.7"], "not allowed with"),
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
    assert [i.paths for i in items] == [[tmp_path / "b.wav"], [tmp_path / "sub" / "a.mp4"], [media["mp4"]]]
    assert {i.question for i in items} == {"Q?"}


@pytest.fixture(scope="module")
def twenty(media):
    """A JSONL manifest over 20 generated files (audio, images, videos; one two-file row, one row with its own
    system prompt), the 10th file broken."""
    d = media["dir"] / "twenty"
    d.mkdir()
    rows = []
    for i in range(1, 21):
        kind = ("wav", "png", "mp4", "flac")[i % 4]
        name = f"f{i:02d}.{kind}"
        if i == 10:
            (d / name).write_bytes(b"RIFF\x24\x08\x00\x00WAVEfmt " + os.urandom(300))
        elif kind == "png":
            write_image(d / name, 20 + i, 16 + i, seed=i)
        elif kind == "mp4":
            write_video(d / name, 6 + i % 3, fps=10, audio_sr=16000)
        else:
            write_wav(d / name, 0.3 + 0.05 * i, sr=(16000, 22050)[i % 2], freq=200.0 + 30 * i)
        row = {"id": f"q{i:02d}", "file": name, "question": f"Question {i}: what is in it?"}
        if i == 7:
            row = {"id": "q07", "files": [name, "f01.png" if (d / "f01.png").exists() else "f02.png"],
                   "question": "Compare these two."}
        if i == 13:
            row["system"] = "You are a terse assistant."
        rows.append(row)
    manifest = d / "questions.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _wait_for_lines(path: Path, n: int, proc, timeout=240):
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {n} lines (exit {proc.poll()})")


def test_manifest_of_20_files_one_broken_interrupted_and_resumed(media, twenty, tmp_path):
    common = ["--model", media["model"], "--manifest", twenty, *LIMITS]
    full = tmp_path / "full"
    r = run_demo("offline_qa.py", *common, "--out-dir", full)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    expected = read_jsonl(full / "answers.jsonl")
    assert [x["id"] for x in expected] == [f"q{i:02d}" for i in range(1, 21)]
    assert [x["index"] for x in expected] == list(range(1, 21))
    broken = [x for x in expected if "error" in x]
    assert [x["id"] for x in broken] == ["q10"] and "f10.mp4" in broken[0]["error"]
    assert "answered 19 of 20 questions" in r.stderr and "1 failed" in r.stderr
    for x in expected:
        if "error" not in x:
            assert_wav(x["audio"], x["audio_seconds"])
            assert set(x["timings"]) >= {"first_token_ms", "first_audio_ms", "total_ms", "wall_s"}
    assert expected[6]["kinds"] == ["audio", "image"] and "file" not in expected[6]       # the two-file row
    assert expected[12]["system"] == "You are a terse assistant."
    # its own system prompt is shorter than the speech prompt the other rows get
    assert expected[12]["prompt_tokens"] < expected[16]["prompt_tokens"]

    # the same batch interrupted (Ctrl-C) after a few answers, then resumed
    out = tmp_path / "cut"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("OMNIVOX_DEBUG", None)
    proc = subprocess.Popen([sys.executable, str(DEMOS / "offline_qa.py"), *map(str, common), "--out-dir", str(out)],
                            stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_lines(out / "answers.jsonl", 5, proc)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "--resume" in err and "Traceback" not in err, err
    before = (out / "answers.jsonl").read_text().splitlines()
    assert 5 <= len(before) < 20
    # no WAV of the question the interruption cut off is left half-written
    assert len(list(out.glob("*.wav"))) == sum("audio" in json.loads(x) for x in before)

    again = run_demo("offline_qa.py", *common, "--out-dir", out)
    assert again.returncode == 2 and "--resume" in again.stderr          # answers are never overwritten silently
    other = run_demo("offline_qa.py", *common, "--out-dir", out, "--resume", "--max-new-tokens", "5")
    assert other.returncode == 2 and "max_new_tokens" in other.stderr

    resumed = run_demo("offline_qa.py", *common, "--out-dir", out, "--resume")
    assert resumed.returncode == 1, resumed.stderr
    n_before = sum("error" not in json.loads(x) for x in before)
    assert f"{n_before} answered before, {20 - n_before} to go" in resumed.stderr
    records = read_jsonl(out / "answers.jsonl")
    answered_before = [json.loads(x) for x in before if "error" not in json.loads(x)]
    assert records[:len(answered_before)] == answered_before              # kept as they were
    by_id = {x["id"]: x for x in records}
    assert len(records) == 20 and sorted(by_id) == [x["id"] for x in expected]
    for x in expected:
        y = by_id[x["id"]]
        assert ("error" in y) == ("error" in x)
        if "error" not in x:
            assert (y["answer"], y["prompt_tokens"], y["codec_tokens"]) == (x["answer"], x["prompt_tokens"],
                                                                            x["codec_tokens"])
            np.testing.assert_array_equal(sf.read(y["audio"])[0], sf.read(x["audio"])[0])
    # a second resume finds everything answered except the broken file, which it tries again
    last = run_demo("offline_qa.py", *common, "--out-dir", out, "--resume")
    assert last.returncode == 1 and "19 answered before, 1 to go" in last.stderr


def test_sampling_flags_are_the_ones_of_omnivox_ask(qa):
    args = qa.parse_args(["--model", "m", "--question", "Q", "a.wav", "--temperature", "0.7", "--top-p", "0.9",
                          "--top-k", "20", "--seed", "3", "--repetition-penalty", "1.2", "--talker-codec-prompt",
                          "--fast-start"])
    batch = qa.Batch(SimpleNamespace(config=SimpleNamespace(generation={}, family="qwen2_5")), args)
    s, t = batch.options.sampling, batch.options.talker_sampling
    assert (s.greedy, s.temperature, s.top_p, s.top_k, s.seed, s.repetition_penalty) == (False, 0.7, 0.9, 20, 3, 1.2)
    assert (t.seed, t.repetition_penalty) == (3, 1.2)
    assert batch.options.talker_codec_prompt and batch.options.token2wav.first_steps == 4
    greedy = qa.Batch(SimpleNamespace(config=SimpleNamespace(generation={}, family="qwen2_5")),
                      qa.parse_args(["--model", "m", "--question", "Q", "a.wav", "--greedy"]))
    assert greedy.options.sampling.greedy and greedy.options.talker_sampling.greedy
    assert greedy.options.token2wav is None


def test_progress_bar_on_a_terminal(qa):
    stream = StringIO()
    bar = qa.Progress(total=20, skipped=5, mode="bar", stream=stream)
    item = qa.Item(["clip.mp4"], [Path("clip.mp4")], "Q")
    bar.start(6, item)
    bar.finish(item, "1.0 s", ok=True)
    bar.start(7, item)
    bar.finish(item, "error: broken", ok=False)
    bar.close()
    text = stream.getvalue()
    assert "\r[" in text and " 5/20 " in text and " 7/20 " in text and "1 failed" in text and "eta " in text
    assert "clip.mp4: error: broken\n" in text                            # an error stays above the bar
    lines = qa.Progress(total=2, skipped=0, mode="lines", stream=StringIO())
    lines.start(1, item)
    lines.finish(item, "0.5 s (4 tokens)", ok=True)
    assert lines.stream.getvalue() == "[1/2] clip.mp4 ... 0.5 s (4 tokens)\n"


def test_manifest_rows_are_checked_before_any_work(qa, tmp_path):
    bad = [('{"file": "a.wav"}', "question is missing"), ('{"files": "a.wav", "question": "Q"}', None),
           ('[1, 2]', "expected an object"), ('{"file": "a", "files": ["b"], "question": "Q"}', "not both"),
           ('{"files": [1], "question": "Q"}', "list of paths"), ('nonsense {', None)]
    for line, message in bad:
        path = tmp_path / "m.jsonl"
        path.write_text('{"file": "ok.wav", "question": "fine"}\n' + line + "\n")
        if message is None and line.startswith('{"files": "a.wav"'):
            assert [i.files for i in qa.items_from_manifest(str(path))] == [["ok.wav"], ["a.wav"]]
            continue
        with pytest.raises(qa.UsageError, match="line 2" if message is None else message):
            qa.items_from_manifest(str(path))
    dup = tmp_path / "d.jsonl"
    dup.write_text('{"id": "x", "question": "A"}\n{"id": "x", "question": "B"}\n')
    with pytest.raises(qa.UsageError, match="'x' is given to more than one"):
        qa.assign_keys(qa.items_from_manifest(str(dup)))
    twice = [qa.Item(["a.wav"], [Path("a.wav")], "Q"), qa.Item(["a.wav"], [Path("a.wav")], "Q")]
    qa.assign_keys(twice)
    assert twice[0].key != twice[1].key and twice[1].key.endswith("#2")
    table = tmp_path / "m.csv"
    table.write_text("id,files,question,system\nr1,a.wav; b.png,Both?,Be brief.\nr2,,Text only?,\n")
    items = qa.items_from_manifest(str(table))
    assert [(i.id, i.files, i.question, i.system) for i in items] == [
        ("r1", ["a.wav", "b.png"], "Both?", "Be brief."), ("r2", [], "Text only?", None)]
