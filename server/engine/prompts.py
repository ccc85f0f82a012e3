"""`LastPrompts`: each session's last prompt, kept so that the next turn's work on its prompt is O(new tokens).

A chat client sends the whole conversation every turn, so a turn's prompt mostly repeats the previous one: a
follow-up extends it, a regenerate or an edit of the last message shares all of it up to the change. What is
known of the previous prompt then holds for the common prefix: the engine checked its ids (`Engine._validate`),
and the engine core has its tokens (`server.engine.ipc.SentPrompts`). A session is a
request's (namespace, session id, prefix tree). The store forgets the oldest session first once it holds more
than `max_tokens` tokens in all (it keeps references to the prompt tuples, not copies), and keeps no prompt
longer than that. Not thread-safe: each user calls it from one thread.
"""

from __future__ import annotations

from collections import OrderedDict

from cache.prefix import common_prefix_len
from server.engine.types import GenerationRequest

PromptKey = tuple[str, str | None, str | None]  # (namespace, session id, prefix tree)
LAST_PROMPT_TOKENS = 2_000_000  # ~16 MB of references; ~80 MB where the store alone keeps the ints alive


def prompt_key(req: GenerationRequest) -> PromptKey:
    return (req.namespace, req.session_id, req.tree)


class LastPrompts:
    def __init__(self, max_tokens: int = LAST_PROMPT_TOKENS) -> None:
        self.max_tokens = max_tokens
        self._last: OrderedDict[PromptKey, tuple[int, ...]] = OrderedDict()
        self._tokens = 0

    @property
    def tokens(self) -> int:
        return self._tokens

    def get(self, key: PromptKey) -> tuple[int, ...] | None:
        return self._last.get(key)

    def prefix(self, key: PromptKey, prompt: tuple[int, ...]) -> int:
        """How many leading tokens `prompt` shares with the session's last prompt (0: none kept)."""
        last = self._last.get(key)
        return common_prefix_len(last, prompt) if last else 0

    def remember(self, key: PromptKey, prompt: tuple[int, ...]) -> None:
        """`prompt` is the session's last prompt now (the most recently used; the oldest sessions go first
        past `max_tokens`)."""
        old = self._last.pop(key, None)
        self._tokens -= len(old) if old is not None else 0
        if len(prompt) > self.max_tokens:
            return
        self._last[key] = prompt
        self._tokens += len(prompt)
        while self._tokens > self.max_tokens:
            self._tokens -= len(self._last.popitem(last=False)[1])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LastPrompts) and self._last == other._last and self._tokens == other._tokens

    __hash__ = None  # type: ignore[assignment]
