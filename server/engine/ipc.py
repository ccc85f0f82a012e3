"""The messages between the HTTP process and the engine core process (`--engine-process`).

They travel pickled over one `multiprocessing` Pipe (a socket pair) per front-end process (one, or N with
`--api-servers N`); each side sends from its event loop thread only and reads on a thread of its own. All are frozen dataclasses of plain values.

HTTP process -> core: `Submit` a request (a follow-up carries only the tokens its session's previous prompt
lacks: `SentPrompts`), `Abort` one (its client went away), `EndAll` (shutdown grace
over), `Query` (stats at scrape time, session info and delete: answered by a `Reply` with the same
`call_id`), `Shutdown`.

Core -> HTTP process: `Ready` once the model is loaded or `LoadFailed` with the cause on one line; then
one `Step` per engine step that delivered anything: every `TokenEvent` of that step, the requests that
failed, the metric observations recorded since the last message (`Recorder`) and the queue lengths.

Metrics: the engine and the state cache in the core record into a `Recorder` (their `Metrics`
stand-in), which keeps each call as an `Observation` (method name, arguments); they ride along with the
next `Step` (or a periodic flush when nothing else is sent), and `replay` makes the same calls on the
HTTP process's `Metrics`. The counters and histograms thus count exactly what they count in one process,
and `/metrics` stays one registry in one process (no prometheus multiprocess directory to manage). The
gauges are read at scrape time: a `Query("stats")` answered with an `EngineStats`, sent after the
observations recorded before it.
"""

from __future__ import annotations

import array
import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal

from cache.base import CacheObserver, FetchTier, LookupResult, MissCause, RemoteDirection, Tier
from server.engine.prompts import LAST_PROMPT_TOKENS, LastPrompts, prompt_key
from server.engine.types import (
    EngineError,
    EngineNotReady,
    EngineShutdown,
    GenerationRequest,
    TokenEvent,
)

if TYPE_CHECKING:
    from server.metrics import LookupScope, Metrics

QueryName = Literal["stats", "session_info", "delete_session", "start_profile", "stop_profile"]
FailureKind = Literal["invalid", "shutdown", "not_ready", "error"]
Observation = tuple[str, tuple[Any, ...]]  # a `Metrics` method's name and its positional arguments
MODEL_INFO_FIELDS = ("model", "arch", "dtype", "device")  # `Metrics.set_model_info`'s keywords


# ---- HTTP process -> core --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Submit:
    """A request for the core. Its prompt is the whole prompt, or with `reuse` > 0 only what follows the first
    `reuse` tokens of the prompt its session sent last (`SentPrompts`). It crosses the pipe as one packed
    buffer: a tuple of ints pickles and unpickles int by int (a 131k-token prompt: 6.2 ms on this project's
    2-core CPU), the buffer in 0.06 ms."""

    req: GenerationRequest
    reuse: int = 0

    def __reduce__(self) -> tuple[Any, ...]:
        packed = pack_tokens(self.req.prompt_tokens)
        if packed is None:
            return (Submit, (self.req, self.reuse))
        return (_unpack_submit, (replace(self.req, prompt_tokens=()), packed, self.reuse))


def pack_tokens(tokens: tuple[int, ...]) -> bytes | None:
    """The ids as int32 bytes; None when one does not fit (the engine rejects it with its own message)."""
    try:
        return array.array("i", tokens).tobytes()
    except OverflowError:
        return None


def _unpack_submit(req: GenerationRequest, packed: bytes, reuse: int) -> Submit:
    ids = array.array("i")
    ids.frombytes(packed)
    return Submit(replace(req, prompt_tokens=tuple(ids)), reuse)


class SentPrompts:
    """The prompt each session sent to the core last, kept alike on both ends of the pipe, so that a turn sends
    only what differs from it: what a follow-up added, or a regenerate's or an edit's changed tail. A follow-up's
    prompt is the whole conversation, and sending it whole costs both processes time that grows with the
    conversation (a 131k-token follow-up on an H200 took ~8 ms more than with the engine in a thread). From the
    send to the core's engine call, a 98k-token follow-up on this project's 2-core CPU: 3.5 ms against 5.2 ms
    packed whole (median of 5); what is left is the prefix check below, on int objects that the chat encoder
    made anew.

    Each end makes the same `remember` calls in the same order (the HTTP process as it sends each `Submit`,
    the core as it reads it; the pipe keeps their order) on a `LastPrompts` of the same size, so both hold the
    same prompts."""

    def __init__(self, max_tokens: int = LAST_PROMPT_TOKENS) -> None:
        self.last = LastPrompts(max_tokens)

    def submit(self, req: GenerationRequest) -> Submit:
        """The HTTP process's end: `req` as the message that carries it."""
        key, prompt = prompt_key(req), req.prompt_tokens
        reuse = self.last.prefix(key, prompt)
        self.last.remember(key, prompt)
        return Submit(replace(req, prompt_tokens=prompt[reuse:]), reuse) if reuse else Submit(req)

    def request(self, message: Submit) -> GenerationRequest:
        """The core's end: the request `message` carries, its prompt whole again. Raises `EngineError` if
        the two ends disagree (a bug: their calls match one for one)."""
        req, key = message.req, prompt_key(message.req)
        if message.reuse:
            base = self.last.get(key)
            if base is None or len(base) < message.reuse:
                raise EngineError(
                    f"the engine core lost this session's previous prompt ({message.reuse} tokens)"
                )
            req = replace(req, prompt_tokens=base[: message.reuse] + req.prompt_tokens)
        self.last.remember(key, req.prompt_tokens)
        return req


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class EndAll:
    reason: str


@dataclass(frozen=True, slots=True)
class Query:
    call_id: int
    name: QueryName
    args: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


