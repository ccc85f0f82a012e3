"""The `--remote-*` flags become the cache's RemoteConfig (server/engine/factory.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine.factory import remote_config
from server.settings import parse_settings


def test_no_url_no_remote_tier() -> None:
    assert remote_config(parse_settings([]), torch.device("cpu")) is None


@pytest.mark.parametrize(
    ("choice", "reasons"),
    [
        ("ends", {"boundary", "prompt", "finish"}),
        ("finish", {"finish"}),
        ("all", {"boundary", "prompt", "finish", "interval"}),
    ],
)
def test_which_checkpoints_are_written(choice: str, reasons: set[str]) -> None:
    settings = parse_settings(["--remote-url", "redis://r:6379/0", "--remote-checkpoints", choice])
    cfg = remote_config(settings, torch.device("cpu"))
    assert cfg is not None and cfg.reasons == frozenset(reasons)


def test_flags_and_device_defaults(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    args = ["--remote-url", "rediss://r:6380/1", "--remote-bytes", "1GiB", "--remote-ttl", "60"]
    args += ["--remote-dtype", "FP8", "--remote-password-file", str(secret)]
    cfg = remote_config(parse_settings(args), torch.device("cuda"))
    assert cfg is not None
    assert (cfg.budget, cfg.ttl, cfg.dtype, cfg.password) == (2**30, 60.0, "fp8", "from-file")
    assert cfg.min_tokens == 16384  # CUDA: a shorter prefill beats the fetch
    assert remote_config(parse_settings(args), torch.device("cpu")).min_tokens == 0  # type: ignore[union-attr]
    explicit = parse_settings([*args, "--remote-min-tokens", "5"])
    assert remote_config(explicit, torch.device("cuda")).min_tokens == 5  # type: ignore[union-attr]


def test_a_bad_url_is_refused() -> None:
    with pytest.raises(ValueError, match="redis://"):
        parse_settings(["--remote-url", "http://r:6379"])
