"""POST /v1/chat/completions, POST /v1/completions, GET /v1/models."""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Annotated, Any, cast

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.api import session_ids
from server.api.answers import AnswerLog
from server.api.auth import authenticate
from server.api.errors import bad_request
from server.api.formatting import (
    chat_logprobs,
    choice_text,
    completion_logprobs,
    final_event,
    finish_reason_out,
    token_names,
    usage_of,
)
from server.api.generation import ClientDisconnected, collect, engine_error, until_disconnect
from server.api.logs import session_id_var
from server.api.prompt_logprobs import legacy, prepend, prompt_entries, vllm_format
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.api.requests import (
    Prompt,
    RequestContext,
    cache_tree,
    chat_sampling,
    check_logit_bias,
    check_model,
    check_prompt_length,
    check_token_ids,
    completion_sampling,
    context_length_exceeded,
    fan_out,
    resolve_session,
    scored_prompt,
    with_extra_stop,
)
from server.api.responses import (
    ChatChoice,
    ChatCompletion,
    ChatResponseMessage,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    ErrorResponse,
    FinishReasonOut,
    ModelCard,
    ModelList,
)
from server.api.state import AppState, EngineLike, ReleasingStream, app_state
from server.api.streaming import StreamSpec, chat_stream, completion_stream
from server.engine.request import stop_ids
from server.engine.types import GenerationRequest, SamplingParams, TokenEvent
from server.model.chat_encoding import EncodeCancelled, PromptTooLong

_bearer = HTTPBearer(auto_error=False, description="An API key given to the server with --api-key.")
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}
CLIENT_CLOSED = 499
# completions prompts of at most this many characters are tokenized on the event loop (well under a
# millisecond): when many arrive at once, a thread hop each cost more (a burst of 64 200-token prompts: the
# tokenize phase 41-53 ms mean in threads, 0.4-0.5 ms inline, on a 2-core CPU)
INLINE_ENCODE_CHARS = 4096


async def namespace_dep(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """Authenticate; the request's session namespace. A coroutine, so that FastAPI runs it on the event loop:
    a plain function dependency is run in a worker thread, a hop per request (and, in a burst, new threads)."""
    state = app_state(request)
    header = f"Bearer {credentials.credentials}" if credentials is not None else None
    namespace = authenticate(header, state.settings.api_key)
    request.scope.setdefault("state", {})["namespace"] = namespace
    return namespace


Namespace = Annotated[str, Depends(namespace_dep)]
SessionHeader = Annotated[str | None, Header(alias="X-Session-ID")]
log = logging.getLogger(__name__)
router = APIRouter(responses=ERRORS)


def _context(
    request: Request,
    namespace: str,
    header: str | None,
    body: ChatCompletionRequest | CompletionRequest,
) -> RequestContext:
    if header is not None:
        try:
            header = session_ids.from_header(header)
        except session_ids.InvalidSessionId as exc:
            raise bad_request(f"X-Session-ID: {exc}", param="X-Session-ID") from exc
    session = resolve_session(header, body.session_id)
    request.scope.setdefault("state", {})["session_id"] = session
    session_id_var.set(session)
    request_id = str(request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex)
    tree = cache_tree(namespace, body.cache_salt, app_state(request).settings.share_prefixes_across_keys)
    return RequestContext(request_id=request_id, namespace=namespace, session_id=session, tree=tree)


def _observe_parse(request: Request, state: AppState) -> float:
    """Record the parse phase (request start to the handler: body read and validated); returns now."""
    now = time.monotonic()
    started = request.scope.get("state", {}).get("t_start")
    if started is not None:
        state.metrics.observe_phase("parse", now - started)
    return now


def _response_headers(ctx: RequestContext) -> dict[str, str]:
    return {"X-Session-ID": session_ids.header_value(ctx.session_id)} if ctx.session_id else {}


async def _encode_chat(
    request: Request, state: AppState, engine: EngineLike, body: ChatCompletionRequest, ctx: RequestContext
) -> Prompt:
    """Render and tokenize the conversation off the event loop, reusing the session's previous turn
    (`ChatEncoder`); the work stops if the client goes away, and as soon as the prompt is too long."""
    settings = state.settings
    if len(body.messages) > settings.max_messages:
        raise bad_request(
            f"{len(body.messages)} messages; this server accepts at most {settings.max_messages}.",
            param="messages",
            code="too_many_messages",
        )
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]
    key = (ctx.namespace, ctx.session_id) if ctx.session_id is not None else None
    cancel = threading.Event()
    encode = functools.partial(
        state.chat_encoder(engine.tokenizer).encode,
        messages,
        key,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        template_kwargs=body.chat_template_kwargs,
        cancelled=cancel.is_set,
        max_tokens=settings.max_prompt_tokens,
    )
    try:
        encoded = await until_disconnect(request, anyio.to_thread.run_sync(encode, abandon_on_cancel=True))
    except ClientDisconnected:
        cancel.set()
        raise
    except PromptTooLong as exc:
        raise context_length_exceeded(exc.tokens, settings.max_prompt_tokens, "messages") from exc
    except EncodeCancelled as exc:
        raise ClientDisconnected() from exc
    except ValueError as exc:  # ChatTemplateError: an unsupported role or conversation
        raise bad_request(str(exc), param="messages") from exc
    return Prompt(tokens=tuple(encoded.tokens), boundaries=tuple(encoded.boundaries))


