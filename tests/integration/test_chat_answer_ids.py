"""`--chat-answer-ids` through the HTTP API: a chat follow-up that sends the model's answer back unchanged
resumes where that answer ended, even when its text re-tokenizes to other ids (the seeded tiny model's
answers are random tokens), streamed or not; and the cache still changes no output."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import MODEL, _serve, chat
from tests.integration.server_proc import ServerProc

FLAG = "--chat-answer-ids"
LOSSLESS = ["--hot-dtype", "fp32", "--cold-dtype", "fp32", "--max-num-seqs", "4"]
FIRST = [{"role": "user", "content": "Tell me a long story about the sea."}]


@pytest.fixture(scope="module")
def answers_server(tiny_model_dir: Path, log_dir: Path) -> Iterator[ServerProc]:
    yield from _serve(tiny_model_dir, log_dir, *LOSSLESS, FLAG)


@pytest.fixture(scope="module")
def answers_nocache(tiny_model_dir: Path, log_dir: Path) -> Iterator[ServerProc]:
    yield from _serve(tiny_model_dir, log_dir, "--no-cache", "--max-num-seqs", "4", FLAG)


def _usage(resp: dict[str, Any]) -> tuple[int, int, int]:
    usage = resp["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


def _text(resp: dict[str, Any]) -> str:
    return str(resp["choices"][0]["message"]["content"])


def _next(messages: list[dict[str, str]], answer: str, question: str) -> list[dict[str, str]]:
    return [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": question}]


def test_a_follow_up_resumes_after_an_answer_that_re_tokenizes_otherwise(
    server: ServerProc, answers_server: ServerProc
) -> None:
    """The same turns on a server without the flag and one with it: the answer's text re-tokenizes to other
    ids (so the first resumes before the answer), while the second resumes exactly at the first turn's finish
    checkpoint: its prompt and the answer less its last token."""
    plain = [
        chat(s.base_url, FIRST, "answers-1", max_tokens=24, ignore_eos=True) for s in (server, answers_server)
    ]
    assert _text(plain[0]) == _text(plain[1])  # both first turns are misses: the same greedy answer
    follow = _next(FIRST, _text(plain[1]), "Go on.")
    without, with_ids = (
        chat(s.base_url, follow, "answers-1", max_tokens=8) for s in (server, answers_server)
    )
    p1, c1, _ = _usage(plain[1])  # type: ignore[arg-type]
    covered = p1 + c1 - 1
    assert _usage(without)[0] != _usage(with_ids)[0]  # the answer's text is not its ids re-tokenized
    assert _usage(without)[2] < covered  # type: ignore[arg-type]
    assert _usage(with_ids)[2] == covered  # type: ignore[arg-type]


def test_a_streamed_answer_is_taken_as_its_ids_too(answers_server: ServerProc) -> None:
    oai = openai.OpenAI(base_url=answers_server.base_url + "/v1", api_key="unused")
    headers = {"X-Session-ID": "answers-stream"}
    stream = oai.chat.completions.create(
        model=MODEL, messages=FIRST, max_tokens=20, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_headers=headers, extra_body={"ignore_eos": True},
    )  # fmt: skip
    parts, usage = [], None
    for chunk in stream:
        parts.extend(c.delta.content or "" for c in chunk.choices)
        usage = chunk.usage or usage
    assert usage is not None
    follow = _next(FIRST, "".join(parts), "And then?")
    resp = chat(answers_server.base_url, follow, "answers-stream", max_tokens=4)
    assert _usage(resp)[2] == usage.prompt_tokens + usage.completion_tokens - 1  # type: ignore[arg-type]


def test_the_cache_changes_no_output_with_answer_ids(
    answers_server: ServerProc, answers_nocache: ServerProc
) -> None:
    """Three turns on the lossless-tier server and on a --no-cache one, both with the flag: the same prompts
    (both take the answers' ids) and the same greedy answers; the cache server's later turns are hits."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, srv in (("cache", answers_server), ("plain", answers_nocache)):
        messages, out = list(FIRST), []
        for question in ("Go on.", "And then?", ""):
            resp = chat(srv.base_url, messages, f"answers-same-{name}", max_tokens=12, ignore_eos=True)
            out.append(resp)
            if question:
                messages = _next(messages, _text(resp), question)
        runs[name] = out  # type: ignore[assignment]
    assert [_text(r) for r in runs["cache"]] == [_text(r) for r in runs["plain"]]
    assert [_usage(r)[0] for r in runs["cache"]] == [_usage(r)[0] for r in runs["plain"]]
    assert all(_usage(r)[2] > 0 for r in runs["cache"][1:]) and all(_usage(r)[2] == 0 for r in runs["plain"])


def test_a_stream_cut_short_keeps_no_answer(server: ServerProc, answers_server: ServerProc) -> None:
    """A client that goes away mid-stream, then sends what it got as the answer: no ids were kept for it, so
    the follow-up is tokenized as text, as on a server without the flag, and nothing fails."""
    body = {"model": MODEL, "messages": FIRST, "max_tokens": 40, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    parts: list[str] = []
    with httpx.stream("POST", answers_server.base_url + "/v1/chat/completions", json=body,
                      headers={"X-Session-ID": "answers-cut"}, timeout=60) as resp:  # fmt: skip
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                parts.extend(c["delta"].get("content") or "" for c in chunk["choices"])
            if len(parts) >= 6:
                break  # the client goes away
    follow = _next(FIRST, "".join(parts), "Go on.")
    cut, plain = (chat(s.base_url, follow, "answers-cut", max_tokens=4) for s in (answers_server, server))
    assert _usage(cut)[0] == _usage(plain)[0]  # the same prompt: the answer re-tokenized
