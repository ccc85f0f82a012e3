"""Chat encoding per turn at the cost of the new tokens, not of the whole conversation.

A follow-up turn resends the whole conversation. `ChatEncoder.encode(messages, key)` returns the
same tokens and boundaries as `Tokenizer.encode_chat(messages)`, always. For each conversation key
it keeps what the previous turn produced and reuses it:

- **Tokens.** The new rendering T is compared with the previous one P (a C-speed string compare),
  which gives `same`, the length of their common prefix. A *cut* is an offset c where P's
  tokenization placed a verbatim added token (`AddedTokens.verbatim`: matched in the raw text,
  never normalized, no strip or single-word rule) that spans exactly its content, with every
  earlier token ending at or before c. Fast tokenizers split the input on added tokens before
  anything else, and the split decisions up to and including the token at c depend only on the
  text up to c + `max_len` (the longest added token). So when c + max_len <= same, T also splits
  at c and tokens(T) = tokens(P)[:j] + tokens(T[c:]), with T[c:]'s offsets shifted by c. Only T[c:]
  is tokenized. The cuts are read from the stored offsets, never assumed.
- **Boundaries.** Message i's boundary depends on r_i = render(messages[:i+1]) only through
  c_i = common_prefix(r_i, text). The previous turn's c_i still holds when messages[:i+1] are
  unchanged (each kept as its role and text, or as a 16-byte BLAKE2b digest when it has more than a
  role and a text: `_Kept`) and either c_i < same, or r_i was a whole
  prefix of P and c_i <= same. Only the other messages are rendered. Normally that is the two new
  ones, the reply and the next question.

- **The previous answer's own ids** (`answer_ids=True`, off by default; `answered`). A chat client sends the
  model's answer back as text, and that text need not re-tokenize to the ids the model generated: a
  byte-level BPE splits it otherwise, or a random-weight model's answer holds invalid UTF-8. The follow-up
  then misses the checkpoint the answer ended at and prefills the answer again. With `answer_ids`, when the
  new rendering T starts with the whole previous rendering P followed by the text of an answer `answered`
  recorded for P, the tokens are P's, then that answer's ids as generated, then T's rest tokenized on its
  own: what the model saw when it wrote the answer. This is the one case where `encode` differs from
  `encode_chat`, and the tokens then depend on this encoder's memory of the conversation.

Everything else falls back to the full computation, which gives the same result as
`encode_chat`: no entry for the key, a different conversation, an edit before the cut, a slow
tokenizer (no offsets, so no cut), a rendering without added tokens (for example the fallback
ChatML template on a vocabulary without `<|im_start|>`). A regenerate or an edit of message 3 of
10 reuses what comes before the change. Rendering is assumed to be a pure function of the messages and
the template variables (`template_kwargs`). Message boundaries are not reused for a template that calls
`strftime_now`, nor when `template_kwargs` differ from the previous turn's (an entry is reused only for
the same variables; `add_generation_prompt` and `continue_final_message` change only the full rendering,
which is compared as text anyway).

Cost per turn: one render of the whole conversation (jinja, about 0.1 ms for 200 messages), C-speed
compares and copies of the stored prefix, tokenization of T[c:], one render per new message, and
a tuple (or a digest) and a bisect per message. Tokenization dominated, and it is now O(new tokens): 2.6 ms
against 55 ms for 200 messages and 29k tokens (`bench/chat_encode_cpu.py`). Without a cut (no
added tokens in the rendering) the whole rendering is tokenized each turn. That is C-speed but
O(conversation), and only the O(messages) prefix renders are saved.

Memory per conversation: its last rendering (1, 2 or 4 bytes per character, set by the widest
character), 8 bytes per token (id and end offset, `array('i')`), the ids again as the tuple of Python ints
the turn returned (counted as 40 bytes per token: a reference and an int object, which the next turn's tuple
shares), 8 bytes per cut (about two per message), each message's text (kept for the next turn's compare,
1 byte per character of English) and about 110 bytes per message, and about 0.5 KiB fixed. That is about
57 bytes per token for English text. With `answer_ids`, also the last turn's answers: their text and
4 bytes per id. The LRU is bounded by `max_bytes` (256 MiB: ~5M tokens) and
`max_conversations`. An entry larger than `max_bytes` is not kept.

Thread safety: one lock guards the LRU and the counters. Entries never change once built, and two
requests of one conversation may run at once (the later store wins). Tokenizer calls are serialized
by `Tokenizer`'s own lock, except a long text's pieces (`parallel_encode`), which go through a backend
copy that needs none.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import Any

from cache.prefix import common_prefix_len
from server.model.tokenizer import (
    ChatTemplateError,
    Message,
    Spans,
    Tokenizer,
    normalize_message,
)

Cancelled = Callable[[], bool]
Render = Callable[..., str]  # `Tokenizer.render_chat` with the request's template variables bound
_DIGEST = 16  # bytes per message digest
_KEPT_OVERHEAD = 64  # bytes per kept (role, text) besides the text's own: the 2-tuple and its reference
_ROLE_CONTENT = {"role": None, "content": None}.keys()
MAX_RENDERS = 48  # prefix renders per turn at most (message boundaries: `_render_subset`)
_ENTRY_OVERHEAD = 512  # bytes: the entry, its arrays' headers, the LRU slot
_ID_BYTES = 40  # a prompt tuple's reference and, at most, its int object, per token


class EncodeCancelled(Exception):
    """The caller's `cancelled()` turned true (the client went away); the work was dropped."""