async def _collect(
    request: Request, engine: EngineLike, reqs: list[GenerationRequest]
) -> list[list[TokenEvent]]:
    try:
        return await until_disconnect(request, collect(engine, reqs))
    except ClientDisconnected:
        raise
    except Exception as exc:
        raise engine_error(exc) from exc


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, namespace: Namespace, x_session_id: SessionHeader = None
) -> Response:
    state = app_state(request)
    parsed = _observe_parse(request, state)
    check_model(body.model, state.settings.model_name)
    ctx = _context(request, namespace, x_session_id, body)
    params = chat_sampling(body, state.settings)
    engine = state.require_engine()
    check_logit_bias(params, int(engine.tokenizer.vocab_size))
    params = with_extra_stop(params, getattr(engine.tokenizer, "chat_stop", ()))
    state.acquire()
    try:
        prompt = await _encode_chat(request, state, engine, body, ctx)
        state.metrics.observe_phase("tokenize", time.monotonic() - parsed)
        check_prompt_length(len(prompt.tokens), state.settings, "messages")
        reqs = fan_out(ctx, [prompt], params, body.n, scored_prompt(body))
        as_ids = body.return_tokens_as_token_ids
        spec = _spec(state, engine, ctx, "chatcmpl-", body.n, body.include_usage, body.logprobs, as_ids)
        log_answers, answered = _answer_log(state, engine, ctx, prompt, params, len(reqs))
        if body.stream:
            stream = chat_stream(engine, reqs, spec, log_answers, answered)
            return ReleasingStream(stream, state.release, _response_headers(ctx))
        per_choice = await _collect(request, engine, reqs)
    except ClientDisconnected:
        state.release()
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        state.release()
        raise
    state.release()
    if log_answers is not None and answered is not None:
        for index, events in enumerate(per_choice):
            for event in events:
                log_answers.add(index, event)
        answered()
    return _chat_response(spec, ctx, per_choice, body.logprobs, body.prompt_logprobs is not None)


def _answer_log(
    state: AppState,
    engine: EngineLike,
    ctx: RequestContext,
    prompt: Prompt,
    params: SamplingParams,
    choices: int,
) -> tuple[AnswerLog, Callable[[], None]] | tuple[None, None]:
    """With `--chat-answer-ids` and a session: a log of the response's answers, and what hands them to the
    chat encoder once the response finished (`ChatEncoder.answered`), for the session's next turn."""
    if not state.settings.chat_answer_ids or ctx.session_id is None:
        return None, None
    log_answers = AnswerLog(choices, stop_ids(params, engine.tokenizer.eos_ids), params.min_tokens)
    key, encoder = (ctx.namespace, ctx.session_id), state.chat_encoder(engine.tokenizer)

    def answered() -> None:
        try:
            encoder.answered(key, prompt.tokens, log_answers.answers())
        except Exception:  # the next turn re-tokenizes the answer; this response is unharmed
            log.exception("keeping the answers' ids failed")

    return log_answers, answered


