"""`tssc serve` / `python -m server serve` / `python -m server.serve`: settings -> engine -> app -> uvicorn."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from server.api import create_app
from server.api.logs import configure_logging
from server.api.routes_admin import fresh_metrics
from server.api.state import AppState
from server.draining import DrainingServer, uvicorn_config
from server.frontends import FrontEnds, front_end_settings
from server.heap import freeze_heap
from server.metrics import Metrics
from server.settings import Settings, apply_switch_interval, parse_settings, resolve_engine_process

log = logging.getLogger(__name__)


def _settings_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        flag = "--" + "-".join(str(p) for p in err.get("loc", ())).replace("_", "-")
        lines.append(f"{flag}: {err.get('msg')}")
    return "tssc serve: invalid settings\n  " + "\n  ".join(lines)


def serve(argv: Sequence[str] | None = None) -> int:
    """Run the server until interrupted. Returns the process exit code (2: bad flags, 1: the model
    could not be loaded, after one plain line on stderr naming the cause; 130: stopped by SIGINT, once
    drained, with no traceback). A SIGTERM ends the process by that signal once drained, as uvicorn does."""
    try:
        settings = parse_settings(argv)
    except SystemExit as exc:  # --help, or an unknown flag (argparse printed why)
        return exc.code if isinstance(exc.code, int) else 2
    except ValidationError as exc:
        sys.stderr.write(_settings_error(exc) + "\n")
        return 2
    settings = resolve_engine_process(settings)  # logged as decided
    configure_logging(settings.log_level_int, session_ids=settings.log_session_ids, fmt=settings.log_format)
    apply_switch_interval(settings)
    failed: list[bool] = []
    server: DrainingServer | None = None

    def on_load_error() -> None:
        failed.append(True)
        if server is not None:
            server.should_exit = True

    metrics = Metrics()
    try:
        group = FrontEnds.listen(settings, metrics) if settings.api_servers > 1 else None
    except OSError as exc:
        sys.stderr.write(f"tssc serve: cannot listen on {settings.host}:{settings.port}: {exc}\n")
        return 1
    mine = front_end_settings(settings)
    app = create_app(
        mine,
        engine=group.engine(mine) if group is not None else None,
        metrics=metrics,
        on_load_error=on_load_error,
        on_ready=freeze_heap,
    )
    if group is not None:
        group.render = functools.partial(fresh_metrics, app.state.tssc)
    on_signal = group.forward if group is not None else None
    server = DrainingServer(uvicorn_config(app, settings), app, settings.shutdown_grace, on_signal)
    _log_start(settings)
    try:
        server.run(sockets=[group.socket] if group is not None else None)
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it drained on: a Ctrl-C is a stop, not a crash
        interrupted = True
    else:
        interrupted = False
    if failed:
        _report_load_failure(app.state.tssc)
        return 1
    if interrupted:
        log.info("stopped (SIGINT)")
        return 130  # the shell's code for a command that a SIGINT ended
    return 0


def _log_start(settings: Settings) -> None:
    log.info(
        "serving",
        extra={
            "model": settings.model,
            "served_model_name": settings.model_name,
            "host": settings.host,
            "port": settings.port,
            "cache": not settings.no_cache,
            "auth": settings.auth_enabled,
        },
    )


def _report_load_failure(state: AppState) -> None:
    """The last line the operator sees: the cause in plain words (the logs above have the record, and
    the traceback at --log-level debug)."""
    sys.stderr.write(f"tssc serve: cannot load the model: {state.load_error}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    raise SystemExit(serve())