# ---- core -> HTTP process --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    pass


@dataclass(frozen=True, slots=True)
class LoadFailed:
    message: str  # `server.model.loader.load_failure` of the exception


@dataclass(frozen=True, slots=True)
class Failure:
    """A request the core ended with an exception, carried as its kind and message."""

    request_id: str
    kind: FailureKind
    message: str

    @classmethod
    def of(cls, request_id: str, exc: BaseException) -> Failure:
        kind: FailureKind = "error"
        if isinstance(exc, EngineShutdown):
            kind = "shutdown"
        elif isinstance(exc, EngineNotReady):
            kind = "not_ready"
        elif isinstance(exc, ValueError):
            kind = "invalid"
        return cls(request_id, kind, str(exc))

    def exception(self) -> Exception:
        """The exception `generate` raises in the HTTP process: the same class the engine raised there."""
        classes: dict[FailureKind, type[Exception]] = {
            "invalid": ValueError,
            "shutdown": EngineShutdown,
            "not_ready": EngineNotReady,
            "error": EngineError,
        }
        return classes[self.kind](self.message)


@dataclass(frozen=True, slots=True)
class Step:
    """One engine step's output. Its events cross the pipe as plain tuples of their fields: a 64-row step's
    message pickles in ~40% and unpickles in ~30% of the time it took with frozen dataclass events and a
    metric observation per token (`bench/step_rows_cpu.py` on this project's CPU: 66-105 -> 25-41 µs and
    94-139 -> 27-45 µs); the core's loop pays the first every step, the HTTP process's reader the second."""

    events: tuple[TokenEvent, ...]
    failures: tuple[Failure, ...]
    observations: tuple[Observation, ...]
    num_running: int
    num_waiting: int

    def __reduce__(self) -> tuple[Any, ...]:
        rows = tuple(map(_EVENT_FIELDS, self.events))
        return (_unpack_step, (rows, self.failures, self.observations, self.num_running, self.num_waiting))


_EVENT_FIELDS = operator.attrgetter(*(f.name for f in fields(TokenEvent)))  # an event -> its fields, in order


def _unpack_step(
    rows: tuple[tuple[Any, ...], ...],
    failures: tuple[Failure, ...],
    observations: tuple[Observation, ...],
    num_running: int,
    num_waiting: int,
) -> Step:
    return Step(tuple(TokenEvent(*row) for row in rows), failures, observations, num_running, num_waiting)


@dataclass(frozen=True, slots=True)
class Reply:
    call_id: int
    value: Any = None
    error: str | None = None  # the query failed in the core: its exception's type and message


ToCore = Submit | Abort | EndAll | Query | Shutdown
FromCore = Ready | LoadFailed | Step | Reply


# ---- metrics across the pipe -----------------------------------------------------------------------


class Recorder(CacheObserver):
    """The `Metrics` of the core: keeps every call the engine and the cache make (from any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[Observation] = []

    def _record(self, name: str, *args: Any) -> None:
        with self._lock:
            self._calls.append((name, args))

    def drain(self) -> tuple[Observation, ...]:
        """The calls recorded since the last drain, oldest first."""
        with self._lock:
            calls, self._calls = self._calls, []
        return tuple(calls)

    @property
    def pending(self) -> bool:
        return bool(self._calls)

    # the cache's observer (`cache.base.CacheObserver`); `on_reuse` stays a no-op, as in `Metrics`
    def on_lookup(self, result: LookupResult, cause: MissCause, scope: LookupScope = "") -> None:
        self._record("on_lookup", result, cause, scope)

    def on_fetch(self, tier: FetchTier, seconds: float) -> None:
        self._record("on_fetch", tier, seconds)

    def on_capture(self, seconds: float) -> None:
        self._record("on_capture", seconds)

    def on_evict(self, tier: Tier) -> None:
        self._record("on_evict", tier)

    def on_corrupt(self) -> None:
        self._record("on_corrupt")

    def on_remote_bytes(self, direction: RemoteDirection, nbytes: int) -> None:
        self._record("on_remote_bytes", direction, nbytes)

    def on_remote_error(self, kind: str) -> None:
        self._record("on_remote_error", kind)

    # the engine's request metrics (`server.engine.engine.RequestMetrics`)
    def observe_prompt(self, cached_tokens: int, computed_tokens: int) -> None:
        self._record("observe_prompt", cached_tokens, computed_tokens)

    def observe_queue(self, seconds: float) -> None:
        self._record("observe_queue", seconds)

    def observe_phase(self, phase: str, seconds: float) -> None:
        self._record("observe_phase", phase, seconds)

    def observe_first_token(self, seconds: float) -> None:
        self._record("observe_first_token", seconds)

    def observe_tokens(self, count: int, inter_token_seconds: Sequence[float] = ()) -> None:
        self._record("observe_tokens", count, tuple(inter_token_seconds))

    def observe_finish(self, finish_reason: str, duration_seconds: float) -> None:
        self._record("observe_finish", finish_reason, duration_seconds)

    def set_model_info(self, *, model: str, arch: str, dtype: str, device: str) -> None:
        self._record("set_model_info", model, arch, dtype, device)


REPLAYED = frozenset(name for name in vars(Recorder) if name.startswith(("on_", "observe_", "set_")))


def replay(metrics: Metrics, observations: tuple[Observation, ...]) -> None:
    """Make the recorded calls on `metrics` (thread-safe, as the cache's observer must be)."""
    for name, args in observations:
        if name not in REPLAYED:
            continue  # not a metrics call: never dispatched
        if name == "set_model_info":
            metrics.set_model_info(**dict(zip(MODEL_INFO_FIELDS, args, strict=True)))
        else:
            getattr(metrics, name)(*args)
