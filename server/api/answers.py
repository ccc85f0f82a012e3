"""A chat response's answers as the ids the model generated, for `ChatEncoder.answered` (`--chat-answer-ids`).

A choice's answer is kept only when its text is exactly what its ids decode to as the client received
them: it ended at `max_tokens` (all its ids) or at a stop token (its ids without that token, whose text is
never sent). An answer cut by a stop string is not kept (its ids run past the text), nor is one that did not
finish (an abort, an error, a client gone).
"""

from __future__ import annotations

from array import array

from server.engine.types import FinishReason, TokenEvent
from server.model.chat_encoding import Answer


class AnswerLog:
    """Each choice's text and ids, event by event (`add`), then the choices' `Answer`s (`answers`). `stops`:
    the request's `server.engine.request.stop_ids`."""

    def __init__(self, choices: int, stops: frozenset[int], min_tokens: int) -> None:
        self._text: list[list[str]] = [[] for _ in range(choices)]
        self._ids = [array("i") for _ in range(choices)]
        self._finish: list[FinishReason | None] = [None] * choices
        self._stops, self._min_tokens = stops, min_tokens

    def add(self, index: int, event: TokenEvent) -> None:
        if event.text:
            self._text[index].append(event.text)
        if event.token_id is not None:
            self._ids[index].append(event.token_id)
        if event.finish_reason is not None:
            self._finish[index] = event.finish_reason

    def answers(self) -> list[Answer]:
        """The answers of the choices that finished with text their ids are exactly."""
        out = []
        for text, ids, finish in zip(self._text, self._ids, self._finish, strict=True):
            if finish is FinishReason.STOP and ids and ids[-1] in self._stops and len(ids) > self._min_tokens:
                out.append(Answer("".join(text), ids[:-1]))
            elif finish is FinishReason.LENGTH:
                out.append(Answer("".join(text), ids))
        return out
