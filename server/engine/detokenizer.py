"""Incremental detokenization with UTF-8 hold-back and stop strings.

Two kinds of text are held back until the next token settles them:

- a trailing incomplete character: byte-level tokenizers split a multi-byte UTF-8 character over
  several tokens, and decoding a prefix of them yields U+FFFD. Text is released only once the
  decoded window no longer ends in U+FFFD (or at `flush`, which releases whatever is left);
- a suffix that could still grow into a stop string ("\\n\\nU" while a stop string is
  "\\n\\nUser:"). Once a stop string appears, the text before it is released, the stop string
  and everything after it never are, and `stopped` becomes True.

Decoding works on a sliding window of tokens (`_prefix_offset` .. end), as byte-level and
SentencePiece decoders can render a token differently at the start of a sequence (leading
spaces); the last few prompt tokens seed the window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

DecodeFn = Callable[[Sequence[int]], str]
MAX_STOP_STRINGS = 8  # the API allows 4 user stops; chat templates may add their own
_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 6  # prompt tokens that seed the decode window
_MAX_HELD_TOKENS = 6  # a UTF-8 character spans at most 4 bytes: longer runs are invalid bytes, released


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of UTF-8-complete, stop-string-free text."""

    def __init__(self, decode: DecodeFn, stop: Sequence[str] = (), prompt_tail: Sequence[int] = ()) -> None:
        stops = tuple(s for s in stop if s)
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        self._decode = decode
        self._stops = stops
        self._max_hold = max((len(s) for s in stops), default=1) - 1
        self._tokens: list[int] = list(prompt_tail[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._prefix_text = decode(self._tokens) if self._tokens else ""
        self._pending = ""  # decoded, UTF-8-complete, not yet released (could start a stop string)
        self.stopped = False  # a stop string was found; nothing more is ever released
        self.text = ""  # everything released so far

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it releases (possibly empty)."""
        if self.stopped:
            return ""
        self._tokens.append(token_id)
        window = self._decode(self._tokens[self._prefix_offset :])
        if len(window) <= len(self._prefix_text):
            return ""  # nothing visible yet (special tokens): wait
        held = len(self._tokens) - self._read_offset
        if window.endswith(_REPLACEMENT) and held < _MAX_HELD_TOKENS:
            return ""  # an incomplete character: wait for its next bytes
        new_text = window[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        self._prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        return self._release(new_text, final=False)

    def flush(self) -> str:
        """The request ended: release everything still held (an incomplete character included)."""
        if self.stopped:
            return ""
        window = self._decode(self._tokens[self._prefix_offset :])
        tail = window[len(self._prefix_text) :] if len(window) > len(self._prefix_text) else ""
        self._prefix_offset = self._read_offset = len(self._tokens)
        self._prefix_text = ""
        return self._release(tail, final=True)

    def _release(self, new_text: str, *, final: bool) -> str:
        self._pending += new_text
        cut = self._first_stop(self._pending)
        if cut is not None:
            out, self._pending, self.stopped = self._pending[:cut], "", True
        else:
            hold = 0 if final else self._stop_prefix_len(self._pending)
            split = len(self._pending) - hold
            out, self._pending = self._pending[:split], self._pending[split:]
        self.text += out
        return out

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for k in range(min(len(text), self._max_hold), 0, -1):
            suffix = text[-k:]
            if any(s.startswith(suffix) for s in self._stops):
                return k
        return 0