class PromptTooLong(ValueError):
    """The prompt has more tokens than `max_tokens` (for the API: 400 context_length_exceeded)."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"the prompt has {tokens} tokens, more than the limit of {limit}")
        self.tokens = tokens
        self.limit = limit


@dataclass(frozen=True)
class ChatEncoding:
    tokens: tuple[int, ...]  # the leading `reused_tokens` are the previous turn's own int objects
    boundaries: list[int]  # ascending, deduplicated, in [1, len(tokens)], as `encode_chat`
    reused_tokens: int  # leading tokens taken from the previous turn without tokenizing
    rendered_prefixes: int  # partial renderings made for boundaries (the rest were reused)
    answer_tokens: int = 0  # the previous answer's own ids, right after the reused tokens (`answered`)


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer the model gave to a turn: the text the client received, and the ids whose text it is."""

    text: str
    ids: array[int]


@dataclass(frozen=True)
class ChatEncoderStats:
    conversations: int
    nbytes: int
    hits: int  # encodes that reused tokens of a previous turn
    misses: int  # encodes with a key that tokenized everything


@dataclass(frozen=True, slots=True)
class _Tokens:
    """A rendering's token ids, end offsets (running maximum) and cuts, all `array('i')`."""

    ids: array[int]
    ends: array[int]
    cut_chars: array[int]  # ascending offsets where a verbatim added token starts a safe split
    cut_index: array[int]  # the index of that token

    @classmethod
    def empty(cls) -> _Tokens:
        return cls(array("i"), array("i"), array("i"), array("i"))

    def head(self, n: int) -> _Tokens:
        """The first n tokens, with their cuts."""
        k = bisect_right(self.cut_index, n - 1)
        return _Tokens(self.ids[:n], self.ends[:n], self.cut_chars[:k], self.cut_index[:k])

    def best_cut(self, same: int, max_len: int) -> tuple[int, int] | None:
        """The last (offset, token index) cut c > 0 with c + max_len <= same, if any."""
        k = bisect_right(self.cut_chars, same - max_len) - 1
        return (self.cut_chars[k], self.cut_index[k]) if k >= 0 and self.cut_chars[k] > 0 else None

    @property
    def nbytes(self) -> int:
        return sum(a.itemsize * len(a) for a in (self.ids, self.ends, self.cut_chars, self.cut_index))


@dataclass(frozen=True, slots=True)
class _Entry:
    """What one turn of a conversation produced."""

    text: str  # the rendering
    tokens: _Tokens
    messages: tuple[_Kept, ...]  # what the next turn compares its messages with (`_kept`)
    variables: bytes  # digest of the template variables (`template_kwargs`) it was rendered with
    chars: array[int]  # per message: common prefix of its partial rendering with `text` (-1: refused)
    whole: bytes  # per message: 1 when its partial rendering is a prefix of `text`
    prompt: tuple[int, ...]  # the ids as the tuple this turn returned (`_prompt_ids`)
    answers: tuple[Answer, ...] = ()  # what the model answered to this turn (`ChatEncoder.answered`)
    messages_nbytes: int = field(init=False, repr=False)  # `_kept_nbytes(messages)`, summed once

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages_nbytes", _kept_nbytes(self.messages))

    @property
    def nbytes(self) -> int:
        parts = (
            len(self.variables)
            + len(self.whole)
            + self.chars.itemsize * len(self.chars)
            + self.messages_nbytes
        )
        ids = _ID_BYTES * len(self.prompt)
        answers = sum(sys.getsizeof(a.text) + a.ids.itemsize * len(a.ids) for a in self.answers)
        return sys.getsizeof(self.text) + self.tokens.nbytes + parts + ids + answers + _ENTRY_OVERHEAD

    def reusable(self, i: int, same: int) -> bool:
        """Message i's common-prefix length is unchanged against a text that shares `same` chars."""
        c = self.chars[i]
        return c < 0 or c < same or (c == same and bool(self.whole[i]))


