"""GET /health, GET /metrics, GET and DELETE /v1/sessions/{id}, POST /start_profile and /stop_profile."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Path, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from server.api import session_ids
from server.api.errors import APIError, bad_request
from server.api.generation import engine_error
from server.api.logs import session_id_var
from server.api.responses import Health, SessionDeleted
from server.api.routes_openai import ERRORS, Namespace
from server.api.state import AppState, EngineLike, app_state
from server.engine.types import EngineError, EngineNotReady
from server.metrics import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)
T = TypeVar("T")
router = APIRouter()
SessionPath = Annotated[str, Path(min_length=1, description=session_ids.RULE)]


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(request: Request) -> JSONResponse:
    """200 once the model is loaded and the engine runs; 503 before (and if loading failed, or the engine core
    process died) and from the moment a shutdown begins (load balancers stop routing here while running requests finish)."""
    state = app_state(request)
    status: Literal["ok", "loading", "failed", "draining"] = "ok"
    if state.draining:
        status = "draining"
    elif not state.ready:
        status = "failed" if state.failed else "loading"
    body = Health(status=status, model=state.settings.model_name, api_server=state.api_server)
    return JSONResponse(body.model_dump(), status_code=200 if status == "ok" else 503)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    state = app_state(request)
    render = state.render_metrics or functools.partial(fresh_metrics, state)
    return Response(await render(), media_type=CONTENT_TYPE_LATEST)


async def fresh_metrics(state: AppState) -> bytes:
    """The registry, its gauges refreshed from the engine."""
    try:
        if state.engine is not None and state.ready:
            state.metrics.set_stats(await state.engine.stats())
        elif not state.settings.engine_process:  # the core process owns the device
            state.metrics.refresh(None)
    except Exception:  # a stats failure must not hide the counters
        log.exception("metrics refresh failed")
    return state.metrics.render()


def _session_engine(request: Request, session_id: str) -> EngineLike:
    try:
        session_ids.check(session_id)
    except session_ids.InvalidSessionId as exc:
        raise bad_request(str(exc), param="session_id") from exc
    request.scope.setdefault("state", {})["session_id"] = session_id
    session_id_var.set(session_id)
    return app_state(request).require_engine()


async def _ask(call: Awaitable[T]) -> T:
    """An engine call; a core process that died meanwhile (or hangs) is a 503, never a 500."""
    try:
        return await call
    except (EngineError, EngineNotReady, TimeoutError) as exc:
        raise engine_error(exc) from exc


def _not_found(session_id: str) -> APIError:
    return APIError(
        404, f"No session '{session_id}' in the state cache.", param="session_id", code="session_not_found"
    )


@router.get("/v1/sessions/{session_id:path}", responses=ERRORS)
async def get_session(session_id: SessionPath, request: Request, namespace: Namespace) -> JSONResponse:
    """Checkpoints and bytes per tier of one of this key's sessions."""
    info = await _ask(_session_engine(request, session_id).session_info(namespace, session_id))
    if info is None:
        raise _not_found(session_id)
    return JSONResponse(jsonable_encoder({"id": session_id, "object": "session", **info}))


@router.delete("/v1/sessions/{session_id:path}", response_model=SessionDeleted, responses=ERRORS)
async def delete_session(session_id: SessionPath, request: Request, namespace: Namespace) -> SessionDeleted:
    """Drop every checkpoint of the session, in every tier."""
    engine = _session_engine(request, session_id)
    freed = await _ask(engine.delete_session(namespace, session_id))
    if freed is None:
        raise _not_found(session_id)
    app_state(request).chat_encoder(engine.tokenizer).forget((namespace, session_id))
    return SessionDeleted(id=session_id, bytes_freed=freed)


# ---- profiling (--profile-dir) -------------------------------------------------------------------


def _profiling_engine(request: Request) -> EngineLike:
    state = app_state(request)
    if state.settings.profile_dir is None:
        raise APIError(404, "Profiling is off: start the server with --profile-dir.", code="profiling_off")
    return state.require_engine()


@router.post("/start_profile", responses={**ERRORS, 409: ERRORS[400]})
async def start_profile(request: Request, namespace: Namespace) -> JSONResponse:
    """Start a torch profiler recording of the model worker thread (409 if one runs already)."""
    if not await _ask(_profiling_engine(request).start_profile()):
        raise APIError(
            409, "A profile is being recorded already: POST /stop_profile first.", code="profiling"
        )
    return JSONResponse({"status": "recording"})


@router.post("/stop_profile", responses={**ERRORS, 409: ERRORS[400]})
async def stop_profile(request: Request, namespace: Namespace) -> JSONResponse:
    """Stop the recording and write its Chrome trace into --profile-dir (409 if none runs)."""
    trace = await _ask(_profiling_engine(request).stop_profile())
    if trace is None:
        raise APIError(409, "No profile is being recorded: POST /start_profile first.", code="not_profiling")
    return JSONResponse({"status": "written", "trace": trace})
