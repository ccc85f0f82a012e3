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
# Tokens that may end mid-character before the window moves on regardless (a guard against a
# stream of invalid bytes growing the decode window forever; real text settles within a few).
_MAX_HELD_TOKENS = 64


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
        self._sent = 0  # characters of the window past `_prefix_text` already released
        self._pending = ""  # decoded, UTF-8-complete, not yet released (could start a stop string)
        self.stopped = False  # a stop string was found; nothing more is ever released
        self.text = ""  # everything released so far

    def push(self, token_id: int, stop: bool = True) -> str:
        """Add one generated token; return the text it releases (possibly empty).

        Everything up to the window's last complete character is released; a trailing U+FFFD (an
        incomplete character) is held. The window moves on only at a token that ends a character.
        With `stop` False (a request short of its min_tokens) a stop string this token completes is
        released as text; a suffix that could still grow into one is held all the same."""
        if self.stopped:
            return ""
        tokens = self._tokens
        tokens.append(token_id)
        window = self._decode(tokens[self._prefix_offset :])
        start = len(self._prefix_text) + self._sent
        if window.endswith(_REPLACEMENT) and len(tokens) - self._read_offset < _MAX_HELD_TOKENS:
            new_text = window[start:-1]
            self._sent += len(new_text)
        else:
            new_text = window[start:]
            self._prefix_offset, self._read_offset = self._read_offset, len(tokens)
            self._prefix_text = self._decode(tokens[self._prefix_offset :])
            self._sent = 0
        return self._release(new_text, final=False, stop=stop) if new_text else ""

    def flush(self) -> str:
        """The request ended: release everything still held (an incomplete character included)."""
        if self.stopped:
            return ""
        window = self._decode(self._tokens[self._prefix_offset :])
        start = len(self._prefix_text) + self._sent
        tail = window[start:] if len(window) > start else ""
        self._prefix_offset = self._read_offset = len(self._tokens)
        self._prefix_text, self._sent = "", 0
        return self._release(tail, final=True)

    def _release(self, new_text: str, *, final: bool, stop: bool = True) -> str:
        if not self._stops:  # nothing to hold back (most requests): one per token, so kept short
            self.text += new_text
            return new_text
        self._pending += new_text
        cut = self._first_stop(self._pending) if stop else None
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
