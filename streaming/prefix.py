"""Prompt-prefix reuse across requests: rows that an earlier request already computed are not computed again.

What is notable here:
- Every request with speech on starts with the same rows: the official speech system prompt and the user header
  (102 of the 153 prompt tokens of `omnivox bench speech`). Both the Thinker's prompt rows and the Talker's prompt
  rows are functions of the token ids alone up to the first media placeholder (a placeholder row is an encoder
  output, and TMRoPE positions stop being 0, 1, 2, ... there). So the Thinker's keys/values and final hidden
  states, and the Talker's keys/values, of a text-only prefix can be kept and copied into the next request's cache;
  only the rows after the longest common prefix are prefilled. The result is the same computation, split in two
  chunks (as a chunked prefill is).
- At least the last prompt row is always recomputed (its logits start the reply), and a hit needs
  `min_tokens` rows in common, so a short accidental match does not cost a copy.
- A small LRU: `max_entries` prompts of at most `max_tokens` rows each (the memory it may hold is printed by
  `nbytes`). Thread-safe; the tensors handed out are copies' sources only (callers copy from them).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from omnivox.thinker.model import KVCache


@dataclass
class PrefixEntry:
    ids: Tensor                      # (n,) long: a text-only prompt prefix
    k: Tensor | None = None          # (L, 1, Hkv, n, D) Thinker keys of those rows (None: Talker rows only)
    v: Tensor | None = None          # (L, 1, Hkv, n, D)
    hidden: Tensor | None = None     # (1, n, H) Thinker final-norm hidden states
    talker_k: Tensor | None = None   # (Lt, 1, Hkv_t, m, D_t) Talker keys of its first m <= n prompt rows
    talker_v: Tensor | None = None

    @property
    def nbytes(self) -> int:
        ts = [self.k, self.v, self.hidden, self.talker_k, self.talker_v]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def text_prefix_length(ids: Tensor, media_ids: tuple[int, ...]) -> int:
    """ids (1, T) -> rows before the first media placeholder (T when there is none)."""
    row = ids[0]
    media = torch.zeros_like(row, dtype=torch.bool)
    for m in media_ids:
        media |= row == m
    hits = torch.nonzero(media)
    return int(hits[0, 0]) if hits.numel() else row.numel()


class PrefixCache:
    def __init__(self, max_entries: int = 4, max_tokens: int = 512, min_tokens: int = 8):
        self.max_entries, self.max_tokens, self.min_tokens = max_entries, max_tokens, min_tokens
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()
        self._lock = threading.Lock()
        self._serial = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def match(self, ids: Tensor, media_ids: tuple[int, ...], keep_last: bool = True, talker: bool = False,
              thinker: bool = False) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest prefix with ids (1, T), and how many rows (before any media; < T when
        `keep_last`: the Thinker recomputes the last row for its logits). `talker` / `thinker`: only entries
        holding that model's rows (and for the Talker at most as many rows as it holds)."""
        limit = min(ids.shape[1] - int(keep_last), text_prefix_length(ids, media_ids))
        best, best_n = None, 0
        with self._lock:
            for key, e in self._entries.items():
                if (talker and e.talker_k is None) or (thinker and e.k is None):
                    continue
                m = min(limit, e.ids.numel(), e.talker_k.shape[3] if talker else e.ids.numel())
                if m < self.min_tokens:
                    continue
                same = (e.ids[:m] == ids[0, :m].to(e.ids.device)).long()
                n = int(same.cumprod(0).sum())
                if n > best_n:
                    best, best_n, best_key = e, n, key
            if best is None or best_n < self.min_tokens:
                return None, 0
            self._entries.move_to_end(best_key)
        return best, best_n

    def store(self, ids: Tensor, cache: KVCache, hidden: Tensor, media_ids: tuple[int, ...]) -> PrefixEntry | None:
        """Keep the text-only prefix of a prompt whose rows [0, n) are in `cache` and `hidden` (1, >= n, H)."""
        n = min(text_prefix_length(ids, media_ids), cache.length, hidden.shape[1], self.max_tokens)
        if n < self.min_tokens:
            return None
        entry = PrefixEntry(ids=ids[0, :n].clone(), k=cache.k[:, :, :, :n].clone(), v=cache.v[:, :, :, :n].clone(),
                            hidden=hidden[:, :n].clone())
        self._add(entry)
        return entry

    def _add(self, entry: PrefixEntry) -> None:
        n = entry.ids.numel()
        with self._lock:
            for key, e in list(self._entries.items()):
                if e.ids.numel() <= n and torch.equal(e.ids, entry.ids[:e.ids.numel()]) \
                        and (e.k is None or entry.k is not None):
                    # the new entry extends this one: it takes over the Talker rows it has and lacks
                    if e.talker_k is not None and (entry.talker_k is None or
                                                   entry.talker_k.shape[3] < e.talker_k.shape[3]):
                        entry.talker_k, entry.talker_v = e.talker_k, e.talker_v
                    del self._entries[key]
            self._serial += 1
            self._entries[self._serial] = entry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    @staticmethod
    def restore(entry: PrefixEntry, n: int, cache: KVCache) -> Tensor:
        """Copy the entry's first n Thinker rows into an empty cache; returns their hidden states (1, n, H)."""
        if entry.k is None:
            raise ValueError("this prefix entry holds Talker rows only")
        cache.fill(entry.k, entry.v, n)
        return entry.hidden[:, :n]

    def talker_rows(self, ids: Tensor, media_ids: tuple[int, ...]) -> KVCache | None:
        """Talker keys/values of the longest stored prefix of ids (1, T), as a KVCache of that length, or None."""
        entry, n = self.match(ids, media_ids, keep_last=False, talker=True)
        return KVCache(entry.talker_k, entry.talker_v, n) if entry is not None else None

    def store_talker(self, ids: Tensor, cache: KVCache, rows: int, media_ids: tuple[int, ...]) -> None:
        """The Talker's first `rows` prompt rows of prompt ids (1, T) are in `cache`: keep those under the entry
        holding the same Thinker prefix (the Talker's prompt rows come from the Thinker's)."""
        entry, n = self.match(ids, media_ids, keep_last=False)
        rows = min(rows, text_prefix_length(ids, media_ids), self.max_tokens)
        if entry is not None and n >= min(rows, entry.ids.numel()):  # an entry for this prompt: attach to it
            rows = min(rows, entry.ids.numel())
            if entry.talker_k is None or entry.talker_k.shape[3] < rows:
                with self._lock:
                    entry.talker_k = cache.k[:, :, :, :rows].clone()
                    entry.talker_v = cache.v[:, :, :, :rows].clone()
        elif rows >= self.min_tokens:            # e.g. a conversation (its Thinker cache is its own)
            self._add(PrefixEntry(ids=ids[0, :rows].clone(), talker_k=cache.k[:, :, :, :rows].clone(),
                                  talker_v=cache.v[:, :, :, :rows].clone()))
