"""Text side of the Thinker: byte-level BPE tokenizer, chat template and a streaming detokenizer.

Notable:
- `Tokenizer.from_dir` reads `tokenizer.json`, or builds the same byte-level BPE from `vocab.json` + `merges.txt`
  (Qwen2 pre-tokenizer, added tokens from `tokenizer_config.json` at the ids it lists). Ids equal the reference
  tokenizer's; special tokens written in the text encode to their single ids.
- The chat template is rendered the way `apply_chat_template` renders it (sandboxed jinja2, trim/lstrip blocks,
  `loopcontrols`, `raise_exception`, `tojson` without ASCII escaping, `strftime_now`). A checkpoint without a
  template gets the official Qwen2.5-Omni one (`OMNI_CHAT_TEMPLATE`).
- `IncrementalDetokenizer` turns ids into text deltas in O(token length) per step: it maps each id to its raw
  bytes (the inverse of the GPT-2 byte-to-unicode table) and feeds them to an incremental UTF-8 decoder, so a
  character split over several tokens is held back until it is complete (never a U+FFFD for an incomplete tail)
  and the concatenated deltas equal `Tokenizer.decode` of all ids.
"""

from __future__ import annotations

import codecs
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

# Qwen2 pre-tokenizer split (contractions, letters, single digits, punctuation runs, newlines, spaces).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The official Qwen2.5-Omni chat template (chat_template.json of the released checkpoints).
OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_CHAR_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _token_content(value) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _bpe_from_vocab_merges(vocab_path: Path, merges_path: Path, config: dict) -> tokenizers.Tokenizer:
    """Qwen2 byte-level BPE from vocab.json + merges.txt, added tokens at the ids tokenizer_config.json lists."""
    vocab = _read_json(vocab_path)  # the caller checked it exists
    merges = []
    for n, line in enumerate(merges_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{merges_path}:{n}: expected two tokens separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))

    added = []  # (id, AddedToken)
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = _token_content(entry)
        if content is None:
            raise ValueError(f"tokenizer_config.json: added_tokens_decoder[{key}] has no content")
        added.append((int(key), AddedToken(
            content, single_word=bool(entry.get("single_word", False)), lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)), normalized=bool(entry.get("normalized", False)),
            special=bool(entry.get("special", False)))))
    # Put the added tokens into the model vocabulary at their ids first: the added vocabulary then reuses those ids
    # instead of numbering them from the end of the vocabulary (which would go wrong on any gap).
    for tid, tok in sorted(added, key=lambda a: a[0]):
        if vocab.get(tok.content, tid) != tid:
            raise ValueError(f"added token {tok.content!r} has id {tid} but vocab.json gives it {vocab[tok.content]}")
        vocab[tok.content] = tid

    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                          continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                          byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for _, t in sorted(added, key=lambda a: a[0]):
        (tok.add_special_tokens if t.special else tok.add_tokens)([t])
    # Named special tokens (eos_token, audio_token, ...) that only live in vocab.json are special too, as in HF.
    named = {_token_content(v) for k, v in config.items() if k.endswith("_token")}
    have = {t.content for _, t in added}
    extra = [n for n in named if n and n not in have and n in vocab]
    if extra:
        tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in sorted(extra)])
    return tok


def find_chat_template(path: Path, config: dict | None = None) -> tuple[str, str]:
    """(template, where it came from): chat_template.jinja, chat_template.json, processor_config.json,
    tokenizer_config.json (`config`: its contents, read here when None); else the built-in ("built-in")."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), jinja_file.name
    for name in ("chat_template.json", "processor_config.json"):
        data = _read_json(path / name)
        if data is not None and isinstance(data.get("chat_template"), str):
            return data["chat_template"], name
    if config is None:
        config = _read_json(path / "tokenizer_config.json") or {}
    template = config.get("chat_template")
    if isinstance(template, str):
        return template, "tokenizer_config.json"
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"], "tokenizer_config.json"
        raise ValueError(f"tokenizer_config.json lists chat templates {sorted(map(str, named))} but none is 'default'")
    return OMNI_CHAT_TEMPLATE, "built-in"


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON (as in HF)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _plain(value):
    """What the template may see: JSON-like data only; anything else (arrays, tensors) becomes "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    # subclasses (enums, numpy scalars) reduced to the base type, so the template sees no extra methods
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return _plain(value.item())
    return f"<{type(value).__name__}>"


class Tokenizer:
    """Byte-level BPE tokenizer plus the checkpoint's chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, chat_template: str = OMNI_CHAT_TEMPLATE,
                 template_tokens: dict[str, str] | None = None):
        self.backend = backend
        self.chat_template = chat_template
        self.template_tokens = dict(template_tokens or {})  # eos_token, pad_token, ...: visible to the template
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self._bytes: dict[int, bytes] = {}
        self._template = None

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"tokenizer directory {path} does not exist")
        config = _read_json(path / "tokenizer_config.json") or {}
        tok_file, vocab_file, merges_file = path / "tokenizer.json", path / "vocab.json", path / "merges.txt"
        if tok_file.is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(tok_file))
            except Exception as e:  # the tokenizers library raises plain Exception
                raise ValueError(f"{tok_file} could not be read: {e}") from None
        elif vocab_file.is_file() and merges_file.is_file():
            backend = _bpe_from_vocab_merges(vocab_file, merges_file, config)
        else:
            missing = [f.name for f in (vocab_file, merges_file) if not f.is_file()]
            raise ValueError(f"{path} has no tokenizer: tokenizer.json is missing, and so is "
                             f"{' and '.join(missing)} (a tokenizer needs tokenizer.json or vocab.json + merges.txt)")
        template_tokens = {k: c for k, v in config.items()
                           if k.endswith("_token") and (c := _token_content(v)) is not None}
        return cls(backend, find_chat_template(path, config)[0], template_tokens)

    # ---- ids <-> text

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a string, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token, as the byte-level decoder produces them (b"" for an id without a token)."""
        b = self._bytes.get(token_id)
        if b is None:
            token = self.backend.id_to_token(token_id)
            if token is None:
                b = b""
            elif all(c in _CHAR_TO_BYTE for c in token):
                b = bytes(_CHAR_TO_BYTE[c] for c in token)
            else:  # an added token written as plain text (the byte-level decoder passes it through as UTF-8)
                b = token.encode("utf-8")
            self._bytes[token_id] = b
        return b

    # ---- chat template

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    add_vision_id: bool = False, add_audio_id: bool = False) -> str:
        """The prompt text for a conversation, as `apply_chat_template(..., tokenize=False)` renders it."""
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of dicts like {'role': 'user', 'content': ...}")
        for m in messages:
            if "role" not in m or "content" not in m:
                raise ValueError(f"each message needs 'role' and 'content', got keys {sorted(m)}")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                               extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            try:
                self._template = env.from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise ValueError(f"chat template does not compile: {e}") from None
        try:
            return self._template.render(
                messages=_plain(list(messages)), add_generation_prompt=add_generation_prompt,
                add_vision_id=add_vision_id, add_audio_id=add_audio_id, tools=None, documents=None,
                **self.template_tokens)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from None


class IncrementalDetokenizer:
    """Ids in, text deltas out; a UTF-8 character split across tokens comes out once its last byte arrives."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        if not tokenizer.byte_level:
            raise ValueError("streaming detokenization needs a byte-level BPE tokenizer (decoder type ByteLevel)")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # holds at most the 1-3 bytes of an incomplete character; invalid bytes become U+FFFD as in decode()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """The rest (a U+FFFD if the ids ended inside a character); the detokenizer is reset afterwards."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
