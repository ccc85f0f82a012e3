"""Server settings: every CLI flag `--some-flag` is also the environment variable `TSSC_SOME_FLAG`.

Precedence: command line > environment > default. Byte sizes accept plain integers or strings such
as "512MiB", "2GiB", "1.5GB". `--api-key` repeats on the command line; `TSSC_API_KEY` holds a
comma-separated list.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import ByteSize, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.cli import package_version

ENV_PREFIX = "TSSC_"
DEMO_MODEL_RESOURCE = "assets/demo-mamba2"

Device = Literal["auto", "cpu", "cuda"]
ModelDType = Literal["auto", "fp32", "fp16", "bf16"]
HotDType = Literal["fp8", "fp16", "bf16", "fp32"]
ColdDType = Literal["fp16", "bf16", "fp32"]
HotKVDType = Literal["model", "fp8"]
RemoteDType = Literal["fp8", "fp16", "bf16", "fp32"]
RemoteCheckpoints = Literal["ends", "finish", "all"]
StateDType = Literal["fp32", "bf16"]
DecodeAhead = Literal["auto", "on", "off"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["auto", "text", "json"]


def default_model_path() -> str:
    """The bundled demo model (package data `server/assets/demo-mamba2`), as a filesystem path."""
    return str(importlib.resources.files("server").joinpath(DEMO_MODEL_RESOURCE))


class Settings(BaseSettings):
    """Everything `tssc serve` can be told. Immutable once built."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # model and device
    model: str = Field(default_factory=default_model_path, description="Model directory or hub id.")
    served_model_name: str | None = Field(
        None, description="Model id reported by the API (default: from --model)."
    )
    device: Device = Field("auto", description="Where the model runs: auto picks cuda when available.")
    dtype: ModelDType = Field("auto", description="Model weights dtype: auto is bf16 on cuda, fp32 on cpu.")
    max_num_seqs: int = Field(16, ge=1, le=4096, description="Live slots: sequences decoded together.")
    state_dtype: StateDType = Field(
        "fp32", description="Live ssm state dtype: bf16 halves its size (the maths stays fp32)."
    )
    prefill_budget: int | None = Field(
        None,
        ge=1,
        description="Prompt tokens prefilled per engine step over all requests (chunked prefill); "
        "default 512 on CPU, 8192 on CUDA.",
    )
    decode_prefill_budget: int | None = Field(
        None,
        ge=1,
        description="The same, in steps where some request is decoding: smaller keeps their inter-token "
        "latency steady while prompts arrive; default 2048 on CUDA, the prefill budget on CPU.",
    )
    gather_ms: float | None = Field(
        None,
        ge=0,
        le=1000,
        description="From idle, the first step waits at most this long for further requests while they keep "
        "arriving (a burst), so that they share its pass instead of waiting for the next; default 20 on CUDA, "
        "0 (off) on CPU.",
    )
    gather_gap_ms: float = Field(
        2.0,
        gt=0,
        le=100,
        description="That wait ends once no request has arrived for this long (a lone request waits this "
        "long), or once the waiting prompts fill the prefill budget or the free slots.",
    )
    decode_ahead: DecodeAhead = Field(
        "auto",
        description="Launch each decode step before the previous one's tokens reach the host, so that the "
        "GPU computes while the host does the step's bookkeeping; auto: on CUDA.",
    )
    batch_graphs: bool = Field(
        True,
        description="On CUDA, replay batched prefill passes of short prompts (up to 512 tokens, captured at "
        "their ends) as CUDA graphs, one per (rows, width) bucket, captured at start-up.",
    )
    packed_prefill: bool = Field(
        True,
        description="On CUDA (Mamba2), prefill a step's fresh prompts (nothing restored, captured at their ends) "
        "packed back to back into one row, one CUDA graph per bucket of total tokens, instead of right-padded "
        "rows.",
    )
    engine_process: bool | None = Field(
        None,
        description="Run the engine (scheduler, model, state cache) in its own process, which the HTTP "
        "process talks to over a pipe: HTTP work and model work then hold separate GILs; default: on with "
        "CUDA, off on CPU.",
    )
    api_servers: int = Field(
        1,
        ge=1,
        le=64,
        description="HTTP front-end processes (parse, tokenize, stream) in front of the one engine core, on one "
        "port (SO_REUSEPORT spreads the connections); above 1 implies --engine-process. Each front end keeps "
        "its own sessions' chat encodings and its share of --max-concurrent-requests.",
    )
    # network
    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind.")
    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Accepted Bearer key (repeatable; env: comma-separated)."
    )
    # state cache
    no_cache: bool = Field(False, description="Disable the state cache (every request prefills in full).")
    share_prefixes_across_keys: bool = Field(
        False,
        description="One prefix tree for all API keys (a prompt prefix one key sent serves the others; "
        "TTFT then reveals across keys whether a prefix was sent before).",
    )
    chat_answer_ids: bool = Field(
        False,
        description="A chat follow-up takes the model's previous answer, sent back unchanged, as the ids it "
        "generated instead of re-tokenizing its text, so that it resumes where that answer ended (a session's "
        "prompt then depends on this server's memory of the conversation).",
    )
    hot_window: int = Field(4, ge=0, description="Most recent checkpoints per session kept in the hot tier.")
    hot_bytes: ByteSize = Field(ByteSize(512 * 2**20), description="Hot tier (VRAM) byte budget.")
    cold_bytes: ByteSize = Field(ByteSize(2 * 2**30), description="Cold tier (pinned RAM) byte budget.")
    hot_dtype: HotDType = Field("fp8", description="Hot tier storage precision.")
    cold_dtype: ColdDType = Field("fp16", description="Cold tier (and disk) storage precision.")
    hot_kv_dtype: HotKVDType = Field(
        "model",
        description="A hybrid model's attention KV in the hot tier: 'model' (its dtype, lossless) or 'fp8' "
        "(e4m3, a scale per token and head: about half a bf16 KV's bytes). Cold and disk KV follow --cold-dtype.",
    )
    disk_dir: Path | None = Field(None, description="Directory of the disk tier (off when unset).")
    disk_bytes: ByteSize = Field(ByteSize(8 * 2**30), description="Disk tier byte budget.")
    remote_url: str | None = Field(
        None,
        description="Redis (or Valkey) URL of the remote tier shared by replicas, redis://host:6379/0 or "
        "rediss:// for TLS (off when unset).",
    )
    remote_bytes: ByteSize = Field(
        ByteSize(4 * 2**30), description="Remote tier byte budget, shared by every replica of the model."
    )
    remote_ttl: float = Field(
        86400.0, gt=0, description="Seconds a remote checkpoint lives after its last use."
    )
    remote_dtype: RemoteDType | None = Field(
        None, description="Remote tier storage precision (default: the cold tier's)."
    )
    remote_checkpoints: RemoteCheckpoints = Field(
        "ends",
        description="Which checkpoints are written to the remote tier: ends (message ends, prompt ends and "
        "finishes), finish (finishes only: a third of the write bandwidth), all (interval ones too).",
    )
    remote_password: SecretStr | None = Field(
        None, description="Redis AUTH password (prefer the environment variable or --remote-password-file)."
    )
    remote_password_file: Path | None = Field(None, description="File holding the Redis AUTH password.")
    remote_tls_ca_file: Path | None = Field(None, description="CA bundle verifying a rediss:// server.")
    remote_tls_cert_file: Path | None = Field(None, description="Client certificate for a rediss:// server.")
    remote_tls_key_file: Path | None = Field(None, description="Client key for a rediss:// server.")
    remote_min_tokens: int | None = Field(
        None,
        ge=0,
        description="Fetch a remote checkpoint only if it saves at least this many prompt tokens over the local "
        "ones; default 0 on CPU, 16384 on CUDA (where a shorter prefill is faster than the fetch).",
    )
    remote_timeout: float = Field(
        2.0, gt=0, description="Seconds a remote call may take before it counts as failed (then backs off)."
    )
    checkpoint_interval: int | None = Field(
        None,
        ge=1,
        description="Capture a checkpoint every N prompt tokens, rounded up to a multiple of the model's scan "
        "chunk; default 256 on CPU, 4096 on CUDA.",
    )
    max_checkpoints_per_request: int = Field(
        8, ge=1, description="Most checkpoints one request's prefill captures (thinned; plus one at finish)."
    )
    # limits
    max_prompt_tokens: int = Field(32768, ge=1, description="Longest prompt accepted, in tokens.")
    max_body_bytes: ByteSize = Field(ByteSize(8 * 2**20), description="Largest request body accepted.")
    max_concurrent_requests: int = Field(256, ge=1, description="Requests in flight before 429.")
    max_tokens_cap: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_model_len: int | None = Field(
        None,
        ge=1,
        description="Hybrid models: the longest sequence (prompt + max_tokens) a request may need; each live slot "
        "reserves attention KV for this many tokens (default 8192). A longer request gets a 400.",
    )
    max_n: int = Field(8, ge=1, description="Largest n (choices per request).")
    max_messages: int = Field(1000, ge=1, description="Most messages a chat request may carry.")
    shutdown_grace: float = Field(
        15.0, ge=0, description="Seconds running requests get to finish after SIGTERM before they are ended."
    )
    gil_switch_interval_ms: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Python's thread switch interval: how long the engine's worker thread may wait for the "
        "interpreter lock while the HTTP thread holds it; default Python's 5 ms.",
    )
    log_level: LogLevel = Field("info", description="Logging level.")
    log_format: LogFormat = Field(
        "auto",
        description="Log lines as text or json (one object a line); auto: text on a terminal, else json.",
    )
    log_session_ids: bool = Field(True, description="Write session ids into the logs (access log included).")
    profile_dir: Path | None = Field(
        None,
        description="Directory for torch profiler traces of the model worker thread; when set, POST "
        "/start_profile and POST /stop_profile record one (off when unset).",
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("api_key")
    @classmethod
    def _nonempty_keys(cls, value: list[str]) -> list[str]:
        if any(not k for k in value):
            raise ValueError("an API key must not be empty")
        return value

    @field_validator(
        "log_level",
        "log_format",
        "device",
        "dtype",
        "hot_dtype",
        "cold_dtype",
        "hot_kv_dtype",
        "remote_dtype",
        "state_dtype",
        mode="before",
    )
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_servers")
    @classmethod
    def _front_ends_need_a_core(cls, value: int, info: ValidationInfo) -> int:
        if value > 1 and info.data.get("engine_process") is False:
            raise ValueError("several front ends share one engine core: drop --no-engine-process")
        return value

    @field_validator("remote_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    def remote_secret(self) -> str | None:
        """The Redis password: --remote-password-file's contents (stripped), else --remote-password."""
        if self.remote_password_file is not None:
            return self.remote_password_file.read_text().strip()
        return self.remote_password.get_secret_value() if self.remote_password is not None else None

    @property
    def model_name(self) -> str:
        """The id `/v1/models` reports and requests must name."""
        return self.served_model_name or _directory_name(self.model)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_key)

    @property
    def log_level_int(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level.upper()]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _metavar(name: str, annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "{" + ",".join(str(a) for a in get_args(annotation)) + "}"
    return name.upper()


def build_parser(prog: str = "tssc serve") -> argparse.ArgumentParser:
    """An argparse parser with one flag per `Settings` field; unset flags stay absent."""
    parser = argparse.ArgumentParser(prog=prog, argument_default=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"tssc {package_version()}")
    for name, field in Settings.model_fields.items():
        env = ENV_PREFIX + name.upper()
        help_text = f"{field.description} [env {env}]"
        if field.annotation is bool or field.annotation == bool | None:  # None: chosen per device
            action = argparse.BooleanOptionalAction if field.default is not False else "store_true"
            parser.add_argument(_flag(name), dest=name, action=action, help=help_text)
        elif name == "api_key":
            parser.add_argument(_flag(name), dest=name, action="append", metavar="KEY", help=help_text)
        else:
            parser.add_argument(
                _flag(name), dest=name, metavar=_metavar(name, field.annotation), help=help_text
            )
    return parser


def parse_settings(argv: Sequence[str] | None = None, prog: str = "tssc serve") -> Settings:
    """Settings from `argv` (command line) over `TSSC_*` environment variables over defaults.

    Raises `SystemExit(2)` on unknown flags (argparse) and `pydantic.ValidationError` on bad values.
    """
    namespace = build_parser(prog).parse_args(list(argv) if argv is not None else None)
    return Settings(**vars(namespace))


def resolve_engine_process(settings: Settings) -> Settings:
    """`settings` with `engine_process` decided when it was left unset: on where the engine runs on CUDA (on an
    H200 it serves the 130m shape's 64 streams at 0.62x upstream against 0.36x in one process, and leaves the
    2.7b shape's throughput and follow-ups where they were: BENCHMARKS.md session 10), off on CPU, where the
    core's compute and the HTTP process would share the same few cores."""
    if settings.engine_process is not None:
        return settings
    if settings.api_servers > 1:
        return settings.model_copy(update={"engine_process": True})
    if settings.device == "auto":
        import torch

        cuda = torch.cuda.is_available()
    else:
        cuda = settings.device.startswith("cuda")
    return settings.model_copy(update={"engine_process": cuda})


@functools.lru_cache(maxsize=8)
def _directory_name(model: str) -> str:
    """A model path's last part (or the path itself): cached, as every request's model check and response
    asks for it, and a `Path` costs ~10 µs of the event loop each time."""
    return Path(model.rstrip("/")).name or model


def apply_switch_interval(settings: Settings) -> None:
    """The HTTP event loop (or, with `--engine-process`, the core's engine loop) and the engine's worker
    thread share the interpreter lock: a thread that wants it back (the worker after every torch call,
    which releases it) waits up to the switch interval while the other runs Python. A shorter interval
    hands it over sooner."""
    if settings.gil_switch_interval_ms is not None:
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