def _spec(
    state: AppState,
    engine: EngineLike,
    ctx: RequestContext,
    prefix: str,
    n: int,
    usage: bool,
    logprobs: bool,
    as_ids: bool = False,
) -> StreamSpec:
    """`as_ids`: logprob entries name tokens `token_id:<id>` (return_tokens_as_token_ids)."""
    return StreamSpec(
        response_id=prefix + ctx.request_id.removeprefix("req-"),
        created=int(time.time()),
        model=state.settings.model_name,
        n=n,
        include_usage=usage,
        logprobs=logprobs,
        token_text=token_names(engine.tokenizer, as_ids),
    )


def _reason(final: TokenEvent | None) -> FinishReasonOut:
    return finish_reason_out(final.finish_reason if final is not None else None) or "stop"


def _chat_response(
    spec: StreamSpec,
    ctx: RequestContext,
    per_choice: Sequence[Sequence[TokenEvent]],
    logprobs: bool,
    prompt_logprobs: bool = False,
) -> Response:
    finals = [final_event(events) for events in per_choice]
    choices = [
        ChatChoice(
            index=i,
            message=ChatResponseMessage(content=choice_text(events)),
            logprobs=chat_logprobs(events, spec.token_text) if logprobs else None,
            finish_reason=_reason(finals[i]),
        )
        for i, events in enumerate(per_choice)
    ]
    body = ChatCompletion(
        id=spec.response_id,
        created=spec.created,
        model=spec.model,
        choices=choices,
        usage=usage_of(finals, spec.n),
        session_id=ctx.session_id,
    )
    data = body.model_dump(mode="json")
    entries = prompt_entries(per_choice[0]) if prompt_logprobs and per_choice else None
    if entries is not None:
        data["prompt_logprobs"] = vllm_format(entries, spec.token_text)
    return _json(data, ctx)


def _json(content: dict[str, Any], ctx: RequestContext) -> Response:
    return JSONResponse(content, headers=_response_headers(ctx))


# ---- completions -----------------------------------------------------------------------------


def _encode_inline(tok: Any, texts: list[str]) -> list[list[int]] | None:
    """Short prompts tokenized on the event loop, when the tokenizer is free (never waiting on a long
    encode in a thread); None: encode in a thread."""
    if sum(map(len, texts)) > INLINE_ENCODE_CHARS:
        return None
    out = []
    for text in texts:
        ids = tok.encode_now(text)
        if ids is None:
            return None
        out.append(ids)
    return out


def _encode_all(tok: Any, texts: list[str]) -> list[list[int]]:
    return [tok.encode(t) for t in texts]


async def _encode_prompts(engine: EngineLike, body: CompletionRequest) -> list[Prompt]:
    tok = engine.tokenizer
    raw = body.prompt
    if isinstance(raw, str):
        texts: list[str] | None = [raw]
    elif raw and isinstance(raw[0], str):
        texts = [str(t) for t in raw]
    else:
        texts = None
    if texts is not None:
        encoded = _encode_inline(tok, texts)
        if encoded is None:
            encoded = await anyio.to_thread.run_sync(_encode_all, tok, texts)
        return [Prompt(tokens=tuple(ids), text=t) for ids, t in zip(encoded, texts, strict=True)]
    # ints already (`TokenId`): no pass over each id in Python but the vocabulary check (a 131k-id prompt's
    # tokenize phase read 16 ms on an H200's host with one)
    lists = cast(list[list[int]], [raw] if isinstance(raw[0], int) else raw)
    prompts = []
    for ids in lists:
        token_ids = tuple(ids)
        check_token_ids(token_ids, int(tok.vocab_size), "prompt")
        prompts.append(Prompt(tokens=token_ids, text=tok.decode(token_ids) if body.echo else ""))
    return prompts