class ChatEncoder:
    """`Tokenizer.encode_chat` with per-conversation reuse of the previous turn (see the module)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        max_bytes: int = 256 << 20,
        max_conversations: int = 1024,
        answer_ids: bool = False,
    ) -> None:
        """`answer_ids`: a follow-up takes the previous answer's own ids (see the module; `answered`)."""
        if max_bytes < 0 or max_conversations < 0:
            raise ValueError("max_bytes and max_conversations must be >= 0")
        self.tokenizer = tokenizer
        self.answer_ids = answer_ids
        self.max_bytes = max_bytes
        self.max_conversations = max_conversations
        added = tokenizer.added_tokens()
        self._verbatim = dict(added.verbatim) if added else {}
        self._max_len = added.max_len if added else 0
        self._pure = "strftime_now" not in tokenizer.chat_template
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._nbytes = self._hits = self._misses = 0

    def encode(
        self,
        messages: Sequence[Message],
        key: Hashable | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
        cancelled: Cancelled | None = None,
        max_tokens: int | None = None,
    ) -> ChatEncoding:
        """(tokens, boundaries) equal to `Tokenizer.encode_chat` with the same messages and options, except
        where the previous answer's own ids are taken (`answer_ids`, `answered`).

        `key` names the conversation (None: no reuse, nothing stored). `cancelled` is polled between
        expensive steps, and `EncodeCancelled` is raised once it returns true (an Event's `is_set`
        works). `PromptTooLong` is raised once the prompt is known to exceed `max_tokens`, before
        any boundary is computed. Template errors raise `ChatTemplateError`."""
        if not messages:
            raise ChatTemplateError("messages must not be empty")
        msgs = [normalize_message(m) for m in messages]
        _check(cancelled)
        variables = _digest({"template_kwargs": dict(template_kwargs or {})})
        render = functools.partial(self.tokenizer.render_chat, template_kwargs=template_kwargs)
        text = render(msgs, add_generation_prompt, continue_final_message=continue_final_message)
        prev = self._lookup(key, variables)
        same = common_prefix_len(text, prev.text) if prev else 0
        _check(cancelled)
        answer = self._answer_in(text, prev, same)
        if prev is not None and answer is not None:
            tokens, reused = self._after_answer(text, prev, answer), len(prev.tokens.ids)
        else:
            tokens, reused = self._tokenize(text, prev, same)
        if max_tokens is not None and len(tokens.ids) > max_tokens:
            raise PromptTooLong(len(tokens.ids), max_tokens)
        kept = tuple(_kept(m) for m in msgs)
        chars, whole, rendered = self._message_chars(msgs, kept, text, prev, same, cancelled, render)
        boundaries = sorted({bisect_right(tokens.ends, c) for c in chars if c >= 0} - {0})
        prompt = _prompt_ids(tokens, prev, reused)
        if key is not None:
            self._store(key, _Entry(text, tokens, kept, variables, chars, whole, prompt), hit=reused > 0)
        return ChatEncoding(prompt, boundaries, reused, rendered, len(answer.ids) if answer else 0)

    def answered(self, key: Hashable, prompt: tuple[int, ...], answers: Sequence[Answer]) -> bool:
        """Record what the model answered to the turn of conversation `key` whose prompt `encode` returned as
        `prompt` (the very tuple): each answer's text as the client received it and the ids whose text it
        is (without a stop token). False, and nothing kept, when `answer_ids` is off or the key's last turn
        is another one by now."""
        if not self.answer_ids:
            return False
        kept = tuple(a for a in answers if a.text)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.prompt is not prompt:
                return False
            updated = replace(entry, answers=kept)
            self._nbytes += updated.nbytes - entry.nbytes
            self._entries[key] = updated
            self._evict()
        return True

    def forget(self, key: Hashable) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            self._nbytes -= entry.nbytes if entry else 0

    def stats(self) -> ChatEncoderStats:
        with self._lock:
            return ChatEncoderStats(len(self._entries), self._nbytes, self._hits, self._misses)

    # ---- tokens -----------------------------------------------------------------------------

    def _answer_in(self, text: str, prev: _Entry | None, same: int) -> Answer | None:
        """The longest recorded answer of `prev` whose text follows all of prev's rendering in `text`."""
        if prev is None or not prev.answers or same != len(prev.text) or len(text) <= same:
            return None
        if not self.tokenizer.has_offsets:
            return None  # a slow tokenizer gives no offsets, so the rest cannot be tokenized on its own
        found = [a for a in prev.answers if text.startswith(a.text, same)]
        return max(found, key=lambda a: len(a.text)) if found else None

    def _after_answer(self, text: str, prev: _Entry, answer: Answer) -> _Tokens:
        """prev's tokens, the answer's ids (each ending where the answer's text ends), then the rest of `text`
        tokenized on its own."""
        end = len(prev.text) + len(answer.text)
        head = prev.tokens
        spliced = _Tokens(
            head.ids + answer.ids,
            head.ends + array("i", [end]) * len(answer.ids),
            head.cut_chars,
            head.cut_index,
        )
        return self._append(spliced, text, end) if end < len(text) else spliced

    def _tokenize(self, text: str, prev: _Entry | None, same: int) -> tuple[_Tokens, int]:
        """The rendering's tokens and how many leading ones came from `prev` untokenized."""
        if prev is not None and same == len(text) == len(prev.text):
            return prev.tokens, len(prev.tokens.ids)  # the same rendering: the same tokens
        cut = prev.tokens.best_cut(same, self._max_len) if prev else None
        if prev is None or cut is None:
            return self._append(_Tokens.empty(), text, 0), 0
        return self._append(prev.tokens.head(cut[1]), text, cut[0]), cut[1]

    def _append(self, head: _Tokens, text: str, start: int) -> _Tokens:
        """`head` (the tokens of text[:start]) followed by the tokens of text[start:]."""
        encoded = self.tokenizer.encode_offsets(text[start:])
        if encoded is None:  # a slow tokenizer: no offsets, no cuts (start is always 0 here)
            ids, ends = self.tokenizer.encode_with_ends(text)
            return _Tokens(array("i", ids), array("i", ends), array("i"), array("i"))
        ids, spans = encoded
        raw_ends = [e + start for _, e in spans] if start else [e for _, e in spans]
        ends = list(accumulate(raw_ends, max, initial=head.ends[-1] if head.ends else 0))
        cuts = self._cuts(text, ids, spans, ends, start) if self._verbatim else []
        return _Tokens(
            head.ids + array("i", ids),
            head.ends + array("i", ends[1:]),
            head.cut_chars + array("i", (c for c, _ in cuts)),
            head.cut_index + array("i", (len(head.ids) + k for _, k in cuts)),
        )

    def _cuts(
        self, text: str, ids: list[int], spans: Spans, ends: list[int], start: int
    ) -> list[tuple[int, int]]:
        """(offset, index) of each verbatim added token spanning exactly its content, after every
        earlier token ended. `ends` holds the running end before each token, then after each."""
        out = []
        for k in (k for k, t in enumerate(ids) if t in self._verbatim):
            content, at = self._verbatim[ids[k]], spans[k][0] + start
            exact = spans[k][1] - spans[k][0] == len(content) and text.startswith(content, at)
            if exact and ends[k] <= at:
                out.append((at, k))
        return out

    # ---- boundaries -------------------------------------------------------------------------

    def _message_chars(
        self,
        msgs: list[dict[str, Any]],
        kept_msgs: tuple[_Kept, ...],
        text: str,
        prev: _Entry | None,
        same: int,
        cancelled: Cancelled | None,
        render: Render,
    ) -> tuple[array[int], bytes, int]:
        """Per message: common prefix of its partial rendering with `text`, whether whole; renders."""
        kept = common_prefix_len(kept_msgs, prev.messages) if prev and self._pure else 0
        reuse = [prev is not None and i < kept and prev.reusable(i, same) for i in range(len(msgs))]
        chosen = _render_subset([i for i, r in enumerate(reuse) if not r])
        chars, whole, rendered = array("i"), bytearray(), 0
        for i in range(len(msgs)):
            if prev is not None and reuse[i]:
                chars.append(prev.chars[i])
                whole.append(prev.whole[i])
                continue
            if i not in chosen:  # over the render budget: no boundary at this message
                chars.append(-1)
                whole.append(0)
                continue
            _check(cancelled)
            c, w = _prefix_chars(render, msgs[: i + 1], text)
            chars.append(c)
            whole.append(w)
            rendered += 1
        return chars, bytes(whole), rendered

    # ---- LRU --------------------------------------------------------------------------------

    def _lookup(self, key: Hashable | None, variables: bytes) -> _Entry | None:
        """The key's previous turn, if it was rendered with the same template variables."""
        if key is None:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        return entry if entry is not None and entry.variables == variables else None

    def _store(self, key: Hashable, entry: _Entry, hit: bool) -> None:
        size = entry.nbytes
        with self._lock:
            self._hits += hit
            self._misses += not hit
            old = self._entries.pop(key, None)
            self._nbytes -= old.nbytes if old else 0
            if size > self.max_bytes or self.max_conversations == 0:
                return
            self._entries[key] = entry
            self._nbytes += size
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used entries until the bounds hold (the caller holds the lock)."""
        while self._entries and (
            self._nbytes > self.max_bytes or len(self._entries) > self.max_conversations
        ):
            _, evicted = self._entries.popitem(last=False)
            self._nbytes -= evicted.nbytes


def _prefix_chars(render: Render, msgs: list[dict[str, Any]], text: str) -> tuple[int, int]:
    """(common prefix of the partial rendering of `msgs` with `text`, whether it is all of it); (-1, 0)
    when the template refuses the partial conversation."""
    try:
        part = render(msgs, add_generation_prompt=False)
    except ChatTemplateError:
        return -1, 0
    c = common_prefix_len(part, text)
    return c, int(c == len(part))


def _render_subset(todo: list[int]) -> set[int]:
    """Which of the messages `todo` (ascending) get their prefix rendered: all of them up to `MAX_RENDERS`;
    beyond, the first (a system prompt's end), the last `MAX_RENDERS // 2` and evenly spaced ones between
    (a first turn of 1,000 messages renders 48 prefixes, not 1,000: the cache keeps few boundary
    checkpoints of one request anyway, `cache.policy.thin`)."""
    if len(todo) <= MAX_RENDERS:
        return set(todo)
    tail = MAX_RENDERS // 2
    head = todo[:-tail]
    spaced = MAX_RENDERS - tail - 1
    picks = {head[(k * len(head)) // spaced] for k in range(spaced)}
    return {todo[0], *picks, *todo[-tail:]}


def _check(cancelled: Cancelled | None) -> None:
    if cancelled is not None and cancelled():
        raise EncodeCancelled("the chat encoding was cancelled")


def _prompt_ids(tokens: _Tokens, prev: _Entry | None, reused: int) -> tuple[int, ...]:
    """The ids as a tuple whose `reused` leading ones are the previous turn's int objects: building it costs the
    new tokens only (a `tolist` of all of them made 98k ints every turn: ~1-2 ms on a 2-core CPU), and what
    compares the prompt with the previous one (the engine process's delta, the engine's id check, the cache's
    prefix tree) compares pointers."""
    if prev is None or reused == 0:
        return tuple(tokens.ids)
    return prev.prompt[:reused] + tuple(tokens.ids[reused:])


_Kept = tuple[str, str] | bytes  # a message as the next turn compares it: (role, text), or a digest


def _kept(message: dict[str, Any]) -> _Kept:
    """A message of role and text strings as that pair (strings are immutable: the caller cannot change what is
    kept; a compare of equal texts is a memcmp, of the very same ones a pointer compare), any other as its
    digest. For 101 messages on this project's 2-core CPU: 0.08 ms a turn, where a digest of each took 0.31 ms."""
    if message.keys() == _ROLE_CONTENT:
        role, content = message["role"], message["content"]
        if type(role) is str and type(content) is str:
            return (role, content)
    return _digest(message)


def _kept_nbytes(kept: tuple[_Kept, ...]) -> int:
    return sum(len(k) if type(k) is bytes else sys.getsizeof(k[1]) + _KEPT_OVERHEAD for k in kept)


def _digest(message: dict[str, Any]) -> bytes:
    """A digest of everything a template can see in a message (random when not JSON-encodable)."""
    try:
        text = "j" + json.dumps(message, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError):
        return os.urandom(_DIGEST)  # never matches: no reuse for this message and those after it
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=_DIGEST).digest()
