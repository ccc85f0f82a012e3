"""Graceful shutdown: stop admitting, let running requests finish, then end the rest cleanly.

On the first SIGTERM (or SIGINT) `serve` runs `drain(state, grace)` before uvicorn's own shutdown:

1. from that moment `/health` is 503 (`draining`) and every new generation request gets a 503 with
   `Retry-After` and code `server_shutting_down` (the listening socket stays open, so clients get an answer
   rather than a refused connection);
2. running requests have `grace` seconds (`--shutdown-grace`) to finish normally;
3. whatever is still open then is ended by the engine: a stream gets an OpenAI-style error event
   (`server_shutting_down`) and `data: [DONE]`, a non-streaming request a 503 with an OpenAI error body;
4. uvicorn then closes the connections and the lifespan stops the engine, which flushes the disk tier.

A second signal skips what is left of the grace period (uvicorn's own shutdown, 5 s more at most).
"""

from __future__ import annotations

import asyncio
import logging

from server.api.state import AppState

log = logging.getLogger(__name__)
REASON = "The server is shutting down; retry the request."
FLUSH_SECONDS = 5.0  # after ending the open requests: time for their last bytes to be written


async def drain(state: AppState, grace: float) -> None:
    """Steps 1-3 above; returns when no generation request is in flight (or after the flush time)."""
    state.draining = True
    log.info("shutdown: draining %d request(s), %.1f s grace", state.inflight, grace)
    if await _until_idle(state, grace):
        return
    ended = state.engine.end_all(REASON) if state.engine is not None else 0
    log.warning("shutdown: grace period over, ended %d open request(s)", ended)
    await _until_idle(state, FLUSH_SECONDS)


async def _until_idle(state: AppState, seconds: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while state.inflight > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return state.inflight == 0