@router.post("/v1/completions", response_model=Completion)
async def completions(
    body: CompletionRequest, request: Request, namespace: Namespace, x_session_id: SessionHeader = None
) -> Response:
    state = app_state(request)
    parsed = _observe_parse(request, state)
    check_model(body.model, state.settings.model_name)
    ctx = _context(request, namespace, x_session_id, body)
    params = completion_sampling(body, state.settings)
    engine = state.require_engine()
    check_logit_bias(params, int(engine.tokenizer.vocab_size))
    state.acquire()
    try:
        prompts = await _encode_prompts(engine, body)
        state.metrics.observe_phase("tokenize", time.monotonic() - parsed)
        for prompt in prompts:
            check_prompt_length(len(prompt.tokens), state.settings, "prompt")
        if len(prompts) * body.n > state.settings.max_n * 8:
            raise bad_request("Too many choices (prompts x n).", param="n")
        reqs = fan_out(ctx, prompts, params, body.n, scored_prompt(body))
        echo = [prompts[i // body.n].text if body.echo else "" for i in range(len(reqs))]
        logprobs, as_ids = body.logprobs is not None, body.return_tokens_as_token_ids
        spec = _spec(state, engine, ctx, "cmpl-", body.n, body.include_usage, logprobs, as_ids)
        if body.stream:
            stream = completion_stream(engine, reqs, spec, echo)
            return ReleasingStream(stream, state.release, _response_headers(ctx))
        per_choice = await _collect(request, engine, reqs)
    except ClientDisconnected:
        state.release()
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        state.release()
        raise
    state.release()
    return _completion_response(spec, ctx, per_choice, echo, body, prompts)


def _completion_response(
    spec: StreamSpec,
    ctx: RequestContext,
    per_choice: Sequence[Sequence[TokenEvent]],
    echo: Sequence[str],
    body: CompletionRequest,
    prompts: Sequence[Prompt],
) -> Response:
    """The completions body. With `max_tokens: 0` the one token the engine sampled is dropped (only the echo
    and its logprobs come back); with `echo` + `logprobs` the prompt's logprobs lead the choice's lists."""
    drop = body.max_tokens == 0
    kept = [[] if drop else list(events) for events in per_choice]
    finals = [final_event(events) for events in per_choice]
    choices = [
        CompletionChoice(
            index=i,
            text=echo[i] + choice_text(events),
            logprobs=_choice_logprobs(spec, events, per_choice[i], echo[i], body, prompts[i // spec.n]),
            finish_reason="length" if drop else _reason(finals[i]),
        )
        for i, events in enumerate(kept)
    ]
    usage = usage_of(finals, spec.n)
    if drop:
        usage = usage.model_copy(update={"completion_tokens": 0, "total_tokens": usage.prompt_tokens})
    out = Completion(
        id=spec.response_id, created=spec.created, model=spec.model, choices=choices, usage=usage,
        session_id=ctx.session_id,
    ).model_dump(mode="json")  # fmt: skip
    if body.prompt_logprobs is not None:
        for choice, events in zip(out["choices"], per_choice, strict=True):
            entries = prompt_entries(events)
            choice["prompt_logprobs"] = vllm_format(entries, spec.token_text) if entries is not None else None
    return _json(out, ctx)


def _choice_logprobs(
    spec: StreamSpec,
    events: Sequence[TokenEvent],
    all_events: Sequence[TokenEvent],
    echo: str,
    body: CompletionRequest,
    prompt: Prompt,
) -> CompletionLogprobs | None:
    if not spec.logprobs:
        return None
    generated = completion_logprobs(events, spec.token_text, len(echo))
    entries = prompt_entries(all_events)
    if not body.echo or entries is None:
        return generated
    return prepend(legacy(entries, spec.token_text, prompt.tokens), generated)


# ---- models ----------------------------------------------------------------------------------


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request, namespace: Namespace) -> ModelList:
    state = app_state(request)
    return ModelList(data=[ModelCard(id=state.settings.model_name, created=state.created)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request, namespace: Namespace) -> ModelCard:
    state = app_state(request)
    check_model(model_id, state.settings.model_name)
    return ModelCard(id=model_id, created=state.created)
